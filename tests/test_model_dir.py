"""kd_mlx.model_dir: transformers-5 `rope_parameters` configs give the same logits as `rope_theta` ones through
eval, export and the trainer's loader; what cannot be mapped is refused in one line; the base-model fingerprint.

    python -m pytest -q tests/test_model_dir.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model as mlx_lm_load_model

from kd_mlx.eval import load_eval_model
from kd_mlx.export import export_model
from kd_mlx.model_dir import (FINGERPRINT_KEY, base_model_fingerprint, load_model, normalise_config,
                              read_model_config)
from kd_mlx.testing import tiny_phi_dir
from kd_mlx.testing.models import smollm2_fp32_dir
from kd_mlx.tokenizer import load_tokenizer
from kd_mlx.utils import KDError

PROMPT = "以下是关于初等数学的单项选择题，请直接给出正确答案的选项。\n\n题目：3加5等于多少？\nA. 7\nB. 8\nC. 9\nD. 10\n答案是："


def _resave(src: Path, dst: Path, edit) -> Path:
    """`src` with its config.json rewritten by `edit` (weights and tokenizer linked, as a re-save would keep them)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json" and f.is_file() and not f.name.startswith("."):
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def _to_rope_parameters(keys: tuple[str, ...]):
    """transformers 5's layout: the rope keys move into `rope_parameters`."""
    def edit(cfg: dict) -> None:
        cfg["rope_parameters"] = {"rope_type": "default", **{k: cfg.pop(k) for k in keys}}
    return edit


def _adapters(model_dir: Path, out: Path, keys: list[str], seed: int = 1) -> Path:
    """mlx-lm LoRA adapters on the last two layers of `model_dir`, lora_b non-zero (seeded), with the base-model
    fingerprint as kd_mlx.train records it (equal for both configs of one checkpoint: the normalised config counts)."""
    model, _ = mlx_lm_load_model(model_dir, lazy=True)
    model.freeze()
    n = 2
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, n, params)
    mx.random.seed(seed)
    weights = {k: (mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
               for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": n, "lora_parameters": params,
         FINGERPRINT_KEY: base_model_fingerprint(model_dir)}))
    return out


def _logits(model, ids: list[int]) -> mx.array:
    model.set_dtype(mx.float32)
    return model(mx.array([ids]))[0].astype(mx.float32)


def _check_same_logits(theta_dir: Path, rp_dir: Path, keys: list[str], tmp: Path, changed_key: str) -> None:
    ids = load_tokenizer(theta_dir).encode(PROMPT)
    # the failure this guards against: mlx-lm alone reads the transformers-5 config with other rope settings
    raw, raw_cfg = mlx_lm_load_model(rp_dir)
    theta_ref, _ = mlx_lm_load_model(theta_dir)
    ref = _logits(theta_ref, ids)
    assert changed_key not in raw_cfg
    assert float(mx.abs(_logits(raw, ids) - ref).max()) > 1e-3, "the raw config loads right: the test could not fail"
    assert read_model_config(rp_dir)[changed_key] == json.loads((theta_dir / "config.json").read_text())[changed_key]

    # eval
    got = {d: _logits(load_eval_model(str(d), dequantize=True).model, ids) for d in (theta_dir, rp_dir)}
    assert mx.array_equal(got[theta_dir], got[rp_dir])
    # export (fuse adapters): both exported directories give the same logits, and the rope_parameters one is written
    # with the classic keys so that mlx-lm alone reads it right
    adapters = _adapters(theta_dir, tmp / "adapters", keys)
    outs = [export_model(str(d), adapters, tmp / f"export_{i}").path for i, d in enumerate((theta_dir, rp_dir))]
    exported = [mlx_lm_load_model(o) for o in outs]
    assert "rope_parameters" not in exported[1][1] and exported[1][1][changed_key] == exported[0][1][changed_key]
    assert mx.array_equal(_logits(exported[0][0], ids), _logits(exported[1][0], ids))
    # with adapters through kd_mlx's loader (what eval --adapters runs) as well
    with_adapters = [load_model(d, adapters=adapters)[0] for d in (theta_dir, rp_dir)]
    assert mx.array_equal(_logits(with_adapters[0], ids), _logits(with_adapters[1], ids))


def _check_load_student(theta_dir: Path, rp_dir: Path) -> None:
    import kd_mlx.train.model as train_model

    ids = load_tokenizer(theta_dir).encode(PROMPT)
    a = _logits(train_model.load_student(str(theta_dir))[0], ids)
    b = _logits(train_model.load_student(str(rp_dir))[0], ids)
    assert mx.array_equal(a, b)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The real SmolLM2-135M (llama, rope_theta 100000; fp32: CPU quantized matmuls are slow) and its
    transformers-5 re-save (rope_parameters)."""
    src = smollm2_fp32_dir()
    d = tmp_path_factory.mktemp("llama")
    theta = _resave(src, d / "theta", lambda cfg: None)
    return theta, _resave(src, d / "rope_parameters", _to_rope_parameters(("rope_theta",)))


@pytest.fixture(scope="module")
def phi_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Phi (rope base 25000, partial rotary 0.5, both unlike mlx-lm's phi defaults) and its re-save."""
    d = tmp_path_factory.mktemp("phi")
    src = tiny_phi_dir(d / "src", seed=0)
    theta = _resave(src, d / "theta", lambda cfg: cfg.update(rope_theta=25000.0))
    rp = _resave(theta, d / "rope_parameters", _to_rope_parameters(("rope_theta", "partial_rotary_factor")))
    return theta, rp


LLAMA_KEYS = ["self_attn.q_proj", "self_attn.v_proj"]
PHI_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"]


@pytest.mark.slow
def test_llama_rope_parameters_same_logits_eval_export(llama_pair, tmp_path):
    _check_same_logits(*llama_pair, LLAMA_KEYS, tmp_path, "rope_theta")


def test_phi_rope_parameters_same_logits_eval_export(phi_pair, tmp_path):
    _check_same_logits(*phi_pair, PHI_KEYS, tmp_path, "partial_rotary_factor")


@pytest.mark.slow
def test_llama_rope_parameters_same_logits_load_student(llama_pair):
    _check_load_student(*llama_pair)


def test_phi_rope_parameters_same_logits_load_student(phi_pair):
    _check_load_student(*phi_pair)


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
         "num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 100}


@pytest.mark.parametrize("extra,needle", [
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}},
     "cannot be mapped"),
    ({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}}, "disagrees"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "mrope_section": [1, 2]}}, "no counterpart"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor has no"),
    ({"model_type": "alchemy"}, "no model_type 'alchemy'"),
    ({"model_type": "gemma", "num_key_value_heads": 1}, "lacks head_dim,? required"),
])
def test_normalise_refuses_in_one_line(extra, needle):
    cfg = {k: v for k, v in {**LLAMA, **extra}.items() if v is not None}
    with pytest.raises(KDError, match=needle) as e:
        normalise_config(cfg, "m")
    assert "\n" not in str(e.value)


def test_normalise_maps_scaling_and_keeps_what_mlx_lm_reads():
    rp = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = normalise_config({**LLAMA, "rope_parameters": rp}, "m")
    assert cfg["rope_theta"] == 500000.0 and "rope_parameters" not in cfg
    assert cfg["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "type": "llama3", "rope_type": "llama3"}
    assert normalise_config(LLAMA, "m") == LLAMA


def test_fingerprint_tells_same_shape_students_apart(tmp_path):
    a = tiny_phi_dir(tmp_path / "a", seed=0)
    b = tiny_phi_dir(tmp_path / "b", seed=1)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    assert len(base_model_fingerprint(a)) == 16
    assert base_model_fingerprint(a) == base_model_fingerprint(copy) != base_model_fingerprint(b)
    # the safetensors headers are identical: the samples of the data tell the weights apart
    assert [(d / "model.safetensors").read_bytes()[:8] for d in (a, b)] == [(a / "model.safetensors").read_bytes()[:8]] * 2
    # a transformers-5 re-save of the same weights is the same base model (the normalised config is hashed)
    resaved = _resave(a, tmp_path / "resaved", _to_rope_parameters(("rope_theta", "partial_rotary_factor")))
    assert base_model_fingerprint(resaved) == base_model_fingerprint(a)


def test_adapters_of_another_student_refused(tmp_path):
    a = tiny_phi_dir(tmp_path / "a", seed=0)
    b = tiny_phi_dir(tmp_path / "b", seed=1)
    adapters = _adapters(a, tmp_path / "adapters", PHI_KEYS)
    acfg = json.loads((adapters / "adapter_config.json").read_text())
    acfg.pop(FINGERPRINT_KEY)
    (adapters / "adapter_config.json").write_text(json.dumps(acfg))
    load_model(b, adapters=adapters)  # mlx-lm's format, no fingerprint, no named model: nothing to check against
    (adapters / "adapter_config.json").write_text(json.dumps({**acfg, "model": str(a)}))
    with pytest.raises(KDError, match="trained on another base model"):
        load_model(b, adapters=adapters)  # the model the config names still exists: compared with it
    load_model(a, adapters=adapters)
    (adapters / "adapter_config.json").write_text(json.dumps({**acfg, FINGERPRINT_KEY: base_model_fingerprint(a)}))
    with pytest.raises(KDError, match=f"fingerprint {base_model_fingerprint(a)}.*{base_model_fingerprint(b)}"):
        load_model(b, adapters=adapters)
    load_model(a, adapters=adapters)
