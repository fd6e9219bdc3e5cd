"""benchmarks/scoreboard.py on tiny runs: a run's saved evaluation stands in for evaluating its checkpoint again
where it scored the same images the same way."""
from bgd_det.engine.pipeline import FINAL_CHECKPOINT, quantize_and_report
from tests.conftest import load_benchmark, tiny_cfg


def test_reused_evaluation_equals_a_fresh_one(tiny_images, tmp_path):
    quantize_and_report(tiny_cfg(tmp_path / "std", "INPUT.RESIZE", 256, "INPUT.CROP", 224))  # the scoreboard's input
    quantize_and_report(tiny_cfg(tmp_path / "small"))  # 36 / 32 px: scored differently
    std, small = (str(tmp_path / run / FINAL_CHECKPOINT) for run in ("std", "small"))
    bench = load_benchmark("scoreboard")
    args = ["--assets", str(tmp_path / "datasets"), "--splits", "odd", "--only", "bgd_det", "--compare", "",
            "--ours", f"std={std},{std}", "--ours", f"small={small}"]
    reused = bench.main(args)
    fresh = bench.main(args + ["--re-evaluate"])
    assert [r["imagenet_sample_odd"]["from_run"] for r in reused] == [[True, True], [False]]
    assert [r["imagenet_sample_odd"]["from_run"] for r in fresh] == [[False, False], [False]]
    for key in ("top1", "top5", "n_images", "top1_per_seed", "hits"):
        assert reused[0]["imagenet_sample_odd"][key] == fresh[0]["imagenet_sample_odd"][key], key
    # scored on the even classes, the run's evaluation of the odd ones does not stand in
    even = bench.main(args[:3] + ["even"] + args[4:])
    assert [r["imagenet_sample_even"]["from_run"] for r in even] == [[False, False], [False]]
