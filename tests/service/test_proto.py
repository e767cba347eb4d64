"""The generated code under vaeserve/ must be what scripts/gen_proto.sh makes from proto/ now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "proto").rglob("*.proto"))


def test_every_proto_is_generated():
    assert {p.relative_to(ROOT / "proto").with_suffix("").as_posix() for p in PROTOS} >= {"vaeserve/v1/vaeserve", "vaeserve/oip/v2/predict"}


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, PROTOS)],
        check=True,
    )  # fmt: skip
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert len(made) == 3 * len(PROTOS)
    stale = [str(path) for path in made if (tmp_path / path).read_text() != (ROOT / path).read_text()]
    assert not stale, f"{stale} are stale against proto/: run scripts/gen_proto.sh"
