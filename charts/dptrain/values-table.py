#!/usr/bin/env python3
"""values.yaml is the one documented source of the chart's settings. This prints (or, with --write, puts into
README.md) the configuration table generated from it: one row per key (dotted path, as for `helm --set`), its
default, and the comment written above it. --write also copies each comment into values.schema.json as the
description of that key (the schema adds only types and constraints).

    .venv/bin/python charts/dptrain/values-table.py --write

tests/unit/test_chart.py fails while README.md's table or the schema's descriptions differ from values.yaml.
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


def schema_with_descriptions(schema: dict[str, Any], values_file: Path) -> dict[str, Any]:
    """``schema`` with the description of every key it names taken from values.yaml's comments."""
    comments = _comments(values_file.read_text().splitlines())

    def walk(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        node = dict(node)
        if "properties" in node:
            properties = {}
            for key, child in node["properties"].items():
                path = prefix + key.replace(".", "\\.")
                child = walk(child, path + ".")
                if comments.get(path):
                    child = {**child, "description": comments[path]}
                properties[key] = child
            node["properties"] = properties
        return node

    return walk(schema, "")


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
    schema_file = chart / "values.schema.json"
    schema = schema_with_descriptions(json.loads(schema_file.read_text()), chart / "values.yaml")
    schema_file.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
    print(f"{schema_file}: descriptions taken from values.yaml")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
