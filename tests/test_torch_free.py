"""The device side runs without torch: proven in subprocesses where importing torch fails."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

BLOCKER = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}:
            raise ImportError(f"{name} is blocked: the edge must not import it")
sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})


def test_the_blocker_really_blocks_torch(tmp_path):
    r = run_without_torch(tmp_path, "-c", "import torch")
    assert r.returncode != 0 and "torch is blocked" in r.stderr


def edge_modules() -> list[str]:
    import splitlm.edge_client
    import splitlm.protocol

    mods = ["splitlm.manifest", "splitlm.errors", "splitlm.data", "splitlm.cli"]
    for pkg in (splitlm.protocol, splitlm.edge_client):
        mods.append(pkg.__name__)
        mods += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")]
    return mods


def test_protocol_and_edge_client_import_without_torch(tmp_path):
    mods = edge_modules()
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    code += "import sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    r = run_without_torch(tmp_path, "-c", code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["default-model", "--help"]])
def test_cli_help_works_without_torch(tmp_path, argv):
    r = run_without_torch(tmp_path, "-m", "splitlm.cli", *argv)
    assert r.returncode == 0, r.stderr
    assert "usage: splitlm" in r.stdout
