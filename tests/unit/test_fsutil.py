"""`ossfs.fsutil`'s link-safe opening helpers, on real files in tmp_path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ossfs.fsutil import (
    UnsafeFileError,
    create_exclusive,
    disk_full_reason,
    is_disk_full,
    open_private_file,
    open_subdirectory,
)

VICTIM = b"victim\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(VICTIM)
    return v


def test_open_private_file_creates_and_reopens_our_file(tmp_path: Path) -> None:
    path = tmp_path / "f.ossfs-tmp"
    fd = open_private_file(str(path), os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"resumable")
    os.close(fd)
    fd = open_private_file(str(path), os.O_RDWR)
    try:
        assert os.pread(fd, 100, 0) == b"resumable"
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "kind", ["symlink", "dangling symlink", "hard link", "fifo", "directory", "foreign"]
)
def test_open_private_file_refuses(tmp_path: Path, victim: Path, kind: str) -> None:
    path = tmp_path / "f.ossfs-tmp"
    why = {
        "symlink": "is a symbolic link",
        "dangling symlink": "is a symbolic link",
        "hard link": "has other hard links",
        "fifo": "is not a regular file",
        "directory": "is a directory",
        "foreign": "belongs to another user",
    }[kind]
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nothing-here")
    elif kind == "hard link":
        os.link(victim, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to make a file of another user")
        path.write_bytes(b"")
        os.chown(path, 65534, 65534)
    with pytest.raises(UnsafeFileError) as info:
        open_private_file(str(path), os.O_RDWR | os.O_CREAT, 0o600)
    assert str(info.value).startswith(f"{path} {why}")
    assert victim.read_bytes() == VICTIM
    assert not (tmp_path / "nothing-here").exists()


def test_create_exclusive_replaces_what_is_at_the_name(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "out.ossfs-tmp"
    link.symlink_to(victim)
    fd = create_exclusive(str(link), 0o600)
    try:
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert victim.read_bytes() == VICTIM
    (tmp_path / "d").mkdir()
    with pytest.raises(UnsafeFileError):
        create_exclusive(str(tmp_path / "d"))


def test_open_subdirectory_creates_and_refuses_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_subdirectory(root_fd, ["a", "b"], shown_as=str(root))
        os.close(fd)
        assert (root / "a" / "b").is_dir()
        (root / "a" / "b").rmdir()
        (root / "a" / "b").symlink_to(outside)
        with pytest.raises(UnsafeFileError) as info:
            open_subdirectory(root_fd, ["a", "b", "c"], shown_as=str(root))
        assert str(info.value) == f"{root}/a/b is a symbolic link"
        (root / "f").write_bytes(b"")
        with pytest.raises(UnsafeFileError) as info:
            open_subdirectory(root_fd, ["f"], shown_as=str(root))
        assert str(info.value) == f"{root}/f is not a directory"
        with pytest.raises(FileNotFoundError):
            open_subdirectory(root_fd, ["missing"], shown_as=str(root), create=False)
    finally:
        os.close(root_fd)
    assert os.listdir(outside) == []


def test_is_disk_full() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(OSError(errno.EIO, "I/O error"))
    assert not is_disk_full(ValueError())
    assert disk_full_reason(OSError(errno.EDQUOT, "")) == "disk quota exceeded"
    assert disk_full_reason(OSError(errno.ENOSPC, "")) == "no space left on device"


def test_fitted_names_fit_and_stay_apart() -> None:
    from ossfs.fsutil import fitted_name

    assert fitted_name("short.bin", 100) == "short.bin"
    a, b = "数据" * 35 + "a", "数据" * 35 + "b"  # 211 bytes each, the same start
    fa, fb = fitted_name(a, 150), fitted_name(b, 150)
    assert len(fa.encode()) <= 150 and len(fb.encode()) <= 150
    assert fa != fb and fa.startswith("数据")
    assert fitted_name(a, 150) == fa  # the same name each run (a resume finds it)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_directory_the_file_system_cannot_sync_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    from ossfs.fsutil import fsync_dir

    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    fsync_dir(str(tmp_path))  # (no error)
    code = errno.EIO
    with pytest.raises(OSError):
        fsync_dir(str(tmp_path))  # a real failure still is one
