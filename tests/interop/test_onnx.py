"""ONNX export: the graph run by onnxruntime matches PyTorch within 1e-4 for two batch sizes."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from cratevit import CRATE, create_model
from cratevit.cli import main
from cratevit.interop.export import ExportError, export_onnx, verify_onnx

ATOL = 1e-4


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": x.numpy()})[0]


def test_debug_model_matches_onnxruntime_with_a_dynamic_batch(tmp_path):
    model = create_model("crate_debug").train()  # export must not depend on (or change) the mode
    path = export_onnx(model, tmp_path / "debug.onnx", batch_size=2)
    assert model.training
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    model.eval()
    for n in (2, 5, 1):  # the exported batch size and others
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        got = run_onnx(path, x)
        assert got.shape == (n, 10)
        assert np.abs(got - expected).max() <= ATOL
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*tmp"))  # one self-contained file


def test_two_stage_head_mean_pool_and_explicit_attention(tmp_path):
    model = CRATE(
        image_size=(32, 48),
        patch_size=8,
        num_classes=4,
        dim=48,
        depth=2,
        heads=3,
        dim_head=16,
        pool="mean",
        head_hidden_dim=24,
        attn_impl="math",
    )
    path = export_onnx(model, tmp_path / "variant.onnx", batch_size=3)
    diffs = verify_onnx(model, path, batch_sizes=(3, 2))
    assert set(diffs) == {3, 2} and max(diffs.values()) <= ATOL


@pytest.mark.slow
def test_crate_tiny_224_matches_onnxruntime(tmp_path):
    model = create_model("crate_tiny")
    path = export_onnx(model, tmp_path / "tiny.onnx")
    diffs = verify_onnx(model, path, batch_sizes=(2, 3))
    assert max(diffs.values()) <= ATOL, diffs


def test_bad_onnx_outputs_are_clear_errors(tmp_path):
    model = create_model("crate_debug")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="file is a file, not a folder"):
        export_onnx(model, tmp_path / "file" / "m.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx(model, tmp_path)
    with pytest.raises(ExportError, match="at least 2 images"):
        export_onnx(model, tmp_path / "m.onnx", batch_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_onnx_export_reports_the_onnxruntime_difference(tmp_path, capsys):
    model = create_model("crate_debug")
    from cratevit import save_checkpoint

    save_checkpoint(tmp_path / "ours.pth", model, epoch=1)
    out = tmp_path / "out" / "m.onnx"
    assert (
        main(["export", str(tmp_path / "ours.pth"), "--format", "onnx", "--output", str(out), "--batch-size", "3"]) == 0
    )
    text = capsys.readouterr().out
    assert f"wrote {out} (onnx, crate_debug" in text
    assert "onnxruntime vs PyTorch max |logit difference|: batch 3: " in text and "batch 4: " in text
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert np.abs(run_onnx(out, x) - model.eval()(x).numpy()).max() <= ATOL
