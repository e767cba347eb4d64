"""The Open Inference Protocol on the session server, driven by the real tritonclient (sync, asyncio and
stream), and by raw protocol messages where tritonclient cannot send them (typed contents, broken input);
every answer checked against vaeserve.v1's for the same rows."""

import asyncio
import queue

import grpc
import numpy as np
import pytest

from tritonclient.grpc import InferenceServerClient, InferInput, InferRequestedOutput  # a dev dependency, not in the image
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from vaeserve.oip.v2 import predict_pb2 as pb

SCORES = ["neg_elbo", "reconstruction", "kl"]
ANOMALY = {"anomaly_score": "anomaly_score", "p_value": "p_value", "knn_distance": "knn_distance"}  # OIP output -> ScoreResult field
CODES = {"INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT, "NOT_FOUND": grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def triton(server):
    with InferenceServerClient(server.target) as c:
        yield c


def inputs(x, labels=None, name="x"):
    x = np.ascontiguousarray(x, np.float32)
    tensor = InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    tensors = [tensor]
    if labels is not None:
        label_tensor = InferInput("labels", [len(labels)], "BYTES")
        label_tensor.set_data_from_numpy(np.array(labels, dtype=object))
        tensors.append(label_tensor)
    return tensors


def refusal(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def v1_refusal(call) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return str(caught.value.code()), caught.value.details()


def test_server_live_ready_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta.name == "vaeserve" and set(meta.extensions) == {"model_configuration", "statistics", "parameters"}
    assert triton.is_model_ready("vae") and triton.is_model_ready("cvae.embed") and triton.is_model_ready("vae", "1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("vae", "7") and not triton.is_model_ready("vae.nope")


def test_model_metadata_and_config(triton, client, limits):
    meta = triton.get_model_metadata("cvae")
    assert (meta.name, list(meta.versions), meta.platform) == ("cvae", ["1"], "vaeserve")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 64]), ("labels", "BYTES", [-1])]
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert outputs["neg_elbo"] == ("FP64", [-1]) and outputs["is_anomaly"] == ("BOOL", [-1])
    assert outputs["per_feature"] == ("FP32", [-1, 64])
    # p_value with conformal calibration, knn_distance with neighbours: the fixture versions have both.
    assert [name for name in outputs if name in ANOMALY] == ["anomaly_score", "p_value", "knn_distance"]
    assert all(outputs[name] == ("FP64", [-1]) for name in ANOMALY)
    assert [t.name for t in triton.get_model_metadata("vae.decode").inputs] == ["z"]
    assert [t.name for t in triton.get_model_metadata("vae.generate").inputs] == ["count"]

    config = triton.get_model_config("vae", as_json=True)["config"]
    assert config["name"] == "vae" and config["max_batch_size"] == limits["max_rows"]
    assert config["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "dims": ["64"]}
    neg_elbo = next(o for o in config["output"] if o["name"] == "neg_elbo")
    assert neg_elbo["dims"] == ["1"] and neg_elbo["reshape"] == {}  # a row's scalar: [rows] on the wire
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert float(config["parameters"]["threshold"]["string_value"]) == client.get_model("vae").threshold
    assert config["parameters"]["threshold_score"]["string_value"] == "combined"
    assert {o["name"] for o in config["output"]} >= set(ANOMALY)
    assert triton.get_model_config("vae.generate", as_json=True)["config"].get("max_batch_size", 0) == 0
    status, message = refusal(lambda: triton.get_model_metadata("nope"))
    assert status == "StatusCode.NOT_FOUND" and "no model 'nope'" in message


@pytest.mark.parametrize("name, labelled", [("vae", False), ("cvae", True), ("cvae", False), ("ppca", False)])
def test_infer_equals_score(triton, client, rows, name, labelled):
    x, labels = rows
    labels = labels if labelled else None
    result = triton.infer(name, inputs(x, labels))
    expected = client.score(name, x, labels)
    for field in [*SCORES, *ANOMALY]:
        want = getattr(expected, ANOMALY.get(field, field))
        if want is None:
            assert result.as_numpy(field) is None, field
            continue
        np.testing.assert_allclose(result.as_numpy(field), want, rtol=0, atol=1e-6, err_msg=field)
        assert result.as_numpy(field).dtype == np.float64
    np.testing.assert_array_equal(result.as_numpy("p_value"), expected.p_value)  # the same scores, the same counts
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), expected.is_anomaly)
    np.testing.assert_array_equal(result.as_numpy("out_of_support"), expected.out_of_support)
    response = result.get_response()
    assert response.model_version == "1" and response.parameters["threshold"].double_param == expected.threshold
    assert result.as_numpy("per_feature") is None and result.as_numpy("neg_iw") is None


def test_infer_options_and_requested_outputs(triton, client, rows):
    x, _ = rows
    x = x.copy()
    x[0, 3] = 1e4  # far outside the support: flagged through its penalty, with its distance
    result = triton.infer("vae", inputs(x), parameters={"threshold": "5.0", "iw_samples": 16, "per_feature": True})
    expected = client.score("vae", x, threshold=5.0, iw_samples=16, per_feature=True)
    assert result.as_numpy("is_anomaly")[0] and expected.is_anomaly[0]
    np.testing.assert_allclose(result.as_numpy("neg_iw"), expected.neg_iw, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("per_feature"), expected.per_feature, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("support_distance"), expected.support_distance, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), expected.is_anomaly)
    assert result.as_numpy("out_of_support")[0] and result.get_response().parameters["threshold"].double_param == 5.0

    # Asking for outputs returns just those, and asking for neg_iw or per_feature computes them.
    asked = triton.infer("vae", inputs(x), outputs=[InferRequestedOutput("neg_iw"), InferRequestedOutput("per_feature")])
    assert [o.name for o in asked.get_response().outputs] == ["neg_iw", "per_feature"]
    calibrated = client.get_model("vae").iw_samples
    np.testing.assert_allclose(asked.as_numpy("neg_iw"), client.score("vae", x, iw_samples=calibrated).neg_iw, rtol=0, atol=1e-6)


def test_alpha_equals_v1(triton, client, rows):
    """alpha, as text (what tritonclient 2.41 sends) or a double, flags as vaeserve.v1's alpha does, and its
    mistakes get v1's codes and messages."""
    x, _ = rows
    x = np.vstack([x, x[:8] * 0.5 + 4.0])
    expected = client.score("vae", x, alpha=0.25)
    result = triton.infer("vae", inputs(x), parameters={"alpha": "0.25"})
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), expected.is_anomaly)
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), result.as_numpy("p_value") <= 0.25)
    assert result.get_response().parameters["threshold"].double_param == expected.threshold
    assert 0 < expected.is_anomaly.sum() < len(x)
    for sent, v1 in [
        ({"alpha": "0.1", "threshold": "1.0"}, dict(alpha=0.1, threshold=1.0)),
        ({"alpha": "0.0001"}, dict(alpha=0.0001)),
        ({"alpha": "1.5"}, dict(alpha=1.5)),
    ]:
        got = refusal(lambda: triton.infer("vae", inputs(x), parameters=sent))
        assert got == v1_refusal(lambda: client.score("vae", x, **v1)) and got[0] == "StatusCode.INVALID_ARGUMENT", sent


def test_embed_reconstruct_decode_generate(triton, client, rows):
    x, labels = rows
    embedded, expected = triton.infer("cvae.embed", inputs(x, labels)), client.embed("cvae", x, labels)
    np.testing.assert_allclose(embedded.as_numpy("mu"), expected.mu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedded.as_numpy("logvar"), expected.logvar, rtol=0, atol=1e-6)
    sampled = triton.infer("vae.embed", inputs(x), parameters={"posterior_samples": 3, "seed": 7})
    np.testing.assert_allclose(sampled.as_numpy("samples"), client.embed("vae", x, posterior_samples=3, seed=7).samples.transpose(1, 0, 2),
                               rtol=0, atol=1e-6)  # fmt: skip

    rebuilt, expected = triton.infer("vae.reconstruct", inputs(x)), client.reconstruct("vae", x)
    np.testing.assert_allclose(rebuilt.as_numpy("x"), expected.x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rebuilt.as_numpy("neg_log_likelihood"), expected.neg_log_likelihood, rtol=0, atol=1e-6)

    z = np.linspace(-2, 2, 4 * 8, dtype=np.float32).reshape(8, 4)
    decoded = triton.infer("cvae.decode", inputs(z, labels[:8], name="z"))
    np.testing.assert_allclose(decoded.as_numpy("x"), client.decode("cvae", z, labels[:8]), rtol=0, atol=1e-6)

    count = InferInput("count", [1], "INT64")
    count.set_data_from_numpy(np.array([5], np.int64))
    generated = triton.infer("vae.generate", [count], parameters={"seed": 3, "temperature": "0.5"})
    expected = client.generate("vae", 5, seed=3, temperature=0.5)
    np.testing.assert_allclose(generated.as_numpy("x"), expected.x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(generated.as_numpy("z"), expected.z, rtol=0, atol=1e-6)


def test_mistakes_get_the_codes_and_messages_of_v1(triton, client, rows):
    x, _ = rows
    wide = np.zeros((2, 65), np.float32)
    nan = x[:2].copy()
    nan[1, 5] = np.nan
    for sent, v1 in [
        (lambda: triton.infer("vae", inputs(wide)), lambda: client.score("vae", wide)),
        (lambda: triton.infer("vae", inputs(nan)), lambda: client.score("vae", nan)),
        (lambda: triton.infer("nope", inputs(x)), lambda: client.score("nope", x)),
        (lambda: triton.infer("vae", inputs(x), model_version="9"), lambda: client.score("vae", x, version=9)),
        (lambda: triton.infer("cvae", inputs(x[:2], ["3", "no such"])), lambda: client.score("cvae", x[:2], ["3", "no such"])),
        (lambda: triton.infer("vae", inputs(x), parameters={"threshold": "inf"}), lambda: client.score("vae", x, threshold=float("inf"))),
        (lambda: triton.infer("vae", inputs(x[:2], ["3", "4"])), lambda: client.score("vae", x[:2], ["3", "4"])),
        (lambda: triton.infer("cvae.embed", inputs(x[:2])), lambda: client.embed("cvae", x[:2])),
    ]:  # fmt: skip
        assert refusal(sent) == v1_refusal(v1)
    assert refusal(lambda: triton.infer("vae", inputs(wide)))[0] == "StatusCode.INVALID_ARGUMENT"
    assert refusal(lambda: triton.infer("nope", inputs(x)))[0] == "StatusCode.NOT_FOUND"
    status, message = refusal(lambda: triton.infer("vae", inputs(x), parameters={"tresh": "1.0"}))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown parameter 'tresh'" in message and "threshold" in message
    status, message = refusal(lambda: triton.infer("vae", inputs(x), outputs=[InferRequestedOutput("mu")]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown output 'mu'" in message
    status, message = refusal(lambda: triton.infer("vae.embed", inputs(x, name="z")))
    assert status == "StatusCode.INVALID_ARGUMENT" and "unknown input 'z'" in message
    status, message = refusal(lambda: triton.infer("vae", inputs(x), model_version="\u00b2"))  # a digit, not ASCII
    assert status == "StatusCode.INVALID_ARGUMENT" and "expected a version number" in message
    assert refusal(lambda: triton.infer("vae.", inputs(x)))[0] == "StatusCode.NOT_FOUND"
    status, message = refusal(lambda: triton.infer("vae", inputs(x), sequence_id=3))
    assert status == "StatusCode.INVALID_ARGUMENT" and "sequences are not supported" in message


def test_triton_request_options(triton, client, rows):
    """priority is accepted and ignored; timeout (microseconds) is the call's deadline."""
    x, _ = rows
    expected = client.score("vae", x).neg_elbo
    result = triton.infer("vae", inputs(x), priority=1, timeout=10_000_000)
    np.testing.assert_allclose(result.as_numpy("neg_elbo"), expected, rtol=0, atol=1e-6)
    assert refusal(lambda: triton.infer("vae", inputs(x), timeout=0))[0] == "StatusCode.DEADLINE_EXCEEDED"


def test_asyncio_client(server, client, rows):
    x, labels = rows

    async def main():
        async with triton_aio.InferenceServerClient(server.target) as c:
            assert await c.is_server_ready()
            return await asyncio.gather(*(c.infer("cvae", inputs(x[i:i + 4], labels[i:i + 4])) for i in range(0, 32, 4)))

    results = asyncio.run(main())
    expected = client.score("cvae", x, labels)
    got = np.concatenate([r.as_numpy("neg_elbo") for r in results])
    np.testing.assert_allclose(got, expected.neg_elbo, rtol=0, atol=1e-6)


def test_stream_answers_in_order_and_errors_stay_with_their_request(triton, client, rows):
    x, _ = rows
    answers: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        sent = []
        for i in range(40):
            if i == 17:  # a wrong width in the middle of the stream
                triton.async_stream_infer("vae", inputs(np.zeros((1, 3), np.float32)), request_id="bad")
            else:
                triton.async_stream_infer("vae", inputs(x[i % 32:i % 32 + 1]), request_id=str(i))
            sent.append(i)
        got = [answers.get(timeout=30) for _ in sent]
    finally:
        triton.stop_stream()
    expected = client.score("vae", x).neg_elbo
    for i, (result, error) in enumerate(got):
        if i == 17:
            assert result is None and "the model takes 64 values per row, got 3" in error.message()
            continue
        assert error is None and result.get_response().id == str(i)
        np.testing.assert_allclose(result.as_numpy("neg_elbo"), expected[i % 32:i % 32 + 1], rtol=0, atol=1e-6)


def test_typed_contents_and_raw_messages(server, client, rows):
    """Inputs as typed contents (fp32_contents, bytes_contents), and what tritonclient never sends."""
    x, labels = rows
    channel = grpc.insecure_channel(server.target)
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
    request = pb.ModelInferRequest(model_name="cvae", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[4, 64], contents=pb.InferTensorContents(fp32_contents=x[:4].ravel())),
        pb.ModelInferRequest.InferInputTensor(name="labels", datatype="BYTES", shape=[4, 1], contents=pb.InferTensorContents(bytes_contents=[l.encode() for l in labels[:4]])),
    ])  # fmt: skip
    response = infer(request, timeout=10)
    assert [o.name for o in response.outputs][:3] == SCORES
    got = np.frombuffer(response.raw_output_contents[0], "<f8")
    np.testing.assert_allclose(got, client.score("cvae", x[:4], labels[:4]).neg_elbo, rtol=0, atol=1e-6)

    def code(request):
        with pytest.raises(grpc.RpcError) as caught:
            infer(request, timeout=10)
        return caught.value.code(), caught.value.details()

    short = pb.ModelInferRequest(model_name="vae", inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 64])],
                                 raw_input_contents=[x[:1].tobytes()])  # fmt: skip
    assert code(short) == (grpc.StatusCode.INVALID_ARGUMENT, "x: shape [2, 64] needs 512 bytes of little-endian float32, got 256")
    fp64 = pb.ModelInferRequest(model_name="vae", inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP64", shape=[1, 64])],
                                raw_input_contents=[x[:1].astype("<f8").tobytes()])  # fmt: skip
    assert code(fp64)[0] == grpc.StatusCode.INVALID_ARGUMENT and "send FP32" in code(fp64)[1]
    assert code(pb.ModelInferRequest(model_name="vae"))[1].startswith("'vae' needs input 'x'")
    broken_label = pb.ModelInferRequest(model_name="cvae", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 64]),
        pb.ModelInferRequest.InferInputTensor(name="labels", datatype="BYTES", shape=[1]),
    ], raw_input_contents=[x[:1].tobytes(), b"\x09\x00\x00\x00ab"])  # fmt: skip
    assert code(broken_label) == (grpc.StatusCode.INVALID_ARGUMENT, "input 'labels': element 0 says 9 bytes, only 2 follow")
    # 75,000 empty elements for one label (what the receive limit admits): refused without reading past the first.
    flood = pb.ModelInferRequest(model_name="cvae", inputs=broken_label.inputs, raw_input_contents=[x[:1].tobytes(), bytes(300_000)])
    assert code(flood) == (grpc.StatusCode.INVALID_ARGUMENT, "input 'labels': 299996 bytes of raw BYTES contents after its 1 elements")
    shared = pb.ModelInferRequest(model_name="vae", inputs=short.inputs, raw_input_contents=[x[:2].tobytes()])
    shared.inputs[0].parameters["shared_memory_region"].string_param = "input0"
    assert code(shared)[0] == grpc.StatusCode.INVALID_ARGUMENT and "not supported (no shared memory)" in code(shared)[1]
    doubled = pb.ModelInferRequest(model_name="vae", inputs=short.inputs, raw_input_contents=[x[:2].tobytes()])
    doubled.parameters["threshold"].double_param = 2.5  # what newer tritonclients send for a float
    assert infer(doubled, timeout=10).parameters["threshold"].double_param == 2.5
    at_alpha = pb.ModelInferRequest(model_name="vae", inputs=short.inputs, raw_input_contents=[x[:2].tobytes()])
    at_alpha.parameters["alpha"].double_param = 0.5
    assert infer(at_alpha, timeout=10).parameters["threshold"].double_param == client.score("vae", x[:2], alpha=0.5).threshold
    channel.close()


@pytest.mark.parametrize("method", [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
                                    if not m.client_streaming])  # fmt: skip
def test_undecodable_bytes_are_invalid_argument(server, method):
    request_type = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[method].input_type.full_name
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"the request is not a valid {request_type} message"


def test_statistics_and_metrics(server, triton, rows):
    x, _ = rows
    before = server.metrics()
    triton.infer("ppca", inputs(x[:3]))
    stats = triton.get_inference_statistics("ppca").model_stats
    assert [(s.name, s.version) for s in stats] == [("ppca", "1")]
    assert stats[0].inference_stats.success.count >= 1 and stats[0].inference_count >= 3 and stats[0].inference_stats.success.ns > 0
    after = server.metrics()
    key = ("vaeserve_requests_total", (("code", "OK"), ("method", "ModelInfer"), ("model", "ppca"), ("version", "1")))
    assert after[key] - before.get(key, 0) == 1
    assert {m.name for m in triton.get_model_repository_index().models} >= {"vae", "vae.embed", "cvae.generate", "ppca.decode"}


def test_the_docs_example_runs(server, client, rows, capsys):
    """docs/api.md's tritonclient example, as written, against the test server's `vae` for `digits`."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text[text.index("## Open Inference Protocol"):]
    example = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 3)]
    example = example.replace("localhost:50051", server.target).replace('"digits"', '"vae"')
    x = rows[0][:8]
    namespace = {"rows": x}
    exec(example, namespace)
    result = namespace["result"]
    expected = client.score("vae", x, iw_samples=64)
    np.testing.assert_allclose(result.as_numpy("neg_iw"), expected.neg_iw, rtol=0, atol=1e-6)
    printed = capsys.readouterr().out.split("\n")
    assert len([line for line in printed if line.startswith("[")]) == len(x)  # one answer per streamed row
