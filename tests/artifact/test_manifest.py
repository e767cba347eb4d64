"""Manifest.from_dict and read_manifest on the exported manifests: a round trip, then every damage the
reader must refuse, each with an ArtifactError naming the key; graph files outside the version folder."""

import copy
import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from vaeserve.artifact.manifest import MANIFEST, Manifest, file_sha256, read_manifest
from vaeserve.artifact.repository import load_version
from vaeserve.errors import ArtifactError

MODELS = ("vae", "cvae", "ppca")


@pytest.fixture(scope="module")
def manifests(model_repository):
    """The parsed manifest.json of each exported model (copies: damage them freely)."""
    return {name: json.loads((model_repository / name / "1" / MANIFEST).read_text()) for name in MODELS}




@pytest.mark.parametrize("name", MODELS)
def test_round_trip_equals_the_file(model_repository, manifests, name):
    manifest = read_manifest(model_repository / name / "1")
    d = manifest.to_dict()
    assert Manifest.from_dict(d).to_dict() == d
    assert d == manifests[name]
    assert Manifest.from_dict(manifests[name]).to_dict() == manifests[name]
    assert (manifest.name, manifest.version, manifest.model.kind) == (name, 1, name)
    assert manifest.input.features == 64 and manifest.conditional == (name == "cvae")


def _set(path: str, value):
    """A damage: the value at a dotted path (list items by index) set to `value`."""

    def damage(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[int(key)] if isinstance(m, list) else m[key]
        m[int(last) if isinstance(m, list) else last] = value

    return damage


def _delete(path: str):
    def damage(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        del m[last]

    return damage


def _scale(m):
    m["normalization"]["scale"][7] = 0.0


def _negative_scale(m):
    m["normalization"]["scale"][0] = -1.0


def _short(section: str, key: str, cut: int = 1):
    def damage(m):
        m[section][key] = m[section][key][:-cut]

    return damage


def _long_shift(m):
    m["normalization"]["shift"].append(0.0)


def _low_above_high(m):
    m["support"]["low"][3] = m["support"]["high"][3] + 1.0


def _rename_decoder_input(m):
    m["graphs"]["decoder"]["inputs"][0]["name"] = "latent"


def _drop_label_input(m):
    m["graphs"]["decoder"]["inputs"] = m["graphs"]["decoder"]["inputs"][:1]  # the cvae's y


def _prior_not_summing_to_one(m):
    m["scoring"]["class_prior"] = [0.2] * 10


def _prior_with_zero(m):
    m["scoring"]["class_prior"] = [0.0] + [1 / 9] * 9


# (model whose manifest is damaged, damage, the key the message names, what it says about it)
DAMAGES = {
    "default NaN": ("vae", _set("thresholds.default", math.nan), "thresholds.default", "must be finite, got nan"),
    "default Infinity": ("vae", _set("thresholds.default", math.inf), "thresholds.default", "must be finite, got inf"),
    "default string": ("vae", _set("thresholds.default", "40"), "thresholds.default", "has the wrong type (string"),
    "default missing": ("vae", _delete("thresholds.default"), "thresholds.default", "is missing"),
    "false positive rate 1.5": ("vae", _set("thresholds.target_false_positive_rate", 1.5),
                                "thresholds.target_false_positive_rate", "must be in (0, 1), got 1.5"),  # fmt: skip
    "quantile level 1.5": ("vae", _set("thresholds.quantiles.neg_elbo", {"1.5": 3.0}), "thresholds.quantiles.neg_elbo.1.5",
                           "a quantile level must be a number in (0, 1)"),  # fmt: skip
    "scale 0": ("vae", _scale, "normalization.scale", "every value must be > 0 (feature 7 is 0)"),
    "scale below float32": ("vae", _set("normalization.scale.7", 1e-50), "normalization.scale",
                            "every value must be > 0 (feature 7 is 0)"),  # fmt: skip
    "scale negative": ("vae", _negative_scale, "normalization.scale", "every value must be > 0 (feature 0 is -1)"),
    "scale short": ("vae", _short("normalization", "scale"), "normalization.scale", "63 values for 64 features"),
    "shift long": ("ppca", _long_shift, "normalization.shift", "65 values for 64 features"),
    "normalization kind": ("ppca", _set("normalization.kind", "log"), "normalization.kind", "'log' is not one of"),
    "support low short": ("vae", _short("support", "low"), "support.low", "63 values for 64 features"),
    "support low above high": ("vae", _low_above_high, "support.low", "feature 3 has low 17 above high 16"),
    "support missing": ("vae", _delete("support"), "support", "is missing"),
    "feature names short": ("vae", _short("input", "feature_names"), "input.feature_names", "has 63 items; expected 64"),
    "input shape": ("vae", _set("input.shape", [-1, 63]), "input.shape", "must be [-1, 64]"),
    "image shape": ("vae", _set("input.image_shape", [1, 8, 7]), "input.image_shape", "[1, 8, 7] does not hold 64 features"),
    "likelihood poisson": ("vae", _set("scoring.likelihood", "poisson"), "scoring.likelihood",
                           "is 'poisson'; expected one of gaussian, gaussian-fixed, bernoulli"),  # fmt: skip
    "kind gan": ("vae", _set("model.kind", "gan"), "model.kind", "is 'gan'; expected one of vae, cvae, ppca"),
    "latent_dim 0": ("vae", _set("model.latent_dim", 0), "model.latent_dim", "must be in [1, 16777216], got 0"),
    "latent_dim huge": ("vae", _set("model.latent_dim", 10**6 * 100), "model.latent_dim", "must be in [1, 16777216]"),
    "features huge": ("vae", _set("input.features", 1 << 25), "input.features", "must be in [1, 16777216]"),
    "latent_dim true": ("vae", _set("model.latent_dim", True), "model.latent_dim", "has the wrong type (boolean"),
    # The graphs' tensors no longer agree with the model they claim to be.
    "latent_dim 5": ("vae", _set("model.latent_dim", 5), "graphs.encoder.outputs",
                     "are not this model's: expected mu [-1, 5], logvar [-1, 5]"),  # fmt: skip
    "gaussian likelihood, bernoulli decoder": ("vae", _set("scoring.likelihood", "gaussian"), "graphs.decoder.outputs",
                                               "are not this model's: expected x_mean [-1, 64], x_logvar [-1, 64]"),  # fmt: skip
    "encoder file ../": ("vae", _set("graphs.encoder.file", "../x.onnx"), "graphs.encoder.file",
                         "'../x.onnx' must be a file name inside the version folder"),  # fmt: skip
    "encoder file absolute": ("vae", _set("graphs.encoder.file", "/models/vae/2/encoder.onnx"), "graphs.encoder.file",
                              "'/models/vae/2/encoder.onnx' must be a file name inside the version folder"),  # fmt: skip
    "decoder file ..": ("vae", _set("graphs.decoder.file", ".."), "graphs.decoder.file", "must be a file name"),
    "encoder sha256": ("vae", _set("graphs.encoder.sha256", "abc"), "graphs.encoder.sha256", "'abc' is not a valid value"),
    "decoder input renamed": ("vae", _rename_decoder_input, "graphs.decoder.inputs",
                              "are not this model's: expected z [-1, 4]"),  # fmt: skip
    "cvae decoder without y": ("cvae", _drop_label_input, "graphs.decoder.inputs",
                               "are not this model's: expected z [-1, 4], y [-1, 10]"),  # fmt: skip
    "tensor dtype": ("vae", _set("graphs.encoder.inputs.0.dtype", "float16"), "graphs.encoder.inputs[0].dtype",
                     "is 'float16'; expected one of float32, float64"),  # fmt: skip
    "class prior summing to 2": ("cvae", _prior_not_summing_to_one, "scoring.class_prior", "summing to 1"),
    "class prior with a 0": ("cvae", _prior_with_zero, "scoring.class_prior", "one finite probability > 0 per label"),
    "class prior of 9": ("cvae", _set("scoring.class_prior", [0.1] * 9), "scoring.class_prior", "has 9 items; expected 10"),
    "class prior for a vae": ("vae", _set("scoring.class_prior", [0.5, 0.5]), "scoring.class_prior", "must be null for a vae"),
    "cvae without labels": ("cvae", _set("labels", None), "labels.names", "a cvae needs at least 2 distinct label names"),
    "cvae with repeated labels": ("cvae", _set("labels.names", ["0"] * 10), "labels.names", "at least 2 distinct"),
    "labels for a ppca": ("ppca", _set("labels", {"names": ["a", "b"]}), "labels", "must be null for a ppca"),
    "unknown key model.extra": ("vae", _set("model.extra", 1), "model.extra", "is not a known key"),
    "unknown top-level key": ("ppca", _set("comment", "hi"), "comment", "is not a known key"),
    "unknown normalization key": ("vae", _set("normalization.center", []), "normalization.center", "unknown key"),
    "parity tolerance negative": ("vae", _set("parity.tolerance", -1.0), "parity.tolerance", "must be finite and >= 0"),
    "version 0": ("vae", _set("version", 0), "version", "must be >= 1, got 0"),
    "name with a slash": ("vae", _set("name", "../escape"), "name", "'../escape' is not a valid value"),
    "schema_version 99": ("vae", _set("schema_version", 99), "schema_version", "99 is not supported; this vaeserve reads 2, 3 and 4"),
    # Schema 4: the combined score and its conformal calibration.
    "calibration scores unsorted": ("vae", lambda m: m["thresholds"]["calibration_scores"].reverse(),
                                    "thresholds.calibration_scores", "must be finite and ascending"),  # fmt: skip
    "calibration scores short": ("vae", _short("thresholds", "calibration_scores"), "thresholds.calibration_scores",
                                 "has 179 items; expected 180"),  # fmt: skip
    "calibration score NaN": ("vae", _set("thresholds.calibration_scores.0", float("nan")), "thresholds.calibration_scores",
                              "must be finite and ascending"),  # fmt: skip
    "smallest rate not 1/(n+1)": ("vae", _set("thresholds.smallest_false_positive_rate", 0.01),
                                  "thresholds.smallest_false_positive_rate", "1 / (calibration_rows + 1)"),  # fmt: skip
    "promised rate 0": ("vae", _set("thresholds.promised_false_positive_rate", 0.0), "thresholds.promised_false_positive_rate",
                        "in (0, 1)"),  # fmt: skip
    "combination weight 0": ("vae", _set("scoring.combination.weight", [1.0, 0.0]), "scoring.combination",
                             "scale and weight finite and > 0"),  # fmt: skip
    "combination part unknown": ("vae", _set("scoring.combination.parts", ["neg_elbo", "pca"]), "scoring.combination.parts",
                                 "must be distinct names from ['neg_elbo', 'knn']"),  # fmt: skip
    "combination scale short": ("vae", _set("scoring.combination.scale", [1.0]), "scoring.combination.scale",
                                "has 1 items; expected 2"),  # fmt: skip
    "knn without neighbours": ("vae", _set("scoring.neighbours", None), "scoring.combination.parts",
                               "must be distinct names from ['neg_elbo']"),  # fmt: skip
    "k above the reference rows": ("vae", _set("scoring.neighbours.k", 10**7), "scoring.neighbours",
                                   "is more than its"),  # fmt: skip
    "neighbour graph without parity": ("vae", lambda m: m["parity"].pop("neighbours"), "parity.neighbours",
                                       "a neighbours graph comes with its parity"),  # fmt: skip
    "neighbour graph output renamed": ("vae", _set("graphs.neighbours.outputs.0.name", "distance"), "graphs.neighbours.outputs",
                                       "are not this model's: expected knn [-1, 1] float64"),  # fmt: skip
    "neg_elbo score beside a combination": ("vae", _set("thresholds.score", "neg_elbo"), "thresholds.score",
                                            "is 'neg_elbo'; expected one of combined"),  # fmt: skip
    "default not the conformal threshold": ("vae", _set("thresholds.default", 1e9), "thresholds.default",
                                            "the calibration score of rank 1 from the top"),  # fmt: skip
    "promised rate not k/(n+1)": ("vae", _set("thresholds.promised_false_positive_rate", 0.5), "thresholds.default",
                                  "and 1/(calibration_rows + 1)"),  # fmt: skip
    "combined score without a combination": ("vae", _set("scoring.combination", None), "thresholds.score",
                                             "is 'combined'; expected one of neg_elbo"),  # fmt: skip
}


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_manifest_is_refused_naming_the_key(manifests, case):
    model, damage, key, reason = DAMAGES[case]
    manifest = copy.deepcopy(manifests[model])
    damage(manifest)
    with pytest.raises(ArtifactError) as failure:
        Manifest.from_dict(manifest)
    message = str(failure.value)
    assert message.startswith(f"corrupt manifest: {key}"), message
    assert reason in message


def test_schema_version_1_says_how_to_re_export(manifests):
    manifest = copy.deepcopy(manifests["vae"]) | {"schema_version": 1}
    with pytest.raises(ArtifactError) as failure:
        Manifest.from_dict(manifest)
    message = str(failure.value)
    assert message.startswith("corrupt manifest: schema_version 1 is not supported")
    assert "re-export" in message
    checkpoint = manifest["source_checkpoint"]["path"]
    assert message.endswith(f"vaeserve export {checkpoint} --repository REPOSITORY --name vae")


def test_not_an_object_is_refused():
    with pytest.raises(ArtifactError, match=r"^corrupt manifest: expected a JSON object, got list$"):
        Manifest.from_dict([])


def test_read_manifest_names_the_file_and_the_key(version, rewrite):
    rewrite(version, _set("scoring.likelihood", "poisson"))
    with pytest.raises(ArtifactError) as failure:
        read_manifest(version)
    assert str(failure.value).startswith(f"{version / MANIFEST}: corrupt manifest: scoring.likelihood is 'poisson'")


@pytest.mark.parametrize("literal, value", [("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf)])
@pytest.mark.parametrize("key, reason", [("thresholds.default", "thresholds.default must be finite, got "),
                                         ("normalization.scale.5", "normalization.scale: every value must be finite")])
def test_non_finite_json_literals_are_refused_naming_the_key(version, literal, value, key, reason, rewrite):
    rewrite(version, _set(key, value))
    assert literal in (version / MANIFEST).read_text()  # as Python's json writes it
    with pytest.raises(ArtifactError) as failure:
        read_manifest(version)
    assert str(failure.value).startswith(f"{version / MANIFEST}: corrupt manifest: {reason}")


def test_number_overflowing_to_infinity_is_refused(version):
    # 1e400 is a valid JSON number that Python reads as inf, past the NaN/Infinity literal check.
    path = version / MANIFEST
    path.write_text(re.sub(r'"default": [^,]+,', '"default": 1e400,', path.read_text(), count=1))
    with pytest.raises(ArtifactError) as failure:
        read_manifest(version)
    assert str(failure.value) == f"{path}: corrupt manifest: thresholds.default must be finite, got inf"


def test_graph_file_as_an_absolute_path_is_refused(version, model_repository, rewrite):
    elsewhere = str(model_repository / "vae" / "1" / "encoder.onnx")  # the same graph, same sha256
    rewrite(version, _set("graphs.encoder.file", elsewhere))
    with pytest.raises(ArtifactError) as failure:
        load_version(version)
    message = str(failure.value)
    assert message.startswith(f"{version / MANIFEST}: corrupt manifest: graphs.encoder.file ")
    assert message.endswith("must be a file name inside the version folder")


def test_graph_file_in_the_parent_folder_is_refused(version, rewrite):
    shutil.copy(version / "encoder.onnx", version.parent / "x.onnx")  # a real graph with the listed sha256
    rewrite(version, _set("graphs.encoder.file", "../x.onnx"))
    with pytest.raises(ArtifactError) as failure:
        load_version(version)
    assert str(failure.value) == (f"{version / MANIFEST}: corrupt manifest: graphs.encoder.file '../x.onnx' "
                                  "must be a file name inside the version folder")  # fmt: skip


def test_graph_symlinked_outside_the_folder_is_refused(version, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(version / "encoder.onnx", outside)  # same bytes: the sha256 in the manifest still matches
    (version / "encoder.onnx").symlink_to(outside)
    assert file_sha256(version / "encoder.onnx") == read_manifest(version).encoder.sha256
    with pytest.raises(ArtifactError) as failure:
        load_version(version)
    assert str(failure.value) == (f"{version / 'encoder.onnx'}: links outside its version folder; "
                                  "a version's graphs live inside it")  # fmt: skip


def test_graph_symlinked_inside_the_folder_loads(version):
    # The check is on where the link leads, not on links as such.
    (version / "encoder.onnx").rename(version / "encoder-1.onnx")
    (version / "encoder.onnx").symlink_to("encoder-1.onnx")
    loaded = load_version(version)
    assert loaded.encoder_path == version / "encoder.onnx"
    assert file_sha256(loaded.encoder_path) == loaded.manifest.encoder.sha256


def test_manifest_and_repository_do_not_import_torch_or_onnxruntime():
    code = ("import sys, vaeserve.artifact.manifest, vaeserve.artifact.repository; "
            "heavy = sorted({'torch', 'onnxruntime'} & set(sys.modules)); assert not heavy, heavy")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
