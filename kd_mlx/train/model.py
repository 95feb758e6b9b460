"""The student: an mlx-lm model with LoRA / DoRA / full fine-tuning through mlx-lm's own tuner layers.

Adapters are written exactly as `mlx_lm.lora` writes them (`adapters.safetensors` + `adapter_config.json` with
`fine_tune_type`, `num_layers`, `lora_parameters`), so `mlx_lm.load(student, adapter_path=RUN/best)` and
`mlx_lm.fuse` read them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..model_dir import FINGERPRINT_KEY, base_model_fingerprint, load_model
from ..utils import KDError, atomic_path, resolve_model_path
from .config import TrainConfig

# Default LoRA targets per mlx-lm model type (keys are module paths inside one transformer block).
DEFAULT_LORA_KEYS: dict[str, list[str]] = {
    "phi": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def load_student(path_or_repo: str, dtype: str | None = "float32") -> tuple[nn.Module, dict, Path]:
    """Load the student model with mlx-lm (weights only; the tokenizer comes from kd_mlx.tokenizer).

    `dtype` casts floating weights (fp32 is the fast CPU path; None keeps the checkpoint's dtype)."""
    path = resolve_model_path(path_or_repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt",
                                                             "*.model", "*.tiktoken", "*.py"])
    if not (path / "config.json").is_file():
        raise KDError(f"student directory {path} has no config.json")
    model, config = load_model(path)  # kd_mlx.model_dir: config normalised (rope_parameters), one-line errors
    if dtype is not None:
        want = getattr(mx, dtype, None)
        if not isinstance(want, mx.Dtype):
            raise KDError(f"unknown dtype {dtype!r} (float32, float16, bfloat16)")
        model.update(_cast_floats(model.parameters(), want))
        mx.eval(model.parameters())
    return model, config, path


def _cast_floats(tree: Any, dtype: mx.Dtype) -> Any:
    return tree_map(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x, tree)


def lora_keys_for(model: nn.Module, keys: list[str] | None) -> list[str]:
    """Target module paths (inside a block): explicit `keys`, else the model type's default, else every Linear."""
    if keys:
        names = {k for k, _ in model.layers[0].named_modules()}
        missing = [k for k in keys if k not in names]
        if missing:
            raise KDError(f"LoRA target(s) not in the model's blocks: {', '.join(missing)}")
        return list(keys)
    mtype = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    if mtype in DEFAULT_LORA_KEYS:
        return list(DEFAULT_LORA_KEYS[mtype])
    return sorted(k for k, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def adapter_config(cfg: TrainConfig, model: nn.Module) -> dict:
    """The `adapter_config.json` content mlx-lm expects (plus our own keys, which mlx-lm ignores)."""
    n_layers = len(model.layers)
    num_layers = n_layers if cfg.num_layers == -1 else cfg.num_layers
    if not 0 < num_layers <= n_layers:
        raise KDError(f"num_layers={num_layers} but the student has {n_layers} layers")
    out = {"fine_tune_type": cfg.fine_tune_type, "num_layers": num_layers, "model": str(cfg.student)}
    if cfg.fine_tune_type != "full":
        out["lora_parameters"] = {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout,
                                  "keys": lora_keys_for(model, cfg.lora_keys)}
    return out


def setup_trainable(model: nn.Module, cfg: TrainConfig) -> dict:
    """Freeze the model and make the requested part trainable with mlx-lm's tuner; returns the adapter config."""
    acfg = adapter_config(cfg, model)
    ftt, num_layers = cfg.fine_tune_type, acfg["num_layers"]
    model.freeze()
    if ftt == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, acfg["lora_parameters"], use_dora=(ftt == "dora"))
    return acfg


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, acfg: dict, directory: str | Path) -> None:
    """Write adapters.safetensors + adapter_config.json (mlx-lm's format), each atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(d / "adapters.safetensors") as tmp:
        # mx.save_safetensors appends the suffix when missing: give it a name that has it
        real = tmp.with_name(tmp.name + ".safetensors")
        mx.save_safetensors(str(real), weights)
        real.replace(tmp)
    with atomic_path(d / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(acfg, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load trained parameters written by `save_adapters` into a model already set up by `setup_trainable`."""
    f = Path(directory) / "adapters.safetensors"
    if not f.is_file():
        raise KDError(f"no adapters.safetensors in {directory}")
    weights = mx.load(str(f))
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected):
        raise KDError(f"adapters in {directory} do not match the run's trainable parameters "
                      f"({len(weights)} tensors vs {len(expected)})")
    model.load_weights(list(weights.items()), strict=False)


# ------------------------------------------------------------------------------------------------ base identity

def check_adapter_base(adapter_dir: str | Path, model_dir: str | Path, fingerprint: str | None = None) -> None:
    """Refuse adapters trained on another base model than `model_dir` (adapter_config.json's
    `base_model_fingerprint` against the model's, or against `fingerprint` when the caller has it). Adapters without
    the key (mlx-lm's own, older runs) are accepted."""
    f = Path(adapter_dir) / "adapter_config.json"
    if not f.is_file():
        raise KDError(f"no adapter_config.json in {adapter_dir}")
    try:
        recorded = json.loads(f.read_text(encoding="utf-8")).get(FINGERPRINT_KEY)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise KDError(f"{f} is not a valid adapter config: {e}") from None
    if recorded is None:
        return
    actual = fingerprint or base_model_fingerprint(model_dir)
    if recorded != actual:
        raise KDError(f"adapters in {adapter_dir} were trained on another base model (fingerprint {recorded}) than "
                      f"{model_dir} ({actual}): use the student they were trained from")
