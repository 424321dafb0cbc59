"""Will a training run fit in memory? An estimate made before the first step, so that a run the machine
cannot hold says so at once instead of being killed by the kernel after minutes of silence.

Peak memory of a CPU training step = a fixed part (the Python process with torch, the model, its gradients and
AdamW's two moments: 16 bytes per parameter) + the batch times what one image's forward pass keeps for the
backward pass, the latter from the family's activation model (its record's ``activation_bytes``; a family
without one is not checked). Per CRATE layer and image, with ``n`` tokens, width ``d``, ``h`` heads and inner width ``i``:

* float32: the layer input, both LayerNorm outputs, ``Z^{l+1/2}``, the ISTA residual and its output (``6 n d``)
  and the projections, the attention output and its flattened copy (``3 n i``), 4 bytes each (the fused
  attention kernel keeps no ``n x n`` matrix);
* bfloat16 autocast: five float32 ``n d`` tensors, three bfloat16 ``n d`` copies, three bfloat16 ``n i`` tensors
  and the bfloat16 ``h n n`` attention (the explicit softmax: ``26 n d + 6 n i + 2 h n n`` bytes).

Measured (peak RSS of two AdamW steps, 2 CPU threads, torch 2.14): crate_small at 224 px, batch 4 / 12: float32
1,182 / 1,533 MiB, bfloat16 1,173 / 1,636 MiB; this estimate gives 1,192 / 1,575 and 1,214 / 1,640 MiB.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..registry import family_for, is_family_model

__all__ = [
    "available_memory",
    "check_training_memory",
    "estimate_training_memory",
    "largest_batch",
    "per_image_bytes",
]

MIB = 1024**2
BASE_BYTES = 800 * MIB  # Python + torch + timm + the data pipeline, measured before the first step


def per_image_bytes(cfg: Any, amp: str | None, checkpointing: bool = False) -> int:
    """Activation bytes one image keeps for the backward pass: the family's activation model (its record's
    ``activation_bytes``; CRATE's is the one above). Raises for a family whose model is unknown."""
    got = family_for(cfg).activation_bytes(cfg, amp, checkpointing)
    if got is None:
        raise UserError(f"no activation-memory model for {type(cfg).__name__} {getattr(cfg, 'name', '')}".strip())
    return got


def estimate_training_memory(
    cfg: Any, num_params: int, batch_size: int, amp: str | None, checkpointing: bool = False
) -> int:
    """Estimated peak bytes of a CRATE training step on the CPU (AdamW; see the module docstring)."""
    return BASE_BYTES + 16 * num_params + batch_size * per_image_bytes(cfg, amp, checkpointing)


def largest_batch(cfg: Any, num_params: int, amp: str | None, budget: int, checkpointing: bool = False) -> int:
    """The largest batch whose estimate fits in ``budget`` bytes (0 if none)."""
    room = budget - BASE_BYTES - 16 * num_params
    return max(room // per_image_bytes(cfg, amp, checkpointing), 0)


def available_memory() -> int | None:
    """Bytes this process may still use: the smaller of the kernel's MemAvailable and the cgroup's free room
    (containers); None where neither can be read (not Linux)."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cg / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    if not limits and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(limits) if limits else None


def check_training_memory(model: Any, cfg: Any, local_batch: int, device: Any) -> int | None:
    """Stop a CPU run of a CRATE model whose estimated peak exceeds the memory this process may use, with the
    largest batch that fits; warn above 80%. Returns the estimate in bytes (None where none is made)."""
    if getattr(device, "type", str(device)) != "cpu" or not is_family_model(model):
        return None
    amp_ = cfg.amp if cfg.amp != "none" else None
    ckpt_ = bool(getattr(model, "grad_checkpointing", False))
    if family_for(model).activation_bytes(model.config, amp_, ckpt_) is None:  # the family's model is unknown
        return None
    available = available_memory()
    if available is None:
        return None
    amp = cfg.amp if cfg.amp != "none" else None
    n_params = sum(p.numel() for p in model.parameters())
    ckpt = bool(getattr(model, "grad_checkpointing", False))
    need = estimate_training_memory(model.config, n_params, local_batch, amp, ckpt)
    gib = lambda b: f"{b / 1024**3:.1f} GiB"
    what = f"{cfg.arch} at {model.config.image_size[0]} px, batch {local_batch}, {cfg.amp}"
    if need > available:
        fits = largest_batch(model.config, n_params, amp, int(available * 0.8), ckpt)
        fix = f"use --batch-size {fits} or less" if fits else "use a smaller model or image size"
        more = "" if ckpt else ", or --grad-checkpointing"
        raise UserError(
            f"this run needs about {gib(need)} of memory ({what}; estimate from cratevit.train.memory) but "
            f"{gib(available)} is available; {fix}{more}"
        )
    if need > 0.8 * available:
        print(f"warning: this run needs about {gib(need)} of the {gib(available)} available ({what})", flush=True)
    return need
