"""`vaeserve bench ...`: every benchmark's flags, in one place; each command is its module's run(args)."""

import argparse
import importlib
import os
from pathlib import Path


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (not tests)", description=importlib.import_module(__package__).__doc__,
                                  epilog="example:\n  vaeserve bench serve --repository models --model digits",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    def command(name: str, module: str, help: str, example: str, repository: bool = True) -> argparse.ArgumentParser:
        """A `vaeserve bench NAME` parser: described by its module's docstring, run by its module's run(args)."""
        code = importlib.import_module(f"vaeserve.benchmarks.{module}")
        p = commands.add_parser(name, help=help, description=code.__doc__, epilog=f"example:\n  {example}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.set_defaults(func=code.run)
        if repository:
            p.add_argument("--repository", type=Path, default=Path(os.environ.get("VAESERVE_REPOSITORY", "models")),
                           help="model repository (default $VAESERVE_REPOSITORY or models)")  # fmt: skip
        return p

    serve = command("serve", "serving", "gRPC service throughput and latency on loopback",
                    "vaeserve bench serve --repository models --model digits --seconds 3 --rounds 5")
    serve.add_argument("--model", help="model to load (default: the first in the repository)")
    serve.add_argument("--seconds", type=float, default=2.0, help="measured seconds per point (default 2)")
    serve.add_argument("--rounds", type=int, default=3,
                       help="alternating echo / Score rounds per single-row point, batching on (default 3)")
    serve.add_argument("--callers", default="1,8,64", help="concurrent callers for single-row Score")
    serve.add_argument("--max-queue-delay-ms", type=float, default=None,
                       help="the server setting for batching on (default: the server's default)")
    serve.add_argument("--json", action="store_true", help="also print the results as JSON")

    anomaly = command("anomaly", "anomaly", "anomaly-detection AUROC/AUPRC on ADBench-style data through the exported "
                      "graphs, vs IsolationForest and PCA", "vaeserve bench anomaly --seeds 5 --out runs/bench-anomaly",
                      repository=False)  # fmt: skip
    anomaly.add_argument("--datasets", help="comma-separated .npz files with X and y (1 = anomaly); default: the "
                         "15-dataset ADBench set from --adbench")
    anomaly.add_argument("--adbench", default=None, help="folder of the default datasets (default $VAESERVE_ADBENCH "
                         "or ../shared/datasets/adbench)")
    anomaly.add_argument("--seeds", type=int, default=5, help="seeds (splits and training) per dataset (default 5)")
    anomaly.add_argument("--out", type=Path, default=Path("runs/bench-anomaly"), help="output folder")
    anomaly.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: up to 2)")
    anomaly.add_argument("--max-train-rows", type=int, default=None,
                         help="vaeserve trains on at most this many rows, subsampled (default 4000)")
    anomaly.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                         help="a `vaeserve train` setting for every dataset (experiments; the benchmark uses the defaults)")
    anomaly.add_argument("--export-option", action="append", default=[], metavar="KEY=VALUE",
                         help="an export_checkpoint option for every dataset, e.g. elbo_samples=1 (experiments)")

    extremes = command("extremes", "extremes", "rows with one feature far outside the training range: flagged, never NaN?",
                       "vaeserve bench extremes --model digits --rows runs/digits/validation.npz --base-rows 32")
    extremes.add_argument("--model", help="comma-separated models (default: every model in the repository)")
    extremes.add_argument("--rows", type=Path, help="CSV, NPY or NPZ of real raw rows to perturb (default: uniform in the support)")
    extremes.add_argument("--base-rows", type=int, default=16, help="rows to perturb, each feature in turn (default 16)")

    fuzz = command("fuzz", "fuzz", "mutated requests against every RPC: no INTERNAL or UNKNOWN, server still up",
                   "vaeserve bench fuzz --requests 10000 --seed 1")
    fuzz.add_argument("--requests", type=int, default=10_000, help="mutated requests to send (default 10000)")
    fuzz.add_argument("--seconds", type=float, default=600.0, help="stop sending after this long (default 600)")
    fuzz.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    fuzz.add_argument("--out", type=Path, default=Path("runs/bench-fuzz"), help="folder for the server's log")

    memory = command("memory", "memory", "server memory under the largest requests the defaults accept",
                     "vaeserve bench memory --repository models")
    memory.add_argument("--burst", type=int, default=4, help="concurrent copies of each largest request (default 4)")
    memory.add_argument("--pause", type=float, default=3.0, help="idle seconds before reading memory again (default 3)")
    memory.add_argument("--out", type=Path, default=Path("runs/bench-memory"), help="folder for the server's log")

    drain = command("drain", "drain", "SIGTERM under single-row load: calls already sent finish, NOT_SERVING first",
                    "vaeserve bench drain --callers 64 --notice 2")
    drain.add_argument("--model", help="model to load (default: the first in the repository)")
    drain.add_argument("--callers", type=int, default=64, help="concurrent callers (default 64)")
    drain.add_argument("--before", type=float, default=2.0, help="seconds of load before SIGTERM (default 2)")
    drain.add_argument("--notice", type=float, default=2.0, help="the server's drain_notice_seconds (default 2)")
    drain.add_argument("--seconds", type=float, default=30.0, help="callers stop after this long at most (default 30)")
    drain.add_argument("--out", type=Path, default=Path("runs/bench-drain"), help="folder for the server's log")
    drain.add_argument("--json", action="store_true", help="also print the results as JSON")

    overload = command("overload", "overload", "open-loop Score above capacity: RESOURCE_EXHAUSTED, not CANCELLED",
                       "vaeserve bench overload --rows 256 --factor 3 --seconds 30")
    overload.add_argument("--model", help="model to load (default: the first in the repository)")
    overload.add_argument("--rows", type=int, default=64, help="rows per Score (default 64)")
    overload.add_argument("--callers", type=int, default=16, help="closed-loop callers measuring capacity (default 16)")
    overload.add_argument("--factor", type=float, default=3.0, help="offered load, times capacity (default 3)")
    overload.add_argument("--seconds", type=float, default=30.0, help="seconds of overload (default 30)")
    overload.add_argument("--deadline", type=float, default=1.0, help="each call's deadline in seconds (default 1)")
    overload.add_argument("--max-outstanding", type=int, default=20_000, help="calls in flight at most (default 20000)")
    overload.add_argument("--max-batch-size", type=int, default=256, help="the server's max_batch_size (default 256)")
    overload.add_argument("--out", type=Path, default=Path("runs/bench-overload"), help="folder for the server's log")
    overload.add_argument("--json", action="store_true", help="also print the results as JSON")

    reload = command("reload", "reload", "new versions while serving: failed calls, time to be served, memory over cycles",
                     "vaeserve bench reload --poll 2")
    reload.add_argument("--model", help="model to copy versions of (default: the first in the repository)")
    reload.add_argument("--callers", type=int, default=64, help="concurrent single-row Score callers (default 64)")
    reload.add_argument("--seconds", type=float, default=10.0, help="seconds of swaps under load (default 10)")
    reload.add_argument("--cycles", type=int, default=50, help="add/remove cycles of the memory phase (default 50)")
    reload.add_argument("--poll", type=float, default=0.5, help="the server's repository_poll_seconds (default 0.5)")
    reload.add_argument("--out", type=Path, default=Path("runs/bench-reload"), help="folder for the server's log")

    fashion = command("fashion-mnist", "fashion_mnist", "conv VAE on Fashion-MNIST: test -ELBO and K-sample bound (minutes)",
                      "vaeserve bench fashion-mnist --epochs 5 --iw-rows 1000", repository=False)  # fmt: skip
    fashion.add_argument("--data", help="folder with the Fashion-MNIST IDX files (default ../shared/datasets/fashion-mnist)")
    fashion.add_argument("--out", default="runs/fashion-mnist", help="checkpoint directory")
    fashion.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    fashion.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    fashion.add_argument("--latent-dim", type=int, default=16, help="latent dimensions (default 16)")
    fashion.add_argument("--k", type=int, default=1000, help="importance samples per test image")
    fashion.add_argument("--iw-rows", type=int, default=500, help="test images given the K-sample bound (10000 = all)")
    fashion.add_argument("--device", default="auto", help="torch device for training: auto, cpu or cuda (default auto)")
