"""Numeric tolerances that follow from the computation, not from one CPU (imported by the tests)."""

from __future__ import annotations

import math

import torch


def rounding_tolerance(reference, reduction: int) -> dict[str, float]:
    """assert_close tolerances for two evaluations of the same math that differ only in kernel or batching,
    i.e. in the order of their sums. An n-term sum rounds to within about sqrt(n) * eps of the magnitude of
    its terms (the probabilistic bound of Higham and Mary, 2019), however small the result: an entry can
    come out small from large terms cancelling. So the tolerance is absolute, sqrt(n) * eps * scale, with
    n the longest reduction on the way and scale the largest magnitude in `reference` (a tensor, or all
    tensors of a gradient), times 4 for the roundings a model stacks."""
    tensors = [reference] if isinstance(reference, torch.Tensor) else list(reference)
    scale = max(float(t.detach().abs().max()) for t in tensors)
    return {"rtol": 0.0, "atol": 4.0 * math.sqrt(reduction) * torch.finfo(tensors[0].dtype).eps * scale}
