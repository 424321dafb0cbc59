"""Hub file addresses: parsing, and reading a file from a huggingface_hub cache while offline."""

import os
import subprocess
import sys

import pytest

from cratevit.hubfile import is_hub_file, parse_hub_file

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
        "UCSC-VLAA/CRATE-alpha", "torch/crate_alpha_B16.pth", None)  # fmt: skip
    assert parse_hub_file("hf-hub:a/b@v2/x.pth") == ("a/b", "x.pth", "v2")
    assert is_hub_file("hf-hub:a/b/x.pth") and not is_hub_file("hf-hub:a/b") and not is_hub_file("a/b/c")
    with pytest.raises(ValueError, match="not a Hub file address"):
        parse_hub_file("hf-hub:a/b/")


def test_hub_file_is_read_from_the_cache_offline(tmp_path):
    fake_hub_cache(tmp_path / "hub", "UCSC-VLAA/CRATE-alpha", "torch/tiny.pth", b"weights")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = (
        "from cratevit.hubfile import hub_file\n"
        "p = hub_file('hf-hub:UCSC-VLAA/CRATE-alpha/torch/tiny.pth'); print(p.read_bytes().decode())\n"
        "try:\n    hub_file('hf-hub:UCSC-VLAA/CRATE-alpha/torch/missing.pth')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    first, second = out.splitlines()
    assert first == "weights"
    assert "is not in the Hugging Face cache" in second and "HF_HUB_OFFLINE" in second
