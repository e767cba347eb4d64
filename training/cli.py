"""`vaeserve train` and `vaeserve evaluate`. Only argparse at module level: torch is imported inside
the commands, so other subcommands never pay for it."""

import argparse

# Flag -> (TrainConfig field, type, help). Defaults live in TrainConfig (training/train.py), in one place;
# a flag left out keeps that default (or, with --resume, the checkpoint's value).
TRAIN_FLAGS = [
    ("--data", "data", str, "'digits' (built-in scikit-learn digits, the default) or a CSV, NPY, NPZ or IDX file/folder"),
    ("--model", "model", str, "vae (default), cvae (label-conditioned) or ppca (closed-form probabilistic PCA)"),
    ("--labels", "labels", str, "label column (CSV) or array name (NPZ; default 'y' when present); needed for a CVAE"),
    ("--arch", "arch", str, "encoder/decoder: mlp (default) or conv (image data, height and width divisible by 4)"),
    ("--likelihood", "likelihood", str, "gaussian (learned per-feature variance), gaussian-fixed or bernoulli; "
     "default: bernoulli for images and [0,1] data, gaussian otherwise, gaussian-fixed for PPCA"),
    ("--latent-dim", "latent_dim", int, "latent size; default round(sqrt(features)) clipped to [2, 32]"),
    ("--epochs", "epochs", int, "maximum epochs (default 200; early stopping usually ends sooner)"),
    ("--batch-size", "batch_size", int, "rows per gradient step (default 64)"),
    ("--lr", "lr", float, "Adam learning rate (default 2e-3)"),
    ("--beta", "beta", float, "KL weight after warm-up (default 1.0: the ELBO)"),
    ("--warmup-epochs", "warmup_epochs", int, "epochs over which beta ramps from 0 to --beta (default 10; 0 = off)"),
    ("--free-bits", "free_bits", float, "nats per latent unit not penalised, against posterior collapse (default 0)"),
    ("--patience", "patience", int, "stop after this many epochs without a better validation -ELBO (default 15)"),
    ("--seed", "seed", int, "seed of the split, initialisation and batches (default 0)"),
    ("--device", "device", str, "auto (CUDA when present, the default), cpu or cuda"),
    ("--eval-samples", "eval_samples", int, "K of the importance-weighted log-likelihood in metrics.json (default 100)"),
    ("--log-every", "log_every", int, "log one line every N epochs, and the first and last (default 10; "
     "`vaeserve -v train`: every epoch)"),
]

CHOICES = {  # the same lists as training.model.KINDS / ARCHS and scoring.LIKELIHOODS (kept torch-free here)
    "model": ("vae", "cvae", "ppca"),
    "arch": ("mlp", "conv"),
    "likelihood": ("gaussian", "gaussian-fixed", "bernoulli"),
}


TRAIN_DESCRIPTION = """\
Train a VAE, CVAE or PPCA model into the checkpoint folder --out: weights.pt, config.json,
metrics.json, validation.npz (the held-out rows), sample_rows.csv, training_state.pt (for --resume)
and plots/*.png. `vaeserve export` later adds plots/thresholds_<name>_v<version>.png: the held-out
rows' -ELBO against the anomaly thresholds it calibrated."""

TRAIN_EPILOG = """\
examples:
  vaeserve train --out runs/digits                       the built-in digits, default VAE
  vaeserve train --data rows.csv --labels kind --model cvae --out runs/rows
  vaeserve train --out runs/digits --force --quiet       train again into the same folder, summary only
  vaeserve train --resume runs/digits --epochs 400       continue a run that hit --epochs

CSV files: the first line is the header, unless it reads as data (every field of it above a number
  in the second line is a number: a text label column may be text in both). Then the file has no
  header, every line is a row, the columns are named x0..x{n-1} (--labels x9 names the tenth) and
  the log says so. A first line of exactly 0..n-1 or 1..n is a header of column numbers.
output: a line every --log-every epochs, a progress bar when stderr is a terminal, then the
  summary on stdout. A warning when the best epoch is the last one (the run hit --epochs still
  improving) or the KL warm-up did not finish; metrics.json records both (still_improving,
  warmup_finished, warnings). --quiet: warnings and the summary only.
An --out folder holding an earlier run is refused unless --force is given; with --force that
  run's files and plots are deleted first (once the data has loaded), other files are kept."""

EVALUATE_DESCRIPTION = """\
Score the checkpoint's held-out validation rows (validation.npz): -ELBO with its reconstruction and
KL terms, and the K-sample importance-weighted bound on log p(x) (a CVAE's also label-free, PPCA's
also the exact log p(x)), in nats per row of the normalised features. The result goes to stdout and
into the checkpoint's metrics.json under 'evaluation'."""

EVALUATE_EPILOG = """\
example:
  vaeserve evaluate runs/digits --k 1000
A progress bar over the rows shows while it runs when stderr is a terminal (K=1000 on a few
thousand images takes minutes on a CPU)."""


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a VAE, CVAE or PPCA model into a checkpoint directory",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--out", default=None, help="checkpoint directory (default runs/<data>-<model>; with --resume, that directory)")
    for flag, dest, kind, text in TRAIN_FLAGS:
        train.add_argument(flag, dest=dest, type=kind, default=None, help=text, choices=CHOICES.get(dest))
    train.add_argument("--resume", metavar="CHECKPOINT", default=None,
                       help="continue the run in this checkpoint directory (its settings are kept; --epochs, --patience, "
                       "--device, --log-every and --no-plots may change)")
    train.add_argument("--force", action="store_true",
                       help="replace an earlier run in --out (its checkpoint files and plots are deleted first)")
    train.add_argument("--quiet", action="store_true", help="no epoch lines or progress bars: warnings and the summary only")
    train.add_argument("--no-plots", dest="plots", action="store_false", default=True, help="skip writing plots")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="importance-weighted log-likelihood and ELBO of a checkpoint on its held-out rows",
        description=EVALUATE_DESCRIPTION,
        epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("checkpoint", help="checkpoint directory written by `vaeserve train`")
    evaluate.add_argument("--k", type=int, default=1000, help="importance samples per row (default 1000)")
    evaluate.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    evaluate.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from vaeserve.errors import ConfigError
    from vaeserve.training.progress import LOGGER
    from vaeserve.training.train import TrainConfig, previous_run, train

    settings = {dest: getattr(args, dest) for _, dest, _, _ in TRAIN_FLAGS if getattr(args, dest) is not None}
    settings["plots"] = args.plots
    config = TrainConfig.from_dict(settings)
    if args.resume:
        out = Path(args.out or args.resume)
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ConfigError("--resume continues in its own directory; leave out --out or give the same path")
        if args.force:
            raise ConfigError("--force starts the run in --out afresh and --resume continues it: give one of them")
    else:
        out = Path(args.out or f"runs/{Path(config.data).stem}-{config.model}")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a folder")
        found = previous_run(out)
        if found and not args.force:
            raise ConfigError(f"{out} holds an earlier run ({', '.join(found)}); pass --force to replace it, "
                              "or give another --out")  # fmt: skip
    training_log = logging.getLogger(LOGGER)
    level = training_log.level
    if args.quiet:
        training_log.setLevel(logging.WARNING)  # also turns the progress bars off (training.progress)
    try:
        result = train(config, out, resume=bool(args.resume))
    finally:
        training_log.setLevel(level)
    m = result.metrics
    val = m["validation"]
    print(f"checkpoint: {result.out}")
    if result.plots:
        print(f"plots:      {result.plots[0].parent}/ ({', '.join(p.name for p in result.plots)})")
    print(f"model:      {m['model']} on {m['data']}, latent {m['latent_dim']}, {m['likelihood']} likelihood, "
          f"{m['active_units']} active units")
    if m["epochs_run"]:
        ending = ", stopped early" if m["stopped_early"] else (", the last: still improving" if m["still_improving"] else "")
        print(f"epochs:     {m['epochs_run']} (best {m['best_epoch']}{ending})")
    print(f"train:      -ELBO {m['train']['neg_elbo']:.3f} (reconstruction {m['train']['reconstruction']:.3f}, KL {m['train']['kl']:.3f})")
    print(f"validation: -ELBO {val['neg_elbo']:.3f} (reconstruction {val['reconstruction']:.3f}, KL {val['kl']:.3f})")
    _print_log_likelihood(val)
    print(f"seconds:    {m['seconds']:.1f}")
    return 0


def _print_log_likelihood(result: dict) -> None:
    if "iw_log_likelihood" in result:
        print(f"validation: log p(x) >= {result['iw_log_likelihood']:.3f} +- {result['iw_log_likelihood_stderr']:.3f} "
              f"(importance-weighted, K={result['iw_samples']}, nats per row, normalised units)")
    if "label_free" in result and "iw_log_likelihood" in result["label_free"]:
        print(f"validation: label-free log p(x) >= {result['label_free']['iw_log_likelihood']:.3f} (labels marginalised with the training prior)")
    if "exact_log_likelihood" in result:
        print(f"validation: exact log p(x) = {result['exact_log_likelihood']:.3f} (PPCA closed form)")


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vaeserve.errors import ConfigError
    from vaeserve.training.checkpoint import METRICS, load_checkpoint, write_json
    from vaeserve.training.evaluate import evaluate_checkpoint
    from vaeserve.training.train import resolve_device

    if args.k < 1:
        raise ConfigError(f"--k must be at least 1, got {args.k}")
    checkpoint = load_checkpoint(Path(args.checkpoint))
    result = evaluate_checkpoint(checkpoint, args.k, device=resolve_device(args.device))
    print(f"checkpoint: {checkpoint.path} ({result['rows']} held-out rows)")
    print(f"-ELBO {result['neg_elbo']:.3f} (reconstruction {result['reconstruction']:.3f}, KL {result['kl']:.3f})")
    _print_log_likelihood(result)
    write_json(checkpoint.path / METRICS, dict(checkpoint.metrics, evaluation=result))
    print(f"written to {checkpoint.path / METRICS} under 'evaluation'")
    return 0
