"""CPU inference of compressed models through the compiled ``bgd::`` ops vs dense eager PyTorch.

Everything is measured side by side in one process with interleaved runs (the order alternates
every round) and reported as medians; a ratio is the median over rounds of (variant time / dense
time in the same round). Weights are random: sizes and speeds do not depend on their values. The
dense model of a comparison holds the decoded weights of the compressed one, so both do the same
work (same detections in Mask R-CNN).

Sections:
  resnet50  torchvision ResNet-50, small blocks (d=9 for 3x3, d=4 for 1x1, K=256, fc K=1024, conv1
            dense), batch 1 and 8: dense eager / naive decode (index + conv) / compiled op /
            compiled op + folded BN.
  fc        Linear 1000x2048 (d=4, K=1024): F.linear vs the op (fused decode-dot up to 8 rows),
            and nn.Linear vs PQLinearInfer, N = 1, 4, 8, 32.
  memory    peak RSS (VmHWM) of fresh processes that load a model and run inference, minus an
            empty one.
  maskrcnn  torchvision Mask R-CNN R50-FPN, 800x800, batch 1.
  onnx      the ResNet-50 above exported by bgd_det.export (tools/export.py): dense eager / compiled op +
            folded BN / ONNX Runtime on the ONNX file (CPU provider, same thread count), batch 1 and 8;
            file sizes. Needs onnx, onnxscript, onnxruntime (pip install -e '.[export]').

Usage::

    python benchmarks/bench_inference.py                      # all sections
    python benchmarks/bench_inference.py --sections fc resnet50 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List


import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bgd_det import ops
from bgd_det.checkpoint import round_codebooks_to_fp16, save_compressed
from bgd_det.inference import PQLinearInfer, inference_bytes, max_scratch_bytes, to_inference
from bgd_det.quantization.plan import QuantRules, build_plan, execution_order
from bgd_det.quantization.pq import code_dtype
from bgd_det.quantization.size import model_size
from bgd_det.quantization.swap import pq_layers, swap_in_skeleton

MIB = 2.0**20
RESNET_RULES = dict(
    block_size_kxk=9, block_size_1x1=4, skip=["conv1"], overrides=[["fc", "N_CENTROIDS", 1024]]
)


# ----------------------------------------------------------------------------------------- helpers


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores visible, "
        f"torch.get_num_threads()={torch.get_num_threads()}, "
        f"torch {torch.__version__}, {ops.build_status()}"
    )


def interleaved(
    fns: Dict[str, Callable[[], object]],
    *,
    rounds: int,
    inner: int = 1,
    warmup: int = 2,
    before: Callable[[], object] = lambda: None,
) -> Dict[str, List[float]]:
    """Seconds per call of every function, one measurement of each per round, order alternating.

    ``before`` runs (untimed) before every measurement, e.g. to evict the caches.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for r in range(rounds):
            items = list(fns.items())
            for name, f in (items if r % 2 == 0 else items[::-1]):
                before()
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                times[name].append((time.perf_counter() - t0) / inner)
    return times


#: Variants timed in their own interleaved pair with the dense model: the naive one allocates every
#: dense weight in each forward (100+ MB of fresh pages), which slows whatever runs right after it.
SEPARATE = ("naive decode + conv",)


def compare(
    models: Dict[str, nn.Module],
    call: Callable[[nn.Module], object],
    *,
    rounds: int,
    warmup: int = 2,
) -> List[Dict]:
    """Rows of :func:`summarize` for ``models`` (one is "dense eager"), the SEPARATE ones paired."""

    def timed(group: Dict[str, nn.Module]) -> List[Dict]:
        fns = {k: (lambda m=m: call(m)) for k, m in group.items()}
        return summarize(interleaved(fns, rounds=rounds, warmup=warmup), "dense eager")

    rows = timed({k: m for k, m in models.items() if k not in SEPARATE})
    for name in (k for k in models if k in SEPARATE):
        rows.insert(1, timed({k: models[k] for k in ("dense eager", name)})[1])
    return rows


def summarize(times: Dict[str, List[float]], base: str) -> List[Dict]:
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        rows.append(
            dict(
                variant=name,
                median_ms=1e3 * statistics.median(ts),
                min_ms=1e3 * min(ts),
                ratio=statistics.median(ratios),
            )
        )
    return rows


def print_table(title: str, rows: List[Dict], cols: List[str]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(
                f"{v:.3f}"
                if isinstance(v, float) and v < 10
                else (f"{v:.1f}" if isinstance(v, float) else str(v))
            )
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def fill_random(model: nn.Module, seed: int = 0) -> None:
    """Random codes, fan-in scaled fp16-representable codebooks, non-trivial BN statistics."""
    g = torch.Generator().manual_seed(seed)
    for layer in pq_layers(model).values():
        codes = torch.randint(0, layer.n_centroids, tuple(layer.codes.shape), generator=g)
        fan_in = math.prod(layer.weight_shape[1:])  # keeps activations O(1) through deep nets
        cb = torch.randn(layer.n_centroids, layer.block_size, generator=g) / math.sqrt(fan_in)
        layer.set_quantization(codes.to(code_dtype(layer.n_centroids)), cb)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
    round_codebooks_to_fp16(model)


def compress(model: nn.Module, run: Callable[[nn.Module], object], rules: QuantRules) -> nn.Module:
    """Codebook-layer copy of ``model`` with random codes (the dense model is left untouched)."""
    pq = copy.deepcopy(model)
    swap_in_skeleton(pq, build_plan(pq, execution_order(pq, run), rules))
    fill_random(pq)
    return pq.eval()


def dense_twin(pq_model: nn.Module, dense: nn.Module) -> nn.Module:
    """``dense`` with the decoded weights (and the other parameters) of ``pq_model``."""
    twin = copy.deepcopy(dense)
    with torch.no_grad():
        for name, layer in pq_layers(pq_model).items():
            mod = twin.get_submodule(name)
            mod.weight.copy_(layer.decoded_weight())
        own = dict(twin.named_parameters())
        own.update(dict(twin.named_buffers()))
        for k, v in pq_model.state_dict().items():
            if k in own and own[k].shape == v.shape and not k.endswith(("codes", "codebook")):
                own[k].copy_(v)
    return twin.eval()


class Unchunked(nn.Module):
    """Runs ``model`` with chunked decoding off (every weight decoded whole), then restores it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        old = ops.chunk_bytes()  # chunk_bytes(n) returns the new value, not the old one
        ops.chunk_bytes(0)
        try:
            return self.model(x)
        finally:
            ops.chunk_bytes(old)


def variants(pq_model: nn.Module, dense: nn.Module) -> Dict[str, nn.Module]:
    compiled = to_inference(copy.deepcopy(pq_model), fold_bn=False)
    return {
        "dense eager": dense_twin(pq_model, dense),
        "naive decode + conv": pq_model,
        "compiled op": compiled,
        "compiled op, unchunked": Unchunked(compiled),
        "compiled op + folded BN": to_inference(copy.deepcopy(pq_model), fold_bn=True),
    }


# ---------------------------------------------------------------------------------------- sections


def bench_resnet50(args) -> List[Dict]:
    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    pq = compress(dense, lambda m: m(torch.randn(1, 3, 224, 224)), QuantRules(**RESNET_RULES))
    size = model_size(pq)
    print(
        f"\nResNet-50 small blocks: {size.compressed_mib:.2f} MiB compressed, "
        f"{size.dense_mib:.1f} MiB dense "
        f"(x{size.ratio:.1f})"
    )
    rows = resnet50_rows(variants(pq, dense), args)
    print_table(
        "ResNet-50 (224x224), latency per forward",
        rows,
        ["model", "batch", "variant", "median_ms", "min_ms", "ratio", "rounds"],
    )
    return rows


def resnet50_rows(models: Dict[str, Callable], args) -> List[Dict]:
    """Batch 1 and 8 at 224x224: every variant checked against "dense eager", then timed (:func:`compare`)."""
    rows = []
    for batch, rounds in ((1, args.rounds), (8, max(4, args.rounds // 3))):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            ref = models["dense eager"](x)
            for name, m in models.items():
                torch.testing.assert_close(m(x), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
        for r in compare(models, lambda m: m(x), rounds=rounds):
            rows.append(dict(model="ResNet-50", batch=batch, rounds=rounds, **r))
    return rows


class OrtModel:
    """An ONNX Runtime session called like a module (Tensor in, Tensor out)."""

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime

        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.name: x.numpy()})[0])


def bench_onnx(args) -> List[Dict]:
    from bgd_det.export import export_model

    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    pq = compress(dense, lambda m: m(torch.randn(1, 3, 224, 224)), QuantRules(**RESNET_RULES))
    folded = to_inference(copy.deepcopy(pq), fold_bn=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, path = os.path.join(tmp, "r50.pth"), os.path.join(tmp, "r50.onnx")
        save_compressed(ckpt, pq, arch="resnet50", num_classes=1000)
        export_model(folded, torch.randn(1, 3, 224, 224), path, "onnx")
        print(f"\nResNet-50 small blocks: checkpoint {os.path.getsize(ckpt) / MIB:.2f} MiB, ONNX file "
              f"{os.path.getsize(path) / MIB:.2f} MiB, dense fp32 {model_size(pq).dense_mib:.1f} MiB")
        models = {"dense eager": dense_twin(pq, dense), "compiled op + folded BN": folded,
                  "ONNX Runtime": OrtModel(path, torch.get_num_threads())}
        rows = resnet50_rows(models, args)
    print_table("ResNet-50 (224x224) exported to ONNX, latency per forward", rows,
                ["model", "batch", "variant", "median_ms", "min_ms", "ratio", "rounds"])
    return rows


def _reference_linear(x, codes, codebook, scale, bias):
    """``bgd::pq_linear``'s signature on the reference path (no compiled ops: main() warns)."""
    return ops.pq_linear(x, codes, codebook, scale=scale, bias=bias)


def bench_fc(args) -> List[Dict]:
    """F.linear vs the op, and nn.Linear vs the inference layer, warm and with caches evicted.

    The op is called through its operator handle, ``torch.ops.bgd.pq_linear.default``, as
    ``PQLinearInfer.forward`` calls it (``ops.pq_linear``'s Python checks are not part of the op);
    the layer columns time both modules' ``__call__`` (what a deployed model runs).
    """
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1024, (1000, 512), generator=g).to(torch.int16)
    cb = torch.randn(1024, 4, generator=g)
    bias = torch.randn(1000, generator=g)
    weight = ops.decode_weight(codes, cb, (1000, 2048))
    dense_layer = nn.Linear(2048, 1000)
    with torch.no_grad():
        dense_layer.weight.copy_(weight)
        dense_layer.bias.copy_(bias)
    pq_layer = PQLinearInfer(codes, cb, (1000, 2048), bias=bias)
    op = torch.ops.bgd.pq_linear.default if ops.ops_available() else _reference_linear
    flush = torch.zeros(16 << 20)  # 64 MiB, twice the L3 of the reference machine
    rows = []
    for n in (1, 4, 8, 32):
        x = torch.randn(n, 2048, generator=g)
        want = F.linear(x, weight, bias)
        for got in (op(x, codes, cb, None, bias), pq_layer(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        fns = {
            "dense F.linear": lambda: F.linear(x, weight, bias),
            "bgd::pq_linear": lambda: op(x, codes, cb, None, bias),
            "nn.Linear": lambda: dense_layer(x),
            "PQLinearInfer": lambda: pq_layer(x),
        }
        inner = 20 if n <= 8 else 5
        times = interleaved(fns, rounds=args.rounds * 4, inner=inner, warmup=5)
        # Cold: caches evicted before every call, as for a classifier head after the conv layers
        # (the eviction also reaches the interpreter's and the dispatcher's data, on both sides).
        cold = interleaved(fns, rounds=args.rounds * 2, warmup=2, before=lambda: flush.add_(1.0))
        row = dict(N=n, path="fused decode-dot" if n <= 8 else "decode + GEMM")
        for tag, t in (("warm", times), ("cold", cold)):
            dense, pq = t["dense F.linear"], t["bgd::pq_linear"]
            row[f"{tag}_dense_ms"] = 1e3 * statistics.median(dense)
            row[f"{tag}_pq_ms"] = 1e3 * statistics.median(pq)
            row[f"{tag}_speedup"] = statistics.median(d / p for d, p in zip(dense, pq))
        for tag, t in (("warm", times), ("cold", cold)):
            pairs = zip(t["nn.Linear"], t["PQLinearInfer"])
            row[f"layer_{tag}_speedup"] = statistics.median(d / p for d, p in pairs)
        rows.append(row)
    print_table(
        "FC 1000x2048 (d=4, K=1024, int16 codes), latency per call: F.linear vs the op "
        "(torch.ops.bgd.pq_linear.default) and nn.Linear vs PQLinearInfer (layer_*); warm = repeated "
        "calls (weights in L2/L3), cold = caches evicted (64 MiB touched) before each call",
        rows,
        [
            "N",
            "path",
            "warm_dense_ms",
            "warm_pq_ms",
            "warm_speedup",
            "cold_dense_ms",
            "cold_pq_ms",
            "cold_speedup",
            "layer_warm_speedup",
            "layer_cold_speedup",
        ],
    )
    return rows


# Memory runs use glibc as it comes and with a fixed mmap threshold: a fixed threshold turns off
# glibc's dynamic one, so freed large buffers go back to the OS at once and the peak is what was
# live (repeatable to 0.3 MiB) rather than what the allocator's history kept (several MiB apart
# from run to run).
MEMORY_ALLOCATORS = {
    "glibc default": {},
    "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_child(mode: str, path: str, batch: int) -> None:
    """Body of a memory-measurement process; prints one JSON line."""
    torch.set_num_threads(int(os.environ.get("BGD_BENCH_THREADS", "2")))
    import bgd_det  # every mode imports what loading needs, so only the model differs
    import bgd_det.config  # noqa: F401
    import bgd_det.modeling  # noqa: F401
    import bgd_det.inference  # noqa: F401  (torch.fx for BN folding)

    ops.ops_available()
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():  # page in the dense conv / GEMM code in every mode
        F.conv2d(torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3))
        F.linear(torch.randn(2, 8), torch.randn(4, 8))
    info: Dict = {"mode": mode}
    base = _status_bytes("VmRSS")
    if mode == "empty":
        model: nn.Module = nn.Identity()
    elif mode == "dense":  # built on meta, weights assigned from the checkpoint: no second copy
        with torch.device("meta"):
            model = torchvision.models.resnet50()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
        model.eval()
    else:
        model = bgd_det.load_compressed(path, inference=True, fold_bn=(mode == "compressed+fold"))
        if mode == "compressed, unchunked":
            ops.chunk_bytes(0)
        info["scratch_needed"] = max_scratch_bytes(model)
    info["model_bytes"] = inference_bytes(model)
    info["rss_after_load"] = _status_bytes("VmRSS") - base
    with torch.inference_mode():
        for _ in range(2):
            model(x)
    if mode.startswith("compressed") and ops.ops_available():
        info["scratch_bytes"] = int(torch.ops.bgd._scratch_bytes())
    info["hwm"] = _status_bytes("VmHWM")
    info["rss"] = _status_bytes("VmRSS")
    info["rss_file"] = _status_bytes("RssFile")
    print(json.dumps(info))


def bench_memory(args) -> List[Dict]:
    torch.manual_seed(0)
    dense = torchvision.models.resnet50().eval()
    pq = compress(dense, lambda m: m(torch.randn(1, 3, 224, 224)), QuantRules(**RESNET_RULES))
    size = model_size(pq)
    tmp = tempfile.mkdtemp(prefix="bgd_bench_")
    ckpt, dense_ckpt = os.path.join(tmp, "r50_pq.pth"), os.path.join(tmp, "r50_dense.pth")
    # Every process, its checkpoint: "empty" is the baseline the others are measured against.
    processes = {
        "empty": "",
        "compressed": ckpt,
        "compressed, unchunked": ckpt,
        "compressed+fold": ckpt,
        "dense": dense_ckpt,
    }
    save_compressed(ckpt, pq, arch="resnet50", num_classes=1000)
    torch.save(dense_twin(pq, dense).state_dict(), dense_ckpt)
    rows = []
    for allocator, extra_env in MEMORY_ALLOCATORS.items():
        env = dict(os.environ, BGD_BENCH_THREADS=str(torch.get_num_threads()), **extra_env)
        results = {}
        for mode, path in processes.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", mode, "--ckpt", path]
            out = subprocess.run(
                cmd + ["--batch", str(args.mem_batch)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        empty = results["empty"]
        # What the dense process holds beyond its weights (activations, oneDNN buffers and JIT
        # code, allocator caches, code pages) is paid by every model of this architecture: an
        # estimate of the runtime share.
        runtime = results["dense"]["hwm"] - empty["hwm"] - results["dense"]["model_bytes"]
        for mode in (m for m in processes if m != "empty"):
            r = results[mode]
            delta = r["hwm"] - empty["hwm"]
            # The largest layer's scratch at this input is what the forward grew the scratch to
            # (a conv decodes in chunks only when its output is small, so any-input is larger).
            used = r.get("scratch_bytes", 0)
            budget = size.compressed_bytes + used if mode != "dense" else r["model_bytes"]
            rows.append(
                dict(
                    allocator=allocator,
                    model=mode,
                    peak_minus_empty_mib=delta / MIB,
                    code_pages_mib=(r["rss_file"] - empty["rss_file"]) / MIB,
                    runtime_share_mib=runtime / MIB,
                    minus_runtime_mib=(delta - runtime) / MIB,
                    model_tensors_mib=r["model_bytes"] / MIB,
                    size_mib=size.compressed_mib if mode != "dense" else size.dense_mib,
                    any_input_scratch_mib=r.get("scratch_needed", 0) / MIB,
                    scratch_used_mib=used / MIB,
                    budget_mib=budget / MIB,
                    literal_target_met=str(delta <= budget) if mode != "dense" else "-",
                )
            )
    print_table(
        f"Resident memory, ResNet-50 batch {args.mem_batch}: peak RSS (VmHWM) minus an empty-model "
        "process; code pages = file-backed RSS gained; runtime share = what the dense process "
        "holds beyond its weights; budget = compressed size + the scratch this forward used (the "
        "largest layer's at this input); any-input scratch = the largest whole weight",
        rows,
        [
            "allocator",
            "model",
            "peak_minus_empty_mib",
            "code_pages_mib",
            "runtime_share_mib",
            "minus_runtime_mib",
            "model_tensors_mib",
            "size_mib",
            "any_input_scratch_mib",
            "scratch_used_mib",
            "budget_mib",
            "literal_target_met",
        ],
    )
    return rows


def bench_maskrcnn(args) -> List[Dict]:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    # score_thresh=0 keeps every model at 100 detections, so the mask head does the same work.
    dense = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, box_score_thresh=0.0
    ).eval()
    img = [torch.rand(3, 800, 800)]
    rules = QuantRules(
        block_size_kxk=9,
        block_size_1x1=4,
        block_size_linear=4,
        block_size_transpose=4,
        skip=["backbone.body.conv1"],
    )
    pq = compress(dense, lambda m: m(img), rules)
    size = model_size(pq)
    print(
        f"\nMask R-CNN R50-FPN small blocks: {size.compressed_mib:.2f} MiB compressed, "
        f"{size.dense_mib:.1f} MiB dense (x{size.ratio:.1f}), {len(pq_layers(pq))} codebook layers"
    )
    models = variants(pq, dense)
    n_det = {}
    with torch.inference_mode():
        for name, m in models.items():
            n_det[name] = len(m(img)[0]["boxes"])
    print("detections per variant:", n_det)
    rows = [
        dict(model="Mask R-CNN R50-FPN", batch=1, rounds=args.rounds_maskrcnn, **r)
        for r in compare(models, lambda m: m(img), rounds=args.rounds_maskrcnn, warmup=1)
    ]
    print_table(
        "Mask R-CNN R50-FPN (800x800), latency per forward",
        rows,
        ["model", "batch", "variant", "median_ms", "min_ms", "ratio", "rounds"],
    )
    return rows


SECTIONS = {
    "fc": bench_fc,
    "resnet50": bench_resnet50,
    "memory": bench_memory,
    "maskrcnn": bench_maskrcnn,
    "onnx": bench_onnx,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--rounds", type=int, default=24, help="interleaved rounds (ResNet-50 batch 1)"
    )
    parser.add_argument("--rounds-maskrcnn", type=int, default=5)
    parser.add_argument("--mem-batch", type=int, default=1)
    parser.add_argument("--json", default="", help="write all rows to this file")
    parser.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.ckpt, args.batch)
        return
    torch.set_num_threads(args.threads)
    if not ops.ops_available():
        print("WARNING: compiled ops not available, the 'compiled' rows use the reference decode")
    print(f"machine: {machine()}")
    results = {}
    for name in args.sections:
        t0 = time.time()
        results[name] = SECTIONS[name](args)
        print(f"({name}: {time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), **results}, f, indent=1)


if __name__ == "__main__":
    main()
