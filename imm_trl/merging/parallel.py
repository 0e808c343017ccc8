"""Run a merge tensor by tensor on several threads, each torch kernel single-threaded.

A merge is hundreds of short elementwise passes (0.1-10 ms each). With torch's default
intra-op parallelism every pass is an OpenMP parallel region that ends in a barrier; when the
cores are shared with other processes, one descheduled thread holds the barrier for a whole
scheduler time slice, so the merge stretches with the number of passes rather than with the
work. Measured on SmolLM2 fp32 (2 cores, two competing busy processes): 2.7 s with 2 intra-op
threads against 0.45 s quiet, 0.74 s with 1 thread. Giving each thread whole tensors and
single-threaded kernels keeps both cores busy without any barrier between passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

Item = TypeVar("Item")

# vLLM's in-process CPU worker replaces `torch.set_num_threads` with a no-op once it has bound
# its threads, and IMM merges run in that process; the builtin underneath still works.
_set_num_threads = torch._C.set_num_threads


@contextmanager
def single_threaded_kernels():
    """torch's intra-op thread count set to 1 inside the block (threads started inside inherit
    it), restored on exit. Yields the previous count."""
    previous = torch.get_num_threads()
    _set_num_threads(1)
    try:
        yield previous
    finally:
        _set_num_threads(previous)


def for_each_tensor(function: Callable[[Item], None], items: Iterable[Item], on_cpu: bool = True) -> None:
    """Call `function(item)` for every item: on CPU tensors on as many threads as torch's
    intra-op thread count, each kernel single-threaded; elsewhere (an accelerator runs each
    kernel in parallel itself) one after the other. Calls run in the caller's grad mode (it is
    per thread in torch). The items must write disjoint tensors; the first exception raised is
    re-raised after the running calls finish."""
    items = list(items)
    workers = min(torch.get_num_threads(), len(items))
    if not on_cpu or workers <= 1:
        for item in items:
            function(item)
        return
    grad_enabled = torch.is_grad_enabled()

    def call(item: Item) -> None:
        with torch.set_grad_enabled(grad_enabled):
            function(item)

    with single_threaded_kernels(), ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(call, item) for item in items]:
            future.result()
