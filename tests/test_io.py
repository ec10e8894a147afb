import os

import pytest

from hf_effllm.errors import HfEffllmError
from hf_effllm.utils.io import atomic_dir, atomic_write_text


def test_atomic_dir_success_and_permissions(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        atomic_write_text(tmp / "b.txt", "y")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_refused_then_kept_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(HfEffllmError, match="exists and is not empty.*--overwrite"), atomic_dir(target):
        pass
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True):
        raise RuntimeError("boom")
    assert (target / "mine.txt").read_text() == "user data"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(HfEffllmError, match="is a file"), atomic_dir(f):
        pass


def test_atomic_write_text_replaces(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic_write_text(p, "1")
    atomic_write_text(p, "2")
    assert p.read_text() == "2"
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]
