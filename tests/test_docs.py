"""docs/CONFIG.md cannot drift from config.py: its key table lists every key config.py defines, with
config.py's default, and no key config.py does not define; its lists of what a test run and a resumed
run take from the snapshot are engine/snapshot_config.py's. (README's commands: test_readme.py.)"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any

import pytest

from config import cfg

REPO = Path(__file__).resolve().parents[1]
CONFIG_MD = REPO / "docs" / "CONFIG.md"


def key_table(text: str) -> dict[str, str]:
    """Documented key -> its default cell, from the table of "## Configuration keys". A row may
    document several keys (``a`` / ``b`` or ``a``, ``b``) with as many defaults, separated the same way;
    a parenthesis after the defaults (e.g. "(CT: 0.7 / 0.6)") is a note, not a default."""
    section = text.split("## Configuration keys", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        default = re.sub(r"\s*\([^()]*\)\s*$", "", cells[1])
        if len(keys) == 1:
            values = [default]
        else:
            values = default.split(" / " if " / " in cells[0] else ", ")
        assert len(values) == len(keys), f"CONFIG.md row {cells[0]!r}: {len(keys)} keys, defaults {cells[1]!r}"
        for key, value in zip(keys, values):
            assert key not in rows, f"CONFIG.md documents {key!r} twice"
            rows[key] = value.strip()
    return rows


def parse_default(cell: str) -> Any:
    """A default as written in the table: a Python literal; dict keys may be bare (``{lr: 1e-3}``)."""
    return ast.literal_eval(re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r"\1'\2':", cell))


def config_defaults() -> dict[str, Any]:
    """config.py's keys with their defaults (as without QAMP_DATA_ROOT, the only default read from
    the environment); dict-valued keys also as ``key.sub``."""
    from config import DATA_ROOT_ENV

    saved = os.environ.pop(DATA_ROOT_ENV, None)
    try:
        config = dict(cfg())
    finally:
        if saved is not None:
            os.environ[DATA_ROOT_ENV] = saved
    flat = dict(config)
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
    return flat


def documented_defaults() -> dict[str, str]:
    return key_table(CONFIG_MD.read_text(encoding="utf-8"))


def test_every_config_key_is_documented_with_its_default() -> None:
    defaults, documented = config_defaults(), documented_defaults()
    config = dict(cfg())
    missing = [k for k, v in config.items()
               if k not in documented and not (isinstance(v, dict) and all(f"{k}.{s}" in documented for s in v))]
    assert not missing, f"config.py keys missing from docs/CONFIG.md's table: {missing}"
    unknown = sorted(set(documented) - set(defaults))
    assert not unknown, f"docs/CONFIG.md documents keys config.py does not define: {unknown}"
    wrong = {k: (cell, defaults[k]) for k, cell in documented.items() if parse_default(cell) != defaults[k]}
    assert not wrong, f"docs/CONFIG.md defaults differ from config.py's (doc, config.py): {wrong}"


def test_snapshot_key_lists_match_the_code() -> None:
    from engine.snapshot_config import RESUME_FREE_KEYS, TEST_SNAPSHOT_DEFAULTS

    text = " ".join(CONFIG_MD.read_text(encoding="utf-8").split())  # lines joined
    for marker, expected in (("Keys a resumed run may change:", RESUME_FREE_KEYS),
                             ("Data keys a test run takes from the snapshot's training config:",
                              TEST_SNAPSHOT_DEFAULTS)):
        match = re.search(re.escape(marker) + r"(.*?)\.(?:\s|$)", text)
        assert match, f"docs/CONFIG.md has no line {marker!r}"
        assert set(re.findall(r"`([^`]+)`", match.group(1))) == set(expected), marker


def test_the_checks_catch_drift() -> None:
    rows = key_table("## Configuration keys\n| key | default | meaning |\n|---|---|---|\n"
                     "| `seed` | 7 | x |\n| `a` / `b` | 1 / 'x' (CT: 2) | y |\n| `optim` | {lr: 1e-3} | z |\n")
    assert rows == {"seed": "7", "a": "1", "b": "'x'", "optim": "{lr: 1e-3}"}
    assert parse_default(rows["optim"]) == {"lr": 0.001} and parse_default(rows["b"]) == "x"
    assert parse_default(rows["seed"]) != config_defaults()["seed"]
    with pytest.raises(AssertionError, match="2 keys"):
        key_table("## Configuration keys\n| `a` / `b` | 1 | y |\n")
