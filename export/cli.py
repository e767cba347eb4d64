"""`vaeserve export CHECKPOINT --repository models --name NAME [--version N]`.

Only argparse at import time: torch is imported inside the command."""

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint as a validated ONNX model version",
        description="Export a checkpoint's encoder and decoder as ONNX graphs, check them against torch in "
        "ONNX Runtime at batch 1, 7 and 256, calibrate anomaly thresholds on its held-out rows, and write "
        "REPOSITORY/NAME/VERSION/{encoder.onnx, decoder.onnx, manifest.json}.",
    )
    p.add_argument("checkpoint", help="checkpoint folder written by `vaeserve train`")
    p.add_argument("--repository", default="models", help="model repository root (default: models)")
    p.add_argument("--name", help="model name (default: the checkpoint folder's name)")
    p.add_argument("--version", type=int, help="version number (default: one above the highest existing)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |ONNX Runtime - torch| allowed (default: 1e-4)")
    p.add_argument("--elbo-samples", type=int, default=None,
                   help="posterior samples of the ELBO the version scores with (default: vaeserve.scoring.ELBO_SAMPLES, "
                   "2; more did not rank anomalies better on the anomaly benchmark)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default: torchscript, the faster; both give parity ~2e-7)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vaeserve.export.exporter import export_checkpoint

    name = args.name or Path(args.checkpoint).resolve().name
    options = {} if args.elbo_samples is None else {"elbo_samples": args.elbo_samples}
    version = export_checkpoint(args.checkpoint, args.repository, name, args.version,
                                tolerance=args.tolerance, exporter=args.exporter, **options)
    parity = version.manifest.parity
    worst = max(parity.max_abs_diff.values())
    graph = ("no score graph: it missed its parity, the version scores on the NumPy path" if parity.score is None
             else f"score graph max relative diff {max(parity.score.max_rel_diff.values()):.2g}")  # fmt: skip
    thresholds = version.manifest.thresholds
    print(f"exported {version.path} (parity max abs diff {worst:.2g}, {graph}, "
          f"default threshold {thresholds.score} > {thresholds.default:.2f})")
    return 0
