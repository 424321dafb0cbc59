"""examples/emergence.ipynb runs top to bottom on a small built-in model and shows its figures inline."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from cratevit import create_model, save_checkpoint

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "emergence.ipynb"


@pytest.mark.slow
def test_emergence_notebook_executes(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "small.pt", create_model("crate_debug", num_classes=6, patch_size=4))
    monkeypatch.setenv("CRATEVIT_CHECKPOINT", str(ckpt))
    monkeypatch.setenv("CRATEVIT_SHORT_SIDE", "48")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 5 + 1 + 2 + 2  # head grids, PCA, the Figure 3 curves, the atom's patches and attention
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "small.pt: 2 layers, 2 heads" in text and "explained variance ratio" in text
    assert "random init R^c" in text
    assert "astronaut (this model) R^c" in text  # one photo's own curve (cratevit.inspection.image_curves)
    assert "usage rank" in text and "top classes after:" in text  # the atom and the intervention
