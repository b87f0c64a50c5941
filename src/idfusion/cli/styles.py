"""``idfusion styles``: list the portrait styles (built-in examples and the user's own), or show one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "styles",
        help="list portrait styles (prompt templates and style LoRAs)",
        description=(
            "List the portrait styles: idfusion's built-in examples, then the TOML style files named by "
            "$IDFUSION_STYLES (files or folders, separated like PATH) and --styles; a later style replaces an "
            "earlier one of the same name. With STYLE, show that style in full."
        ),
    )
    parser.add_argument(
        "style",
        nargs="?",
        metavar="STYLE",
        help="show one style: a name, a .toml file with one style, or FILE.toml:NAME",
    )
    parser.add_argument(
        "--styles",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="another style file or folder of *.toml files (repeatable)",
    )
    parser.add_argument("--subject", help="fill the prompt's {subject} slot with this (default: 'a person')")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def _where(style) -> str:
    return "built-in" if style.builtin else str(style.source) if style.source is not None else "-"


def _weight(style) -> str:
    return "-" if style.weight is None else f"{style.weight:g}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..styles import resolve_style, style_catalogue

    if args.style is not None:
        style = resolve_style(args.style, extra_paths=args.styles)
        if args.json:
            print(json.dumps(style.to_dict() | {"formatted_prompt": style.format_prompt(args.subject)}, indent=1))
            return 0
        fields = [
            ("name", style.name),
            ("title", style.label),
            ("weight", _weight(style)),
            ("lora", style.describe_lora()),
            ("base model", style.base_model or "-"),
            ("defined in", _where(style)),
            ("prompt", style.format_prompt(args.subject)),
            ("negative", style.negative_prompt or "-"),
        ]
        if style.description:
            fields.append(("about", style.description))
        width = max(len(key) for key, _ in fields)
        print("\n".join(f"{key.ljust(width)}  {value}" for key, value in fields))
        return 0

    catalogue = style_catalogue(args.styles)
    if args.json:
        print(json.dumps({"styles": [style.to_dict() for style in catalogue.values()]}, indent=1))
        return 0
    rows = [["NAME", "WEIGHT", "LORA", "DEFINED IN"]]
    rows += [[s.name, _weight(s), s.describe_lora(), _where(s)] for s in catalogue.values()]
    print(_table(rows))
    return 0
