"""Metrics of the model's output with their gradients, for backward passes without torch.

``model.grad(input, metric=fn)`` needs torch to differentiate ``fn``; with NumPy alone, pass
``grad_output=`` (d metric / d output) instead, which these helpers compute.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def logit_diff(
    logits: Any, position: Any, correct: Any, incorrect: Any
) -> tuple[float, np.ndarray]:
    """``Σ_b logits[b, position_b, correct_b] - logits[b, position_b, incorrect_b]`` (the usual
    logit difference at a ``[MASK]`` position, summed over the batch) and its gradient with
    respect to ``logits`` (``grad_output`` for a backward pass).

    ``position``, ``correct`` and ``incorrect`` are an int each, or one int per row.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, d_vocab], got shape {list(logits.shape)}")
    batch, pos, vocab = logits.shape
    rows = np.arange(batch)
    index = []
    for what, value, limit in (
        ("position", position, pos),
        ("correct", correct, vocab),
        ("incorrect", incorrect, vocab),
    ):
        values = np.broadcast_to(np.asarray(value), (batch,))
        if (
            not np.issubdtype(values.dtype, np.integer)
            or (values < 0).any()
            or (values >= limit).any()
        ):
            raise ValueError(f"{what} must be ints in [0, {limit}), got {value!r}")
        index.append(values)
    position, correct, incorrect = index
    value = float(
        (logits[rows, position, correct] - logits[rows, position, incorrect]).sum(dtype=np.float64)
    )
    grad = np.zeros_like(logits)
    np.add.at(grad, (rows, position, correct), 1.0)
    np.add.at(grad, (rows, position, incorrect), -1.0)
    return value, grad
