"""The distillation objective on one padded batch, built from kd_mlx.losses:

    total = answer_weight · answer_kl(student A–D at the answer position ‖ teacher A–D)   (temperature, × T²)
          + kd_weight     · projected_kl(student at aligned positions ‖ projected teacher row + tail bucket)
                                                          (kd_temperature, default 1; targets built tempered)
          + ce_weight     · cross_entropy(gold answer letter)

Fast path: run the backbone once, gather the hidden states at the few positions the loss reads (answer position +
aligned KD positions) and apply the LM head only there — the head (hidden × vocab) is the biggest matmul of a small
model and plain SFT pays it at every position. `objective_reference` computes the full logits and gathers them; a
test checks that both agree, and `head_split` verifies the split numerically before the fast path is used.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from .. import losses
from ..model_dir import head_split  # noqa: F401  (the split the objective's fast path takes)
from .batches import BatchArrays
from .config import TrainConfig

PART_NAMES = ("answer_kl", "token_kd", "ce")


def kd_targets(kd_probs: mx.array, kd_rest: mx.array, tail: str) -> tuple[mx.array, mx.array]:
    """The token-level teacher distribution the student is compared with.

    "bucket" (default): the aligned top-k mass as given, the rest (teacher mass outside the top-k, or on teacher
    ids with no student counterpart) as one tail category compared with the student's mass outside the listed ids.
    "renorm": the listed mass rescaled to sum to 1, no tail.

    Why bucket is the default: renormalising turns a flat teacher row (top-k mass 0.05, each id ~0.006) into a
    confident one (each id ~0.12) and trains the student to put all its mass on k ids the teacher barely
    preferred; the bucket form keeps the teacher's own confidence (a flat row asks for ~nothing beyond "not more
    than p_i here"), which is also the only form that is a true KL between the two (k+1)-category distributions.
    With a peaked teacher (most mass in the top-k) the two forms agree."""
    if tail == "bucket":
        return kd_probs, kd_rest
    z = kd_probs.sum(axis=-1, keepdims=True)
    return kd_probs / mx.where(z > 0, z, mx.ones_like(z)), mx.zeros_like(kd_rest)


def _parts(answer_logits: mx.array, kd_logits: mx.array | None, batch: BatchArrays, letter_ids: mx.array,
           cfg: TrainConfig) -> tuple[mx.array, mx.array]:
    """Each part is a sum over this batch's rows (KD positions, rows with a gold answer) divided by the *global*
    count in `norm` (of the whole optimizer batch): on one process that is the plain mean; across data-parallel
    ranks the per-rank parts add up to exactly the single-process mean, whatever the per-rank KD counts. Rows
    without a gold answer (gold -1, transfer questions) get no CE and do not count for accuracy."""
    gold, norm = batch.gold, batch.norm
    n_rows, n_kd, n_gold = norm[0], mx.maximum(norm[1], 1.0), mx.maximum(norm[2], 1.0)
    has_gold = gold >= 0
    T = cfg.temperature
    zero = mx.array(0.0)
    a_kl = (losses.answer_kl(answer_logits, letter_ids, batch.teacher_answer_probs, temperature=T,
                             reduction="sum") / n_rows if cfg.answer_weight else zero)
    if cfg.kd_weight and kd_logits is not None:
        p, r = kd_targets(batch.kd_probs, batch.kd_rest, cfg.kd_tail)
        # the targets were built at kd_temperature from the store's exact full-row terms (train/examples.py):
        # projected_kl takes them as given and tempers the student only
        t_kd = losses.projected_kl(kd_logits, batch.kd_ids, p, r, mask=batch.kd_mask, temperature=cfg.kd_temperature,
                                   reduction="sum") / n_kd
    else:
        t_kd = zero
    letters4 = mx.take(answer_logits, letter_ids, axis=-1)
    if cfg.ce_weight:
        if cfg.ce_over == "choices":
            ce = losses.cross_entropy(letters4, gold, mask=has_gold, reduction="sum") / n_gold
        else:
            target = mx.take(letter_ids, mx.maximum(gold, 0))
            ce = losses.cross_entropy(answer_logits, target, mask=has_gold, reduction="sum") / n_gold
    else:
        ce = zero
    total = cfg.answer_weight * a_kl + cfg.kd_weight * t_kd + cfg.ce_weight * ce
    correct = ((mx.argmax(letters4, axis=-1) == gold) & has_gold).sum()
    return total, mx.stack([a_kl, t_kd, ce, correct.astype(mx.float32)])


def objective(model: nn.Module, split: tuple[Callable, Callable] | None, batch: BatchArrays, letter_ids: mx.array,
              cfg: TrainConfig) -> tuple[mx.array, mx.array]:
    """(total loss, [answer_kl, token_kd, ce, n_correct]) for a batch from `Batch.arrays()` (parts normalised by the
    batch's `norm`, see `_parts`)."""
    if split is None:
        return objective_reference(model, batch, letter_ids, cfg)
    tokens, lengths, kd_pos = batch.tokens, batch.lengths, batch.kd_pos
    backbone, head = split
    hidden = backbone(tokens)  # (B, L, D)
    B = tokens.shape[0]
    h_ans = hidden[mx.arange(B), lengths - 1][:, None, :]  # (B, 1, D)
    use_kd = bool(cfg.kd_weight) and kd_pos.shape[1] > 0
    if use_kd:
        h_kd = mx.take_along_axis(hidden, kd_pos[..., None], axis=1)  # (B, P, D)
        logits = head(mx.concatenate([h_kd, h_ans], axis=1))
        kd_logits, answer_logits = logits[:, :-1], logits[:, -1]
    else:
        kd_logits, answer_logits = None, head(h_ans)[:, 0]
    return _parts(answer_logits, kd_logits, batch, letter_ids, cfg)


def objective_reference(model: nn.Module, batch: BatchArrays, letter_ids: mx.array,
                        cfg: TrainConfig) -> tuple[mx.array, mx.array]:
    """Plain version: logits at every position, then gather."""
    tokens, lengths, kd_pos = batch.tokens, batch.lengths, batch.kd_pos
    logits = model(tokens)  # (B, L, V)
    B = tokens.shape[0]
    answer_logits = logits[mx.arange(B), lengths - 1]
    kd_logits = mx.take_along_axis(logits, kd_pos[..., None], axis=1) if kd_pos.shape[1] > 0 else None
    return _parts(answer_logits, kd_logits, batch, letter_ids, cfg)
