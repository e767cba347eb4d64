"""What `vaeserve client` prints and writes: one record per row (a dict of named values), shown as an
aligned table, as JSON, or written to a .csv or .jsonl file; a model's summary; a progress line.

Records name what they hold: feature values and per-feature scores by feature name, latent vectors as
lists. A table shows each number with 4 decimals (scientific past 1e6 or below 1e-4), one column per
value, at most 12 and no wider than the terminal (the rest counted in a hint on stderr). A CSV has one
column per value (`x.pixel_0_0`, `mu[0]`, `top1_feature`), a JSONL file one record per line.
"""

import csv
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vaeserve.errors import ConfigError, cut

TOP = 3  # features named per row: the largest per-feature scores
MAX_COLUMNS = 12  # columns of a table, at most; --json (or --out) has them all
OUT_SUFFIXES = (".csv", ".jsonl")
SHOWN = 8  # names a summary lists before shortening


def shown(names: Sequence[str], limit: int = SHOWN) -> str:
    """Names, comma-separated, the middle left out past `limit`: "a, b, c, ..., y, z (64 in all)"."""
    names = [cut(str(name)) for name in names]
    if len(names) <= limit:
        return ", ".join(names)
    head = limit - 2
    return f"{', '.join(names[:head])}, ..., {', '.join(names[-2:])} ({len(names)} in all)"


# Records.


def _floats(values) -> list[float]:
    return np.asarray(values, np.float64).tolist()


def score_records(result, feature_names, *, top: int = TOP, per_feature: bool = False) -> list[dict]:
    """Per row: its anomaly score and p-value (when the version has them), the other scores, flags and,
    when the result has per-feature scores, its `top` features by score; with `per_feature`, every
    feature's score and support distance too."""
    columns = {"anomaly_score": result.anomaly_score, "p_value": result.p_value, "neg_elbo": result.neg_elbo,
               "reconstruction": result.reconstruction, "kl": result.kl, "knn_distance": result.knn_distance,
               "neg_iw": result.neg_iw}  # fmt: skip
    values = {name: _floats(v) for name, v in columns.items() if v is not None}
    anomaly, outside = np.asarray(result.is_anomaly).tolist(), np.asarray(result.out_of_support).tolist()
    records = [{"row": i, **{name: v[i] for name, v in values.items()}, "is_anomaly": anomaly[i], "out_of_support": outside[i]}
               for i in range(len(result.neg_elbo))]  # fmt: skip
    if result.per_feature is not None and top > 0:
        scores = np.asarray(result.per_feature, np.float64)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        best = np.take_along_axis(scores, order, axis=1).tolist()
        for record, indices, values_ in zip(records, order.tolist(), best):
            record["top_features"] = [{"feature": feature_names[j], "score": v} for j, v in zip(indices, values_)]
    if per_feature and result.per_feature is not None:
        for record, scores, distance in zip(records, _floats(result.per_feature), _floats(result.support_distance)):
            record["per_feature"] = dict(zip(feature_names, scores))
            record["support_distance"] = dict(zip(feature_names, distance))
    return records


def embed_records(result) -> list[dict]:
    """Per row: mu and logvar, and its posterior samples ([S][latent]) when drawn."""
    mu, logvar = _floats(result.mu), _floats(result.logvar)
    records = [{"row": i, "mu": m, "logvar": v} for i, (m, v) in enumerate(zip(mu, logvar))]
    if result.samples is not None:
        for record, samples in zip(records, _floats(np.swapaxes(result.samples, 0, 1))):
            record["samples"] = samples
    return records


def reconstruct_records(result, feature_names) -> list[dict]:
    """Per row: its errors and the reconstruction by feature name."""
    return [{"row": i, "neg_log_likelihood": nll, "mean_squared_error": mse, "x": dict(zip(feature_names, x))}
            for i, (nll, mse, x) in enumerate(zip(_floats(result.neg_log_likelihood), _floats(result.mean_squared_error),
                                                  _floats(result.x)))]  # fmt: skip


def sample_records(x, feature_names, z=None, labels=None) -> list[dict]:
    """Per row of decoder means x: its label (CVAE), latent point z when known, and x by feature name."""
    records = []
    for i, row in enumerate(_floats(x)):
        record = {"row": i} | ({} if not labels else {"label": labels[i]})
        if z is not None:
            record["z"] = _floats(z[i])
        records.append(record | {"x": dict(zip(feature_names, row))})
    return records


# Tables.


def number(value: float) -> str:
    """4 decimals; scientific notation past 1e6 or below 1e-4, so a column stays readable."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0 or 1e-4 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.4e}"


def _cell(value) -> tuple[str, bool]:
    """(text, right-aligned)"""
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, float):
        return number(value), True
    return str(value), False


def _table_columns(record: dict) -> dict:
    """A record as table columns: vectors one column each ([i]), values by feature name under their own
    name, top features as one column of text; per-feature scores (--json) and samples (a table of their
    own) left out."""
    columns = {}
    for key, value in record.items():
        if key == "top_features":
            columns["top features"] = ", ".join(f"{t['feature']} {number(t['score'])}" for t in value)
        elif key in ("per_feature", "support_distance", "samples"):
            continue
        elif isinstance(value, dict):
            columns.update(value)
        elif isinstance(value, list):
            columns.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        else:
            columns[key] = value
    return columns


def table(records: list[dict], width: int | None = None, max_columns: int = MAX_COLUMNS) -> tuple[list[str], int]:
    """Aligned lines of the records (a header, then one line per record): at most `max_columns` columns,
    as many as fit in `width` (default: the terminal's, unlimited when stdout is not one and COLUMNS is
    unset), and how many columns were left out."""
    rows = [_table_columns(r) for r in records]
    if not rows:
        return [], 0
    names = list(rows[0])
    width = width or shutil.get_terminal_size((sys.maxsize, 24)).columns
    cells, kept, used = {}, [], 0
    for name in names:
        if len(kept) >= max_columns:
            break
        cells[name] = [_cell(row[name]) for row in rows]
        column = max(len(name), *(len(text) for text, _ in cells[name]))
        if len(kept) >= 2 and used + column > width:
            break
        kept.append((name, column))
        used += column + 2
    right = {name: cells[name][0][1] for name, _ in kept}
    lines = ["  ".join(name.rjust(w) if right[name] else name.ljust(w) for name, w in kept).rstrip()]
    for i in range(len(rows)):
        line = "  ".join(cells[name][i][0].rjust(w) if right[name] else cells[name][i][0].ljust(w) for name, w in kept)
        lines.append(line.rstrip())
    return lines, len(names) - len(kept)


def sample_table_records(records: list[dict]) -> list[dict]:
    """Embed's posterior samples, one record per (row, sample)."""
    return [{"row": r["row"], "sample": s, "z": z} for r in records for s, z in enumerate(r.get("samples", []))]


def print_table(records: list[dict], out=None, err=None) -> None:
    out, err = out or sys.stdout, err or sys.stderr
    lines, hidden = table(records)
    for line in lines:
        print(line, file=out)
    if hidden:
        out.flush()
        print(f"... {hidden} more column{'s' if hidden > 1 else ''}; --json for all", file=err)


# Files.


def flat(record: dict) -> dict:
    """A record as CSV columns: `name.feature` for values by name, `name[i]` (`[s][i]`) for vectors,
    top{k}_feature and top{k}_score for the top features; booleans as true/false."""
    columns = {}
    for key, value in record.items():
        if key == "top_features":
            for k, t in enumerate(value, start=1):
                columns[f"top{k}_feature"], columns[f"top{k}_score"] = t["feature"], t["score"]
        elif isinstance(value, dict):
            columns.update({f"{key}.{name}": v for name, v in value.items()})
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, list):
                    columns.update({f"{key}[{i}][{j}]": w for j, w in enumerate(v)})
                else:
                    columns[f"{key}[{i}]"] = v
        elif isinstance(value, bool):
            columns[key] = "true" if value else "false"
        else:
            columns[key] = value
    return columns


def check_out(path: Path | None) -> None:
    """Refuse an --out file of another kind before any call is made."""
    if path is not None and path.suffix not in OUT_SUFFIXES:
        raise ConfigError(f"--out {path}: write a .csv or .jsonl file")


def write_records(path: Path, records: list[dict]) -> None:
    """One line per record: .csv (a header first) or .jsonl."""
    check_out(path)
    try:
        with open(path, "w", newline="") as f:
            if path.suffix == ".jsonl":
                for record in records:
                    f.write(json.dumps(record) + "\n")
                return
            writer = None
            for record in records:
                row = flat(record)
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
    except OSError as err:
        raise ConfigError(f"--out {path}: {err.strerror}") from None


def dumps(document: dict) -> str:
    """JSON as printed by --json (Infinity for an infinite score, as Python's json module reads it)."""
    return json.dumps(document)


# Models.


def models_table(models: dict[str, list[int]]) -> list[str]:
    records = [{"model": name, "versions": ", ".join(str(v) for v in versions)} for name, versions in models.items()]
    return table(records, width=10**6)[0]


def _interval(low: np.ndarray, high: np.ndarray) -> str:
    if not low.size:
        return "not recorded"
    if (low == low[0]).all() and (high == high[0]).all():
        return f"[{low[0]:g}, {high[0]:g}] for every feature"
    return f"per feature: low {low.min():g} to {low.max():g}, high {high.min():g} to {high.max():g} (--json for each)"


def model_summary(info) -> list[str]:
    """`client models --model X`: what a model is, takes and answers, one line per topic."""
    lines = [("model", f"{info.name}, version {info.version}"),
             ("kind", f"{info.kind} ({info.arch}), latent {info.latent_dim}, {info.likelihood} likelihood, "
                      f"{info.normalization} normalization")]  # fmt: skip
    images = f", images {'x'.join(str(n) for n in info.image_shape)}" if info.image_shape else ""
    lines.append(("features", f"{info.features}{images}: {shown(info.feature_names)}"))
    lines.append(("labels", f"{len(info.labels)}: {shown(info.labels)}" if info.labels else "none"))
    threshold = f"{number(info.threshold)} on {info.threshold_score}"
    c = info.calibration
    if c is not None:
        quantile = f"its {c.quantile} quantile" if c.quantile else "calibrated"
        free = ", scored label-free" if c.label_free and info.conditional else ""
        threshold += f": {quantile} over {c.rows:,} {c.calibrated_on}{free}"
    lines.append(("threshold", threshold))
    if c is not None:
        lines.append(("fp rate", _rates(c)))
    for i, (score, values) in enumerate(info.quantiles.items()):
        at = f" (K = {info.iw_samples})" if score == "neg_iw" else ""
        text = "  ".join(f"{q} {number(v)}" for q, v in values.items())
        lines.append(("quantiles" if i == 0 else "", f"{score:<9} {text}{at}"))
    lines.append(("scoring", f"{info.elbo_samples} ELBO samples per row, seed {info.seed}"))
    lines.append(("providers", "; ".join(f"{graph} {', '.join(p) or 'none'}" for graph, p in info.providers.items())))
    if info.limits is not None:
        m = info.limits
        lines.append(("limits", f"{m.max_rows:,} rows and {m.max_request_values:,} values of work per request, iw_samples "
                                f"up to {m.max_iw_samples:,}, posterior samples up to {m.max_posterior_samples:,}"))  # fmt: skip
    lines.append(("support", _interval(info.support_low, info.support_high)))
    return [f"{topic:<10} {text}".rstrip() for topic, text in lines]


def _rates(c) -> str:
    """The false-positive rates of a version's calibration: its target, what the default threshold holds,
    and the smallest rate --alpha can ask for."""
    target = f"target {c.target_false_positive_rate:g}"
    if c.smallest_false_positive_rate is None:  # calibrated on quantiles, before conformal p-values
        return f"{target}; no p-values (exported without conformal calibration): --alpha is refused"
    held = f"the default threshold holds {c.promised_false_positive_rate:.4g}"
    if not c.target_reached:
        held = f"out of reach of {c.rows:,} calibration rows: {held}, above it (export with more calibration rows)"
    return f"{target}, {held}; smallest --alpha {c.smallest_false_positive_rate:.4g} (1/(n+1), n = {c.rows:,})"


def model_dict(info) -> dict:
    """`client models --model X --json`: the same, every value in full, integers as numbers."""
    graphs = {}
    for name in info.providers:
        g = getattr(info.metadata, name)
        graphs[name] = {"file": g.file, "sha256": g.sha256, "inputs": list(g.inputs), "outputs": list(g.outputs),
                        "providers": list(g.providers)}  # fmt: skip
    c = info.calibration
    calibration = {} if c is None else {
        "quantile": c.quantile, "target_false_positive_rate": c.target_false_positive_rate, "calibration_rows": c.rows,
        "calibrated_on": c.calibrated_on, "label_free": c.label_free,
        "promised_false_positive_rate": c.promised_false_positive_rate,
        "smallest_false_positive_rate": c.smallest_false_positive_rate, "target_reached": c.target_reached}
    return {
        "name": info.name, "version": info.version, "kind": info.kind, "arch": info.arch,
        "latent_dim": info.latent_dim, "likelihood": info.likelihood, "normalization": info.normalization,
        "features": info.features, "feature_names": list(info.feature_names),
        "image_shape": None if info.image_shape is None else list(info.image_shape),
        "labels": list(info.labels), "class_prior": list(info.class_prior),
        "threshold": {"score": info.threshold_score, "default": info.threshold, **calibration},
        "quantiles": info.quantiles,
        "scoring": {"elbo_samples": info.elbo_samples, "iw_samples": info.iw_samples, "seed": info.seed},
        "graphs": graphs,
        "opset": info.metadata.opset,
        "limits": None if info.limits is None else {
            "max_rows": info.limits.max_rows, "max_request_values": info.limits.max_request_values,
            "max_iw_samples": info.limits.max_iw_samples, "max_posterior_samples": info.limits.max_posterior_samples},
        "support": {"low": info.support_low.tolist(), "high": info.support_high.tolist()},
    }  # fmt: skip


# Progress.


class Progress:
    """`progress(done, total)` for a split call: one line on stderr, rewritten at most every 0.1 s, cleared
    by close(). Silent unless stderr is a terminal, and for a call answered by one request."""

    def __init__(self, what: str, stream=None):
        self.what, self.stream = what, stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._shown, self._last = False, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or done >= total and not self._shown or now - self._last < 0.1:
            return
        self._last, self._shown = now, True
        self.stream.write(f"\r{self.what} {done:,}/{total:,} rows ({done / total:.0%})")
        self.stream.flush()

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
