"""One container as a process tree: its own PID, mount and UTS namespaces (inside the cluster's network
namespace), a root that is this machine's `/` under a private overlay (the "image": this Python environment, with
`python`, `ray` and `k2serve` on PATH), remounted read-only when `readOnlyRootFilesystem`, the pod's volumes
mounted over it, the pod's hosts file, and the command run as the pod's uid with every capability dropped and
no_new_privs. Killing the namespace's first process (SIGKILL) takes the whole tree down, as a runtime does."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_PATH = "/usr/local/bin:/usr/bin:/bin"
IMAGE_HOME = "/home/k2serve"  # the image's $HOME: part of the (read-only) root
IMAGE_TOOLS = {"python": "", "python3": "", "ray": "-m ray.scripts.scripts", "k2serve": "-m k2serve.cli"}
# The "image" is this machine's interpreter environment and the project it imports (an editable install).
IMAGE_TREES = (Path(sys.prefix), Path(__file__).resolve().parents[2])


@dataclass
class Mount:
    source: str  # host path
    target: str  # path in the container
    read_only: bool


@dataclass
class ContainerRun:
    name: str
    workdir: Path  # host folder for this container's overlay layer and logs
    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    hosts_file: str
    hostname: str
    uid: int
    gid: int
    groups: list[int]
    read_only_root: bool
    working_dir: str = "/"


def _image_layer(root: str) -> list[str]:
    """Shell lines that put the image's tools on PATH and make the interpreter readable by any uid (in the
    overlay only: the machine's files are untouched)."""
    lines = [f"mkdir -p {root}/usr/local/bin {root}{IMAGE_HOME}"]
    for tool, module in IMAGE_TOOLS.items():
        body = f"#!/bin/sh\nexec {sys.executable} {module} \"$@\"\n"
        lines.append(f"printf %s {shlex.quote(body)} > {root}/usr/local/bin/{tool}; chmod 755 {root}/usr/local/bin/{tool}")
    real = Path(os.path.realpath(sys.executable))
    for folder in [*real.parents, *Path(sys.prefix).parents, Path(sys.prefix)]:
        if str(folder) != "/":
            lines.append(f"chmod o+rx {root}{shlex.quote(str(folder))} 2>/dev/null || true")
    return lines


def script(run: ContainerRun) -> str:
    root, layer = f"{run.workdir}/root", f"{run.workdir}/layer"
    q = shlex.quote
    lines = ["set -e", "mount --make-rprivate /", f"mkdir -p {root} {layer}", f"mount -t tmpfs -o mode=755 tmpfs {layer}",
             f"mkdir {layer}/upper {layer}/work",
             f"mount -t overlay overlay -o lowerdir=/,upperdir={layer}/upper,workdir={layer}/work {root}",
             f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev", f"mount --rbind /sys {root}/sys",
             *_image_layer(root)]
    for m in run.mounts:
        # Resolved as the image resolves it: the root is an overlay of this machine's `/`, so its symlinks are the
        # machine's (/var/run -> /run); a target through an absolute link would otherwise land outside the root.
        target = f"{root}{os.path.realpath(m.target)}"
        lines.append(f"if [ -d {q(m.source)} ]; then mkdir -p {q(target)}; else mkdir -p $(dirname {q(target)}); "
                     f"touch {q(target)}; fi")
        lines.append(f"mount --bind {q(m.source)} {q(target)}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {q(target)}")
    for tree in IMAGE_TREES:  # a pod volume over a folder holding the image (an emptyDir /tmp over a checkout
        # in /tmp, as CI's may be) must not hide it: in a real image those files are not under /tmp
        if any(tree.is_relative_to(m.target) for m in run.mounts):
            target = q(f"{root}{tree}")
            lines += [f"mkdir -p {target}", f"mount --bind {q(str(tree))} {target}", f"mount -o remount,bind,ro {target}"]
    lines.append(f"mount --bind {q(run.hosts_file)} {root}/etc/hosts")
    lines.append(f"hostname {q(run.hostname)}")
    if run.read_only_root:
        lines.append(f"mount -o remount,ro {root}")
    groups = ",".join(str(g) for g in run.groups)
    priv = ["setpriv", f"--reuid={run.uid}", f"--regid={run.gid}",
            f"--groups={groups}" if groups else "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
            "--no-new-privs"]
    env = [f"{k}={v}" for k, v in run.env.items()]
    lines.append(" ".join(q(w) for w in ["exec", "chroot", root, *priv, "env", "-i", f"--chdir={run.working_dir}",
                                         *env, *run.argv]))
    return "\n".join(lines) + "\n"


def start(run: ContainerRun, netns: str, pid_ns: str | None = None) -> subprocess.Popen[bytes]:
    """The container's first process; output to files. Without `pid_ns` the container gets a PID namespace of its
    own (`unshare`'s child is its PID 1); with it (a pod's `shareProcessNamespace`) it joins that one."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / "setup.sh").write_text(script(run))
    out = open(run.workdir / "output.log", "ab")
    enter = ["nsenter", f"--net={netns}", *([f"--pid={pid_ns}"] if pid_ns else [])]
    own_pid = [] if pid_ns else ["--pid", "--fork", "--kill-child"]
    return subprocess.Popen([*enter, "unshare", "--mount", "--uts", *own_pid, "bash", str(run.workdir / "setup.sh")],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def pause() -> subprocess.Popen[bytes]:
    """A pod's shared PID namespace, held by a sleeping PID 1 (the pause container's part)."""
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "infinity"],
                              start_new_session=True)
    children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")
    deadline = time.monotonic() + 10
    while not children.read_text().strip():  # the namespace exists once its first process does
        if time.monotonic() > deadline:
            raise RuntimeError("pause process did not start")
        time.sleep(0.01)
    return holder


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_container(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to every process of the container: its PID namespace's first process takes the rest with it; in a
    shared namespace each descendant is killed."""
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()
