"""Narrow workarounds for TRL behaviour that costs IMM users time, each with the TRL version it
was measured on and a guard that makes it a no-op where TRL differs.

TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores only the positions that
carry a label on CUDA/XPU, but every position elsewhere, to keep tile shapes fixed for compilers
such as Neuron's. On a CPU nothing is compiled, and IMM's SFT data is prompt/completion with the
loss on the completion only: with the default suite's few-shot prompts about 95% of positions
are prompt, so the LM head and its log-softmax (30% of an SFT step on SmolLM2-135M, measured
with torch.profiler) ran almost entirely on positions whose loss is masked out. Scoring only
labelled positions gives each of them the same log-probability.
"""

from __future__ import annotations

import contextlib
import logging

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def score_labelled_positions_only():
    """Inside the block, TRL's fused LM head compacts to labelled positions on every device (the
    kernels themselves keep choosing Triton by device). No-op on TRL versions without it."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield
        return
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original
