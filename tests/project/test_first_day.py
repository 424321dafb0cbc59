"""What a new user, a timm user and a Hub user meet on the first day (issue #15): each test is one friction."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cratevit
from cratevit import create_model, load_checkpoint, save_checkpoint
from cratevit.cli import main
from cratevit.errors import CheckpointError, UserError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------------------------------ start-up cost
def test_import_cratevit_and_help_import_neither_torch_nor_timm():
    out = _python(
        "import sys, cratevit; from cratevit.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'timm', 'huggingface_hub', 'torchvision') if m in sys.modules))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("order", ["import cratevit, timm", "import timm, cratevit"])
def test_presets_reach_timm_in_either_import_order(order):
    out = _python(f"{order}; m = timm.create_model('crate_debug_patch8_32'); print(type(m).__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["CRATE"]


def test_lazy_names_and_hub_methods():
    assert cratevit.CRATE is cratevit.models.CRATE and "create_model" in dir(cratevit)
    assert hasattr(create_model("crate_debug"), "save_pretrained")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cratevit.nothing  # noqa: B018


# ------------------------------------------------------------------------------------------ checkpoints
def test_load_checkpoint_returns_eval_mode_like_from_pretrained(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", create_model("crate_debug").train())
    assert load_checkpoint(path).training is False


def test_harmless_python_objects_beside_the_weights_load(tmp_path):
    """FAIR MAE-style files keep their argparse.Namespace; accuracies stored as numpy floats."""
    model = create_model("crate_debug")
    path = tmp_path / "mae_style.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-3), "acc": np.float64(71.5)}, path)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded.head.weight, model.head.weight)


class Custom:  # stands for any class a checkpoint might pickle
    pass


def test_other_python_objects_are_refused_naming_the_global(tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"model": create_model("crate_debug").state_dict(), "extra": Custom()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"stores a pickled Python object ({Custom.__module__}.Custom)" in message and "never runs code" in message
    assert "\x1b" not in message and "\n" not in message and "two options" not in message


def test_classifier_mismatch_hint_names_a_real_option(tmp_path):
    path = save_checkpoint(tmp_path / "three.pt", create_model("crate_debug", num_classes=3))
    with pytest.raises(CheckpointError, match=r"pass num_classes \(create_model\(name, num_classes=N"):
        create_model("crate_debug", checkpoint=path, num_classes=None)
    assert create_model("crate_debug", num_classes=3, checkpoint=path).head.out_features == 3


def test_zoo_crate_small_is_a_main_py_checkpoint(capsys):
    from cratevit.zoo import get_entry

    assert get_entry("crate_small").family == "reference"  # state_dict, module. keys
    assert main(["zoo", "crate_small"]) == 0
    assert "reference" in capsys.readouterr().out


def test_from_pretrained_mistyped_local_folder_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    create_model("crate_debug").save_pretrained("my-crate")
    start = time.perf_counter()
    for wrong in ("my-crat", "my-crate/sub", "./my-crat"):
        with pytest.raises(FileNotFoundError, match="is not a folder"):
            cratevit.CRATE.from_pretrained(wrong)
    assert time.perf_counter() - start < 2  # no Hub round trips
    assert cratevit.CRATE.from_pretrained("my-crate").num_classes == 10


def test_save_pretrained_writes_a_model_card(tmp_path, monkeypatch):
    from cratevit.checkpoint import write

    # the project link comes from the installed package metadata; pin it so the card reads the same everywhere
    monkeypatch.setattr(write, "_project_url", lambda: "https://github.com/cratevit/cratevit")
    model = create_model("crate_debug")
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": [f"c{i}" for i in range(10)]}
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: cratevit\nlicense: mit\n")
    assert "# crate_debug: a CRATE white-box vision transformer" in card
    assert "14,058 parameters" in card and "10 classes: c0, c1" in card
    assert "https://arxiv.org/abs/2306.01129" in card and "https://github.com/Ma-Lab-Berkeley/CRATE" in card
    assert f"Made with [cratevit](https://github.com/cratevit/cratevit), version {cratevit.__version__}." in card
    monkeypatch.setattr(write, "_project_url", lambda: None)  # metadata without [project.urls]
    model.save_pretrained(tmp_path / "n")
    assert "Made with cratevit (`pip install cratevit`), version" in (tmp_path / "n" / "README.md").read_text()


# ------------------------------------------------------------------------------------------ predict
def _photo(path: Path, size=(300, 400)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_top5_with_class_names_from_the_checkpoint(tmp_path, capsys):
    model = create_model("crate_debug", num_classes=6)
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": ["circle", "square", "tri", "star", "x", "o"]}
    ckpt = save_checkpoint(tmp_path / "shapes.pt", model)
    image = _photo(tmp_path / "a.png")
    assert main(["predict", str(ckpt), str(image), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(row["top"]) == 5 and {r["name"] for r in row["top"]} <= {"circle", "square", "tri", "star", "x", "o"}
    probs = [r["probability"] for r in row["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # the same numbers as the model on the reference preprocessing (crop_pct 1 at 32 px: Resize(32) + CenterCrop)
    from torchvision.transforms import v2

    x = v2.Compose([v2.Resize(32), v2.CenterCrop(32), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(Image.open(image))  # fmt: skip
    with torch.no_grad():
        expected = load_checkpoint(ckpt)(x[None]).softmax(-1)[0].topk(5)
    assert [r["class"] for r in row["top"]] == expected.indices.tolist()


def test_predict_imagenet_names_from_timm(tmp_path, capsys):
    from cratevit.cli.predict import class_names

    names, source = class_names(create_model("crate_tiny", depth=1))
    assert len(names) == 1000 and "ImageNet-1k" in source and names[207] == "golden retriever"
    assert class_names(create_model("crate_debug"))[0] is None


# ------------------------------------------------------------------------------------------ preprocessing
def test_analyze_folder_uses_the_reference_eval_preprocessing():
    from torchvision.transforms import v2

    from cratevit.analysis.images import eval_transform

    model = create_model("crate_tiny", depth=1)
    transform, how = eval_transform(model)
    assert how.startswith("Resize(256) + CenterCrop(224), bilinear")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 450, 3), dtype=np.uint8))
    ref = v2.Compose([v2.Resize(256), v2.CenterCrop(224), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)  # fmt: skip
    torch.testing.assert_close(transform(img), ref, atol=1e-5, rtol=0)


def test_analyze_resize_option(tmp_path):
    from cratevit.cli.analyze import load_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"{i}.png", (40 + i, 60))
    model = create_model("crate_debug")
    for resize, words in (("crop", "Resize(32) + CenterCrop(32)"), ("direct", "resized to 32x32")):
        args = argparse.Namespace(images=None, data=str(folder), num_images=3, seed=0, resize=resize, max_pixels=0)
        x, what = load_images(args, model, "crate_debug")
        assert x.shape == (3, 3, 32, 32) and words in what


# ------------------------------------------------------------------------------------------ training
def test_memory_estimate_matches_the_measurements_and_stops_a_run_that_cannot_fit(monkeypatch):
    from cratevit.presets import get_config
    from cratevit.train import memory

    cfg, n = get_config("crate_small"), 13_116_328
    mib = lambda b: memory.estimate_training_memory(cfg, n, b, "bf16") / 2**20
    # peak RSS measured for two AdamW steps at 224 px (module docstring): batch 4 -> 1,173 MiB, 12 -> 1,636 MiB
    assert abs(mib(4) - 1173) / 1173 < 0.1 and abs(mib(12) - 1636) / 1636 < 0.1
    assert mib(512) / 1024 > 24  # the README's old example (batch 512) cannot fit a 24 GB machine
    model = create_model("crate_small")
    args = argparse.Namespace(arch="crate_small", amp="bf16")
    monkeypatch.setattr(memory, "available_memory", lambda: 20 * 2**30)
    with pytest.raises(UserError, match=r"needs about 27\.\d GiB .* but 20\.0 GiB is available; use --batch-size \d+"):
        memory.check_training_memory(model, args, 512, torch.device("cpu"))
    assert memory.check_training_memory(model, args, 32, torch.device("cpu")) < 4 * 2**30
    assert memory.check_training_memory(model, args, 512, torch.device("meta")) is None  # not a CPU run


def test_warmup_longer_than_the_run_is_flagged(tmp_path, capsys):
    from cratevit.train import TrainConfig, train

    cfg = TrainConfig(epochs=1, steps_per_epoch=2, output=str(tmp_path / "run"), warmup_epochs=3.0)
    assert train(cfg) == 0
    out = capsys.readouterr().out
    assert "warning: --warmup-epochs 3 is not shorter than the run (1 epochs)" in out
    assert "validation [" in out  # validation reports progress too
    names = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["pretrained_cfg"]["label_names"]
    assert list(names) == [str(i) for i in range(10)]  # class names travel with the checkpoint


def _image_folder(root: Path, classes=("cat", "dog"), per_class=3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            _photo(root / c / f"{i}.png", (40, 40))
    return root


def test_evaluate_on_a_val_folder_alone(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.pt", create_model("crate_debug", num_classes=2))
    val = _image_folder(tmp_path / "val_only")
    assert main(["train", "--evaluate", "--pretrained", str(ckpt), "--data", str(val), "--arch", "crate_debug",
                 "--batch-size", "512", "--workers", "0"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 6 and 0 <= result["top1"] <= 100


def test_original_finetune_flags_keep_their_meaning():
    from torchvision.transforms import v2

    from cratevit.cli import build_parser
    from cratevit.data import transforms as T

    args = build_parser().parse_args(
        ["finetune", "--classes", "10", "--rand_aug_n", "3", "--rand_aug_m", "7", "--erase_prob", "0.25",
         "--randomaug", "1"]
    )  # fmt: skip
    assert (args.num_classes, args.randaug_n, args.randaug_m, args.erase_prob) == (10, 3, 7, 0.25)
    steps = T.transfer_train(32, randaug=True, randaug_n=3, randaug_m=7, erase_prob=0.25).transforms
    (ra,) = [t for t in steps if isinstance(t, v2.RandAugment)]
    assert (ra.num_ops, ra.magnitude) == (3, 7)
    assert isinstance(steps[-1], v2.RandomErasing) and steps[-1].p == 0.25  # after Normalize, as the original
    from cratevit.data import data_info
    from cratevit.train import TrainConfig, resolve_config

    with pytest.raises(UserError, match="--classes/--num-classes 100 does not match digits, which has 10"):
        resolve_config(TrainConfig(num_classes=100), data_info("digits"))


def test_bench_gpu_without_a_gpu_names_a_real_option():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import cratebench

    if torch.cuda.is_available():  # the message is for machines without one
        assert cratebench.gpu_options().device == "cuda"
        return
    with pytest.raises(UserError) as info:
        cratebench.gpu_options()
    assert "--device" not in str(info.value) and "without --gpu" in str(info.value)


@pytest.mark.slow
def test_notebook_trains_the_small_model_it_shows_when_no_checkpoint_is_given(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(__file__).resolve().parents[2] / "examples" / "emergence.ipynb"
    monkeypatch.delenv("CRATEVIT_CHECKPOINT", raising=False)
    monkeypatch.setenv("CRATEVIT_TRAIN_EPOCHS", "1")
    monkeypatch.setenv("CRATEVIT_STEPS_PER_EPOCH", "3")  # the test's shortcut; the notebook trains 2 full epochs
    monkeypatch.setenv("CRATEVIT_SHORT_SIDE", "48")
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert (tmp_path / "runs" / "notebook-shapes" / "best.pt").is_file()
    assert "runs/notebook-shapes/best.pt: 6 layers, 3 heads" in text and "random init R^c" in text
