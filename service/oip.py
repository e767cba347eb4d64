"""The Open Inference Protocol (KServe v2 gRPC, with Triton's extensions) on the same server as
vaeserve.v1: the same models, batchers, limits, admission, auth, health and metrics, and the same status
codes and messages for the same mistakes.

Each served model is five inference models, one per operation (docs/api.md has their tensors):

    <model>              Score        x FP32 [-1, features] (+ labels BYTES [-1])
    <model>.embed        Embed        x (+ labels)
    <model>.reconstruct  Reconstruct  x (+ labels)
    <model>.decode       Decode       z FP32 [-1, latent] (+ labels)
    <model>.generate     Generate     count INT64 [1], or labels for a conditional model

Their versions are the model's. Options are request parameters (threshold, alpha, iw_samples, per_feature,
posterior_samples, seed, temperature; threshold, alpha and temperature may come as text); an unknown one is
INVALID_ARGUMENT, and so are Triton's sequence parameters; `priority` is ignored and `timeout`
(microseconds) shortens the call's deadline. Inputs come in
raw_input_contents or typed contents, outputs go out in raw_output_contents (which is what tritonclient
decodes). Requesting outputs picks among the operation's outputs, and asking for neg_iw or
per_feature computes them.
"""

import asyncio
import contextlib
import functools
import re
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

import vaeserve
from vaeserve.errors import InvalidInput, ModelNotFound, ModelNotReady, listed, quoted
from vaeserve.service import convert, status, streams, wire
from vaeserve.service.models import ModelRegistry, ServedModel
from vaeserve.service.servicer import LOADING_MESSAGE
from vaeserve.service.settings import Settings
from vaeserve.oip.v2 import predict_pb2 as pb
from vaeserve.oip.v2 import predict_pb2_grpc as pb_grpc

SERVICE_NAME = "inference.GRPCInferenceService"  # the protocol's path, whatever the proto's package
EXTENSIONS = ["model_configuration", "statistics", "parameters"]
PLATFORM = "vaeserve"
OK = grpc.StatusCode.OK

# name -> (numpy dtype of raw contents, InferTensorContents field, model config DataType)
DATATYPES = {
    "FP32": (np.dtype("<f4"), "fp32_contents", pb.TYPE_FP32),
    "FP64": (np.dtype("<f8"), "fp64_contents", pb.TYPE_FP64),
    "INT64": (np.dtype("<i8"), "int64_contents", pb.TYPE_INT64),
    "BOOL": (np.dtype("?"), "bool_contents", pb.TYPE_BOOL),
    "BYTES": (None, "bytes_contents", pb.TYPE_STRING),
}


@dataclass(frozen=True)
class Spec:
    """A tensor of an operation: its shape with -1 for any size, the first dimension the rows'."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class Operation:
    suffix: str  # "" for Score
    inputs: Callable[[ServedModel], list[Spec]]
    outputs: Callable[[ServedModel], list[Spec]]
    parameters: dict[str, type]  # name -> float, int or bool
    run: Callable[["Call"], Awaitable[dict[str, np.ndarray]]]  # output name -> array, the defaults or those asked
    batched: bool = True  # a row dimension first, up to max_rows (Triton's max_batch_size)


@dataclass
class Call:
    """One ModelInfer request, read: the operation's inputs, parameters and requested outputs."""

    model: ServedModel
    inputs: dict[str, object]  # name -> np.ndarray, or list[str] for BYTES
    parameters: dict[str, object]
    requested: list[str] | None  # None: the operation's defaults
    deadline: float | None
    reply: dict[str, float] = field(default_factory=dict)  # response parameters

    def wants(self, name: str) -> bool:
        return self.requested is not None and name in self.requested

    def labels(self) -> list[str]:
        return self.inputs.get("labels", [])

    def pick(self, outputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        if self.requested is None:
            return {name: value for name, value in outputs.items() if value is not None}
        return {name: outputs[name] for name in self.requested}


LABELS = Spec("labels", "BYTES", (-1,))


def _labels_spec(model: ServedModel, optional: bool = False) -> list[Spec]:
    """A conditional model's labels input. Labels sent or left out are the model's to judge, with vaeserve.v1's
    messages ("model 'd' is unconditional; send no labels")."""
    return [Spec("labels", "BYTES", (-1,), optional) if optional else LABELS] if model.conditional else []


async def _score(call: Call) -> dict[str, np.ndarray]:
    model, p = call.model, call.parameters
    iw_samples = p.get("iw_samples", 0)
    if call.wants("neg_iw") and not iw_samples:
        iw_samples = model.manifest.scoring.iw_samples  # the sample count the thresholds were calibrated with
    per_feature = p.get("per_feature", False) or call.wants("per_feature") or call.wants("support_distance")
    result = await model.score(call.inputs["x"], call.labels(), p.get("threshold"), iw_samples, call.deadline,
                               alpha=p.get("alpha"))  # fmt: skip
    s = result.scores
    call.reply["threshold"] = result.threshold
    return call.pick({
        "neg_elbo": s.neg_elbo, "reconstruction": s.reconstruction, "kl": s.kl, "anomaly_score": s.anomaly_score,
        "p_value": s.p_value, "knn_distance": s.knn, "is_anomaly": result.is_anomaly,
        "out_of_support": s.out_of_support, "neg_iw": s.neg_iw,
        "per_feature": s.per_feature if per_feature else None, "support_distance": s.distances() if per_feature else None,
    })  # fmt: skip


def _score_outputs(model: ServedModel) -> list[Spec]:
    """Score's outputs; p_value only for a version with conformal calibration, knn_distance only for one
    with neighbours (the Scorer computes both for every row or for none)."""
    scorer = model.scorer
    optional = {"p_value": scorer.calibration is not None, "knn_distance": scorer.neighbours is not None}
    rows = [Spec(name, "FP64", (-1,)) for name in ("neg_elbo", "reconstruction", "kl", "anomaly_score", "p_value", "knn_distance")
            if optional.get(name, True)]  # fmt: skip
    flags = [Spec(name, "BOOL", (-1,)) for name in ("is_anomaly", "out_of_support")]
    features = [Spec(name, "FP32", (-1, model.features)) for name in ("per_feature", "support_distance")]
    return [*rows, *flags, Spec("neg_iw", "FP64", (-1,)), *features]


async def _embed(call: Call) -> dict[str, np.ndarray]:
    posterior_samples = call.parameters.get("posterior_samples", 0)
    if call.wants("samples") and not posterior_samples:
        raise InvalidInput("output 'samples' needs the posterior_samples parameter")
    mu, logvar, samples = await call.model.embed(call.inputs["x"], call.labels(), posterior_samples,
                                                 call.parameters.get("seed"), call.deadline)  # fmt: skip
    samples = None if samples is None else samples.transpose(1, 0, 2)  # rows first: [N, S, latent]
    return call.pick({"mu": mu, "logvar": logvar, "samples": samples})


async def _reconstruct(call: Call) -> dict[str, np.ndarray]:
    x, nll, mse = await call.model.reconstruct(call.inputs["x"], call.labels(), call.deadline)
    return call.pick({"x": x, "neg_log_likelihood": nll, "mean_squared_error": mse})


async def _decode(call: Call) -> dict[str, np.ndarray]:
    return call.pick({"x": await call.model.decode_latent(call.inputs["z"], call.labels(), call.deadline)})


async def _generate(call: Call) -> dict[str, np.ndarray]:
    count = int(call.inputs["count"].reshape(-1)[0]) if "count" in call.inputs else 0
    x, z = await call.model.generate(count, call.labels(), call.parameters.get("temperature", 1.0),
                                     call.parameters.get("seed"), call.deadline)  # fmt: skip
    return call.pick({"x": x, "z": z})


def _rows_out(*names_widths) -> list[Spec]:
    return [Spec(name, datatype, (-1, *width)) for name, datatype, width in names_widths]


OPERATIONS = {
    op.suffix: op
    for op in (
        Operation("", lambda m: [Spec("x", "FP32", (-1, m.features)), *_labels_spec(m, optional=True)], _score_outputs,
                  {"threshold": float, "alpha": float, "iw_samples": int, "per_feature": bool}, _score),  # fmt: skip
        Operation("embed", lambda m: [Spec("x", "FP32", (-1, m.features)), *_labels_spec(m)],
                  lambda m: _rows_out(("mu", "FP32", (m.latent_dim,)), ("logvar", "FP32", (m.latent_dim,)),
                                      ("samples", "FP32", (-1, m.latent_dim))),
                  {"posterior_samples": int, "seed": int}, _embed),  # fmt: skip
        Operation("reconstruct", lambda m: [Spec("x", "FP32", (-1, m.features)), *_labels_spec(m)],
                  lambda m: _rows_out(("x", "FP32", (m.features,)), ("neg_log_likelihood", "FP64", ()),
                                      ("mean_squared_error", "FP64", ())),
                  {}, _reconstruct),  # fmt: skip
        Operation("decode", lambda m: [Spec("z", "FP32", (-1, m.latent_dim)), *_labels_spec(m)],
                  lambda m: _rows_out(("x", "FP32", (m.features,))), {}, _decode),
        Operation("generate", lambda m: _labels_spec(m) if m.conditional else [Spec("count", "INT64", (1,))],
                  lambda m: _rows_out(("x", "FP32", (m.features,)), ("z", "FP32", (m.latent_dim,))),
                  {"temperature": float, "seed": int}, _generate, batched=False),  # fmt: skip
    )
}


def _version(text: str) -> int:
    if text == "":
        return 0
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidInput(f"model_version: expected a version number or \"\" for the newest, got {quoted(text)}")
    return int(text)


SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
REQUEST_PARAMETERS = {"timeout": int, "priority": int}  # Triton's, on every request: the deadline, and ignored


def _parameters(request, op: Operation, name: str) -> dict[str, object]:
    read = {}
    for key, parameter in request.parameters.items():
        if key in SEQUENCE_PARAMETERS:
            raise InvalidInput(f"parameter {key!r}: sequences are not supported; every request stands alone")
        kind = op.parameters.get(key) or REQUEST_PARAMETERS.get(key)
        if kind is None:
            accepted = f"it takes {listed(sorted(op.parameters))}" if op.parameters else "it takes none"
            raise InvalidInput(f"unknown parameter {quoted(key)} for {quoted(name)}; {accepted}")
        which = parameter.WhichOneof("parameter_choice")
        value = None if which is None else getattr(parameter, which)
        if kind is bool and which == "bool_param":
            read[key] = value
        elif kind is int and which in ("int64_param", "uint64_param") and value >= 0:
            read[key] = value
        elif kind is float and which in ("double_param", "int64_param", "uint64_param"):
            read[key] = float(value)
        elif kind is float and which == "string_param" and (number := _number(value)) is not None:
            read[key] = number  # tritonclient 2.41 sends no float parameters, only text
        else:
            wanted = {bool: "a bool", int: "a non-negative integer", float: "a number"}[kind]
            raise InvalidInput(f"parameter {quoted(key)}: expected {wanted}, got {which or 'no value'} {value!r}")
    if read.get("iw_samples", 0) >= 2**32 or read.get("posterior_samples", 0) >= 2**32:
        raise InvalidInput("iw_samples and posterior_samples must be below 2**32")
    if read.get("seed", 0) >= 2**64:
        raise InvalidInput("seed must be below 2**64")
    return read


NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _number(text: str) -> float | None:
    """A decimal number written out ("4.5", "-1e3", "inf"), or None (Python's float() also takes "1_0", " 1 ")."""
    return float(text) if NUMBER.fullmatch(text) else None


def _strings(data: bytes, count: int, what: str) -> list[bytes]:
    """`count` elements of BYTES raw contents: each a 4-byte little-endian length, then its bytes. Reads no
    further than `count` elements, so a request cannot make the loop walk megabytes of tiny elements."""
    if len(data) < 4 * count:
        raise InvalidInput(f"{what}: {count} elements need at least {4 * count} bytes of raw BYTES contents, got {len(data)}")
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(data):
            raise InvalidInput(f"{what}: raw BYTES contents end inside element {len(out)}'s length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidInput(f"{what}: element {len(out)} says {length} bytes, only {len(data) - offset} follow")
        out.append(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise InvalidInput(f"{what}: {len(data) - offset} bytes of raw BYTES contents after its {count} elements")
    return out


def _text(values: list[bytes], what: str) -> list[str]:
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError:
        raise InvalidInput(f"{what}: an element is not UTF-8") from None


def _read_input(tensor, raw: bytes | None, spec: Spec, model: ServedModel):
    what = f"input {spec.name!r}"
    if tensor.datatype != spec.datatype:
        raise InvalidInput(f"{what}: datatype {quoted(tensor.datatype)}; send {spec.datatype}")
    shape = tuple(tensor.shape)
    contents = None if raw is not None else getattr(tensor.contents, DATATYPES[spec.datatype][1])
    if spec.name in ("x", "z"):
        width = model.features if spec.name == "x" else model.latent_dim
        return convert.rows(shape, spec.name, width, model.settings.max_rows, data=raw, values=contents)
    if spec.datatype == "BYTES":  # labels: one per row, shape [N] or [N, 1]
        if len(shape) not in (1, 2) or len(shape) == 2 and shape[1] != 1 or shape[0] < 0:
            raise InvalidInput(f"{what}: expected shape [rows] or [rows, 1], got {list(shape)}")
        if shape[0] > model.settings.max_rows:
            raise InvalidInput(f"{what}: {shape[0]} labels is more than the limit of {model.settings.max_rows} per request")
        values = _strings(raw, shape[0], what) if raw is not None else list(contents)
        if len(values) != shape[0]:
            raise InvalidInput(f"{what}: shape {list(shape)} holds {shape[0]} elements, got {len(values)}")
        return _text(values, what)
    # count: one INT64
    if shape not in ((1,), (1, 1)):
        raise InvalidInput(f"{what}: expected shape [1], got {list(shape)}")
    if raw is not None:
        if len(raw) != 8:
            raise InvalidInput(f"{what}: shape [1] needs 8 bytes of little-endian INT64, got {len(raw)}")
        value = np.frombuffer(raw, DATATYPES["INT64"][0])
    else:
        if len(contents) != 1:
            raise InvalidInput(f"{what}: shape [1] needs 1 value in int64_contents, got {len(contents)}")
        value = np.asarray(contents, np.int64)
    if not 0 <= value[0] < 2**32:
        raise InvalidInput(f"{what}: {int(value[0])} is not a sample count")
    return value


def _read_inputs(request, specs: list[Spec], model: ServedModel, name: str) -> dict[str, object]:
    by_name = {spec.name: spec for spec in specs}  # a handful
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input, in order")
    inputs = {}
    for i, tensor in enumerate(request.inputs):
        spec = by_name.get(tensor.name) or (LABELS if tensor.name == "labels" else None)  # the model judges labels
        if spec is None:
            raise InvalidInput(f"unknown input {quoted(tensor.name)} for {quoted(name)}; it takes {listed(by_name)}")
        if tensor.parameters:
            raise InvalidInput(f"input {tensor.name!r}: parameters {listed(sorted(tensor.parameters))} are not supported "
                               "(no shared memory); send the values in raw_input_contents or contents")  # fmt: skip
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is sent twice")
        if raw and tensor.HasField("contents"):
            raise InvalidInput(f"input {tensor.name!r} has contents beside raw_input_contents; send one or the other")
        inputs[tensor.name] = _read_input(tensor, raw[i] if raw else None, spec, model)
    missing = [spec.name for spec in specs if spec.name not in inputs and not spec.optional and spec is not LABELS]
    if missing:
        raise InvalidInput(f"{quoted(name)} needs input {missing[0]!r}; it takes {listed(by_name)}")
    return inputs


def _requested(request, outputs: list[Spec], name: str) -> list[str] | None:
    if not request.outputs:
        return None
    known = [spec.name for spec in outputs]
    names = []
    for output in request.outputs:
        if output.name not in known:
            raise InvalidInput(f"unknown output {quoted(output.name)} for {quoted(name)}; it has {listed(known)}")
        if output.parameters:
            raise InvalidInput(f"output {output.name!r}: parameters {listed(sorted(output.parameters))} are not supported")
        if output.name not in names:
            names.append(output.name)
    return names


@functools.lru_cache(maxsize=4096)
def _output_tensor(name: str, datatype: str, shape: tuple[int, ...]) -> pb.ModelInferResponse.InferOutputTensor:
    """An output's metadata, built once per shape (a response copies it): most calls send a few row counts."""
    return pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape)


def _respond(name: str, request, call: Call, outputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> pb.ModelInferResponse:
    tensors, contents = [], []
    with np.errstate(over="ignore"):  # an FP32 output past float32's range reads +-inf, as in vaeserve.v1 (to_tensor)
        for output, value in outputs.items():
            datatype = datatypes[output]
            array = np.ascontiguousarray(value, DATATYPES[datatype][0])
            tensors.append(_output_tensor(output, datatype, array.shape))
            contents.append(array.tobytes())
    parameters = {key: pb.InferParameter(double_param=value) for key, value in call.reply.items()}
    return pb.ModelInferResponse(model_name=name, model_version=str(call.model.version), id=request.id,
                                 parameters=parameters, outputs=tensors, raw_output_contents=contents)  # fmt: skip


@dataclass
class _Stats:
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns
    fail: list[int] = field(default_factory=lambda: [0, 0])
    rows: int = 0
    last_ms: int = 0


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the registry's models as the inference models above. `ready` follows the server's health."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry: ModelRegistry | None = None
        self.ready = False
        self._stats: dict[tuple[str, int], _Stats] = {}  # (inference model, version) -> ModelInfer through this protocol
        # version -> operation -> (inputs, outputs, output datatypes): built once, let go with the version
        self._specs: weakref.WeakKeyDictionary[ServedModel, dict] = weakref.WeakKeyDictionary()
        self._infer = status.Calls("ModelInfer")
        self._stream = status.Calls("ModelStreamInfer")

    def serve(self, registry: ModelRegistry) -> None:
        self.registry = registry

    @property
    def model_names(self) -> frozenset[str]:
        return frozenset() if self.registry is None else self.registry.names

    def _resolve(self, name: str) -> tuple[str, Operation]:
        """(model, operation) for an inference model name. A served model's own name is its Score, also
        where it reads like another's operation (models `d` and `d.embed`: `d.embed` is the second's Score)."""
        model, _, suffix = name.rpartition(".")
        if name not in self.model_names and suffix and suffix in OPERATIONS and model in self.model_names:
            return model, OPERATIONS[suffix]
        return name, OPERATIONS[""]  # served, or not: then the registry says so, listing what is

    def _inference_models(self) -> list[tuple[str, ServedModel]]:
        """Every inference model name with the version it names, as _resolve reads them."""
        models = self.registry.all() if self.registry else []
        names = [(f"{m.name}.{suffix}" if suffix else m.name, m) for m in models for suffix in OPERATIONS]
        return sorted(((name, m) for name, m in names if self._resolve(name)[0] == m.name), key=lambda item: (item[0], item[1].version))

    def model_label(self, request) -> str:
        """The inference model a request names, for the metrics: "" unless it is served."""
        name = getattr(request, "model_name", None) or getattr(request, "name", "")
        return name if self._resolve(name)[0] in self.model_names else ""

    def _model(self, name: str, version: str) -> tuple[contextlib.AbstractContextManager[ServedModel], Operation]:
        if self.registry is None:
            raise ModelNotReady(LOADING_MESSAGE)
        model, op = self._resolve(name)
        return self.registry.get(model, _version(version)).in_use(), op

    # Health and metadata.

    @status.probe
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @status.probe
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready and self.registry is not None and status.accepting())

    @status.probe
    async def ModelReady(self, request, context):
        try:
            held, _ = self._model(request.name, request.version)
        except (InvalidInput, ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        with held:
            return pb.ModelReadyResponse(ready=self.ready and status.accepting())

    @status.rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="vaeserve", version=vaeserve.__version__, extensions=EXTENSIONS)

    @status.rpc
    async def ModelMetadata(self, request, context):
        held, op = self._model(request.name, request.version)
        with held as model:
            versions = [str(v) for v in sorted(self.registry.models[model.name])] if not request.version else [str(model.version)]
            return pb.ModelMetadataResponse(
                name=request.name, versions=versions, platform=PLATFORM,
                inputs=[_tensor_metadata(spec) for spec in op.inputs(model)],
                outputs=[_tensor_metadata(spec) for spec in op.outputs(model)],
            )  # fmt: skip

    @status.rpc
    async def ModelConfig(self, request, context):
        held, op = self._model(request.name, request.version)
        with held as model:
            return pb.ModelConfigResponse(config=self._config(request.name, model, op))

    def _config(self, name: str, model: ServedModel, op: Operation) -> pb.ModelConfig:
        batched = op.batched
        gpu = model.encoder.providers[0] == "CUDAExecutionProvider"

        def dims(spec: Spec) -> dict:
            shape = spec.shape[1:] if batched else spec.shape
            return {"dims": shape or (1,), "reshape": pb.ModelTensorReshape(shape=[]) if not shape else None}

        m = model.manifest
        parameters = {"kind": model.kind, "likelihood": model.likelihood, "latent_dim": str(model.latent_dim),
                      "threshold": repr(model.threshold), "threshold_score": m.thresholds.score,
                      "elbo_samples": str(m.scoring.elbo_samples)}  # fmt: skip
        return pb.ModelConfig(
            name=name, platform=PLATFORM, backend=PLATFORM, version_policy=pb.ModelVersionPolicy(all={}),
            max_batch_size=self.settings.max_rows if batched else 0,
            input=[pb.ModelInput(name=s.name, data_type=DATATYPES[s.datatype][2], optional=s.optional, **dims(s))
                   for s in op.inputs(model)],
            output=[pb.ModelOutput(name=s.name, data_type=DATATYPES[s.datatype][2], **dims(s)) for s in op.outputs(model)],
            instance_group=[pb.ModelInstanceGroup(count=1, kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU)],
            dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=int(self.settings.max_queue_delay_ms * 1000)),
            parameters={key: pb.ModelParameter(string_value=value) for key, value in parameters.items()},
        )  # fmt: skip

    @status.rpc
    async def ModelStatistics(self, request, context):
        if request.name:
            held, _ = self._model(request.name, request.version)
            with held as model:
                keys = [(request.name, model.version)]
        else:
            keys = [(name, m.version) for name, m in self._inference_models()]
        stats = []
        for name, version in keys:
            s = self._stats.get((name, version), _Stats())
            stats.append(pb.ModelStatistics(
                name=name, version=str(version), last_inference=s.last_ms, inference_count=s.rows,
                execution_count=s.success[0],
                inference_stats=pb.InferStatistics(success=pb.StatisticDuration(count=s.success[0], ns=s.success[1]),
                                                   fail=pb.StatisticDuration(count=s.fail[0], ns=s.fail[1])),
            ))  # fmt: skip
        return pb.ModelStatisticsResponse(model_stats=stats)

    @status.rpc
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(name=name, version=str(m.version), state="READY")
                                                  for name, m in self._inference_models()])  # fmt: skip

    # Inference.

    def _tensors(self, model: ServedModel, op: Operation) -> tuple[list[Spec], list[Spec], dict[str, str]]:
        ops = self._specs.setdefault(model, {})
        if op.suffix not in ops:
            outputs = op.outputs(model)
            ops[op.suffix] = (op.inputs(model), outputs, {spec.name: spec.datatype for spec in outputs})
        return ops[op.suffix]

    async def _run(self, request, context) -> pb.ModelInferResponse:
        name = request.model_name
        held, op = self._model(name, request.model_version)
        with held as model:
            start, rows = time.perf_counter_ns(), None
            try:
                inputs, outputs, datatypes = self._tensors(model, op)
                parameters = _parameters(request, op, name)
                call = Call(model, _read_inputs(request, inputs, model, name), parameters, _requested(request, outputs, name),
                            _deadline(context, parameters.pop("timeout", None)))  # fmt: skip
                answer = await op.run(call)
                rows = len(next(iter(answer.values())))
                return _respond(name, request, call, answer, datatypes)
            finally:
                self._count(name, model.version, rows, time.perf_counter_ns() - start)

    def _count(self, name: str, version: int, rows: int | None, ns: int) -> None:
        """Statistics of one ModelInfer: `rows` answered, None when it failed."""
        s = self._stats.setdefault((name, version), _Stats())
        counter = s.success if rows is not None else s.fail
        counter[0] += 1
        counter[1] += ns
        if rows is not None:
            s.rows += rows
            s.last_ms = int(time.time() * 1000)

    async def ModelInfer(self, request, context):
        outcome = await self._infer.run(self.model_label(request), lambda: self._run(request, context), context.time_remaining())
        if outcome.code != OK:
            await context.abort(outcome.code, outcome.message)
        return outcome.value

    async def ModelStreamInfer(self, request_iterator, context):
        def reply(request, outcome: status.Outcome) -> pb.ModelStreamInferResponse:
            if outcome.code == OK:
                return pb.ModelStreamInferResponse(infer_response=outcome.value)
            failed = pb.ModelStreamInferResponse(error_message=outcome.message)
            if not isinstance(request, wire.Undecodable):
                failed.infer_response.model_name, failed.infer_response.id = request.model_name, request.id
                failed.infer_response.model_version = request.model_version
            failed.infer_response.parameters["code"].string_param = outcome.code.name
            return failed

        async for response in streams.serve(request_iterator, context, self._stream, self.model_label,
                                            lambda request: self._run(request, context), reply, self.settings):  # fmt: skip
            yield response


def _deadline(context, timeout_us: int | None) -> float | None:
    """The call's deadline, or sooner when the request's `timeout` parameter (microseconds) says so."""
    deadline = status.deadline(context)
    if timeout_us is None:
        return deadline
    asked = asyncio.get_running_loop().time() + timeout_us / 1e6
    return asked if deadline is None else min(deadline, asked)


def _tensor_metadata(spec: Spec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def add_to_server(server: grpc.aio.Server, servicer: OpenInferenceServicer) -> None:
    wire.add_service(server, pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer,
                     pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], served_as=SERVICE_NAME)  # fmt: skip
