"""The tools' one error wrapper: an expected failure is one `error:` message and exit status 2, no traceback;
--debug shows the traceback."""
import subprocess
import sys

import pytest

from bgd_det.utils.cli import run_tool
from conftest import REPO

ROOT = REPO


def _tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "quantize_net.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_bad_config_key_is_one_error_line_and_exit_2(tmp_path):
    out = _tool("--config", "configs/ImageNet/resnet18_large_blocks.yaml", "--plan-only", "QUANT.NOPE", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: command-line override: Non-existent key: QUANT.NOPE")
    debug = _tool("--config", "configs/ImageNet/resnet18_large_blocks.yaml", "--plan-only", "--debug", "QUANT.NOPE", "1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_run_tool_names_a_full_disk_and_lets_bugs_through(capsys):
    import errno

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/model_final.pth")

    with pytest.raises(SystemExit) as info:
        run_tool(full)
    assert info.value.code == 2
    assert "error: the disk is full (/out/model_final.pth)" in capsys.readouterr().err

    def bug():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_tool(bug)  # not an expected failure: the traceback stays
