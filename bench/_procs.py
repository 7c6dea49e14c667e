"""CPU time of a server's processes, from /proc: the figure bench/request_cpu.py and
bench/aiperf.py print per process role. Loaded by path (bench/ is kept off sys.path)."""

from __future__ import annotations

import collections
import os
import re

_TICK = os.sysconf("SC_CLK_TCK")

Processes = dict[int, tuple[int, str, float]]


def processes() -> Processes:
    """Every process: pid -> (parent pid, role, CPU seconds so far)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        found[int(entry)] = (
            int(fields[1]),
            role(comm, cmdline),
            (int(fields[11]) + int(fields[12])) / _TICK,
        )
    return found


def role(comm: str, cmdline: str) -> str:
    """A process's role: Ray Serve replicas and actors by their title, HAProxy, the rest."""
    title = re.match(r"ray::(\S+)", cmdline)
    if title:
        name = title.group(1).split(".")[0]  # ray::ServeReplica:app:ingress.method
        return re.sub(r"^ServeReplica:[^:]+:", "replica ", name)
    if "haproxy" in comm:
        return "haproxy"
    if "_naive_server.py" in cmdline:
        return "naive server"
    if "chatfleet serve" in cmdline or cmdline.endswith("/chatfleet"):
        return "chatfleet serve (driver)"
    return comm


def tree(root: int, procs: Processes) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _, _) in procs.items():
        children[ppid].append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children[pid]
    return found


def used(root: int, before: Processes, after: Processes) -> dict[str, float]:
    """CPU seconds by role that ``root``'s tree used between two snapshots (processes
    alive at the end; one that exited meanwhile is not counted)."""
    by_role: dict[str, float] = collections.Counter()
    for pid in tree(root, after):
        _, name, cpu = after[pid]
        by_role[name] += cpu - (before[pid][2] if pid in before else 0.0)
    return dict(by_role)
