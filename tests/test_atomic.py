"""Files written whole or not at all (gather_excite._atomic): what a crash leaves behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gather_excite._atomic import atomic_folder, atomic_path, atomic_write, write_json


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


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """An interrupted build leaves the earlier folder as it was; a finished one replaces it whole (no file of
    the earlier folder stays)."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "weights").write_text("old weights")
    (out / "config.json").write_text("old config")
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as folder:
        (folder / "weights").write_text("new weights")
        raise KeyboardInterrupt  # killed between the weights and the config
    assert {p.name: p.read_text() for p in out.iterdir()} == {"weights": "old weights", "config.json": "old config"}
    assert _hidden(tmp_path) == []
    with atomic_folder(out) as folder:
        (folder / "weights").write_text("new weights")
        (folder / "sub").mkdir()
        (folder / "sub" / "card").write_text("new card")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["sub", "sub/card", "weights"]
    assert (out / "weights").read_text() == "new weights" and _hidden(tmp_path) == []
    # a plain mkdir's mode, not mkdtemp's private 0700
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    with atomic_folder(tmp_path / "new") as folder:  # a folder that was not there
        (folder / "a").write_text("a")
    assert (tmp_path / "new" / "a").read_text() == "a" and _hidden(tmp_path) == []
    (tmp_path / "file").write_text("a file")
    with pytest.raises(NotADirectoryError), atomic_folder(tmp_path / "file"):
        pass
    assert (tmp_path / "file").read_text() == "a file" and _hidden(tmp_path) == []


def test_a_path_is_written_then_renamed_into_place(tmp_path: Path) -> None:
    """For writers that take a file name: the earlier file stays until the block ends without an error."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"good export")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as temporary:
        temporary.write_bytes(b"half an exp")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"good export" and os.listdir(tmp_path) == ["model.onnx"]
    with atomic_path(path) as temporary:
        assert temporary.name == "model.onnx" and temporary.parent != tmp_path
        temporary.write_bytes(b"new export")
        (temporary.parent / "model.onnx.data").write_bytes(b"weights")  # ONNX's external data, beside it
        assert path.read_bytes() == b"good export"  # checked (read back) before it replaces the file
    assert path.read_bytes() == b"new export" and (tmp_path / "model.onnx.data").read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]


def test_a_lock_is_busy_only_when_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without flock (Lustre without -o flock: ENOSYS) refused every run as "busy"."""
    import errno
    import fcntl

    from gather_excite._atomic import lock_folder
    from gather_excite.errors import RunExistsError

    held = lock_folder(tmp_path / "run", "busy")
    with pytest.raises(RunExistsError, match=r"^busy$"):
        lock_folder(tmp_path / "run", "busy")
    os.close(held)

    def unsupported(*_args: object) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.warns(UserWarning, match="cannot lock the folder on this file system"):
        assert lock_folder(tmp_path / "run", "busy") is None


def test_a_claimed_name_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gather_excite.cli._outputs import next_free_path

    (tmp_path / "eval.json").symlink_to(tmp_path / "gone")  # a dangling link is a taken name
    with pytest.raises(FileExistsError):
        write_json({"a": 1}, tmp_path / "eval.json", exclusive=True)
    assert next_free_path(tmp_path / "eval.json") == tmp_path / "eval-2.json"  # it was eval.json: a loop
    # Without hard links (vfat, some network file systems) the name is claimed by an exclusive create.
    monkeypatch.setattr(os, "link", lambda *_args: (_ for _ in ()).throw(PermissionError("no hard links")))
    assert write_json({"a": 1}, tmp_path / "eval-2.json", exclusive=True).read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(FileExistsError):
        write_json({"a": 2}, tmp_path / "eval-2.json", exclusive=True)
    assert json.loads((tmp_path / "eval-2.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-2.json", "eval.json"]


def test_a_folder_replaced_in_place_keeps_its_mode_and_dot_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    out.mkdir()
    os.chmod(out, 0o2775)  # a group's shared folder
    with atomic_folder(out) as folder:
        (folder / "weights").write_text("new")
    assert stat.S_IMODE(out.stat().st_mode) == 0o2775 and (out / "weights").read_text() == "new"
    monkeypatch.chdir(out)  # "--out ." : it failed with EBUSY and left a hidden folder inside
    with atomic_folder(".") as folder:
        (folder / "weights").write_text("newer")
    assert (out / "weights").read_text() == "newer" and _hidden(tmp_path) == [] and _hidden(out) == []


def test_a_folders_files_get_a_plain_files_mode(tmp_path: Path) -> None:
    """safetensors' save_file makes 0600 files: an exported model.safetensors was private while the
    config.json and README.md beside it had the mode open() gives (0644 under umask 022)."""
    plain = tmp_path / "plain"
    plain.write_text("")
    expected = stat.S_IMODE(plain.stat().st_mode)
    out = tmp_path / "export"
    with atomic_folder(out) as folder:
        for name in ("model.safetensors", "sub/private"):
            file = folder / name
            file.parent.mkdir(exist_ok=True)
            file.write_bytes(b"weights")
            os.chmod(file, 0o600)  # as save_file leaves it
        (folder / "config.json").write_text("{}")
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {"model.safetensors": expected, "sub/private": expected, "config.json": expected}
