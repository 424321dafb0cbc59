"""torchrun DDP on CPU (gloo): 2 processes with batch B/2 each train exactly like 1 process with batch B."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cratevit import create_model
from cratevit.train.distributed import DistInfo, all_reduce_sum, any_true, init_distributed

RECIPE = ["--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "3",
          "--optimizer", "sgd", "--lr", "0.5", "--warmup-epochs", "0", "--seed", "1", "--workers", "0",
          "--print-freq", "1"]  # fmt: skip


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
    init = create_model("crate_debug", num_classes=10).state_dict()
    assert (a["blocks.0.ista.dictionary"] - init["blocks.0.ista.dictionary"]).abs().max() > 1e-3  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # metrics reduced across ranks: the whole validation set is counted once, the loss matches
    val = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    val_single = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert val[-1]["kind"] == "val" and val[-1]["images"] == 360
    assert val[-1]["top1"] == pytest.approx(val_single[-1]["top1"], abs=0.3)
    assert val[0]["loss"] == pytest.approx(val_single[0]["loss"], rel=1e-4)  # step 1 training loss, both ranks
