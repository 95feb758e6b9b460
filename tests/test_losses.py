"""Tests for kd_mlx.losses: hand-computed values, fast == reference, gradients vs finite differences, masks."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kd_mlx import losses as L
from kd_mlx.utils import KDError

LN3 = math.log(3.0)


def f(x) -> float:
    return float(np.asarray(x))


# ------------------------------------------------------------------------------------------------ hand-computed
# teacher logits [0, ln 3] -> p = [1/4, 3/4]; student logits [0, 0] -> q = [1/2, 1/2]
T2 = mx.array([[0.0, LN3]])
S2 = mx.array([[0.0, 0.0]])


def test_forward_kl_hand():
    # 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988
    assert f(L.forward_kl(S2, T2)) == pytest.approx(0.1308120, abs=1e-6)
    assert L.forward_kl_reference(np.array(S2), np.array(T2)) == pytest.approx(0.1308120, abs=1e-6)
    # identical distributions: 0
    assert f(L.forward_kl(T2, T2)) == pytest.approx(0.0, abs=1e-7)


def test_forward_kl_ce_only_hand():
    # -(1/4 + 3/4) ln(1/2) = ln 2; differs from forward_kl by H(p) = 0.5623351
    assert f(L.forward_kl_ce_only(S2, T2)) == pytest.approx(0.6931472, abs=1e-6)
    assert f(L.forward_kl_ce_only(S2, T2) - L.forward_kl(S2, T2)) == pytest.approx(0.5623351, abs=1e-6)
    assert L.forward_kl_ce_only_reference(np.array(S2), np.array(T2)) == pytest.approx(0.6931472, abs=1e-6)


def test_reverse_kl_hand():
    # 1/2 ln(2) + 1/2 ln(2/3) = 0.3465736 - 0.2027326
    assert f(L.reverse_kl(S2, T2)) == pytest.approx(0.1438410, abs=1e-6)
    assert L.reverse_kl_reference(np.array(S2), np.array(T2)) == pytest.approx(0.1438410, abs=1e-6)


def test_jsd_hand():
    # m = [3/8, 5/8]; KL(p||m) = 1/4 ln(2/3) + 3/4 ln(6/5) = 0.0353749; KL(q||m) = 1/2 ln(4/3) + 1/2 ln(4/5) = 0.0322693
    assert f(L.generalized_jsd(S2, T2, beta=0.5)) == pytest.approx(0.0338221, abs=1e-6)
    # beta = 0.25: m = 1/4 p + 3/4 q = [7/16, 9/16]
    # KL(p||m) = 1/4 ln(4/7) + 3/4 ln(4/3) = -0.1399035 + 0.2157616 = 0.0758581
    # KL(q||m) = 1/2 ln(8/7) + 1/2 ln(8/9) = 0.0667657 - 0.0588915 = 0.0078742
    # 0.25 * 0.0758581 + 0.75 * 0.0078742 = 0.0248702
    assert f(L.generalized_jsd(S2, T2, beta=0.25)) == pytest.approx(0.0248702, abs=1e-6)
    with pytest.raises(KDError):
        L.generalized_jsd(S2, T2, beta=1.0)


def test_temperature_scaling_hand():
    # T = 2: teacher [0, ln 9]/2 = [0, ln 3] -> p = [1/4, 3/4], student q = [1/2, 1/2]; times T^2 = 4
    t = mx.array([[0.0, math.log(9.0)]])
    assert f(L.forward_kl(S2, t, temperature=2.0)) == pytest.approx(4 * 0.1308120, abs=1e-5)
    assert f(L.reverse_kl(S2, t, temperature=2.0)) == pytest.approx(4 * 0.1438410, abs=1e-5)
    with pytest.raises(KDError):
        L.forward_kl(S2, t, temperature=0.0)


def test_cross_entropy_hand():
    # -ln(3/4) and -ln(1/4)
    logits = mx.array([[0.0, LN3], [0.0, LN3]])
    assert f(L.cross_entropy(logits, mx.array([1, 0]))) == pytest.approx((0.2876821 + 1.3862944) / 2, abs=1e-6)
    assert f(L.cross_entropy(logits, mx.array([1, -1]), mask=mx.array([True, False]))) == pytest.approx(
        0.2876821, abs=1e-6)
    # without a mask a padding target (-100, -1) is ignored, never read as token 0
    for pad in (-100, -1):
        assert f(L.cross_entropy(logits, mx.array([1, pad]))) == pytest.approx(0.2876821, abs=1e-6)
        assert L.cross_entropy_reference(np.array(logits), [1, pad]) == pytest.approx(0.2876821, abs=1e-6)


def test_sparse_topk_kl_hand():
    s = mx.zeros((1, 3))  # q = 1/3 each
    ids = mx.array([[0]])
    lp = mx.array([[math.log(0.5)]])
    # bucket: 0.5 ln(0.5 / (1/3)) + 0.5 ln(0.5 / (2/3)) = 0.2027326 - 0.1438410
    assert f(L.sparse_topk_kl(s, ids, lp, tail="bucket")) == pytest.approx(0.0588915, abs=1e-6)
    # renorm: p^ = [1] -> ln 3
    assert f(L.sparse_topk_kl(s, ids, lp, tail="renorm")) == pytest.approx(1.0986123, abs=1e-6)
    # padding slot (id -1) changes nothing
    ids2 = mx.array([[0, -1]])
    lp2 = mx.array([[math.log(0.5), -1e30]])
    assert f(L.sparse_topk_kl(s, ids2, lp2, tail="bucket")) == pytest.approx(0.0588915, abs=1e-6)
    assert L.sparse_topk_kl_reference(np.zeros((1, 3)), [[0]], [[math.log(0.5)]]) == pytest.approx(0.0588915,
                                                                                                   abs=1e-6)
    # T = 2 with a tail bucket needs the full row's log-normaliser: refused without it, exact with it
    with pytest.raises(KDError, match="log_z"):
        L.sparse_topk_kl(s, ids, lp, temperature=2.0)
    # full teacher row [0.5, 0.25, 0.25] at T=2: sqrt -> [.7071, .5, .5] / 1.7071; listed id 0 -> 0.414214
    log_z = mx.array([math.log(math.sqrt(0.5) + 2 * math.sqrt(0.25))])
    p0, q = 0.4142136, 1 / 3  # student at T=2 is still uniform
    want = 4 * (p0 * math.log(p0 / q) + (1 - p0) * math.log((1 - p0) / (2 * q)))
    assert f(L.sparse_topk_kl(s, ids, lp, temperature=2.0, log_z=log_z)) == pytest.approx(want, abs=1e-5)


def test_tempered_topk_target_equals_full_row_tempering_restricted():
    """At T=2 the bucket target built from the top-k and log Z_T is the full-row tempered distribution on the
    listed ids, and its tail is exactly the tempered mass outside them (checked against dense forward_kl: a student
    that puts the same mass on the tail's ids in the teacher's proportions gives the same loss)."""
    rng = np.random.default_rng(30)
    V, k, T = 40, 6, 2.0
    t = rng.standard_normal((3, V)) * 3
    logp = t - np.logaddexp.reduce(t, -1, keepdims=True)
    ids = np.argsort(-logp, -1)[:, :k]
    lp = np.take_along_axis(logp, ids, -1)
    log_z = np.logaddexp.reduce(logp / T, -1)
    full = np.exp(logp / T - log_z[:, None])  # full-row tempering
    listed = np.exp(lp / T - log_z[:, None])
    np.testing.assert_allclose(listed, np.take_along_axis(full, ids, -1), rtol=1e-12)
    # a student equal to the tempered teacher at T (logits = logp / T * T) -> loss 0 with the exact tail
    s = logp.astype(np.float32)
    v = float(L.sparse_topk_kl(mx.array(s), mx.array(ids), mx.array(lp.astype(np.float32)), temperature=T,
                               log_z=mx.array(log_z.astype(np.float32))))
    assert v == pytest.approx(0.0, abs=1e-5)
    assert L.sparse_topk_kl_reference(s, ids, lp, temperature=T, log_z=log_z) == pytest.approx(0.0, abs=1e-9)


def test_projected_kl_hand():
    s = mx.zeros((1, 3))
    # 0.6 ln(0.6 * 3) + 0.4 ln(0.4 / (2/3)) = 0.3526720 - 0.2043302
    v = L.projected_kl(s, mx.array([[2, -1]]), mx.array([[0.6, 0.0]]), mx.array([0.4]))
    assert f(v) == pytest.approx(0.1483418, abs=1e-6)
    # no remainder and a perfect student: 0
    s2 = mx.array([[0.0, math.log(3.0), -mx.inf]])  # q = [1/4, 3/4, 0]
    v2 = L.projected_kl(s2, mx.array([[1, 0]]), mx.array([[0.75, 0.25]]), mx.array([0.0]))
    assert f(v2) == pytest.approx(0.0, abs=1e-6)


def test_uld_hand():
    # teacher V=2: sorted [0.75, 0.25, (0)]; student V=3 logits [0, 0, ln 2] -> sorted [0.5, 0.25, 0.25]
    s = mx.array([[0.0, 0.0, math.log(2.0)]])
    assert f(L.uld_loss(s, T2)) == pytest.approx(0.5, abs=1e-6)
    # teacher given as top-k log-probs (tail absent): [0.5] vs [0.5, 0.25, 0.25] -> 0 + 0.25 + 0.25
    assert f(L.uld_loss(s, mx.array([[math.log(0.5)]]), teacher_is_logprobs=True)) == pytest.approx(0.5, abs=1e-6)
    assert L.uld_loss_reference(np.array(s), np.array(T2)) == pytest.approx(0.5, abs=1e-7)


def test_answer_kl_hand():
    s = mx.array([[5.0, -3.0, 0.0, 0.0, 0.0, 0.0]])  # letters at ids 2..5, uniform among them
    p = mx.array([[0.7, 0.1, 0.1, 0.1]])
    # 0.7 ln(2.8) + 0.3 ln(0.4) = 0.7207336 - 0.2748872
    assert f(L.answer_kl(s, [2, 3, 4, 5], p)) == pytest.approx(0.4458464, abs=1e-6)
    # unnormalised teacher probs are renormalised
    assert f(L.answer_kl(s, [2, 3, 4, 5], p * 0.5)) == pytest.approx(0.4458464, abs=1e-6)


def test_hidden_mse_hand():
    proj = nn.Linear(2, 3)
    proj.weight = mx.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    proj.bias = mx.array([0.0, 0.0, 1.0])
    hs = mx.array([[1.0, 2.0]])  # -> [1, 2, 4]
    ht = mx.array([[1.0, 1.0, 1.0]])  # squared errors 0, 1, 9
    assert f(L.hidden_mse(hs, ht, proj)) == pytest.approx(10 / 3, abs=1e-6)
    assert L.hidden_mse_reference(np.array(hs), np.array(ht), np.array(proj.weight),
                                  np.array(proj.bias)) == pytest.approx(10 / 3, abs=1e-12)


# ------------------------------------------------------------------------------------------- fast == reference
def _rand(rng, *shape, scale=2.0):
    return rng.normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dense_fast_equals_reference(T, reduction):
    rng = np.random.default_rng(0)
    s, t = _rand(rng, 2, 3, 7), _rand(rng, 2, 3, 7)
    t[0, 1, 2] = -np.inf  # a teacher zero
    mask = rng.random((2, 3)) > 0.3
    for fast, ref, kw in [
        (L.forward_kl, L.forward_kl_reference, {}),
        (L.forward_kl_ce_only, L.forward_kl_ce_only_reference, {}),
        (L.generalized_jsd, L.generalized_jsd_reference, {"beta": 0.3}),
        (L.uld_loss, L.uld_loss_reference, {}),
    ]:
        a = np.array(fast(mx.array(s), mx.array(t), mask=mx.array(mask), temperature=T, reduction=reduction, **kw))
        b = ref(s, t, mask=mask, temperature=T, reduction=reduction, **kw)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=fast.__name__)
    # reverse KL against a teacher without zeros (a zero makes it infinite)
    t2 = _rand(rng, 2, 3, 7)
    a = np.array(L.reverse_kl(mx.array(s), mx.array(t2), mask=mx.array(mask), temperature=T, reduction=reduction))
    np.testing.assert_allclose(a, L.reverse_kl_reference(s, t2, mask, T, reduction), rtol=1e-4, atol=1e-5)


def test_uld_different_vocab_sizes_fast_equals_reference():
    rng = np.random.default_rng(1)
    for vs, vt in [(5, 9), (9, 5)]:
        s, t = _rand(rng, 3, vs), _rand(rng, 3, vt)
        for T in (1.0, 1.5):
            np.testing.assert_allclose(float(L.uld_loss(mx.array(s), mx.array(t), temperature=T)),
                                       L.uld_loss_reference(s, t, temperature=T), rtol=1e-5, atol=1e-6)
        lp = np.log(np.sort(rng.dirichlet(np.ones(vt + 4)))[::-1][:vt]).astype(np.float32)[None].repeat(3, 0)
        for T in (1.0, 2.0):
            np.testing.assert_allclose(
                float(L.uld_loss(mx.array(s), mx.array(lp), temperature=T, teacher_is_logprobs=True)),
                L.uld_loss_reference(s, lp, temperature=T, teacher_is_logprobs=True), rtol=1e-5, atol=1e-6)


def _topk(rng, N, V, k):
    t = _rand(rng, N, V)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=-1)[:, :k].astype(np.int32)
    return ids, np.take_along_axis(logp, ids, -1).astype(np.float32)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_topk_fast_equals_reference(tail, T):
    rng = np.random.default_rng(2)
    N, V, k = 6, 11, 4
    s = _rand(rng, N, V)
    ids, lp = _topk(rng, N, V, k)
    log_z = (np.logaddexp.reduce(lp / T, -1) + 1.0).astype(np.float32)  # some normaliser above the top-k's
    ids[1, 3] = -1  # a padding slot
    lp[1, 3] = -np.inf
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    a = float(L.sparse_topk_kl(mx.array(s), mx.array(ids), mx.array(lp), mx.array(mask), T, tail,
                               log_z=mx.array(log_z)))
    b = L.sparse_topk_kl_reference(s, ids, lp, mask, T, tail, log_z=log_z)
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_sparse_bucket_full_coverage_equals_dense_forward_kl():
    # when the "top-k" is the whole vocabulary, the bucket form is exactly the dense forward KL
    rng = np.random.default_rng(3)
    s, t = _rand(rng, 4, 6), _rand(rng, 4, 6)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    ids = np.tile(np.arange(6), (4, 1))
    a = float(L.sparse_topk_kl(mx.array(s), mx.array(ids), mx.array(logp.astype(np.float32)), tail="bucket"))
    assert a == pytest.approx(float(L.forward_kl(mx.array(s), mx.array(t))), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_projected_fast_equals_reference(T):
    rng = np.random.default_rng(4)
    N, V, m = 5, 9, 3
    s = _rand(rng, N, V)
    ids = np.stack([rng.choice(V, m, replace=False) for _ in range(N)]).astype(np.int32)
    w = rng.dirichlet(np.ones(m + 1), size=N)
    probs, rem = w[:, :m].astype(np.float32), w[:, m].astype(np.float32)
    ids[0, 2], probs[0, 2] = -1, 0.0
    rem[0] = 1 - probs[0].sum()
    rem[2] = 0.0
    probs[2] /= probs[2].sum()
    mask = np.array([1, 0, 1, 1, 1], bool)
    a = float(L.projected_kl(mx.array(s), mx.array(ids), mx.array(probs), mx.array(rem), mx.array(mask), T))
    assert a == pytest.approx(L.projected_kl_reference(s, ids, probs, rem, mask, T), rel=1e-4, abs=1e-6)


def test_answer_kl_and_hidden_fast_equal_reference():
    rng = np.random.default_rng(5)
    s = _rand(rng, 3, 10)
    p = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
    for T in (1.0, 2.0):
        a = float(L.answer_kl(mx.array(s), [7, 1, 4, 9], mx.array(p), temperature=T))
        assert a == pytest.approx(L.answer_kl_reference(s, [7, 1, 4, 9], p, temperature=T), rel=1e-4, abs=1e-6)
    mx.random.seed(0)
    proj = nn.Linear(4, 6)
    hs, ht = _rand(rng, 2, 3, 4), _rand(rng, 2, 3, 6)
    mask = np.array([[1, 1, 0], [0, 1, 1]], bool)
    a = float(L.hidden_mse(mx.array(hs), mx.array(ht), proj, mx.array(mask)))
    b = L.hidden_mse_reference(hs, ht, np.array(proj.weight), np.array(proj.bias), mask)
    assert a == pytest.approx(b, rel=1e-4)


def test_cross_entropy_fast_equals_reference_and_mlx():
    rng = np.random.default_rng(6)
    x = _rand(rng, 2, 5, 8)
    y = rng.integers(0, 8, size=(2, 5))
    mask = rng.random((2, 5)) > 0.2
    a = float(L.cross_entropy(mx.array(x), mx.array(y), mx.array(mask)))
    assert a == pytest.approx(L.cross_entropy_reference(x, y, mask), rel=1e-5)
    ref = nn.losses.cross_entropy(mx.array(x), mx.array(y), reduction="none")  # MLX's own CE as a peer
    assert a == pytest.approx(float((ref * mx.array(mask)).sum() / mask.sum()), rel=1e-5)


# ---------------------------------------------------------------------------------- gradients vs finite differences
def _fd_grad(fn, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (fn(xp) - fn(xm)) / (2 * eps)
    return g


def _grad_cases():
    rng = np.random.default_rng(7)
    t = _rand(rng, 2, 5)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    ids = np.argsort(-logp, -1)[:, :2].astype(np.int32)
    lp = np.take_along_axis(logp, ids, -1).astype(np.float32)
    pids = np.array([[3, 0, -1], [1, 4, 2]], np.int32)
    pp = np.array([[0.5, 0.2, 0.0], [0.3, 0.3, 0.1]], np.float32)
    rem = 1 - pp.sum(-1)
    mask = np.array([True, True])
    ap = np.array([[.1, .2, .3, .4], [.7, .1, .1, .1]])
    T = 1.7
    log_z = np.logaddexp.reduce(logp / T, -1).astype(np.float32)
    return [
        ("forward_kl", lambda s: L.forward_kl(s, mx.array(t), temperature=T),
         lambda s: L.forward_kl_reference(s, t, temperature=T)),
        ("ce_only", lambda s: L.forward_kl_ce_only(s, mx.array(t), temperature=T),
         lambda s: L.forward_kl_ce_only_reference(s, t, temperature=T)),
        ("reverse_kl", lambda s: L.reverse_kl(s, mx.array(t)), lambda s: L.reverse_kl_reference(s, t)),
        ("jsd", lambda s: L.generalized_jsd(s, mx.array(t), 0.3), lambda s: L.generalized_jsd_reference(s, t, 0.3)),
        ("topk_bucket", lambda s: L.sparse_topk_kl(s, mx.array(ids), mx.array(lp), temperature=T,
                                                   log_z=mx.array(log_z)),
         lambda s: L.sparse_topk_kl_reference(s, ids, lp, temperature=T, log_z=log_z)),
        ("topk_renorm", lambda s: L.sparse_topk_kl(s, mx.array(ids), mx.array(lp), tail="renorm"),
         lambda s: L.sparse_topk_kl_reference(s, ids, lp, tail="renorm")),
        ("projected", lambda s: L.projected_kl(s, mx.array(pids), mx.array(pp), mx.array(rem), mx.array(mask)),
         lambda s: L.projected_kl_reference(s, pids, pp, rem, mask)),
        ("uld", lambda s: L.uld_loss(s, mx.array(t[:, :4])), lambda s: L.uld_loss_reference(s, t[:, :4])),
        ("answer", lambda s: L.answer_kl(s, [4, 0, 2, 1], mx.array(ap), temperature=T),
         lambda s: L.answer_kl_reference(s, [4, 0, 2, 1], ap, temperature=T)),
        ("ce", lambda s: L.cross_entropy(s, mx.array([3, -100])),
         lambda s: L.cross_entropy_reference(s, [3, -100])),
    ]


@pytest.mark.parametrize("case", _grad_cases(), ids=lambda c: c[0])
def test_gradients_match_finite_differences(case):
    _, fast, ref = case
    rng = np.random.default_rng(8)
    s = _rand(rng, 2, 5, scale=1.0)
    g = np.array(mx.grad(fast)(mx.array(s)))
    g_fd = _fd_grad(ref, s)
    np.testing.assert_allclose(g, g_fd, rtol=1e-3, atol=2e-5)


def test_hidden_mse_gradient_wrt_projection_matches_fd():
    rng = np.random.default_rng(9)
    hs, ht = _rand(rng, 3, 2, scale=1.0), _rand(rng, 3, 3, scale=1.0)
    proj = nn.Linear(2, 3)
    W0, b0 = np.array(proj.weight), np.array(proj.bias)

    def loss_fn(model):
        return L.hidden_mse(mx.array(hs), mx.array(ht), model)

    _, grads = nn.value_and_grad(proj, loss_fn)(proj)
    gW = np.array(grads["weight"])
    gW_fd = _fd_grad(lambda W: L.hidden_mse_reference(hs, ht, W, b0), W0)
    np.testing.assert_allclose(gW, gW_fd, rtol=1e-3, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- masks
def test_masked_positions_contribute_nothing():
    rng = np.random.default_rng(10)
    s, t = _rand(rng, 2, 4, 6), _rand(rng, 2, 4, 6)
    mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
    s2 = s.copy()
    s2[~mask] = rng.normal(size=(int((~mask).sum()), 6)) * 50  # garbage at masked positions
    s2[0, 1, :] = np.nan
    for fn in (L.forward_kl, L.reverse_kl, L.forward_kl_ce_only, L.uld_loss):
        a = float(fn(mx.array(s), mx.array(t), mask=mx.array(mask)))
        b = float(fn(mx.array(s2), mx.array(t), mask=mx.array(mask)))
        assert a == pytest.approx(b, rel=1e-6) and math.isfinite(a)
        # mean over unmasked positions = mean of the unmasked per-position values
        per = np.array(fn(mx.array(s), mx.array(t), reduction="none"))
        assert a == pytest.approx(per[mask].mean(), rel=1e-5)
        # gradient at masked positions is exactly 0 (and not NaN) even with garbage there
        g = np.array(mx.grad(lambda x: fn(x, mx.array(t), mask=mx.array(mask)))(mx.array(s2)))
        assert np.all(g[~mask] == 0) and np.all(np.isfinite(g))


def test_all_masked_gives_zero_not_nan():
    s, t = mx.ones((2, 3, 5)), mx.zeros((2, 3, 5))
    none = mx.zeros((2, 3), dtype=mx.bool_)
    ids = mx.zeros((2, 3, 2), dtype=mx.int32)
    lp = mx.full((2, 3, 2), -1.0)
    vals = [
        L.forward_kl(s, t, none), L.forward_kl_ce_only(s, t, none), L.reverse_kl(s, t, none),
        L.generalized_jsd(s, t, 0.5, none), L.uld_loss(s, t, none), L.cross_entropy(s, mx.zeros((2, 3), mx.int32), none),
        L.sparse_topk_kl(s, ids, lp, none), L.projected_kl(s, ids, mx.exp(lp), mx.zeros((2, 3)), none),
        L.answer_kl(s[:, 0], [0, 1, 2, 3], mx.full((2, 4), 0.25), mx.zeros((2,), mx.bool_)),
        L.hidden_mse(s, t, None, none),
    ]
    for v in vals:
        assert float(v) == 0.0
    g = mx.grad(lambda x: L.forward_kl(x, t, none))(s)
    assert np.all(np.array(g) == 0)


def test_masked_positions_contribute_nothing_sparse():
    rng = np.random.default_rng(12)
    N, V = 4, 8
    s = _rand(rng, N, V)
    ids, lp = _topk(rng, N, V, 3)
    mask = np.array([1, 0, 1, 0], bool)
    s2 = s.copy()
    s2[1] = np.nan
    s2[3] = 1e4
    probs = np.exp(lp)
    rem = 1 - probs.sum(-1)
    t = _rand(rng, N, V)
    cases = [
        lambda x: L.sparse_topk_kl(x, mx.array(ids), mx.array(lp), mx.array(mask)),
        lambda x: L.sparse_topk_kl(x, mx.array(ids), mx.array(lp), mx.array(mask), tail="renorm"),
        lambda x: L.projected_kl(x, mx.array(ids), mx.array(probs), mx.array(rem), mx.array(mask)),
        lambda x: L.generalized_jsd(x, mx.array(t), 0.5, mx.array(mask)),
        lambda x: L.answer_kl(x, [0, 1, 2, 3], mx.full((N, 4), 0.25), mx.array(mask)),
    ]
    for fn in cases:
        a, b = float(fn(mx.array(s))), float(fn(mx.array(s2)))
        assert math.isfinite(a) and a == pytest.approx(b, rel=1e-6)
        g = np.array(mx.grad(fn)(mx.array(s2)))
        assert np.all(g[~mask] == 0) and np.all(np.isfinite(g))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_padding_rows_give_finite_gradients(temperature):
    # padding rows as the alignment emits them (every id −1, remainder 0), masked or not: at T != 1 tempering an
    # all −inf row used to give −inf − (−inf) = NaN, hidden in the value by `where` but leaking into the gradient
    rng = np.random.default_rng(21)
    N, V = 5, 9
    s = _rand(rng, N, V)
    ids, lp = _topk(rng, N, V, 3)
    probs = np.exp(lp)
    rem = 1 - probs.sum(-1)
    pad = np.array([0, 1, 0, 1, 0], bool)
    log_z = (np.logaddexp.reduce(lp / temperature, -1) + 0.5).astype(np.float32)
    ids[pad], lp[pad], probs[pad], rem[pad] = -1, -np.inf, 0.0, 0.0
    mask = ~pad
    cases = [
        (lambda x, m: L.projected_kl(x, mx.array(ids), mx.array(probs), mx.array(rem), m, temperature),
         lambda m: L.projected_kl_reference(s, ids, probs, rem, m, temperature)),
        (lambda x, m: L.sparse_topk_kl(x, mx.array(ids), mx.array(lp), m, temperature, log_z=mx.array(log_z)),
         lambda m: L.sparse_topk_kl_reference(s, ids, lp, m, temperature, log_z=log_z)),
        (lambda x, m: L.sparse_topk_kl(x, mx.array(ids), mx.array(lp), m, temperature, tail="renorm"),
         lambda m: L.sparse_topk_kl_reference(s, ids, lp, m, temperature, tail="renorm")),
    ]
    for fast, ref in cases:
        v = float(fast(mx.array(s), mx.array(mask)))
        assert math.isfinite(v) and v == pytest.approx(ref(mask), rel=1e-4, abs=1e-6)
        g = np.array(mx.grad(lambda x: fast(x, mx.array(mask)))(mx.array(s)))
        assert np.all(np.isfinite(g)) and np.all(g[pad] == 0) and np.any(g[mask] != 0)
    # unmasked padding rows (projected_kl: an empty target) are finite too and add nothing to the gradient
    fast = cases[0][0]
    g = np.array(mx.grad(lambda x: fast(x, None))(mx.array(s)))
    assert np.all(np.isfinite(g)) and np.all(g[pad] == 0)


# ------------------------------------------------------------------------------------- token-level text objective
def test_text_objective_and_bits_per_byte_fast_equal_reference():
    """kd_mlx.textkd on a tiny Phi-shaped model: batched bits per byte == the per-text float64 reference; the
    batch's CE ignores padding; the KD part equals projected_kl on the gathered rows."""
    from mlx_lm.models import phi

    from kd_mlx.textkd import TextExample, bits_per_byte, bits_per_byte_reference, make_batch, text_kd_loss

    mx.random.seed(0)
    model = phi.Model(phi.ModelArgs(model_type="phi", max_position_embeddings=64, vocab_size=50, hidden_size=16,
                                    num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2,
                                    partial_rotary_factor=0.5, intermediate_size=32, layer_norm_eps=1e-5,
                                    rope_theta=10000.0))
    rng = np.random.default_rng(0)
    exs = []
    for n in (5, 9, 3):
        kd_ids = rng.integers(0, 50, (2, 3)).astype(np.int32)
        kd_ids[1, 2] = -1
        probs = rng.dirichlet(np.ones(4), 2)[:, :3].astype(np.float32)
        probs[1, 2] = 0
        exs.append(TextExample(rng.integers(0, 50, n).astype(np.int32), 2 * n, np.array([0, n - 2], np.int32),
                               kd_ids, probs, (1 - probs.sum(-1)).astype(np.float32)))
    assert bits_per_byte(model, exs, batch_size=2) == pytest.approx(bits_per_byte_reference(model, exs), rel=1e-5)
    batch = make_batch(exs)
    total, (ce, kd) = text_kd_loss(model, batch, ce_weight=0.5, kd_weight=2.0, temperature=1.5)
    logits = np.array(model(batch.tokens))
    want_ce = np.mean([-L._log_softmax_np(logits[b, j])[e.ids[j + 1]] for b, e in enumerate(exs)
                       for j in range(len(e.ids) - 1)])
    assert float(ce) == pytest.approx(want_ce, rel=1e-5)
    rows = [(logits[b, p], e.kd_ids[i], e.kd_probs[i], e.kd_rest[i]) for b, e in enumerate(exs)
            for i, p in enumerate(e.kd_pos)]
    want_kd = np.mean([L.projected_kl_reference(s[None], i[None], p[None], np.array([r]), temperature=1.5)
                       for s, i, p, r in rows])
    assert float(kd) == pytest.approx(want_kd, rel=1e-4)
    assert float(total) == pytest.approx(0.5 * want_ce + 2.0 * want_kd, rel=1e-4)
