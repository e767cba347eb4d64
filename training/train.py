"""The training run: data -> defaults that fit it -> fit (gradient ELBO for VAE/CVAE, closed form for
PPCA) -> best checkpoint, metrics.json and plots.

Defaults chosen from the data (any of them can be set explicitly):
- normalisation: image rows -> minmax with one intensity range for all pixels (to [0, 1]); tables -> standardize,
  values clipped to +-10, also when they lie in [0, 1] (a Bernoulli likelihood asked for -> none on [0, 1] data,
  minmax otherwise).
  Always fitted on the training rows only.
- likelihood: PPCA -> gaussian-fixed (its noise variance is fitted in closed form); images (minmax) and
  [0, 1] data left unnormalised -> bernoulli; otherwise gaussian with a learned per-feature variance.
  Tables in [0, 1] get standardize + gaussian: on ADBench (vaeserve bench anomaly, 1 seed) Bernoulli on
  them scored AUROC 48.8 / 52.5 / 96.3 on annthyroid / thyroid / pendigits, Gaussian 96.3 / 97.6 / 99.6.
- latent size: round(sqrt(features)) clipped to [2, 32] and below the feature count
  (digits 64 -> 8, Fashion-MNIST 784 -> 28, a 9-column table -> 3).
- hidden widths (MLP): the smallest power of two >= 2 x features, clipped to [64, 512], then half of
  that (digits 64 -> (128, 64), 784 -> (512, 256), 9 -> (64, 32)). Conv: one dense layer of that width.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from vaeserve.errors import ConfigError, DataError
from vaeserve.normalization import Normalizer, Support
from vaeserve.scoring import LIKELIHOODS, MAX_REFERENCE_ROWS
from vaeserve.training import evaluate as evaluation
from vaeserve.training.checkpoint import (
    CONFIG,
    METRICS,
    PLOTS,
    SAMPLE_ROWS,
    CALIBRATION,
    REFERENCE,
    VALIDATION,
    WEIGHTS,
    DataSchema,
    load_checkpoint,
    save_checkpoint,
    save_rows,
    save_sample_rows,
    write_json,
)
from vaeserve.training.data import Dataset, load_dataset, split
from vaeserve.training.model import ARCHS, KINDS, PPCA, ModelConfig, active_units, build_model, elbo_loss
from vaeserve.training.progress import bar

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"  # optimizer, epoch, history and latest weights, for --resume
VAL_SAMPLES = 4  # posterior samples per row for the validation -ELBO that drives early stopping
TRAIN_METRIC_ROWS = 5000  # training-split metrics are computed on at most this many rows
STANDARDIZE_CLIP = 10.0  # standardised values are clipped to +-10: see fit_normalizer
RUN_FILES = (WEIGHTS, CONFIG, METRICS, VALIDATION, CALIBRATION, REFERENCE, SAMPLE_ROWS, TRAINING_STATE)  # what a run writes, besides plots/


@dataclass
class TrainConfig:
    """Settings of one training run. None means "chosen from the data" (see the module docstring);
    the checkpoint's config.json stores the resolved values, so a run is rebuilt from it alone."""

    data: str = "digits"  # 'digits' (built in), or a CSV / NPY / NPZ / IDX file or folder
    labels: str | None = None  # CSV label column or NPZ label array (NPZ: 'y' when present)
    model: str = "vae"  # vae | cvae | ppca
    arch: str | None = None  # mlp | conv (conv: image data only); default mlp
    likelihood: str | None = None  # gaussian | gaussian-fixed | bernoulli
    normalization: str | None = None  # standardize | minmax | none
    latent_dim: int | None = None
    hidden: tuple[int, ...] | None = None
    epochs: int = 200  # upper bound; early stopping usually ends the run sooner
    batch_size: int = 64
    lr: float = 2e-3  # Adam learning rate
    beta: float = 1.0  # weight of the KL term once warmed up (1 = the ELBO)
    warmup_epochs: int = 10  # KL warm-up: beta ramps linearly from 0 over these epochs
    free_bits: float = 0.0  # nats per latent unit below which KL is not penalised (0 = off)
    patience: int = 15  # stop after this many epochs without a better validation -ELBO
    val_fraction: float = 0.2  # share of rows held out for validation, early stopping and evaluation
    # share of rows held out for calibration: they neither train the model nor choose its epoch, so the
    # export's conformal thresholds hold (vaeserve.conformal); 20% of 60 rows is 12, a 1/13 false-positive floor
    calibration_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda
    eval_samples: int = 100  # K of the importance-weighted log-likelihood written to metrics.json
    plots: bool = True
    log_every: int = 10  # one log line every this many epochs (and the first and last); -v: every epoch

    def __post_init__(self):
        if self.hidden is not None:
            self.hidden = tuple(int(h) for h in self.hidden)
        checks = [
            (self.model in KINDS, f"--model must be one of {', '.join(KINDS)}, got {self.model!r}"),
            (self.arch in (None, *ARCHS), f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.likelihood in (None, *LIKELIHOODS), f"--likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}"),
            (self.normalization in (None, "standardize", "minmax", "none"), f"unknown normalisation {self.normalization!r}"),
            (self.latent_dim is None or self.latent_dim >= 1, f"--latent-dim must be at least 1, got {self.latent_dim}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.beta >= 0, f"--beta must be non-negative, got {self.beta}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be non-negative, got {self.warmup_epochs}"),
            (self.free_bits >= 0, f"--free-bits must be non-negative, got {self.free_bits}"),
            (self.patience >= 1, f"--patience must be at least 1, got {self.patience}"),
            (0 < self.val_fraction < 1, f"validation fraction must be in (0, 1), got {self.val_fraction}"),
            (0 < self.calibration_fraction < 1 and self.val_fraction + self.calibration_fraction < 1,
             f"calibration fraction must be in (0, 1) and leave training rows beside the validation fraction, "
             f"got {self.calibration_fraction}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.eval_samples >= 0, f"eval samples must be non-negative, got {self.eval_samples}"),
            (self.log_every >= 1, f"--log-every must be at least 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class TrainResult:
    out: Path
    metrics: dict
    plots: list[Path]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return device


def default_latent_dim(features: int) -> int:
    return max(1, min(32, max(2, round(math.sqrt(features))), features - 1))


def default_hidden(features: int) -> tuple[int, int]:
    width = min(512, max(64, 1 << math.ceil(math.log2(2 * features))))
    return (width, width // 2)


def resolve(config: TrainConfig, data: Dataset) -> TrainConfig:
    """Fill every None setting with the default that fits `data`; raise on combinations that cannot work."""
    features = data.x.shape[1]
    if config.model == "cvae":
        if data.y is None:
            raise ConfigError(
                f"a CVAE needs labels, and {data.name} has none: name the label column with --labels"
            )
        if len(data.label_names) < 2:
            raise DataError(
                f"{data.name}: the label column has one class ({data.label_names[0]!r}); a CVAE needs at least 2"
            )
    if config.labels is not None and not config.data.endswith((".csv", ".npz")):
        raise ConfigError(f"--labels names a CSV column or an NPZ array; {config.data} has its labels built in or none")
    arch = config.arch or "mlp"
    if arch == "conv" and data.image_shape is None:
        raise ConfigError(f"--arch conv needs image data; {data.name} is tabular (use --arch mlp)")
    likelihood = config.likelihood
    if config.model == "ppca":
        if likelihood not in (None, "gaussian-fixed"):
            raise ConfigError(f"PPCA has a fixed-variance Gaussian likelihood, not {likelihood!r}")
        if arch != "mlp" and config.arch is not None:
            raise ConfigError("PPCA is linear: --arch does not apply")
        likelihood = "gaussian-fixed"
    normalization = config.normalization
    if normalization is None:
        if data.image_shape is not None or (likelihood == "bernoulli" and not data.binary_or_unit):
            normalization = "minmax"
        elif likelihood == "bernoulli":
            normalization = "none"
        else:
            normalization = "standardize"
    if likelihood is None:
        unit = normalization == "minmax" or (normalization == "none" and data.binary_or_unit)
        likelihood = "bernoulli" if unit else "gaussian"
    if likelihood == "bernoulli" and normalization == "standardize":
        raise ConfigError("a Bernoulli likelihood needs values in [0, 1]: use minmax normalisation, not standardize")
    latent_dim = config.latent_dim or default_latent_dim(features)
    if config.model == "ppca" and latent_dim >= features:
        raise ConfigError(f"PPCA needs --latent-dim below the feature count ({features}), got {latent_dim}")
    hidden = config.hidden or default_hidden(features)
    return TrainConfig.from_dict(
        dict(asdict(config), arch=arch, likelihood=likelihood, normalization=normalization,
             latent_dim=latent_dim, hidden=hidden)
    )


def fit_normalizer(kind: str, x: np.ndarray, image: bool) -> Normalizer:
    """Normalizer.fit, except that images get one intensity range for every pixel: per-pixel minmax
    would scale a corner pixel that is rarely lit (max 3 of 255) up to full intensity."""
    if kind == "minmax" and image:
        low, high = float(x.min()), float(x.max())
        features = x.shape[1]
        return Normalizer(kind, np.full(features, low, np.float32), np.full(features, high - low if high > low else 1.0, np.float32))
    if kind == "standardize":
        # Tables carry extreme values (ADBench shuttle: z = 134 in training; mnist: z = 4e8 in test rows).
        # Unclipped, they blow up activations: the ONNX parity check failed at 0.25 and scores saturate.
        # Ten standard deviations is still far out for the model, so an anomaly stays anomalous.
        return Normalizer.fit(kind, x, clip=STANDARDIZE_CLIP)
    return Normalizer.fit(kind, x)


def fit_support(x: np.ndarray, image: bool) -> Support:
    """The raw range the model answers for: the training and validation rows, not the calibration rows,
    which must meet the support as new rows do for the calibrated rate to hold. Image pixels share one range."""
    return Support.fit(x, shared=image)


def class_prior(y: np.ndarray | None, classes: int) -> list[float] | None:
    if y is None:
        return None
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    return (counts / counts.sum()).tolist()


def _labels_tensor(y: np.ndarray | None, model_config: ModelConfig, device: str) -> torch.Tensor | None:
    if not model_config.conditional:
        return None
    return torch.as_tensor(evaluation.one_hot(y, model_config.num_classes), device=device)


def _batches(total: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(total, generator=generator)
    return [order[i : i + batch_size] for i in range(0, total, batch_size)]


def previous_run(out: Path) -> list[str]:
    """The files of an earlier run in `out` (checkpoint files and plots/), by name; [] when there are none."""
    found = [name for name in RUN_FILES if (out / name).is_file()]
    return found + ([f"{PLOTS}/"] if (out / PLOTS).is_dir() and any((out / PLOTS).glob("*.png")) else [])


def remove_previous_run(out: Path) -> None:
    """Delete an earlier run's files from `out`, so none of them (a VAE's training_state.pt under a PPCA
    run, a plot of the old model) outlives it; anything else in the folder is left alone."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if (out / PLOTS).is_dir():
        for png in (out / PLOTS).glob("*.png"):
            png.unlink()
        if not any((out / PLOTS).iterdir()):
            (out / PLOTS).rmdir()


def train(config: TrainConfig, out: str | Path, resume: bool = False) -> TrainResult:
    """Train (or, with resume, continue training) into checkpoint directory `out`; return its metrics.

    A resumed run rebuilds everything from out/config.json and out/training_state.pt; `config` then
    only contributes epochs and patience (the patience counter starts afresh), device, plots and log_every.
    A fresh run into a folder holding an earlier run replaces it (remove_previous_run) once its data
    has loaded; the CLI asks for --force first.
    """
    out = Path(out)
    started = time.monotonic()
    previous = None
    if resume:
        if not (out / TRAINING_STATE).is_file() or not (out / CONFIG).is_file():
            raise ConfigError(f"nothing to resume in {out}: {TRAINING_STATE} or {CONFIG} is missing")
        previous = load_checkpoint(out)
        if "calibration_fraction" not in previous.train:
            raise ConfigError(f"{out} was trained by an older vaeserve, before rows were held out for calibration: "
                              "resuming would split its rows differently; start it afresh (--force)")  # fmt: skip
        saved = TrainConfig.from_dict(previous.train)
        config = TrainConfig.from_dict(dict(asdict(saved), epochs=config.epochs, patience=config.patience,
                                            device=config.device, plots=config.plots, log_every=config.log_every))
    device = resolve_device(config.device)
    threads = torch.get_num_threads()
    try:
        return _train(config, out, resume, device, started, previous if resume else None)
    finally:
        torch.set_num_threads(threads)


def _train(config, out, resume, device, started, previous) -> TrainResult:
    torch.manual_seed(config.seed)
    data = load_dataset(config.data, config.labels)
    for note in data.notes:
        log.info("%s", note)
    config = resolve(config, data)
    train_idx, val_idx, cal_idx = split(data, config.val_fraction, config.seed, config.calibration_fraction)
    if len(train_idx) < 2:
        raise DataError(f"{data.name}: too few rows to train on after holding out validation and calibration rows")
    y_train = None if data.y is None else data.y[train_idx]
    y_val = None if data.y is None else data.y[val_idx]
    if resume:
        normalizer = previous.data.normalization
    else:
        normalizer = fit_normalizer(config.normalization, data.x[train_idx], data.image_shape is not None)
    schema = DataSchema(
        name=data.name,
        source=config.data,
        feature_names=data.feature_names,
        normalization=normalizer,
        image_shape=data.image_shape,
        label_names=data.label_names,
        class_prior=class_prior(y_train, len(data.label_names)) if data.y is not None else None,
        support=previous.data.support if resume else fit_support(data.x[np.sort(np.concatenate([train_idx, val_idx]))],
                                                                 data.image_shape is not None),  # fmt: skip
        label_column=config.labels if data.label_names else None,
    )
    model_config = ModelConfig(
        input_dim=data.x.shape[1],
        kind=config.model,
        arch=config.arch,
        image_shape=data.image_shape,
        latent_dim=config.latent_dim,
        hidden=config.hidden,
        num_classes=len(data.label_names) if config.model == "cvae" else 0,
        likelihood=config.likelihood,
    )
    if device == "cpu" and config.arch == "mlp":
        # Small matrices: a second intra-op thread costs more in synchronisation than it gives, and
        # under load from other processes it slows a step 10x or more (measured: 2.9 vs 45 ms).
        torch.set_num_threads(1)
    model = build_model(model_config)
    x_train, x_val = normalizer.apply(data.x[train_idx]), normalizer.apply(data.x[val_idx])
    if not resume:
        remove_previous_run(out)
    save_rows(out, VALIDATION, data.x[val_idx], y_val)
    save_rows(out, CALIBRATION, data.x[cal_idx], None if data.y is None else data.y[cal_idx])
    reference = train_idx
    if len(reference) > MAX_REFERENCE_ROWS:
        reference = np.sort(np.random.default_rng(config.seed).choice(reference, MAX_REFERENCE_ROWS, replace=False))
    save_rows(out, REFERENCE, data.x[reference])
    save_sample_rows(out, data.x[val_idx[:8]], data.feature_names)
    train_dict = asdict(config)
    log.info("training %s (%s, %s likelihood, latent %d) on %s: %d training rows, %d validation rows, "
             "%d calibration rows, %s", config.model, config.arch, config.likelihood, config.latent_dim, data.name,
             len(train_idx), len(val_idx), len(cal_idx), device)  # fmt: skip

    state = None
    if isinstance(model, PPCA):
        model.fit(x_train)
        history, fit_info = [], {"epochs_run": 0, "best_epoch": 0, "stopped_early": False}
    else:
        if model_config.likelihood == "gaussian":
            init_feature_logvar(model, x_train)
        if resume:
            state = torch.load(out / TRAINING_STATE, map_location="cpu", weights_only=False)
        with logging_redirect_tqdm():  # epoch log lines print above the progress bars, not through them
            history, fit_info = _fit(model, model_config, config, x_train, y_train, x_val, y_val, device, out,
                                     schema, train_dict, state)
        model.load_state_dict(torch.load(out / "weights.pt", map_location="cpu", weights_only=True))
    model = model.cpu().eval()

    metrics = _final_metrics(model, schema, config, data, train_idx, val_idx, history, fit_info)
    metrics |= _convergence(config, fit_info)
    for warning in metrics["warnings"]:
        log.warning("%s", warning)
    metrics["seconds"] = round(time.monotonic() - started, 2)
    save_checkpoint(out, model, schema, train_dict, metrics)
    plot_paths = []
    if config.plots:
        from vaeserve.training import plots

        plot_paths = plots.plot_all(load_checkpoint(out))
        metrics["seconds"] = round(time.monotonic() - started, 2)
        write_json(out / METRICS, metrics)
    return TrainResult(out, metrics, plot_paths)


def _convergence(config: TrainConfig, fit_info: dict) -> dict:
    """Whether the run ended before the model did: the best epoch was the last one (it hit --epochs still
    improving), or the KL warm-up had not finished (beta was still below --beta). None for PPCA."""
    epochs, best = fit_info["epochs_run"], fit_info["best_epoch"]
    if epochs == 0:  # PPCA: closed form
        return {"still_improving": None, "warmup_finished": None, "warnings": []}
    warnings = []
    still_improving = best == epochs
    if still_improving:
        warnings.append(f"the best epoch is the last one ({best}): the validation -ELBO was still improving when "
                        f"the run hit --epochs {config.epochs}; train longer (a larger --epochs, or --resume with one)")
    warmup_finished = epochs >= config.warmup_epochs
    if not warmup_finished:
        reached = config.beta * epochs / config.warmup_epochs
        warnings.append(f"KL warm-up did not finish: the run stopped after {epochs} of --warmup-epochs "
                        f"{config.warmup_epochs} (beta {reached:.2f} of {config.beta:g}), so the KL term was "
                        f"down-weighted throughout; raise --epochs{' or --patience' if fit_info['stopped_early'] else ''} "
                        "or lower --warmup-epochs")  # fmt: skip
    return {"still_improving": still_improving, "warmup_finished": warmup_finished, "warnings": warnings}


def init_feature_logvar(model, x_train: np.ndarray) -> None:
    """Start the learned per-feature log-variance at the log of each feature's training variance:
    the right value for a decoder that predicts only the mean. Starting at 0 instead (variance 1, far
    too wide on [0, 1] pixels) drowns the reconstruction term, the posterior collapses, and Adam needs
    hundreds of epochs to walk log-variances of -4 and below down at ~lr per step."""
    head = model.decoder.head
    variance = np.maximum(x_train.var(axis=0), 1e-12)
    with torch.no_grad():
        head.logvar.copy_(torch.as_tensor(np.maximum(np.log(variance), head.min_logvar), dtype=head.logvar.dtype))


def _fit(model, model_config, config, x_train, y_train, x_val, y_val, device, out, schema, train_dict, state):
    """Adam on the (warmed-up, free-bits) negative ELBO; keeps the best epoch by validation -ELBO in
    out/weights.pt and everything needed to resume in out/training_state.pt."""
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    xt = torch.as_tensor(x_train, device=device)
    xv = torch.as_tensor(x_val, device=device)
    yt = _labels_tensor(y_train, model_config, device)
    yv = _labels_tensor(y_val, model_config, device)
    generator = torch.Generator().manual_seed(config.seed)
    history, start_epoch, best, best_epoch, bad_epochs = [], 0, math.inf, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch = state["history"], state["epoch"]
        best, best_epoch = state["best_val_neg_elbo"], state["best_epoch"]
        log.info("resuming at epoch %d (best validation -ELBO %.3f at epoch %d)", start_epoch + 1, best, best_epoch)
    stopped_early = False
    epochs_bar = bar(desc="epochs", unit="epoch", initial=start_epoch, total=config.epochs)
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.monotonic()
        model.train()
        sums = {"loss": 0.0, "neg_elbo": 0.0, "reconstruction": 0.0, "kl": 0.0}
        batches = _batches(len(xt), config.batch_size, generator)
        batch_bar = bar(batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False)
        for i, idx in enumerate(batch_bar):
            # KL warm-up (Bowman et al. 2016): beta grows linearly from 0 over warmup_epochs.
            progress = (epoch + (i + 1) / len(batches)) / config.warmup_epochs if config.warmup_epochs else 1.0
            beta = config.beta * min(1.0, progress)
            idx = idx.to(device)
            terms = elbo_loss(model, xt[idx], None if yt is None else yt[idx], beta, config.free_bits)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for k in sums:
                sums[k] += terms[k].item() * len(idx)
            batch_bar.set_postfix(loss=f"{terms['loss'].item():.2f}")
        train_terms = {k: v / len(xt) for k, v in sums.items()}
        model.eval()
        with torch.no_grad():  # a few posterior samples, so early stopping follows the model, not the noise
            passes = [elbo_loss(model, xv, yv) for _ in range(VAL_SAMPLES)]
            val_terms = {k: sum(p[k].item() for p in passes) / VAL_SAMPLES for k in passes[0]}
        record = {
            "epoch": epoch + 1,
            "beta": beta,
            "train_neg_elbo": train_terms["neg_elbo"],
            "train_reconstruction": train_terms["reconstruction"],
            "train_kl": train_terms["kl"],
            "val_neg_elbo": val_terms["neg_elbo"],
            "val_reconstruction": val_terms["reconstruction"],
            "val_kl": val_terms["kl"],
            "seconds": round(time.monotonic() - epoch_start, 3),
        }
        history.append(record)
        improved = val_terms["neg_elbo"] < best
        if improved:
            best, best_epoch, bad_epochs = val_terms["neg_elbo"], epoch + 1, 0
            model.cpu()
            save_checkpoint(out, model, schema, train_dict, {"best_epoch": best_epoch, "history": history})
            model.to(device)
        else:
            bad_epochs += 1
        stopped_early = bad_epochs >= config.patience
        epochs_bar.update(1)
        epochs_bar.set_postfix(train=f"{train_terms['neg_elbo']:.2f}", val=f"{val_terms['neg_elbo']:.2f}", best=best_epoch)
        # One line every log_every epochs, and the first and last; every epoch at DEBUG (vaeserve -v train).
        shown = epoch == start_epoch or (epoch + 1) % config.log_every == 0 or stopped_early or epoch + 1 == config.epochs
        log.log(logging.INFO if shown else logging.DEBUG,
                "epoch %d/%d: train -ELBO %.3f, val -ELBO %.3f (recon %.3f, KL %.3f), beta %.2f; best %.3f at epoch %d",
                epoch + 1, config.epochs, train_terms["neg_elbo"], val_terms["neg_elbo"], val_terms["reconstruction"],
                val_terms["kl"], beta, best, best_epoch)  # fmt: skip
        torch.save(
            {
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "history": history,
                "best_val_neg_elbo": best,
                "best_epoch": best_epoch,
            },
            out / TRAINING_STATE,
        )
        if stopped_early:
            log.info("early stop at epoch %d: no better validation -ELBO for %d epochs; best epoch %d",
                     epoch + 1, config.patience, best_epoch)
            break
    epochs_bar.total = epochs_bar.n  # an early stop ends the bar at the epochs run, not at --epochs
    epochs_bar.close()
    return history, {"epochs_run": len(history), "best_epoch": best_epoch, "stopped_early": stopped_early}


def _final_metrics(model, schema, config, data, train_idx, val_idx, history, fit_info) -> dict:
    """Train and validation -ELBO, reconstruction and KL (scoring.score, 8 posterior samples), active
    units, and the K-sample importance-weighted log-likelihood on the validation rows."""
    rng = np.random.default_rng(config.seed)
    if len(train_idx) > TRAIN_METRIC_ROWS:
        train_idx = np.sort(rng.choice(train_idx, TRAIN_METRIC_ROWS, replace=False))
    y = data.y
    bound = f" and the importance-weighted bound (K={config.eval_samples})" if config.eval_samples else ""
    log.info("final metrics: -ELBO of %d training rows, -ELBO%s of %d validation rows", len(train_idx), bound, len(val_idx))
    train_eval = evaluation.evaluate(model, schema, data.x[train_idx], None if y is None else y[train_idx], 0)
    val_eval = evaluation.evaluate(model, schema, data.x[val_idx], None if y is None else y[val_idx],
                                   config.eval_samples)
    x_val = torch.as_tensor(schema.normalization.apply(data.x[val_idx]))
    y_val = _labels_tensor(None if y is None else y[val_idx], model.config, "cpu")
    with torch.no_grad():
        mu, _ = model.encoder(x_val.to(next(iter(model.state_dict().values())).dtype), y_val)
    return {
        "model": config.model,
        "data": schema.name,
        "latent_dim": model.config.latent_dim,
        "likelihood": model.config.likelihood,
        "units": "nats per row, in the normalised feature space",
        "train": {k: v for k, v in train_eval.items() if k not in ("iw_samples",)},
        "validation": val_eval,
        "active_units": active_units(mu.numpy()),
        **fit_info,
        "history": history,
    }
