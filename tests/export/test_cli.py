"""`vaeserve export` from the command line."""

from vaeserve.cli import main
from vaeserve.artifact.repository import scan_repository


def test_export_command_writes_a_version(make_checkpoint, tmp_path, capsys):
    checkpoint = make_checkpoint("ppca", kind="ppca", latent_dim=8)
    assert main(["export", str(checkpoint), "--repository", str(tmp_path), "--name", "digits"]) == 0
    assert main(["export", str(checkpoint), "--repository", str(tmp_path)]) == 0  # name from the folder
    out = capsys.readouterr().out
    assert f"exported {tmp_path / 'digits' / '1'}" in out
    models = scan_repository(tmp_path)
    assert sorted(models) == ["digits", "ppca"] and list(models["digits"]) == [1]


def test_export_command_reports_failure_in_one_line(make_checkpoint, tmp_path, capsys):
    checkpoint = make_checkpoint("ppca", kind="ppca", latent_dim=8)
    assert main(["export", str(checkpoint), "--repository", str(tmp_path), "--name", "m", "--tolerance", "0"]) == 2
    err = capsys.readouterr().err
    assert "vaeserve export: error: ONNX Runtime disagrees with torch beyond tolerance 0: encoder.mu max abs diff" in err
    assert list((tmp_path / "m").iterdir()) == []
    assert main(["export", str(tmp_path / "missing"), "--repository", str(tmp_path), "--name", "m"]) == 2
    assert "is not a checkpoint: weights.pt is missing" in capsys.readouterr().err
