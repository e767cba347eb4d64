"""The graphs of a model version: what they are (description) and how they are made (mechanism).

    encoder.onnx   x [N, features] (, y [N, classes])  ->  mu, logvar [N, latent]
    decoder.onnx   z [N, latent]   (, y [N, classes])  ->  scoring.decoder_outputs(likelihood), each [N, features]
    score.onnx     x [N, features] (, y [N, classes])  ->  neg_elbo, reconstruction, kl [N, 1], per_feature [N, features]
    neighbours.onnx  x [N, features]                   ->  knn [N, 1]: mean squared distance to the k nearest reference rows

The encoder and decoder are exported from torch; the score graph is composed from the two exported graphs
(build_score_graph) and its scores are float64.

The contract itself is vaeserve.artifact.manifest.graph_contract, which the loader checks too. Rows are normalised and flattened; normalisation is not in the graphs but in the manifest, applied by
the service (vaeserve.normalization.Normalizer). Every tensor has a dynamic batch axis and is float32 but
the score graph's scores.
Checking the graphs against torch lives in validate.py.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, compose, helper, numpy_helper

from vaeserve.artifact.manifest import TensorInfo, graph_contract
from vaeserve.errors import ConfigError
from vaeserve.scoring import LOG_2PI, posterior_noise
from vaeserve.training.model import ModelConfig

# Opset 18: the dynamo exporter emits it natively (down-converting to 17 fails on Split), and the
# torchscript exporter supports it too; onnxruntime 1.31 runs it.
OPSET = 18
# torchscript: the legacy tracer, ~0.15 s a graph here; dynamo: torch.export based, ~3 s a graph.
# Both give parity ~2e-7 against eager; torchscript is the default for export speed.
EXPORTERS = ("torchscript", "dynamo")
BATCH = "batch"


@dataclass(frozen=True)
class GraphSpec:
    name: str  # encoder | decoder | score
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def describe(config: ModelConfig) -> tuple[GraphSpec, GraphSpec]:
    """The encoder's and decoder's named inputs and outputs for a model config."""
    classes = config.num_classes if config.conditional else 0
    contract = graph_contract(config.input_dim, config.latent_dim, config.likelihood, classes)
    return GraphSpec("encoder", *contract["encoder"]), GraphSpec("decoder", *contract["decoder"])


def describe_score(config: ModelConfig) -> GraphSpec:
    """The score graph's named inputs and outputs for a model config."""
    classes = config.num_classes if config.conditional else 0
    return GraphSpec(SCORE_GRAPH, *graph_contract(config.input_dim, config.latent_dim, config.likelihood, classes)["score"])


def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path, exporter: str = "torchscript", opset: int = OPSET) -> None:
    """Write `module` (model.encoder or model.decoder) as ONNX at `path` and run onnx.checker on it."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    module.eval()
    # Batch 2, not 1: a tracer may specialise a size-1 axis into a constant.
    example = tuple(torch.zeros(2, t.width) for t in spec.inputs)
    common = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, once per graph
        if exporter == "torchscript":
            axes = {name: {0: BATCH} for name in spec.input_names + spec.output_names}
            torch.onnx.export(module, example, str(path), dynamo=False, dynamic_axes=axes, **common)
        else:
            batch = torch.export.Dim(BATCH)
            shapes = tuple({0: batch} for _ in spec.inputs)
            torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=shapes,
                              external_data=False, verbose=False, **common)
    onnx.checker.check_model(str(path), full_check=True)


# The score graph: encoder, sampling, decoder and likelihood as one ONNX Runtime call.
#
#     score.onnx   x [N, features] (, y [N, classes])  ->  neg_elbo, reconstruction, kl [N, 1],
#                                                          per_feature [N, features]   (float64)
#
# What vaeserve.scoring.score computes for rows given their label (or without one), with iw_samples 0:
# z = mu + sigma * eps with the manifest's fixed posterior noise eps [samples, latent] as an initializer,
# log p(x_d | z) per feature and sample in float32 (the decoder's outputs are float32 anyway), and every
# sum (over samples, features and latent dimensions: the KL) in float64, as the NumPy reference does. Rows
# are laid out row-major over samples (row r, sample s at r * samples + s), so a row's sums see the same
# values in the same order whichever rows share its batch.
SCORE_GRAPH = "score"
_ENCODER, _DECODER = "encoder/", "decoder/"


def build_score_graph(encoder: onnx.ModelProto, decoder: onnx.ModelProto, spec: GraphSpec, likelihood: str,
                      latent_dim: int, elbo_samples: int, seed: int) -> onnx.ModelProto:  # fmt: skip
    """The score graph of an exported encoder and decoder (onnx.compose.add_prefix keeps their names
    apart), for a model's likelihood, ELBO sample count and noise seed."""
    enc, dec = compose.add_prefix(encoder, _ENCODER), compose.add_prefix(decoder, _DECODER)
    conditional = any(t.name == "y" for t in spec.inputs)
    features = spec.inputs[0].width
    nodes, constants = [], {}

    def const(name, value, dtype=np.float32):
        constants[name] = numpy_helper.from_array(np.asarray(value, dtype), name)
        return name

    def op(kind, inputs, output, **attrs):
        nodes.append(helper.make_node(kind, inputs, [output], name=output, **attrs))
        return output

    # Encoder on the graph's inputs.
    op("Identity", ["x"], _ENCODER + "x")
    if conditional:
        op("Identity", ["y"], _ENCODER + "y")
    nodes.extend(enc.graph.node)
    mu, logvar = _ENCODER + "mu", _ENCODER + "logvar"

    # z [N * samples, latent] = mu + exp(logvar / 2) * eps, row-major over samples.
    eps = const("eps", posterior_noise(elbo_samples, latent_dim, seed)[None])  # [1, samples, latent]
    axis1 = const("axis1", [1], np.int64)
    sigma = op("Exp", [op("Mul", [logvar, const("half", 0.5)], "half_logvar")], "sigma")
    z3 = op("Add", [op("Unsqueeze", [mu, axis1], "mu3"),
                    op("Mul", [op("Unsqueeze", [sigma, axis1], "sigma3"), eps], "sigma_eps")], "z3")  # fmt: skip
    op("Reshape", [z3, const("z_shape", [-1, latent_dim], np.int64)], _DECODER + "z")
    if conditional:
        classes = spec.inputs[1].width
        y3 = op("Expand", [op("Unsqueeze", ["y", axis1], "y3"), const("samples_shape", [1, elbo_samples, 1], np.int64)],
                "y_samples")  # fmt: skip
        op("Reshape", [y3, const("y_shape", [-1, classes], np.int64)], _DECODER + "y")
    nodes.extend(dec.graph.node)

    # log p(x_d | z) [N, samples, features], float32 (scoring.feature_log_likelihood).
    by_sample = const("by_sample", [-1, elbo_samples, features], np.int64)
    x3 = op("Unsqueeze", ["x", axis1], "x3")
    if likelihood == "bernoulli":
        logits = op("Reshape", [_DECODER + "x_logits", by_sample], "logits")
        # softplus(l) = max(l, 0) + log(1 + exp(-|l|)) (scoring.softplus). ONNX Runtime's Softplus kernel took
        # 375 of the graph's 931 us on 64 rows of the digits model; these seven ops take about 150.
        tail = op("Log", [op("Add", [op("Exp", [op("Neg", [op("Abs", [logits], "abs_logits")], "neg_abs_logits")], "exp_neg_abs"),
                                     const("one32", 1.0)], "one_plus_exp")], "log_one_plus_exp")  # fmt: skip
        softplus = op("Add", [op("Relu", [logits], "relu_logits"), tail], "softplus")
        log_px = op("Sub", [op("Mul", [x3, logits], "x_logits"), softplus], "log_px")
    else:
        mean = op("Reshape", [_DECODER + "x_mean", by_sample], "mean")
        x_logvar = op("Reshape", [_DECODER + "x_logvar", by_sample], "x_logvar")
        diff = op("Sub", [x3, mean], "diff")
        scaled = op("Mul", [op("Mul", [diff, diff], "diff2"), op("Exp", [op("Neg", [x_logvar], "neg_x_logvar")], "precision")],
                    "scaled")  # fmt: skip
        log_px = op("Mul", [op("Add", [op("Add", [x_logvar, const("log_2pi", LOG_2PI)], "x_logvar_2pi"), scaled], "quad"),
                            const("minus_half", -0.5)], "log_px")  # fmt: skip

    # float64 from here: sums over samples, features and latent dimensions.
    double = TensorProto.DOUBLE
    log_px64 = op("Cast", [log_px], "log_px64", to=double)
    summed = op("ReduceSum", [log_px64, axis1], "log_px_summed", keepdims=0)
    op("Div", [op("Neg", [summed], "neg_summed"), const("samples", float(elbo_samples), np.float64)], "per_feature")
    op("ReduceSum", ["per_feature", axis1], "reconstruction", keepdims=1)
    mu64, logvar64 = op("Cast", [mu], "mu64", to=double), op("Cast", [logvar], "logvar64", to=double)
    kl_terms = op("Sub", [op("Sub", [op("Add", [op("Mul", [mu64, mu64], "mu2"), op("Exp", [logvar64], "var")], "mu2_var"),
                                     logvar64], "kl_inner"), const("one", 1.0, np.float64)], "kl_terms")  # fmt: skip
    op("Mul", [op("ReduceSum", [kl_terms, axis1], "kl_sum", keepdims=1), const("half64", 0.5, np.float64)], "kl")
    op("Add", ["reconstruction", "kl"], "neg_elbo")

    inputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, [BATCH, t.width]) for t in spec.inputs]
    outputs = [helper.make_tensor_value_info(t.name, double, [BATCH, t.width]) for t in spec.outputs]
    graph = helper.make_graph(nodes, SCORE_GRAPH, inputs, outputs,
                              initializer=[*enc.graph.initializer, *dec.graph.initializer, *constants.values()])  # fmt: skip
    opsets = {o.domain: o.version for o in [*encoder.opset_import, *decoder.opset_import]}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              functions=[*enc.functions, *dec.functions], producer_name="vaeserve",
                              ir_version=encoder.ir_version)  # fmt: skip
    onnx.checker.check_model(model, full_check=True)
    return model


def write_score_graph(encoder: Path, decoder: Path, spec: GraphSpec, path: Path, likelihood: str, latent_dim: int,
                      elbo_samples: int, seed: int) -> None:  # fmt: skip
    """Compose the exported encoder and decoder files into the score graph at `path`."""
    model = build_score_graph(onnx.load(str(encoder)), onnx.load(str(decoder)), spec, likelihood, latent_dim,
                              elbo_samples, seed)  # fmt: skip
    onnx.save(model, str(path))


# The neighbour graph: the kNN part of the default anomaly score (vaeserve.scoring.neighbour_distance).
#
#     neighbours.onnx   x [N, features]  ->  knn [N, 1] float64
#
# The reference rows (normalised training and validation rows) are an initializer, centred on their mean,
# transposed and scaled by -2, with their squared norms: |x - r|^2 = |x|^2 - 2 x.r + |r|^2 (x centred the
# same), one Gemm for every pair, the k smallest (ReduceMin, or TopK), |x|^2 added, clipped at 0 (rounding),
# their mean, cast to float64.
NEIGHBOUR_GRAPH = "neighbours"


def describe_neighbours(config: ModelConfig) -> GraphSpec:
    """The neighbour graph's named inputs and outputs for a model config."""
    return GraphSpec(NEIGHBOUR_GRAPH, *graph_contract(config.input_dim, config.latent_dim, config.likelihood)["neighbours"])


def build_neighbour_graph(reference: np.ndarray, k: int, spec: GraphSpec) -> onnx.ModelProto:
    """The neighbour graph over `reference` [rows, features] (normalised), averaging the k nearest."""
    if not 1 <= k <= len(reference):
        raise ConfigError(f"k = {k} neighbours needs 1 to {len(reference)} reference rows")
    # Centred on the reference rows' mean: distances do not change, and the squared norms whose float32
    # difference they are shrink (rows far from the origin, pixels in [0, 1]: |x|^2 ~ features).
    centre = np.asarray(reference, np.float64).mean(axis=0)
    centred = np.asarray(reference, np.float64) - centre
    constants = {
        "centre": centre.astype(np.float32)[None],
        "minus_two_reference_t": (-2.0 * centred.T).astype(np.float32),
        "reference_sq": (centred**2).sum(axis=1)[None].astype(np.float32),
        "axis1": np.asarray([1], np.int64),
    } | ({} if k == 1 else {"k": np.asarray([k], np.int64)})  # fmt: skip
    nodes = []

    def op(kind, inputs, output, **attrs):
        nodes.append(helper.make_node(kind, inputs, [output], name=output, **attrs))
        return output

    # |r|^2 - 2 x.r for every pair in one Gemm; the row's own |x|^2 is the same for all r, so it is added to
    # the k smallest only: three passes over the [N, reference] matrix fewer than Mul, Add, Add, Relu, TopK
    # (a 256-row Score of the digits model in process: 2.6 -> 1.4 ms; 0.8 ms without the graph).
    x = op("Sub", ["x", "centre"], "x_centred")
    partial = op("Gemm", [x, "minus_two_reference_t", "reference_sq"], "partial")
    if k == 1:
        nearest = op("ReduceMin", [partial, "axis1"], "nearest", keepdims=1)
    else:
        nodes.append(helper.make_node("TopK", [partial, "k"], ["nearest", "nearest_index"], name="nearest", axis=1, largest=0))
        nearest = "nearest"
    x_sq = op("ReduceSumSquare", [x, "axis1"], "x_sq", keepdims=1)
    squared = op("Relu", [op("Add", [nearest, x_sq], "squared_raw")], "squared")  # >= 0: rounding
    op("Cast", [op("ReduceMean", [squared, "axis1"], "mean_squared", keepdims=1)], "knn", to=TensorProto.DOUBLE)
    inputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, [BATCH, t.width]) for t in spec.inputs]
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.DOUBLE, [BATCH, t.width]) for t in spec.outputs]
    graph = helper.make_graph(nodes, NEIGHBOUR_GRAPH, inputs, outputs,
                              initializer=[numpy_helper.from_array(v, name) for name, v in constants.items()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vaeserve")
    model.ir_version = 10  # what onnxruntime 1.31 reads (make_model stamps the newest the onnx package knows)
    onnx.checker.check_model(model, full_check=True)
    return model
