"""Server memory from /proc: resident set size of the server process and of its EP workers.

Why a tolerance and a warm-up: the first burst of traffic grows caches that are kept on
purpose and never handed back to the OS (glibc malloc arenas, torch's CPU allocator, gRPC's
buffer pools, Python's object free lists). So "back to its baseline" is checked against the
RSS after a first, identical warm-up run: a leak grows RSS again on every run, a cache does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {key}")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (EP worker ranks are child processes of the server)."""
    parents = _parents()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(child for child, parent in parents.items() if parent == p)
    return tree


@dataclass(frozen=True)
class MemorySample:
    rss_bytes: int  # the server process alone
    tree_rss_bytes: int  # server + worker ranks (shared pages counted once per process)
    peak_rss_bytes: int  # VmHWM of the server process: the high-water mark since it started
    cpu_s: float = 0.0  # CPU time (user + system) of the server process (the front end) so far
    tree_cpu_s: float = 0.0  # ... of it and its children (engine core, EP ranks) alive now


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat (a load-independent cost measure)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> MemorySample:
    tree, tree_cpu = 0, 0.0
    for p in process_tree(pid):
        try:
            tree += _status_kib(p, "VmRSS") * 1024
            tree_cpu += cpu_seconds(p)
        except (OSError, KeyError, IndexError, ValueError):
            continue
    return MemorySample(_status_kib(pid, "VmRSS") * 1024, tree, _status_kib(pid, "VmHWM") * 1024,
                        cpu_seconds(pid), tree_cpu)


@dataclass(frozen=True)
class MemoryVerdict:
    baseline_bytes: int  # tree RSS after the warm-up run, server idle
    final_bytes: int  # tree RSS after the last measured run, server idle
    tolerance_bytes: int
    ok: bool

    @property
    def growth_bytes(self) -> int:
        return self.final_bytes - self.baseline_bytes


def judge(baseline: MemorySample, final: MemorySample, tolerance_mib: float, tolerance_frac: float) -> MemoryVerdict:
    """Back to baseline: final <= baseline + max(tolerance_mib, tolerance_frac * baseline)."""
    tol = int(max(tolerance_mib * MIB, tolerance_frac * baseline.tree_rss_bytes))
    return MemoryVerdict(baseline.tree_rss_bytes, final.tree_rss_bytes, tol,
                         final.tree_rss_bytes - baseline.tree_rss_bytes <= tol)
