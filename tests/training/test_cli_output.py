"""What `vaeserve train` prints and where it writes: a bounded number of epoch lines, a progress bar that
ends at the epochs run, warnings (recorded in metrics.json) when the run ended before the model did,
--quiet, and --force for an --out folder that holds an earlier run."""

import io
import json
import logging
import sys

from vaeserve.cli import main
from vaeserve.training.train import TrainConfig, _convergence

QUICK = ["--no-plots", "--latent-dim", "2"]


def epoch_lines(caplog) -> list[int]:
    """The epochs of the INFO 'epoch N/M: ...' lines, in order."""
    return [int(r.getMessage().split()[1].split("/")[0]) for r in caplog.records
            if r.levelno == logging.INFO and r.getMessage().startswith("epoch ")]  # fmt: skip


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_epoch_lines_are_bounded_and_the_bar_ends_at_the_epochs_run(tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.INFO)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # tqdm draws only on a terminal
    args = ["train", *QUICK, "--epochs", "40", "--patience", "2", "--warmup-epochs", "1", "--log-every", "5",
            "--eval-samples", "5", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ran = metrics["epochs_run"]
    assert ran == len(metrics["history"]) > 5
    # the first epoch, every fifth, and the last: never one line per epoch
    assert epoch_lines(caplog) == sorted({1, *range(5, ran + 1, 5), ran})
    drawn = terminal.getvalue().split("\r")
    epochs_bar = [s for s in drawn if s.startswith("epochs:")][-1]
    assert f" {ran}/{ran} " in epochs_bar and "100%" in epochs_bar, epochs_bar  # not 'ran - 1/40'
    assert any(s.startswith("scoring 359 rows, K=5:") for s in drawn)  # the importance-weighted evaluation's bar
    if metrics["stopped_early"]:
        assert any(f"early stop at epoch {ran}" in r.getMessage() for r in caplog.records)


def test_a_run_still_improving_at_the_last_epoch_warns_and_records_it(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    training_log = logging.getLogger("vaeserve.training")
    level = training_log.level
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "3", "--eval-samples", "0", "--quiet", "--out", str(out)]) == 0
    assert training_log.level == level  # --quiet does not outlive the command
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == metrics["epochs_run"] == 3
    assert metrics["still_improving"] is True and metrics["warmup_finished"] is False
    expected = [
        "the best epoch is the last one (3): the validation -ELBO was still improving when the run hit --epochs 3; "
        "train longer (a larger --epochs, or --resume with one)",
        "KL warm-up did not finish: the run stopped after 3 of --warmup-epochs 10 (beta 0.30 of 1), so the KL term "
        "was down-weighted throughout; raise --epochs or lower --warmup-epochs",
    ]
    assert metrics["warnings"] == expected
    # --quiet: the warnings and the summary, no INFO lines
    assert [r.getMessage() for r in caplog.records if r.name.startswith("vaeserve.training")] == expected
    assert [r.levelno for r in caplog.records if r.name.startswith("vaeserve.training")] == [logging.WARNING] * 2
    assert "epochs:     3 (best 3, the last: still improving)" in capsys.readouterr().out


def test_convergence_flags():
    config = TrainConfig(epochs=50, warmup_epochs=10, beta=0.5)
    assert _convergence(config, {"epochs_run": 30, "best_epoch": 20, "stopped_early": True}) == {
        "still_improving": False, "warmup_finished": True, "warnings": []}  # fmt: skip
    stopped = _convergence(config, {"epochs_run": 8, "best_epoch": 2, "stopped_early": True})
    assert stopped["still_improving"] is False and stopped["warmup_finished"] is False
    assert stopped["warnings"] == ["KL warm-up did not finish: the run stopped after 8 of --warmup-epochs 10 (beta 0.40 "
                                   "of 0.5), so the KL term was down-weighted throughout; raise --epochs or --patience "
                                   "or lower --warmup-epochs"]  # fmt: skip
    capped = _convergence(config, {"epochs_run": 50, "best_epoch": 50, "stopped_early": False})
    assert capped["still_improving"] is True and capped["warmup_finished"] is True and len(capped["warnings"]) == 1
    assert _convergence(config, {"epochs_run": 0, "best_epoch": 0, "stopped_early": False}) == {
        "still_improving": None, "warmup_finished": None, "warnings": []}  # PPCA: closed form  # fmt: skip


def test_an_earlier_run_in_out_needs_force(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--eval-samples", "0", "--out", str(out)]) == 0
    (out / "plots").mkdir()
    (out / "plots" / "old.png").write_bytes(b"\x89PNG")  # a plot of the earlier model
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    ppca = ["train", "--model", "ppca", "--latent-dim", "4", "--no-plots", "--eval-samples", "0", "--out", str(out)]
    assert main(ppca) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"vaeserve train: error: {out} holds an earlier run (weights.pt, config.json, metrics.json, "
                   "validation.npz, calibration.npz, reference.npz, sample_rows.csv, training_state.pt, plots/); pass --force to replace it, "
                   "or give another --out")  # fmt: skip
    assert json.loads((out / "config.json").read_text())["model"]["kind"] == "vae"  # untouched
    assert main([*ppca, "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["kind"] == "ppca"
    # nothing of the earlier run is left to mix with this one (a PPCA run writes no training state, no plots here)
    assert sorted(p.name for p in out.iterdir()) == ["calibration.npz", "config.json", "metrics.json", "notes.txt",
                                                     "reference.npz", "sample_rows.csv", "validation.npz", "weights.pt"]  # fmt: skip
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--force"]) == 2
    assert "--force starts the run in --out afresh and --resume continues it" in capsys.readouterr().err


def test_headerless_csv_trains_on_every_row(tmp_path, table, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "bare.csv"
    path.write_text("".join(",".join(str(v) for v in row) + "\n" for row in table))
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--data", str(path), "--epochs", "2", "--eval-samples", "0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["feature_names"] == ["x0", "x1", "x2"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"]["rows"] == 12  # 20% of 60: the first line is a row, not a header
    assert "bare.csv has no header (its first line is data): every line is a row, columns named x0..x2" in caplog.messages
    assert (out / "sample_rows.csv").read_text().splitlines()[0] == "x0,x1,x2"


def test_train_and_evaluate_help_describe_every_flag_and_give_an_example():
    from vaeserve.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "evaluate"):
        sub = commands[name]
        assert sub.description and "vaeserve " + name in sub.epilog, name
        undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]
        assert undocumented == [], (name, undocumented)
    text = commands["train"].format_help()
    for flag in ("--force", "--quiet", "--log-every", "x0..x{n-1}", "thresholds_<name>_v<version>.png"):
        assert flag in text, flag
