"""Reading the image files users have, and turning them into model inputs.

Any size and aspect ratio; grayscale, 16-bit, RGBA/LA (composited on white), palette PNGs, CMYK or JPEG; EXIF
orientation applied. A file that is not an image gets a one-line error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ..data.decode import MAX_PIXELS, ImageTooLarge, check_size, to_rgb
from ..errors import UserError
from ..presets import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "ImageTooLarge",
    "Prepared",
    "check_size",
    "eval_transform",
    "find_images",
    "image_size",
    "load_image",
    "prepare",
    "to_rgb",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File suffixes (lower case, with the dot) taken for images when a folder is listed."""
ResizeMode = Literal["keep-aspect", "model"]


def load_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB; errors name the file. Images over ``max_pixels`` are refused before decoding
    (a 140 KB PNG can claim 12000x12000 pixels)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory; pass image files (or use the folder option of the command)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limit applies (PIL's would only warn between 1x and 2x of it)
        with Image.open(path) as img:
            check_size(img, path, max_pixels)
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageTooLarge):
            raise
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable image file ({reason}); pass a PNG, JPEG or other image") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it; errors name the file, in one line."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise UserError(f"{path} is a directory; pass image files (or use the folder option of the command)")
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.width, img.height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable image file ({reason}); pass a PNG, JPEG or other image") from None


def find_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` or below it, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    return files


@dataclass
class Prepared:
    """A model input made from one image, and how it was made."""

    tensor: Tensor  # (3, H, W), normalised
    image: Image.Image  # the RGB image at the network's input size
    original_size: tuple[int, int]  # (height, width) of the file's image
    input_size: tuple[int, int]  # (height, width) fed to the network
    how: str  # a sentence stating the preprocessing (for output files)


def input_size_for(
    size: tuple[int, int], patch: tuple[int, int], model_size: tuple[int, int], mode: ResizeMode, short_side: int | None
) -> tuple[int, int]:
    """The network input size for an image of ``size`` (height, width)."""
    if mode == "model":
        return model_size
    if mode != "keep-aspect":
        raise UserError(f"resize mode must be 'keep-aspect' or 'model', got {mode!r}")
    h, w = size
    target = short_side or min(model_size)
    scale = target / min(h, w)
    return (
        max(patch[0], round(h * scale / patch[0]) * patch[0]),
        max(patch[1], round(w * scale / patch[1]) * patch[1]),
    )


def prepare(
    img: Image.Image,
    model_size: tuple[int, int],
    patch_size: tuple[int, int],
    mode: ResizeMode = "keep-aspect",
    short_side: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Prepared:
    """Resize ``img`` for the network and normalise it.

    ``"model"`` resizes to the model's training size (aspect ratio not kept); ``"keep-aspect"`` scales the shorter
    side to ``short_side`` (default: the model's size), rounds both sides to multiples of the patch size and relies
    on positional-embedding interpolation (``model.dynamic_img_size = True``).
    """
    img = to_rgb(img)
    original = (img.height, img.width)
    h, w = input_size_for(original, patch_size, model_size, mode, short_side)
    resized = img.resize((w, h), Image.Resampling.BICUBIC) if (h, w) != original else img
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 3 H W
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    if (h, w) == original == tuple(model_size):
        how = f"{w}x{h}, the model's input size (not resized)"
    elif (h, w) == tuple(model_size):
        how = f"resized {original[1]}x{original[0]} -> {w}x{h} (the model's input size)"
    elif mode == "model":
        how = f"resized {original[1]}x{original[0]} -> {w}x{h}"
    else:
        how = (
            f"resized {original[1]}x{original[0]} -> {w}x{h} keeping the aspect ratio; positional embedding "
            f"interpolated (bicubic) from {model_size[1]}x{model_size[0]}"
        )
    return Prepared(x, resized, original, (h, w), how)


def eval_transform(model: Any, mean: Any = None, std: Any = None) -> tuple[Any, str]:
    """timm's evaluation transform from the model's preprocessing metadata (``pretrained_cfg``: crop_pct,
    interpolation, and mean/std unless given), and a description of it. For the 224-px presets this is the
    reference evaluation, Resize(256) + CenterCrop(224), bilinear."""
    import timm.data

    size = tuple(model.config.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean", IMAGENET_MEAN)
    std = std if std is not None else cfg.get("std", IMAGENET_STD)
    crop_pct = float(cfg.get("crop_pct") or (0.875 if min(size) >= 128 else 1.0))
    interpolation = str(cfg.get("interpolation") or "bilinear")
    transform = timm.data.create_transform(
        input_size=(3, *size), interpolation=interpolation, mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
        crop_mode="center",
    )  # fmt: skip
    scale = int(size[0] / crop_pct)  # timm's rule: floor(size / crop_pct)
    return (
        transform,
        f"Resize({scale}) + CenterCrop({size[0]}), {interpolation} (crop_pct {crop_pct:g}: the model's metadata)",
    )
