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

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # tomllib needs Python 3.11
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
