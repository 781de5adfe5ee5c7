"""Process memory from Linux's /proc (stdlib only: the server and the training code share it)."""

from __future__ import annotations


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


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS: write 5 to /proc/self/clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
