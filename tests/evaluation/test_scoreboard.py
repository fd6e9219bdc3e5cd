"""benchmarks/scoreboard.py on a tiny run: a run's saved evaluation stands in for evaluating its checkpoint again."""
from bgd_det.engine.pipeline import FINAL_CHECKPOINT, quantize_and_report
from tests.conftest import load_benchmark, tiny_cfg


def test_reused_evaluation_equals_a_fresh_one(tiny_images, tmp_path):
    quantize_and_report(tiny_cfg(tmp_path / "run"))
    ckpt = str(tmp_path / "run" / FINAL_CHECKPOINT)
    bench = load_benchmark("scoreboard")
    args = ["--assets", str(tmp_path / "datasets"), "--splits", "odd", "--only", "bgd_det", "--compare", "",
            "--ours", f"tiny={ckpt},{ckpt}"]
    (reused,) = bench.main(args)
    (fresh,) = bench.main(args + ["--re-evaluate"])
    assert reused["imagenet_sample_odd"]["from_run"] == [True, True]
    assert fresh["imagenet_sample_odd"]["from_run"] == [False, False]
    for key in ("top1", "top5", "n_images", "top1_per_seed", "hits"):
        assert reused["imagenet_sample_odd"][key] == fresh["imagenet_sample_odd"][key], key
    # scored on the even classes, the run's evaluation of the odd ones does not stand in
    (even,) = bench.main(args[:3] + ["even"] + args[4:])
    assert even["imagenet_sample_even"]["from_run"] == [False, False]
    assert even["imagenet_sample_even"]["n_images"] == 10
