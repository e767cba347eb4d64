"""The serving graph: a version's whole Score of finite raw rows as one ONNX Runtime call, composed when the
version loads from its own score graph and neighbour graph and the manifest's support, normalisation and
combined score. What vaeserve.scoring.Scorer computes around those two graphs in NumPy, in the same order:

    x [N, features] raw (, y [N, classes])
      inside = max(min(x, high), low)                    the support (Support.clip)
      the score graph on normalise(inside), within [0, 1] for a Bernoulli likelihood
      penalty = 0.5 ((|x - inside|) / scale)^2            float64 (scoring.support_penalty), added to
                                                          per_feature, and its row sum to reconstruction and neg_elbo
      knn = the neighbour graph on normalise(x) within +-KNN_CLIP
      fail-safe: NaN and -inf become +inf
      anomaly_score = sum of weight (part - location) / scale over the combination's parts, fail-safe
    ->  neg_elbo, reconstruction, kl, per_feature, support_distance, (knn, anomaly_score)   (float64; without a
        combination the anomaly score is neg_elbo, as in the Scorer)

Only the conformal p-values stay in NumPy. A small Score costs one call instead of two plus some twenty NumPy
operations: in process, a 1-row Score of the default digits model took 84 against 253 us hot and 266 against
485 us after a 32 MB sweep of the caches, as between a server's batches.

The serving path takes finite rows given their labels (or a model without any): a NaN (which Support.clip
sends to the high end) and the label-free CVAE (scored over every class) stay on the Scorer's own path.
Building needs the onnx package (a dependency of the serving install); the Scorer checks the graph against
its own path when the version loads (vaeserve.artifact.runtime.Model.check).
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from vaeserve.normalization import Normalizer, Support
from vaeserve.scoring import KNN_CLIP, Combination

_SCORE, _NEIGHBOURS = "score/", "neighbours/"
_PARTS = ("neg_elbo", "reconstruction", "kl", "knn")  # the scores a combination may weigh


def build(score: Path, neighbours: Path | None, normalizer: Normalizer, support: Support, likelihood: str,
          combination: Combination | None) -> bytes | None:  # fmt: skip
    """The serving graph of a version's score graph and neighbour graph files, serialised; None where a
    combination weighs a part the graph does not compute."""
    if combination is not None and (not set(combination.parts) <= set(_PARTS) or "knn" in combination.parts and neighbours is None):
        return None
    score_model = compose.add_prefix(onnx.load(str(score)), _SCORE)
    nodes, constants = [], {}

    def const(name, value, dtype=np.float32):
        constants[name] = numpy_helper.from_array(np.asarray(value, dtype), name)
        return name

    def op(kind, inputs, output, **attrs):
        nodes.append(helper.make_node(kind, inputs, [output], name=output, **attrs))
        return output

    def normalise(x, name):  # Normalizer.apply, float32
        out = op("Div", [op("Sub", [x, const("shift", normalizer.shift[None])], f"{name}_centred"),
                         const("scale", normalizer.scale[None])], name)  # fmt: skip
        if normalizer.clip > 0:
            out = op("Clip", [out, const("minus_clip", -normalizer.clip), const("plus_clip", normalizer.clip)], f"{name}_clipped")
        return out

    def fail_safe(a, name):  # scoring.fail_safe: not (a > -inf) -> +inf
        broken = op("Not", [op("Greater", [a, const("minus_inf64", -np.inf, np.float64)], f"{name}_ok")], f"{name}_broken")
        return op("Where", [broken, const("inf64", np.inf, np.float64), a], name)

    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", len(normalizer.shift)])]
    inside = op("Max", [op("Min", ["x", const("high", support.high[None])], "below_high"), const("low", support.low[None])], "inside")
    model_x = normalise(inside, "normalised")
    if likelihood == "bernoulli":
        model_x = op("Clip", [model_x, const("zero", 0.0), const("one", 1.0)], "normalised_in_domain")
    op("Identity", [model_x], _SCORE + "x")
    declared = [i.name for i in score_model.graph.input]
    if _SCORE + "y" in declared:
        y = score_model.graph.input[declared.index(_SCORE + "y")]
        graph_inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", y.type.tensor_type.shape.dim[1].dim_value]))
        op("Identity", ["y"], _SCORE + "y")
    nodes.extend(score_model.graph.node)
    initializers = list(score_model.graph.initializer)
    functions, opsets = list(score_model.functions), {o.domain: o.version for o in score_model.opset_import}

    # The support penalty, float64 as in Scorer.penalty: 0.5 (distance / scale)^2, as distance^2 times
    # 0.5 / scale^2 (within a few float64 roundings of it). Only when a value is outside, as in the Scorer:
    # the float64 passes over [rows, features] cost a 256-row Score of the default digits model 5-10%.
    penalised = {name: f"{name}_penalised" for name in ("per_feature", "reconstruction", "neg_elbo")}
    half_precision = const("half_precision", (0.5 / np.asarray(normalizer.scale, np.float64) ** 2)[None], np.float64)
    any_outside = op("Greater", [op("ReduceMax", [op("Abs", [op("Sub", ["x", inside], "outside32")], "outside32_abs")],
                                    "outside32_max", keepdims=0), const("zero32", 0.0)], "any_outside")  # fmt: skip
    then_nodes, else_nodes = [], []

    def then(kind, inputs, output, **attrs):
        then_nodes.append(helper.make_node(kind, inputs, [output], name=output, **attrs))
        return output

    x64, inside64 = then("Cast", ["x"], "then/x64", to=TensorProto.DOUBLE), then("Cast", [inside], "then/inside64", to=TensorProto.DOUBLE)
    distance = then("Abs", [then("Sub", [x64, inside64], "then/outside")], "then/support_distance")
    nats = then("Mul", [then("Mul", [distance, distance], "then/distance2"), half_precision], "then/penalty")
    row_nats = then("ReduceSum", [nats, const("axis1", [1], np.int64)], "then/row_penalty", keepdims=1)
    then_outputs = [distance] + [then("Add", [_SCORE + name, nats if name == "per_feature" else row_nats], f"then/{name}")
                                 for name in penalised]  # fmt: skip
    else_nodes.append(helper.make_node("ConstantOfShape", [op("Shape", ["x"], "x_shape")], ["else/support_distance"],
                                       name="else/support_distance", value=numpy_helper.from_array(np.zeros(1, np.float64))))  # fmt: skip
    for name in penalised:
        else_nodes.append(helper.make_node("Identity", [_SCORE + name], [f"else/{name}"], name=f"else/{name}"))
    else_outputs = ["else/support_distance"] + [f"else/{name}" for name in penalised]

    def branch(name, branch_nodes, branch_outputs):
        return helper.make_graph(branch_nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.DOUBLE, None) for o in branch_outputs])

    nodes.append(helper.make_node("If", [any_outside], ["support_distance", *penalised.values()], name="penalty_if_outside",
                                  then_branch=branch("outside", then_nodes, then_outputs),
                                  else_branch=branch("inside", else_nodes, else_outputs)))  # fmt: skip
    scores = {name: fail_safe(value, name) for name, value in penalised.items()} | {"kl": fail_safe(_SCORE + "kl", "kl")}
    outputs = ["neg_elbo", "reconstruction", "kl", "per_feature", "support_distance"]
    if neighbours is not None:
        neighbour_model = compose.add_prefix(onnx.load(str(neighbours)), _NEIGHBOURS)
        op("Clip", [normalise("x", "neighbour_normalised"), const("minus_knn_clip", -KNN_CLIP), const("knn_clip", KNN_CLIP)],
           _NEIGHBOURS + "x")  # fmt: skip
        nodes.extend(neighbour_model.graph.node)
        initializers.extend(neighbour_model.graph.initializer)
        functions.extend(neighbour_model.functions)
        for o in neighbour_model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        scores["knn"] = fail_safe(_NEIGHBOURS + "knn", "knn")
        outputs.append("knn")
    if combination is not None:  # Combination.apply: 0 + weight * (part - location) / scale, part after part
        terms = [op("Div", [op("Mul", [const(f"weight{i}", w, np.float64), op("Sub", [scores[name], const(f"location{i}", loc, np.float64)],
                                                                                 f"{name}_centred{i}")], f"{name}_weighted{i}"),
                            const(f"scale{i}", s, np.float64)], f"term{i}")
                 for i, (name, loc, s, w) in enumerate(zip(combination.parts, combination.location, combination.scale,
                                                           combination.weight))]  # fmt: skip
        total = terms[0]
        for i, term in enumerate(terms[1:], 1):
            total = op("Add", [total, term], f"total{i}")
        fail_safe(total, "anomaly_score")
        outputs.append("anomaly_score")

    width = {"per_feature": len(normalizer.shift), "support_distance": len(normalizer.shift)}
    graph = helper.make_graph(nodes, "serving", graph_inputs,
                              [helper.make_tensor_value_info(name, TensorProto.DOUBLE, ["batch", width.get(name, 1)]) for name in outputs],
                              initializer=[*initializers, *constants.values()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              functions=functions, producer_name="vaeserve", ir_version=score_model.ir_version)  # fmt: skip
    onnx.checker.check_model(model)
    return model.SerializeToString()
