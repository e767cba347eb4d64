"""Bad input is answered with a status code and a message naming the problem; the server stays up."""

import grpc
import numpy as np
import pytest

from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def tensor(a):
    a = np.ascontiguousarray(a, "<f4")
    return pb.Tensor(shape=a.shape, data=a.tobytes())


def good(rows=2):
    return np.ones((rows, 64), np.float32)


with_nan, with_inf = good(), good()
with_nan[1, 5] = np.nan
with_inf[0, 63] = np.inf

CASES = {
    "wrong feature count": (lambda limits: pb.ScoreRequest(model="vae", x=tensor(np.ones((2, 10)))), INVALID, "takes 64 values per row, got 10"),
    "byte length vs shape": (lambda limits: pb.ScoreRequest(model="vae", x=pb.Tensor(shape=[2, 64], data=b"\0" * 100)), INVALID, "needs 512 bytes"),
    "1-D tensor": (lambda limits: pb.ScoreRequest(model="vae", x=tensor(np.ones(64))), INVALID, "2-D"),
    "missing tensor": (lambda limits: pb.EmbedRequest(model="vae"), INVALID, "x: missing"),
    "NaN": (lambda limits: pb.ScoreRequest(model="vae", x=tensor(with_nan)), INVALID, "NaN or Inf at row 1, column 5"),
    "Inf": (lambda limits: pb.ReconstructRequest(model="vae", x=tensor(with_inf)), INVALID, "NaN or Inf at row 0, column 63"),
    "zero rows": (lambda limits: pb.ScoreRequest(model="vae", x=pb.Tensor(shape=[0, 64])), INVALID, "zero rows"),
    "too many rows": (lambda limits: pb.ScoreRequest(model="vae", x=tensor(good(limits["max_rows"] + 1))), INVALID, "more than the limit"),
    "unknown label": (lambda limits: pb.ScoreRequest(model="cvae", x=tensor(good()), labels=["3", "cat"]), INVALID, "unknown label 'cat'"),
    "label count": (lambda limits: pb.ScoreRequest(model="cvae", x=tensor(good()), labels=["3"]), INVALID, "1 labels for 2 rows"),
    "labels for a VAE": (lambda limits: pb.ScoreRequest(model="vae", x=tensor(good()), labels=["3", "4"]), INVALID, "unconditional"),
    "CVAE embed without labels": (lambda limits: pb.EmbedRequest(model="cvae", x=tensor(good())), INVALID, "conditional"),
    "iw_samples over the cap": (lambda limits: pb.ScoreRequest(model="vae", x=tensor(good()), iw_samples=limits["max_iw_samples"] + 1), INVALID, "iw_samples"),
    "no model named": (lambda limits: pb.ScoreRequest(x=tensor(good())), INVALID, "names no model"),
    "unknown model": (lambda limits: pb.ScoreRequest(model="nope", x=tensor(good())), NOT_FOUND, "no model 'nope'"),
    "unknown version": (lambda limits: pb.ScoreRequest(model="vae", version=9, x=tensor(good())), NOT_FOUND, "no version 9"),
    "decode wrong latent width": (lambda limits: pb.DecodeRequest(model="vae", z=tensor(np.ones((2, 3)))), INVALID, "takes 4 values per row, got 3"),
    "generate zero count": (lambda limits: pb.GenerateRequest(model="vae"), INVALID, "count is zero"),
    "generate negative temperature": (lambda limits: pb.GenerateRequest(model="vae", count=2, temperature=-1), INVALID, "temperature"),
}
METHODS = {pb.ScoreRequest: "Score", pb.EmbedRequest: "Embed", pb.ReconstructRequest: "Reconstruct",
           pb.DecodeRequest: "Decode", pb.GenerateRequest: "Generate"}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input(stub, limits, case):
    make, code, message = CASES[case]
    request = make(limits)
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, METHODS[type(request)])(request, timeout=10)
    assert err.value.code() == code
    assert message in err.value.details()
    # The server is still up and answers a good request.
    assert len(stub.Score(pb.ScoreRequest(model="vae", x=tensor(good())), timeout=10).neg_elbo) == 2
