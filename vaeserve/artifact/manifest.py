"""manifest.json as frozen, typed dataclasses: what a model version is. Written last by export, so its
presence marks a version complete; the schema is documented in docs/model-repository.md.

`Manifest.from_dict` is the one reader. A missing key, an unknown key, a wrong type or an impossible
value (a non-finite threshold, a scale <= 0, lengths that disagree with the feature count, an unknown
likelihood, a graph file outside the version folder, graph inputs and outputs other than the contract
of `graph_contract`) raises ArtifactError naming the key. Whatever loads here can be served: nothing
downstream reads the JSON by hand. No torch, no ONNX Runtime.
"""

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.conformal import Calibration
from vaeserve.errors import ArtifactError, cut
from vaeserve.normalization import Normalizer, Support
from vaeserve.scoring import LIKELIHOODS, Combination, decoder_outputs

# 2: support, scoring section, class prior moved from labels to scoring. 3: the optional score graph
# (graphs.score) and its parity against the NumPy scorer (parity.score); float64 tensors. A version 2
# manifest still reads: it has no score graph, and the service scores it with the NumPy scorer.
# 4: conformal calibration (thresholds.calibration_scores, promised and smallest false-positive rates,
# rows held out of training and early stopping) and the combined default score (scoring.neighbours,
# scoring.combination, graphs.neighbours, parity.neighbours). Schema 2 and 3 manifests still read: their
# default score is neg_elbo and their Score has no p-values.
SCHEMA_VERSION = 4
READS = (2, 3, 4)  # schema versions this vaeserve reads
MANIFEST = "manifest.json"
KINDS = ("vae", "cvae", "ppca")
DTYPES = ("float32", "float64")
SCORES = ("neg_elbo", "neg_iw", "combined")  # scores thresholds are calibrated for; "combined" is scoring.combination
MAX_CALIBRATION_ROWS = 1 << 20
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_WIDTH = 1 << 24  # features or latent dimensions of a model: a 4096 x 4096 image; more is a corrupt manifest
MAX_LABEL = 1024  # characters of a label name
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Corrupt(Exception):
    """A manifest problem, naming the key; read_manifest adds the file."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor [batch, width] with a dynamic batch axis: float32, or float64 for the score graph's scores."""

    name: str
    width: int
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": [-1, self.width], "dtype": self.dtype}


@dataclass(frozen=True)
class GraphInfo:
    file: str  # a file name inside the version folder
    sha256: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}  # fmt: skip


def graph_contract(features: int, latent_dim: int, likelihood: str, classes: int = 0) -> dict[str, tuple]:
    """{graph: (inputs, outputs)} of a model version's graphs: the encoder and decoder every version has,
    and the score graph (vaeserve.export.graphs.build_score_graph) of versions exported since schema 3:

        encoder   x [N, features] (, y [N, classes])  ->  mu, logvar [N, latent_dim]
        decoder   z [N, latent_dim] (, y)             ->  scoring.decoder_outputs(likelihood), each [N, features]
        score     x [N, features] (, y)               ->  neg_elbo, reconstruction, kl [N, 1],
                                                          per_feature [N, features]; float64
        neighbours  x [N, features]                   ->  knn [N, 1] float64 (since schema 4)
    """
    label = (TensorInfo("y", classes),) if classes else ()
    scores = tuple(TensorInfo(n, 1, "float64") for n in ("neg_elbo", "reconstruction", "kl"))
    return {
        "encoder": ((TensorInfo("x", features), *label), (TensorInfo("mu", latent_dim), TensorInfo("logvar", latent_dim))),
        "decoder": ((TensorInfo("z", latent_dim), *label), tuple(TensorInfo(n, features) for n in decoder_outputs(likelihood))),
        "score": ((TensorInfo("x", features), *label), (*scores, TensorInfo("per_feature", features, "float64"))),
        "neighbours": ((TensorInfo("x", features),), (TensorInfo("knn", 1, "float64"),)),
    }


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # vae | cvae | ppca
    arch: str  # mlp | conv (informational)
    latent_dim: int


@dataclass(frozen=True)
class InputInfo:
    features: int
    feature_names: tuple[str, ...]
    image_shape: tuple[int, int, int] | None  # (channels, height, width) when rows are images

    def to_dict(self) -> dict:
        return {"features": self.features, "dtype": "float32", "shape": [-1, self.features],
                "image_shape": None if self.image_shape is None else list(self.image_shape),
                "feature_names": list(self.feature_names)}  # fmt: skip


@dataclass(frozen=True)
class ScoringInfo:
    """What Score needs beyond the graphs, and what the thresholds were calibrated with."""

    likelihood: str  # p(x|z): gaussian | gaussian-fixed | bernoulli; names the decoder's outputs too
    elbo_samples: int  # posterior samples of the ELBO's reconstruction term
    iw_samples: int  # K of the importance-weighted bound the neg_iw quantiles were calibrated at
    seed: int  # of the posterior noise
    class_prior: tuple[float, ...] | None  # CVAE: p(y) for label-free scoring, in label order
    neighbours: "NeighbourInfo | None" = None  # the kNN part of the combined score (schema 4)
    combination: Combination | None = None  # the default score's parts and their standardisation (schema 4)


@dataclass(frozen=True)
class NeighbourInfo:
    k: int  # nearest reference rows averaged
    reference_rows: int  # normalised training rows held in the neighbour graph

    def to_dict(self) -> dict:
        return {"k": self.k, "reference_rows": self.reference_rows}


@dataclass(frozen=True)
class Thresholds:
    score: str  # the score `default` applies to: combined (scoring.combination) or neg_elbo
    default: float
    target_false_positive_rate: float
    quantiles: dict[str, dict[str, float]]  # score -> quantile ("0.99") -> value
    calibration_rows: int
    calibrated_on: str
    label_free: bool
    # Schema 4 (vaeserve.conformal): the rate `default` holds, k/(n+1) <= target (or 1/(n+1) when the
    # target is out of reach), the smallest rate n rows support, 1/(n+1), and the calibration rows' scores,
    # ascending, for p-values. Older schemas: the target, None, None.
    promised_false_positive_rate: float = 0.0
    smallest_false_positive_rate: float | None = None
    calibration_scores: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        d = {"score": self.score, "default": self.default, "target_false_positive_rate": self.target_false_positive_rate,
             "quantiles": {s: dict(q) for s, q in self.quantiles.items()}, "calibration_rows": self.calibration_rows,
             "calibrated_on": self.calibrated_on, "label_free": self.label_free}  # fmt: skip
        if self.calibration_scores is not None:
            d |= {"promised_false_positive_rate": self.promised_false_positive_rate,
                  "smallest_false_positive_rate": self.smallest_false_positive_rate,
                  "calibration_scores": list(self.calibration_scores)}  # fmt: skip
        return d


@dataclass(frozen=True)
class ScoreParity:
    """The score graph against the NumPy scorer (vaeserve.scoring.score, float64) on the same encoder and
    decoder graphs, over the held-out validation rows at each batch size."""

    batch_sizes: tuple[int, ...]
    rows: int  # held-out rows scored
    tolerance: float  # relative: |graph - numpy| <= tolerance * (1 + |numpy|) for every value
    max_abs_diff: dict[str, float]  # output -> max |graph - numpy|
    max_rel_diff: dict[str, float]  # output -> max |graph - numpy| / (1 + |numpy|)

    def to_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "rows": self.rows, "tolerance": self.tolerance,
                "max_abs_diff": dict(self.max_abs_diff), "max_rel_diff": dict(self.max_rel_diff)}  # fmt: skip


@dataclass(frozen=True)
class Parity:
    batch_sizes: tuple[int, ...]
    tolerance: float
    max_abs_diff: dict[str, float]  # "graph.output" -> max |ONNX Runtime - torch|
    score: ScoreParity | None = None  # with the score graph
    neighbours: ScoreParity | None = None  # the neighbour graph against scoring.neighbour_distance (float64)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    created: str
    model: ModelInfo
    input: InputInfo
    labels: tuple[str, ...] | None  # CVAE label names, in one-hot order
    normalization: Normalizer
    support: Support
    scoring: ScoringInfo
    encoder: GraphInfo
    decoder: GraphInfo
    opset: int
    exporter: str
    producer: dict[str, str]
    parity: Parity
    source_checkpoint: dict[str, str]  # path, sha256
    thresholds: Thresholds
    score: GraphInfo | None = None  # the score graph; None before it (schema 2) or when it missed its parity
    neighbours: GraphInfo | None = None  # the neighbour graph of the combined score (schema 4), when exported with one
    label_column: str | None = None  # a CVAE's: the training data's label column (CSV) or array (NPZ), when named

    @property
    def conditional(self) -> bool:
        return self.model.kind == "cvae"

    @property
    def graphs(self) -> dict[str, GraphInfo]:
        """Every graph of the version by name: encoder, decoder, and score and neighbours where there are."""
        optional = {"score": self.score, "neighbours": self.neighbours}
        return {"encoder": self.encoder, "decoder": self.decoder} | {k: v for k, v in optional.items() if v is not None}

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "model": {"kind": self.model.kind, "arch": self.model.arch, "latent_dim": self.model.latent_dim},
            "input": self.input.to_dict(),
            "labels": None if self.labels is None else {"names": list(self.labels)} | ({} if self.label_column is None else {"column": self.label_column}),
            "normalization": self.normalization.to_dict(),
            "support": self.support.to_dict(),
            "scoring": {"likelihood": self.scoring.likelihood, "elbo_samples": self.scoring.elbo_samples, "iw_samples": self.scoring.iw_samples,
                        "seed": self.scoring.seed,
                        "class_prior": None if self.scoring.class_prior is None else list(self.scoring.class_prior),
                        "neighbours": None if self.scoring.neighbours is None else self.scoring.neighbours.to_dict(),
                        "combination": None if self.scoring.combination is None else self.scoring.combination.to_dict()},  # fmt: skip
            "graphs": {name: graph.to_dict() for name, graph in self.graphs.items()},
            "opset": self.opset,
            "exporter": self.exporter,
            "producer": dict(self.producer),
            "parity": {"batch_sizes": list(self.parity.batch_sizes), "tolerance": self.parity.tolerance,
                       "max_abs_diff": dict(self.parity.max_abs_diff)}
                      | ({} if self.parity.score is None else {"score": self.parity.score.to_dict()})
                      | ({} if self.parity.neighbours is None else {"neighbours": self.parity.neighbours.to_dict()}),  # fmt: skip
            "source_checkpoint": dict(self.source_checkpoint),
            "thresholds": self.thresholds.to_dict(),
        }

    @classmethod
    def from_dict(cls, d) -> "Manifest":
        """Read and check a parsed manifest.json; ArtifactError("corrupt manifest: <key> ...")."""
        try:
            return _read(d)
        except _Corrupt as err:
            raise ArtifactError(f"corrupt manifest: {err}") from None


# Reading: one helper per JSON type, each naming the key it reads.


class _Object:
    """A JSON object read key by key; `done()` refuses the keys nobody asked for."""

    def __init__(self, value, where: str):
        if not isinstance(value, dict):
            raise _Corrupt(f"{where + ': ' if where else ''}expected a JSON object, got {_type(value)}")
        self.value, self.where, self.seen = value, where, set()

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kinds: tuple, expected: str, nullable: bool = False):
        if key not in self.value:
            raise _Corrupt(f"{self.key(key)} is missing")
        self.seen.add(key)
        value = self.value[key]
        if value is None and nullable:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise _Corrupt(f"{self.key(key)} has the wrong type ({_type(value)}; expected {expected})")
        return value

    def integer(self, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.get(key, (int,), "an integer")
        if value < minimum or maximum is not None and value > maximum:
            rule = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise _Corrupt(f"{self.key(key)} must be {rule}, got {value}")
        return value

    def number(self, key: str, check: Callable[[float], bool] = math.isfinite, rule: str = "finite") -> float:
        value = self.get(key, (int, float), "a number")
        if not math.isfinite(value) or not check(value):
            raise _Corrupt(f"{self.key(key)} must be {rule}, got {value!r}")
        return float(value)

    def string(self, key: str, choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None) -> str:
        value = self.get(key, (str,), "a string")
        if choices is not None and value not in choices:
            raise _Corrupt(f"{self.key(key)} is {cut(value)!r}; expected one of {', '.join(choices)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise _Corrupt(f"{self.key(key)} {cut(value)!r} is not a valid value")
        return value

    def boolean(self, key: str) -> bool:
        return self.get(key, (bool,), "true or false")

    def items(self, key: str, item: type, length: int | None = None, nullable: bool = False) -> tuple | None:
        value = self.get(key, (list,), "a list", nullable)
        if value is None:
            return None
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise _Corrupt(f"{self.key(key)}: every item must be {'a number' if isinstance(item, tuple) else 'a ' + item.__name__}")
        if length is not None and len(value) != length:
            raise _Corrupt(f"{self.key(key)} has {len(value)} items; expected {length}")
        return tuple(value)

    def object(self, key: str, nullable: bool = False) -> "_Object | None":
        value = self.get(key, (dict,), "an object", nullable)
        return None if value is None else _Object(value, self.key(key))

    def optional_object(self, key: str) -> "_Object | None":
        """An object that may be absent (a later schema's addition); None when it is."""
        return self.object(key) if key in self.value else None

    def section(self, key: str, parse, *args):
        """A section read by a class's own from_dict (which raises ValueError naming its key)."""
        value = self.get(key, (dict,), "an object")
        try:
            return parse(value, *args)
        except ValueError as err:
            raise _Corrupt(f"{self.key(key)}.{err}") from None

    def mapping(self, key: str, read_value: Callable[["_Object", str], object]) -> dict:
        section = self.object(key)
        return {k: read_value(section, k) for k in list(section.value)}

    def done(self):
        unknown = sorted(set(self.value) - self.seen)
        if unknown:
            raise _Corrupt(f"{self.key(unknown[0])} is not a known key")


def _type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _read(d) -> Manifest:
    top = _Object(d, "")
    version = top.get("schema_version", (int,), "an integer")
    if version not in READS:
        hint = ""
        if version == 1:
            source = d.get("source_checkpoint") if isinstance(d.get("source_checkpoint"), dict) else {}
            hint = (f" (written by an older vaeserve, without the model's support); re-export it: "
                    f"vaeserve export {source.get('path', 'CHECKPOINT')} --repository REPOSITORY --name {d.get('name', 'NAME')}")  # fmt: skip
        reads = ", ".join(str(v) for v in READS[:-1]) + f" and {READS[-1]}"
        raise _Corrupt(f"schema_version {version!r} is not supported; this vaeserve reads {reads}{hint}")

    m = top.object("model")
    model = ModelInfo(m.string("kind", KINDS), m.string("arch"), m.integer("latent_dim", 1, MAX_WIDTH))
    m.done()

    i = top.object("input")
    features = i.integer("features", 1, MAX_WIDTH)
    i.string("dtype", ("float32",))
    if i.items("shape", int) != (-1, features):
        raise _Corrupt(f"input.shape must be [-1, {features}]")
    image_shape = i.items("image_shape", int, 3, nullable=True)
    if image_shape is not None and (min(image_shape) < 1 or math.prod(image_shape) != features):
        raise _Corrupt(f"input.image_shape {list(image_shape)} does not hold {features} features")
    inputs = InputInfo(features, i.items("feature_names", str, features), image_shape)
    i.done()

    conditional = model.kind == "cvae"
    lab = top.object("labels", nullable=True)
    labels = None
    label_column = None
    if lab is not None:
        labels = lab.items("names", str)
        if "column" in lab.value:  # added after schema 3 was out: optional
            label_column = lab.string("column")
            if not 0 < len(label_column) <= MAX_LABEL:
                raise _Corrupt(f"labels.column must hold 1 to {MAX_LABEL} characters")
        lab.done()
    if conditional and (labels is None or len(labels) < 2 or len(set(labels)) != len(labels)):
        raise _Corrupt("labels.names: a cvae needs at least 2 distinct label names")
    if labels is not None and max(len(name) for name in labels) > MAX_LABEL:
        raise _Corrupt(f"labels.names: a label name is longer than {MAX_LABEL} characters")
    if not conditional and labels is not None:
        raise _Corrupt(f"labels must be null for a {model.kind}")

    normalization = top.section("normalization", Normalizer.from_dict, features)
    support = top.section("support", Support.from_dict, features)

    s = top.object("scoring")
    classes = len(labels) if conditional else 0
    prior = s.items("class_prior", (int, float), classes if conditional else None, nullable=True)
    if conditional:
        if prior is None or not all(math.isfinite(p) and p > 0 for p in prior) or abs(sum(prior) - 1) > 1e-6:
            raise _Corrupt("scoring.class_prior: a cvae needs one finite probability > 0 per label, summing to 1")
    elif prior is not None:
        raise _Corrupt(f"scoring.class_prior must be null for a {model.kind}")
    neighbours = combination = None
    if version >= 4:
        n = s.object("neighbours", nullable=True)
        if n is not None:
            neighbours = NeighbourInfo(n.integer("k", 1), n.integer("reference_rows", 1))
            n.done()
            if neighbours.k > neighbours.reference_rows:
                raise _Corrupt(f"scoring.neighbours: k {neighbours.k} is more than its {neighbours.reference_rows} reference rows")
        combination = _combination(s.object("combination", nullable=True), neighbours is not None)
    scoring = ScoringInfo(s.string("likelihood", LIKELIHOODS), s.integer("elbo_samples", 1), s.integer("iw_samples", 1),
                          s.integer("seed"), prior, neighbours, combination)  # fmt: skip
    s.done()

    g = top.object("graphs")
    contract = graph_contract(features, model.latent_dim, scoring.likelihood, classes)
    graphs = {name: _graph(g, name, *contract[name]) for name in ("encoder", "decoder")}
    # Schema 2 has no score graph: there `graphs.score` is left unread and refused as an unknown key.
    score_graph = _graph(g, "score", *contract["score"]) if version >= 3 and "score" in g.value else None
    neighbour_graph = _graph(g, "neighbours", *contract["neighbours"]) if neighbours is not None else None
    g.done()

    t = top.object("thresholds")
    quantiles = t.mapping("quantiles", lambda section, score: _quantiles(section, score))
    if not set(quantiles) <= set(SCORES):
        raise _Corrupt(f"thresholds.quantiles: unknown score {sorted(set(quantiles) - set(SCORES))[0]!r}")
    score_name = t.string("score", ("combined",) if combination is not None else ("neg_elbo",))
    target = t.number("target_false_positive_rate", lambda v: 0 < v < 1, "in (0, 1)")
    values = dict(score=score_name, default=t.number("default"), target_false_positive_rate=target, quantiles=quantiles,
                  calibration_rows=t.integer("calibration_rows", 1, MAX_CALIBRATION_ROWS), calibrated_on=t.string("calibrated_on"),
                  label_free=t.boolean("label_free"), promised_false_positive_rate=target)  # fmt: skip
    if version >= 4:
        rows = values["calibration_rows"]
        values |= dict(promised_false_positive_rate=t.number("promised_false_positive_rate", lambda v: 0 < v < 1, "in (0, 1)"),
                       smallest_false_positive_rate=t.number("smallest_false_positive_rate", lambda v: abs(v * (rows + 1) - 1) < 1e-9,
                                                             "1 / (calibration_rows + 1)"),
                       calibration_scores=t.items("calibration_scores", (int, float), rows))  # fmt: skip
        ordered = values["calibration_scores"]
        if not all(math.isfinite(v) for v in ordered) or any(a > b for a, b in zip(ordered, ordered[1:])):
            raise _Corrupt("thresholds.calibration_scores must be finite and ascending")
        calibration = Calibration.of(np.asarray(ordered, np.float64))
        k = max(1, calibration.rank(target))  # out of reach: the largest, at 1/(n+1)
        if values["default"] != ordered[rows - k] or values["promised_false_positive_rate"] != k / (rows + 1):
            raise _Corrupt(f"thresholds.default and promised_false_positive_rate must be the calibration score of rank {k} "
                           f"from the top and {k}/(calibration_rows + 1): the conformal threshold of the target")  # fmt: skip
    thresholds = Thresholds(**values)
    t.done()

    p = top.object("parity")
    parity = Parity(p.items("batch_sizes", int), p.number("tolerance", lambda v: v >= 0, "finite and >= 0"),
                    p.mapping("max_abs_diff", _difference), _score_parity(p.optional_object("score"), "score") if version >= 3 else None,
                    _score_parity(p.optional_object("neighbours"), "neighbours") if version >= 4 else None)  # fmt: skip
    p.done()
    for name, graph in (("score", score_graph), ("neighbours", neighbour_graph)):
        if (getattr(parity, name) is None) != (graph is None):
            raise _Corrupt(f"parity.{name}: a {name} graph comes with its parity, and parity.{name} with a {name} graph")

    manifest = Manifest(
        name=top.string("name", pattern=NAME_PATTERN), version=top.integer("version", 1), created=top.string("created"),
        model=model, input=inputs, labels=labels, label_column=label_column, normalization=normalization, support=support, scoring=scoring,
        encoder=graphs["encoder"], decoder=graphs["decoder"], opset=top.integer("opset", 1), exporter=top.string("exporter"),
        producer=top.mapping("producer", lambda section, key: section.string(key)), parity=parity,
        source_checkpoint=top.mapping("source_checkpoint", lambda section, key: section.string(key)), thresholds=thresholds,
        score=score_graph, neighbours=neighbour_graph,
    )  # fmt: skip
    top.done()
    return manifest


def _difference(section: _Object, key: str) -> float:
    return section.number(key, lambda v: v >= 0, "finite and >= 0")


def _combination(c: _Object | None, has_neighbours: bool) -> Combination | None:
    if c is None:
        return None
    parts = c.items("parts", str)
    combination = Combination(parts, c.items("location", (int, float), len(parts)), c.items("scale", (int, float), len(parts)),
                              c.items("weight", (int, float), len(parts)))  # fmt: skip
    c.done()
    known = ("neg_elbo", "knn") if has_neighbours else ("neg_elbo",)
    if not parts or len(set(parts)) != len(parts) or not set(parts) <= set(known):
        raise _Corrupt(f"scoring.combination.parts must be distinct names from {list(known)}")
    if not all(math.isfinite(v) for v in combination.location) or \
            not all(math.isfinite(v) and v > 0 for v in combination.scale + combination.weight):  # fmt: skip
        raise _Corrupt("scoring.combination: location must be finite, scale and weight finite and > 0")
    return combination


def _score_parity(p: _Object | None, graph: str) -> ScoreParity | None:
    if p is None:
        return None
    outputs = [t.name for t in graph_contract(1, 1, LIKELIHOODS[0])[graph][1]]
    parity = ScoreParity(p.items("batch_sizes", int), p.integer("rows", 1),
                         p.number("tolerance", lambda v: v >= 0, "finite and >= 0"),
                         p.mapping("max_abs_diff", _difference), p.mapping("max_rel_diff", _difference))  # fmt: skip
    p.done()
    for key in ("max_abs_diff", "max_rel_diff"):
        if sorted(getattr(parity, key)) != sorted(outputs):
            raise _Corrupt(f"{p.key(key)} must name the score graph's outputs {', '.join(outputs)}")
    return parity


def _quantiles(section: _Object, score: str) -> dict[str, float]:
    q = section.object(score)
    values = {}
    for key in list(q.value):
        try:
            level = float(key)
        except ValueError:
            level = math.nan
        if not 0 < level < 1:
            raise _Corrupt(f"{q.key(key)}: a quantile level must be a number in (0, 1)")
        values[key] = q.number(key)
    return values


def _graph(graphs: _Object, name: str, inputs: tuple, outputs: tuple) -> GraphInfo:
    g = graphs.object(name)
    file = g.string("file")
    if Path(file).name != file or file in (".", "..") or os.sep in file or "/" in file:
        raise _Corrupt(f"{g.key('file')} {cut(file)!r} must be a file name inside the version folder")
    info = GraphInfo(file, g.string("sha256", pattern=_SHA256), _tensors(g, "inputs"), _tensors(g, "outputs"))
    g.done()
    for side, want in (("inputs", inputs), ("outputs", outputs)):
        got = getattr(info, side)
        if got != want:
            shown = ", ".join(f"{t.name} [-1, {t.width}]{'' if t.dtype == 'float32' else ' ' + t.dtype}" for t in want)
            raise _Corrupt(f"{g.key(side)} are not this model's: expected {shown}")
    return info


def _tensors(graph: _Object, key: str) -> tuple[TensorInfo, ...]:
    tensors = []
    for index, item in enumerate(graph.items(key, dict)):
        t = _Object(item, f"{graph.key(key)}[{index}]")
        name = t.string("name")
        shape = t.items("shape", int, 2)
        dtype = t.string("dtype", DTYPES)
        t.done()
        if shape[0] != -1 or shape[1] < 1:
            raise _Corrupt(f"{t.key('shape')} must be [-1, width], got {list(shape)}")
        tensors.append(TensorInfo(name, shape[1], dtype))
    return tuple(tensors)


# Files.


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write folder/manifest.json atomically: a reader sees no file or the whole file."""
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


MAX_MANIFEST_BYTES = 64 << 20  # a manifest holds a few numbers per feature; anything larger is not one


def read_manifest(folder: Path) -> Manifest:
    """Read and check folder/manifest.json; ArtifactError naming the file when missing, corrupt or wrong."""
    path = folder / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path}: {path.stat().st_size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})")
        text = path.read_text()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; the version is incomplete") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    try:
        data = json.loads(text)  # NaN and Infinity parse, so that from_dict names the key holding them
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: corrupt JSON ({err})") from None
    try:
        return Manifest.from_dict(data)
    except ArtifactError as err:
        raise ArtifactError(f"{path}: {err}") from None

