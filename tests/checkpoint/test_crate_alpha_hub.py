"""CRATE-alpha from the Hub: ``hf-hub:`` file addresses, read through a huggingface_hub cache while offline."""

import os
import subprocess
import sys

import pytest
import torch

from cratevit.checkpoint.hubfile import is_hub_file, parse_hub_file
from cratevit.errors import UserError
from cratevit.models import ReferenceCRATEAlpha

REV = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id, filename, data: bytes):
    """A cache folder laid out as huggingface_hub writes it: blobs are symlinked from snapshots/<rev>/."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    target = repo / "snapshots" / REV / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    return target


def test_parse_hub_file_addresses():
    assert parse_hub_file("hf-hub:UCSC-VLAA/CRATE-alpha/torch/crate_alpha_B16.pth") == (
        "UCSC-VLAA/CRATE-alpha",
        "torch/crate_alpha_B16.pth",
        None,
    )
    assert parse_hub_file("hf-hub:a/b@v2/x.pth") == ("a/b", "x.pth", "v2")
    assert is_hub_file("hf-hub:a/b/x.pth") and not is_hub_file("hf-hub:a/b") and not is_hub_file("a/b/c")
    with pytest.raises(UserError, match="not a Hub file address"):
        parse_hub_file("hf-hub:a/b/")


def test_official_file_loads_from_the_hub_cache_offline(tmp_path):
    """load_checkpoint("hf-hub:...") with HF_HUB_OFFLINE=1 and a cache laid out as huggingface_hub writes it."""
    torch.manual_seed(0)
    ref = ReferenceCRATEAlpha(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref.eval()(x).detach(), tmp_path / "expected.pt")
    buffer = tmp_path / "official.pth"
    torch.save(ref.state_dict(), buffer)  # the official layout: a bare state_dict
    fake_hub_cache(tmp_path / "hub", "UCSC-VLAA/CRATE-alpha", "torch/crate_alpha_B16.pth", buffer.read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = f"""
import torch
from cratevit import load_checkpoint
from cratevit.errors import CheckpointError
model = load_checkpoint("hf-hub:UCSC-VLAA/CRATE-alpha/torch/crate_alpha_B16.pth").eval()
x, expected = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "expected.pt")!r})
rel = ((model(x) - expected).abs().max() / expected.abs().max()).item()
print(type(model).__name__, model.config.name, rel <= 1e-5)
try:
    load_checkpoint("hf-hub:UCSC-VLAA/CRATE-alpha/torch/crate_alpha_L14.pth")
except CheckpointError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    first, second = out.splitlines()
    assert first == "CRATEAlpha crate_alpha_debug True"
    assert "is not in the Hugging Face cache" in second and "HF_HUB_OFFLINE" in second
