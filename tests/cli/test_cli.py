import argparse
import json
import subprocess
import sys

import torch

from cratevit.cli import main
from reference_crate import ReferenceCRATE


def test_info_prints_exact_parameter_count(capsys):
    assert main(["info", "crate_tiny"]) == 0
    out = capsys.readouterr().out
    assert "6,090,856" in out and "3.620" in out


def test_info_json_for_reference_name(capsys):
    assert main(["info", "CRATE_small", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 13_116_328 and info["dim"] == 576


def test_unknown_preset_is_one_line_error(capsys):
    assert main(["info", "crate_huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown CRATE preset 'crate_huge'" in err[0]


def test_console_script_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "cratevit", "info", "crate_debug"], capture_output=True, text=True)
    assert out.returncode == 0 and "crate_debug" in out.stdout


def test_heads_option_for_files_whose_shapes_cannot_tell_the_head_count(tmp_path, capsys):
    ref = ReferenceCRATE(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, dim_head=16)
    path = tmp_path / "custom.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)  # a bare state_dict, no preset fits
    assert main(["info", str(path), "--json"]) == 2
    assert "heads" in capsys.readouterr().err
    assert main(["info", str(path), "--json", "--heads", "4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["heads"], info["dim_head"], info["dim"], info["depth"]) == (4, 16, 64, 2)


def _missing(monkeypatch, *modules):
    """Make ``modules`` look uninstalled to cratevit's optional-dependency checks."""
    import importlib.util

    import cratevit.errors

    real = importlib.util.find_spec
    monkeypatch.setattr(
        cratevit.errors.importlib.util, "find_spec", lambda n, *a: None if n in modules else real(n, *a)
    )


def test_missing_optional_packages_are_one_line_errors_naming_the_extra(monkeypatch, tmp_path, capsys):
    _missing(monkeypatch, "tensorboard", "scipy", "onnx")
    assert main(["train", "--tensorboard", "--epochs", "1", "--output", str(tmp_path / "run")]) == 2
    assert main(["finetune", "--data", "flower", "--data-dir", str(tmp_path), "--output", str(tmp_path / "ft")]) == 2
    ckpt = tmp_path / "m.pt"
    assert main(["info", "crate_debug"]) == 0
    from cratevit import create_model, save_checkpoint

    save_checkpoint(ckpt, create_model("crate_debug"))
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 3
    for line, extra in zip(err, ("tensorboard", "flowers", "onnx"), strict=True):
        assert f"pip install 'cratevit[{extra}]'" in line, line


def test_the_dev_extra_installs_every_other_extra():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()  # tomllib needs Python 3.11
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^(\w[\w-]*) = \[", section, re.M))
    (dev_extras,) = re.findall(r'"cratevit\[([^\]]+)\]"', section)
    assert {"dev", "tensorboard", "onnx"} <= extras
    assert set(dev_extras.split(",")) == extras - {"dev"}


def test_a_library_bug_keeps_its_traceback_and_says_so(monkeypatch, capsys):
    """Only UserError (CheckpointError, ExportError ...) and missing/unreadable files become one line; a bare
    ValueError from library code is a bug: traceback, then a line asking to report it."""
    import cratevit.cli.info

    def broken(args):
        raise ValueError("internal inconsistency")

    monkeypatch.setattr(cratevit.cli.info, "run", broken)
    assert main(["info", "crate_debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: internal inconsistency" in err
    assert "this is a bug in cratevit" in err.splitlines()[-1]

    def missing(args):
        raise FileNotFoundError("no x.pt")

    monkeypatch.setattr(cratevit.cli.info, "run", missing)
    assert main(["info", "crate_debug"]) == 2
    assert capsys.readouterr().err.strip() == "cratevit info: error: no x.pt"


# ------------------------------------------------------------------------------------------ one vocabulary
def _sub(name):
    import argparse

    from cratevit.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_options_may_stand_between_positional_arguments():
    """The README's maskcut line, and the same order for attention, pca and analyze (issue 24)."""
    from cratevit.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["maskcut", "CKPT", "--arch", "crate_base_demo", "photo.jpg", "more/", "-o", "OUT"])
    assert (
        args.inputs == ["CKPT", "photo.jpg", "more/"] and args.arch == "crate_base_demo" and str(args.output) == "OUT"
    )
    for command in ("attention", "pca"):
        args = parser.parse_args([command, "CKPT", "--layer", "-2", "a.png", "-o", "OUT", "b.png", "--heads", "6"])
        assert args.inputs == ["CKPT", "a.png", "b.png"] and (args.layer, args.heads) == (-2, 6)
    args = parser.parse_args(["analyze", "a.pt", "--eps", "0.5", "b.pt"])
    assert args.models == ["a.pt", "b.pt"] and args.eps == 0.5 and args.output is None


def test_one_spelling_of_the_output_option_with_the_old_one_kept():
    from cratevit.cli import COMMANDS

    with_output = []
    for name in COMMANDS:
        actions = {s: a for a in _sub(name)._actions for s in a.option_strings}
        if "--output" in actions or "--out" in actions:
            a = actions["--output"]
            assert actions["-o"] is a and actions["--out"] is a and a.dest == "output", name
            with_output.append(name)
    assert len(with_output) == 16  # all but info, zoo, explore and predict


def test_arch_and_heads_share_one_help_text():
    helps = {}
    for name in ("analyze", "attention", "pca", "segeval", "maskcut", "export", "predict", "info", "explore"):
        actions = {s: a for a in _sub(name)._actions for s in a.option_strings}
        helps.setdefault("arch", set()).add(actions["--arch"].help)
        helps.setdefault("heads", set()).add(actions["--heads"].help)
    assert len(helps["arch"]) == 1 and len(helps["heads"]) == 1


def test_every_command_that_runs_a_model_takes_threads(torch_threads):
    from cratevit.cli import COMMANDS
    from cratevit.cli._args import apply_threads, positive_int

    without = {
        name for name in COMMANDS if "--threads" not in {s for a in _sub(name)._actions for s in a.option_strings}
    }
    assert without == {"info", "zoo", "export", "detect-eval"}  # no forward pass to spread over threads
    for name in COMMANDS:
        if name not in without:
            (a,) = [a for a in _sub(name)._actions if "--threads" in a.option_strings]
            assert a.type in (positive_int, int) and a.default in (None, argparse.SUPPRESS), name

    torch_threads(2)
    apply_threads(argparse.Namespace(threads=None))  # not given: torch's setting stays
    assert torch.get_num_threads() == 2
    apply_threads(argparse.Namespace(threads=1))
    assert torch.get_num_threads() == 1
    apply_threads(argparse.Namespace(threads=None), default=2)  # a command's own default (explore: 1)
    assert torch.get_num_threads() == 2


def test_version(capsys):
    import pytest

    from cratevit import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"cratevit {__version__}"


def _image(path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_random_weights_are_said_once_and_layers_are_0_based(tmp_path, capsys):
    image = _image(tmp_path / "a.png")
    assert main(["attention", "crate_debug", str(image), "-o", str(tmp_path / "att")]) == 0
    out = capsys.readouterr().out
    assert out.count("random weights") == 1 and "crate_debug: layer 1 (block index, 0-based, of 2)" in out
    info = json.loads((tmp_path / "att" / "attention.json").read_text())
    assert info["layer"] == 1
    from cratevit import create_model

    create_model("crate_debug").save_pretrained(tmp_path / "my-crate")
    assert main(["predict", str(tmp_path / "my-crate"), str(image)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "random weights" not in header
    assert (
        header
        == f"{tmp_path / 'my-crate'}: 10 classes, classes shown by index (the checkpoint stores no class names for its 10 classes)"
    )


def test_analyze_writes_next_to_the_checkpoint_without_o(tmp_path, capsys):
    from cratevit import create_model, save_checkpoint

    run = tmp_path / "RUN"
    run.mkdir()
    save_checkpoint(run / "last.pt", create_model("crate_debug"))
    assert main(["analyze", str(run / "last.pt"), "--num-images", "4", "--batch-size", "4"]) == 0
    assert (run / "analysis" / "layerwise.csv").is_file()
    assert f"wrote {run / 'analysis'}/layerwise.csv" in capsys.readouterr().out


def test_maskcut_reports_progress_per_image(tmp_path, capsys):
    images = [_image(tmp_path / f"{i}.png") for i in range(2)]
    assert main(["maskcut", "crate_debug", *map(str, images), "--size", "32", "-o", str(tmp_path / "mc")]) == 0
    captured = capsys.readouterr()
    assert "maskcut images: 1/2" in captured.err and "maskcut images: 2/2" in captured.err
    assert "random weights" in captured.out and "layer 1 (block index, 0-based)" in captured.out
