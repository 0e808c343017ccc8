"""The merge methods as data (mergekit's registry style): what each one does to the delta
theta - theta0, so that callers ask `merge_method(name).<field>` instead of testing names.
See docs/design.md ("The method") for the update rule these operators plug into.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MergeMethod:
    """What a merge method does to the delta theta - theta0."""

    name: str
    sparsification: str | None  # None; "random": DARE's Bernoulli(density) keep mask; "magnitude": TIES' top-density trim
    consensus: str | None  # None, or "sign": TIES' sign election and disjoint mean over models
    rescale: bool  # kept elements are divided by density (DARE), so merged values can exceed theta
    elementwise: bool  # each output element needs only the same element of the inputs (chunkable)

    @property
    def uses_density(self) -> bool:
        return self.sparsification is not None

    @property
    def keeps_every_element(self) -> bool:
        """A plain linear combination: no sparsification, no consensus."""
        return self.sparsification is None and self.consensus is None

    @property
    def draws_masks(self) -> bool:
        return self.sparsification == "random"

    @property
    def in_place(self) -> bool:
        """Whether `merge_into_` can write it into the weight in place (no consensus step)."""
        return self.consensus is None


# The merge kernels in `imm_trl.merging.functional`, described.
METHOD_TABLE: dict[str, MergeMethod] = {
    "linear": MergeMethod("linear", None, None, rescale=False, elementwise=True),
    "dare_linear": MergeMethod("dare_linear", "random", None, rescale=True, elementwise=True),
    "ties": MergeMethod("ties", "magnitude", "sign", rescale=False, elementwise=False),
    "dare_ties": MergeMethod("dare_ties", "random", "sign", rescale=True, elementwise=True),
}
MERGE_METHODS = tuple(METHOD_TABLE)


def merge_method(name: str) -> MergeMethod:
    """The `MergeMethod` called `name` (a ValueError naming the choices if there is none)."""
    if not isinstance(name, str) or name not in METHOD_TABLE:
        raise ValueError(f"unknown merge method {name!r}; choose one of: {', '.join(MERGE_METHODS)}")
    return METHOD_TABLE[name]
