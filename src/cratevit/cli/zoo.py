"""``cratevit zoo [NAME]``: the known CRATE checkpoints, or how to get and load one of them."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "list the known CRATE and CRATE-alpha checkpoints: configuration, parameters, data, where they were published"

COLUMNS = (
    ("name", "name"),
    ("title", "model"),
    ("config", "configuration"),
    ("params", "params"),
    ("trained_on", "trained on"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, help="show one checkpoint in detail (e.g. crate_base_demo)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def format_table(rows: list[dict[str, Any]]) -> str:
    """The zoo table, then the publication address of each checkpoint."""
    cells = [[f"{r[k]:,}" if k == "params" else str(r[k]) for k, _ in COLUMNS] for r in rows]
    header = [title for _, title in COLUMNS]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "weights (download them yourself, then: cratevit info FILE / cratevit.load_checkpoint(FILE)):"]
    name_width = max(len(r["name"]) for r in rows)
    lines += [f"  {r['name']:<{name_width}}  {r['weights']}" for r in rows]
    return "\n".join(lines)


def format_hub_files(files: list[dict[str, Any]]) -> str:
    """Every file the CRATE-alpha authors published, loadable or not, with its size and reported accuracy."""
    lines = [
        "CRATE-alpha files on the Hugging Face Hub (UCSC-VLAA/CRATE-alpha); load one with "
        "cratevit.load_checkpoint(ADDRESS), which downloads it through huggingface_hub's cache:"
    ]
    for f in files:
        top1 = f"top-1 {f['top1']} ({f['top1_source']})" if f["top1"] is not None else "top-1 not reported"
        preset = f"preset {f['preset']}" if f["preset"] else "not loadable"
        lines.append(f"  {f['address']}\n      {f['size']}; {top1}; {preset}" + (f"; {f['note']}" if f["note"] else ""))
    return "\n".join(lines)


def format_entry(row: dict[str, Any]) -> str:
    """One checkpoint in detail, with the commands that load it."""
    fields = [
        ("name", f"{row['name']} ({row['title']})"),
        ("configuration", row["config"]),
        ("parameters", f"{row['params']:,}"),
        ("trained on", row["trained_on"]),
        ("weights", row["weights"]),
        ("file layout", f"{row['family']} (any family loads; see cratevit.checkpoint.FAMILIES)"),
        ("defined in", row["source"]),
        ("note", row["note"]),
        ("reported top-1", row.get("top1", "")),
        (
            "load (Python)",
            f"cratevit.load_checkpoint(FILE)  or  cratevit.create_model({row['name']!r}, checkpoint=FILE)",
        ),
        ("load (shell)", "cratevit info FILE;  cratevit attention --checkpoint FILE IMAGE"),
    ]
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in fields if v)


def run(args: argparse.Namespace) -> int:
    import json

    from ..zoo import ALPHA_HUB_FILES, get_entry, zoo_rows

    rows = zoo_rows()
    files = [
        {
            "address": f.address,
            "size": f.size_text,
            "top1": f.top1,
            "top1_source": f.top1_source,
            "preset": f.preset,
            "note": f.note,
        }
        for f in ALPHA_HUB_FILES
    ]
    if args.name is not None:
        name = get_entry(args.name).name
        rows = [r for r in rows if r["name"] == name]
    if args.json:
        print(json.dumps(rows if args.name is None else rows[0], indent=2))
    elif args.name is None:
        print(format_table(rows) + "\n\n" + format_hub_files(files))
    else:
        print(format_entry(rows[0]))
    return 0
