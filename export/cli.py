"""`vaeserve export CHECKPOINT --repository models --name NAME [--version N]`.

Only argparse at import time: torch is imported inside the command."""

import argparse
import logging

DESCRIPTION = """\
Export a checkpoint's encoder and decoder as ONNX graphs, check them against torch in ONNX Runtime
at batch 1, 7 and 256, compose and check the score graph, build and check the neighbour graph of the
combined anomaly score, calibrate conformal anomaly thresholds on the checkpoint's calibration rows, and
write REPOSITORY/NAME/VERSION/{encoder,decoder,score,neighbours}.onnx and manifest.json. Then it plots
the calibration rows' anomaly scores against those thresholds into
CHECKPOINT/plots/thresholds_NAME_vVERSION.png (the path is printed)."""

EPILOG = """\
examples:
  vaeserve export runs/digits --repository models --name digits     the next version of models/digits
  vaeserve export runs/digits --name digits --version 3 --exporter dynamo
  vaeserve export runs/digits --name digits --target-fpr 0.001     a default threshold flagging 0.1% of normal rows
A version is never overwritten: a --version that exists is refused (omit it for the next number).
Nothing is left behind by a failed export: it writes into a hidden folder and renames it at the end."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint as a validated ONNX model version",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint folder written by `vaeserve train`")
    p.add_argument("--repository", default="models", help="model repository root (default: models)")
    p.add_argument("--name", help="model name (default: the checkpoint folder's name)")
    p.add_argument("--version", type=int, help="version number (default: one above the highest existing)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |ONNX Runtime - torch| allowed (default: 1e-4)")
    p.add_argument("--elbo-samples", type=int, default=None,
                   help="posterior samples of the ELBO the version scores with (default: vaeserve.scoring.ELBO_SAMPLES, "
                   "2; more did not rank anomalies better on the anomaly benchmark)")
    p.add_argument("--target-fpr", type=float, default=None, metavar="RATE",
                   help="false-positive rate the default threshold holds on normal rows (default: 0.01); n calibration "
                   "rows reach rates down to 1/(n+1), and export warns when RATE is below that")
    p.add_argument("--neighbours", type=int, default=None, metavar="K",
                   help="nearest training rows in the combined anomaly score's distance part (default: 1); 0 exports "
                   "-ELBO alone as the default score, without the neighbour graph's work per row")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default: torchscript, the faster; both give parity ~2e-7)")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=True,
                   help="skip the thresholds plot in the checkpoint's plots/ folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vaeserve.export.exporter import export_checkpoint
    from vaeserve.training.checkpoint import load_checkpoint

    name = args.name or Path(args.checkpoint).resolve().name
    given = {"elbo_samples": args.elbo_samples, "target_false_positive_rate": args.target_fpr, "neighbours": args.neighbours}
    options = {key: value for key, value in given.items() if value is not None}
    checkpoint = load_checkpoint(args.checkpoint)
    version = export_checkpoint(checkpoint, args.repository, name, args.version,
                                tolerance=args.tolerance, exporter=args.exporter, **options)
    parity = version.manifest.parity
    worst = max(parity.max_abs_diff.values())
    graph = ("no score graph: it missed its parity, the version scores on the NumPy path" if parity.score is None
             else f"score graph max relative diff {max(parity.score.max_rel_diff.values()):.2g}")  # fmt: skip
    thresholds = version.manifest.thresholds
    print(f"exported {version.path} (parity max abs diff {worst:.2g}, {graph}, "
          f"default threshold {thresholds.score} > {thresholds.default:.2f}, flagging "
          f"{thresholds.promised_false_positive_rate:.2%} of normal rows like its {thresholds.calibration_rows} calibration rows)")
    if args.plots:
        from vaeserve.training.plots import plot_thresholds

        try:
            print(f"thresholds plot: {plot_thresholds(checkpoint, version)}")
        except OSError as err:  # a read-only checkpoint folder: the version itself is complete
            logging.getLogger(__name__).warning("thresholds plot not written: %s", err)
    return 0
