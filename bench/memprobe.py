"""Process-memory probes shared by the benchmarks (Linux /proc; nothing else imported)."""

from __future__ import annotations


def vm_status(key: str) -> int:
    """A /proc/self/status field in bytes, e.g. "VmHWM" (peak RSS) or "VmRSS"; 0 when absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
