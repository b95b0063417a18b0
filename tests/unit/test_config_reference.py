"""README's config reference is generated from the field docs in sft_scale/config.py: every
field has a doc, and README holds exactly what the docs render now."""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sft_scale.config import Config
from sft_scale.config_reference import (
    BEGIN,
    END,
    field_docs,
    main,
    render,
    replace_block,
    undocumented,
    write_command,
)

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass
class _Inner:
    documented: int = 1
    """Has a doc,
    over two lines."""
    bare: int = 2
    empty: str = ""
    """ """


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    """A section."""
    entries: list[_Inner] = field(default_factory=list)
    forgotten: bool = False  # a comment is not a doc


def test_readme_config_reference_is_what_the_field_docs_render():
    text = README.read_text(encoding="utf-8")
    assert replace_block(text, render()) == text, (
        f"README.md's config reference is stale: run `{write_command()}` and commit README.md")


def test_every_config_field_has_a_doc():
    assert undocumented() == [], (
        "sft_scale/config.py: document these fields with a string literal on the line under "
        "each (see the fields around them)")


def _keys(cls, prefix=""):
    """Every key a config file can set under `cls`, a list's entries by their own names."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, f"{f.name}.")
            continue
        yield prefix + f.name
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield from _keys(typing.get_args(tp)[0])


def test_the_reference_has_a_row_for_every_key_with_its_type_default_and_doc():
    text = render()
    rows = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    keys = list(_keys(Config))
    assert len(keys) > 90 and "data.datasets" in keys and "sample_by" in keys
    assert set(rows) == set(keys)
    assert "source" not in rows
    assert ("| `distributed.zero` | int or auto or null | `null` | 0-3: ds_configs/zeroN.json; "
            "null: DDP;") in text
    assert "| `training.learning_rate` | float | `0.0002` | The peak learning rate" in text
    assert "**`data.datasets[]` and `data.eval_datasets[]`**" in text
    assert "| `sample_by` | line / paragraph / document | `line` |" in text


def test_field_docs_are_the_strings_under_the_fields():
    assert field_docs(_Inner) == {"documented": "Has a doc,\nover two lines.", "empty": ""}


def test_a_field_without_a_doc_is_named_with_its_dotted_key():
    assert undocumented(_Outer) == ["inner.bare", "inner.empty", "entries", "entries[].bare",
                                    "entries[].empty", "forgotten"]


def test_check_fails_on_a_stale_readme_and_write_brings_it_up_to_date(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{BEGIN}\n| old | table |\n{END}\n\nafter\n", encoding="utf-8")
    assert main(["--check", str(readme)]) == 1
    assert f"run `{write_command(readme)}`" in capsys.readouterr().err
    assert main(["--write", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == f"# intro\n\n{BEGIN}\n{render()}{END}\n\nafter\n"
    assert main(["--check", str(readme)]) == 0


def test_without_a_file_it_prints_the_reference(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out == render()


@pytest.mark.parametrize("text", ["no markers\n", f"{END}\n{BEGIN}\n",
                                  f"{BEGIN}\n{BEGIN}\n{END}\n"])
def test_a_readme_without_one_pair_of_markers_is_refused_naming_them(text):
    with pytest.raises(SystemExit, match="config-reference:begin"):
        replace_block(text, render())
