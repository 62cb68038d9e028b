"""Symbolic links and foreign files planted where ``download`` and ``materialize --to`` write.

Someone who can write the destination directory (a shared /tmp, a team's
data directory) plants a link at the temp file's name, the checkpoint's name
or the output's name, pointing at a victim file. Proved here, against the
OSS test server:

- the victim is never changed, not even truncated;
- a planted temp file (a link, a hard link to the victim, a file of another
  user) stops ``download`` with one line and exit 2; a planted checkpoint is
  discarded with a message and the download starts over; a link at FILE's own
  name is replaced by the downloaded file;
- ``materialize --to`` removes a link at a temp name and replaces a link at
  an output name, never writing where they point.

Resuming a legitimate temp file is covered by ``test_download.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ossfs.download import DownloadRequest, checkpoint_path_for
from ossfs.testing import OssTestServer
from tests.integration.test_download import (
    BUCKET,
    PART,
    error_line,
    interrupt_after,
    oss_download,
    randbytes,
    recorded_parts,
    summary,
)
from tests.integration.test_materialize import materialize, succeeded

VICTIM = b"precious victim content, must never change\n"


@pytest.fixture
def srv(oss_server: OssTestServer) -> OssTestServer:
    oss_server.create_bucket(BUCKET)
    return oss_server


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the destination that a planted link points to."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    v = d / "victim"
    v.write_bytes(VICTIM)
    return v


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# ---------------------------------------------------------------------- download


def plant_link(link: Path, target: Path) -> None:
    link.symlink_to(target)


def plant_hard_link(link: Path, target: Path) -> None:
    os.link(target, link)


def plant_foreign_file(link: Path, target: Path) -> None:
    link.write_bytes(b"")
    os.chown(link, 65534, 65534)


@pytest.mark.parametrize(
    "plant",
    [plant_link, plant_hard_link, plant_foreign_file],
    ids=["symlink", "hard link", "other user's file"],
)
def test_download_refuses_a_planted_temp_file(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, victim: Path, plant: object
) -> None:
    data = randbytes(3 * PART + 5, seed=1)
    srv.put(BUCKET, "obj.bin", data)
    dest = out / "obj.bin"
    temp = out / "obj.bin.ossfs-tmp"
    assert callable(plant)
    plant(temp, victim)
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/obj.bin", str(dest), "--part-size", str(PART)
    )
    assert result.returncode == 2, result.stderr
    line = error_line(result.stderr)
    assert str(temp) in line and "nothing is written through it" in line, line
    assert victim.read_bytes() == VICTIM
    assert not dest.exists()
    assert os.path.lexists(temp)  # not ours to remove


def test_download_through_a_dangling_temp_link_creates_nothing(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, tmp_path: Path
) -> None:
    srv.put(BUCKET, "obj.bin", b"data")
    target = tmp_path / "elsewhere-new-file"
    (out / "obj.bin.ossfs-tmp").symlink_to(target)
    result = oss_download(srv, oss_env, f"oss://{BUCKET}/obj.bin", str(out / "obj.bin"))
    assert result.returncode == 2, result.stderr
    assert "symbolic link" in error_line(result.stderr)
    assert not os.path.lexists(target)


def test_download_discards_a_checkpoint_that_is_a_link(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, tmp_path: Path
) -> None:
    """The link leads to a valid checkpoint of the same object: still not ours to use."""
    data = randbytes(6 * PART + 17, seed=2)
    srv.put(BUCKET, "obj.bin", data)
    dest = out / "obj.bin"
    interrupt_after(srv, oss_env, "obj.bin", dest, 3)
    request = DownloadRequest(bucket=BUCKET, key="obj.bin", file_path=str(dest))
    ckpt = Path(checkpoint_path_for(request, str(dest)))
    assert recorded_parts(ckpt) == {0, 1, 2}
    foreign = tmp_path / "foreign-checkpoint"
    foreign.write_bytes(ckpt.read_bytes())
    before = foreign.read_bytes()
    ckpt.unlink()
    ckpt.symlink_to(foreign)
    result = oss_download(
        srv, oss_env, f"oss://{BUCKET}/obj.bin", str(dest), "--part-size", str(PART)
    )
    summary(result)
    assert "is a symbolic link; starting over" in result.stderr, result.stderr
    assert dest.read_bytes() == data
    assert foreign.read_bytes() == before
    assert not os.path.lexists(ckpt)


def test_download_replaces_a_link_at_the_destination(
    srv: OssTestServer, oss_env: dict[str, str], out: Path, victim: Path
) -> None:
    data = randbytes(2 * PART, seed=3)
    srv.put(BUCKET, "obj.bin", data)
    dest = out / "obj.bin"
    dest.symlink_to(victim)
    summary(
        oss_download(srv, oss_env, f"oss://{BUCKET}/obj.bin", str(dest), "--part-size", str(PART))
    )
    assert not dest.is_symlink()
    assert dest.read_bytes() == data
    assert victim.read_bytes() == VICTIM


# ---------------------------------------------------------------------- materialize --to


def test_materialize_never_writes_through_planted_links(
    oss_server: OssTestServer, oss_env: dict[str, str], out: Path, victim: Path, tmp_path: Path
) -> None:
    files = {
        "p/a.bin": randbytes(2 * PART + 1, seed=4),
        "p/sub/b.txt": b"bee\n",
        "p/c.txt": b"sea\n",
    }
    for key, body in files.items():
        oss_server.put(BUCKET, key, body, mtime=1_650_000_000)
    (out / "sub").mkdir()
    # A link at each name that was a temp name (temp files now have no fixed name:
    # these are somebody else's and stay as they are), and one at an output name.
    (out / "a.bin.ossfs-tmp").symlink_to(victim)
    (out / "sub" / "b.txt.ossfs-tmp").symlink_to(victim)
    (out / "c.txt").symlink_to(victim)
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/p/", tmp_path / "cache", "--to", str(out)
    )
    succeeded(result)
    assert victim.read_bytes() == VICTIM
    assert (out / "a.bin").read_bytes() == files["p/a.bin"]
    assert (out / "sub" / "b.txt").read_bytes() == b"bee\n"
    assert not (out / "c.txt").is_symlink() and (out / "c.txt").read_bytes() == b"sea\n"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "a.bin",
        "a.bin.ossfs-tmp",
        "c.txt",
        "sub",
        "sub/b.txt",
        "sub/b.txt.ossfs-tmp",
    ]
    assert (out / "a.bin.ossfs-tmp").is_symlink()


def test_materialize_skips_a_directory_that_is_a_link(
    oss_server: OssTestServer, oss_env: dict[str, str], out: Path, tmp_path: Path
) -> None:
    oss_server.put(BUCKET, "p/d/x.txt", b"x\n")
    oss_server.put(BUCKET, "p/d/e/y.txt", b"y\n")
    oss_server.put(BUCKET, "p/ok.txt", b"ok\n")
    elsewhere = tmp_path / "elsewhere-dir"
    (elsewhere / "e").mkdir(parents=True)
    (out / "d").symlink_to(elsewhere)
    result = materialize(
        oss_server, oss_env, f"oss://{BUCKET}/p/", tmp_path / "cache", "--to", str(out)
    )
    succeeded(result)
    for key in ("p/d/x.txt", "p/d/e/y.txt"):
        assert f"skipping {key}: {out / 'd'} is a symbolic link" in result.stderr, result.stderr
    assert (out / "ok.txt").read_bytes() == b"ok\n"
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == ["e"]
