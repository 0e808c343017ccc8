"""Merging: pure tensor kernels, ratio maps and schedules, the `Merger` protocol with the
in-place LoRA merger and the full-weight merger, and the out-of-core checkpoint merger."""

from imm_trl.merging.checkpoint import merge_checkpoints
from imm_trl.merging.config import (
    MergeConfig,
    RatioMap,
    check_schedule,
    parse_ratio,
    ratio_for_iteration,
)
from imm_trl.merging.functional import MERGE_METHODS, merge_tensors
from imm_trl.merging.lora import LoraMerger
from imm_trl.merging.protocol import Merger, merger_for
from imm_trl.merging.state_dict import FullWeightMerger, merge_state_dicts

__all__ = [
    "MERGE_METHODS",
    "FullWeightMerger",
    "LoraMerger",
    "MergeConfig",
    "Merger",
    "RatioMap",
    "check_schedule",
    "merge_checkpoints",
    "merge_state_dicts",
    "merge_tensors",
    "merger_for",
    "parse_ratio",
    "ratio_for_iteration",
]
