"""Files written whole or not at all (gather_excite._atomic): what a crash leaves behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gather_excite._atomic import atomic_write, write_json


def test_an_interrupted_write_leaves_the_earlier_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"top1_err": 12.5}\n')
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as handle:
        handle.write('{"top1_err": ')
        raise KeyboardInterrupt
    assert path.read_text() == '{"top1_err": 12.5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_finished_write_replaces_the_file_with_a_plain_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run.json"  # the parent is created
    assert write_json({"a": float("nan"), "b": [1, 2]}, path, indent=1) == path
    assert path.read_text() == '{\n "a": NaN,\n "b": [\n  1,\n  2\n ]\n}\n'
    plain = tmp_path / "plain"
    plain.write_text("")
    # mkstemp makes 0600 files; the result has the mode open() gives under this umask (0644 for 022).
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert json.loads(path.read_text().replace("NaN", "null")) == {"a": None, "b": [1, 2]}


def test_a_folder_in_the_way_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OSError):
        write_json({}, tmp_path / "out.json")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"] and (tmp_path / "out.json").is_dir()
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_write(tmp_path / "x", "a"):
        pass
    assert os.listdir(tmp_path) == ["out.json"]
