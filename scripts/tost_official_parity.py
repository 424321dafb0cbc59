"""Check ToST against the official code itself: the literal formulation must give the official logits, the fast
model must agree, and the parameter counts must be the official constructors'.

Needs a checkout of the official repository and its imports (``pip install einops``; timm is installed)::

    git clone https://github.com/RobinWu218/ToST /tmp/ToST
    python scripts/tost_official_parity.py /tmp/ToST/tost_vision

Random weights (every tensor, BatchNorm statistics included), eval mode, float32. Last run (2026-12-04, with a
local stand-in for einops' two ``rearrange`` patterns): reference vs official bit-identical (max |diff| 0.0),
ToST vs official within 2.4e-6, on ``tost_cab_tiny_12_p16`` and ``tost_cab_tiny_24_p8``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from cratevit.models.reference_tost import ReferenceToST
from cratevit.models.tost import TOST_PRESETS, ToST, from_official_keys, tost_preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("official", help="the official tost_vision folder (holds tost.py)")
    p.add_argument("--presets", nargs="+", default=["tost_cab_tiny_12_p16", "tost_cab_tiny_24_p8"])
    args = p.parse_args()
    sys.path.insert(0, args.official)
    warnings.filterwarnings("ignore")
    import tost as official  # the official module, from the folder given

    torch.manual_seed(0)
    for name in TOST_PRESETS:
        if name.startswith("tost_cab"):
            with torch.device("meta"):
                ours = ToST(config=tost_preset(name)).num_params()
            theirs = sum(t.numel() for t in getattr(official, name)().parameters())
            print(
                f"{name}: {theirs:,} parameters (official), {ours:,} (cratevit) {'OK' if ours == theirs else 'DIFFER'}"
            )
    for name in args.presets:
        model = getattr(official, name)()
        state = {k: 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
        model.load_state_dict(state)
        cfg = tost_preset(name)
        ref = ReferenceToST(patch_size=cfg.patch_size[0], dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, eta=cfg.eta)
        ref.load_state_dict(state, strict=True)
        fast = ToST(config=cfg)
        fast.load_state_dict(from_official_keys(state), strict=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            a, b, c = model.eval()(x), ref.eval()(x), fast.eval()(x)
        print(f"{name}: |reference - official| {(b - a).abs().max():.2e}, |ToST - official| {(c - a).abs().max():.2e}")


if __name__ == "__main__":
    main()
