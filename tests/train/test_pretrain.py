"""cratevit pretrain / probe / reconstruct and finetune from a CRATE-MAE: one engine, the objective differs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cratevit import load_checkpoint
from cratevit.cli import main
from cratevit.data import data_info
from cratevit.models import CRATE
from cratevit.models.crate_mae import CRATEMAE, CRATEMAEConfig, crate_classifier_from_mae
from cratevit.train.config import PRETRAIN_RECIPES, TrainConfig, resolve_config
from cratevit.train.distributed import DistInfo
from cratevit.train.engine import Trainer

QUICK = [
    "--threads",
    "1",
    "--model-kwargs",
    '{"depth": 1, "decoder_depth": 1}',
    "--batch-size",
    "16",
    "--steps-per-epoch",
    "8",
    "--print-freq",
    "1",
    "--warmup-epochs",
    "0",
]


def weights(path):
    return load_checkpoint(path).state_dict()


@pytest.mark.slow
def test_pretrain_runs_the_engine_with_the_mae_objective_and_resumes_exactly(tmp_path, capsys):
    assert main(["pretrain", *QUICK, "--epochs", "2", "--output", str(tmp_path / "full")]) == 0
    out = capsys.readouterr().out
    assert "val masked autoencoding loss" in out and "acc" not in out
    run = tmp_path / "full"
    assert {"last.pt", "best.pt", "config.json", "metrics.jsonl", "curves.png"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert len(train) == 16 and "acc" not in train[0] and len(val) == 2 and "best_loss" in val[-1]
    assert val[-1]["images"] == 360 and val[-1]["loss"] < train[0]["loss"]
    config = json.loads((run / "config.json").read_text())
    assert config["objective"] == "mae" and config["betas"] == [0.9, 0.95] and config["clip_grad"] is None
    assert config["lr"] == pytest.approx(6e-3 * 16 / 256)  # base lr x batch / 256
    model = load_checkpoint(run / "last.pt")
    assert isinstance(model, CRATEMAE) and model.config.depth == 1
    # SIGTERM mid-epoch, then --resume: the same weights as the uninterrupted run (masks are seeded by step)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cratevit", "pretrain", *QUICK, "--epochs", "2", "--output", str(tmp_path / "half")]
    killed = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = tmp_path / "half" / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if metrics.exists() and any(json.loads(x)["global_step"] >= 2 for x in metrics.read_text().splitlines() if x):
            killed.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = killed.communicate(timeout=240)
    assert killed.returncode == 128 + signal.SIGTERM, out
    resumed = subprocess.run([sys.executable, "-m", "cratevit", "pretrain", "--resume", str(tmp_path / "half")],
                             env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = weights(run / "last.pt"), weights(tmp_path / "half" / "last.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_mae_recipe_and_wrong_arch_for_the_objective():
    cfg = resolve_config(TrainConfig(objective="mae", data="digits"), data_info("digits"))
    assert (cfg.arch, cfg.optimizer, cfg.betas, cfg.lr) == ("mae_crate_digits", "adamw", [0.9, 0.95], 6e-3 * 64 / 256)
    assert PRETRAIN_RECIPES["folder"]["blr"] == 1.5e-4 and PRETRAIN_RECIPES["folder"]["warmup_epochs"] == 40.0
    with pytest.raises(ValueError, match="needs a CRATE-MAE model"):
        Trainer(
            TrainConfig(objective="mae", arch="crate_debug", data="digits", batch_size=16),
            DistInfo(),
            evaluate_only=True,
        )


def test_classifier_from_the_mae_encoder_keeps_its_features():
    torch.manual_seed(0)
    mae = CRATEMAE(
        CRATEMAEConfig(
            image_size=32,
            patch_size=8,
            dim=32,
            depth=2,
            heads=2,
            dim_head=16,
            decoder_depth=1,
            decoder_heads=2,
            decoder_dim_head=16,
            name="tiny",
        )
    )
    crate = crate_classifier_from_mae(mae, num_classes=5).eval()
    assert isinstance(crate, CRATE) and crate.config.patch_embed == "conv" and crate.config.lambd == 0.5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = crate.forward_head(crate.forward_features(x), pre_logits=True)
        torch.testing.assert_close(ours, mae.eval().forward_encoder_features(x)[:, 0], rtol=1e-4, atol=1e-4)
        assert crate(x).shape == (3, 5)


@pytest.mark.slow
def test_finetune_probe_and_reconstruct_from_a_pretrained_run(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", *QUICK, "--epochs", "1", "--output", str(pre)]) == 0
    ft = tmp_path / "ft"
    assert (
        main(
            [
                "train",
                "--pretrained",
                str(pre / "last.pt"),
                "--batch-size",
                "16",
                "--epochs",
                "1",
                "--steps-per-epoch",
                "2",
                "--output",
                str(ft),
            ]
        )
        == 0
    )
    clf = load_checkpoint(ft / "last.pt")
    mae = load_checkpoint(pre / "last.pt")
    assert isinstance(clf, CRATE) and clf.config.name == "mae_crate_digits_encoder" and clf.num_classes == 10
    assert not torch.equal(clf.blocks[0].ista.dictionary, mae.blocks[0].ista.dictionary)  # it trained
    capsys.readouterr()
    assert main(["probe", str(pre / "last.pt"), "--output", str(tmp_path / "probe"), "--l2", "1e-3"]) == 0
    assert (
        main(["probe", str(pre / "last.pt"), "--output", str(tmp_path / "probe"), "--l2", "1e-3", "--layer", "0"]) == 0
    )
    assert main(["probe", str(pre / "last.pt"), "--output", str(tmp_path / "probe"), "--l2", "1e-4", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "k-NN (k=20, T=0.07" in out and "linear probe: top-1" in out
    records = [json.loads(line) for line in (tmp_path / "probe" / "probe.jsonl").read_text().splitlines()]
    assert [r["cached"] for r in records] == [False, False, True] and records[0]["features"] == [1437, 96]
    assert records[0]["knn"]["top1"] == records[2]["knn"]["top1"] > 10.0
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray((torch.rand(40, 60, 3) * 255).byte().numpy()).save(image)
    assert main(["reconstruct", str(pre / "last.pt"), str(image), "--output", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "reconstruction.png").stat().st_size > 1000
    assert (tmp_path / "rec" / "reconstruction.pdf").is_file()
    assert main(["reconstruct", str(ft / "last.pt"), str(image)]) == 2  # not a CRATE-MAE: one line
    assert "not a CRATE-MAE" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_under_torchrun_two_processes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cratevit",
           "pretrain", *QUICK, "--epochs", "1", "--output", str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout and done.stdout.count("run directory") == 2  # rank 0 speaks
    val = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val[-1]["images"] == 360 and 0 < val[-1]["loss"] < 10  # every validation image once, over both ranks
    assert isinstance(load_checkpoint(tmp_path / "ddp" / "last.pt"), CRATEMAE)
