"""benchmarks/kd_attention.py's reusable parts: the attention recorder (explicit softmax attention in place of
mx.fast.scaled_dot_product_attention) against mlx-lm's own forward, the common byte segments of two tokenizations,
and the attention KL on hand-computed values."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kd_mlx.testing.models import tiny_kimi_k2_dir, tiny_phi_dir
from kd_mlx.utils import KDError
from mlx_lm.utils import load_model

_spec = importlib.util.spec_from_file_location(
    "kd_attention", Path(__file__).resolve().parents[1] / "benchmarks" / "kd_attention.py")
kd_attention = importlib.util.module_from_spec(_spec)
sys.modules["kd_attention"] = kd_attention  # dataclasses look their module up there
_spec.loader.exec_module(kd_attention)


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "additive", "none"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_probs_times_values_equals_fast_sdpa(mask_kind, kv_heads):
    mx.random.seed(0)
    B, H, L, D = 2, 4, 7, 8
    q = mx.random.normal((B, H, L, D))
    k, v = mx.random.normal((B, kv_heads, L, D)), mx.random.normal((B, kv_heads, L, D))
    mask = {"causal": "causal", "none": None,
            "bool": mx.random.uniform(shape=(B, 1, L, L)) > 0.3,
            "additive": mx.random.normal((B, H, L, L))}[mask_kind]
    if mask_kind == "bool":
        mask = mask | mx.eye(L, dtype=mx.bool_)  # every query keeps one key
    scale = 1 / math.sqrt(D)
    p = kd_attention.attention_probs(q, k, scale, mask)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    got = p @ mx.repeat(v, H // kv_heads, axis=1)
    assert mx.allclose(p.sum(-1), mx.ones((B, H, L)), atol=1e-6).item()
    assert mx.abs(got - ref).max().item() < 1e-5
    if mask_kind == "causal":
        assert mx.all(mx.triu(p, k=1) == 0).item()


@pytest.mark.parametrize("family", ["phi", "deepseek_v3"])
def test_recorder_reproduces_the_model_and_records_each_layer(tmp_path, family):
    path = (tiny_phi_dir(tmp_path / "m", seed=1) if family == "phi"
            else tiny_kimi_k2_dir(tmp_path / "m", seed=1, n_layers=2, n_routed_experts=4))
    model, _ = load_model(path)
    x = mx.array([[5, 9, 100, 7, 33, 2, 8, 41], [3, 4, 5, 6, 7, 8, 9, 10]])
    ref = model(x)
    with kd_attention.record_attention(model) as probs:
        got = model(x)
    assert mx.abs(got - ref).max().item() < 1e-5
    assert len(probs) == 2 and probs[0].shape == (2, model.args.num_attention_heads, 8, 8)
    # restored: the family's attention is mlx-lm's again outside the block
    with kd_attention.record_attention(model) as again:
        pass
    model(x)
    assert again == []
    rows = kd_attention.last_row_attention(probs, mx.array([8, 5]))
    assert rows.shape == (2, 2, 8)
    assert np.allclose(np.array(rows[:, 1, 5:]), 0.0) and np.allclose(np.array(rows.sum(-1)), 1.0, atol=1e-5)


def test_common_segments_and_segment_mass():
    # text of 6 bytes; teacher cuts after bytes 2, 3, 6; student after 1, 3, 4, 6 -> common cuts 3, 6
    t_seg, s_seg, n = kd_attention.common_segments(np.array([2, 3, 6]), np.array([1, 3, 4, 6]))
    assert n == 2 and t_seg.tolist() == [0, 0, 1] and s_seg.tolist() == [0, 0, 1, 1]
    mass = kd_attention.segment_mass(np.array([[0.5, 0.2, 0.3]]), t_seg, n)
    assert np.allclose(mass, [[0.7, 0.3]])
    with pytest.raises(KDError):
        kd_attention.common_segments(np.array([2, 5]), np.array([1, 6]))


def test_attention_kl_hand_computed():
    t = mx.array([[0.7, 0.3, 0.0], [0.5, 0.5, 0.9]])
    s = mx.array([[0.5, 0.25, 0.25], [0.25, 0.75, 0.0]])
    valid = mx.array([[True, True, True], [True, True, False]])  # the 0.9 is padding
    want = (0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.25)
            + 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert abs(kd_attention.attention_kl(s, t, valid).item() - want) < 1e-6
