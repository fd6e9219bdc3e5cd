"""Deployment export: ONNX (decode in standard operators, run by ONNX Runtime) and torch.export (.pt2) round trips of
a compressed ResNet-18 through tools/export.py, against the training-time model."""
import os

import pytest
import torch
from torch import nn

from bgd_det import ops
from bgd_det.export import export_model, load_pt2, run_onnx
from conftest import load_tool

N_CODEBOOK_LAYERS = 20  # 16 block convs + 3 downsample convs + fc; conv1 stays dense (9,408 weights)


@pytest.fixture(params=["compiled", "reference"])
def decode(request, monkeypatch):
    """The inference layers through the compiled ops (translated to ONNX operators) or the reference decode."""
    if request.param == "compiled" and not ops.ops_available():
        pytest.skip(f"the compiled ops are not available: {ops.build_status()}")
    if request.param == "reference":
        ops.ops_available()
        monkeypatch.setitem(ops._state, "ok", False)
    return request.param


def _export(tmp_path, checkpoint, fmt, batch=2):
    out = str(tmp_path / f"model.{fmt}")
    result = load_tool("export").main(["--checkpoint", checkpoint, "--format", fmt, "--output", out,
                                       "--input-size", "64", "--batch", str(batch)])
    return out, result


def test_onnx_runs_in_onnxruntime_with_codes_not_dense_weights(tmp_path, resnet18_checkpoint, decode):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path, x, want = resnet18_checkpoint
    out, result = _export(tmp_path, path, "onnx")
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] <= 1e-4 * result["max_abs_output"]
    got = run_onnx(out, x)  # against the training-time model (codebook layers, BatchNorm not folded)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    graph = onnx.load(out).graph
    codes = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT16)]
    assert len(codes) == N_CODEBOOK_LAYERS
    largest_float = max(int(torch.Size(t.dims).numel()) for t in graph.initializer
                        if t.data_type == onnx.TensorProto.FLOAT)
    assert largest_float == 64 * 3 * 7 * 7  # conv1: no decoded weight is stored
    assert os.path.getsize(out) < 1.5 * os.path.getsize(path)
    if decode == "compiled":  # every bgd:: op became Gather -> Reshape -> Conv / MatMul
        kinds = [n.op_type for n in graph.node]
        assert kinds.count("Gather") == N_CODEBOOK_LAYERS and "MatMul" in kinds
        assert all(n.domain in ("", "ai.onnx") for n in graph.node)


def test_pt2_round_trip_keeps_the_ops(tmp_path, resnet18_checkpoint, decode):
    path, x, want = resnet18_checkpoint
    out, result = _export(tmp_path, path, "pt2", batch=1)  # traced on one image, the batch stays dynamic
    assert result["max_abs_diff"] <= 1e-4 * result["max_abs_output"]
    program = torch.export.load(out)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert ("bgd.pq_conv2d.default" in targets) == (decode == "compiled")
    with torch.inference_mode():
        got = load_pt2(out)(torch.cat([x, x]))  # the batch dimension is dynamic
    torch.testing.assert_close(got, torch.cat([want, want]), rtol=1e-4, atol=1e-4 * want.abs().max().item())


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_untraceable_model_is_one_line_error(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    with pytest.raises(ValueError, match=f"_DataDependent cannot be exported as {fmt}: torch.export could not") as e:
        export_model(_DataDependent(), torch.randn(1, 3, 8, 8), str(tmp_path / "x"), fmt)
    assert "\n" not in str(e.value)


def test_unknown_format_names_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="export format 'tflite'; allowed: pt2, onnx"):
        export_model(_DataDependent(), torch.randn(1, 3, 8, 8), str(tmp_path / "x"), "tflite")
