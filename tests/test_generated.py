"""The committed gRPC stubs are what scripts/generate-protos.sh makes from proto/."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "sidecar" / "logscore" / "generated"


def test_python_stubs_are_current(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the stubs")
    # (RUBY_OUT: else the Ruby stubs are written over the plugin's, which the Ruby tests load meanwhile)
    result = subprocess.run(["bash", "scripts/generate-protos.sh", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                                                 "RUBY_OUT": str(tmp_path / "rb")})
    assert result.returncode == 0, result.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "nothing generated"
    for relative in generated:
        assert (tmp_path / relative).read_text() == (COMMITTED / relative).read_text(), (
            f"{relative} is stale: run scripts/generate-protos.sh and commit the result")


def test_ruby_stubs_are_current(tmp_path):
    import shutil

    if not (shutil.which("protoc") and shutil.which("grpc_ruby_plugin")):
        pytest.skip("Debian's protobuf-compiler and protobuf-compiler-grpc regenerate the Ruby stubs")
    result = subprocess.run(["bash", "scripts/generate-protos.sh", str(tmp_path / "py")], cwd=ROOT,
                            capture_output=True, text=True,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "RUBY_OUT": str(tmp_path / "rb")})
    assert result.returncode == 0, result.stderr
    committed = ROOT / "fluentd-plugin" / "lib"
    generated = sorted(p.relative_to(tmp_path / "rb") for p in (tmp_path / "rb").rglob("*.rb"))
    assert len(generated) == 2
    for relative in generated:
        assert (tmp_path / "rb" / relative).read_text() == (committed / relative).read_text(), (
            f"{relative} is stale: run scripts/generate-protos.sh and commit the result")


def test_operations_guide_lists_every_setting():
    from dataclasses import fields

    from logscore.settings import Settings

    guide = (ROOT / "docs" / "operations.md").read_text()
    missing = [f.name for f in fields(Settings) if f"`--{f.name.replace('_', '-')}`" not in guide]
    assert missing == [], f"docs/operations.md lacks settings: {missing}"
