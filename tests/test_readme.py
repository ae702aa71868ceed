"""The README's settings table is the complete list: every field of Settings, its variable name
and its default, nothing that no longer exists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from pipeline.settings import ENV_PREFIX, Settings

README = Path(__file__).parents[1] / "README.md"
ROW = re.compile(r"^\| `(SKUTAG_[A-Z0-9_]+)` \| (.+?) \| (.+) \|$")


def settings_table() -> dict[str, str]:
    text = README.read_text()
    section = text[text.index("\n## Settings\n") :]
    section = section[: section.index("\n## ", 1)]
    return {match[1]: match[2] for line in section.splitlines() if (match := ROW.match(line))}


def default_of(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return json.loads(json.dumps(value, default=str))  # Paths as strings, as a user writes them


def documented_value(cell: str) -> Any:
    """The first `code` span of a default cell, read as JSON where it parses (numbers, lists)."""
    code = re.search(r"`([^`]*)`", cell)
    if code is None:
        return None
    try:
        return json.loads(code[1])
    except json.JSONDecodeError:
        return code[1]


def test_every_setting_is_in_the_readme_and_nothing_else() -> None:
    documented = settings_table()
    expected = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert sorted(expected - set(documented)) == [], "settings missing from the README table"
    assert sorted(set(documented) - expected) == [], "README rows for settings that do not exist"


def test_the_readme_shows_each_default() -> None:
    documented = settings_table()
    for name, field in Settings.model_fields.items():
        cell = documented[ENV_PREFIX + name.upper()]
        default = default_of(field)
        if default is None:
            assert cell.startswith("unset"), f"{name}: no default, README says {cell!r}"
        else:
            assert documented_value(cell) == default, f"{name}: default {default!r}, README says {cell!r}"
