"""The deployment files (Containerfile, docs/examples/) parse and name what exists.

Each command line they hold is run through the real argument parser of
``ossfs`` (the fstab line through the mount helper's translation too), so an
option that is renamed or removed breaks this test, not a user's cluster.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from ossfs.cli import build_parser, mount_helper_argv
from ossfs.materialize import shard_from_environment

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"


def documents(name: str) -> list[dict[str, Any]]:
    with open(EXAMPLES / name) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def entrypoint() -> list[str]:
    """The Containerfile's ENTRYPOINT (exec form) of its last stage."""
    text = (ROOT / "Containerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT ")]
    assert len(lines) == 1
    argv: list[str] = json.loads(lines[0].removeprefix("ENTRYPOINT "))
    return argv


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container argument."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)


def parse(argv: list[str]) -> Any:
    assert argv[0].rsplit("/", 1)[-1] == "ossfs"
    return build_parser().parse_args(argv[1:])


def test_containerfile_builds_on_debian_12_with_fuse3() -> None:
    text = (ROOT / "Containerfile").read_text()
    stages = [ln.split()[1] for ln in text.splitlines() if ln.startswith("FROM ")]
    assert stages and all(s.startswith("docker.io/library/debian:12") for s in stages)
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"apt-get install [^\n]*\\\n\s+[^\n]*\bfuse3\b", final)
    assert "/opt/ossfs" in final
    # Only what the package needs is copied in (not a developer's .venv).
    copied = [
        ln.split()[1:-1]
        for ln in text.splitlines()
        if ln.startswith("COPY ") and "--from" not in ln
    ]
    assert sorted(p for c in copied for p in c) == ["README.md", "ossfs", "pyproject.toml"]
    assert entrypoint() == ["ossfs", "mount", "-f"]


def test_daemonset_mounts_on_the_node() -> None:
    docs = documents("ossfs-daemonset.yaml")
    ds = of_kind(docs, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["fuse"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert mounts["fuse"]["mountPath"] == "/dev/fuse"
    shared = [m for m in mounts.values() if m.get("mountPropagation") == "Bidirectional"]
    assert len(shared) == 1

    env = {"POD_IP": "10.1.2.3"}
    argv = entrypoint() + [expand(a, env) for a in container["args"]]
    args = parse(argv)
    assert args.command == "mount" and args.foreground and args.allow_other
    # The mountpoint is inside the shared directory, not the shared directory itself
    # (docs/kubernetes.md: pods then see a restarted mount's new mount).
    parent = shared[0]["mountPath"]
    assert Path(args.mountpoint).parent == Path(parent)
    init = spec["initContainers"][0]
    assert args.mountpoint in " ".join(init["command"])
    # The cache is on the node, so it outlives the pod.
    cache = [m for m in mounts.values() if m["mountPath"] == args.cache_dir]
    assert len(cache) == 1 and "hostPath" in volumes[cache[0]["name"]]
    assert args.metrics == ("10.1.2.3", 9100)
    assert container["ports"][0]["containerPort"] == args.metrics[1]
    # Credentials come from the Secret defined beside it, under the names ossfs reads.
    secret = of_kind(docs, "Secret")
    assert container["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {"OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET"}

    # The reader pod mounts the parent, with HostToContainer.
    pod = of_kind(docs, "Pod")
    (reader,) = pod["spec"]["containers"]
    (vm,) = reader["volumeMounts"]
    (vol,) = pod["spec"]["volumes"]
    assert vm["mountPropagation"] == "HostToContainer"
    assert vol["hostPath"]["path"] == volumes[shared[0]["name"]]["hostPath"]["path"]


def test_indexed_job_shards_across_its_pods() -> None:
    job = of_kind(documents("materialize-indexed-job.yaml"), "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    args = parse(container["command"] + container["args"])
    assert args.command == "materialize" and args.shard == "auto"
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # Every pod of the Job gets its own shard, and the shards are all of them.
    completions = spec["completions"]
    seen = set()
    for index in range(completions):
        shard, _ = shard_from_environment(
            {**env, "JOB_COMPLETION_INDEX": str(index)}, args.shard_count
        )
        seen.add(shard)
    assert seen == {(i, completions) for i in range(completions)}


def test_slurm_script_shards_across_its_array() -> None:
    text = (EXAMPLES / "slurm-materialize.sh").read_text()
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)$", text, re.M)
    assert array
    low, high = int(array.group(1)), int(array.group(2))
    command = " ".join(
        ln.rstrip("\\").strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")
    )
    args = parse(shlex.split(command))
    assert args.command == "materialize" and args.shard == "auto"
    seen = set()
    for task in range(low, high + 1):
        env = {
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": str(low),
            "SLURM_ARRAY_TASK_MAX": str(high),
            "SLURM_ARRAY_TASK_COUNT": str(high - low + 1),
        }
        seen.add(shard_from_environment(env)[0])
    assert seen == {(i, high - low + 1) for i in range(high - low + 1)}


def unit_file(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in (EXAMPLES / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, line
        key, sep, val = line.partition("=")
        assert sep, line
        current.setdefault(key.strip(), []).append(val.strip())
    return sections


def test_systemd_unit_mounts_after_the_network() -> None:
    unit = unit_file("ossfs-datasets.service")
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "network-online.target" in unit["Unit"]["After"][0].split()
    assert "network-online.target" in unit["Unit"]["Wants"][0].split()
    service = unit["Service"]
    (start,) = service["ExecStart"]
    args = parse(shlex.split(start))
    assert args.command == "mount"
    # Type=forking waits for the daemonizing mount to be ready; -f would never fork.
    assert service["Type"] == ["forking"] and not args.foreground
    assert args.metrics == ("127.0.0.1", 9100)


@pytest.mark.parametrize(
    "line",
    [
        ln
        for ln in (ROOT / "docs" / "configuration.md").read_text().splitlines()
        if ln.startswith("ossfs#")
    ],
)
def test_fstab_line_is_a_mount(line: str) -> None:
    source, mountpoint, fstype, options, *_ = line.split()
    assert fstype == "fuse3"
    assert "_netdev" in options.split(",")
    argv = mount_helper_argv([source.split("#", 1)[1], mountpoint, "-o", options])
    args = build_parser().parse_args(argv)
    assert args.command == "mount" and args.mountpoint == mountpoint
