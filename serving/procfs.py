"""Process memory and usable cores from Linux's /proc and cgroup files (stdlib only)."""

from __future__ import annotations

import os


def read_status_kb(field: str, pid: int | str = "self") -> int | None:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRss:
    """Reset and read this process's peak RSS (VmHWM) per batch, through file descriptors kept
    open, a fraction of the cost of opening /proc/self/status and clear_refs each time.
    Off Linux both are no-ops and read() gives None."""

    def __init__(self) -> None:
        try:
            self._status = os.open("/proc/self/status", os.O_RDONLY)
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        except OSError:
            self._status = self._clear = None

    def reset(self) -> None:
        if self._clear is not None:
            try:
                os.pwrite(self._clear, b"5", 0)
            except OSError:
                pass

    def read_kb(self) -> int | None:
        if self._status is None:
            return None
        text = os.pread(self._status, 8192, 0)
        i = text.find(b"VmHWM:")
        return int(text[i + 6 : text.index(b"kB", i)]) if i >= 0 else None

    def close(self) -> None:
        for fd in (self._status, self._clear):
            if fd is not None:
                os.close(fd)
        self._status = self._clear = None


def available_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's `--cpus`, a pod's CPU limit), rounded up. os.cpu_count() is the node's count: 64
    on a 64-core node whatever the pod's limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open(cpu_max).read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
