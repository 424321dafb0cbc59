"""Training under the faults real clusters deliver (signals to the whole process group, kill -9, NaN gradients,
two runs on one directory, unreadable data, full disks) and one clear line for every bad input."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cratevit import create_model, load_checkpoint, save_checkpoint
from cratevit.cli import main
from tests.data.test_data import write_image_folder

QUICK = ["--workers", "0", "--print-freq", "1", "--threads", "1"]
DROPOUT = ["--model-kwargs", '{"dropout": 0.2}']


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def log_records(run: Path) -> list[dict]:
    """metrics.jsonl without the throughput (img/s depends on the machine's load)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "img_s"} for x in lines]


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            steps.append(json.loads(line)["global_step"])
    return max(steps, default=0)


def one_line_error(capsys_or_capfd) -> str:
    err = capsys_or_capfd.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- resume is exact
def test_crash_after_a_step_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """Dropout on, --save-every 2, a crash one step after a mid-epoch checkpoint: the resumed run's weights are
    bit-equal to an uninterrupted run's, metrics.jsonl holds the same records, and the half-written temporary
    file the crash left is removed."""
    from cratevit.train.engine import Trainer

    recipe = ["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "2", "--steps-per-epoch", "5",
              "--seed", "3", "--save-every", "2", *DROPOUT, *QUICK]  # fmt: skip
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert main([*recipe, "--output", str(full)]) == 0

    step = Trainer.train_step

    def crash_at_step_8(self, batch):
        if self.global_step == 7:
            raise RuntimeError("simulated crash")
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_8)
    assert main([*recipe, "--output", str(crashed)]) == 1  # a crash (the CLI prints the traceback)
    assert "RuntimeError: simulated crash" in capsys.readouterr().err
    monkeypatch.undo()
    state = torch.load(crashed / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 6)  # saved at step 6, mid-epoch
    assert last_logged_step(crashed) == 7  # step 7 was logged, then lost: its record must go
    (crashed / ".last.pt.k9x2q1.tmp").write_bytes(b"half a checkpoint")

    assert main(["train", "--resume", str(crashed)]) == 0
    assert_same_weights(full / "last.pt", crashed / "last.pt")
    assert_same_weights(full / "best.pt", crashed / "best.pt")
    assert log_records(crashed) == log_records(full)
    assert not list(crashed.glob(".*.tmp"))


def test_resume_from_another_working_directory_writes_to_the_run_itself(tmp_path, monkeypatch):
    first, elsewhere = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(first)
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2",
                 "--output", "run", *QUICK]) == 0  # fmt: skip
    config = json.loads((first / "run" / "config.json").read_text())
    assert config["output"] == str(first / "run")  # stored absolute
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(first / "run"), "--epochs", "2"]) == 0
    assert not (elsewhere / "run").exists()
    assert torch.load(first / "run" / "last.pt", weights_only=True)["epoch"] == 2


# ------------------------------------------------------------------------------------------- non-finite numbers
def _poison_gradients_at(monkeypatch, bad_step: int) -> None:
    """The head's gradient becomes NaN at backward pass ``bad_step`` (the loss stays finite)."""
    import cratevit.train.engine as engine

    build = engine.build_model

    def build_model(cfg, num_classes):
        model = build(cfg, num_classes)
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == bad_step else grad

        model.head.weight.register_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_model", build_model)


@pytest.mark.parametrize("clip", ["0", "1"])
@pytest.mark.parametrize(
    ("bad_step", "where", "saved"),
    [(4, "epoch 2 step 2 (global step 4)", 2), (6, "epoch 3 step 2 (global step 6)", 4)],  # an epoch's / the run's end
)
def test_nan_gradients_with_a_finite_loss_never_reach_a_checkpoint(
    tmp_path, monkeypatch, capsys, clip, bad_step, where, saved
):
    _poison_gradients_at(monkeypatch, bad_step)
    run = tmp_path / "run"
    code = main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "3", "--steps-per-epoch", "2",
                 "--clip-grad", clip, "--output", str(run), *QUICK])  # fmt: skip
    assert code == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "done" not in out
    assert f"the gradient norm became nan at {where}" in err
    assert f"the last good checkpoint {run / 'last.pt'} is kept" in err
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["global_step"] == saved
    for name in ("last.pt", "best.pt"):
        state = torch.load(run / name, map_location="cpu", weights_only=True)
        assert state["global_step"] <= saved and all(v.isfinite().all() for v in state["model"].values())


def test_without_save_every_last_pt_is_written_every_few_minutes(tmp_path, monkeypatch, capsys):
    """The default: a step checkpoint once SAVE_EVERY_MINUTES have passed (here 0: after every step)."""
    import cratevit.train.engine as engine

    monkeypatch.setattr(engine, "SAVE_EVERY_MINUTES", 0.0)
    step = engine.Trainer.train_step

    def crash_at_step_4(self, batch):
        if self.global_step == 3:
            raise RuntimeError("simulated crash")
        return step(self, batch)

    monkeypatch.setattr(engine.Trainer, "train_step", crash_at_step_4)
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "5",
                 "--output", str(run), *QUICK]) == 1  # fmt: skip
    assert "simulated crash" in capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=True)["global_step"] == 3


def test_nan_gradients_before_any_checkpoint_say_so(tmp_path, monkeypatch, capsys):
    _poison_gradients_at(monkeypatch, 1)
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "2",
                 "--output", str(run), *QUICK]) == 2  # fmt: skip
    err = one_line_error(capsys)
    assert "at epoch 1 step 1 (global step 1)" in err and f"no checkpoint was written yet in {run}" in err
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """Weights that overflow in the optimiser step (finite loss and gradients) at an epoch's last step."""
    from cratevit.train.engine import Trainer

    build = Trainer._build_optimisation

    def build_optimisation(self):
        build(self)
        head = self.model.head.weight

        def overflow(optimizer, args, kwargs):
            if self.global_step == 3:  # the optimiser step of global step 4
                with torch.no_grad():
                    head[0, 0] = float("inf")

        self.optimizer.register_step_post_hook(overflow)

    monkeypatch.setattr(Trainer, "_build_optimisation", build_optimisation)
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "3", "--steps-per-epoch", "2",
                 "--output", str(run), *QUICK]) == 2  # fmt: skip
    err = one_line_error(capsys)
    assert "weights (1 tensors, e.g. head.weight) became non-finite at the end of epoch 2 (global step 4)" in err
    assert weights(run / "last.pt")["head.weight"].isfinite().all()
    assert torch.load(run / "last.pt", weights_only=True)["global_step"] == 2


def test_a_nan_checkpoint_is_warned_about(tmp_path, capsys):
    from cratevit.errors import CratevitWarning

    model = create_model("crate_debug")
    with torch.no_grad():
        model.blocks[0].ista.dictionary.fill_(float("nan"))
    path = save_checkpoint(tmp_path / "nan.pt", model)
    with pytest.warns(CratevitWarning, match=r"nan.pt holds non-finite weights \(NaN or infinity in 1 of"):
        load_checkpoint(path)
    assert main(["export", str(path), "--output", str(tmp_path / "nan.safetensors")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cratevit: warning: ") and "blocks.0.ista.dictionary" in err[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["attention", str(path), str(tmp_path / "x.png"), "-o", str(tmp_path / "att")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cratevit: warning: {path} holds non-finite weights")


# ------------------------------------------------------------------------------------------- the run directory
def test_a_second_run_on_a_locked_directory_is_refused(tmp_path, capsys):
    from cratevit.train.rundir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    held = RunLock(run)  # another live run holds it (flock: also across processes)
    try:
        for argv in (["--output", str(run)], ["--output", str(run), "--epochs", "1"]):
            assert main(["train", "--arch", "crate_debug", *argv, *QUICK]) == 2
            assert one_line_error(capsys) == (f"cratevit train: error: {run} is in use by another cratevit run "
                                              f"(pid {os.getpid()}); wait for it to end, or choose another --output")  # fmt: skip
    finally:
        held.release()
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "1",
                 "--output", str(run), *QUICK]) == 0  # fmt: skip


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "1",
                 "--output", str(run), *QUICK]) == 2  # fmt: skip
    assert one_line_error(capsys).startswith(f"cratevit train: error: cannot write {run / 'metrics.jsonl'}: the disk "
                                             f"is full")  # fmt: skip


@pytest.mark.parametrize(("code", "reason"), [(errno.EROFS, "the file system is read-only"),
                                               (errno.EACCES, "permission denied"),
                                               (errno.ENOSPC, "the disk is full")])  # fmt: skip
def test_an_unwritable_checkpoint_is_one_line(tmp_path, monkeypatch, capsys, code, reason):
    import cratevit.checkpoint.write

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cratevit.checkpoint.write.tempfile, "mkstemp", refuse)
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "1",
                 "--output", str(run), *QUICK]) == 2  # fmt: skip
    err = one_line_error(capsys)
    assert err.startswith(f"cratevit train: error: cannot write {run / 'last.pt'}: {reason}")
    assert "no checkpoint was written" in err


# ------------------------------------------------------------------------------------------- unreadable data
def test_all_unreadable_training_images_are_refused_in_one_line(tmp_path, capfd):
    data = write_image_folder(tmp_path / "data", per_class=3, size=16)
    for f in (data / "train").rglob("*.png"):
        f.write_bytes(os.urandom(200))
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--data", str(data), "--batch-size", "2", "--epochs", "1",
                 "--image-size", "16", "--output", str(run), *QUICK]) == 2  # fmt: skip
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "done" not in out and "val loss" not in out
    assert all(line.startswith("warning: skipping unreadable image") for line in lines[:-1]) and len(lines) == 7
    assert lines[-1] == (f"cratevit train: error: no training image of {data} could be read in epoch 1 (3 batches, "
                         f"6 unreadable images skipped, see the warnings); fix or remove the files")  # fmt: skip
    assert not (run / "last.pt").exists()


def test_batches_of_unreadable_images_are_not_steps(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=6, size=16)
    for f in sorted((data / "train").rglob("*.png"))[1:]:  # one readable training image of 12
        f.write_bytes(b"not an image")
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", "--data", str(data), "--batch-size", "2", "--epochs", "1",
                 "--image-size", "16", "--output", str(run), *QUICK]) == 0  # fmt: skip
    train = [r for r in log_records(run) if r["kind"] == "train"]
    assert [r["global_step"] for r in train] == [1]  # one batch held an image; the five others were skipped
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["global_step"] == 1 and state["epoch"] == 1


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    from cratevit.data.folder import load_image

    ramp = np.linspace(1000, 60000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").convert("RGB").getextrema()[0] == (255, 255)  # what PIL alone gives
    rgb = np.asarray(load_image(str(tmp_path / "deep.png")))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200


# ------------------------------------------------------------------------------------------- attention / pca
def write_png_header(path: Path, width: int, height: int) -> Path:
    """A 100-byte PNG whose header claims ``width`` x ``height`` grey pixels (it would take GBs to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0"))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


@pytest.mark.parametrize("command", ["attention", "pca"])
def test_one_unreadable_image_among_many_is_skipped_and_the_rest_finished(tmp_path, capsys, command):
    rng = np.random.default_rng(0)
    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(files[-1])
    files.insert(1, tmp_path / "broken.png")
    files[1].write_bytes(b"\x89PNG garbage")
    out = tmp_path / "out"
    assert main([command, "crate_debug", *map(str, files), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in "".join(err)
    assert err[0].startswith(f"cratevit: warning: skipping {files[1]}: {files[1]} is not a readable image file")
    assert err[1] == (f"cratevit {command}: error: 1 of 3 images could not be read ({files[1]}); the other 2 are "
                      f"done and listed in {out / (command + '.json')}")  # fmt: skip
    summary = json.loads((out / f"{command}.json").read_text())
    assert [r["image"] for r in summary["images"]] == [str(files[0]), str(files[2])]
    assert [r["image"] for r in summary["skipped"]] == [str(files[1])]
    assert (out / "a").is_dir() and (out / "b").is_dir()


def test_max_pixels_default_is_pils_limit():
    from cratevit.analysis.images import MAX_PIXELS as LIMIT
    from cratevit.cli.attention import MAX_PIXELS

    assert MAX_PIXELS == LIMIT == Image.MAX_IMAGE_PIXELS


def test_max_pixels_lets_a_large_image_through_when_raised(tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    assert main(["attention", "crate_debug", str(tmp_path / "big.png"), "-o", str(tmp_path / "o"),
                 "--max-pixels", "1000"]) == 2  # fmt: skip
    assert "is 64x64 (0.0 Mpx), more than --max-pixels 1000" in one_line_error(capsys)
    assert main(["attention", "crate_debug", str(tmp_path / "big.png"), "-o", str(tmp_path / "o"),
                 "--max-pixels", "5000"]) == 0  # fmt: skip


# ------------------------------------------------------------------------------------------- the bad-input matrix
def fill(text: str, names: dict[str, object]) -> str:
    for key, value in names.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _bad_files(tmp: Path) -> dict[str, Path]:
    tmp.mkdir(exist_ok=True)
    files = {
        "yaml": tmp / "broken.yaml",
        "typed": tmp / "typed.json",
        "list": tmp / "list.json",
        "unknown": tmp / "unknown.json",
        "random": tmp / "random.pt",
        "huge": write_png_header(tmp / "huge.png", 50000, 50000),
        "big": write_png_header(tmp / "big.png", 12000, 12000),  # took 432 s and 14.3 GB before the cap
    }
    files["yaml"].write_text("epochs: [1, 2\nlr: 0.1\n")
    files["typed"].write_text('{"epochs": "3", "lr": 0.001}')
    files["list"].write_text("[1, 2]")
    files["unknown"].write_text('{"epoch": 3}')
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return files


TRAIN_CASES = [
    (
        ["--config", "{yaml}"],
        "--config {yaml} is not valid YAML/JSON at line 2, column 3 (expected ',' or ']', but got ':')",
    ),
    (["--config", "{typed}"], "option 'epochs' in --config {typed} must be an integer or null, got '3' (str)"),
    (["--config", "{list}"], "--config {list} holds a list, not a mapping of training options"),
    (["--config", "{unknown}"], "unknown training option(s) ['epoch'] in --config {unknown}"),
    (
        ["--config", "{random}"],
        "--config {random} is not a readable PyTorch checkpoint (truncated, corrupt or another file type): Unsupported operand",
    ),
    (
        ["--resume", "{random}"],
        "--resume {random} is not a readable PyTorch checkpoint (truncated, corrupt or another file type): Unsupported operand",
    ),
    (
        ["--model-kwargs", '{"bogus": 1}'],
        "--model-kwargs: unknown crate_debug option(s) ['bogus']; its options: ['attn_impl',",
    ),
    (["--model-kwargs", '{"depth": "x"}'], 'cannot build crate_debug with --model-kwargs {"depth": "x"}'),
    (["--threads", "-2"], "--threads must be a positive number of CPU threads, got -2"),
    (["--steps-per-epoch", "-1"], "--steps-per-epoch must be a positive number of steps, got -1"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), got 1.5"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device; use auto, cpu, cuda or cuda:N"),
    (["--clip-grad", "-1"], "--clip-grad must be a positive max gradient norm, or 0 for no clipping, got -1.0"),
    (["--mixup", "-1"], "--mixup must be a Beta alpha of 0 (off) or more, got -1.0"),
    (["--cutmix", "-0.5"], "--cutmix must be a Beta alpha of 0 (off) or more, got -0.5"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be 0 or more (epochs of linear warmup), got -1.0"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
    (["--workers", "-1"], "--workers must be 0 (load in the main process) or more, got -1"),
    (["--save-every", "-5"], "--save-every must be a number of steps, or 0 to save at epoch ends only, got -5"),
    (["--print-freq", "0"], "--print-freq must be a positive number of steps, got 0"),
    (["--image-size", "0"], "--image-size must be a positive number of pixels, got 0"),
]


@pytest.mark.parametrize(("argv", "message"), TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
@pytest.mark.parametrize("command", ["train", "finetune"])
def test_bad_training_input_is_one_line_exit_2(tmp_path, capsys, argv, message, command):
    names = _bad_files(tmp_path / "files")
    argv = [fill(a, names) for a in argv]
    data = ["--data", "digits"] if command == "finetune" else []
    safe = ["--epochs", "1", "--steps-per-epoch", "1", *QUICK]  # (should a bad value be accepted: a short run)
    code = main([command, "--arch", "crate_debug", *data, "--output", str(tmp_path / "run"), *safe, *argv])
    assert code == 2
    err = one_line_error(capsys)
    assert err.startswith(f"cratevit {command}: error: {fill(message, names)}"), err


IMAGE_CASES = [
    (["attention", "crate_debug", "{huge}", "-o", "{out}"], "{huge} is 50000x50000 (2500.0 Mpx), more than --max-pixels 89478485"),
    (["attention", "crate_debug", "{big}", "-o", "{out}"], "{big} is 12000x12000 (144.0 Mpx), more than --max-pixels 89478485"),
    (["pca", "crate_debug", "{huge}", "-o", "{out}"], "{huge} is 50000x50000 (2500.0 Mpx), more than --max-pixels 89478485"),
    (["analyze", "crate_debug", "--images", "{huge}", "-o", "{out}"], "{huge} is 50000x50000 (2500.0 Mpx), more than --max-pixels 89478485"),
    (["attention", "{random}", "{huge}", "-o", "{out}"], "{random} is not a readable PyTorch checkpoint (truncated, corrupt or another file type)"),
    (["export", "{random}", "--output", "{out}.safetensors"], "{random} is not a readable PyTorch checkpoint (truncated, corrupt or another file type)"),
    (["info", "{random}"], "{random} is not a readable PyTorch checkpoint (truncated, corrupt or another file type)"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), IMAGE_CASES, ids=[" ".join(a[:2] + a[-2:]) for a, _ in IMAGE_CASES])
def test_bad_model_or_image_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    names = {**_bad_files(tmp_path / "files"), "out": tmp_path / "out"}
    argv = [fill(a, names) for a in argv]
    started = time.perf_counter()
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"cratevit {argv[0]}: error: {fill(message, names)}"), err
    assert time.perf_counter() - started < 10  # refused before decoding 2.5 G pixels


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--threads", "-2"], "cratevit train: error: --threads must be a positive number of CPU threads"),
        (["train", "--config", "{yaml}"], "cratevit train: error: --config {yaml} is not valid YAML/JSON"),
        (["attention", "crate_debug", "{huge}", "-o", "{out}"], "cratevit attention: error: {huge} is 50000x50000"),
    ],
)
def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path, argv, message):
    names = {**_bad_files(tmp_path / "files"), "out": tmp_path / "out"}
    argv = [fill(a, names) for a in argv]
    result = subprocess.run([sys.executable, "-m", "cratevit", *argv], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith(fill(message, names)), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------- real signals, real kills
def _popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cratevit", "train", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while last_logged_step(run) < step:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the run did not reach the step in time"
        time.sleep(0.01)


RECIPE = ["--arch", "crate_debug", "--batch-size", "16", "--epochs", "2", "--steps-per-epoch", "15", "--seed", "3",
          "--print-freq", "1", "--threads", "1", *DROPOUT]  # fmt: skip


@pytest.mark.slow
def test_group_sigterm_with_data_workers_saves_and_resumes_bit_equal(tmp_path):
    """What ``timeout``, SLURM and Kubernetes do: SIGTERM to every process of the group, data workers included."""
    killed_dir = tmp_path / "killed"
    killed = _popen(*RECIPE, "--workers", "2", "--output", str(killed_dir))
    _wait_for_step(killed, killed_dir, 4)
    os.killpg(killed.pid, signal.SIGTERM)
    out, _ = killed.communicate(timeout=120)
    assert killed.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "stopped by signal 15 (SIGTERM)" in out and "--resume" in out
    state = torch.load(killed_dir / "last.pt", map_location="cpu", weights_only=True)
    assert 4 <= state["global_step"] < 30
    resumed = subprocess.run([sys.executable, "-m", "cratevit", "train", "--resume", str(killed_dir)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    full = tmp_path / "full"
    assert main(["train", *RECIPE, "--workers", "0", "--output", str(full)]) == 0  # workers do not change results
    assert_same_weights(full / "last.pt", killed_dir / "last.pt")
    assert log_records(killed_dir) == log_records(full)


@pytest.mark.slow
def test_kill_9_loses_at_most_save_every_steps_and_resumes_bit_equal(tmp_path):
    killed_dir = tmp_path / "killed"
    killed = _popen(*RECIPE, "--workers", "0", "--save-every", "3", "--output", str(killed_dir))
    _wait_for_step(killed, killed_dir, 8)
    killed.kill()
    killed.communicate(timeout=60)
    done = last_logged_step(killed_dir)
    saved = torch.load(killed_dir / "last.pt", map_location="cpu", weights_only=True)["global_step"]
    assert saved % 3 == 0 or saved == 15  # a step checkpoint (or the epoch's end)
    assert 0 <= done - saved <= 3, (done, saved)
    (killed_dir / ".last.pt.x7h2k9.tmp").write_bytes(b"half")  # what a kill during a write leaves
    resumed = subprocess.run([sys.executable, "-m", "cratevit", "train", "--resume", str(killed_dir)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not list(killed_dir.glob(".*.tmp"))
    full = tmp_path / "full"
    assert main(["train", *RECIPE, "--workers", "0", "--save-every", "3", "--output", str(full)]) == 0
    assert_same_weights(full / "last.pt", killed_dir / "last.pt")
    assert log_records(killed_dir) == log_records(full)
