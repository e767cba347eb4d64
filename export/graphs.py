"""The two graphs of a model version: what they are (description) and how they are made (mechanism).

    encoder.onnx   x [N, features] (, y [N, classes])  ->  mu, logvar [N, latent]
    decoder.onnx   z [N, latent]   (, y [N, classes])  ->  scoring.decoder_outputs(likelihood), each [N, features]

The contract itself is vaeserve.artifact.manifest.graph_contract, which the loader checks too. Rows are normalised and flattened; normalisation is not in the graphs but in the manifest, applied by
the service (vaeserve.normalization.Normalizer). Every tensor is float32 with a dynamic batch axis.
Checking the graphs against torch lives in validate.py.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from vaeserve.artifact.manifest import TensorInfo, graph_contract
from vaeserve.errors import ConfigError
from vaeserve.training.model import ModelConfig

# Opset 18: the dynamo exporter emits it natively (down-converting to 17 fails on Split), and the
# torchscript exporter supports it too; onnxruntime 1.31 runs it.
OPSET = 18
# torchscript: the legacy tracer, ~0.15 s a graph here; dynamo: torch.export based, ~3 s a graph.
# Both give parity ~2e-7 against eager; torchscript is the default for export speed.
EXPORTERS = ("torchscript", "dynamo")
BATCH = "batch"


@dataclass(frozen=True)
class GraphSpec:
    name: str  # encoder | decoder
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def describe(config: ModelConfig) -> tuple[GraphSpec, GraphSpec]:
    """The encoder's and decoder's named inputs and outputs for a model config."""
    classes = config.num_classes if config.conditional else 0
    contract = graph_contract(config.input_dim, config.latent_dim, config.likelihood, classes)
    return GraphSpec("encoder", *contract["encoder"]), GraphSpec("decoder", *contract["decoder"])


def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path, exporter: str = "torchscript", opset: int = OPSET) -> None:
    """Write `module` (model.encoder or model.decoder) as ONNX at `path` and run onnx.checker on it."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    module.eval()
    # Batch 2, not 1: a tracer may specialise a size-1 axis into a constant.
    example = tuple(torch.zeros(2, t.width) for t in spec.inputs)
    common = dict(input_names=spec.input_names, output_names=spec.output_names, opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, once per graph
        if exporter == "torchscript":
            axes = {name: {0: BATCH} for name in spec.input_names + spec.output_names}
            torch.onnx.export(module, example, str(path), dynamo=False, dynamic_axes=axes, **common)
        else:
            batch = torch.export.Dim(BATCH)
            shapes = tuple({0: batch} for _ in spec.inputs)
            torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=shapes,
                              external_data=False, verbose=False, **common)
    onnx.checker.check_model(str(path), full_check=True)
