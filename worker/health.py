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
    """Process uptime (s), 1-minute load ÷ CPU count (a fraction), and used memory (%)."""
    cores = os.cpu_count() or 1
    return {
        "uptime": round(time.monotonic() - _started, 1),
        # The Andera balancer weighs cpuLoad * 5 against free slots * 10: a fraction, unrounded,
        # exactly as the TypeScript worker sends it.
        "cpuLoad": os.getloadavg()[0] / cores,
        "usedMemoryPercent": _used_memory_percent(),
    }
