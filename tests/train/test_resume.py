"""The run state and ``--resume`` (cratevit.train.state), beyond ``train``'s own faults (test_faults.py): the
running metrics window travels in the checkpoint, a resume builds the checkpoint's own model, an edited
configuration is refused, a deleted best.pt is not claimed, signals during the last validation are honoured,
a run that diverges before its first checkpoint keeps its finite steps, and a lost torchrun peer is named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cratevit.cli import main
from tests.project.test_layers import SRC, build_graph

FAST = ["--workers", "0", "--threads", "1", "--batch-size", "16", "--seed", "3"]
# 2 epochs of 5 steps, a train record every 3 steps: a stop at step 7 falls inside the window of steps 6-8
WINDOW = ["--epochs", "2", "--steps-per-epoch", "5", "--print-freq", "3", "--save-every", "7"]
MAE_SMALL = ["--model-kwargs", '{"depth": 1, "decoder_depth": 1}', "--warmup-epochs", "0"]


def log_records(run: Path) -> list[dict]:
    """metrics.jsonl without the throughput (img/s depends on the machine's load)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "img_s"} for x in lines]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = checkpoint(a)["model"], checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory) -> Path:
    """A small CRATE-MAE pre-training run's last.pt (the --pretrained file of a fine-tune)."""
    run = tmp_path_factory.mktemp("pre") / "run"
    argv = ["pretrain", *FAST, *MAE_SMALL, "--epochs", "1", "--steps-per-epoch", "2", "--output", str(run)]
    assert main(argv) == 0
    return run / "last.pt"


def _interrupt_at(monkeypatch, how: str, global_step: int) -> None:
    """While computing step ``global_step + 1``: SIGTERM to this process (the loop saves and stops after the
    step), or a crash (kill -9's effect: the run ends at once, last.pt is its last step checkpoint)."""
    from cratevit.train.engine import Trainer

    step = Trainer.train_step

    def interrupted(self, batch):
        if self.global_step == global_step:
            if how == "crash":
                raise RuntimeError("simulated kill")
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)


# ------------------------------------------------------------------------------------------- the window
@pytest.mark.parametrize("command", ["train", "pretrain", "finetune"])
def test_mid_epoch_resume_leaves_metrics_equal_to_the_uninterrupted_run(tmp_path, monkeypatch, capsys, command,
                                                                         mae_file):  # fmt: skip
    """SIGTERM after step 7 and a kill after step 8 (last.pt at step 7): the first record after the resume (step 8)
    averages steps 6-8 as the uninterrupted run's does; every field but img/s is equal, and the weights too. The
    fine-tune starts from a CRATE-MAE whose file is gone before the resume: the checkpoint's own model is built."""
    pretrained = tmp_path / "pre.pt"
    recipe = {
        "train": ["train", "--arch", "crate_debug", "--model-kwargs", '{"dropout": 0.2}'],
        "pretrain": ["pretrain", *MAE_SMALL],
        "finetune": ["finetune", "--data", "digits", "--pretrained", str(pretrained), "--warmup-epochs", "0"],
    }[command] + [*FAST, *WINDOW]
    full = tmp_path / "full"
    shutil.copy(mae_file, pretrained)
    assert main([*recipe, "--output", str(full)]) == 0
    for how, code in (("sigterm", 128 + signal.SIGTERM), ("crash", 1)):
        run = tmp_path / how
        shutil.copy(mae_file, pretrained)
        _interrupt_at(monkeypatch, how, 7 if how == "crash" else 6)
        assert main([*recipe, "--output", str(run)]) == code
        monkeypatch.undo()
        state = checkpoint(run / "last.pt")
        assert (state["global_step"], state["windows"][0]["seen"]) == (7, 32)  # steps 6 and 7 of 16 images
        if command == "finetune":
            pretrained.unlink(missing_ok=True)  # the fine-tune resumes without its --pretrained file
        capsys.readouterr()
        assert main([command, "--resume", str(run)]) == 0, capsys.readouterr().err
        assert "resumed at epoch 2/2 step 2/5" in capsys.readouterr().out
        assert log_records(run) == log_records(full), how
        assert_same_weights(full / "last.pt", run / "last.pt")
    if command == "finetune":
        assert checkpoint(full / "last.pt")["train_config"]["arch"] == "mae_crate_digits_encoder"


def test_checkpoints_written_before_the_window_was_saved_still_resume(tmp_path):
    from cratevit.train.logs import RunningWindow

    assert RunningWindow.from_state(None).state_dict() == {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0}
    window = RunningWindow()
    window.add(0.5, 3, 4)
    window.add(0.25, 1, 4)
    assert RunningWindow.from_state(window.state_dict()).state_dict() == {"loss": 3.0, "correct": 4, "seen": 8,
                                                                          "skipped": 0}  # fmt: skip


# ------------------------------------------------------------------------------------------- what may change
def _short_run(run: Path, *extra: str) -> None:
    assert main(["train", "--arch", "crate_debug", *FAST, "--epochs", "1", "--steps-per-epoch", "2",
                 "--output", str(run), *extra]) == 0  # fmt: skip


def test_resume_refuses_an_edited_config_json_and_a_config_beside_it(tmp_path, capsys):
    run = tmp_path / "run"
    _short_run(run)
    before = (run / "last.pt").read_bytes()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "lr": 0.5, "epochs": 3}))
    assert main(["train", "--resume", str(run)]) == 2
    assert one_line_error(capsys) == (
        f"cratevit train: error: --resume {run}: config.json was edited since the checkpoint (epochs: 1 -> 3, "
        f"lr: 0.002 -> 0.5); a resumed run continues the checkpoint's configuration: give changed options on the "
        f"command line beside --resume (e.g. --epochs 60), or restore config.json"
    )
    assert main(["train", "--resume", str(run), "--config", str(run / "config.json")]) == 2
    assert "--config" in one_line_error(capsys)
    (run / "config.json").write_text(json.dumps(config))  # restored: options beside --resume apply
    assert main(["train", "--resume", str(run), "--arch", "crate_nano"]) == 2
    assert "--arch cannot change on resume (the checkpoint holds crate_debug)" in one_line_error(capsys)
    assert (run / "last.pt").read_bytes() == before  # nothing was overwritten
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", "1e-4"]) == 0
    saved = checkpoint(run / "last.pt")
    assert (saved["epoch"], saved["train_config"]["lr"]) == (2, 1e-4)
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-4


def test_resume_with_changed_options_saves_them_at_once(tmp_path, monkeypatch, capsys):
    """Options changed beside --resume are written to config.json and last.pt together, so a kill before the
    next checkpoint does not leave an 'edited' config.json behind."""
    run = tmp_path / "run"
    _short_run(run)
    _interrupt_at(monkeypatch, "crash", 2)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 1
    monkeypatch.undo()
    assert checkpoint(run / "last.pt")["train_config"]["epochs"] == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0


# ------------------------------------------------------------------------------------------- best.pt, logs, signals
def test_a_deleted_best_pt_is_not_claimed(tmp_path, monkeypatch, capsys):
    from cratevit.train.engine import Trainer

    evaluate = Trainer.evaluate

    def worse_each_epoch(self):
        return {**evaluate(self), "top1": 50.0 - 40.0 * self.epoch}

    monkeypatch.setattr(Trainer, "evaluate", worse_each_epoch)
    run = tmp_path / "run"
    _short_run(run)
    assert "done: best val top-1 50.00% at epoch 1; run directory" in capsys.readouterr().out
    (run / "best.pt").unlink()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {run / 'best.pt'} (epoch 1) was deleted; it cannot be restored" in out
    assert ("done: best val top-1 50.00% at epoch 1, whose best.pt was deleted (no later epoch was better: there is "
            "no best.pt; last.pt holds the final weights)") in out  # fmt: skip
    assert not (run / "best.pt").exists()


def test_a_truncated_metrics_record_is_dropped_with_a_warning(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, "crash", 3)
    assert main(["train", "--arch", "crate_debug", *FAST, "--epochs", "1", "--steps-per-epoch", "5", "--print-freq",
                 "1", "--save-every", "3", "--output", str(run)]) == 1  # fmt: skip
    monkeypatch.undo()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "epoch": 1, "st')  # what a kill in the middle of a write leaves
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: dropped 1 truncated record(s) at line(s) [4]" in err
    assert [r["global_step"] for r in log_records(run) if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_sigint_during_the_last_validation_is_honoured(tmp_path, monkeypatch, capsys):
    from cratevit.train.engine import Trainer

    evaluate = Trainer.evaluate

    def interrupted(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the last epoch validates
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", *FAST, "--epochs", "1", "--steps-per-epoch", "2",
                 "--output", str(run)]) == 128 + signal.SIGINT  # fmt: skip
    out = capsys.readouterr().out
    assert "stopped by signal 2 (SIGINT) after the last epoch's validation (epoch 1/1); the run is complete" in out
    assert checkpoint(run / "last.pt")["epoch"] == 1 and "done:" not in out


def test_divergence_before_the_first_checkpoint_keeps_the_finite_steps(tmp_path, monkeypatch, capsys):
    import cratevit.train.engine as engine

    build = engine.build_model

    def poisoned(cfg, num_classes):  # the head's gradient becomes NaN at the third backward pass
        model, calls = build(cfg, num_classes), {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 3 else grad

        model.head.weight.register_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_model", poisoned)
    run = tmp_path / "run"
    assert main(["train", "--arch", "crate_debug", *FAST, "--epochs", "1", "--steps-per-epoch", "5",
                 "--output", str(run)]) == 2  # fmt: skip
    assert one_line_error(capsys) == (
        f"cratevit train: error: the gradient norm became nan at epoch 1 step 3 (global step 3); stopped before "
        f"applying it: the finite weights of the 2 steps before it are saved in {run / 'last.pt'}; continue with "
        f"--resume {run} and a lower --lr (or set --clip-grad)"
    )
    state = checkpoint(run / "last.pt")
    assert (state["global_step"], state["batch_in_epoch"]) == (2, 2)  # the resumed run draws the bad batch again
    assert all(v.isfinite().all() for v in state["model"].values())
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--lr", "1e-4"]) == 0
    assert checkpoint(run / "last.pt")["global_step"] == 5


# ------------------------------------------------------------------------------------------- torchrun
def test_a_lost_peer_is_named_in_one_line():
    """The survivor's collective fails after the other process ended: LostPeer names its rank and pid."""
    from cratevit.train.distributed import DistInfo, LostPeer, peers_watched

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that has ended
    here = socket.gethostname()
    info = DistInfo(rank=0, world_size=3, peers=((here, os.getpid()), ("another-machine", 1), (here, gone.pid)))
    with pytest.raises(LostPeer) as caught, peers_watched(info, "/runs/r"):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")
    assert str(caught.value).startswith(f"rank 0 of 3 lost rank 2 (pid {gone.pid}): that process ended")
    assert "in /runs/r with torchrun ... --resume RUN_DIR" in str(caught.value)
    with pytest.raises(RuntimeError, match="a real bug"), peers_watched(info):
        raise RuntimeError("a real bug")  # not a peer's loss: the traceback stays


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    for child in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split():
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return int(child)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_kill_9_of_one_torchrun_worker_is_one_line_on_the_survivor(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cratevit",
         "train", "--arch", "crate_debug", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch", "200",
         "--workers", "0", "--print-freq", "1", "--output", str(run)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[0]
        time.sleep(0.05)
    victim = _rank_pid(launcher, 1)
    os.kill(victim, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    assert "this is a bug" not in out and "Connection reset by peer" not in out.split("ChildFailedError")[0], out
    lines = [line for line in out.splitlines() if "lost rank" in line]
    assert lines == [
        f"cratevit train: error: rank 0 of 2 lost rank 1 (pid {victim}): that process ended (killed, out of memory "
        f"or crashed) and the group cannot continue without it; see its own log for why, then continue from the "
        f"last checkpoint in {run} with torchrun ... --resume RUN_DIR"
    ], out


# ------------------------------------------------------------------------------------------- the engine room
def test_the_engine_asks_the_registry_not_a_model_file():
    graph = build_graph(SRC, "cratevit")
    room = {m: graph.edges[m] for m in graph.edges if m.startswith("cratevit.train.") and m != "cratevit.train.build"}
    assert not {m: sorted(e for e in edges if e.startswith("cratevit.models.")) for m, edges in room.items()
                if m != "cratevit.train.objectives" and any(e.startswith("cratevit.models.") for e in edges)}  # fmt: skip
