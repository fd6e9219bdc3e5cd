"""Distributed runs with 2 gloo CPU processes: same codes/codebooks and metrics as 1 process; failures do not hang.

Spawning 2 processes costs a few seconds (each imports torch), so each test spawns once.
"""
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bgd_det.engine.distributed import Collectives, build_collectives, check_distributed_config
from bgd_det.engine.launch import DistributedLaunchError, _find_free_port, launch
from bgd_det.engine.pipeline import FINAL_CHECKPOINT, quantize_and_report
from bgd_det.tasks import build_task
from bgd_det.utils import comm
from bgd_det.utils.logger import setup_logger
from conftest import REPO, tiny_cfg, write_tiny_images

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Full-resolution capture (no random row subsampling, whose draws depend on the per-process batch) and no
# augmentation (random crops are drawn per process): the 2-process data is then exactly the 1-process data.
# SGD, not Adam: Adam's first step is lr * sign(g), so a gradient entry at float-noise level (this random teacher's
# KL is ~1e-4) flips with the summation order and moves a centroid by 2 * lr; SGD keeps a difference proportional
# to the gradient's. LR 1.0 moves the codebooks by 1e-4..1e-1 (measured), far above fp16 resolution.
EXACT = ["QUANT.CAPTURE_ROWS_PER_IMAGE", 0, "FINETUNE.AUGMENT", False, "FINETUNE.LAYER_ITERS", 2,
         "FINETUNE.OPTIMIZER", "sgd", "FINETUNE.LAYER_LR", 1.0, "FINETUNE.GLOBAL_ITERS", 3,
         "FINETUNE.GLOBAL_LR", 1.0, "DATASETS.TEST_MAX_IMAGES", 9]  # 9 test images: uneven shards (5 + 4)
# conv2 with K=512 (int16 codes, which gloo cannot broadcast as such). Its 1152 scalar sub-vectors for 512
# centroids are full of near-ties, so no layer-wise finetuning before it: the float-order differences of
# finetuned codebooks upstream would change its Gram at 1e-7 and flip ties. Also the centered metric (the
# block sums are reduced too).
INT16 = ["QUANT.CAPTURE_ROWS_PER_IMAGE", 0, "FINETUNE.AUGMENT", False, "FINETUNE.GLOBAL_ITERS", 2,
         "FINETUNE.OPTIMIZER", "sgd",
         "QUANT.METRIC", "centered",
         "QUANT.MIN_SUBVECTORS_PER_CENTROID", 2, "TEST.EVAL_TEACHER", False,
         "QUANT.OVERRIDES", '[["conv2", "BLOCK_SIZE", 1], ["conv2", "N_CENTROIDS", 512]]']


def _digest(state) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _logits(model, task):
    with torch.no_grad():
        return torch.cat([model(images) for images, _ in task.test_loader()])


def _quantize(out_dir: str, opts) -> dict:
    """The tool's work in every process; returns what the tests compare (from rank 0)."""
    cfg = tiny_cfg(out_dir, *opts)
    if comm.get_world_size() > 1:
        setup_logger(out_dir, rank=comm.get_rank())
    torch.manual_seed(cfg.SEED)  # as default_setup: the random-init teacher is the same in every process
    out = quantize_and_report(cfg)
    student = out["result"].student
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    # Evaluation predictions gathered to rank 0 (as a COCO evaluator gathers its detections).
    task = build_task(cfg)
    shards = comm.gather(_logits(student, task))
    logits = None
    if comm.is_main_process():  # rank r holds test images r, r + world, ...: interleave back
        n = sum(s.shape[0] for s in shards)
        logits = torch.empty(n, shards[0].shape[1])
        for r, s in enumerate(shards):
            logits[r::len(shards)] = s
    return {"state": state, "metrics": out["metrics"], "logits": logits,
            "distill": [r.distill_loss for r in out["result"].records],
            "digests": comm.all_gather(_digest(state)), "world": comm.get_world_size()}


def _quantize_main(out_dir: str) -> dict:
    return {"exact": _quantize(os.path.join(out_dir, "exact"), EXACT),
            "int16": _quantize(os.path.join(out_dir, "int16"), INT16)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same job in 1 process (in this one) and in 2 spawned gloo processes."""
    tmp = tmp_path_factory.mktemp("dist")
    write_tiny_images(tmp / "datasets")  # module scope here: the spawned run is the slow part
    old = os.environ.get("BGD_DATASETS")
    os.environ["BGD_DATASETS"] = str(tmp / "datasets")
    try:
        single = launch(_quantize_main, 1, args=(str(tmp / "single"),))
        double = launch(_quantize_main, 2, args=(str(tmp / "double"),), backend="gloo")
    finally:
        if old is None:
            del os.environ["BGD_DATASETS"]
        else:
            os.environ["BGD_DATASETS"] = old
    return single, double, tmp


def _same_codes_and_codebooks(one, two):
    assert one["world"] == 1 and two["world"] == 2
    assert two["digests"][0] == two["digests"][1]  # the ranks hold bit-identical students
    a, b = one["state"], two["state"]
    assert a.keys() == b.keys()
    codes = [k for k in a if k.endswith(".codes")]
    assert len(codes) == 4
    for k in codes:
        assert torch.equal(a[k], b[k]), k
    # Codebooks: the Gram sum and the DDP gradient mean differ from one process only by float summation order
    # (~1e-7 relative), which can at most flip the final fp16 rounding of an entry by one unit in the last
    # place (<= 2**-10 relative). Measured here (SGD): bit-identical.
    for k in a:
        if k.endswith(".codebook"):
            assert torch.allclose(a[k].float(), b[k].float(), rtol=2**-10, atol=1e-6), k
    return a


def test_two_processes_give_the_codes_and_codebooks_of_one(runs):
    single, double, tmp = runs
    _same_codes_and_codebooks(single["exact"], double["exact"])
    # Layer-wise distillation ran on every layer, so the codebooks compared are finetuned ones (the recorded
    # loss is rank 0's shard in 2 processes, so it is not compared).
    one, two = single["exact"]["distill"], double["exact"]["distill"]
    assert len(one) == len(two) == 4 and all(loss == loss for loss in one + two)
    # Only rank 0 wrote the checkpoint and the report; every rank wrote its log.
    out = tmp / "double" / "exact"
    assert (out / FINAL_CHECKPOINT).is_file() and (out / "report.md").is_file()
    assert (out / "log.txt").is_file() and (out / "log.txt.rank1").is_file()


def test_two_processes_with_int16_codes_and_centered_metric(runs):
    single, double, _ = runs
    state = _same_codes_and_codebooks(single["int16"], double["int16"])
    assert state["conv2.codes"].dtype == torch.int16


def test_distributed_evaluation_equals_single_process(runs):
    single, double = runs[0]["exact"], runs[1]["exact"]
    for which in ("uncompressed", "compressed"):
        one, two = single["metrics"][which], double["metrics"][which]
        assert one.keys() == two.keys(), which
        # counts are exact; the KL to the teacher is a float sum whose order depends on the sharding
        assert one == pytest.approx(two, rel=1e-5, abs=1e-7), which
    assert "kl_to_reference" in single["metrics"]["compressed"]
    assert single["metrics"]["uncompressed"]["n_images"] == 9
    assert double["logits"].shape == single["logits"].shape == (9, 10)
    assert torch.allclose(single["logits"], double["logits"], atol=1e-4)


# -- failures ------------------------------------------------------------------------------------------------
def _rank1_dies() -> None:
    if comm.get_rank() == 1:
        os._exit(3)
    comm.all_reduce_sum(torch.ones(1))  # would wait for rank 1 forever without the launcher/timeouts


def _rank1_hangs() -> None:
    if comm.get_rank() == 1:
        time.sleep(600)
    comm.all_reduce_sum(torch.ones(1))


def test_a_dead_rank_fails_the_run_with_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(DistributedLaunchError, match=r"rank 1 .* died with exit code 3") as info:
        launch(_rank1_dies, 2, backend="gloo", timeout=timedelta(seconds=600))
    assert info.value.rank == 1 and info.value.exit_code == 3
    # detected at once, not after the timeout (the margin covers two process starts on a loaded machine)
    assert time.perf_counter() - start < 300


def test_a_hanging_rank_times_out():
    start = time.perf_counter()
    with pytest.raises(DistributedLaunchError, match=r"rank 0 .*timed out \(3s"):
        launch(_rank1_hangs, 2, backend="gloo", timeout=timedelta(seconds=3))
    assert time.perf_counter() - start < 300  # 3 s timeout + process starts, not rank 1's 600 s sleep


def _two_machines_main(out_dir: str) -> None:
    seen = comm.all_gather((comm.get_rank(), comm.get_local_rank(), os.environ["GROUP_RANK"]))
    Path(out_dir, f"seen{comm.get_rank()}.txt").write_text(repr(seen))
    if comm.get_rank() == 1:
        os._exit(3)  # machine 1's only process dies
    comm.all_reduce_sum(torch.ones(1))  # machine 0 cannot see that process: it must fail, not hang


def test_two_machines_and_a_dead_remote_rank(tmp_path):
    """Two 'machines' (two launch() calls on this host) of one process each; machine 1's process dies."""
    import threading

    url = f"tcp://127.0.0.1:{_find_free_port()}"
    errors = {}

    def machine(rank):
        try:
            launch(_two_machines_main, 1, num_machines=2, machine_rank=rank, dist_url=url,
                   args=(str(tmp_path),), backend="gloo", timeout=timedelta(seconds=10))
        except DistributedLaunchError as e:
            errors[rank] = e

    threads = [threading.Thread(target=machine, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert not any(t.is_alive() for t in threads)
    seen = repr([(0, 0, "0"), (1, 0, "1")])
    assert (tmp_path / "seen0.txt").read_text() == seen == (tmp_path / "seen1.txt").read_text()
    assert errors[1].rank == 1 and errors[1].exit_code == 3
    assert errors[0].rank == 0  # a closed connection or the 10 s timeout, whichever gloo reports first


def test_launch_under_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        from bgd_det.engine.launch import launch
        from bgd_det.utils import comm

        def main(out):
            ranks = comm.all_gather((comm.get_rank(), comm.get_local_rank(), comm.get_world_size()))
            if comm.is_main_process():
                open(out, "w").write(repr(ranks))

        if __name__ == "__main__":
            launch(main, 1, args=(sys.argv[1],), backend="gloo")
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "ranks.txt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ranks.txt").read_text() == repr([(0, 0, 2), (1, 1, 2)])


def test_config_checks_and_single_process_kwargs(tmp_path):
    assert type(build_collectives(tiny_cfg(tmp_path))) is Collectives  # one process: identities
    check_distributed_config(tiny_cfg(tmp_path))  # no-op in one process
    with pytest.raises(ValueError, match="invalid topology"):
        launch(print, 2, num_machines=1, machine_rank=1)
    with pytest.raises(ValueError, match="only works on one machine"):
        launch(print, 1, num_machines=2, machine_rank=0, dist_url="auto")


def test_config_check_rejects_uneven_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    check_distributed_config(tiny_cfg(tmp_path, "FINETUNE.GLOBAL_ITERS", 2))  # batch 4 over 2: fine
    with pytest.raises(ValueError, match="FINETUNE.BATCH_SIZE=5 is not a multiple of the 2"):
        check_distributed_config(tiny_cfg(tmp_path, "FINETUNE.GLOBAL_ITERS", 2, "FINETUNE.BATCH_SIZE", 5))
    with pytest.raises(ValueError, match="CAPTURE_IMAGES=1"):
        check_distributed_config(tiny_cfg(tmp_path, "QUANT.CAPTURE_IMAGES", 1))
    no_capture = ("QUANT.METRIC", "identity", "QUANT.REFINE.ROUNDS", 0, "QUANT.CAPTURE_IMAGES", 1)
    check_distributed_config(tiny_cfg(tmp_path, *no_capture))  # nothing captured: one image is enough
    with pytest.raises(ValueError, match="CAPTURE_IMAGES=1"):  # a per-layer REFINE.ROUNDS override captures
        check_distributed_config(tiny_cfg(tmp_path, *no_capture, "QUANT.OVERRIDES", '[["fc", "REFINE.ROUNDS", 2]]'))
