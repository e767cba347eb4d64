"""ONNX Runtime sessions for one model version's graphs.

Providers: CUDA first where the installed onnxruntime offers it, then CPU. What a session was
actually granted is `session.get_providers()`; `get_available_providers()` lists CUDA even on a
machine without a GPU, so it is never reported.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort


def create_session(path: str | Path, intra_op_threads: int = 1) -> ort.InferenceSession:
    ort.set_default_logger_severity(3)  # the CUDA provider failing to load without a GPU is expected, not an error
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Spinning threads of several sessions fight over the cores; measured 39k vs 61k rows/s on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # the CUDA provider's failure to load on a GPU-less box is expected
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=wanted)


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
