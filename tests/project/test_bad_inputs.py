"""Bad input to every command: a matrix generated from each command's argparse options, plus malformed COCO files
and the inputs only a run can judge. Every case ends in one line (exit 2), never a traceback, and no invalid value
is accepted unless this file documents why it is valid (``ACCEPTED``).

The matrix only parses (no model is built, nothing trains); the run cases use the debug preset and 32-px images.
"""

import argparse
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from cratevit.cli import COMMANDS, _args, build_parser, main

PROBES = ("0", "-1", "nan", "inf", "1e400", "abc", "2.5")

# Values that parse because they are valid, with the reason. Anything else a numeric option accepts fails the test.
ANY_INT = {"0", "-1"}  # an index: 0 the first, negative counts from the end
ACCEPTED: dict[tuple[str, str], tuple[set[str], str]] = {
    ("*", "layer"): (ANY_INT, "a block index, 0-based; -1 the last block (range checked against the model's depth)"),
    ("*", "seed"): ({"0"}, "seed 0"),
    ("*", "workers"): ({"0"}, "0 workers: load in the main process"),
    ("*", "max_pixels"): ({"0"}, "0: no pixel limit (documented)"),
    ("*", "save_every"): ({"0"}, "0: save at epoch ends only"),
    ("*", "randaug_n"): ({"0"}, "0 RandAugment operations"),
    ("*", "randaug_m"): ({"0"}, "RandAugment magnitude 0"),
    ("*", "weight_decay"): ({"0", "2.5"}, "no weight decay; any non-negative decay"),
    ("*", "warmup_epochs"): ({"0", "2.5"}, "no warmup; fractional warmup epochs"),
    ("*", "min_lr"): ({"0", "2.5"}, "cosine decay to 0; any non-negative floor"),
    ("*", "clip_grad"): ({"0", "2.5"}, "0: no clipping; a max norm"),
    ("*", "label_smoothing"): ({"0"}, "no smoothing"),
    ("*", "mixup"): ({"0", "2.5"}, "0: off; a Beta alpha"),
    ("*", "cutmix"): ({"0", "2.5"}, "0: off; a Beta alpha"),
    ("*", "erase_prob"): ({"0"}, "never erase"),
    ("*", "momentum"): ({"0"}, "no momentum"),
    ("*", "betas"): ({"0"}, "beta 0: no averaging"),
    ("*", "tau"): ({"0"}, "affinity threshold 0: every positive cosine is an edge"),
    ("*", "threshold"): ({"0"}, "keep none of the mass (empty masks, the limit of the range)"),
    ("*", "fg_threshold"): ({"0"}, "every patch above the minimum is foreground"),
    ("*", "warmup"): ({"0"}, "no untimed warm-up round"),
    ("*", "atol"): ({"0", "2.5"}, "an exact, or a loose, ONNX comparison"),
    ("*", "mean"): ({"0", "-1", "2.5"}, "any finite normalisation mean"),
    ("explore", "port"): ({"0"}, "port 0: any free port (documented)"),
    ("sae", "l1"): ({"0", "2.5"}, "no L1 penalty; an L1 coefficient"),
    ("codes", "l1"): ({"0", "2.5"}, "no L1 penalty; an L1 coefficient"),
    ("info", "num_classes"): ({"0"}, "no classifier head: a feature extractor"),
    ("*", "lr"): ({"2.5"}, "a positive learning rate"),
    ("*", "blr"): ({"2.5"}, "a positive base learning rate"),
    ("*", "eps"): ({"2.5"}, "a positive coding-rate eps"),
    ("*", "temperature"): ({"2.5"}, "a positive k-NN temperature"),
    ("*", "l2"): ({"2.5"}, "a positive L2 strength"),
    ("*", "std"): ({"2.5"}, "a positive normalisation std"),
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _required_argv(p: argparse.ArgumentParser) -> list[str]:
    """Placeholders for the positional and required arguments, so that the parser reaches the probed option."""
    argv = []
    for a in p._actions:
        if not a.option_strings:
            value = str(next(iter(a.choices))) if a.choices else "x.png"  # an action word (`sae train`)
            argv += [value] if a.nargs in (None, "+", "?", "*") else [value] * int(a.nargs)
        elif a.required:
            argv += [a.option_strings[0], "x.json"]
    return argv


def _numeric(a: argparse.Action) -> bool:
    return a.type in (int, float) or hasattr(a.type, "what")


def _options() -> list[tuple[str, argparse.Action]]:
    return [(name, a) for name, p in _subparsers().items() for a in p._actions if a.option_strings and _numeric(a)]


# The training commands' numbers are TrainConfig fields, checked in one place, cratevit.train.check_config (which
# also checks --config files and resumed runs); the matrix probes that check for them.
TRAINING = ("train", "finetune", "pretrain")


def test_every_numeric_option_is_checked_by_a_shared_validator():
    """One validation place per kind of option: no bare int/float reaches a command (but the training options)."""
    bare = [
        f"{name} {a.option_strings[0]}" for name, a in _options() if a.type in (int, float) and name not in TRAINING
    ]
    assert bare == [], f"options parsed with a bare int/float (use cratevit.cli._args): {bare}"
    assert len(_options()) > 80  # the matrix really covers every command's numbers


def _parse(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of parsing ``argv``; for the training commands, also of their configuration check."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code), capsys.readouterr().err
    if argv[0] in TRAINING:  # as run_command builds it, without running anything
        from dataclasses import fields, replace

        from cratevit.data import data_info
        from cratevit.errors import UserError
        from cratevit.train import base_config, resolve_config

        base = base_config(argv[0])
        given = {f.name: getattr(args, f.name) for f in fields(base) if hasattr(args, f.name)}
        try:  # the recipe filled in, then check_config: what train() does before building anything
            resolve_config(replace(base, **given), data_info("digits"))
        except UserError as e:
            return 2, f"cratevit {argv[0]}: error: {e}"
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_number_matrix(command, capsys):
    """Every int/float option of ``command`` against 0, -1, nan, inf, an overflowing float, a word and a fraction."""
    p = _subparsers()[command]
    base = [command, *_required_argv(p)]
    accepted, rejected = [], 0
    numeric = [a for a in p._actions if a.option_strings and _numeric(a)]
    for a in numeric:
        opt = a.option_strings[-1] if a.option_strings[-1].startswith("--") else a.option_strings[0]
        allowed, _why = ACCEPTED.get((command, a.dest)) or ACCEPTED.get(("*", a.dest)) or (set(), "")
        for value in PROBES:
            n = a.nargs if isinstance(a.nargs, int) else 1
            code, err = _parse([*base, opt, *[value] * n], capsys)
            if code == 0:
                if value not in allowed:
                    accepted.append(f"{opt} {value}")
                continue
            rejected += 1
            lines = err.strip().splitlines()
            assert code == 2 and "Traceback" not in err and len(lines) == 1, err
            if lines[-1].startswith(f"cratevit {command}: error: argument "):  # argparse, with an _args check
                assert opt in lines[-1] and repr(value) in lines[-1], lines[-1]  # names the option and the value
            else:  # the training configuration's check: names the option (its first spelling) and the value
                assert command in TRAINING and f"--{a.dest.replace('_', '-')}" in lines[-1].replace("_", "-"), lines
                assert f"got {float(value):g}" in lines[-1].replace(".0", "") or value in lines[-1], lines[-1]
    assert accepted == [], f"{command} silently accepts: {accepted}"
    assert rejected >= len(numeric)  # every numeric option refuses at least one probe


def test_validators_say_the_range():
    for check, text, words in [
        (_args.positive_int, "-5", "positive integer"),
        (_args.nonneg_int, "-1", "0 or more"),
        (_args.positive_float, "nan", "finite number above 0"),
        (_args.probability, "1.5", "[0, 1]"),
        (_args.open_unit_float, "0", "(0, 1)"),
        (_args.int_range(18, 23), "0", "18..23"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(words)):
            check(text)
    assert _args.positive_float("1e-3") == 1e-3 and _args.any_int("-2") == -2 and _args.unit_float("0") == 0.0
    assert not math.isnan(_args.finite_float("-1.5"))


# ----------------------------------------------------------------------------------------- what only a run can judge
def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


GT = {
    "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "thing"}],
}
DET = {"image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "score": 0.9}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


MALFORMED_RESULTS = {
    "null": None,
    "an object": {"image_id": 1},
    "a list of null": [None],
    "no image_id": [_without(DET, "image_id")],
    "no score": [_without(DET, "score")],
    "no bbox or mask": [_without(DET, "bbox")],
    "bbox a string": [dict(DET, bbox="x")],
    "bbox of 3": [dict(DET, bbox=[1, 2, 3])],
    "image_id a string": [dict(DET, image_id="1")],
    "NaN score": [dict(DET, score=float("nan"))],
    "infinite score": [dict(DET, score=float("inf"))],
    "segmentation a number": [dict(DET, segmentation=3)],
}
MALFORMED_GT = {
    "null": None,
    "a list": [],
    "images null": dict(GT, images=None),
    "image without id": dict(GT, images=[{"file_name": "a.png"}]),
    "annotation without id": dict(GT, annotations=[_without(GT["annotations"][0], "id")]),
    "annotation without image_id": dict(GT, annotations=[_without(GT["annotations"][0], "image_id")]),
    "annotation without bbox": dict(GT, annotations=[_without(GT["annotations"][0], "bbox")]),
    "bbox a string": dict(GT, annotations=[dict(GT["annotations"][0], bbox="x")]),
    "area NaN": dict(GT, annotations=[dict(GT["annotations"][0], area=float("nan"))]),
}


@pytest.mark.parametrize("case", list(MALFORMED_RESULTS))
def test_detect_eval_refuses_malformed_results(case, tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "r.json").write_text(json.dumps(MALFORMED_RESULTS[case]))
    assert main(["detect-eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "r.json")]) == 2
    _one_line_error(capsys, "cratevit detect-eval: error:", "r.json")


@pytest.mark.parametrize("case", list(MALFORMED_GT))
def test_detect_eval_refuses_malformed_ground_truth(case, tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(MALFORMED_GT[case]))
    (tmp_path / "r.json").write_text(json.dumps([DET]))
    assert main(["detect-eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "r.json")]) == 2
    _one_line_error(capsys, "cratevit detect-eval: error:", "gt.json")


def test_detect_eval_accepts_the_well_formed_files(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "r.json").write_text(json.dumps([DET]))
    assert main(["detect-eval", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "r.json")]) == 0
    assert "| bbox | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out


def test_maskcut_folder_with_malformed_coco_images(tmp_path, capsys):
    (tmp_path / "annotations.json").write_text(json.dumps(dict(GT, images=[{"id": 1, "file_name": "a.png"}])))
    assert main(["maskcut", "crate_debug", "--data", str(tmp_path), "-o", str(tmp_path / "o"), "--size", "32"]) == 2
    _one_line_error(capsys, "annotations.json: image 0", "width")


def test_maskcut_on_a_file_that_is_not_an_image(tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert main(["maskcut", "crate_debug", str(bad), "-o", str(tmp_path / "o"), "--size", "32"]) == 2
    _one_line_error(capsys, "notes.jpg is not a readable image file")


def test_layer_out_of_range_is_one_line_naming_the_range(image, tmp_path, capsys):
    for command in (
        ["attention", "crate_debug", str(image)],
        ["pca", "crate_debug", str(image)],
        ["maskcut", "crate_debug", str(image), "--size", "32"],
    ):
        assert main([*command, "--layer", "7", "-o", str(tmp_path / "o")]) == 2
        line = _one_line_error(capsys, "--layer 7 is out of range")
        assert "0..1 (0-based)" in line  # crate_debug: 2 blocks


def test_maskcut_size_not_a_multiple_of_the_patch(image, tmp_path, capsys):
    assert main(["maskcut", "crate_debug", str(image), "--size", "33", "-o", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "--size 33 is not a multiple of the patch size")


def test_hub_address_with_dot_dot_is_one_line(image, capsys):
    assert main(["predict", "hf-hub:own/repo/../x.pt", str(image)]) == 2
    _one_line_error(capsys, "cannot hold '.' or '..' segments")


def test_mask_ratio_zero_is_refused_before_anything_runs(tmp_path, capsys):
    for command in (["pretrain", "--epochs", "1"], ["reconstruct", "m.pt", "x.png"]):
        code, err = _parse([*command, "--mask-ratio", "0", "-o", str(tmp_path)], capsys)
        assert code == 2 and "argument --mask-ratio" in err and "(0, 1)" in err.splitlines()[-1]


def test_export_opset_zero_is_refused_before_torch(capsys):
    code, err = _parse(["export", "m.pt", "-o", "m.onnx", "--opset", "0"], capsys)
    assert code == 2 and "argument --opset: must be an integer in 18..23, got '0'" in err.splitlines()[-1]


def test_torch_torchvision_mismatch_is_one_line_naming_both_versions(monkeypatch, capsys):
    import importlib.metadata

    import cratevit.cli.info

    def broken(args):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(cratevit.cli.info, "run", broken)
    assert main(["info", "crate_debug"]) == 2
    line = _one_line_error(capsys, "torchvision", "does not match torch", "pip install")
    assert importlib.metadata.version("torch") in line and importlib.metadata.version("torchvision") in line
