import json

import pytest
import timm
import torch

from cratebench import (
    BenchOptions,
    build_variant,
    coding_rate_timings,
    format_markdown,
    quick_options,
    run_benchmark,
    time_interleaved,
    training_peak_mib,
    vit_forward_flops,
)
from cratevit.cli import main
from cratevit.models import forward_flops
from cratevit.models.reference import ReferenceCRATE
from cratevit.presets import get_config


def tiny_run(**kw):
    opts = quick_options(
        models=("reference", "cratevit"), dtypes=("float32",), repeats=1, warmup=0, coding_rate=False, **kw
    )
    return run_benchmark(opts)


def test_quick_run_rows_ratios_and_flops():
    result = tiny_run()
    cfg = get_config("crate_debug")
    assert [(r.mode, r.model) for r in result.rows] == [
        ("inference", "reference"),
        ("inference", "cratevit"),
        ("train", "reference"),
        ("train", "cratevit"),
    ]
    for r in result.rows:
        assert r.images_per_s > 0 and r.batch == 4 and len(r.times_s) == 1
        want = forward_flops(cfg, ista_matmuls=3 if r.model == "reference" else 2) / 1e9
        assert r.gflops_per_image == pytest.approx(want)
        factor = 1 if r.mode == "inference" else 3
        assert r.gflops_per_s == pytest.approx(r.images_per_s * factor * want)
        assert r.peak_fraction == pytest.approx(r.gflops_per_s / result.matmul_peak_gflops["float32"])
    ref_rows = [r for r in result.rows if r.model == "reference"]
    assert all(r.speedup == pytest.approx(1.0) for r in ref_rows)
    table = format_markdown(result)
    assert "| mode | dtype | model | batch | images/s | vs reference |" in table
    assert "| inference | float32 | reference | 4 |" in table and "| 1.00x |" in table
    assert result.matmul_peak_gflops["float32"] > 1


def test_reference_variant_has_the_same_weights_and_logits():
    opts = quick_options()
    ref, ref_flops, fused = build_variant("reference", opts)
    model, flops, model_fused = build_variant("cratevit", opts)
    assert isinstance(ref, ReferenceCRATE) and not fused and model_fused
    assert ref_flops > flops  # three ISTA products against two
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_flop_counts_match_published_figures():
    tiny = get_config("crate_tiny")
    assert forward_flops(tiny, ista_matmuls=3) / 1e9 == pytest.approx(4.32, abs=0.01)
    assert forward_flops(tiny) / 1e9 == pytest.approx(3.62, abs=0.01)
    # timm lists ViT-Ti/16 at 1.26 GMACs and ViT-S/16 at 4.61 GMACs per 224 px image
    assert vit_forward_flops(timm.create_model("vit_tiny_patch16_224")) / 2e9 == pytest.approx(1.26, rel=0.02)
    assert vit_forward_flops(timm.create_model("vit_small_patch16_224")) / 2e9 == pytest.approx(4.61, rel=0.02)


def test_time_interleaved_rotates_order_and_counts_repeats():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = time_interleaved(fns, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_training_peak_memory_probe_runs_in_a_fresh_process():
    opts = quick_options(preset="crate_nano", train_batch=8)
    peak = training_peak_mib("cratevit", "float32", opts, steps=1)
    # a fresh interpreter with torch + timm and a small model: hundreds of MiB, not the parent's high-water mark
    assert 100 < peak < 4000


def test_coding_rate_gram_form_agrees_with_direct_under_two_threads(torch_threads):
    torch_threads(2)
    rc = coding_rate_timings(images=4, tokens=197, heads=6, dim_head=64, repeats=1)
    assert rc["nan"] == 0.0
    assert rc["max_rel_diff"] < 1e-10
    assert rc["direct"] > 0 and rc["gram"] > 0


def test_cli_quick_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--no-memory", "--no-coding-rate", "--models", "reference", "cratevit",
                 "--dtype", "bfloat16", "--modes", "inference", "--repeats", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| inference | bfloat16 | cratevit | 4 |" in printed
    assert (out / "bench.md").read_text().strip() == printed.strip()
    data = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["reference", "cratevit"]
    assert data["options"]["preset"] == "crate_debug"


def test_cli_flags_select_rows_and_sizes(monkeypatch):
    from cratevit.cli import build_parser
    from cratevit.cli.bench import options_from_args

    parser = build_parser()
    opts = options_from_args(parser.parse_args(["bench", "--preset", "crate_small", "--batch", "8"]))
    assert opts.models == ("reference", "cratevit", "cratevit+compile", "vit_tiny_patch16_224", "vit_small_patch16_224")
    assert (opts.preset, opts.infer_batch, opts.train_batch) == ("crate_small", 8, 16)
    assert opts.dtypes == ("float32", "bfloat16")
    opts = options_from_args(parser.parse_args(["bench", "--no-compile", "--no-memory"]))
    assert "cratevit+compile" not in opts.models and not opts.memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only builds the options
    gpu = options_from_args(parser.parse_args(["bench", "--gpu"]))
    assert gpu.models == ("reference", "cratevit", "vit_base_patch16_224")
    assert (gpu.preset, gpu.train_batch, gpu.dtypes, gpu.device) == ("crate_base", 256, ("bfloat16",), "cuda")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "resnet50"], "unknown model 'resnet50'"),
        (["--quick", "--gpu"], "--quick and --gpu exclude each other"),
        (["--gpu"], "no CUDA device"),
        (["--preset", "crate_huge"], "unknown CRATE preset 'crate_huge'"),
    ],
)
def test_cli_bad_input_is_one_line_error(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_bad_number_stops_the_parse_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--repeats", "0"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --repeats: must be a positive integer (1, 2, ...), got '0'" in err


def test_options_validate_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        BenchOptions(dtypes=("float16",))


def test_gpu_table_reports_model_flop_utilisation_of_the_named_card():
    from cratebench import BenchResult, Row

    opts = quick_options(dtypes=("bfloat16",), coding_rate=False)
    row = Row(
        mode="train",
        dtype="bfloat16",
        model="cratevit",
        batch=256,
        images_per_s=1000.0,
        gflops_per_image=33.0,
        speedup=1.5,
        gflops_per_s=98_900.0,
        peak_fraction=0.2,
        peak_mib=12_345.0,
    )
    result = BenchResult(
        options=opts,
        device_name="NVIDIA H100 80GB HBM3",
        threads=1,
        matmul_peak_gflops={"bfloat16": 600_000.0},
        rows=[row],
    )
    result.options.device = "cuda"  # as if measured on the card (no CUDA needed to format)
    table = format_markdown(result)
    assert "on NVIDIA H100 80GB HBM3" in table and "MFU (nominal bf16 peak)" in table
    assert "| train | bfloat16 | cratevit | 256 | 1000.0 | 1.50x | 33 | 98900 | 20% | 10.0% | 12,345 |" in table


def test_crate_alpha_is_benchmarked_against_its_literal_formulation_and_the_vit_of_its_size():
    from cratebench import DEFAULT_MODELS
    from cratevit.models import CRATEAlpha, ReferenceCRATEAlpha, alpha_forward_flops

    assert BenchOptions(preset="crate_alpha_b16").models == (
        "reference",
        "cratevit",
        "cratevit+compile",
        "vit_base_patch16_224",
    )
    assert BenchOptions(preset="crate_tiny").models == DEFAULT_MODELS
    opts = quick_options(preset="crate_alpha_debug")
    ref, ref_flops, _ = build_variant("reference", opts)
    model, flops, _ = build_variant("cratevit", opts)
    assert isinstance(ref, ReferenceCRATEAlpha) and isinstance(model, CRATEAlpha)
    assert ref_flops == flops == alpha_forward_flops(get_config("crate_alpha_debug"))  # the same four products
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)
    result = tiny_run(preset="crate_alpha_debug")
    assert [r.model for r in result.rows] == ["reference", "cratevit"] * 2
    assert all(r.images_per_s > 0 for r in result.rows)


def test_bench_outside_a_source_checkout_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    """An installed wheel has no benchmarks/ folder: the command says where the harness lives."""
    import sys

    import cratevit.cli.bench

    monkeypatch.delitem(sys.modules, "cratebench", raising=False)
    monkeypatch.setattr(
        cratevit.cli.bench, "__file__", str(tmp_path / "site-packages" / "cratevit" / "cli" / "bench.py")
    )
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "benchmarks/cratebench.py" in err and "source checkout" in err
