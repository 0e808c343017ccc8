"""How busy the machine was: every benchmark row records this beside its figures, since on 2
shared cores a timing means little without it."""

from __future__ import annotations

import os
import time
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


def describe(load: dict, judge: bool = True) -> str:
    """`load 1m/5m, cpu pressure x%`, with `(quiet)` or `(BUSY)` when `judge` (not for a load
    taken while the benchmark itself ran)."""
    text = f"load {load['load_1m']:.2f}/{load['load_5m']:.2f}, cpu pressure {load['cpu_pressure_avg10']}%"
    return f"{text} ({'quiet' if load['quiet'] else 'BUSY'})" if judge else text


def settle(max_wait: float = 180.0) -> dict:
    """Wait (at most `max_wait` s) for the 1-minute load to fall to the quiet level, then return
    machine_load(). Call it before each measured run: a benchmark's own threads keep the load near
    the core count while it runs, so only the load before a run says whether others were busy."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(5)
    return machine_load()
