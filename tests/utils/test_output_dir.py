"""OUTPUT_DIR ownership: a live run's lock refuses a second run, an earlier run's results are neither overwritten
nor lost, stale temporary files are removed."""
import os
import subprocess
import sys

import pytest

from bgd_det.utils import output_dir as od


def test_results_refused_without_resume_or_overwrite_and_moved_aside_with_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "progress.pth").write_text("9 layers")
    (out / "config.yaml").write_text("old")
    (out / "progress.pth.tmp").write_text("half")
    with pytest.raises(od.OutputDirBusy, match=r"holds an earlier run \(progress.pth\); pass --resume"):
        od.claim_output_dir(str(out))
    assert (out / "progress.pth").read_text() == "9 layers" and not (out / od.LOCK_FILE).exists()
    assert od.claim_output_dir(str(out), resume=True) == []  # resume keeps everything
    assert not (out / "progress.pth.tmp").exists()  # an interrupted write is cleaned
    os.remove(out / od.LOCK_FILE)
    moved = od.claim_output_dir(str(out), overwrite=True)
    assert sorted(os.path.basename(m) for m in moved) == ["config.yaml", "progress.pth"]
    assert open(moved[0]).read() in ("9 layers", "old") and not (out / "progress.pth").exists()


def test_a_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / od.LOCK_FILE).write_text(f"{holder.pid} {os.uname().nodename}")
        with pytest.raises(od.OutputDirBusy, match=rf"in use by the run with PID {holder.pid}"):
            od.claim_output_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    od.claim_output_dir(str(tmp_path))  # the holder is gone: taken over
    assert (tmp_path / od.LOCK_FILE).read_text().startswith(f"{os.getpid()} ")
