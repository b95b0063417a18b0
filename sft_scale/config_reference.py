"""README's config reference, rendered from the field docs in `sft_scale/config.py`.

Each config field is documented once, by the string literal under it (an attribute docstring).
Python keeps no such strings at run time, so they are read from the source with `ast`. The
reference is one Markdown table per section (key, type or allowed values, default, meaning),
written into README between the two markers below:

    python -m sft_scale.config_reference                     # print the reference
    python -m sft_scale.config_reference --check README.md   # exit 1 when README's block is stale
    python -m sft_scale.config_reference --write README.md   # rewrite README's block in place

tests/unit/test_config_reference.py fails when README's block is stale or a field has no doc.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Literal, Union

import yaml

from sft_scale.config import Config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def write_command(path: str | Path = "README.md") -> str:
    """The command that brings `path`'s config reference up to date."""
    return f"python -m sft_scale.config_reference --write {path}"


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its doc} for the dataclass `cls`: the string literal right under each
    annotated field in the class body, dedented. A field without one is absent."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    docs = {}
    for stmt, after in itertools.pairwise(node.body):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _nested(tp) -> type | None:
    """The dataclass a field holds, itself or as a list's items; None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


def undocumented(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted names of the fields of `cls` and of every dataclass under it that have no doc, or
    an empty one."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if not docs.get(f.name, "").strip():
            missing.append(prefix + f.name)
        inner = _nested(hints[f.name])
        if inner is not None:
            sep = "." if dataclasses.is_dataclass(hints[f.name]) else "[]."
            missing += undocumented(inner, f"{prefix}{f.name}{sep}")
    return missing


def type_text(tp) -> str:
    """A field's type as a YAML user reads it: allowed values, `null`, `list of str`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " / ".join(_yaml_scalar(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return ("list of mappings (keys below)" if dataclasses.is_dataclass(inner)
                else f"list of {type_text(inner)}")
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return f"mapping of {type_text(kt)} to {type_text(vt)}"
    return tp.__name__


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).removesuffix(
        "\n...\n").strip()


def default_text(f: dataclasses.Field) -> str:
    """The default as it would be written in YAML (`null`, `true`, `[]`, `""`)."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, float):
        return repr(value)  # 1e-08, where PyYAML writes 1.0e-08
    return _yaml_scalar(value)


def _cell(text: str) -> str:
    """A doc as one table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _table(cls: type, prefix: str) -> list[str]:
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.metadata.get("internal") or dataclasses.is_dataclass(tp):
            continue
        rows.append(f"| `{prefix}{f.name}` | {_cell(type_text(tp))} | `{default_text(f)}` | "
                    f"{_cell(docs[f.name])} |")
    return rows


def render(cls: type = Config) -> str:
    """The reference: the top-level keys, then a table per section of `cls` (its dataclass
    fields), then one per kind of list entry (e.g. the sources of data.datasets)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    out = ["**Top level**", "", *_table(cls, "")]
    entries: dict[type, list[str]] = {}
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        if not dataclasses.is_dataclass(section):
            continue
        out += ["", f"**`{f.name}`**: {_cell(docs[f.name])}", "", *_table(section, f"{f.name}.")]
        section_hints = typing.get_type_hints(section)
        for g in dataclasses.fields(section):
            inner = _nested(section_hints[g.name])
            if inner is not None:
                entries.setdefault(inner, []).append(f"`{f.name}.{g.name}[]`")
    for inner, keys in entries.items():
        out += ["", f"**{' and '.join(keys)}**: the keys of each entry", "", *_table(inner, "")]
    return "\n".join(out) + "\n"


def replace_block(text: str, block: str, where: str = "README.md") -> str:
    """`text` with what lies between BEGIN and END replaced by `block`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{where}: expected one line '{BEGIN}' followed by one line '{END}' "
                         "around the config reference; add them where the reference goes")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sft_scale.config_reference",
                                description="Render README's config reference from the field "
                                            "docs in sft_scale/config.py.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", metavar="README", help="exit 1 when its block is stale")
    mode.add_argument("--write", metavar="README", help="rewrite its block in place")
    args = p.parse_args(argv)
    missing = undocumented()
    if missing:
        raise SystemExit("sft_scale/config.py: fields without a doc (the string under the "
                         f"field): {', '.join(missing)}")
    block = render()
    if not (args.check or args.write):
        sys.stdout.write(block)
        return 0
    path = Path(args.check or args.write)
    text = path.read_text(encoding="utf-8")
    new = replace_block(text, block, str(path))
    if args.write:
        if new != text:
            path.write_text(new, encoding="utf-8")
        return 0
    if new == text:
        return 0
    sys.stderr.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                               str(path), "generated"))
    print(f"{path}: the config reference is stale; run `{write_command(path)}`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
