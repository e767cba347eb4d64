"""The `vaeserve` command. Each area registers its own subcommands; heavy imports (torch, onnxruntime)
happen inside the command that needs them, so `vaeserve serve` never imports torch."""

import argparse
import importlib
import logging
import sys

from vaeserve import __version__
from vaeserve.errors import VaeserveError

# Modules that define `register(subparsers)`, in the order their commands are listed in --help.
COMMAND_MODULES = [
    "vaeserve.training.cli",
    "vaeserve.export.cli",
    "vaeserve.service.cli",
    "vaeserve.benchmarks.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaeserve",
        description="Train VAE/CVAE/PPCA models, export them as ONNX, serve them over gRPC.",
        epilog="example:\n  vaeserve train --out runs/digits\n  vaeserve export runs/digits --repository models --name digits\n"
        "  vaeserve serve --repository models\n  vaeserve client score --model digits runs/digits/sample_rows.csv\n\n"
        "`vaeserve COMMAND --help` says more about each.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vaeserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a module that exists but misses a dependency is a real error
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args) or 0
    except VaeserveError as err:
        print(f"vaeserve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
