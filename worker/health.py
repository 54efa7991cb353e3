"""The `system` figures of the detailed /health and the load balancer status messages."""

from __future__ import annotations

import os
import time

_started = time.monotonic()


def _used_memory_percent() -> float:
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", total)
    return round(100.0 * (total - available) / total, 1) if total else 0.0


def system() -> dict[str, float]:
    """Process uptime (s), 1-minute load as a percentage of all cores, and used memory (%)."""
    cores = os.cpu_count() or 1
    return {
        "uptime": round(time.monotonic() - _started, 1),
        "cpuLoad": round(100.0 * os.getloadavg()[0] / cores, 1),
        "usedMemoryPercent": _used_memory_percent(),
    }
