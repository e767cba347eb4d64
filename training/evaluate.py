"""Held-out evaluation: the ELBO and the K-sample importance-weighted log-likelihood estimate, and for
PPCA the exact log-likelihood.

Scores come from vaeserve.scoring, the same code the service runs, through callables that wrap
the torch encoder and decoder, so the numbers here and the service's agree by construction. All values
are nats per row in the model's normalised feature space (log p of the normalised row).
"""

import copy

import numpy as np
import torch

from vaeserve import scoring
from vaeserve.training.checkpoint import Checkpoint, DataSchema
from vaeserve.training.model import PPCA
from vaeserve.training.progress import bar

DEFAULT_IW_SAMPLES = 1000
MAX_DECODE_BATCH = 16384  # rows per decoder forward pass


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[np.asarray(y, np.int64)]


def torch_callables(model: torch.nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """encode(x, y) -> (mu, logvar) and decode(z, y) -> {output name: array}, the contract of
    vaeserve.scoring, running `model` under no_grad in `dtype` on `device`."""
    names = scoring.decoder_outputs(model.config.likelihood)

    def tensor(a):
        return None if a is None else torch.as_tensor(a).to(device=device, dtype=dtype)

    def encode(x, y):
        with torch.no_grad():
            mu, logvar = model.encoder(tensor(x), tensor(y))
        return mu.cpu().numpy(), logvar.cpu().numpy()

    def decode(z, y):
        parts = []
        with torch.no_grad():
            for start in range(0, z.shape[0], MAX_DECODE_BATCH):
                stop = start + MAX_DECODE_BATCH
                out = model.decoder(tensor(z[start:stop]), tensor(None if y is None else y[start:stop]))
                parts.append([o.cpu().numpy() for o in out])
        return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}

    return encode, decode


def scorer(model: torch.nn.Module, schema: DataSchema, *, elbo_samples: int = scoring.ELBO_SAMPLES,
           seed: int = scoring.SEED, device: str = "cpu") -> scoring.Scorer:  # fmt: skip
    """The model's Scorer over raw rows, through torch: the same Score the service computes on its graphs.

    PPCA runs in float64: its exact posterior makes every importance weight equal to p(x), and
    float64 keeps the estimate within rounding of the closed form.
    """
    dtype = torch.float32
    if isinstance(model, PPCA):
        dtype, model = torch.float64, copy.deepcopy(model).double()  # leave the caller's model as it is
    model = model.to(device).eval()
    encode, decode = torch_callables(model, device, dtype)
    prior = np.asarray(schema.class_prior, np.float64) if model.config.conditional else None
    return scoring.Scorer(encode, decode, model.config.likelihood, schema.normalization, schema.support,
                          class_prior=prior, elbo_samples=elbo_samples, seed=seed)  # fmt: skip


def summarize(scores: scoring.Scores) -> dict:
    """Means over rows: -ELBO and its terms, and the importance-weighted log-likelihood with its
    standard error."""
    out = {
        "neg_elbo": float(scores.neg_elbo.mean()),
        "reconstruction": float(scores.reconstruction.mean()),
        "kl": float(scores.kl.mean()),
    }
    if scores.neg_iw is not None:
        ll = -scores.neg_iw
        out["iw_log_likelihood"] = float(ll.mean())
        out["iw_log_likelihood_stderr"] = float(ll.std(ddof=1) / np.sqrt(len(ll))) if len(ll) > 1 else 0.0
    return out


def exact_log_likelihood(model: PPCA, x: np.ndarray) -> np.ndarray:
    """log N(x | mean, W W^T + s^2 I) per row, directly from the covariance (Cholesky), float64."""
    x = np.asarray(x, np.float64)
    mean = model.decoder.mean.double().cpu().numpy()
    chol = np.linalg.cholesky(model.covariance())
    white = np.linalg.solve(chol, (x - mean).T)  # L^-1 (x - mean), [features, rows]
    log_det = 2.0 * np.log(np.diag(chol)).sum()
    return -0.5 * (x.shape[1] * scoring.LOG_2PI + log_det + (white**2).sum(axis=0))


def score_with_progress(rows: scoring.Scorer, x_raw: np.ndarray, labels: np.ndarray | None, iw_samples: int,
                        desc: str) -> scoring.Scores:  # fmt: skip
    """rows.score(x_raw, labels, iw_samples), one of the Scorer's chunks at a time under a progress bar:
    the K-sample bound of a few thousand images takes minutes. The posterior noise is shared by every
    row (vaeserve.scoring), so the scores are those of one call; support_distance is left out (summarize
    does not read it, and the chunks need not agree on having one)."""
    step = max(1, rows.chunk_values // rows.work(1, labels is not None, iw_samples))
    parts = []
    with bar(total=len(x_raw), desc=desc, unit="row", leave=False) as progress:
        for start in range(0, max(len(x_raw), 1), step):  # one call for no rows, as before
            parts.append(rows.score(x_raw[start : start + step], None if labels is None else labels[start : start + step],
                                    iw_samples))  # fmt: skip
            progress.update(len(parts[-1].neg_elbo))
    if len(parts) == 1:
        return parts[0]

    def joined(name):
        return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])

    return scoring.Scores(joined("neg_elbo"), joined("reconstruction"), joined("kl"), joined("neg_iw"), joined("per_feature"))


def evaluate(
    model: torch.nn.Module,
    schema: DataSchema,
    x_raw: np.ndarray,
    y: np.ndarray | None,
    iw_samples: int = DEFAULT_IW_SAMPLES,
    *,
    seed: int = scoring.SEED,
    device: str = "cpu",
) -> dict:
    """Held-out scores of raw rows: -ELBO, reconstruction, KL and the K-sample importance-weighted
    log-likelihood; a CVAE both given its labels and label-free (labels marginalised with the
    training class prior); PPCA also the exact log-likelihood."""
    x_raw = np.asarray(x_raw, np.float32)
    rows = scorer(model, schema, seed=seed, device=device)
    result = {"rows": int(x_raw.shape[0]), "iw_samples": iw_samples}
    what = f"scoring {len(x_raw)} rows" + (f", K={iw_samples}" if iw_samples else "")
    if model.config.conditional:
        result.update(summarize(score_with_progress(rows, x_raw, one_hot(y, model.config.num_classes), iw_samples, what)))
        result["label_free"] = summarize(score_with_progress(rows, x_raw, None, iw_samples, f"{what}, label-free"))
    else:
        result.update(summarize(score_with_progress(rows, x_raw, None, iw_samples, what)))
    if isinstance(model, PPCA):
        result["exact_log_likelihood"] = float(exact_log_likelihood(model, schema.normalization.apply(x_raw)).mean())
    return result


def evaluate_checkpoint(checkpoint: Checkpoint, iw_samples: int = DEFAULT_IW_SAMPLES, device: str = "cpu") -> dict:
    """evaluate() on the checkpoint's held-out validation rows."""
    x_raw, y = checkpoint.validation_rows()
    return evaluate(checkpoint.model, checkpoint.data, x_raw, y, iw_samples, device=device)
