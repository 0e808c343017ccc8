"""`nucleus_filter_` as a vLLM (v1) logits processor. Imported only with vLLM installed.

A request asks for it with `SamplingParams(top_p=1.0, extra_args={TOP_P_KEY: p})`; vLLM's own
top-p then does nothing and this processor filters instead, after vLLM applied the temperature
(argmax-invariant processors run there), exactly where vLLM's top-p would have.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from imm_trl.sampling.nucleus import nucleus_filter_

TOP_P_KEY = "imm_top_p"


class NucleusLogitsProcessor(LogitsProcessor):
    """Per-request top-p from `extra_args[TOP_P_KEY]`, kept per batch row like vLLM's min-p."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.top_p: dict[int, float] = {}  # batch row -> top_p, only rows that filter
        self.batch_size = 0

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        top_p = (sampling_params.extra_args or {}).get(TOP_P_KEY)
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"{TOP_P_KEY} must be in (0, 1], got {top_p}")

    def is_argmax_invariant(self) -> bool:
        return True  # the most likely token is always kept

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.top_p.pop(index, None)
        for index, params, _, _ in batch_update.added:
            top_p = (params.extra_args or {}).get(TOP_P_KEY)
            if top_p is not None and top_p < 1:
                self.top_p[index] = float(top_p)
            else:
                self.top_p.pop(index, None)
        for a, b, direction in batch_update.moved:
            value_a, value_b = self.top_p.pop(a, None), self.top_p.pop(b, None)
            if value_a is not None:
                self.top_p[b] = value_a
            if direction == MoveDirectionality.SWAP and value_b is not None:
                self.top_p[a] = value_b
        self.batch_size = batch_update.batch_size

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.top_p:
            return logits
        top_p = torch.ones(logits.shape[0], dtype=logits.dtype)
        for index, value in self.top_p.items():
            if index < logits.shape[0]:
                top_p[index] = value
        return nucleus_filter_(logits, top_p.to(logits.device))
