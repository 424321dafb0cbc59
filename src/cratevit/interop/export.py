"""Export a CRATE model for sharing: safetensors weights, a Hugging Face folder, or an ONNX graph.

* :func:`export_safetensors` writes the weights (configuration in the file's metadata), optionally in the
  reference implementation's key layout;
* :func:`export_pretrained` writes a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``);
* :func:`export_onnx` writes a single-file ONNX graph (``images`` -> ``logits``) with a dynamic batch axis, built
  by PyTorch's ``torch.export``-based exporter; :func:`verify_onnx` runs it with onnxruntime against PyTorch.

Every writer first checks that its output can be written and raises :class:`ExportError` (one clear line) if not,
and writes through a temporary file renamed into place, so a failed export leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..checkpoint import atomic_path, save_safetensors
from ..errors import UserError, require
from ..models import CRATE
from .hub import save_pretrained

__all__ = [
    "FORMATS",
    "ExportError",
    "check_writable",
    "export_model",
    "export_onnx",
    "export_pretrained",
    "export_safetensors",
    "format_for",
    "verify_onnx",
]

FORMATS = ("safetensors", "onnx", "hf")
"""The formats ``cratevit export`` writes (``--format``; by default the output name's suffix decides)."""
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
PRETRAINED_FILES = ("config.json", "model.safetensors", "README.md")  # what save_pretrained writes


class ExportError(UserError):
    """An export that cannot be done; the message names the problem and the fix."""


def format_for(path: str | Path) -> str:
    """Infer the export format from the output name: ``.safetensors``, ``.onnx``, or a folder (``hf``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".onnx":
        return "onnx"
    if not suffix:
        return "hf"
    raise ExportError(f"cannot tell the export format from {str(path)!r}; pass --format {'|'.join(FORMATS)}")


def check_writable(path: str | Path, folder: bool = False) -> Path:
    """Return ``path`` if a file (or, with ``folder=True``, a folder) can be written there, else raise."""
    path = Path(path).expanduser()
    what = "folder" if folder else "file"
    if not folder and path.is_dir():
        raise ExportError(f"output {path} is a directory; pass a file path such as {path / ('model' + path.suffix)}")
    if folder and path.exists() and not path.is_dir():
        raise ExportError(f"output {path} is an existing file; pass a folder path for the {what}")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {path}: {ancestor} is a file, not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(f"cannot write {path}: permission denied in {ancestor}; choose a writable output path")
    return path


def export_safetensors(model: CRATE, path: str | Path, reference_keys: bool = False) -> Path:
    """Write the weights as ``.safetensors`` (configuration in the metadata); ``reference_keys`` uses the
    original implementation's key names (``transformer.layers.3.1.fn.weight``)."""
    return save_safetensors(check_writable(path), model, reference_keys=reference_keys)


def export_pretrained(model: CRATE, folder: str | Path) -> Path:
    """Write a Hugging Face folder (``config.json``, ``model.safetensors``, README.md model card)."""
    folder = check_writable(folder, folder=True)
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in PRETRAINED_FILES) if folder.is_dir() else []
    if foreign:
        raise ExportError(
            f"output folder {folder} already holds other files ({', '.join(foreign[:4])}); choose a new or empty folder"
        )
    save_pretrained(model, folder)
    return folder


@contextlib.contextmanager
def _eval_mode(model: CRATE) -> Iterator[CRATE]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def example_input(model: CRATE, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible batch of images of the model's input shape."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return torch.randn(batch_size, cfg.channels, *cfg.image_size, generator=generator).to(device)


def export_onnx(model: CRATE, path: str | Path, batch_size: int = 2, opset: int = ONNX_OPSET) -> Path:
    """Write the model as one ONNX file with input ``images`` (batch, C, H, W) and output ``logits``.

    The batch axis is dynamic; the image size is the model's configured one. ``batch_size`` is the example batch
    the graph is traced with (>= 2, so that the exporter keeps the axis symbolic).
    """
    if batch_size < 2:
        raise ExportError(f"the ONNX example batch must have at least 2 images (got {batch_size}); use --batch-size 2")
    require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnx", "ONNX export")
    path = check_writable(path)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _eval_mode(model), torch.no_grad(), atomic_path(path) as tmp:
        program = torch.onnx.export(
            model,
            (example_input(model, batch_size),),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(tmp), external_data=False)
    return path


def verify_onnx(model: CRATE, path: str | Path, batch_sizes: Sequence[int] = (2, 3)) -> dict[int, float]:
    """Run the ONNX file with onnxruntime (CPU) and PyTorch on the same images: max |difference| per batch size."""
    require("onnxruntime", "onnx", "ONNX verification")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = {}
    with _eval_mode(model), torch.no_grad():
        for n in batch_sizes:
            x = example_input(model, n, seed=n)
            expected = model(x).float().cpu()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.float().cpu().numpy()})
            if tuple(got.shape) != tuple(expected.shape):
                raise ExportError(f"{path}: ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
            diffs[n] = float((torch.from_numpy(got) - expected).abs().max())
    return diffs


def export_model(model: CRATE, output: str | Path, fmt: str | None = None, **options: object) -> Path:
    """Export ``model`` to ``output`` in ``fmt`` (inferred from the output name when None)."""
    fmt = fmt or format_for(output)
    if fmt == "safetensors":
        return export_safetensors(model, output, **options)  # type: ignore[arg-type]
    if fmt == "onnx":
        return export_onnx(model, output, **options)  # type: ignore[arg-type]
    if fmt == "hf":
        return export_pretrained(model, output)
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
