"""A model version opened in ONNX Runtime: one session per graph, checked against the manifest, and the
version's Scorer.

Providers: CUDA first where the installed onnxruntime offers it and an NVIDIA device is present,
then CPU. What a session was actually granted is `session.get_providers()`;
`get_available_providers()` lists CUDA even on a machine without a GPU, so it is never reported.

A graph that ONNX Runtime cannot load, whose declared inputs and outputs (names, element type, rank,
static widths) differ from the manifest, or that does not compute [rows, width] finite outputs for
rows inside the model's support, raises ArtifactError naming the file: the version is not served. A
score graph must also agree with the NumPy scorer on those rows, within the tolerance export held it to.
"""

import glob
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vaeserve.artifact.manifest import GraphInfo, ScoringInfo, Thresholds
from vaeserve.artifact.repository import ModelVersion
from vaeserve.errors import ArtifactError, cut
from vaeserve.normalization import Normalizer, Support
from vaeserve.conformal import Calibration
from vaeserve.scoring import Decode, Encode, Neighbours, Scorer, ScoreGraph, Scores

CHECK_ROWS = 2  # rows of the load-time run: the support's low and high ends
ELEMENT_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)"}  # manifest dtype -> ONNX Runtime's


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
    # ORT's CPU arena keeps each session's largest run for good (8 sessions held ~330 MiB after one burst
    # of large requests); plain malloc gives it back when the server trims (service/memory.py). Measured
    # with the default digits decoder at 8, 64 and 2048 rows: the same time per run either way.
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=wanted_providers())


class Graph:
    """One session, checked against the manifest's entry for it, with its input and output names."""

    def __init__(self, path: str | Path, info: GraphInfo, intra_op_threads: int = 1):
        self.path, self.info = Path(path), info
        try:
            self.session = create_session(path, intra_op_threads)
        except Exception as err:  # ONNX Runtime raises its own exception types for unloadable files
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({_first_line(err)})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = list(self.session.get_providers())
        self._check_declared()

    def _check_declared(self) -> None:
        for side, declared, expected in (("inputs", self.session.get_inputs(), self.info.inputs),
                                         ("outputs", self.session.get_outputs(), self.info.outputs)):  # fmt: skip
            want, dtype = {t.name: t.width for t in expected}, {t.name: t.dtype for t in expected}
            if sorted(a.name for a in declared) != sorted(want):
                raise ArtifactError(f"{self.path}: declares {side} {sorted(a.name for a in declared)}, "
                                    f"the manifest {sorted(want)}")  # fmt: skip
            for arg in declared:
                shape = list(arg.shape)
                static_width = len(shape) == 2 and isinstance(shape[1], int)
                if arg.type != ELEMENT_TYPES[dtype[arg.name]] or len(shape) != 2 or isinstance(shape[0], int) and shape[0] != -1 \
                        or static_width and shape[1] != want[arg.name]:  # fmt: skip
                    raise ArtifactError(f"{self.path}: {arg.name} is {arg.type} {shape}; the manifest says {dtype[arg.name]} "
                                        f"[batch, {want[arg.name]}]")  # fmt: skip

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name; only the inputs the graph declares are fed (a VAE's feeds may carry y=None)."""
        inputs = {name: np.ascontiguousarray(feeds[name], np.float32) for name in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, inputs)))

    def check_run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once and check every output is [rows, width] and finite."""
        rows = len(next(iter(feeds.values())))
        try:
            outputs = self.run(feeds)
        except Exception as err:
            raise ArtifactError(f"{self.path}: fails to run on {rows} rows ({_first_line(err)})") from None
        for t in self.info.outputs:
            value = outputs[t.name]
            if value.shape != (rows, t.width):
                raise ArtifactError(f"{self.path}: computes {t.name} of shape {list(value.shape)} for {rows} rows; "
                                    f"the manifest says [{rows}, {t.width}]")  # fmt: skip
            if not np.isfinite(value).all():
                raise ArtifactError(f"{self.path}: computes non-finite {t.name} for rows inside the model's support")
        return outputs


def callables(encoder: Graph, decoder: Graph) -> tuple[Encode, Decode]:
    """encode(x, y) -> (mu, logvar) and decode(z, y) -> {output name: array}: two graphs in the form
    vaeserve.scoring takes; y is None for an unconditional model."""

    def encode(x, y):
        out = encoder.run({"x": x, "y": y})
        return out["mu"], out["logvar"]

    def decode(z, y):
        return decoder.run({"z": z, "y": y})

    return encode, decode


def score_callable(graph: Graph) -> ScoreGraph:
    """score(x, y) -> Scores of a score graph, in the form Scorer takes; y is None for an unconditional model."""

    def score(x, y):
        out = graph.run({"x": x, "y": y})
        return Scores(out["neg_elbo"].reshape(-1), out["reconstruction"].reshape(-1), out["kl"].reshape(-1), None,
                      out["per_feature"])  # fmt: skip

    return score


def neighbours_callable(graph: Graph) -> Neighbours:
    """knn(x) -> [rows] float64 of a neighbour graph, in the form Scorer takes."""

    def knn(x):
        return graph.run({"x": x})["knn"].reshape(-1)

    return knn


def scorer(encoder: Graph, decoder: Graph, normalization: Normalizer, support: Support, info: ScoringInfo,
           score_graph: Graph | None = None, neighbour_graph: Graph | None = None,
           thresholds: Thresholds | None = None) -> Scorer:  # fmt: skip
    """The Scorer of the graphs with a manifest's scoring settings: with the score graph where there is one,
    the combined score where the version has one, and p-values where its thresholds hold calibration scores."""
    prior = None if info.class_prior is None else np.asarray(info.class_prior, np.float64)
    calibration = None
    if thresholds is not None and thresholds.calibration_scores is not None:
        calibration = Calibration.of(np.asarray(thresholds.calibration_scores, np.float64))
    return Scorer(*callables(encoder, decoder), info.likelihood, normalization, support, class_prior=prior,
                  elbo_samples=info.elbo_samples, seed=info.seed,
                  score_graph=None if score_graph is None else score_callable(score_graph),
                  neighbours=None if neighbour_graph is None else neighbours_callable(neighbour_graph),
                  reference_rows=0 if info.neighbours is None else info.neighbours.reference_rows,
                  combination=info.combination, calibration=calibration)  # fmt: skip


class Model:
    """A model version ready for inference: its graphs open and checked, its Scorer (on the score graph
    where the version has one; versions without one, older or whose graph missed its parity, score in NumPy)."""

    def __init__(self, version: ModelVersion, intra_op_threads: int = 1):
        m = version.manifest
        self.version, self.manifest = version, m
        self.encoder = Graph(version.encoder_path, m.encoder, intra_op_threads)
        self.decoder = Graph(version.decoder_path, m.decoder, intra_op_threads)
        self.score_graph = None if m.score is None else Graph(version.score_path, m.score, intra_op_threads)
        self.neighbour_graph = None if m.neighbours is None else Graph(version.neighbours_path, m.neighbours, intra_op_threads)
        self.encode, self.decode = callables(self.encoder, self.decoder)
        self.scorer = scorer(self.encoder, self.decoder, m.normalization, m.support, m.scoring, self.score_graph,
                             self.neighbour_graph, m.thresholds)  # fmt: skip
        self.check(CHECK_ROWS)

    def check(self, rows: int) -> None:
        """Run `rows` rows through the graphs and check what they compute (ArtifactError naming the file):
        the support's two ends, alternating, through the encoder, their posterior means through the
        decoder; through the score graph (a chunk of them at most), their scores, where the two ends' must
        agree with the NumPy scorer's. Run again with more rows, it is the service's warm-up."""
        if rows < 1:
            return
        m = self.manifest
        raw = np.stack([m.support.low, m.support.high])[np.arange(rows) % 2]
        x = self.scorer.prepare(raw)[0]
        y = np.eye(len(m.labels), dtype=np.float32)[np.arange(rows) % len(m.labels)] if m.conditional else None
        mu = self.encoder.check_run({"x": x, "y": y})["mu"]
        self.decoder.check_run({"z": mu, "y": y})
        if self.neighbour_graph is not None:
            self.neighbour_graph.check_run({"x": x})
        if self.score_graph is not None:
            # The Scorer hands the graph one chunk at most, so one chunk warms it up; the NumPy reference it is
            # compared with runs on the support's two ends only (a warm-up of 300k rows would take minutes).
            chunk = max(1, self.scorer.chunk_values // self.scorer.work(1, labelled=True))
            self.score_graph.check_run({"x": x[:chunk], "y": None if y is None else y[:chunk]})
            ends, failed = raw[:CHECK_ROWS], {}
            for labels in (y[:CHECK_ROWS], None) if m.conditional else (None,):  # a CVAE's with labels and label-free
                _, relative = self.scorer.score(ends, labels).differences(self.scorer.score(ends, labels, reference=True))
                failed |= {name: diff for name, diff in relative.items() if not diff <= m.parity.score.tolerance}
            if failed:
                listed = ", ".join(f"{name} {diff:.3g}" for name, diff in failed.items())
                raise ArtifactError(f"{self.score_graph.path}: disagrees with the NumPy scorer beyond relative tolerance "
                                    f"{m.parity.score.tolerance:g} ({listed}); export it again")  # fmt: skip


def _first_line(err: Exception) -> str:
    return cut((str(err).strip().splitlines() or [type(err).__name__])[0], 200)
