"""The token-level text objective: cross-entropy on every next token of plain text plus token-level KD from a
teacher store of the same texts (`kd_mlx.teacher.dump.dump_texts`), evaluated in bits per byte.

    loss = ce_weight · CE(student next tokens) + kd_weight · projected_kl(student ‖ teacher projected onto the
           student's vocabulary at aligned positions)           (kd_mlx.align: exact class masses, tempered at T)

Bits per byte = total next-token negative log-likelihood of a text (every token after a start token, so the whole
text is predicted) / (ln 2 · its UTF-8 bytes): comparable across tokenizers.

Used by benchmarks/kd_token_effect.py; reusable for any student on any text (e.g. after pruning).
`bits_per_byte` (batched, padded) has the plain per-text `bits_per_byte_reference` beside it (tests/test_losses.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from . import losses
from .align import VocabMap, align_record, align_record_bytes
from .utils import KDError


@dataclass
class TextExample:
    """One text in the student's tokens (start token first) and, optionally, its token-level teacher targets."""

    ids: np.ndarray  # (n,) int32
    n_bytes: int  # UTF-8 bytes of the text
    kd_pos: np.ndarray | None = None  # (p,) positions whose logits are compared with the teacher
    kd_ids: np.ndarray | None = None  # (p, m) student ids (−1 padding)
    kd_probs: np.ndarray | None = None  # (p, m)
    kd_rest: np.ndarray | None = None  # (p,)


def start_token(tok) -> int:
    """The special token put before every text so that its first real token is predicted too."""
    sid = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if sid is None:
        raise KDError("the student tokenizer has neither a BOS nor an EOS token to start texts with")
    return int(sid)


def text_examples(texts: Sequence[str], student_tok, store=None, store_ids: Sequence[str] | None = None,
                  vmap: VocabMap | None = None, align: str = "bytes", temperature: float = 1.0,
                  max_positions: int | None = None, mid_token: bool = True) -> list[TextExample]:
    """Student examples of `texts`; with a teacher `store` (its records `store_ids`, dumped from the same texts) and
    the tokenizer pair's `vmap`, token-level targets aligned by bytes (or chars), tempered at `temperature`; with
    bytes, also the store's rows at student positions inside a teacher token unless `mid_token` is false."""
    if align not in ("bytes", "chars"):
        raise KDError(f"align must be bytes or chars, got {align!r}")
    start = start_token(student_tok)
    out = []
    for i, text in enumerate(texts):
        ids, offs = student_tok.encode_with_offsets(text)
        s_ids = [start] + list(ids)
        ex = TextExample(np.array(s_ids, np.int32), len(text.encode("utf-8")))
        if store is not None:
            rec = store[store_ids[i]]
            if align == "bytes":
                targets = align_record_bytes(rec, s_ids, text, text, 0, vmap, max_positions, temperature,
                                             mid_token=mid_token)
            else:
                targets = align_record(rec, rec.offsets, [(0, 0)] + list(offs), 0, 0, vmap, max_positions,
                                       temperature, s_ids=s_ids)
            ex.kd_pos, ex.kd_ids, ex.kd_probs, ex.kd_rest = targets
        out.append(ex)
    return out


@dataclass
class TextBatch:
    tokens: mx.array  # (B, L) int32, padded with 0
    targets: mx.array  # (B, L-1) int32 next tokens, −1 beyond each text
    kd_pos: mx.array  # (B, P) int32
    kd_ids: mx.array  # (B, P, M) int32
    kd_probs: mx.array  # (B, P, M)
    kd_rest: mx.array  # (B, P)
    kd_mask: mx.array  # (B, P) bool


def make_batch(examples: Sequence[TextExample]) -> TextBatch:
    B = len(examples)
    L = max(len(e.ids) for e in examples)
    tokens = np.zeros((B, L), np.int32)
    targets = np.full((B, L - 1), -1, np.int32)
    P = max([len(e.kd_pos) for e in examples if e.kd_pos is not None] + [1])
    M = max([e.kd_ids.shape[1] for e in examples if e.kd_ids is not None and len(e.kd_ids)] + [1])
    kd_pos, kd_ids = np.zeros((B, P), np.int32), np.full((B, P, M), -1, np.int32)
    kd_probs, kd_rest, kd_mask = np.zeros((B, P, M), np.float32), np.zeros((B, P), np.float32), np.zeros((B, P), bool)
    for b, e in enumerate(examples):
        n = len(e.ids)
        tokens[b, :n] = e.ids
        targets[b, : n - 1] = e.ids[1:]
        if e.kd_pos is not None and len(e.kd_pos):
            p, m = e.kd_ids.shape
            kd_pos[b, :p], kd_ids[b, :p, :m], kd_probs[b, :p, :m] = e.kd_pos, e.kd_ids, e.kd_probs
            kd_rest[b, :p], kd_mask[b, :p] = e.kd_rest, True
    return TextBatch(*map(mx.array, (tokens, targets, kd_pos, kd_ids, kd_probs, kd_rest, kd_mask)))


def text_kd_loss(model: nn.Module, batch: TextBatch, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 1.0) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """(total, (ce, kd)): mean next-token CE over the batch's text tokens, mean projected KL over its KD rows."""
    logits = model(batch.tokens)
    ce = losses.cross_entropy(logits[:, :-1], batch.targets)  # targets −1 beyond a text never count
    if kd_weight:
        kd_logits = mx.take_along_axis(logits, batch.kd_pos[..., None], axis=1)
        kd = losses.projected_kl(kd_logits, batch.kd_ids, batch.kd_probs, batch.kd_rest, mask=batch.kd_mask,
                                 temperature=temperature)
    else:
        kd = mx.array(0.0)
    return ce_weight * ce + kd_weight * kd, (ce, kd)


def train_text_kd(model: nn.Module, examples: Sequence[TextExample], steps: int, batch_size: int = 8,
                  learning_rate: float = 1e-3, ce_weight: float = 1.0, kd_weight: float = 0.0,
                  temperature: float = 1.0, seed: int = 0, warmup: int = 20) -> list[tuple[float, float]]:
    """AdamW with linear warm-up and cosine decay over `steps` batches drawn in a seeded order (the same texts in
    the same order for every arm of a comparison). Returns the (ce, kd) of each step."""
    rng = np.random.default_rng(seed)
    sched = optim.join_schedules([optim.linear_schedule(learning_rate / warmup, learning_rate, warmup),
                                  optim.cosine_decay(learning_rate, max(1, steps - warmup), learning_rate * 0.1)],
                                 [warmup])
    opt = optim.AdamW(learning_rate=sched, weight_decay=0.01)

    def loss_fn(m, batch):
        return text_kd_loss(m, batch, ce_weight, kd_weight, temperature)

    step_fn = nn.value_and_grad(model, loss_fn)
    order: list[int] = []
    history = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.permutation(len(examples)).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        (_, (ce, kd)), grads = step_fn(model, make_batch([examples[i] for i in idx]))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, ce, kd)
        history.append((float(ce), float(kd)))
    return history


def _text_nll_sums(model: nn.Module, examples: Sequence[TextExample]) -> mx.array:
    batch = make_batch(examples)
    logits = model(batch.tokens)[:, :-1].astype(mx.float32)
    per = losses.cross_entropy(logits, batch.targets, reduction="none")  # 0 beyond each text
    return per.sum(axis=1)


def bits_per_byte(model: nn.Module, examples: Sequence[TextExample], batch_size: int = 16) -> float:
    """Σ next-token NLL (nats) over all texts / (ln 2 · Σ bytes), batched with padding."""
    total = 0.0
    for i in range(0, len(examples), batch_size):
        total += float(_text_nll_sums(model, examples[i:i + batch_size]).sum())
    return total / (math.log(2) * sum(e.n_bytes for e in examples))


def bits_per_byte_reference(model: nn.Module, examples: Sequence[TextExample]) -> float:
    """Plain version: one text at a time, log-softmax in float64 numpy."""
    total = 0.0
    for e in examples:
        logits = np.array(model(mx.array(e.ids[None]))[0].astype(mx.float32), np.float64)
        for j in range(len(e.ids) - 1):
            row = logits[j]
            top = row.max()
            total += top + math.log(np.exp(row - top).sum()) - row[e.ids[j + 1]]
    return total / (math.log(2) * sum(e.n_bytes for e in examples))
