"""The plain in-memory reference beside the streaming executor: mlx-lm's loader and forward, whole model in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from .loading import load_in_memory


def log_softmax_np(logits) -> np.ndarray:
    """float32 log-softmax computed in float64 (MLX's fp32 exp/logsumexp on CPU is off by ~1e-4 over 100k entries)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return (x - lse).astype(np.float32)


def reference_logprobs_at(model_dir: str | Path, sequences: Sequence[Sequence[int]],
                          positions: Sequence[Sequence[int]], prefix: Sequence[int] | None = None,
                          reduce: Callable | None = None, model=None) -> list:
    """Same contract as `StreamingTeacher.logprobs_at`, computed by `model(prefix + sequence)` one sequence at a time."""
    if model is None:
        model, _ = load_in_memory(model_dir)
    pre = list(prefix or [])
    out = []
    for s, p in zip(sequences, positions):
        logits = model(mx.array([pre + list(s)]))[0].astype(mx.float32)
        rows = log_softmax_np(logits[mx.array([len(pre) + int(i) for i in p], dtype=mx.int32)])
        out.append(reduce(rows) if reduce is not None else rows)
    return out
