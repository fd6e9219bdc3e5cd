"""Fault injection on tools/quantize_net.py: kill -9 at several points of real runs, corrupt files, bad configs and
bad data. Asserts: nothing finished is lost, a resumed run ends with the uninterrupted run's model, and every fault
is one `error:` line naming what is wrong.

The kill loop spawns the tool (each process imports torch: a few seconds); the other faults run the tool in this
process, each into its own OUTPUT_DIR (a live run's lock would refuse a second one).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bgd_det.checkpoint import read_compressed
from bgd_det.engine.quantizer import FINETUNE_STATE_FILE, PROGRESS_FILE
from conftest import REPO, TINY_OPTS, load_tool, write_tiny_images

ROOT = REPO
TOOL = ROOT / "tools" / "quantize_net.py"
# Long enough to be killed inside each phase: 4 layers with 10 distillation steps each, then 30 global steps
# that save their state every 3.
SLOW = ["FINETUNE.LAYER_ITERS", 10, "FINETUNE.GLOBAL_ITERS", 30, "FINETUNE.CHECKPOINT_PERIOD", 3]
# The tool in a fresh interpreter, with tiny_net registered (conftest does it).
DRIVER = ("import runpy, sys; sys.path.insert(0, {tests!r}); import conftest; sys.argv = [{tool!r}] + sys.argv[1:]; "
          "runpy.run_path({tool!r}, run_name='__main__')").format(tests=str(ROOT / "tests"), tool=str(TOOL))


def _opts(out_dir, *extra):
    return [str(o) for o in (*TINY_OPTS, *SLOW, "OUTPUT_DIR", out_dir, *extra)]


def _spawn(out_dir, *flags):
    """The tool on the images under ``<out_dir>/../datasets``."""
    env = dict(os.environ, BGD_DATASETS=str(Path(out_dir).parent / "datasets"))
    return subprocess.Popen([sys.executable, "-c", DRIVER, *flags, *_opts(str(out_dir))], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, timeout=120.0):
    """SIGKILL ``proc`` once ``ready()`` is true (or when it has exited on its own); True if it was killed."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.wait()
    return False


def _model(out_dir):
    return read_compressed(str(Path(out_dir) / "model_final.pth"))["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run and its wall time (module scope: the spawned runs are the slow part)."""
    tmp = tmp_path_factory.mktemp("faults")
    write_tiny_images(tmp / "datasets")
    start = time.monotonic()
    proc = _spawn(tmp / "reference")
    assert proc.wait() == 0, proc.stderr.read()
    return tmp, time.monotonic() - start


@pytest.mark.parametrize("point", ["first layer saved", "global finetuning saved", "random times"])
def test_kill_9_then_resume_gives_the_uninterrupted_model(reference, point):
    tmp, wall = reference
    out = tmp / point.replace(" ", "_")
    if point == "random times":  # killed three times, each run resuming the last; seeded: the same in every run
        rng = random.Random(0)
        for i in range(3):
            start, delay = time.monotonic(), rng.uniform(0.2, 0.8) * wall
            _kill_when(_spawn(out, *(["--resume"] if i else [])), lambda: time.monotonic() - start > delay)
    else:
        ready = {"first layer saved": lambda: (out / PROGRESS_FILE).is_file(),
                 "global finetuning saved": lambda: (out / FINETUNE_STATE_FILE).is_file()}[point]
        assert _kill_when(_spawn(out), ready), f"the run ended before '{point}'"
        assert not (out / "model_final.pth").exists()
    # Resume: a run killed before it saved anything starts over, one killed later continues; the dead run's lock
    # is taken over.
    resumed = _spawn(out, "--resume")
    err = resumed.communicate()[1]
    assert resumed.returncode == 0, err
    a, b = _model(tmp / "reference"), _model(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = (out / "log.txt").read_text()
    if point == "global finetuning saved":  # the finished layers and finetuning steps were not done again
        assert "resumed after 4/4 layers" in log and "global finetune: resuming after step" in log


def _run_in_process(tmp_path, capsys, *opts, config=""):
    """The tool's main in this process; returns (exit status, last stderr line)."""
    tool = load_tool("quantize_net")
    argv = (["--config", config] if config else []) + [str(o) for o in (*TINY_OPTS, "OUTPUT_DIR",
                                                                        tmp_path / "out", *opts)]
    args = tool.default_argument_parser().parse_args(argv)
    with pytest.raises(SystemExit) as exit_:
        tool.run_tool(tool.main, args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines)
    return exit_.value.code, lines[-1]


def _truncated_image(path):
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 20, 30)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("fault,opts,message", [
    ("unknown key", ["QUANT.NOPE", 1], "Non-existent key: QUANT.NOPE"),
    ("block size 0", ["QUANT.BLOCK_SIZE.LINEAR", 0], "block size 0 for 'fc'"),  # was a ZeroDivisionError
    ("block size -4", ["QUANT.BLOCK_SIZE.LINEAR", -4], "block size -4 for 'fc'"),  # divides 16 in Python
    ("temperature 0", ["FINETUNE.TEMPERATURE", 0.0], "FINETUNE.TEMPERATURE=0.0; allowed: a number > 0"),
    ("unknown dataset", ["DATASETS.CALIB", "imagenet_sample_evn"], "unknown dataset DATASETS.CALIB"),
    ("corrupt teacher", ["MODEL.WEIGHTS", "{corrupt}"], "{corrupt}"),
    ("missing teacher", ["MODEL.WEIGHTS", "{missing}"], "{missing}"),
])
def test_bad_configs_and_files_are_one_error_line(tiny_images, tmp_path, capsys, fault, opts, message):
    corrupt, missing = tmp_path / "teacher.pth", tmp_path / "nowhere.pth"
    torch.save({"conv1.weight": torch.zeros(4)}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    paths = {"corrupt": str(corrupt), "missing": str(missing)}
    opts = [str(o).format(**paths) for o in opts]
    code, line = _run_in_process(tmp_path, capsys, *opts)
    assert code == 2 and line.startswith("error: ") and message.format(**paths) in line, line
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_a_missing_base_config_is_named(tiny_images, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("_BASE_: Base-Nowhere.yaml\n")
    code, line = _run_in_process(tmp_path, capsys, config=str(config))
    assert code == 2 and f"not found: {tmp_path / 'Base-Nowhere.yaml'} (the _BASE_ of {config})" in line, line
    config.write_text("")
    code, line = _run_in_process(tmp_path, capsys, config=str(config))
    assert code == 2 and f"config file {config} is empty" in line, line
    config.write_text("QUANT: [unclosed\n")
    code, line = _run_in_process(tmp_path, capsys, config=str(config))
    assert code == 2 and f"config file {config} is not valid YAML" in line, line


def test_bad_images_are_named_and_the_model_is_kept(tiny_images, tmp_path, capsys):
    # A truncated calibration image: the run stops at once, naming it.
    bad = tiny_images / "n00000000_truncated.JPEG"
    _truncated_image(bad)
    code, line = _run_in_process(tmp_path, capsys)
    assert code == 2 and f"unreadable image {bad}" in line, line
    os.remove(bad)
    # A non-image file in the test split (odd classes): met in the final evaluation, after the model is saved.
    bad = tiny_images / "n00000001_notes.JPEG"
    bad.write_text("not an image")
    code, line = _run_in_process(tmp_path / "second", capsys, "TEST.EVAL_TEACHER", False)
    assert code == 2 and f"unreadable image {bad}" in line, line
    assert (tmp_path / "second" / "out" / "model_final.pth").is_file()


def test_bad_images_skipped_by_choice_with_a_counted_warning(tiny_images, tmp_path, capsys):
    calib, test = tiny_images / "n00000000_truncated.JPEG", tiny_images / "n00000001_notes.JPEG"
    _truncated_image(calib)
    test.write_text("not an image")
    code, line = _run_in_process(tmp_path, capsys, "DATASETS.BAD_IMAGES", "skipped")
    assert code == 2 and "DATASETS.BAD_IMAGES='skipped'; allowed: error, skip" in line, line
    tool = load_tool("quantize_net")
    args = tool.default_argument_parser().parse_args(
        [str(o) for o in (*TINY_OPTS, "OUTPUT_DIR", tmp_path / "skip", "DATASETS.BAD_IMAGES", "skip")])
    tool.main(args)
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert f"unreadable image {calib}" in log and f"unreadable image {test}" in log
    assert "skipped (1 so far in this loader)" in log
    report = json.loads((tmp_path / "skip" / "report.json").read_text())
    assert report["metrics"]["compressed"]["n_images"] == 10  # the 10 readable odd-class images of 11
