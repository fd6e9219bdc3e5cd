"""Compiled codebook ops vs the reference decode + dense functional ops: numerics, chunking, scratch, errors."""

import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bgd_det import ops
from bgd_det import inference as inf
from bgd_det.quantization.layers import PQConv2d, PQLinear
from bgd_det.quantization.pq import pq_decode
from conftest import random_pq

BLOCK_SIZES = (4, 8, 9, 16, 18)


pytestmark = pytest.mark.usefixtures("compiled_ops")


@pytest.fixture(params=[1, 0], ids=["avx2", "scalar"])
def simd(request):
    """Run a test with the AVX2 kernels (when the CPU has them) and with the portable ones."""
    if request.param == 1 and ops.simd_mode(1) != 1:
        pytest.skip("CPU without AVX2/FMA")
    ops.simd_mode(request.param)
    yield request.param
    ops.simd_mode(1)


def ref_weight(codes, codebook, shape, scale=None):
    """Independent oracle: the reference decode, rows times scale."""
    w = pq_decode(codes, codebook, shape)
    return w if scale is None else w * scale.view(-1, *([1] * (len(shape) - 1)))


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("d", BLOCK_SIZES + (3, 5, 12))
@pytest.mark.parametrize("k", [256, 16, 1024])
def test_decode_matches_reference(simd, d, k):
    for cols in (7 * d, 7 * d - 1, 40 * d + 1):
        codes, cb = random_pq(13, cols, d, k, seed=d + cols)
        scale = torch.rand(13) + 0.5
        assert torch.equal(ops.decode_weight(codes, cb, (13, cols)), pq_decode(codes, cb, (13, cols)))
        torch.testing.assert_close(
            ops.decode_weight(codes, cb, (13, cols), scale=scale),
            ref_weight(codes, cb, (13, cols), scale),
            rtol=0,
            atol=0,
        )


# ------------------------------------------------------------------------------------------ conv2d

CONV_CASES = [
    # c_in, c_out, kernel, stride, padding, dilation, groups, d, hw
    (16, 24, 3, 1, 1, 1, 1, 9, 9),
    (16, 24, 3, 2, 1, 1, 1, 18, 10),
    (16, 24, 3, 1, 2, 2, 2, 8, 9),
    (12, 12, 3, 1, 1, 1, 12, 9, 7),  # depthwise
    (32, 16, 1, 1, 0, 1, 1, 4, 6),
    (32, 16, 1, 2, 0, 1, 1, 16, 6),
    (32, 16, 1, 1, 0, 1, 1, 4, 2),  # 1x1 with <= 8 pixels: fused path
    (32, 16, 1, 2, 0, 1, 1, 8, 3),  # strided 1x1, fused path
    (32, 16, 1, 1, 0, 1, 4, 4, 2),  # grouped 1x1: decode path
    (10, 6, 3, 1, 1, 1, 1, 4, 5),  # 90 columns: partial last block for d=4
    (8, 8, (1, 3), (2, 1), (0, 1), 1, 1, 9, 5),
    (8, 8, 5, 1, 2, 1, 1, 16, 1),  # 1x1 spatial input
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("batch", [1, 3])
def test_conv2d_matches_reference(simd, case, batch):
    c_in, c_out, kernel, stride, padding, dilation, groups, d, hw = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    shape = (c_out, c_in // groups, kh, kw)
    cols = shape[1] * kh * kw
    codes, cb = random_pq(c_out, cols, d, 256 if c_out * cols // d >= 256 else 16, seed=cols)
    x = torch.randn(batch, c_in, hw, hw)
    bias, scale = torch.randn(c_out), torch.rand(c_out) + 0.5
    for b, s in ((None, None), (bias, scale)):
        got = ops.pq_conv2d(
            x,
            codes,
            cb,
            shape,
            scale=s,
            bias=b,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
        )
        want = F.conv2d(x, ref_weight(codes, cb, shape, s), b, stride, padding, dilation, groups)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.is_contiguous()


def test_conv2d_int16_codes_and_channels_last_input():
    shape = (24, 16, 3, 3)
    codes, cb = random_pq(24, 144, 9, 1024)
    assert codes.dtype == torch.int16
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        ops.pq_conv2d(x, codes, cb, shape, padding=1),
        F.conv2d(x, pq_decode(codes, cb, shape), None, 1, 1),
        rtol=1e-4,
        atol=1e-4,
    )


def test_conv_transpose2d_matches_reference():
    shape = (16, 8, 2, 2)  # [C_in, C_out, kh, kw]
    codes, cb = random_pq(16, 32, 4, 64)
    x, bias = torch.randn(2, 16, 5, 5), torch.randn(8)
    got = ops.pq_conv_transpose2d(x, codes, cb, shape, bias=bias, stride=2)
    torch.testing.assert_close(
        got, F.conv_transpose2d(x, pq_decode(codes, cb, shape), bias, 2), rtol=1e-4, atol=1e-4
    )


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("d", BLOCK_SIZES + (5,))
def test_linear_matches_reference(simd, d):
    for k in (256, 1024):
        for out_f, in_f in ((37, 16 * d), (5, 11 * d - 1), (64, 72), (9, 300 * d + 3)):
            codes, cb = random_pq(out_f, in_f, d, k, seed=in_f + k)
            w = pq_decode(codes, cb, (out_f, in_f))
            bias, scale = torch.randn(out_f), torch.rand(out_f) + 0.5
            tol = dict(rtol=1e-4, atol=2e-6 * in_f)  # sums of in_f products in another order
            for n in (1, 2, 3, 4, 5, 7, 8, 9, 33):
                x = torch.randn(n, in_f)
                torch.testing.assert_close(
                    ops.pq_linear(x, codes, cb, bias=bias), F.linear(x, w, bias), **tol
                )
            x = torch.randn(2, 3, in_f)  # leading batch dims
            torch.testing.assert_close(
                ops.pq_linear(x, codes, cb, scale=scale), F.linear(x, w * scale[:, None]), **tol
            )
    assert ops.pq_linear(torch.randn(0, in_f), codes, cb).shape == (0, out_f)


def test_scratch_is_reused_and_threads_are_independent():
    layers = [(random_pq(64, 576, 9, 256, seed=i), (64, 64, 3, 3)) for i in range(3)]
    x = torch.randn(1, 64, 8, 8)
    want = [F.conv2d(x, pq_decode(c, cb, s), padding=1) for (c, cb), s in layers]
    grown = None
    for _ in range(3):
        for ((c, cb), s), w in zip(layers, want):
            torch.testing.assert_close(
                ops.pq_conv2d(x, c, cb, s, padding=1), w, rtol=1e-4, atol=1e-4
            )
        # grown at most once (to the largest layer seen on this thread), then reused
        assert grown is None or torch.ops.bgd._scratch_bytes() == grown
        grown = torch.ops.bgd._scratch_bytes()
    assert grown >= 64 * 576 * 4

    errors = []

    def worker(i):
        try:
            for _ in range(20):
                (c, cb), s = layers[i]
                torch.testing.assert_close(
                    ops.pq_conv2d(x, c, cb, s, padding=1), want[i], rtol=1e-4, atol=1e-4
                )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ----------------------------------------------------------------------------------------- opcheck


@pytest.fixture
def small_chunks():
    """Chunk every conv2d weight above 32 KiB whose output is at most 8 KiB (restored after)."""
    old = ops.chunk_bytes()
    ops.chunk_bytes(32 << 10)
    yield 32 << 10
    ops.chunk_bytes(old)


# A conv2d weight of 40 x 576 floats (90 KiB): in 32 KiB chunks, 3 chunks of ceil(40 / 3) = 14 rows,
# rounded up to 16 (16 + 16 + 8). Its outputs on the 4x4 inputs below stay within 8 KiB.
CHUNKED_SHAPE = (40, 64, 3, 3)


def test_decode_rows_rule():
    old = ops.chunk_bytes()
    try:
        assert ops.chunk_bytes(2 << 20) == 2 << 20
        small = 392 << 10  # ResNet-50's largest chunked output at batch 1
        assert ops.decode_rows_at_once("conv2d", 512, 576, out_bytes=small) == 512  # 1.1 MiB
        # 9 MiB: 5 chunks of ceil(512 / 5) = 103 rows, rounded up to 112 (a multiple of 16)
        assert ops.decode_rows_at_once("conv2d", 512, 4608, out_bytes=small) == 112
        assert ops.decode_rows_at_once("conv2d", 1000, 2048, out_bytes=small) == 256  # 4 x 250
        assert ops.decode_rows_at_once("conv2d", 3, 1 << 20, out_bytes=0) == 3  # <= the weight
        # chunks only while the output is at most a quarter of chunk_bytes (512 KiB here)
        assert ops.decode_rows_at_once("conv2d", 512, 4608, out_bytes=512 << 10) == 112
        assert ops.decode_rows_at_once("conv2d", 512, 4608, out_bytes=(512 << 10) + 4) == 512
        assert ops.decode_rows_at_once("conv2d", 512, 4608) == 512  # any output: the most
        # grouped convs, linear decode + GEMM and transposed convs decode their whole weight
        assert ops.decode_rows_at_once("conv2d", 512, 4608, groups=2, out_bytes=small) == 512
        assert ops.decode_rows_at_once("linear", 1000, 2048, out_bytes=small) == 1000
        assert ops.decode_rows_at_once("conv_transpose2d", 512, 4608, out_bytes=small) == 512
        ops.chunk_bytes(0)
        assert ops.decode_rows_at_once("conv2d", 512, 4608, out_bytes=small) == 512
    finally:
        ops.chunk_bytes(old)
    with pytest.raises(ValueError, match="nbytes must be -1 .* got -2"):
        ops.chunk_bytes(-2)
    with pytest.raises(RuntimeError, match="layer must be 'conv2d', 'linear' or .* got 'conv3d'"):
        ops.decode_rows_at_once("conv3d", 8, 8)
    with pytest.raises(RuntimeError, match="out_bytes must be -1 .* got -5"):
        ops.decode_rows_at_once("conv2d", 8, 8, out_bytes=-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_chunked_conv2d_and_linear_match_reference(simd, small_chunks, batch, channels_last):
    codes, cb = random_pq(40, 576, 9, 256)
    x = torch.randn(batch, 64, 4, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bias, scale = torch.randn(40), torch.rand(40) + 0.5
    for stride, padding, dilation in ((1, 1, 1), (2, 0, 1), (1, 2, 2)):
        for b, s in ((None, None), (bias, scale)):
            got = ops.pq_conv2d(
                x, codes, cb, CHUNKED_SHAPE, scale=s, bias=b, stride=stride, padding=padding,
                dilation=dilation,
            )
            w = ref_weight(codes, cb, CHUNKED_SHAPE, s)
            want = F.conv2d(x, w, b, stride, padding, dilation)
            out_bytes = 4 * want.numel()
            assert ops.decode_rows_at_once("conv2d", 40, 576, out_bytes=out_bytes) == 16
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert got.stride() == want.stride()  # the same memory format as the dense conv
    # a larger output is convolved whole; grouped convs are never chunked; both still match
    xl = torch.randn(batch, 64, 9, 9)
    assert ops.decode_rows_at_once("conv2d", 40, 576, out_bytes=4 * batch * 40 * 81) == 40
    torch.testing.assert_close(
        ops.pq_conv2d(xl, codes, cb, CHUNKED_SHAPE, padding=1),
        F.conv2d(xl, ref_weight(codes, cb, CHUNKED_SHAPE), None, 1, 1),
        rtol=1e-4,
        atol=1e-4,
    )
    g_codes, g_cb = random_pq(40, 288, 9, 256, seed=1)
    got = ops.pq_conv2d(x, g_codes, g_cb, (40, 32, 3, 3), padding=1, groups=2)
    want = F.conv2d(x, pq_decode(g_codes, g_cb, (40, 32, 3, 3)), None, 1, 1, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # linear on more than 8 rows (decode + GEMM, whole: the chunk size does not apply); int16 codes
    l_codes, l_cb = random_pq(50, 100, 4, 1024, seed=2)
    xl = torch.randn(batch, 12, 100)
    torch.testing.assert_close(
        ops.pq_linear(xl, l_codes, l_cb, scale=scale.repeat(2)[:50], bias=bias.repeat(2)[:50]),
        F.linear(xl, ref_weight(l_codes, l_cb, (50, 100), scale.repeat(2)[:50]),
                 bias.repeat(2)[:50]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_opcheck_chunked(small_chunks):
    codes, cb = random_pq(40, 576, 9, 256)
    x = torch.randn(2, 64, 4, 4)  # output 2 x 40 x 4 x 4 floats: 5 KiB, chunked
    assert ops.decode_rows_at_once("conv2d", 40, 576, out_bytes=4 * 2 * 40 * 16) < 40
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    scale, bias = torch.rand(40), torch.randn(40)
    conv_args = (x, codes, cb, list(CHUNKED_SHAPE), scale, bias, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.bgd.pq_conv2d.default, conv_args, test_utils=utils)
    l_codes, l_cb = random_pq(40, 100, 4, 64, seed=3)
    torch.library.opcheck(
        torch.ops.bgd.pq_linear.default,
        (torch.randn(12, 100), l_codes, l_cb, None, torch.randn(40)),
        test_utils=utils,
    )


def test_chunked_ops_keep_a_chunk_sized_scratch_and_check_every_chunk(small_chunks):
    codes, cb = random_pq(40, 576, 9, 256)
    x, x_large = torch.randn(1, 64, 4, 4), torch.randn(1, 64, 9, 9)
    seen = {}

    def worker(run, key):  # a fresh thread: its scratch grows only to what the op needs
        run()
        seen[key] = int(torch.ops.bgd._scratch_bytes())

    l_codes, l_cb = random_pq(40, 100, 4, 64)
    for key, run in (
        ("conv", lambda: ops.pq_conv2d(x, codes, cb, CHUNKED_SHAPE, padding=1)),
        ("conv, large output", lambda: ops.pq_conv2d(x_large, codes, cb, CHUNKED_SHAPE, padding=1)),
        ("linear", lambda: ops.pq_linear(torch.randn(12, 100), l_codes, l_cb)),
    ):
        t = threading.Thread(target=worker, args=(run, key))
        t.start()
        t.join()
    # one chunk; the whole weight for a 12.7 KiB output; linear GEMMs are not chunked
    assert seen == {
        "conv": 16 * 576 * 4, "conv, large output": 40 * 576 * 4, "linear": 40 * 100 * 4
    }
    layer = PQConv2d.from_dense(nn.Conv2d(64, 40, 3), block_size=9, n_centroids=256)
    model = inf.to_inference(nn.Sequential(layer))
    assert model[0].scratch_bytes(out_bytes=4 * 40 * 16) == 16 * 576 * 4
    assert inf.max_scratch_bytes(model) == 40 * 576 * 4  # any input: a large output decodes whole
    linear = inf.to_inference(
        nn.Sequential(PQLinear.from_dense(nn.Linear(100, 40), block_size=4, n_centroids=64))
    )
    assert inf.max_scratch_bytes(linear) == 40 * 100 * 4
    # a bad code in the last chunk is still caught
    bad = codes.to(torch.int16)
    bad[-1, -1] = 300
    with pytest.raises(RuntimeError, match="out of range for a codebook of 256 centroids"):
        ops.pq_conv2d(x, bad, cb, CHUNKED_SHAPE, padding=1)


def test_opcheck():
    codes, cb = random_pq(8, 36, 9, 16)
    x = torch.randn(2, 4, 5, 5)
    bias, scale = torch.randn(8), torch.rand(8)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.bgd.pq_decode.default, (codes, cb, [8, 4, 3, 3], scale), test_utils=utils
    )
    conv_args = (x, codes, cb, [8, 4, 3, 3], scale, bias, [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.bgd.pq_conv2d.default, conv_args, test_utils=utils)
    lin_codes, lin_cb = random_pq(6, 20, 4, 16)
    for n in (3, 12):
        torch.library.opcheck(
            torch.ops.bgd.pq_linear.default,
            (torch.randn(n, 20), lin_codes, lin_cb, None, torch.randn(6)),
            test_utils=utils,
        )
    t_codes, t_cb = random_pq(4, 12, 4, 16)
    torch.library.opcheck(
        torch.ops.bgd.pq_conv_transpose2d.default,
        (x, t_codes, t_cb, [4, 3, 2, 2], None, [2, 2], [0, 0], [0, 0], 1, [1, 1]),
        test_utils=utils,
    )
    # Inputs that require grad: the op has no autograd formula and must not pretend to have one.
    xg = x.clone().requires_grad_()
    torch.library.opcheck(
        torch.ops.bgd.pq_conv2d.default,
        (xg,) + conv_args[1:],
        test_utils="test_autograd_registration",
    )


# --------------------------------------------------------------------------------------- bad input


def _conv(x=None, codes=None, cb=None, shape=(8, 4, 3, 3), **kw):
    c0, cb0 = random_pq(8, 36, 9, 16)
    x = torch.randn(1, 4, 5, 5) if x is None else x
    return torch.ops.bgd.pq_conv2d(
        x,
        c0 if codes is None else codes,
        cb0 if cb is None else cb,
        list(shape),
        kw.get("scale"),
        kw.get("bias"),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
    )


@pytest.mark.parametrize("simd_mode", [1, 0])
def test_bad_inputs_raise_clear_errors(simd_mode):
    ops.simd_mode(simd_mode)
    codes, cb = random_pq(8, 36, 9, 16)
    cases = [
        (dict(codes=codes.int()), "codes must be uint8"),
        (dict(codes=codes.float()), "codes must be uint8"),
        (dict(codes=codes.flatten()), "codes must be 2-D"),
        (dict(codes=codes[:, :2].contiguous()), "cannot hold weight rows"),
        (dict(codes=codes[:4]), "codes has 4 rows"),
        (dict(codes=torch.cat([codes, codes], 1)[:, ::2]), "codes must be contiguous"),
        (dict(cb=cb.half()), "codebook must be float32"),
        (dict(cb=cb.double()), "codebook must be float32"),
        (dict(cb=cb.t().contiguous().t()), "codebook must be contiguous"),
        (dict(cb=cb[:, :4].contiguous()), "cannot hold weight rows"),
        (dict(codes=codes.clone().index_fill_(1, torch.tensor([3]), 16)), "codes out of range"),
        (dict(x=torch.randn(1, 4, 5, 5).double()), "input must be float32"),
        (dict(x=torch.randn(1, 5, 5, 5)), "input has 5 channels"),
        (dict(x=torch.randn(4, 5, 5)), "input must be 4-D"),
        (dict(bias=torch.randn(7)), "bias must have shape"),
        (dict(scale=torch.randn(8).half()), "scale must be float32"),
        (dict(scale=torch.randn(16)[::2]), "scale must be contiguous"),
        (dict(shape=(8, 4, 3)), "weight_shape must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _conv(**kwargs)
    big, big_cb = random_pq(6, 32, 4, 1024)
    for bad in (1024, -1, 5000):
        c = big.clone()
        c[5, 7] = bad
        with pytest.raises(RuntimeError, match="codes out of range"):
            torch.ops.bgd.pq_linear(torch.randn(1, 32), c, big_cb, None, None)  # fused path
        with pytest.raises(RuntimeError, match="codes out of range"):
            torch.ops.bgd.pq_linear(torch.randn(20, 32), c, big_cb, None, None)  # decode path
        with pytest.raises(RuntimeError, match="codes out of range"):
            torch.ops.bgd.pq_decode(c, big_cb, [6, 32], None)
    ops.simd_mode(1)


def test_fused_linear_checks_every_code_position(simd):
    # The N=1, d=4 kernel masks codes to a power-of-two K and checks them after the dot products;
    # other K are checked first. A bad code in a 4-row tile, a leftover row, a single block after
    # the 4-block groups and the partial last block must all be caught, never read out of bounds.
    for k in (1024, 1000, 128):
        for cols in (32, 30):  # 8 full blocks / 7 full blocks + a partial one
            codes, cb = random_pq(6, cols, 4, k, seed=cols)
            x = torch.randn(1, cols)
            torch.testing.assert_close(
                ops.pq_linear(x, codes, cb), F.linear(x, pq_decode(codes, cb, (6, cols))),
                rtol=1e-4, atol=1e-4,
            )
            last = codes.shape[1] - 1
            for row, block in ((1, 2), (5, 1), (2, 5), (3, last)):
                for bad in (k, k + 3, -1):
                    if bad < 0 and codes.dtype == torch.uint8:
                        continue
                    c = codes.clone()
                    c[row, block] = bad
                    with pytest.raises(RuntimeError, match="codes out of range"):
                        torch.ops.bgd.pq_linear(x, c, cb, None, None)


# ---------------------------------------------------------------------------------------- fallback


def test_fallback_to_reference_logs_once(monkeypatch, caplog):
    from bgd_det.ops import _build

    monkeypatch.setattr(ops, "_state", {"tried": False, "ok": False, "reason": None})
    monkeypatch.setattr(_build, "load_library", lambda **_: "CalledProcessError: no compiler")
    codes, cb = random_pq(8, 36, 9, 16)
    x, bias, scale = torch.randn(2, 4, 5, 5), torch.randn(8), torch.rand(8)
    with caplog.at_level(logging.WARNING, logger="bgd_det.ops"):
        got = ops.pq_conv2d(x, codes, cb, (8, 4, 3, 3), scale=scale, bias=bias, padding=1)
        lin = ops.pq_linear(torch.randn(3, 36), codes, cb, bias=bias)
        dec = ops.decode_weight(codes, cb, (8, 36))
    assert not ops.ops_available()
    assert len([r for r in caplog.records if "reference decode" in r.getMessage()]) == 1
    monkeypatch.undo()
    assert ops.ops_available()
    torch.testing.assert_close(
        got,
        ops.pq_conv2d(x, codes, cb, (8, 4, 3, 3), scale=scale, bias=bias, padding=1),
        rtol=1e-4,
        atol=1e-4,
    )
    assert lin.shape == (3, 8) and torch.equal(dec, ops.decode_weight(codes, cb, (8, 36)))


def test_build_disabled_by_env(monkeypatch):
    from bgd_det.ops._build import load_library

    monkeypatch.setenv("BGD_NO_EXT", "1")
    assert "BGD_NO_EXT" in load_library()
