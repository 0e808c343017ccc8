"""A per-check time limit cheap enough for thousands of checks per second.

A process per check would cost milliseconds; instead a POSIX interval timer (`SIGALRM`) raises
inside the check when it runs over. Signals only reach the main thread, so elsewhere the limit
is a budget checked after the call: the answer of a check that ran over is thrown away and
counted as a timeout, it just cannot be interrupted early.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class CheckTimeout(Exception):
    """A verifier check ran past its time limit."""


def _raise_timeout(signum, frame):
    raise CheckTimeout()


def _can_use_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_time_limit(func: Callable[[], T], seconds: float) -> T:
    """Return `func()`, or raise `CheckTimeout` if it took longer than `seconds`."""
    if seconds is None or seconds <= 0:
        return func()
    if not _can_use_alarm():
        start = time.perf_counter()
        result = func()
        if time.perf_counter() - start > seconds:
            raise CheckTimeout()
        return result
    previous_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return func()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
