"""A real FUSE mount of a moto S3 bucket, checked with ordinary tools and byte comparisons."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import mounted, run_ossfs

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def _tree(s3: Any, bucket: str) -> dict[str, bytes]:
    """Upload a small dataset; return what a mount must show (path -> bytes)."""
    rng = __import__("random").Random(7)
    objects: dict[str, bytes] = {
        "data/big.bin": rng.randbytes(9 * MiB + 123),
        "data/one-part.bin": rng.randbytes(MiB),
        "data/empty.bin": b"",
        "top.txt": b"top level\n",
        "name with spaces+plus.txt": "caf\u00e9 \u4e2d\u6587\n".encode(),
        "\u6570\u636e/\u6587\u4ef6.txt": b"unicode path\n",
    }
    for i in range(40):
        objects[f"docs/d{i % 4}/note-{i:02d}.txt"] = (
            f"note {i}\n" + ("needle\n" if i % 7 == 0 else "hay\n") * (i + 1)
        ).encode()
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    # A directory marker, a file/prefix clash and names POSIX cannot show.
    s3.put_object(Bucket=bucket, Key="marked/", Body=b"")
    s3.put_object(Bucket=bucket, Key="clash", Body=b"hidden file")
    s3.put_object(Bucket=bucket, Key="clash/inside.txt", Body=b"inside\n")
    objects["clash/inside.txt"] = b"inside\n"
    s3.put_object(Bucket=bucket, Key="odd//double", Body=b"x")
    s3.put_object(Bucket=bucket, Key="odd/./dot", Body=b"x")
    s3.put_object(Bucket=bucket, Key="odd/" + "n" * 300, Body=b"x")
    s3.put_object(Bucket=bucket, Key="odd/fine.txt", Body=b"fine\n")
    objects["odd/fine.txt"] = b"fine\n"
    return objects


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def dataset(s3: Any, s3_bucket: str) -> dict[str, bytes]:
    return _tree(s3, s3_bucket)


def _mount_opts(moto_endpoint: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--endpoint",
        moto_endpoint,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--part-size",
        "1MiB",
        "--threads",
        "8",
        *extra,
    ]


def test_ordinary_tools(
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    dataset: dict[str, bytes],
    cli_env: dict[str, str],
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(
        f"s3://{s3_bucket}",
        mnt,
        *_mount_opts(moto_endpoint, tmp_path),
        env=cli_env,
        log=tmp_path / "mount.log",
    ):
        # ls -l: names, sizes, read-only modes
        ls = subprocess.run(
            ["ls", "-l", str(mnt / "data")], capture_output=True, text=True, check=True
        ).stdout
        assert "big.bin" in ls and "one-part.bin" in ls and "empty.bin" in ls
        dots = subprocess.run(
            ["ls", "-a", str(mnt / "docs")], capture_output=True, text=True, check=True
        ).stdout.split()
        assert dots[:2] == [".", ".."] and "d0" in dots
        assert os.stat(mnt / "docs" / "..").st_ino == os.stat(mnt).st_ino
        assert sorted(os.listdir(mnt)) == sorted(
            [
                "data",
                "docs",
                "top.txt",
                "name with spaces+plus.txt",
                "\u6570\u636e",
                "marked",
                "clash",
                "odd",
            ]
        )
        st = os.stat(mnt / "data" / "big.bin")
        assert st.st_size == len(dataset["data/big.bin"])
        assert st.st_mode & 0o777 == 0o444
        assert os.stat(mnt / "docs").st_mode & 0o777 == 0o555
        # stat(1) agrees with the listing
        out = subprocess.run(
            ["stat", "-c", "%s %F", str(mnt / "top.txt")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[0] == str(len(dataset["top.txt"])) and out[1] == "regular"

        # cp and cat: byte for byte
        subprocess.run(
            ["cp", str(mnt / "data" / "big.bin"), str(tmp_path / "big.copy")], check=True
        )
        assert (tmp_path / "big.copy").read_bytes() == dataset["data/big.bin"]
        cat = subprocess.run(
            ["cat", str(mnt / "name with spaces+plus.txt")], capture_output=True, check=True
        ).stdout
        assert cat == dataset["name with spaces+plus.txt"]
        assert (mnt / "\u6570\u636e" / "\u6587\u4ef6.txt").read_bytes() == b"unicode path\n"
        assert (mnt / "data" / "empty.bin").read_bytes() == b""

        # grep -r finds exactly the files with the needle
        grep = subprocess.run(
            ["grep", "-rl", "needle", str(mnt / "docs")], capture_output=True, text=True, check=True
        ).stdout.split()
        expected = {
            str(mnt / k) for k, v in dataset.items() if k.startswith("docs/") and b"needle" in v
        }
        assert set(grep) == expected

        # find sees every object that has a POSIX name, and nothing else
        found = subprocess.run(
            ["find", str(mnt), "-type", "f"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert {os.path.relpath(p, mnt) for p in found} == set(dataset)

        # tar of a subtree, extracted elsewhere, is identical
        archive = tmp_path / "docs.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(mnt), "docs"], check=True)
        # (extracted with tar itself: tarfile's extraction filters need Python 3.11.4)
        (tmp_path / "untar").mkdir()
        subprocess.run(["tar", "-xf", str(archive), "-C", str(tmp_path / "untar")], check=True)
        for key, body in dataset.items():
            if key.startswith("docs/"):
                assert (tmp_path / "untar" / key).read_bytes() == body

        # mmap
        with (
            open(mnt / "data" / "big.bin", "rb") as f,
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            big = dataset["data/big.bin"]
            assert m[:100] == big[:100]
            assert m[5 * MiB - 7 : 5 * MiB + 9] == big[5 * MiB - 7 : 5 * MiB + 9]
            assert _sha(m[:]) == _sha(big)

        # the collision rule: the directory wins; marker objects are directories
        assert (mnt / "clash").is_dir()
        assert (mnt / "clash" / "inside.txt").read_bytes() == b"inside\n"
        assert (mnt / "marked").is_dir() and os.listdir(mnt / "marked") == []
        assert os.listdir(mnt / "odd") == ["fine.txt"]
        assert not (mnt / "nope.txt").exists()


def test_concurrent_readers(
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    dataset: dict[str, bytes],
    cli_env: dict[str, str],
) -> None:
    big = dataset["data/big.bin"]
    mnt = tmp_path / "mnt"
    with mounted(f"s3://{s3_bucket}", mnt, *_mount_opts(moto_endpoint, tmp_path), env=cli_env):
        errors: list[str] = []

        def reader(seed: int) -> None:
            rng = __import__("random").Random(seed)
            with open(mnt / "data" / "big.bin", "rb", buffering=0) as f:
                for _ in range(30):
                    off = rng.randrange(len(big))
                    n = rng.randrange(1, 300_000)
                    f.seek(off)
                    got = f.read(n)
                    if got != big[off : off + n]:
                        errors.append(f"reader {seed}: bytes {off}+{n} differ")

        def whole() -> None:
            if (mnt / "data" / "big.bin").read_bytes() != big:
                errors.append("whole-file reader got other bytes")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=whole) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []


def test_writes_fail_with_erofs(
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    dataset: dict[str, bytes],
    cli_env: dict[str, str],
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(f"s3://{s3_bucket}", mnt, *_mount_opts(moto_endpoint, tmp_path), env=cli_env):
        attempts = [
            lambda: os.open(mnt / "new.txt", os.O_WRONLY | os.O_CREAT),
            lambda: os.open(mnt / "top.txt", os.O_RDWR),
            lambda: os.open(mnt / "top.txt", os.O_WRONLY | os.O_APPEND),
            lambda: os.mkdir(mnt / "newdir"),
            lambda: os.unlink(mnt / "top.txt"),
            lambda: os.rename(mnt / "top.txt", mnt / "moved.txt"),
            lambda: os.chmod(mnt / "top.txt", 0o644),
            lambda: os.truncate(mnt / "top.txt", 0),
            lambda: os.setxattr(mnt / "top.txt", "user.x", b"1"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS, attempt
        assert (mnt / "top.txt").read_bytes() == dataset["top.txt"]


def test_xattrs_and_status(
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    dataset: dict[str, bytes],
    cli_env: dict[str, str],
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(
        f"s3://{s3_bucket}", mnt, *_mount_opts(moto_endpoint, tmp_path), env=cli_env
    ) as info:
        target = mnt / "data" / "one-part.bin"
        assert os.getxattr(target, "user.ossfs.cached_bytes") == b"0"
        target.read_bytes()
        assert os.getxattr(target, "user.ossfs.cached_bytes") == str(MiB).encode()
        etag = hashlib.md5(dataset["data/one-part.bin"]).hexdigest()
        assert os.getxattr(target, "user.ossfs.etag").decode() == etag
        dump = subprocess.run(
            ["getfattr", "-d", str(target)], capture_output=True, text=True, check=True
        ).stdout
        assert f'user.ossfs.etag="{etag}"' in dump
        url = os.getxattr(target, "user.ossfs.url").decode()
        assert url == f"s3://{s3_bucket}/data/one-part.bin"
        assert info["bucket"] == s3_bucket
        status = run_ossfs("status", str(mnt), "--json", env=cli_env, check=True)
        doc = json.loads(status.stdout)
        cached = {o["key"]: o["cached_bytes"] for o in doc["objects_cached"]}
        assert cached["data/one-part.bin"] == MiB
        assert doc["requests"]["requests"] >= 2 and doc["bytes_fetched"] >= MiB
        human = run_ossfs("status", str(mnt), env=cli_env, check=True).stdout
        assert "data/one-part.bin" in human and "cache use" in human


def test_eviction_keeps_the_cap_and_reads_stay_correct(
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    dataset: dict[str, bytes],
    cli_env: dict[str, str],
) -> None:
    mnt = tmp_path / "mnt"
    big = dataset["data/big.bin"]
    opts = _mount_opts(moto_endpoint, tmp_path, "--cache-size", "3MiB", "--read-ahead", "2MiB")
    with mounted(f"s3://{s3_bucket}", mnt, *opts, env=cli_env):
        # The object is three times the cap: it still reads right, twice.
        assert _sha((mnt / "data" / "big.bin").read_bytes()) == _sha(big)
        assert _sha((mnt / "data" / "big.bin").read_bytes()) == _sha(big)
        doc = json.loads(run_ossfs("status", str(mnt), "--json", env=cli_env, check=True).stdout)
        # Parts in use may briefly exceed the cap; at rest it holds.
        assert doc["cache_used_bytes"] <= 3 * MiB + 2 * MiB
        assert doc["cache_evicted_bytes"] > 0


@pytest.mark.slow
def test_object_replaced_while_mounted(
    tmp_path: Path, moto_endpoint: str, s3: Any, s3_bucket: str, cli_env: dict[str, str]
) -> None:
    # Larger than objects cached as one part (8 MiB), so that it has parts to fetch later.
    old = os.urandom(12 * MiB)
    new = os.urandom(12 * MiB)
    s3.put_object(Bucket=s3_bucket, Key="v.bin", Body=old)
    mnt = tmp_path / "mnt"
    opts = _mount_opts(moto_endpoint, tmp_path, "--ttl", "1", "--read-ahead", "1MiB")
    with mounted(f"s3://{s3_bucket}", mnt, *opts, env=cli_env, log=tmp_path / "log"):
        with open(mnt / "v.bin", "rb", buffering=0) as f:
            assert f.read(1000) == old[:1000]
            s3.put_object(Bucket=s3_bucket, Key="v.bin", Body=new)
            # Bytes already cached still come from the old version; a part that must be
            # fetched now fails rather than mixing versions.
            f.seek(10 * MiB)
            with pytest.raises(OSError) as e:
                f.read(1000)
            assert e.value.errno == errno.EIO
        assert "changed while open" in (tmp_path / "log").read_text()
        time.sleep(1.5)  # past the TTL: the next open sees the new version
        assert (mnt / "v.bin").read_bytes() == new
