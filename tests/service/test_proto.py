"""The generated code in vaeserve/v1 must be what scripts/gen_proto.sh makes from proto/ now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["vaeserve_pb2.py", "vaeserve_pb2.pyi", "vaeserve_pb2_grpc.py"]


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "proto/vaeserve/v1/vaeserve.proto")],
        check=True,
    )  # fmt: skip
    stale = [name for name in GENERATED
             if (tmp_path / "vaeserve/v1" / name).read_text() != (ROOT / "vaeserve/v1" / name).read_text()]  # fmt: skip
    assert not stale, f"vaeserve/v1/{stale} are stale against proto/: run scripts/gen_proto.sh"
