"""ONNX Runtime sessions for one model version's graphs.

Providers: CUDA first where the installed onnxruntime offers it and an NVIDIA device is present,
then CPU. What a session was actually granted is `session.get_providers()`;
`get_available_providers()` lists CUDA even on a machine without a GPU, so it is never reported.
"""

import glob
from pathlib import Path

import numpy as np
import onnxruntime as ort


def wanted_providers() -> list[str]:
    """CUDA only where a GPU device node exists: asking for it elsewhere logs a load error per session."""
    wanted = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers() and glob.glob("/dev/nvidia[0-9]*"):
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


def create_session(path: str | Path, intra_op_threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Spinning threads of several sessions fight over the cores; measured 39k vs 61k rows/s on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=wanted_providers())


class Graph:
    """One session with its input and output names looked up once."""

    def __init__(self, path: str | Path, intra_op_threads: int = 1):
        self.session = create_session(path, intra_op_threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = list(self.session.get_providers())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; only the inputs the graph declares are fed (a VAE's feeds may carry y=None)."""
        inputs = {name: np.ascontiguousarray(feeds[name], np.float32) for name in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, inputs)))


def scoring_callables(encoder: Graph, decoder: Graph):
    """encode(x, y) -> (mu, logvar) and decode(z, y) -> {output name: array}: the two graphs in the form
    vaeserve.scoring takes; y is None for an unconditional model."""

    def encode(x, y):
        out = encoder.run({"x": x, "y": y})
        return out["mu"], out["logvar"]

    def decode(z, y):
        return decoder.run({"z": z, "y": y})

    return encode, decode
