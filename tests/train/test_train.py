"""``cratevit train`` / ``cratevit finetune``: the reference command lines on small generated data, the run
directory, checkpoints, resuming, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cratevit import create_model, load_checkpoint, save_checkpoint
from cratevit.cli import main
from tests.data.test_data import no_checksums, write_cifar10, write_image_folder, write_truncated_jpeg  # noqa: F401

QUICK = ["--steps-per-epoch", "2", "--workers", "0", "--print-freq", "1", "--threads", "1"]


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ------------------------------------------------------------------------------------------- reference commands
def test_reference_train_command_on_an_image_folder(tmp_path, capsys):
    data = write_image_folder(tmp_path / "imagenet", classes=("n01", "n02", "n03"), per_class=4)
    run = tmp_path / "run"
    code = main(["train", "--arch", "CRATE_tiny", "--batch-size", "4", "--epochs", "1", "--optimizer", "Lion",
                 "--lr", "0.0002", "--weight-decay", "0.05", "--print-freq", "25", "--data", str(data),
                 "--image-size", "32", "--patch-size", "8", "--output", str(run), "--steps-per-epoch", "2",
                 "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert [cfg[k] for k in ("arch", "optimizer", "lr", "batch_size", "epochs")] == ["CRATE_tiny", "Lion", 2e-4, 4, 1]
    assert cfg["label_smoothing"] == 0.1 and cfg["clip_grad"] == 1.0
    for name in ("metrics.jsonl", "last.pt", "best.pt", "curves.png"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (val,) = records(run, "val")
    assert val["images"] == 12 and 0 <= val["top1"] <= 100 and val["top5"] == 100.0  # 3 classes: top-5 is all
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "cratevit" and (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 0, 2)
    assert {"optimizer", "scheduler", "scaler", "rng", "train_config"} <= set(ckpt)
    model = load_checkpoint(run / "best.pt")
    assert model.config.num_classes == 3 and model.config.image_size == (32, 32) and model.config.dim == 384
    assert "top-1" in capsys.readouterr().out


def test_reference_finetune_command_on_cifar_files(tmp_path, no_checksums):  # noqa: F811
    data = write_cifar10(tmp_path / "cifar")
    pretrained = create_model("crate_tiny", num_classes=1000, image_size=32, patch_size=8)
    ckpt = save_checkpoint(tmp_path / "pretrained.pt", pretrained)
    run = tmp_path / "ft"
    code = main(["finetune", "--bs", "4", "--net", "CRATE_tiny", "--opt", "adamW", "--lr", "5e-5", "--n_epochs", "1",
                 "--randomaug", "1", "--data", "cifar10", "--ckpt_dir", str(ckpt), "--data_dir", str(data),
                 "--image-size", "32", "--patch-size", "8", "--output", str(run), *QUICK])  # fmt: skip
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["optimizer"], cfg["batch_size"], cfg["randaug"], cfg["pretrained"]) == ("adamW", 4, True, str(ckpt))
    tuned = weights(run / "last.pt")
    assert tuned["head.weight"].shape == (10, 384)  # the 1000-class head was replaced
    start = pretrained.state_dict()["blocks.0.ista.dictionary"]
    assert 0 < (tuned["blocks.0.ista.dictionary"] - start).abs().max() < 1e-2  # started from the checkpoint
    assert records(run, "val")[0]["images"] == 8


def test_finetune_ckpt_dir_none_means_random_init(tmp_path, no_checksums):  # noqa: F811
    data = write_cifar10(tmp_path / "cifar")
    run = tmp_path / "scratch"
    assert main(["finetune", "--net", "crate_debug", "--bs", "4", "--n_epochs", "1", "--ckpt_dir", "None",
                 "--data_dir", str(data), "--output", str(run), *QUICK]) == 0  # fmt: skip
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["pretrained"] is None and cfg["data"] == "cifar10" and cfg["lr"] == 5e-5  # the transfer recipe


def test_finetune_from_a_reference_layout_checkpoint(tmp_path, no_checksums):  # noqa: F811
    from cratevit.checkpoint import to_reference_keys

    data = write_cifar10(tmp_path / "cifar")
    source = create_model("crate_debug", num_classes=100)
    ref = {f"module.{k}": v for k, v in to_reference_keys(source.state_dict()).items()}
    torch.save({"state_dict": ref, "epoch": 90, "arch": "CRATE_debug"}, tmp_path / "model_best.pth.tar")
    run = tmp_path / "ft"
    assert main(["finetune", "--net", "CRATE_debug", "--bs", "4", "--n_epochs", "1", "--lr", "1e-9",
                 "--ckpt_dir", str(tmp_path / "model_best.pth.tar"), "--data_dir", str(data),
                 "--output", str(run), *QUICK]) == 0  # fmt: skip
    tuned, start = weights(run / "last.pt"), source.state_dict()
    assert tuned["head.weight"].shape == (10, 32)
    assert torch.allclose(tuned["blocks.1.mssa.subspace_proj.weight"], start["blocks.1.mssa.subspace_proj.weight"])


# ------------------------------------------------------------------------------------------- engine features
def test_timm_model_with_the_same_recipe(tmp_path):
    run = tmp_path / "vit"
    assert main(["train", "--arch", "vit_tiny_patch16_224", "--image-size", "32", "--patch-size", "8",
                 "--model-kwargs", '{"embed_dim": 96, "depth": 2, "num_heads": 3}',
                 "--batch-size", "16", "--epochs", "1", "--output", str(run), *QUICK]) == 0  # fmt: skip
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == "timm" and ckpt["arch"] == "vit_tiny_patch16_224"
    assert ckpt["model"]["head.weight"].shape == (10, 96)
    assert ckpt["model"]["pos_embed"].shape == (1, 17, 96)
    assert {k.split(".")[1] for k in ckpt["model"] if k.startswith("blocks.")} == {"0", "1"}
    from cratevit.analysis.segmentation import load_vision_model

    vit = load_vision_model(str(run / "last.pt"))  # rebuilt with the same width and depth
    assert len(vit.blocks) == 2 and vit.embed_dim == 96


def test_model_kwargs_reach_crate_config_and_bad_json_is_one_line(tmp_path, capsys):
    run = tmp_path / "crate"
    assert main(["train", "--arch", "crate_debug", "--model-kwargs", '{"depth": 1}', "--batch-size", "16",
                 "--epochs", "1", "--output", str(run), *QUICK]) == 0  # fmt: skip
    assert load_checkpoint(run / "last.pt").config.depth == 1
    with pytest.raises(SystemExit):
        main(["train", "--model-kwargs", "depth=1"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_tensorboard_bf16_compile_free_flags_and_evaluate(tmp_path, capsys):
    run = tmp_path / "tb"
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--amp", "bf16",
                 "--tensorboard", "--grad-checkpointing", "--mixup", "0.8", "--cutmix", "1.0", "--warmup-epochs", "0",
                 "--clip-grad", "0.5", "--output", str(run), *QUICK]) == 0  # fmt: skip
    assert list(run.glob("events.out.tfevents.*"))
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2] and all(r["loss"] > 0 for r in train)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--evaluate"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 360 and result["top1"] == pytest.approx(records(run, "val")[0]["top1"])


def test_config_file_reruns_a_run(tmp_path):
    first = tmp_path / "a"
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--seed", "5",
                 "--output", str(first), *QUICK]) == 0  # fmt: skip
    second = tmp_path / "b"
    assert main(["train", "--config", str(first / "config.json"), "--output", str(second)]) == 0
    a, b = weights(first / "last.pt"), weights(second / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_image_in_a_run_is_counted_and_the_epoch_continues(tmp_path, capfd):
    data = write_image_folder(tmp_path / "data", per_class=4, size=16)
    bad = write_truncated_jpeg(data / "train" / "cat" / "zz_broken.jpg")
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--data", str(data), "--batch-size", "9", "--epochs", "1",
                 "--image-size", "16", "--output", str(run), "--workers", "2", "--print-freq", "1"]) == 0  # fmt: skip
    assert f"skipping unreadable image {bad}" in capfd.readouterr().err
    (train,) = records(run, "train")
    assert train["skipped_images"] == 1 and train["step"] == 1


def test_shapes_data_trains_with_its_class_count(tmp_path):
    from cratevit.data.shapes import NUM_CLASSES

    run = tmp_path / "shapes"
    assert main(["train", "--data", "shapes", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1",
                 "--output", str(run), *QUICK]) == 0  # fmt: skip
    assert weights(run / "last.pt")["head.weight"].shape == (NUM_CLASSES, 32)
    assert records(run, "val")[0]["images"] == 1200


def test_dummy_data_benchmarks_the_loop(tmp_path, capsys):
    """A loop benchmark: validation sized to the run (one batch per 10 steps, not 1,000 synthetic images), no
    warmup warning for the recipe's one epoch, and progress from the first step."""
    run = tmp_path / "bench"
    assert main(["train", "--dummy", "--arch", "crate_debug", "--num-classes", "5", "--batch-size", "8",
                 "--epochs", "1", "--output", str(run), *QUICK[:2], "--workers", "0", "--threads", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    (train,) = [r for r in records(run, "train") if r["step"] == 2]
    assert train["img_s"] > 0 and records(run, "val")[0]["images"] == 8
    assert "warning" not in out and "epoch 1/1 [1/2]" in out  # --print-freq 10 (default): the first step shows
    assert weights(run / "last.pt")["head.weight"].shape == (5, 32)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/no/such/folder"], "does not exist"),
        (["--arch", "resnet_nonexistent_9"], "unknown --arch"),
        (["--amp", "fp16", "--device", "cpu"], "needs a CUDA GPU"),
        (["--batch-size", "5000"], "fewer than --batch-size"),
        (["--optimizer", "notanoptimizer"], "--optimizer 'notanoptimizer'"),
        (["--resume", "/no/such/run"], "no such checkpoint"),
        (["--evaluate"], "--evaluate needs weights"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    assert main(["train", "--output", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_resume_from_a_weights_only_file_is_refused_clearly(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "weights.pt", create_model("crate_debug"))
    assert main(["train", "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "not a cratevit training checkpoint" in err and "--pretrained" in err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--arch", "crate_debug", "--epochs", "1", "--output", str(run), *QUICK]
    assert main(args) == 0
    before = (run / "last.pt").read_bytes()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err and (run / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--arch", "crate_debug", "--epochs", "3", "--optimizer", "sgd", "--lr", "1e30",
                 "--clip-grad", "0", "--warmup-epochs", "0", "--output", str(run), "--steps-per-epoch", "1",
                 "--workers", "0"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "the loss became nan" in err.lower() or "the loss became inf" in err.lower()
    assert "epoch 2 step 1" in err and str(run / "last.pt") in err  # epochs 1-based: epoch 1 was saved
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ------------------------------------------------------------------------------------------- kill and resume
def _cratevit(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cratevit", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    recipe = ["--arch", "crate_nano", "--batch-size", "32", "--epochs", "2", "--steps-per-epoch", "12",
              "--print-freq", "1", "--seed", "3", "--threads", "1"]  # fmt: skip
    full = _cratevit(*recipe, "--output", str(tmp_path / "full"))
    killed_dir = tmp_path / "killed"
    killed = _cratevit(*recipe, "--output", str(killed_dir))
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        metrics = killed_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(x)["step"] >= 3 for x in metrics.read_text().splitlines() if x):
            killed.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = killed.communicate(timeout=240)
    assert killed.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "--resume" in out
    state = torch.load(killed_dir / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["step_in_epoch"] < 12  # stopped mid-epoch

    resumed = _cratevit("--resume", str(killed_dir))
    out_resumed, _ = resumed.communicate(timeout=240)
    out_full, _ = full.communicate(timeout=240)
    assert resumed.returncode == 0 and full.returncode == 0, out_resumed + out_full
    a, b = weights(tmp_path / "full" / "last.pt"), weights(killed_dir / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert records(killed_dir, "val")[-1]["top1"] == records(tmp_path / "full", "val")[-1]["top1"]


# ------------------------------------------------------------------------------------------- the main job
@pytest.mark.slow
def test_default_train_reaches_95_percent_on_held_out_digits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("digits-crate_digits-")
    val = records(run, "val")
    assert len(val) == 30 and val[-1]["images"] == 360
    assert val[-1]["top1"] >= 95.0  # the final model, on the 360 held-out digits


# ------------------------------------------------------------------------------------------- one training step
def one_step_trainer(**options):
    """A Trainer on the digits (crate_debug, no run directory) and one training batch, without touching the
    process's thread count."""
    from cratevit.train import TrainConfig, Trainer
    from cratevit.train.distributed import init_distributed

    cfg = TrainConfig(
        arch="crate_debug",
        batch_size=8,
        epochs=1,
        workers=0,
        threads=torch.get_num_threads(),
        warmup_epochs=0.0,
        **options,
    )
    trainer = Trainer(cfg, init_distributed("cpu"), evaluate_only=True)
    return trainer, next(iter(trainer.train_loader))


def test_gradient_clipping_bounds_the_update():
    """Plain SGD with lr 1: the update is minus the (clipped) gradient, so its norm is at most --clip-grad."""
    clip = 1e-3
    trainer, batch = one_step_trainer(optimizer="momentum", momentum=0.0, lr=1.0, weight_decay=0.0, clip_grad=clip)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(batch)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before, strict=True)])
    assert clip / 2 < step.norm().item() <= clip * (1 + 1e-4)  # the raw gradient is larger: clipping acted


def test_mixup_feeds_the_mixed_images_to_the_model():
    """With --mixup the model sees lam * x + (1 - lam) * x.flip(0), and the loss uses the matching soft targets."""
    trainer, batch = one_step_trainer(mixup=0.8, lr=1e-3)
    original = batch.images.clone()  # timm's Mixup mixes in place
    seen = []
    trainer.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    trainer.train_step(batch)
    (x,) = seen
    flipped = original.flip(0)
    lam = ((x - flipped) * (original - flipped)).sum() / (original - flipped).pow(2).sum()
    assert 0.0 < lam.item() < 0.999  # mixed, not the plain batch
    torch.testing.assert_close(x, lam * original + (1 - lam) * flipped, rtol=1e-4, atol=1e-4)
