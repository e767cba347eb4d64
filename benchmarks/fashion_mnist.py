"""`vaeserve bench fashion-mnist` (not CI): convolutional VAE, Bernoulli likelihood on [0, 1] intensities.

Trains with the product's own training run (`vaeserve.training.train`) on the 60000 training images
(a validation share held out for early stopping), then reports on the t10k test images:
the test -ELBO (8 posterior samples), the K-sample importance-weighted bound (K = 1000 by default),
and seconds per training epoch. Values are nats per image, on intensities scaled to [0, 1].

    vaeserve bench fashion-mnist --epochs 3 --iw-rows 500 --out runs/fashion-mnist

--iw-rows bounds how many test images get the K = 1000 bound (each costs K decoder passes); the
ELBO is always over all 10000.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np

DATA_CANDIDATES = [
    Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "fashion-mnist",
    Path("/work/shared/datasets/fashion-mnist"),
]


def find_data(explicit: str | None) -> Path:
    from vaeserve.errors import DataError

    for path in [Path(explicit)] if explicit else DATA_CANDIDATES:
        if (path / "train-images-idx3-ubyte.gz").is_file():
            return path.resolve()
    raise DataError("fashion-mnist not found: pass --data DIR holding train-images-idx3-ubyte.gz")


def run(args) -> int:
    import torch

    from vaeserve.training.data import load_dataset
    from vaeserve.training.evaluate import evaluate
    from vaeserve.training.train import TrainConfig, train

    data = find_data(args.data)
    config = TrainConfig(
        data=str(data / "train-images-idx3-ubyte.gz"),
        arch="conv",
        likelihood="bernoulli",
        latent_dim=args.latent_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup_epochs=1,
        val_fraction=1 / 12,  # 55000 train / 5000 validation
        device=args.device,
        eval_samples=0,  # the benchmark's own K = 1000 evaluation below is on the test set
    )
    started = time.monotonic()
    result = train(config, args.out)
    train_seconds = time.monotonic() - started
    history = result.metrics["history"]
    seconds_per_epoch = float(np.mean([h["seconds"] for h in history]))

    from vaeserve.training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.out)
    scale = checkpoint.data.normalization.scale
    test = load_dataset(str(data / "t10k-images-idx3-ubyte.gz"))
    assert test.x.shape == (10000, 784), test.x.shape
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    t = time.monotonic()
    elbo = evaluate(checkpoint.model, checkpoint.data, test.x, test.y, 0, device=device)
    elbo_seconds = time.monotonic() - t
    t = time.monotonic()
    rows = min(args.iw_rows, len(test.x))
    iw = evaluate(checkpoint.model, checkpoint.data, test.x[:rows], None, args.k, device=device)
    iw_seconds = time.monotonic() - t

    report = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "epochs": len(history),
        "seconds_per_epoch": round(seconds_per_epoch, 1),
        "train_seconds_total": round(train_seconds, 1),
        "normalisation": f"intensity x / {float(scale[0]):g} (shift {float(checkpoint.data.normalization.shift[0]):g}), fitted on training images",
        "test_rows": int(elbo["rows"]),
        "test_neg_elbo": round(elbo["neg_elbo"], 2),
        "test_reconstruction": round(elbo["reconstruction"], 2),
        "test_kl": round(elbo["kl"], 2),
        "test_elbo_seconds": round(elbo_seconds, 1),
        "iw_rows": int(iw["rows"]),
        "iw_k": args.k,
        "test_iw_log_likelihood": round(iw["iw_log_likelihood"], 2),
        "test_iw_log_likelihood_stderr": round(iw["iw_log_likelihood_stderr"], 2),
        "test_neg_elbo_same_rows": round(iw["neg_elbo"], 2),
        "iw_seconds": round(iw_seconds, 1),
        "validation_neg_elbo_per_epoch": [round(h["val_neg_elbo"], 2) for h in history],
    }
    (Path(args.out) / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0
