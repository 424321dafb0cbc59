"""torchrun DDP on CPU (gloo): 2 processes with batch B/2 each train exactly like 1 process with batch B."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cratevit import create_model
from cratevit.train.distributed import DistInfo, all_reduce_sum, any_true, init_distributed

# The default digits recipe (crate_digits, AdamW, label smoothing, clipping), three steps of the global batch 64.
RECIPE = ["--epochs", "1", "--steps-per-epoch", "3", "--seed", "1", "--workers", "0", "--print-freq", "1"]
# Two processes sum their half-batch gradients in another order than one process sums the whole batch: the
# weights agree to float rounding (measured after 3 steps: max |difference| 1.2e-7, the same as one process with
# 2 threads vs 1 thread). AdamW amplifies such rounding in near-zero gradients over an epoch (README).
ATOL = 1e-6


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, info) is t and any_true(True, info) and not any_true(False, DistInfo())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU is available; use --device cpu"):
            init_distributed("cuda")


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_full_batch(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cratevit",
         "train", *RECIPE, "--output", str(tmp_path / "ddp")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    single = subprocess.run([sys.executable, "-m", "cratevit", "train", *RECIPE, "--threads", "1", "--output",
                             str(tmp_path / "single")], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out, _ = ddp.communicate(timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    assert ddp.returncode == 0, out
    assert "2 process(es)" in out and out.count("run directory") == 2  # only rank 0 speaks: announce + done
    a = torch.load(tmp_path / "single" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["global_step"] == 3
    torch.manual_seed(1)
    init = create_model("crate_digits", num_classes=10).state_dict()
    assert (a["blocks.0.ista.dictionary"] - init["blocks.0.ista.dictionary"]).abs().max() > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=ATOL, msg=k)
    # metrics reduced across ranks: the whole validation set is counted once, the loss matches
    val = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    val_single = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert val[-1]["kind"] == "val" and val[-1]["images"] == 360
    assert val[-1]["top1"] == pytest.approx(val_single[-1]["top1"], abs=0.3)
    assert val[0]["loss"] == pytest.approx(val_single[0]["loss"], rel=1e-6)  # step 1 training loss, both ranks


def _torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cratevit",
         "train", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of one rank (a child of the torchrun launcher, with RANK in its environment)."""
    for child in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
    raise AssertionError("rank not found")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_and_resumes_bit_equal(tmp_path):
    """A signal seen by one process stops all at the same step, named in rank 0's message; every process's RNG
    state is saved, so with dropout the resumed two-process run equals an uninterrupted one."""
    recipe = ["--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "20", "--seed", "2",
              "--workers", "0", "--print-freq", "1", "--model-kwargs", '{"dropout": 0.2}']  # fmt: skip
    killed_dir = tmp_path / "killed"
    killed = _torchrun(*recipe, "--output", str(killed_dir))
    deadline = time.time() + 240
    metrics = killed_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[0]
        time.sleep(0.01)
    os.kill(_rank_pid(killed, 1), signal.SIGTERM)
    out, _ = killed.communicate(timeout=240)
    assert "stopped by signal 15 (SIGTERM) at epoch 1/1 step" in out and "signal None" not in out, out
    state = torch.load(killed_dir / "last.pt", map_location="cpu", weights_only=True)
    assert 3 <= state["global_step"] < 20 and len(state["rng_ranks"]) == 2
    resumed = _torchrun("--resume", str(killed_dir))
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    full = _torchrun(*recipe, "--output", str(tmp_path / "full"))
    out, _ = full.communicate(timeout=240)
    assert full.returncode == 0, out
    a = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(killed_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
