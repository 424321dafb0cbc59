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
