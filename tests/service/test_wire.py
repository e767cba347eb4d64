"""What arrives on the wire, however broken: bytes that do not decode, shapes that would allocate
exabytes, extreme options, work over the budget, messages over the receive limit and rows outside the
support. Every answer is a status code a client can act on with a short message; the server stays up."""

import asyncio
import math
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from vaeserve import scoring
from vaeserve.artifact.repository import scan_repository
from vaeserve.benchmarks import fuzz
from vaeserve.service.client import to_tensor as tensor
from vaeserve.v1 import vaeserve_pb2 as pb

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
MODELS = ["vae", "cvae", "ppca"]
SHORT = 300  # characters: no message repeats a caller's string or shape in full


def good(rows=2, width=64):
    return np.ones((rows, width), np.float32)


def raw_call(channel, method, data: bytes, timeout=10) -> bytes:
    """Bytes out as they are, through a generic call: `method` is "/package.Service/Method"."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)(data, timeout=timeout)


def path(service, method_name: str) -> str:
    return f"/{service.full_name}/{method_name}"


def refusal(service, method_name: str) -> str:
    return f"the request is not a valid {service.methods_by_name[method_name].input_type.full_name} message"


@dataclass
class Case:
    method: str  # "/package.Service/Method"
    request: bytes
    code: grpc.StatusCode
    says: str  # a substring of the details, or all of them when `exact`
    exact: bool = False


def case(method_name: str, request, code, says) -> Case:
    return Case(path(INFERENCE, method_name), request.SerializeToString(), code, says)


VALID = {
    "Embed": pb.EmbedRequest(model="vae", x=tensor(good()), posterior_samples=2, seed=1),
    "Reconstruct": pb.ReconstructRequest(model="vae", x=tensor(good())),
    "Score": pb.ScoreRequest(model="vae", x=tensor(good()), per_feature=True, iw_samples=4),
    "Generate": pb.GenerateRequest(model="vae", count=2, temperature=0.5, seed=2),
    "Decode": pb.DecodeRequest(model="vae", z=tensor(good(width=4))),
    "ListModels": pb.ListModelsRequest(),
    "GetModel": pb.GetModelRequest(model="vae", version=1),
}
assert set(VALID) == {m.name for m in INFERENCE.methods if not m.client_streaming}  # ScoreStream: tests/service/test_stream.py
GARBAGE = b"\xff\xff\xff"  # a tag varint that never ends


def truncated(request) -> bytes:
    """A valid request without its last byte, which its last field needs; ListModelsRequest has no
    fields, so it gets a stray length-delimited field cut short, which a decoder cannot skip."""
    data = request.SerializeToString()
    return data[:-1] if data else b"\x0a\x05ab"


UNDECODABLE = {
    **{f"{name} garbage": Case(path(INFERENCE, name), GARBAGE, INVALID, refusal(INFERENCE, name), exact=True) for name in VALID},
    **{f"{name} truncated": Case(path(INFERENCE, name), truncated(request), INVALID, refusal(INFERENCE, name), exact=True)
       for name, request in VALID.items()},  # fmt: skip
    "health Check garbage": Case(path(HEALTH, "Check"), GARBAGE, INVALID, refusal(HEALTH, "Check"), exact=True),
    "health Check truncated": Case(path(HEALTH, "Check"), truncated(health_pb2.HealthCheckRequest(service=INFERENCE.full_name)),
                                   INVALID, refusal(HEALTH, "Check"), exact=True),  # fmt: skip
}

LONG = "x" * 10_000
CASES = {
    "shape [2**62, 0]": case("Score", pb.ScoreRequest(model="vae", x=pb.Tensor(shape=[2**62, 0])), INVALID, "more than the limit of 1000"),
    "shape [0, 2**62]": case("Score", pb.ScoreRequest(model="vae", x=pb.Tensor(shape=[0, 2**62])), INVALID, "zero rows"),
    "100 dimensions": case("Embed", pb.EmbedRequest(model="vae", x=pb.Tensor(shape=[1] * 100, data=b"\0" * 4)), INVALID,
                           "expected a 2-D tensor [rows, 64], got shape [1, 1, 1, 1, 1, 1, 1, 1, ... (100 dimensions)]"),  # fmt: skip
    "shape [2, 64, 1]": case("Reconstruct", pb.ReconstructRequest(model="vae", x=pb.Tensor(shape=[2, 64, 1], data=b"\0" * 512)),
                             INVALID, "expected a 2-D tensor [rows, 64], got shape [2, 64, 1]"),  # fmt: skip
    "negative rows": case("Score", pb.ScoreRequest(model="vae", x=pb.Tensor(shape=[-1, 64])), INVALID, "negative dimension in shape [-1, 64]"),
    "negative width": case("Decode", pb.DecodeRequest(model="vae", z=pb.Tensor(shape=[2, -4])), INVALID, "negative dimension in shape [2, -4]"),
    "label with a NUL": case("Score", pb.ScoreRequest(model="cvae", x=tensor(good()), labels=["3", "3\x00"]), INVALID, "unknown label '3\\x00'"),
    "10,000-character label": case("Reconstruct", pb.ReconstructRequest(model="cvae", x=tensor(good()), labels=["3", LONG]), INVALID,
                                   f"unknown label {LONG[:64]!r}... (10000 characters)"),  # fmt: skip
    "10,000-character model": case("GetModel", pb.GetModelRequest(model=LONG), NOT_FOUND, f"no model {LONG[:64]!r}... (10000 characters)"),
    "temperature 3e38": case("Generate", pb.GenerateRequest(model="vae", count=2, temperature=3e38), INVALID, "temperature must be in [0, 100]"),
    "temperature NaN": case("Generate", pb.GenerateRequest(model="vae", count=2, temperature=math.nan), INVALID, "temperature must be in [0, 100], got nan"),
    "temperature -1": case("Generate", pb.GenerateRequest(model="vae", count=2, temperature=-1), INVALID, "temperature must be in [0, 100], got -1"),
    "decode z 1e30": case("Decode", pb.DecodeRequest(model="vae", z=tensor(np.full((2, 4), 1e30))), INVALID, "z: a value beyond +-1000 at row 0, column 0"),
    "decode z NaN": case("Decode", pb.DecodeRequest(model="ppca", z=tensor(np.where(np.eye(2, 8) > 0, np.nan, 0.0))), INVALID,
                         "z: NaN or Inf at row 0, column 0"),  # fmt: skip
    **UNDECODABLE,
}


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def answers_a_good_request(channel) -> bool:
    response = pb.ScoreResponse.FromString(raw_call(channel, path(INFERENCE, "Score"), VALID["Score"].SerializeToString()))
    return len(response.neg_elbo) == 2 and np.isfinite(response.neg_elbo).all()


@pytest.mark.parametrize("name", UNDECODABLE)
def test_undecodable_cases_do_not_parse(name):
    """The table's undecodable bytes really are not a message of the method's type."""
    item = UNDECODABLE[name]
    service = HEALTH if item.method.startswith(f"/{HEALTH.full_name}/") else INFERENCE
    input_type = service.methods_by_name[item.method.rsplit("/", 1)[1]].input_type
    message_class = health_pb2.HealthCheckRequest if service is HEALTH else getattr(pb, input_type.name)
    with pytest.raises(DecodeError):
        message_class.FromString(item.request)


@pytest.mark.parametrize("name", CASES)
def test_bad_wire_input(channel, name):
    item = CASES[name]
    with pytest.raises(grpc.RpcError) as err:
        raw_call(channel, item.method, item.request)
    assert err.value.code() == item.code, err.value.details()
    details = err.value.details()
    if item.exact:
        assert details == item.says
    else:
        assert item.says in details
    assert len(details) < SHORT, details
    assert answers_a_good_request(channel)


def test_work_over_max_request_values(model_repository, start_server):
    budget = 100_000
    server = start_server(model_repository, max_request_values=budget, max_rows=1000, max_iw_samples=256)
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            # 1000 rows x (elbo + 256) posterior samples x 10 label-free classes x 64 features.
            heavy = pb.ScoreRequest(model="cvae", x=tensor(np.full((1000, 64), 8.0)), iw_samples=256)
            with pytest.raises(grpc.RpcError) as err:
                raw_call(channel, path(INFERENCE, "Score"), heavy.SerializeToString())
            assert err.value.code() == INVALID
            assert "max_request_values" in err.value.details() and f"{budget:,}" in err.value.details()
            assert "1000 rows" in err.value.details() and "10 classes" in err.value.details()
            # Under the budget on the same server: 2 rows x (elbo + 4) x 10 x 64.
            light = pb.ScoreRequest(model="cvae", x=tensor(np.full((2, 64), 8.0)), iw_samples=4)
            response = pb.ScoreResponse.FromString(raw_call(channel, path(INFERENCE, "Score"), light.SerializeToString()))
            assert len(response.neg_elbo) == 2 and np.isfinite(response.neg_elbo).all() and np.isfinite(response.neg_iw).all()
    finally:
        server.stop()


def test_message_over_the_receive_limit(channel, limits):
    """The session server's limit is 1000 * (4 * 64 + 1 + 8) + 64 KiB bytes; 1000 labels of 5,000
    characters beside a well-shaped tensor are far over it, and gRPC refuses them before decoding."""
    labels = ["y" * 5_000] * limits["max_rows"]
    request = pb.ScoreRequest(model="cvae", x=tensor(good(limits["max_rows"])), labels=labels)
    assert request.ByteSize() > limits["max_rows"] * (4 * 64 + 1 + 8) + 64 * 1024
    with pytest.raises(grpc.RpcError) as err:
        raw_call(channel, path(INFERENCE, "Score"), request.SerializeToString())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert answers_a_good_request(channel)


# One feature pushed out of the support [0, 16] per row, at a different column each; the last row stays inside.
OUTSIDE = [(0, 5, 1e6), (1, 20, -1e38), (2, 63, 16.0001)]


@pytest.mark.parametrize("name", MODELS)
def test_rows_outside_the_support(client, rows, name):
    """Each row is sent beside itself brought back into the support (rows 4-7), and scores as that row plus
    (d / scale)^2 / 2 nats for its value d outside (raw units; scale the normaliser's, from the manifest).
    The anomaly score carries the penalty (through neg_elbo's part of the combined score) and the distance of
    the row as sent to the training rows (never less than the row brought back's: the training rows lie inside
    the support), so the rows far outside are flagged and the one just past the range (16.0001) is flagged when
    the row brought back is. The doubles (neg_elbo, reconstruction, neg_iw, neg_log_likelihood) carry
    the penalty in full and stay finite (1e73 to 1e74 nats for -1e38). per_feature and support_distance come as
    float32 tensors: there the -1e38 value's penalty is past float32's range and reads +inf, and 16.0001's
    (1e-11 to 1e-9 nats) is below float32's resolution of its feature's term, which reads as the row brought back's."""
    meta = client.get_model(name)
    low, high = meta.support_low, meta.support_high
    np.testing.assert_array_equal(low, 0.0)
    np.testing.assert_array_equal(high, 16.0)
    scale = np.asarray(meta.manifest["normalization"]["scale"], np.float32)
    x, labels = rows[0][:4].copy(), (rows[1][:4] if name == "cvae" else None)
    for row, column, value in OUTSIDE:
        x[row, column] = value
    assert x[2, 63] > 16.0  # 16.0001 is a float32 past 16
    out = np.zeros(x.shape, bool)
    out[[r for r, _, _ in OUTSIDE], [c for _, c, _ in OUTSIDE]] = True
    clipped = np.clip(x, low, high).astype(np.float32)
    distance = np.abs(x.astype(np.float64) - clipped)  # raw units, 0 inside
    np.testing.assert_array_equal(distance > 0, out)
    penalty = scoring.support_penalty(distance / scale)  # nats per value
    row_penalty = penalty.sum(axis=1)
    both = np.vstack([x, clipped])
    both_labels = None if labels is None else labels * 2
    sent, back = slice(0, 4), slice(4, 8)
    is_out = np.array([True, True, True, False] + [False] * 4)

    combination = meta.manifest["scoring"].get("combination")  # the anomaly score's part of a nat of neg_elbo
    weight = dict(zip(combination["parts"], np.divide(combination["weight"], combination["scale"]))) if combination else {}
    per_nat = weight.get("neg_elbo", 1.0)

    def assert_flags(s):
        np.testing.assert_array_equal(s.out_of_support, is_out)
        np.testing.assert_array_equal(s.is_anomaly, s.anomaly_score > s.threshold)
        assert s.is_anomaly[:2].all() and s.is_anomaly[2] >= s.is_anomaly[6]
        farther = 0.0
        if s.knn_distance is not None:
            assert (s.knn_distance[sent] >= s.knn_distance[back] - 1e-6).all()
            np.testing.assert_array_equal(s.knn_distance[sent][3], s.knn_distance[back][3])  # row 3 is inside
            farther = weight["knn"] * (s.knn_distance[sent] - s.knn_distance[back])
        np.testing.assert_allclose(s.anomaly_score[sent], s.anomaly_score[back] + row_penalty * per_nat + farther, rtol=1e-9)

    scored = client.score(name, both, both_labels, per_feature=True, iw_samples=8)
    assert_flags(scored)
    for field in ("neg_elbo", "reconstruction", "neg_iw"):
        value = getattr(scored, field)
        assert np.isfinite(value).all(), field
        assert (value[:3] > value[4:7]).all(), field
        np.testing.assert_array_equal(value[3], value[7], err_msg=field)
        np.testing.assert_allclose(value[sent], value[back] + row_penalty, rtol=1e-12, err_msg=field)
    assert np.isfinite(scored.kl).all()
    np.testing.assert_array_equal(scored.kl[sent], scored.kl[back])
    # float32 tensors: the distance as sent, zeros inside and for the rows brought back.
    np.testing.assert_array_equal(scored.support_distance, np.vstack([distance, np.zeros(x.shape)]).astype(np.float32))
    per_feature, per_feature_back = scored.per_feature[sent], scored.per_feature[back]
    np.testing.assert_allclose(per_feature[~out], per_feature_back[~out], rtol=1e-6)
    assert np.isfinite(per_feature[~out]).all() and np.isfinite(per_feature_back).all()
    with np.errstate(over="ignore"):  # the -1e38 value's penalty overflows float32
        expected = (per_feature_back[out] + penalty[out]).astype(np.float32)
    np.testing.assert_allclose(per_feature[out], expected, rtol=1e-6)
    assert per_feature[0, 5] > per_feature_back[0, 5] and per_feature[1, 20] == np.inf
    assert per_feature[2, 63] >= per_feature_back[2, 63]
    if name == "cvae":  # label-free too
        free = client.score(name, both, iw_samples=8)
        assert free.per_feature is None and free.support_distance is None  # only with per_feature
        assert_flags(free)
        for field in ("neg_elbo", "neg_iw"):
            value = getattr(free, field)
            assert np.isfinite(value).all() and (value[:3] > value[4:7]).all(), field
            np.testing.assert_allclose(value[sent], value[back] + row_penalty, rtol=1e-12, err_msg=field)
        np.testing.assert_array_equal(free.kl[sent], free.kl[back])

    rebuilt = client.reconstruct(name, both, both_labels)
    nll = rebuilt.neg_log_likelihood
    assert np.isfinite(nll).all()
    assert (nll[:3] > nll[4:7]).all()
    np.testing.assert_allclose(nll[sent], nll[back] + row_penalty, rtol=1e-12)
    assert np.isfinite(rebuilt.x).all()
    np.testing.assert_allclose(rebuilt.x[:4], rebuilt.x[4:], rtol=0, atol=1e-5)  # the row brought into the support

    embedded = client.embed(name, both, both_labels)
    assert np.isfinite(embedded.mu).all() and np.isfinite(embedded.logvar).all()
    np.testing.assert_allclose(embedded.mu[:4], embedded.mu[4:], rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedded.logvar[:4], embedded.logvar[4:], rtol=0, atol=1e-6)


def test_outputs_past_float32_range_read_inf_and_leave_the_log_clean(model_repository, start_server, tmp_path):
    """The penalty of a value at -1e38 is past float32's range: it reads +inf in the float32 per_feature tensor
    of vaeserve.v1 and of the Open Inference Protocol (tritonclient), and the server's log holds no NumPy
    overflow warning (an operator reads one as a fault; bench fuzz found two there)."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    from vaeserve.service.client import Client

    x = np.full((2, 64), 8.0, np.float32)
    x[0, 20] = -1e38
    log = tmp_path / "serve.log"
    server = start_server(model_repository, log=log)
    try:
        server.wait_serving()
        with Client(server.target) as client:
            scored = client.score("vae", x, per_feature=True)
        with InferenceServerClient(server.target) as triton:
            sent = InferInput("x", list(x.shape), "FP32")
            sent.set_data_from_numpy(x)
            inferred = triton.infer("vae", [sent], parameters={"per_feature": True}).as_numpy("per_feature")
    finally:
        server.stop()
    for per_feature in (scored.per_feature, inferred):
        assert per_feature[0, 20] == np.inf
        assert np.isfinite(np.delete(per_feature, 20, axis=1)).all() and np.isfinite(per_feature[1]).all()
    assert np.isfinite(scored.neg_elbo).all() and scored.is_anomaly[0]
    assert "Warning" not in log.read_text(), log.read_text()[-2000:]


FUZZED = 1000


def test_fuzz_slice(model_repository, start_server, tmp_path):
    log = tmp_path / "serve.log"
    manifests = [max(numbered.items())[1].manifest for numbered in scan_repository(model_repository).values()]
    server = start_server(model_repository, log=log)
    try:
        server.wait_serving()
        before = log.stat().st_size
        result = asyncio.run(fuzz.send_all(server.target, fuzz.seed_requests(manifests), FUZZED, seconds=60, seed=0))
        grown = log.stat().st_size - before
        codes = result["codes"]
        assert sum(codes.values()) == FUZZED  # none skipped for time
        failures = {key: n for key, n in codes.items() if key[1] in fuzz.FAILURES}
        assert failures == {}, (failures, server.log_text()[-4000:])
        for method in fuzz.RPCS:
            assert codes[method, "OK"] > 0 and codes[method, "INVALID_ARGUMENT"] > 0, (method, codes)
        assert server.health() == health_pb2.HealthCheckResponse.SERVING
        assert grown < 2_000, server.log_text()[-4000:]

        # Undecodable requests are counted under model "" with INVALID_ARGUMENT. ListModels has no other
        # way to be INVALID_ARGUMENT, so its count is the fuzz's; three more raise every method's by three.
        def refused(method):
            key = ("vaeserve_requests_total", (("code", "INVALID_ARGUMENT"), ("method", method), ("model", ""), ("version", "")))
            return server.metrics().get(key, 0.0)

        assert refused("ListModels") == codes["ListModels", "INVALID_ARGUMENT"]
        counted = {name: refused(name) for name in [*VALID, "Check"]}
        with grpc.insecure_channel(server.target) as channel:
            for name in counted:
                for _ in range(3):
                    with pytest.raises(grpc.RpcError) as err:
                        raw_call(channel, path(HEALTH if name == "Check" else INFERENCE, name), GARBAGE)
                    assert err.value.code() == INVALID
        assert {name: refused(name) - n for name, n in counted.items()} == {name: 3 for name in counted}
        # At most one log line a minute about them, however many came.
        assert server.log_text().count("undecodable request to") == 1
    finally:
        server.stop()
