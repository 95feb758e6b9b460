"""Knowledge-distillation losses in MLX, each with a plain float64 numpy reference beside it.

Conventions shared by every loss here:

- `p` is the teacher distribution, `q` the student's; logits have shape `(..., V)`, one distribution per position.
- `temperature` T divides both sides' logits (or tempers a given distribution: `p_i^(1/T) / Z`) and the result is
  multiplied by T² (Hinton et al.), so gradient magnitudes stay comparable across temperatures.
- `mask` (shape `(...)`, bool or 0/1) marks the positions that count. Masked positions contribute nothing (their
  values are replaced by 0 with `mx.where`, so even NaN/inf there cannot leak); `reduction="mean"` divides by the
  number of unmasked positions, and an all-masked batch gives exactly 0, never NaN. `reduction="sum"` sums,
  `reduction="none"` returns the per-position values (0 where masked).
- Every MLX function is differentiable with `mx.grad` / `nn.value_and_grad` with respect to the student inputs
  (teacher inputs are constants and are wrapped in `mx.stop_gradient`).
- `*_reference` functions take numpy arrays and compute the same number with straightforward float64 loops; the
  tests check fast == reference and the MLX gradients against finite differences of the references.

Sparse targets (a teacher known only on some ids) use one convention, shared with `kd_mlx.align`: `ids (N, m)`
int, `probs`/`logprobs (N, m)`, padding slots have id `-1` and probability 0; the uncovered mass is kept as one
explicit *tail bucket* compared with the student's total mass outside the listed ids. A top-k cannot be tempered
exactly on its own (the tempered tail depends on how the tail spreads over the vocabulary): sparse targets at
T != 1 need the full row's log-normaliser (`log_z`, kept by the dump) or come tempered already (`projected_kl`).
"""

from __future__ import annotations

import math
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .utils import KDError

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise KDError(f"temperature must be a positive finite number, got {temperature}")


def reduce_masked(values: mx.array, mask: mx.array | None = None, reduction: str = "mean") -> mx.array:
    """Reduce per-position `values` over unmasked positions.

    "mean": sum over unmasked / number unmasked (0 when none); "sum": sum over unmasked; "none": values with
    masked positions set to 0."""
    if reduction not in _REDUCTIONS:
        raise KDError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if mask is None:
        mask = mx.ones(values.shape, dtype=mx.bool_)
    else:
        mask = mx.broadcast_to(mx.array(mask).astype(mx.bool_), values.shape)
    # where (not multiply): a NaN/inf at a masked position must not turn the sum into NaN
    v = mx.where(mask, values, mx.zeros_like(values))
    if reduction == "none":
        return v
    total = v.sum()
    if reduction == "sum":
        return total
    n = mask.astype(values.dtype).sum()
    return total / mx.maximum(n, 1)


def _zero_masked(x: mx.array, mask) -> mx.array:
    """Replace the rows of `x (..., D)` at masked positions by 0 so that garbage there (NaN, ±inf) cannot reach
    the forward value *or* the gradient (0 · NaN in a backward pass would still be NaN)."""
    if mask is None:
        return x
    x = mx.array(x)
    m = mx.array(mask).astype(mx.bool_)
    return mx.where(m[..., None], x, mx.zeros_like(x))


def _reduce_masked_np(values: np.ndarray, mask, reduction: str) -> np.ndarray | float:
    values = np.asarray(values, dtype=np.float64)
    m = np.ones(values.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask).astype(bool), values.shape)
    out = np.zeros_like(values)
    total, n = 0.0, 0
    for idx in np.ndindex(values.shape):
        if m[idx]:
            out[idx] = values[idx]
            total += values[idx]
            n += 1
    if reduction == "none":
        return out
    if reduction == "sum":
        return total
    return total / n if n else 0.0


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mx_ = np.max(x, axis=-1, keepdims=True)
    mx_ = np.where(np.isfinite(mx_), mx_, 0.0)
    return x - mx_ - np.log(np.sum(np.exp(x - mx_), axis=-1, keepdims=True))


def _xlogy_diff(p: mx.array, logp: mx.array, logq: mx.array) -> mx.array:
    """Elementwise p * (log p - log q), with the 0 * log 0 = 0 convention (no NaN where p == 0)."""
    return mx.where(p > 0, p * (logp - logq), mx.zeros_like(p))


def _temper_logprobs(logp: mx.array, temperature: float, axis: int = -1) -> mx.array:
    """log of p^(1/T) / sum p^(1/T), for a distribution given as log-probs along `axis` (-inf entries stay -inf)."""
    if temperature == 1.0:
        return logp
    z = logp / temperature
    lse = mx.logsumexp(z, axis=axis, keepdims=True)
    # an all −inf row (a padding row: no ids, no remainder) must stay −inf, not −inf − (−inf) = NaN: the NaN would
    # be hidden by `where` in the forward value but reach the student's gradient (0 · NaN) in the backward pass
    lse = mx.where(mx.isinf(lse), mx.zeros_like(lse), lse)
    return z - lse


# ---------------------------------------------------------------------------------------------------------------
# dense losses: teacher and student over the same vocabulary
# ---------------------------------------------------------------------------------------------------------------


def forward_kl(student_logits: mx.array, teacher_logits: mx.array, mask=None, temperature: float = 1.0,
               reduction: str = "mean") -> mx.array:
    """KL(p_teacher ‖ q_student) = Σ_v p_v (log p_v − log q_v) per position, × T². **Includes the teacher
    entropy** (it is 0 when q == p). p = softmax(teacher_logits / T), q = softmax(student_logits / T); teacher
    log-probs may be passed as `teacher_logits` (softmax of log-probs is the same distribution). Terms with
    p_v = 0 count 0."""
    _check_temperature(temperature)
    student_logits = _zero_masked(student_logits, mask)
    t = mx.stop_gradient(_zero_masked(teacher_logits, mask))
    logp = nn.log_softmax(t / temperature, axis=-1)
    logq = nn.log_softmax(student_logits / temperature, axis=-1)
    per = _xlogy_diff(mx.exp(logp), logp, logq).sum(axis=-1) * (temperature ** 2)
    return reduce_masked(per, mask, reduction)


def forward_kl_reference(student_logits, teacher_logits, mask=None, temperature: float = 1.0,
                         reduction: str = "mean"):
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        logp = _log_softmax_np(t[idx] / temperature)
        logq = _log_softmax_np(s[idx] / temperature)
        acc = 0.0
        for v in range(s.shape[-1]):
            pv = math.exp(logp[v])
            if pv > 0:
                acc += pv * (logp[v] - logq[v])
        per[idx] = acc * temperature ** 2
    return _reduce_masked_np(per, mask, reduction)


def forward_kl_ce_only(student_logits: mx.array, teacher_logits: mx.array, mask=None, temperature: float = 1.0,
                       reduction: str = "mean") -> mx.array:
    """Cross-entropy part of the forward KL only: −Σ_v p_v log q_v per position, × T². **Excludes the teacher
    entropy**: equals `forward_kl` + T²·H(p), so it is not 0 at q == p; same gradient w.r.t. the student."""
    _check_temperature(temperature)
    student_logits = _zero_masked(student_logits, mask)
    t = mx.stop_gradient(_zero_masked(teacher_logits, mask))
    logp = nn.log_softmax(t / temperature, axis=-1)
    logq = nn.log_softmax(student_logits / temperature, axis=-1)
    p = mx.exp(logp)
    per = -mx.where(p > 0, p * logq, mx.zeros_like(p)).sum(axis=-1) * (temperature ** 2)
    return reduce_masked(per, mask, reduction)


def forward_kl_ce_only_reference(student_logits, teacher_logits, mask=None, temperature: float = 1.0,
                                 reduction: str = "mean"):
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        logp = _log_softmax_np(t[idx] / temperature)
        logq = _log_softmax_np(s[idx] / temperature)
        per[idx] = -sum(math.exp(logp[v]) * logq[v] for v in range(s.shape[-1]) if logp[v] > -np.inf)
        per[idx] *= temperature ** 2
    return _reduce_masked_np(per, mask, reduction)


def reverse_kl(student_logits: mx.array, teacher_logits: mx.array, mask=None, temperature: float = 1.0,
               reduction: str = "mean") -> mx.array:
    """KL(q_student ‖ p_teacher) = Σ_v q_v (log q_v − log p_v) per position, × T² (mode-seeking). Includes the
    student entropy term. Infinite where the teacher gives probability 0 to a token the student does not."""
    _check_temperature(temperature)
    student_logits = _zero_masked(student_logits, mask)
    t = mx.stop_gradient(_zero_masked(teacher_logits, mask))
    logp = nn.log_softmax(t / temperature, axis=-1)
    logq = nn.log_softmax(student_logits / temperature, axis=-1)
    per = _xlogy_diff(mx.exp(logq), logq, logp).sum(axis=-1) * (temperature ** 2)
    return reduce_masked(per, mask, reduction)


def reverse_kl_reference(student_logits, teacher_logits, mask=None, temperature: float = 1.0,
                         reduction: str = "mean"):
    return forward_kl_reference(teacher_logits, student_logits, mask, temperature, reduction)


def generalized_jsd(student_logits: mx.array, teacher_logits: mx.array, beta: float = 0.5, mask=None,
                    temperature: float = 1.0, reduction: str = "mean") -> mx.array:
    """Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024), per position, × T²:

        m = β p + (1 − β) q,   JSD_β = β KL(p ‖ m) + (1 − β) KL(q ‖ m)

    with p the teacher, q the student, 0 < β < 1 (β = 0.5: the symmetric JSD, bounded by log 2). Note JSD_β → 0
    at both ends (it does *not* become the forward/reverse KL there; use those directly)."""
    _check_temperature(temperature)
    if not (0.0 < beta < 1.0):
        raise KDError(f"generalized_jsd needs 0 < beta < 1, got {beta}")
    student_logits = _zero_masked(student_logits, mask)
    t = mx.stop_gradient(_zero_masked(teacher_logits, mask))
    logp = nn.log_softmax(t / temperature, axis=-1)
    logq = nn.log_softmax(student_logits / temperature, axis=-1)
    # log m computed in log space (stable where one side underflows)
    logm = mx.logaddexp(logp + math.log(beta), logq + math.log(1.0 - beta))
    kl_pm = _xlogy_diff(mx.exp(logp), logp, logm).sum(axis=-1)
    kl_qm = _xlogy_diff(mx.exp(logq), logq, logm).sum(axis=-1)
    per = (beta * kl_pm + (1.0 - beta) * kl_qm) * (temperature ** 2)
    return reduce_masked(per, mask, reduction)


def generalized_jsd_reference(student_logits, teacher_logits, beta: float = 0.5, mask=None,
                              temperature: float = 1.0, reduction: str = "mean"):
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        p = np.exp(_log_softmax_np(t[idx] / temperature))
        q = np.exp(_log_softmax_np(s[idx] / temperature))
        acc = 0.0
        for v in range(s.shape[-1]):
            m = beta * p[v] + (1 - beta) * q[v]
            if p[v] > 0:
                acc += beta * p[v] * math.log(p[v] / m)
            if q[v] > 0:
                acc += (1 - beta) * q[v] * math.log(q[v] / m)
        per[idx] = acc * temperature ** 2
    return _reduce_masked_np(per, mask, reduction)


def cross_entropy(logits: mx.array, targets: mx.array, mask=None, reduction: str = "mean") -> mx.array:
    """Next-token cross-entropy −log softmax(logits)[target] per position (natural log), masked mean by default.
    `targets` (...) int; a negative target (−100, −1: padding) never counts, with or without `mask`."""
    targets = mx.array(targets)
    valid = targets >= 0
    mask = valid if mask is None else mx.logical_and(mx.array(mask).astype(mx.bool_), valid)
    safe = mx.where(targets >= 0, targets, mx.zeros_like(targets)).astype(mx.int32)
    x = _zero_masked(logits, mask)
    # logsumexp − logit: one pass over the vocabulary, no (…, V) log-softmax materialised
    per = mx.logsumexp(x, axis=-1) - mx.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    return reduce_masked(per, mask, reduction)


def cross_entropy_reference(logits, targets, mask=None, reduction: str = "mean"):
    x = np.asarray(logits, np.float64)
    tg = np.asarray(targets)
    per = np.zeros(x.shape[:-1])
    m = np.ones(per.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask).astype(bool), per.shape).copy()
    for idx in np.ndindex(per.shape):
        if tg[idx] >= 0:
            per[idx] = -_log_softmax_np(x[idx])[tg[idx]]
        else:
            m[idx] = False
    return _reduce_masked_np(per, m, reduction)


# ---------------------------------------------------------------------------------------------------------------
# sparse teacher targets: top-k of the teacher, or the alignment's projection onto the student vocabulary
# ---------------------------------------------------------------------------------------------------------------


def _student_logprobs_at(logq: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
    """Student log-probs at `ids` (N..., m) (padding −1 → −inf) and the log of the student's mass outside them.

    The outside mass is computed as logsumexp of the log-probs with the listed ids knocked out (not as
    log(1 − Σ q), which loses all precision when the listed ids cover almost everything)."""
    V = logq.shape[-1]
    ids = mx.stop_gradient(mx.array(ids).astype(mx.int32))
    pad = ids < 0
    # an extra −inf column at index V takes the padding slots, so a padding id never knocks out a real token
    ext = mx.concatenate([logq, mx.full(logq.shape[:-1] + (1,), -mx.inf, dtype=logq.dtype)], axis=-1)
    safe = mx.where(pad, mx.full(ids.shape, V, dtype=mx.int32), ids)
    at = mx.take_along_axis(ext, safe, axis=-1)
    knocked = mx.put_along_axis(ext, safe, mx.array(-mx.inf, dtype=logq.dtype), axis=-1)
    log_out = mx.logsumexp(knocked, axis=-1)
    return at, log_out


def _sparse_kl_core(student_logits: mx.array, ids, teacher_logp: mx.array, teacher_log_tail: mx.array | None,
                    temperature: float) -> mx.array:
    """Σ_i p_i (log p_i − log q_{id_i}) [+ p_tail (log p_tail − log q_outside)] per position, × T², with
    q = softmax(student_logits / T) and the teacher side (N..., m) log-probs (−inf for padding) + tail given
    already at temperature T."""
    logq = nn.log_softmax(student_logits / temperature, axis=-1)
    at, log_out = _student_logprobs_at(logq, ids)
    lp = mx.stop_gradient(teacher_logp)
    per = _xlogy_diff(mx.exp(lp), lp, at).sum(axis=-1)
    if teacher_log_tail is not None:
        lt = mx.stop_gradient(teacher_log_tail)
        pt = mx.exp(lt)
        per = per + mx.where(pt > 0, pt * (lt - log_out), mx.zeros_like(pt))
    return per * (temperature ** 2)


def _log_tail_from_logprobs(logp: mx.array) -> mx.array:
    """log(max(0, 1 − Σ exp(logp))) along the last axis, as log1p(−s) (stable; −inf when the tail is empty)."""
    s = mx.minimum(mx.exp(logp).sum(axis=-1), 1.0)
    return mx.where(s < 1.0, mx.log1p(-s), mx.full(s.shape, -mx.inf))


def sparse_topk_kl(student_logits: mx.array, topk_ids, topk_logprobs, mask=None, temperature: float = 1.0,
                   tail: str = "bucket", reduction: str = "mean", log_z=None) -> mx.array:
    """Forward KL(p ‖ q) from a teacher known only by its top-k: `topk_ids (..., k)` and `topk_logprobs (..., k)`
    (the teacher's *full-vocabulary* log-probs of those ids, Σ exp ≤ 1), against the full student softmax over
    `student_logits (..., V)` (same vocabulary as the ids). Includes the teacher entropy of what is known.

    tail="bucket": the missing teacher mass p_tail = 1 − Σ_topk p is one extra category, compared with the
      student's mass outside the k ids: Σ_i p_i log(p_i / q_i) + p_tail log(p_tail / q_outside). A proper KL
      between two (k+1)-category distributions (≥ 0, 0 iff the student matches on the ids and the tail).
    tail="renorm": the top-k teacher probabilities are renormalised to sum to 1 (p̂_i = p_i / Σ p) and compared
      with the student's *unrenormalised* full-softmax probabilities at those ids: Σ_i p̂_i log(p̂_i / q_i). Still
      ≥ 0 (Σ q_i ≤ 1) and pushes the student's mass into the top-k.

    Temperature: the student logits are divided by T, × T². "renorm" tempers the renormalised top-k (exact: it is
    the full row tempered, restricted and renormalised). "bucket" needs `log_z (...)` = log Σ_v exp(lp_v / T) over
    the full vocabulary (the store's `logz`): the listed ids get exp(lp / T − log_z), the tail the rest; without it
    T ≠ 1 is refused (tempering the tail as one category inflates it 12–26× on real rows). Padding: id −1."""
    _check_temperature(temperature)
    if tail not in ("bucket", "renorm"):
        raise KDError(f"tail must be 'bucket' or 'renorm', got {tail!r}")
    student_logits = _zero_masked(student_logits, mask)
    lp = mx.array(topk_logprobs).astype(student_logits.dtype)
    ids = mx.array(topk_ids)
    lp = mx.where(ids < 0, mx.full(lp.shape, -mx.inf, dtype=lp.dtype), lp)
    if tail == "bucket":
        if temperature != 1.0:
            if log_z is None:
                raise KDError("sparse_topk_kl with a tail bucket at temperature != 1 needs log_z (the full row's "
                              "tempered log-normaliser, kept by teacher dump --temperatures)")
            lp = lp / temperature - mx.array(log_z).astype(lp.dtype)[..., None]
        per = _sparse_kl_core(student_logits, ids, lp, _log_tail_from_logprobs(lp), temperature)
    else:
        z = lp / temperature
        lse = mx.logsumexp(z, axis=-1, keepdims=True)
        lp = z - mx.where(mx.isinf(lse), mx.zeros_like(lse), lse)  # all-padding row: stays −inf, not NaN
        per = _sparse_kl_core(student_logits, ids, lp, None, temperature)
    return reduce_masked(per, mask, reduction)


def _sparse_reference_one(s_logits: np.ndarray, ids, probs: np.ndarray, tail_p: float | None,
                          temperature: float) -> float:
    """Plain loop: dense student softmax at T against teacher categories given at T (listed ids + tail)."""
    logq = _log_softmax_np(s_logits / temperature)
    q = np.exp(logq)
    acc = 0.0
    listed = set()
    for i, p in zip(ids, probs):
        if i < 0:
            continue
        listed.add(int(i))
        if p > 0:
            acc += p * (math.log(p) - logq[int(i)])
    if tail_p is not None and tail_p > 0:
        q_out = sum(q[v] for v in range(len(q)) if v not in listed)
        acc += tail_p * (math.log(tail_p) - math.log(q_out))
    return acc * temperature ** 2


def sparse_topk_kl_reference(student_logits, topk_ids, topk_logprobs, mask=None, temperature: float = 1.0,
                             tail: str = "bucket", reduction: str = "mean", log_z=None):
    s = np.asarray(student_logits, np.float64)
    ids = np.asarray(topk_ids)
    lp = np.asarray(topk_logprobs, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        if tail == "bucket":
            lz = 0.0 if temperature == 1.0 else float(np.asarray(log_z, np.float64)[idx])
            probs = [math.exp(lp[idx][j] / temperature - lz) if ids[idx][j] >= 0 else 0.0
                     for j in range(ids.shape[-1])]
            per[idx] = _sparse_reference_one(s[idx], ids[idx], np.array(probs), max(0.0, 1.0 - sum(probs)),
                                             temperature)
        else:
            w = [math.exp(lp[idx][j] / temperature) if ids[idx][j] >= 0 else 0.0 for j in range(ids.shape[-1])]
            z = sum(w)
            per[idx] = _sparse_reference_one(s[idx], ids[idx], np.array(w) / (z if z > 0 else 1.0), None,
                                             temperature)
    return _reduce_masked_np(per, mask, reduction)


def projected_kl(student_logits: mx.array, target_ids, target_probs, remainder, mask=None,
                 temperature: float = 1.0, reduction: str = "mean") -> mx.array:
    """Forward KL from a student-side sparse target, as produced by `kd_mlx.align.align_record`:
    `target_ids (..., m)` student ids (−1 = padding), `target_probs (..., m)` teacher mass projected onto them,
    `remainder (...)` the teacher mass that could not be placed (Σ probs + remainder = 1). The remainder is a tail
    bucket compared with the student's mass outside the target ids:

        Σ_i p_i log(p_i / q_{id_i}) + r log(r / q_outside)     (× T²; terms with zero mass count 0)

    Includes the teacher entropy of the projected distribution. The target is used as given: at T ≠ 1 it must
    already be the tempered teacher (`kd_mlx.align` builds it so, exactly, from the store); the student logits are
    divided by T, × T²."""
    _check_temperature(temperature)
    student_logits = _zero_masked(student_logits, mask)
    p = mx.array(target_probs).astype(student_logits.dtype)
    ids = mx.array(target_ids)
    p = mx.where(ids < 0, mx.zeros_like(p), p)
    r = mx.maximum(mx.array(remainder).astype(student_logits.dtype), 0.0)
    lp = mx.where(p > 0, mx.log(mx.where(p > 0, p, mx.ones_like(p))), mx.full(p.shape, -mx.inf))
    lt = mx.where(r > 0, mx.log(mx.where(r > 0, r, mx.ones_like(r))), mx.full(r.shape, -mx.inf))
    per = _sparse_kl_core(student_logits, ids, lp, lt, temperature)
    return reduce_masked(per, mask, reduction)


def projected_kl_reference(student_logits, target_ids, target_probs, remainder, mask=None,
                           temperature: float = 1.0, reduction: str = "mean"):
    s = np.asarray(student_logits, np.float64)
    ids = np.asarray(target_ids)
    pr = np.asarray(target_probs, np.float64)
    rem = np.asarray(remainder, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        per[idx] = _sparse_reference_one(s[idx], ids[idx], np.where(ids[idx] >= 0, pr[idx], 0.0),
                                         max(0.0, float(rem[idx])), temperature)
    return _reduce_masked_np(per, mask, reduction)


# ---------------------------------------------------------------------------------------------------------------
# alignment-free and task-specific losses
# ---------------------------------------------------------------------------------------------------------------


def uld_loss(student_logits: mx.array, teacher_logits: mx.array, mask=None, temperature: float = 1.0,
             teacher_is_logprobs: bool = False, reduction: str = "mean") -> mx.array:
    """Universal Logit Distillation (Boizard et al. 2024): the Wasserstein-1 distance between the two
    distributions with their probabilities sorted in decreasing order, the shorter vocabulary zero-padded:

        Σ_j | p_(j) − q_(j) |,   p_(1) ≥ p_(2) ≥ …, q likewise     (per position, × T²)

    No token alignment is needed: teacher and student vocabularies may differ in size (V_t vs V_s). p =
    softmax(teacher_logits / T), or with `teacher_is_logprobs=True` p = exp(teacher_logits) as given (e.g. the
    teacher's top-k full-vocabulary log-probs, whose missing mass is then simply absent, i.e. zero-padded; when
    T ≠ 1 the known entries and the missing mass are tempered as one categorical and the missing mass dropped). q = softmax(student_logits / T)."""
    _check_temperature(temperature)
    student_logits = _zero_masked(student_logits, mask)
    t = mx.stop_gradient(_zero_masked(teacher_logits, mask))
    if teacher_is_logprobs:
        lp = t.astype(student_logits.dtype)
        if temperature != 1.0:
            # temper the known entries together with the missing mass as one category, then drop that category
            cat = _temper_logprobs(mx.concatenate([lp, _log_tail_from_logprobs(lp)[..., None]], axis=-1),
                                   temperature)
            lp = cat[..., :-1]
        p = mx.exp(lp)
    else:
        p = mx.softmax(t / temperature, axis=-1)
    q = mx.softmax(student_logits / temperature, axis=-1)
    # sort descending; the gradient flows through take_along_axis with the (constant) sort order
    order = mx.stop_gradient(mx.argsort(-q, axis=-1))
    q_sorted = mx.take_along_axis(q, order, axis=-1)
    p_sorted = -mx.sort(-p, axis=-1)
    vs, vt = q_sorted.shape[-1], p_sorted.shape[-1]
    if vs < vt:
        q_sorted = mx.concatenate([q_sorted, mx.zeros(q_sorted.shape[:-1] + (vt - vs,), q_sorted.dtype)], axis=-1)
    elif vt < vs:
        p_sorted = mx.concatenate([p_sorted, mx.zeros(p_sorted.shape[:-1] + (vs - vt,), p_sorted.dtype)], axis=-1)
    per = mx.abs(p_sorted - q_sorted).sum(axis=-1) * (temperature ** 2)
    return reduce_masked(per, mask, reduction)


def uld_loss_reference(student_logits, teacher_logits, mask=None, temperature: float = 1.0,
                       teacher_is_logprobs: bool = False, reduction: str = "mean"):
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        if teacher_is_logprobs:
            p = [math.exp(x) for x in t[idx]]
            if temperature != 1.0:
                tail = max(0.0, 1.0 - sum(p))
                w = [x ** (1.0 / temperature) for x in p]
                z = sum(w) + (tail ** (1.0 / temperature) if tail > 0 else 0.0)
                p = [x / z for x in w]
        else:
            p = list(np.exp(_log_softmax_np(t[idx] / temperature)))
        q = list(np.exp(_log_softmax_np(s[idx] / temperature)))
        p.sort(reverse=True)
        q.sort(reverse=True)
        n = max(len(p), len(q))
        p += [0.0] * (n - len(p))
        q += [0.0] * (n - len(q))
        per[idx] = sum(abs(a - b) for a, b in zip(p, q)) * temperature ** 2
    return _reduce_masked_np(per, mask, reduction)


def answer_kl(student_logits: mx.array, letter_ids, teacher_probs, mask=None, temperature: float = 1.0,
              reduction: str = "mean") -> mx.array:
    """KL(p ‖ q) over the 4 answer letters at the answer position, × T² (includes the teacher entropy).

    `student_logits (B, V)`: the student's logits at the last prompt position (after "答案是：");
    `letter_ids` the 4 student token ids of "A".."D" (`kd_mlx.align.answer_letter_map`); q = softmax over just
    those 4 logits / T. `teacher_probs (B, 4)` the teacher's A–D distribution (the store's `answer_probs`,
    renormalised over the 4), tempered as p^(1/T)/Z. `mask (B,)` drops questions."""
    _check_temperature(temperature)
    ids = mx.array(letter_ids).astype(mx.int32)
    if ids.shape != (4,):
        raise KDError(f"answer_kl needs 4 letter ids, got shape {tuple(ids.shape)}")
    s4 = mx.take(_zero_masked(student_logits, mask), ids, axis=-1)
    logq = nn.log_softmax(s4 / temperature, axis=-1)
    p = mx.stop_gradient(mx.array(teacher_probs).astype(student_logits.dtype))
    p = p / p.sum(axis=-1, keepdims=True)
    lp = mx.where(p > 0, mx.log(mx.where(p > 0, p, mx.ones_like(p))), mx.full(p.shape, -mx.inf))
    lp = _temper_logprobs(lp, temperature)
    per = _xlogy_diff(mx.exp(lp), lp, logq).sum(axis=-1) * (temperature ** 2)
    return reduce_masked(per, mask, reduction)


def answer_kl_reference(student_logits, letter_ids, teacher_probs, mask=None, temperature: float = 1.0,
                        reduction: str = "mean"):
    s = np.asarray(student_logits, np.float64)
    tp = np.asarray(teacher_probs, np.float64)
    per = np.zeros(s.shape[:-1])
    for idx in np.ndindex(per.shape):
        s4 = np.array([s[idx][i] for i in letter_ids])
        p = tp[idx] / tp[idx].sum()
        w = np.array([x ** (1.0 / temperature) if x > 0 else 0.0 for x in p])
        p = w / w.sum()
        logq = _log_softmax_np(s4 / temperature)
        per[idx] = sum(p[i] * (math.log(p[i]) - logq[i]) for i in range(4) if p[i] > 0) * temperature ** 2
    return _reduce_masked_np(per, mask, reduction)


def hidden_mse(student_hidden: mx.array, teacher_hidden: mx.array, projection: nn.Module | None = None,
               mask=None, reduction: str = "mean") -> mx.array:
    """Mean over feature dims of (W h_s + b − h_t)² per position: `student_hidden (..., d_s)` mapped by
    `projection` (e.g. an `nn.Linear(d_s, d_t)` trained with the student, or None when d_s == d_t) to `teacher_hidden (..., d_t)`; masked mean over
    positions by default. Differentiable w.r.t. the student hidden states and the projection's parameters."""
    student_hidden = _zero_masked(student_hidden, mask)
    h = projection(student_hidden) if projection is not None else student_hidden
    t = mx.stop_gradient(mx.array(teacher_hidden).astype(h.dtype))
    if h.shape[-1] != t.shape[-1]:
        raise KDError(f"hidden_mse: projected student dim {h.shape[-1]} != teacher dim {t.shape[-1]}")
    per = mx.square(h - t).mean(axis=-1)
    return reduce_masked(per, mask, reduction)


def hidden_mse_reference(student_hidden, teacher_hidden, weight=None, bias=None, mask=None,
                         reduction: str = "mean"):
    """`weight (d_t, d_s)`, `bias (d_t,)` as in `nn.Linear` (y = x Wᵀ + b); None = identity."""
    hs = np.asarray(student_hidden, np.float64)
    ht = np.asarray(teacher_hidden, np.float64)
    per = np.zeros(hs.shape[:-1])
    for idx in np.ndindex(per.shape):
        if weight is None:
            y = hs[idx]
        else:
            W = np.asarray(weight, np.float64)
            y = np.array([sum(W[o, i] * hs[idx][i] for i in range(W.shape[1])) for o in range(W.shape[0])])
            if bias is not None:
                y = y + np.asarray(bias, np.float64)
        per[idx] = sum((a - b) ** 2 for a, b in zip(y, ht[idx])) / len(y)
    return _reduce_masked_np(per, mask, reduction)
