"""`vaeserve bench fuzz`: mutated requests against every RPC of a served repository.

Starting from a valid request of every vaeserve.v1 RPC for every model, and of the Open Inference
Protocol's ModelInfer (Score and Embed, raw contents), each request sent is one of:
a bit flip (1 to 8 bits of the serialized bytes), a truncation, an insertion of random bytes (stray
fields, broken tags), or a structured mutation of the message (shapes such as [2**62, 0] or 100
dimensions, byte counts that disagree, NaN/Inf/1e38 values, labels like "3\\x00" or 10,000 characters,
extreme integers and floats in every scalar field; for ModelInfer, inputs with other shapes, datatypes,
contents or counts of raw contents, BYTES with broken lengths, odd parameters and outputs). The bytes go out as they are, through a generic
gRPC call. Every answer must be a status a client can act on (OK, INVALID_ARGUMENT, NOT_FOUND, ...):
INTERNAL or UNKNOWN is a failure. Afterwards the server must still be SERVING, and its log must not
have grown with the number of requests.
"""

import asyncio
import collections
import math
import time

import numpy as np

FAILURES = ("INTERNAL", "UNKNOWN")
RPCS = ("Embed", "Reconstruct", "Score", "Generate", "Decode", "ListModels", "GetModel", "ModelInfer")
PATHS = {name: f"/vaeserve.v1.Inference/{name}" for name in RPCS} | {"ModelInfer": "/inference.GRPCInferenceService/ModelInfer"}
DATATYPES = ("FP32", "FP64", "BYTES", "INT64", "BOOL", "", "fp32", "FP32\x00")
SHAPES = ([], [1], [2**62, 0], [0, 2**62], [-1, 4], [2**63 - 1, 2**63 - 1], [1] * 100, [3, 2, 1], [4097, 1])
FLOATS = (math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, -0.0, 1e6)
STRINGS = ("3\x00", "", "x" * 10_000, "\u00e9\u4e2d\U0001f600", "vae\x00", "../../etc/passwd", "0" * 65)


def seed_requests(manifests) -> list[tuple[str, object]]:
    """(method, message) for every RPC of every model: valid requests to mutate."""
    from vaeserve.v1 import vaeserve_pb2 as pb

    def tensor(rows, width):
        a = np.zeros((rows, width), "<f4")
        return pb.Tensor(shape=a.shape, data=a.tobytes())

    from vaeserve.oip.v2 import predict_pb2 as oip

    def infer(model: str, x: np.ndarray, labels: list[str], **parameters):
        tensors = [oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)]
        raw = [x.tobytes()]
        if labels:
            tensors.append(oip.ModelInferRequest.InferInputTensor(name="labels", datatype="BYTES", shape=[len(labels)]))
            raw.append(b"".join(len(label.encode()).to_bytes(4, "little") + label.encode() for label in labels))
        request = oip.ModelInferRequest(model_name=model, id="fuzz", inputs=tensors, raw_input_contents=raw)
        for key, value in parameters.items():
            setattr(request.parameters[key], {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)], value)
        return request

    seeds = [("ListModels", pb.ListModelsRequest())]
    for m in manifests:
        name, features, latent = m.name, m.input.features, m.model.latent_dim
        labels = [m.labels[0]] * 2 if m.labels else []
        rows = np.stack([m.support.low, m.support.high]).astype("<f4")
        x = pb.Tensor(shape=[2, features], data=rows.tobytes())
        seeds += [
            ("Embed", pb.EmbedRequest(model=name, x=x, labels=labels, posterior_samples=2, seed=1)),
            ("Reconstruct", pb.ReconstructRequest(model=name, x=x, labels=labels)),
            ("Score", pb.ScoreRequest(model=name, x=x, labels=labels, threshold=1.0, per_feature=True, iw_samples=4)),
            ("Generate", pb.GenerateRequest(model=name, count=0 if labels else 2, labels=labels, temperature=0.5, seed=2)),
            ("Decode", pb.DecodeRequest(model=name, z=tensor(2, latent), labels=labels)),
            ("GetModel", pb.GetModelRequest(model=name, version=1)),
            ("ModelInfer", infer(name, rows, labels, threshold="1.0", per_feature=True, iw_samples=4)),
            ("ModelInfer", infer(f"{name}.embed", rows, labels, posterior_samples=2, seed=1)),
        ]
    return seeds


def _structured(message, rng: np.random.Generator):
    """A copy of `message` with one field (or a tensor's shape or data) set to an extreme value."""
    from google.protobuf.descriptor import FieldDescriptor as F

    message = type(message).FromString(message.SerializeToString())
    if message.DESCRIPTOR.name == "ModelInferRequest":
        return _structured_infer(message, rng)
    fields = list(message.DESCRIPTOR.fields)
    if not fields:  # ListModelsRequest: a well-formed field it does not know (to be skipped), or random bytes
        if rng.random() < 0.5:
            return bytes([int(rng.integers(1, 16)) << 3]) + bytes([int(rng.integers(0, 128))])  # field 1-15, a varint
        return message.SerializeToString() + bytes(rng.integers(0, 256, rng.integers(1, 8)).astype(np.uint8))
    field = fields[rng.integers(len(fields))]
    name = field.name
    if field.message_type is not None:  # a Tensor
        tensor = getattr(message, name)
        if rng.random() < 0.5:
            del tensor.shape[:]
            tensor.shape.extend(SHAPES[rng.integers(len(SHAPES))])
        else:
            choice = rng.integers(3)
            values = np.frombuffer(tensor.data, "<f4").copy() if len(tensor.data) % 4 == 0 else np.zeros(0, "<f4")
            if choice == 0 and values.size:
                values[rng.integers(values.size)] = FLOATS[rng.integers(len(FLOATS))]
                tensor.data = values.tobytes()
            elif choice == 1:
                tensor.data = tensor.data[: rng.integers(len(tensor.data) + 1)] + bytes(rng.integers(0, 256, rng.integers(8)).astype(np.uint8))
            else:
                tensor.data = bytes(rng.integers(0, 256, int(rng.integers(0, 1 << 16))).astype(np.uint8))
    elif field.is_repeated:  # labels
        getattr(message, name)[:] = [STRINGS[i] for i in rng.integers(len(STRINGS), size=rng.integers(4))]
    elif field.type == F.TYPE_STRING:
        setattr(message, name, STRINGS[rng.integers(len(STRINGS))])
    elif field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        setattr(message, name, FLOATS[rng.integers(len(FLOATS))])
    elif field.type == F.TYPE_BOOL:
        setattr(message, name, not getattr(message, name))
    else:  # integers: the extremes of the field's type
        signed = field.type in (F.TYPE_INT64, F.TYPE_INT32, F.TYPE_SINT64, F.TYPE_SINT32)
        bits = 64 if field.type in (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64) else 32
        extremes = [-(2 ** (bits - 1)), -1, 2 ** (bits - 1) - 1] if signed else [2**bits - 1, 2 ** (bits - 1), 1025]
        setattr(message, name, extremes[rng.integers(len(extremes))])
    return message.SerializeToString()


def _structured_infer(message, rng: np.random.Generator) -> bytes:
    """A copy of a ModelInferRequest with one part of it made extreme or inconsistent."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    tensor = pick(message.inputs)
    index = list(message.inputs).index(tensor)
    choice = rng.integers(7)
    if choice == 0:
        del tensor.shape[:]
        tensor.shape.extend(pick(SHAPES))
    elif choice == 1:
        tensor.datatype = pick(DATATYPES)
    elif choice == 2:  # contents: a value made extreme, cut, random bytes, or typed contents beside raw
        raw = message.raw_input_contents[index]
        values = np.frombuffer(raw, "<f4").copy() if tensor.name == "x" and len(raw) % 4 == 0 else None
        kind = rng.integers(4)
        if kind == 0 and values is not None and values.size:
            values[rng.integers(values.size)] = pick(FLOATS)
            message.raw_input_contents[index] = values.tobytes()
        elif kind == 1:
            message.raw_input_contents[index] = raw[: rng.integers(len(raw) + 1)]
        elif kind == 2:
            message.raw_input_contents[index] = bytes(rng.integers(0, 256, int(rng.integers(0, 1 << 12))).astype(np.uint8))
        else:
            tensor.contents.fp32_contents.extend(pick(FLOATS) for _ in range(rng.integers(1, 8)))
    elif choice == 3:  # one raw contents more or fewer than inputs
        if rng.random() < 0.5:
            message.raw_input_contents.append(b"\0" * 8)
        else:
            del message.raw_input_contents[-1]
    elif choice == 4:  # a parameter of any name, of any type
        parameter = message.parameters[pick((*STRINGS, "threshold", "iw_samples", "per_feature", "seed", "posterior_samples"))]
        kind = rng.integers(4)
        if kind == 0:
            parameter.double_param = pick(FLOATS)
        elif kind == 1:
            parameter.int64_param = int(pick((-(2**63), -1, 2**63 - 1, 2**32)))
        elif kind == 2:
            parameter.string_param = pick(("nan", "inf", "1e400", "", "x" * 10_000))
        else:
            parameter.bool_param = True
    elif choice == 5:
        message.outputs.add(name=pick((*STRINGS, "neg_iw", "per_feature", "samples", "mu")))
    else:
        message.model_name, message.model_version = pick((*STRINGS, message.model_name)), pick(("", "0", "-1", "1", "x", "9" * 30))
    return message.SerializeToString()


def mutate(message, rng: np.random.Generator) -> tuple[str, bytes]:
    """(kind, bytes) of one mutation of a valid message."""
    data = bytearray(message.SerializeToString())
    kind = ("bit flip", "truncation", "insertion", "structured")[rng.integers(4)]
    if kind == "bit flip" and data:
        for _ in range(rng.integers(1, 9)):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    elif kind == "truncation" and data:
        data = data[: rng.integers(len(data))]
    elif kind == "insertion":
        at = int(rng.integers(len(data) + 1))
        data[at:at] = bytes(rng.integers(0, 256, rng.integers(1, 16)).astype(np.uint8))
    else:
        kind = "structured"
        return kind, _structured(message, rng)
    return kind, bytes(data)


async def send_all(target: str, seeds, count: int, seconds: float, seed: int = 0, concurrency: int = 16) -> dict:
    """Send `count` mutated requests (or stop after `seconds`); {(method, code): n} and the kinds sent."""
    import grpc

    rng = np.random.default_rng(seed)
    codes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    end = time.monotonic() + seconds
    queue = []
    for _ in range(count):
        method, message = seeds[rng.integers(len(seeds))]
        kind, data = mutate(message, rng)
        kinds[kind] += 1
        queue.append((method, data))
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 28)]) as channel:
        calls = {m: channel.unary_unary(PATHS[m], request_serializer=None, response_deserializer=None) for m in RPCS}

        async def worker(index: int):
            for method, data in queue[index::concurrency]:
                if time.monotonic() > end:
                    return
                try:
                    await calls[method](data, timeout=30)
                    codes[method, "OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[method, err.code().name] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"codes": codes, "kinds": kinds}


def run(args) -> int:
    from grpc_health.v1 import health_pb2

    from vaeserve.artifact.repository import scan_repository
    from vaeserve.benchmarks.harness import start_server

    manifests = [max(v.items())[1].manifest for v in scan_repository(args.repository).values()]
    log = args.out / "serve.log"
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server(args.repository, log=log)
    try:
        server.wait_serving()
        before = log.stat().st_size
        started = time.monotonic()
        result = asyncio.run(send_all(server.target, seed_requests(manifests), args.requests, args.seconds, args.seed))
        elapsed = time.monotonic() - started
        serving = server.health() == health_pb2.HealthCheckResponse.SERVING
        grown = log.stat().st_size - before
    finally:
        server.stop()
    codes, kinds = result["codes"], result["kinds"]
    sent = sum(codes.values())
    failed = sum(n for (_, code), n in codes.items() if code in FAILURES)
    print(f"{sent} mutated requests in {elapsed:.1f} s ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
    for method in RPCS:
        row = {code: n for (m, code), n in codes.items() if m == method}
        print(f"  {method:<12} " + ", ".join(f"{code} {n}" for code, n in sorted(row.items())))
    print(f"INTERNAL or UNKNOWN: {failed}; server {'SERVING' if serving else 'NOT SERVING'} afterwards; "
          f"log grew by {grown} bytes during the run (log: {log})")
    return 0 if failed == 0 and serving else 1
