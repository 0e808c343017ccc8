"""How busy the machine was: every benchmark row records this beside its figures, since on 2
shared cores a timing means little without it."""

from __future__ import annotations

import os
from pathlib import Path

QUIET_LOAD = 1.5  # 1-minute load average at or below which a 2-core machine counts as quiet


def cpu_pressure() -> float | None:
    """The share of the last 10 s in which some runnable task waited for a CPU (Linux PSI)."""
    path = Path("/proc/pressure/cpu")
    if not path.exists():
        return None
    some = path.read_text().splitlines()[0].split()
    return float(dict(field.split("=") for field in some[1:])["avg10"])


def machine_load() -> dict:
    """{'load_1m', 'load_5m', 'cpu_pressure_avg10', 'quiet'} now."""
    one, five, _ = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "cpu_pressure_avg10": cpu_pressure(), "quiet": one <= QUIET_LOAD}


def describe(load: dict) -> str:
    label = "quiet" if load["quiet"] else "BUSY"
    return f"load {load['load_1m']:.2f}/{load['load_5m']:.2f}, cpu pressure {load['cpu_pressure_avg10']}% ({label})"
