"""Plots a person looks at after training, written as PNGs into <checkpoint>/plots/:

    loss_curves.png      train/validation -ELBO and KL per epoch (PPCA: its held-out fit, no epochs)
    reconstructions.png  held-out inputs beside their reconstructions (images, or feature profiles)
    samples.png          draws from the model (one row per class for a CVAE; tabular: real vs generated)
    latent_map.png       posterior means of held-out rows, coloured by label (PCA when latent > 2)
    interpolation.png    decoding along the line between two held-out inputs' posterior means

and one written by `vaeserve export`, because the anomaly thresholds are calibrated there:

    thresholds_<name>_v<version>.png   held-out rows' -ELBO (as the version scores them) against its thresholds

Images are shown in raw intensity (normalisation inverted); tabular values in normalised units.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from vaeserve import scoring  # noqa: E402
from vaeserve.scoring import decoder_mean  # noqa: E402
from vaeserve.training.checkpoint import PLOTS, Checkpoint  # noqa: E402
from vaeserve.training.evaluate import one_hot  # noqa: E402
from vaeserve.training.model import decode_params  # noqa: E402

SEED = 0


def plot_all(checkpoint: Checkpoint) -> list[Path]:
    """Every plot for the checkpoint; returns the written paths."""
    folder = checkpoint.path / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    view = _View(checkpoint)
    paths = []
    for name, draw in [
        ("loss_curves.png", _loss_curves),
        ("reconstructions.png", _reconstructions),
        ("samples.png", _samples),
        ("latent_map.png", _latent_map),
        ("interpolation.png", _interpolation),
    ]:
        fig = draw(view)
        fig.savefig(folder / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(folder / name)
    return paths


class _View:
    """The checkpoint's model and held-out rows, with helpers returning numpy in raw or normalised units."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.model = checkpoint.model.cpu().eval()
        self.dtype = next(iter(self.model.state_dict().values())).dtype
        self.config = checkpoint.model_config
        self.schema = checkpoint.data
        x_raw, self.y = checkpoint.validation_rows()
        self.x = self.schema.normalization.apply(x_raw)
        self.image = self.schema.image_shape is not None
        self.title = f"{self.config.kind.upper()} on {self.schema.name}"

    def labels(self, y) -> torch.Tensor | None:
        if not self.config.conditional:
            return None
        y = np.asarray(y)
        onehot = y if y.ndim == 2 else one_hot(y, self.config.num_classes)
        return torch.as_tensor(onehot, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, x, y=None) -> np.ndarray:
        mu, _ = self.model.encoder(torch.as_tensor(x, dtype=self.dtype), self.labels(y) if y is not None else None)
        return mu.numpy()

    @torch.no_grad()
    def decode(self, z, y=None) -> np.ndarray:
        """E[x|z] in normalised units."""
        params = decode_params(self.model, torch.as_tensor(z, dtype=self.dtype), self.labels(y) if y is not None else None)
        return decoder_mean({k: v.numpy() for k, v in params.items()}, self.config.likelihood)

    def raw(self, x) -> np.ndarray:
        return self.schema.normalization.invert(np.asarray(x, np.float32))

    def show_image(self, ax, row, vmax) -> None:
        _, h, w = self.schema.image_shape
        ax.imshow(row.reshape(h, w), cmap="gray_r", vmin=0, vmax=vmax)
        ax.set_xticks([])
        ax.set_yticks([])

    def label_name(self, c) -> str:
        return self.schema.label_names[c] if self.schema.label_names else str(c)


def _loss_curves(v: _View):
    history = v.checkpoint.metrics.get("history") or []
    fig, (ax_elbo, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        epochs = [h["epoch"] for h in history]
        ax_elbo.plot(epochs, [h["train_neg_elbo"] for h in history], label="train")
        ax_elbo.plot(epochs, [h["val_neg_elbo"] for h in history], label="validation")
        best = v.checkpoint.metrics.get("best_epoch")
        if best:
            ax_elbo.axvline(best, color="gray", linestyle=":", label=f"best epoch {best}")
        ax_kl.plot(epochs, [h["train_kl"] for h in history], label="train KL")
        ax_kl.plot(epochs, [h["val_kl"] for h in history], label="validation KL")
        ax_beta = ax_kl.twinx()
        ax_beta.plot(epochs, [h["beta"] for h in history], color="gray", linestyle="--", label="beta (warm-up)")
        ax_beta.set_ylabel("beta")
        ax_beta.legend(loc="lower right")
        # Early epochs dwarf the rest; show the range the run settled into.
        values = [h[k] for h in history for k in ("train_neg_elbo", "val_neg_elbo")]
        low, high = min(values), np.percentile(values, 90)
        ax_elbo.set_ylim(low - 0.05 * abs(high - low) - 1e-6, high + 0.05 * abs(high - low) + 1e-6)
    else:  # PPCA: closed form, no epochs; its exact log-likelihood beside the sampled ELBO estimates
        val = v.checkpoint.metrics.get("validation", {})
        train = v.checkpoint.metrics.get("train", {})
        sampled = f"({scoring.ELBO_SAMPLES} samples)"
        names = [f"train -ELBO\n{sampled}", f"val -ELBO\n{sampled}", "val -log p(x)\n(exact)"]
        values = [train.get("neg_elbo", np.nan), val.get("neg_elbo", np.nan), -val.get("exact_log_likelihood", np.nan)]
        ax_elbo.bar_label(ax_elbo.bar(names, values, color=["C0", "C1", "C2"]), fmt="%.2f")
        ax_kl.bar_label(ax_kl.bar(["train KL", "val KL"], [train.get("kl", np.nan), val.get("kl", np.nan)], color=["C0", "C1"]), fmt="%.2f")
        ax_elbo.axhline(0, color="black", linewidth=0.8)
        ax_elbo.set_title("fitted in closed form: no epochs")
    ax_elbo.set(xlabel="epoch" if history else "", ylabel="-ELBO (nats per row)")
    ax_kl.set(xlabel="epoch" if history else "", ylabel="KL(q(z|x) || p(z)) (nats)", title="KL term")
    if history:
        ax_elbo.set_title("negative ELBO")
        ax_elbo.legend()
        ax_kl.legend(loc="upper left")
    fig.suptitle(v.title)
    return fig


def _reconstructions(v: _View):
    n = min(10, len(v.x))
    x = v.x[:n]
    y = None if v.y is None else v.y[:n]
    recon = v.decode(v.encode(x, y), y)  # decoder mean at the posterior mean
    if v.image:
        raw, raw_recon = v.raw(x), v.raw(recon)
        vmax = max(raw.max(), 1e-6)
        fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.8), squeeze=False)
        for i in range(n):
            v.show_image(axes[0, i], raw[i], vmax)
            v.show_image(axes[1, i], raw_recon[i], vmax)
            if y is not None:
                axes[0, i].set_title(v.label_name(y[i]), fontsize=8)
        axes[0, 0].set_ylabel("input")
        axes[1, 0].set_ylabel("reconstruction")
    else:
        n = min(4, n)
        fig, axes = plt.subplots(n, 1, figsize=(10, 2.2 * n), squeeze=False, sharex=True)
        features = np.arange(x.shape[1])
        for i in range(n):
            ax = axes[i, 0]
            ax.plot(features, x[i], "o-", label="input", markersize=3)
            ax.plot(features, recon[i], "s--", label="reconstruction", markersize=3)
            ax.set_ylabel(f"row {i}" + ("" if y is None else f" ({v.label_name(y[i])})"))
        axes[0, 0].legend(loc="upper right")
        axes[-1, 0].set_xlabel("feature")
        if x.shape[1] <= 30:
            axes[-1, 0].set_xticks(features, v.schema.feature_names, rotation=60, fontsize=7)
        fig.text(0.0, 0.5, "normalised value", rotation=90, va="center")
    fig.suptitle(f"{v.title}: held-out inputs and reconstructions")
    return fig


def _samples(v: _View):
    rng = np.random.default_rng(SEED)
    latent = v.config.latent_dim
    if v.config.conditional:
        classes, per_class = v.config.num_classes, 10
        y = np.repeat(np.arange(classes), per_class)
        x = v.decode(rng.standard_normal((classes * per_class, latent)), y)
    else:
        classes, per_class, y = 1, 40, None
        x = v.decode(rng.standard_normal((per_class, latent)))
    if v.image:
        raw = v.raw(x)
        cols = per_class if v.config.conditional else 10
        rows = classes if v.config.conditional else per_class // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.4), squeeze=False)
        vmax = max(raw.max(), 1e-6)
        for i in range(rows * cols):
            ax = axes[i // cols, i % cols]
            v.show_image(ax, raw[i], vmax)
            if v.config.conditional and i % cols == 0:
                ax.set_ylabel(v.label_name(i // cols), rotation=0, labelpad=12)
        what = "samples, one row per class (z ~ N(0, I))" if v.config.conditional else "samples (z ~ N(0, I))"
    else:
        # Tabular: generated rows against held-out rows in the plane of their top two principal
        # components, and per-feature means +- sd of both.
        generated = v.decode(rng.standard_normal((max(200, len(v.x)), latent)), None if y is None else np.resize(y, max(200, len(v.x))))
        centre = v.x.mean(axis=0)
        _, _, vt = np.linalg.svd(v.x - centre, full_matrices=False)
        basis = vt[:2].T
        fig, (ax_pc, ax_feat) = plt.subplots(1, 2, figsize=(13, 4.5))
        real_2d, gen_2d = (v.x - centre) @ basis, (generated - centre) @ basis
        ax_pc.scatter(real_2d[:, 0], real_2d[:, 1], s=8, alpha=0.5, label="held-out rows")
        ax_pc.scatter(gen_2d[:, 0], gen_2d[:, 1], s=8, alpha=0.5, label="generated (decoder mean)")
        ax_pc.set(xlabel="PC 1", ylabel="PC 2", title="real vs generated, top principal components")
        ax_pc.legend()
        features = np.arange(v.x.shape[1])
        ax_feat.errorbar(features - 0.15, v.x.mean(0), v.x.std(0), fmt="o", label="held-out rows", markersize=3)
        ax_feat.errorbar(features + 0.15, generated.mean(0), generated.std(0), fmt="s", label="generated", markersize=3)
        ax_feat.set(xlabel="feature", ylabel="normalised value (mean +- sd)", title="per-feature distribution")
        if v.x.shape[1] <= 30:
            ax_feat.set_xticks(features, v.schema.feature_names, rotation=60, fontsize=7)
        ax_feat.legend()
        what = "samples vs held-out data"
    fig.suptitle(f"{v.title}: {what}")
    return fig


def _latent_map(v: _View):
    mu = v.encode(v.x, v.y)
    if mu.shape[1] > 2:
        centred = mu - mu.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[:2].T
        explained = (s[:2] ** 2).sum() / (s**2).sum()
        axes_label = ("PC 1 of mu", "PC 2 of mu")
        note = f"PCA of {mu.shape[1]}-d posterior means ({explained:.0%} of variance)"
    elif mu.shape[1] == 2:
        points, axes_label, note = mu, ("z_1", "z_2"), "posterior means"
    else:
        points = np.stack([mu[:, 0], np.zeros(len(mu))], axis=1)
        axes_label, note = ("z_1", ""), "posterior means (1-d)"
    fig, ax = plt.subplots(figsize=(7, 6))
    if v.y is None:
        ax.scatter(points[:, 0], points[:, 1], s=8, alpha=0.6)
    else:
        cmap = plt.get_cmap("tab10" if len(v.schema.label_names) <= 10 else "tab20")
        for c in range(len(v.schema.label_names)):
            keep = v.y == c
            ax.scatter(points[keep, 0], points[keep, 1], s=8, alpha=0.7, color=cmap(c % cmap.N), label=v.label_name(c))
        ax.legend(title="label", markerscale=2, fontsize=8, loc="best")
    ax.set(xlabel=axes_label[0], ylabel=axes_label[1])
    extra = " (given the label: a CVAE's z carries what the label does not)" if v.config.conditional else ""
    fig.suptitle(f"{v.title}: latent map of held-out rows\n{note}{extra}", fontsize=10)
    return fig


def _interpolation(v: _View, steps: int = 10):
    # Two held-out rows with different labels when there are labels, so the strip shows a change.
    a = 0
    b = 1
    if v.y is not None:
        different = np.flatnonzero(v.y != v.y[a])
        b = int(different[0]) if len(different) else 1
    ends = v.x[[a, b]]
    end_labels = None if v.y is None else v.y[[a, b]]
    t = np.linspace(0.0, 1.0, steps)[:, None]
    mu = v.encode(ends, end_labels)
    z = (1 - t) * mu[0] + t * mu[1]
    y = None
    if v.config.conditional:  # the label moves along with z, from one one-hot to the other
        onehot = one_hot(end_labels, v.config.num_classes)
        y = (1 - t) * onehot[0] + t * onehot[1]
    path = v.decode(z, y)
    if v.image:
        raw_ends, raw_path = v.raw(ends), v.raw(path)
        vmax = max(raw_ends.max(), 1e-6)
        fig, axes = plt.subplots(1, steps + 2, figsize=(1.2 * (steps + 2), 1.8))
        v.show_image(axes[0], raw_ends[0], vmax)
        axes[0].set_title("input A", fontsize=8)
        for i in range(steps):
            v.show_image(axes[i + 1], raw_path[i], vmax)
            axes[i + 1].set_title(f"t={t[i, 0]:.2f}", fontsize=7)
        v.show_image(axes[-1], raw_ends[1], vmax)
        axes[-1].set_title("input B", fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(10, 4))
        rows = np.concatenate([ends[:1], path, ends[1:]])
        limit = max(np.abs(rows).max(), 1e-6)
        image = ax.imshow(rows, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit)
        ax.set_yticks(range(steps + 2), ["input A", *[f"t={s:.2f}" for s in t[:, 0]], "input B"], fontsize=7)
        ax.set_xlabel("feature")
        if rows.shape[1] <= 30:
            ax.set_xticks(range(rows.shape[1]), v.schema.feature_names, rotation=60, fontsize=7)
        fig.colorbar(image, ax=ax, label="normalised value")
    names = "" if end_labels is None else f" ({v.label_name(end_labels[0])} -> {v.label_name(end_labels[1])})"
    fig.suptitle(f"{v.title}: interpolation between two held-out inputs{names}", fontsize=10)
    return fig


def plot_thresholds(checkpoint: Checkpoint, version) -> Path:
    """<checkpoint>/plots/thresholds_<name>_v<version>.png for an exported vaeserve.artifact.repository
    ModelVersion: the histogram of the calibration rows' anomaly score (the validation rows' for a
    checkpoint without them), scored as the service scores them (the version's graphs and scoring
    settings; a CVAE label-free, as calibrated), with a line at each calibrated quantile and the default
    threshold. Returns the path."""
    from vaeserve.artifact.runtime import Model  # ONNX Runtime: only export draws this plot

    x_raw, _ = checkpoint.calibration_rows() or checkpoint.validation_rows()
    scores = Model(version).scorer.score(np.asarray(x_raw, np.float32)).anomaly_score
    fig = _thresholds(scores, version.manifest)
    folder = checkpoint.path / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"thresholds_{version.name}_v{version.version}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _thresholds(scores: np.ndarray, manifest):
    t = manifest.thresholds
    lines = sorted(t.quantiles[t.score].items(), key=lambda kv: float(kv[0]))
    finite = scores[np.isfinite(scores)]
    low, top = float(finite.min()), max(t.default, *(v for _, v in lines))
    # A long right tail (a table's outliers) would squeeze the bulk and the lines into one bin: stop a
    # quarter of the bulk's width past the highest threshold and say how many rows lie beyond.
    high = max(min(float(finite.max()), top + 0.25 * (top - low)), top)
    fig, ax = plt.subplots(figsize=(9, 5))
    # Bins narrow enough that the bulk (5% to 95%) spans about 15 of them, however far the tail reaches.
    bulk = float(np.subtract(*np.quantile(finite, [0.95, 0.05])))
    bins = int(np.clip((high - low) / (bulk / 15), 10, 150)) if bulk > 0 else 10
    ax.hist(np.clip(finite, None, high), bins=bins, range=(low, high), color="C0", alpha=0.75,
            label=f"calibration rows ({len(scores)})")  # fmt: skip
    for (quantile, value), style in zip(lines, [":", "--", "-."]):
        ax.axvline(value, color="0.3", linestyle=style, linewidth=1.4,
                   label=f"quantile {quantile}: {value:.2f}, {np.mean(scores > value):.1%} of these rows above")  # fmt: skip
    ax.axvline(t.default, color="C3", linewidth=2.2,
               label=f"default threshold {t.default:.2f}: holds a false-positive rate of {t.promised_false_positive_rate:.2%} "
                     f"(target {t.target_false_positive_rate:.2%})")  # fmt: skip
    beyond = int(np.sum(scores > high))
    if beyond:
        ax.plot([], [], " ", label=f"{beyond} row(s) beyond {high:.1f} drawn in the last bin (max {scores.max():.1f})")
    pad = 0.04 * (high - low) + 1e-6
    ax.set_xlim(low - pad, high + pad)
    unit = "sum of standardised -ELBO and kNN distance" if t.score == "combined" else "nats per row, normalised feature space"
    ax.set(xlabel=f"{t.score.replace('neg_elbo', '-ELBO')} anomaly score ({unit})", ylabel="calibration rows")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    how = "label-free (class prior), " if t.label_free else ""
    ax.set_title(f"{t.calibration_rows} rows calibrated the thresholds; scored {how}through the exported graphs, "
                 f"{manifest.scoring.elbo_samples} ELBO samples; a row scoring above the default threshold is flagged", fontsize=8)  # fmt: skip
    fig.suptitle(f"{manifest.name} v{manifest.version} ({manifest.model.kind.upper()}): calibration rows' anomaly "
                 "score and the calibrated thresholds")  # fmt: skip
    return fig
