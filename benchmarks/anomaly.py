"""`vaeserve bench anomaly`: anomaly detection on ADBench-style data through the served path.

For each dataset (X, y with y = 1 anomaly) and seed: a random 60% of the normal rows is the training
set, the other normals plus every anomaly the test set. vaeserve trains on the training set with
`vaeserve train`'s own defaults (no per-dataset settings), exports through the real exporter into a
temporary model repository, and scores the test rows through the exported ONNX graphs with
vaeserve.scoring, the calls the service makes (manifest normaliser, sample count and seed). Same
split, same run: scikit-learn IsolationForest (100 trees, seeded), PCA reconstruction error
(standardised features, the components that explain PCA_VARIANCE of the training variance), kNN (the
distance to the KNN_K-th nearest training normal, features standardised on the training normals) and
ECOD (empirical-CDF tail probabilities per feature, Li et al. 2022, fitted on the training normals).

Training rows above MAX_TRAIN_ROWS are subsampled (seeded) for vaeserve only, so a run of the
15 default datasets x 5 seeds fits in 30 minutes on 2 cores; the baselines see every training row.
The threshold check takes the manifest's default threshold, calibrated at export on the checkpoint's
calibration rows (a share of the training normals that neither trained the model nor chose its epoch),
and measures the false-positive rate on the test normals against the rate the manifest promises; the
test normals' conformal p-values are checked for uniformity (Kolmogorov-Smirnov).
"""

import csv
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATASETS = (
    "2_annthyroid", "4_breastw", "6_cardio", "38_thyroid", "30_satellite", "32_shuttle", "40_vowels",
    "42_WBC", "23_mammography", "26_optdigits", "28_pendigits", "31_satimage-2", "35_SpamBase", "44_Wilt",
    "24_mnist",
)  # fmt: skip
DATASETS_ENV = "VAESERVE_ADBENCH"  # folder of the default datasets; default ../shared/datasets/adbench
DEFAULT_FOLDER = Path("..") / "shared" / "datasets" / "adbench"
TRAIN_FRACTION = 0.6  # of the normal rows
MAX_TRAIN_ROWS = 4000  # vaeserve's training rows are subsampled above this (time budget)
PCA_VARIANCE = 0.9  # PCA baseline keeps the components explaining this share of the variance
IFOREST_TREES = 100
KNN_K = 5
SCORES = ("neg_elbo", "neg_iw", "reconstruction", "knn")  # besides the default score: its parts and alternatives
KS_MIN_CALIBRATION_ROWS = 200  # sets whose p-values' uniformity is judged (smaller n: p-values on a coarse grid)


@dataclass
class Split:
    train: np.ndarray  # row indices of training normals
    test: np.ndarray  # row indices of test rows (other normals + all anomalies)


def split_rows(y: np.ndarray, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(y == 0)
    order = rng.permutation(normal)
    n_train = int(round(TRAIN_FRACTION * len(normal)))
    train = np.sort(order[:n_train])
    test = np.sort(np.concatenate([order[n_train:], np.flatnonzero(y != 0)]))
    return Split(train, test)


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return f["X"].astype(np.float32).reshape(len(f["X"]), -1), (f["y"] != 0).astype(np.int64)


def metrics(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """AUROC and AUPRC; +inf scores (a numerical breakdown) rank above every finite one."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    finite = np.isfinite(score)
    if not finite.all():
        score = np.where(finite, score, (score[finite].max() if finite.any() else 0.0) + 1.0)
    return float(roc_auc_score(y, score)), float(average_precision_score(y, score))


def iforest_scores(x_train, x_test, seed: int) -> np.ndarray:
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=IFOREST_TREES, random_state=seed, n_jobs=1).fit(x_train)
    return -forest.score_samples(x_test)  # higher = more anomalous


def pca_scores(x_train, x_test, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    a, b = scaler.transform(x_train), scaler.transform(x_test)
    pca = PCA(n_components=PCA_VARIANCE, svd_solver="full", random_state=seed).fit(a)
    return np.sum((b - pca.inverse_transform(pca.transform(b))) ** 2, axis=1)


def knn_scores(x_train, x_test, seed: int) -> np.ndarray:
    """Distance to the KNN_K-th nearest training normal, on features standardised on the training normals."""
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    neighbours = NearestNeighbors(n_neighbors=KNN_K).fit(scaler.transform(x_train))
    distances, _ = neighbours.kneighbors(scaler.transform(x_test))
    return distances[:, -1]


def ecod_scores(x_train, x_test, seed: int) -> np.ndarray:
    """ECOD: per feature, the test value's left and right tail probability under the training normals'
    empirical CDF; -log of them summed over features, each side, and on the side the feature's skew
    points to; the largest of the three."""
    from scipy.stats import skew

    n = len(x_train)
    ordered = np.sort(x_train, axis=0)
    left = np.empty_like(x_test, dtype=np.float64)
    right = np.empty_like(left)
    for j in range(x_train.shape[1]):
        left[:, j] = np.searchsorted(ordered[:, j], x_test[:, j], side="right") / n  # P(X <= x)
        right[:, j] = (n - np.searchsorted(ordered[:, j], x_test[:, j], side="left")) / n  # P(X >= x)
    left, right = -np.log(np.clip(left, 1 / (n + 1), 1)), -np.log(np.clip(right, 1 / (n + 1), 1))
    skewed_left = skew(x_train, axis=0) < 0
    auto = np.where(skewed_left, left, right)
    return np.max([left.sum(axis=1), right.sum(axis=1), auto.sum(axis=1)], axis=0)


BASELINES = {"iforest": iforest_scores, "pca": pca_scores, "knn": knn_scores, "ecod": ecod_scores}


def served_scores(version, x_raw: np.ndarray):
    """Every score of raw rows, through the version's Scorer as the service computes them."""
    from vaeserve.artifact.runtime import Model

    return Model(version).scorer.score(x_raw, None, version.manifest.scoring.iw_samples)


def run_one(path: str, seed: int, max_train_rows: int, train_options: dict, export_options: dict) -> dict:
    """One dataset and seed: result rows for every method, and the threshold check."""
    import torch

    torch.set_num_threads(1)
    quiet = [logging.getLogger(name) for name in ("vaeserve.training", "vaeserve.export")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # per-epoch logs would bury the progress bar
        logger.setLevel(logging.WARNING)
    try:
        return _run_one(Path(path), seed, max_train_rows, train_options, export_options)
    finally:  # with --jobs 1 this runs in the caller's process
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def _run_one(path: Path, seed: int, max_train_rows: int, train_options: dict, export_options: dict) -> dict:
    from vaeserve.export.exporter import export_checkpoint
    from vaeserve.training.train import TrainConfig, train

    name = path.stem
    x, y = load(path)
    split = split_rows(y, seed)
    x_train, x_test, y_test = x[split.train], x[split.test], y[split.test]
    rows = []

    def add(method, score, seconds):
        auroc, auprc = metrics(y_test, score)
        rows.append({"dataset": name, "seed": seed, "method": method, "auroc": auroc, "auprc": auprc, "seconds": round(seconds, 3)})

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"anomaly-{name}-{seed}-") as tmp:
        tmp = Path(tmp)
        vae_rows = x_train
        if len(vae_rows) > max_train_rows:
            vae_rows = vae_rows[np.sort(np.random.default_rng(seed).choice(len(vae_rows), max_train_rows, replace=False))]
        np.savez(tmp / f"{name}.npz", X=vae_rows)  # no labels: training sees normal rows only
        config = TrainConfig.from_dict(dict(train_options, data=str(tmp / f"{name}.npz"), seed=seed,
                                            device="cpu", plots=False, eval_samples=0))  # fmt: skip
        result = train(config, tmp / "checkpoint")
        version = export_checkpoint(tmp / "checkpoint", tmp / "models", "bench", 1, **export_options)
        scores = served_scores(version, x_test)
        thresholds = version.manifest.thresholds
    seconds = time.perf_counter() - started
    add("vaeserve", scores.anomaly_score, seconds)  # the product's default score (the manifest's thresholds.score)
    for score_name in SCORES:
        if score_name != thresholds.score and getattr(scores, score_name) is not None:
            add(f"vaeserve-{score_name}", getattr(scores, score_name), seconds)

    from scipy.stats import ks_2samp, kstest

    normal = y_test == 0
    threshold = {
        "dataset": name, "seed": seed, "score": thresholds.score, "threshold": thresholds.default,
        "target_fpr": thresholds.target_false_positive_rate, "promised_fpr": thresholds.promised_false_positive_rate,
        "fpr": float(np.mean(scores.flagged(thresholds.default)[normal])),
        "ks_p": float(kstest(scores.p_value[normal], "uniform").pvalue) if scores.p_value is not None else float("nan"),
        # the test normals' scores against the calibration rows' (exchangeable if the p-values are valid): the
        # one-sample test above also sees the calibration set's own sampling noise, of order 1/sqrt(n)
        "ks2_p": float(ks_2samp(scores.anomaly_score[normal], np.asarray(thresholds.calibration_scores)).pvalue)
                 if thresholds.calibration_scores is not None else float("nan"),  # fmt: skip
        "calibration_rows": thresholds.calibration_rows, "calibrated_on": thresholds.calibrated_on,
        "test_normals": int(normal.sum()), "outside_normals": int(scores.out_of_support[normal].sum()), "epochs": result.metrics.get("epochs_run"),
        "best_epoch": result.metrics.get("best_epoch"), "likelihood": result.metrics.get("likelihood"),
        "latent_dim": result.metrics.get("latent_dim"),
    }  # fmt: skip

    for method, scores_of in BASELINES.items():
        t = time.perf_counter()
        add(method, scores_of(x_train, x_test, seed), time.perf_counter() - t)
    return {"rows": rows, "threshold": threshold}


def run(args) -> int:
    """`vaeserve bench anomaly`: run, write the files, print the table and the means."""
    import json

    from vaeserve.errors import ConfigError

    if args.seeds < 1 or args.jobs < 1:
        raise ConfigError("--seeds and --jobs must be at least 1")
    def parsed(items: list[str], flag: str) -> dict:
        options = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
            try:
                options[key.replace("-", "_")] = json.loads(value)
            except json.JSONDecodeError:
                options[key.replace("-", "_")] = value
        return options

    export_options = parsed(args.export_option, "--export-option")
    import inspect

    from vaeserve.export.exporter import export_checkpoint

    known = set(inspect.signature(export_checkpoint).parameters) - {"checkpoint", "repository", "name", "version"}
    if set(export_options) - known:
        raise ConfigError(f"--export-option: unknown {sorted(set(export_options) - known)}; known: {sorted(known)}")
    paths = resolve_datasets(args.datasets, args.adbench)
    summary = run_bench(paths, args.seeds, args.out, args.jobs, args.max_train_rows or MAX_TRAIN_ROWS,
                        parsed(args.train_option, "--train-option"),
                        export_options=export_options)  # fmt: skip
    print((args.out / "results.md").read_text())
    for m in summary["methods"]:
        print(f"{m:<24} mean AUROC {100 * summary['overall'][m]['auroc']:.2f}  AUPRC {100 * summary['overall'][m]['auprc']:.2f}")
    f = summary["fpr_overall"]
    print(f"FPR at the default threshold {100 * f['fpr']:.2f}% (promised {100 * f['promised']:.2f}%; "
          f"{100 * f['fpr_large']:.2f}% on the {f['large']} sets with >= {KS_MIN_CALIBRATION_ROWS} calibration rows, "
          f"target {100 * f['target']:.2f}%; worst set {100 * f['worst_excess']:+.2f} points over its promise); "
          f"wall time {summary['wall_seconds']:.0f} s; written to {args.out}")
    return 0


def resolve_datasets(datasets: str | None, folder: str | None) -> list[Path]:
    if datasets:
        paths = [Path(p.strip()) for p in datasets.split(",") if p.strip()]
    else:
        base = Path(folder or os.environ.get(DATASETS_ENV) or DEFAULT_FOLDER)
        paths = [base / f"{n}.npz" for n in DEFAULT_DATASETS if (base / f"{n}.npz").is_file()]
        if not paths:
            from vaeserve.errors import ConfigError

            raise ConfigError(f"no default datasets in {base}: pass --datasets, --adbench DIR or set {DATASETS_ENV}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        from vaeserve.errors import ConfigError

        raise ConfigError(f"dataset not found: {', '.join(missing)}")
    return paths


def run_bench(paths: list[Path], seeds: int, out: Path, jobs: int = 1, max_train_rows: int = MAX_TRAIN_ROWS,
              train_options: dict | None = None, progress: bool = True, export_options: dict | None = None) -> dict:  # fmt: skip
    """Run every dataset x seed (in `jobs` processes), write results.csv, thresholds.csv, results.md
    and auroc.png into `out`; return the summary."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    train_options = dict(train_options or {})
    tasks = [(str(p), s, max_train_rows, train_options, dict(export_options or {})) for p in paths for s in range(seeds)]
    started = time.perf_counter()
    results = []
    bar = tqdm(total=len(tasks), desc="dataset x seed", unit="run", disable=not progress, dynamic_ncols=True)
    if jobs <= 1:
        for task in tasks:
            bar.set_postfix_str(f"{Path(task[0]).stem} seed {task[1]}")
            results.append(run_one(*task))
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_one, *task) for task in tasks]
            for future in as_completed(futures):
                results.append(future.result())
                bar.update()
    bar.close()
    wall = time.perf_counter() - started
    order = {(str(Path(p).stem), s): i for i, (p, s, *_) in enumerate(tasks)}
    results.sort(key=lambda r: order[(r["threshold"]["dataset"], r["threshold"]["seed"])])
    rows = [row for r in results for row in r["rows"]]
    thresholds = [r["threshold"] for r in results]
    _write_csv(out / "results.csv", rows, ["dataset", "seed", "method", "auroc", "auprc", "seconds"])
    _write_csv(out / "thresholds.csv", thresholds, list(thresholds[0]))
    summary = summarize(rows, thresholds, wall)
    (out / "results.md").write_text(markdown(summary, seeds, train_options, max_train_rows, jobs))
    plot(summary, out / "auroc.png")
    return summary


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict], thresholds: list[dict], wall: float) -> dict:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def mean(key, dataset=None, method=None):
        v = [r[key] for r in rows if (dataset is None or r["dataset"] == dataset) and (method is None or r["method"] == method)]
        return float(np.mean(v))

    per = {d: {m: {"auroc": mean("auroc", d, m), "auprc": mean("auprc", d, m)} for m in methods} for d in datasets}
    overall = {m: {"auroc": mean("auroc", method=m), "auprc": mean("auprc", method=m)} for m in methods}
    def of(d, key):
        return [t[key] for t in thresholds if t["dataset"] == d]

    fpr = {d: {"fpr": float(np.mean(of(d, "fpr"))), "target": float(np.mean(of(d, "target_fpr"))),
               "promised": float(np.mean(of(d, "promised_fpr"))), "calibration_rows": float(np.mean(of(d, "calibration_rows"))),
               "ks_p": float(np.median(of(d, "ks_p"))), "ks2_p": float(np.median(of(d, "ks2_p")))}
           for d in datasets}  # fmt: skip
    large = [d for d in datasets if fpr[d]["calibration_rows"] >= KS_MIN_CALIBRATION_ROWS]
    fpr_all = {"fpr": float(np.mean([t["fpr"] for t in thresholds])), "target": float(np.mean([t["target_fpr"] for t in thresholds])),
               "promised": float(np.mean([t["promised_fpr"] for t in thresholds])),
               "fpr_large": float(np.mean([fpr[d]["fpr"] for d in large])) if large else float("nan"),
               "large": len(large), "worst_excess": max(fpr[d]["fpr"] - fpr[d]["promised"] for d in datasets),
               "ks_uniform": sum(fpr[d]["ks_p"] > 0.01 for d in large),
               "ks2_same": sum(fpr[d]["ks2_p"] > 0.01 for d in large)}  # fmt: skip
    return {"datasets": datasets, "methods": methods, "per_dataset": per, "overall": overall, "fpr": fpr,
            "fpr_overall": fpr_all, "wall_seconds": wall}  # fmt: skip


def markdown(summary: dict, seeds: int, train_options: dict, max_train_rows: int, jobs: int) -> str:
    methods = summary["methods"]
    lines = [
        f"Mean AUROC (AUPRC) over {seeds} seed(s), in %; FPR: false-positive rate on the test normals at the "
        "manifest's default threshold, against the rate the manifest promises and the rows that calibrated it (mean "
        "over seeds); KS p: median over seeds of the Kolmogorov-Smirnov test of the test normals' p-values against uniform; "
        "KS2 p: of the two-sample test of the test normals' scores against the calibration rows'.",
        "",
        "| dataset | " + " | ".join(methods) + " | FPR @ default threshold (promised; calibration rows) | KS p | KS2 p |",
        "|---" * (len(methods) + 4) + "|",
    ]
    for d in summary["datasets"]:
        cells = [f"{100 * summary['per_dataset'][d][m]['auroc']:.1f} ({100 * summary['per_dataset'][d][m]['auprc']:.1f})" for m in methods]
        f = summary["fpr"][d]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {100 * f['fpr']:.2f}% ({100 * f['promised']:.2f}%; "
                     f"{f['calibration_rows']:.0f}) | {f['ks_p']:.3f} | {f['ks2_p']:.3f} |")  # fmt: skip
    cells = [f"**{100 * summary['overall'][m]['auroc']:.1f}** ({100 * summary['overall'][m]['auprc']:.1f})" for m in methods]
    f = summary["fpr_overall"]
    lines.append("| **mean** | " + " | ".join(cells) + f" | **{100 * f['fpr']:.2f}%** ({100 * f['promised']:.2f}%) | | |")
    lines += [
        "",
        f"Sets with >= {KS_MIN_CALIBRATION_ROWS} calibration rows ({f['large']}): mean FPR {100 * f['fpr_large']:.2f}% "
        f"(target {100 * f['target']:.2f}%), p-values uniform (KS p > 0.01) on {f['ks_uniform']} of them, the "
        f"test normals' scores like the calibration rows' (KS2 p > 0.01) on {f['ks2_same']}; the largest "
        f"excess of a set's FPR over its promised rate: {100 * f['worst_excess']:+.2f} points.",
        "",
        f"Wall time {summary['wall_seconds']:.0f} s ({jobs} process(es)); vaeserve trained on at most {max_train_rows} "
        f"rows per dataset; training options: {train_options or 'the defaults of `vaeserve train`'}.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, methods = summary["datasets"], summary["methods"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(datasets) + 2), 4.5))
    width = 0.8 / len(methods)
    positions = np.arange(len(datasets) + 1)
    for i, m in enumerate(methods):
        values = [summary["per_dataset"][d][m]["auroc"] for d in datasets] + [summary["overall"][m]["auroc"]]
        ax.bar(positions + (i - (len(methods) - 1) / 2) * width, values, width, label=m)
    ax.set_xticks(positions, [*datasets, "mean"], rotation=45, ha="right")
    ax.set_ylabel("AUROC")
    ax.set_ylim(0.3, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8, ncol=3, loc="lower left")
    ax.set_title("Anomaly detection AUROC: vaeserve (served ONNX path) vs IsolationForest, PCA, kNN and ECOD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
