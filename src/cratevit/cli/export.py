"""``cratevit export CKPT --format safetensors|onnx|hf --output PATH``: convert a checkpoint for sharing."""

from __future__ import annotations

import argparse

from ._args import add_arch_heads_arguments, add_output_argument, int_range, nonneg_float

HELP = "convert a training checkpoint (ours or the reference's) to safetensors, a Hugging Face folder, or ONNX"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (.pth/.pt/.safetensors) or a save_pretrained folder")
    add_output_argument(p, "output file (.safetensors, .onnx) or folder (hf)", required=True, type=str)
    p.add_argument(
        "--format",
        choices=("safetensors", "onnx", "hf"),
        default=None,
        help="output format; inferred from --output when omitted (a name without suffix: hf)",
    )
    add_arch_heads_arguments(p)
    p.add_argument(
        "--reference-keys", action="store_true", help="safetensors: write the reference implementation's key names"
    )
    p.add_argument(
        "--batch-size",
        type=int_range(2),
        default=2,
        help="onnx: example batch the graph is traced with (2 or more, so the batch axis stays symbolic)",
    )
    # torch's dynamo exporter builds opset 18 graphs and converts them up to torch.onnx's newest (23 in torch 2.14)
    p.add_argument("--opset", type=int_range(18, 23), default=18, help="onnx: opset version (18..23)")
    p.add_argument(
        "--atol",
        type=nonneg_float,
        default=1e-4,
        help="onnx: largest max |onnxruntime - PyTorch| logit difference accepted",
    )
    p.add_argument("--no-verify", action="store_true", help="onnx: skip the onnxruntime comparison")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import load_checkpoint, load_folder
    from ..errors import UserError
    from ..interop.export import export_model, format_for, verify_onnx

    fmt = args.format or format_for(args.output)
    source = Path(args.checkpoint)
    model = load_folder(source) if source.is_dir() else load_checkpoint(source, arch=args.arch, heads=args.heads)
    options: dict[str, object] = {}
    if fmt == "safetensors":
        options["reference_keys"] = args.reference_keys
    elif fmt == "onnx":
        options.update(batch_size=args.batch_size, opset=args.opset)
    out = export_model(model.eval(), args.output, fmt, **options)
    print(f"wrote {out} ({fmt}, {model.config.name or 'CRATE'}, {model.num_params():,} parameters)")
    if fmt == "onnx" and not args.no_verify:
        diffs = verify_onnx(model, out, batch_sizes=(args.batch_size, args.batch_size + 1))
        report = ", ".join(f"batch {n}: {d:.2e}" for n, d in diffs.items())
        print(f"onnxruntime vs PyTorch max |logit difference|: {report} (atol {args.atol:g})")
        if max(diffs.values()) > args.atol:
            raise UserError(f"ONNX output differs from PyTorch by more than {args.atol:g} ({report}); file kept: {out}")
    return 0
