"""Training examples and length-bucketed, padded batches with a resumable position.

An `Example` holds everything the objective needs for one question, already in the student's token space: the
prompt ids, the gold letter, the teacher's A–D log-probs and the aligned token-level teacher targets.
Batches are right-padded (causal attention never looks at the padding that follows a sequence), so the answer
position of row b is `lengths[b] - 1` and padded KD slots carry a zero mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import mlx.core as mx
import numpy as np


@dataclass
class Example:
    qid: str
    tokens: np.ndarray  # (n,) int32 student prompt ids; the answer letter is predicted at position n-1
    gold: int  # 0..3 for A..D; -1: no gold answer (a transfer question: the teacher's terms only, no CE)
    teacher_answer_probs: np.ndarray  # (4,) float32 teacher A–D distribution (renormalised over the 4)
    # token-level KD targets from kd_mlx.align: student position whose logits are compared, student target ids
    # (-1 = padding), teacher mass projected onto them, and the mass that could not be placed
    kd_pos: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))  # (p,)
    kd_ids: np.ndarray = field(default_factory=lambda: np.full((0, 1), -1, np.int32))  # (p, m)
    kd_probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32))  # (p, m)
    kd_rest: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))  # (p,)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class BatchArrays(NamedTuple):
    """One padded batch as mx arrays: what a loss function receives."""

    tokens: mx.array  # (B, L) int32
    lengths: mx.array  # (B,) int32
    gold: mx.array  # (B,) int32, -1 = no gold answer
    teacher_answer_probs: mx.array  # (B, 4) float32
    kd_pos: mx.array  # (B, P) int32
    kd_ids: mx.array  # (B, P, K) int32
    kd_probs: mx.array  # (B, P, K) float32
    kd_rest: mx.array  # (B, P) float32
    kd_mask: mx.array  # (B, P) float32
    norm: mx.array  # (3,) float32: rows, KD positions, rows with a gold answer (see Batch.norm)


@dataclass
class Batch:
    """Numpy arrays of one padded batch (`arrays()` gives the mx version a loss receives)."""

    tokens: np.ndarray  # (B, L) int32, right-padded with 0
    lengths: np.ndarray  # (B,) int32
    gold: np.ndarray  # (B,) int32, -1 = no gold answer
    teacher_answer_probs: np.ndarray  # (B, 4) float32
    kd_pos: np.ndarray  # (B, P) int32 (0 where padded)
    kd_ids: np.ndarray  # (B, P, K) int32 (-1 where padded)
    kd_probs: np.ndarray  # (B, P, K) float32 (0 where padded)
    kd_rest: np.ndarray  # (B, P) float32 (1 where padded)
    kd_mask: np.ndarray  # (B, P) float32, 1 for real KD positions
    qids: list[str]
    # (rows, KD positions, rows with a gold answer) of the whole optimizer batch the loss is normalised by; None =
    # this batch's own counts. A data-parallel shard keeps the global counts so the ranks' parts sum to the
    # single-process mean.
    norm: tuple[float, float, float] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def counts(self) -> tuple[float, float, float]:
        return float(len(self.qids)), float(self.kd_mask.sum()), float((self.gold >= 0).sum())

    def arrays(self) -> BatchArrays:
        norm = self.norm if self.norm is not None else self.counts()
        return BatchArrays(mx.array(self.tokens), mx.array(self.lengths), mx.array(self.gold),
                           mx.array(self.teacher_answer_probs), mx.array(self.kd_pos), mx.array(self.kd_ids),
                           mx.array(self.kd_probs), mx.array(self.kd_rest), mx.array(self.kd_mask),
                           mx.array(norm, dtype=mx.float32))

    def shard(self, rank: int, size: int) -> "Batch":
        """Rows `rank::size`-contiguous slice of a global batch for one data-parallel rank (the batch size must be
        divisible by `size`); padding and the loss normaliser stay those of the global batch."""
        B = len(self.qids)
        if B % size:
            raise ValueError(f"batch of {B} rows cannot be split over {size} ranks")
        n = B // size
        sl = slice(rank * n, (rank + 1) * n)
        return Batch(tokens=self.tokens[sl], lengths=self.lengths[sl], gold=self.gold[sl],
                     teacher_answer_probs=self.teacher_answer_probs[sl], kd_pos=self.kd_pos[sl],
                     kd_ids=self.kd_ids[sl], kd_probs=self.kd_probs[sl], kd_rest=self.kd_rest[sl],
                     kd_mask=self.kd_mask[sl], qids=self.qids[sl],
                     norm=self.norm if self.norm is not None else self.counts())


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m)


def collate(examples: list[Example], pad_to: int = 32, kd_pad_to: int = 8) -> Batch:
    """Right-pad a list of examples into one batch; lengths are rounded up to `pad_to` to bound the number of
    distinct shapes the compiled step sees."""
    B = len(examples)
    L = _round_up(max(len(e) for e in examples), pad_to)
    P = _round_up(max(int(e.kd_pos.shape[0]) for e in examples), kd_pad_to)
    K = max(int(e.kd_ids.shape[1]) if e.kd_ids.ndim == 2 else 1 for e in examples)
    tokens = np.zeros((B, L), np.int32)
    kd_pos = np.zeros((B, P), np.int32)
    kd_ids = np.full((B, P, K), -1, np.int32)
    kd_probs = np.zeros((B, P, K), np.float32)
    # padded KD slots hold a valid distribution (all mass in the tail bucket): an all-zero row makes the tempered
    # teacher log-probs NaN, and although masked out of the loss value, the NaN leaks into the gradient
    kd_rest = np.ones((B, P), np.float32)
    kd_mask = np.zeros((B, P), np.float32)
    for b, e in enumerate(examples):
        tokens[b, : len(e)] = e.tokens
        p = int(e.kd_pos.shape[0])
        if p:
            k = e.kd_ids.shape[1]
            kd_pos[b, :p] = e.kd_pos
            kd_ids[b, :p, :k] = e.kd_ids
            kd_probs[b, :p, :k] = e.kd_probs
            kd_rest[b, :p] = e.kd_rest
            kd_mask[b, :p] = 1.0
    return Batch(
        tokens=tokens,
        lengths=np.array([len(e) for e in examples], np.int32),
        gold=np.array([e.gold for e in examples], np.int32),
        teacher_answer_probs=np.stack([np.asarray(e.teacher_answer_probs, np.float32) for e in examples]),
        kd_pos=kd_pos, kd_ids=kd_ids, kd_probs=kd_probs, kd_rest=kd_rest, kd_mask=kd_mask,
        qids=[e.qid for e in examples],
    )


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int, pad_to: int = 32,
                  shuffle: bool = True) -> list[list[int]]:
    """Index lists of one epoch's batches: examples grouped by padded length (random order inside a length
    bucket, so batch membership changes between epochs), then the batch order shuffled. Deterministic in
    (seed, epoch): a resumed run rebuilds exactly the same order."""
    n = len(examples)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    tie = rng.permutation(n) if shuffle else np.arange(n)
    buckets = np.array([_round_up(len(e), pad_to) for e in examples])
    order = np.lexsort((tie, buckets))  # by bucket, then by the random tie-breaker
    batches = [order[i: i + batch_size].tolist() for i in range(0, n, batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BatchStream:
    """Endless training batches with a position (epoch, index) that checkpoints save and resume restores."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_to: int = 32,
                 epoch: int = 0, index: int = 0):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.seed, self.pad_to = examples, batch_size, seed, pad_to
        self.epoch, self.index = epoch, index
        self._order = epoch_batches(examples, batch_size, seed, epoch, pad_to)

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, epoch: int, index: int) -> None:
        """Continue from a saved `position()`."""
        self.epoch, self.index = epoch, index
        self._order = epoch_batches(self.examples, self.batch_size, self.seed, epoch, self.pad_to)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = epoch_batches(self.examples, self.batch_size, self.seed, self.epoch, self.pad_to)
        idx = self._order[self.index]
        self.index += 1
        return collate([self.examples[i] for i in idx], self.pad_to)


def eval_batches(examples: list[Example], batch_size: int, pad_to: int = 32) -> Iterator[Batch]:
    """Fixed-order, length-sorted batches for validation."""
    for idx in epoch_batches(examples, batch_size, 0, 0, pad_to, shuffle=False):
        yield collate([examples[i] for i in idx], pad_to)
