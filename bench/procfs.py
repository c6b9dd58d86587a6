"""What the benchmark scripts read from /proc about the processes they measure: CPU seconds,
memory figures from /proc/PID/status, resetting the peak RSS; and their log line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def proc_cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of the process (with `children`, plus those of its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, field: str) -> int:
    """A kB figure of /proc/PID/status (`VmHWM`, `VmRSS`, ...); 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False
