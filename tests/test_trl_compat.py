"""The TRL workaround: the fused LM head scores only labelled positions inside the block, with
the same log-probabilities, and TRL is restored after it."""

import pytest
import torch
from trl.trainer import utils as trl_utils

from imm_trl.models import tiny_model
from imm_trl.trl_compat import score_labelled_positions_only

# The fused LM head came with TRL's kernels; on older TRL the workaround is a no-op.
chunked_logprob = pytest.importorskip("trl.kernels").chunked_logprob


def test_fused_lm_head_scores_only_labelled_positions_with_the_same_log_probs(monkeypatch):
    model, _ = tiny_model(seed=0)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs",))
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, -100)
    labels[:, 9:] = input_ids[:, 9:]  # a short completion after a long prompt
    rows_scored = []
    original_apply = chunked_logprob.ChunkedLogProbFunction.apply

    def recording_apply(hidden, *args):
        rows_scored.append(hidden.shape[0])
        return original_apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", recording_apply)
    with torch.no_grad():
        every_position = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        with score_labelled_positions_only():
            labelled_only = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert rows_scored == [2 * 11, 2 * 3]  # shifted labels: 11 positions per row, 3 labelled
    assert torch.allclose(every_position.log_probs, labelled_only.log_probs, atol=1e-6)
    assert torch.allclose(every_position.loss, labelled_only.loss, atol=1e-6)
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored
