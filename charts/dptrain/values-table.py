#!/usr/bin/env python3
"""Prints (or, with --write, puts into README.md) the configuration table of the chart, generated from values.yaml:
one row per key (dotted path, as for `helm --set`), its default, and the comment written above it.

    .venv/bin/python charts/dptrain/values-table.py --write

tests/unit/test_chart.py fails while README.md's table differs from what this prints.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:][^:]*?|\"[^\"]+\"):(?:\s|$)")


def _comments(lines: list[str]) -> dict[str, str]:
    """{dotted key: its comment} from the comment lines directly above each key."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = _KEY_LINE.match(line)
        if not match or line.lstrip().startswith("- "):
            continue
        indent = len(match.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group("key").strip('"')))
        comment: list[str] = []
        above = number - 1
        while above >= 0 and lines[above].startswith(" " * indent + "#"):
            comment.insert(0, re.sub(r"^#\s?(--\s?)?", "", lines[above].strip()))
            above -= 1
        out[".".join(part.replace(".", "\\.") for _, part in stack)] = " ".join(comment).strip()
    return out


def _rows(values: Any, comments: dict[str, str], prefix: str = "") -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for key, value in values.items():
        path = prefix + str(key).replace(".", "\\.")
        section = isinstance(value, dict) and bool(value)
        default = "" if section else f"`{json.dumps(value, ensure_ascii=False)}`"
        rows.append((path, default, comments.get(path, "")))
        if section:
            rows.extend(_rows(value, comments, path + "."))
    return rows


def render_table(values_file: Path) -> str:
    text = values_file.read_text()
    comments = _comments(text.splitlines())
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for path, default, description in _rows(yaml.safe_load(text), comments):
        cells = [f"`{path}`", default, description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    chart = Path(__file__).resolve().parent
    table = render_table(chart / "values.yaml")
    if "--write" not in argv:
        sys.stdout.write(table)
        return 0
    readme = chart / "README.md"
    text = readme.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + "\n" + table + text[end:])
    print(f"{readme}: table of {table.count(chr(10)) - 2} keys written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
