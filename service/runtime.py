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


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a graph, feeding only the inputs it declares; outputs by name."""
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name: np.ascontiguousarray(feeds[i.name], np.float32) for i in session.get_inputs()}
    return dict(zip(names, session.run(names, inputs)))


class Graph:
    """One session with its input and output names looked up once; `run` is what a batcher calls."""

    def __init__(self, path: str | Path, intra_op_threads: int = 1):
        self.session = create_session(path, intra_op_threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = list(self.session.get_providers())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {name: np.ascontiguousarray(feeds[name], np.float32) for name in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, inputs)))
