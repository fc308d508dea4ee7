"""CPU and memory of a process tree, read straight from /proc.

CPU comes from two sources, both summed over every live process of the tree:

* ``/proc/<pid>/task/<tid>/schedstat`` — nanoseconds on CPU per thread (precise);
* ``/proc/<pid>/stat`` — utime/stime in clock ticks (10 ms), which gives the
  user/system split; plus cutime/cstime of reaped children.

Memory: VmRSS / VmHWM from ``/proc/<pid>/status`` and Pss from ``smaps_rollup``
(RSS double-counts pages a master shares with its forked workers; PSS does not).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


@dataclass
class CpuSample:
    sched_ns: int  # on-CPU time of live threads (schedstat), ns
    user_ticks: int
    sys_ticks: int
    child_ticks: int  # cutime+cstime of the root: children already reaped

    def minus(self, other: CpuSample) -> dict[str, float]:
        ticks_u = self.user_ticks - other.user_ticks
        ticks_s = self.sys_ticks - other.sys_ticks
        ticks_c = self.child_ticks - other.child_ticks
        sched = (self.sched_ns - other.sched_ns) / 1e9
        stat_total = (ticks_u + ticks_s + ticks_c) / CLK_TCK
        return {
            "cpu_s": sched if sched > 0 else stat_total,
            "cpu_s_stat": stat_total,
            "user_s": ticks_u / CLK_TCK,
            "sys_s": ticks_s / CLK_TCK,
        }


def cpu_sample(pids: list[int]) -> CpuSample:
    sched = user = sys_ = child = 0
    for i, pid in enumerate(pids):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        user += int(fields[11])
        sys_ += int(fields[12])
        if i == 0:
            child += int(fields[13]) + int(fields[14])
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    sched += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return CpuSample(sched, user, sys_, child)


def _status_kb(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_sample(pids: list[int]) -> dict[str, float]:
    """Summed over the tree, in MB (10^6 bytes would mislead: MiB, labelled MB)."""
    rss = sum(_status_kb(p, b"VmRSS:") for p in pids)
    hwm = sum(_status_kb(p, b"VmHWM:") for p in pids)
    pss = sum(_pss_kb(p) for p in pids)
    return {"rss_mb": rss / 1024, "hwm_mb": hwm / 1024, "pss_mb": pss / 1024, "procs": len(pids)}
