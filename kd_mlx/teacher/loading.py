"""Load any mlx-lm model directory lazily: config normalisation, the model skeleton, the on-disk weight map.

`build_skeleton(model_dir)` builds the mlx-lm model with mlx-lm's own loader without materialising a single weight:
parameters stay lazy (unevaluated) until the streaming executor installs one layer's real tensors. The names and
shapes on disk are checked against the skeleton up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from ..model_dir import normalise_config, read_raw_config
from ..safetensors_io import WeightFiles
from ..utils import KDError


@dataclass
class LazyModel:
    """An mlx-lm model whose parameters are lazy, plus where each parameter lives on disk."""

    model: nn.Module  # mlx_lm Model
    config: dict
    files: WeightFiles
    param_keys: list[str]  # names in the model == names on disk


def _load_normalised(model_dir: Path, lazy: bool, trust_remote_code: bool):
    """mlx-lm's `load_model` on the normalised config (its keys that differ from config.json passed as overrides)."""
    raw = read_raw_config(model_dir)
    cfg = normalise_config(raw, model_dir)
    if cfg.get("model_file") is not None and not trust_remote_code:
        raise KDError(f"{model_dir} needs custom model code ({cfg['model_file']}); pass trust_remote_code to run it")
    overrides = {k: v for k, v in cfg.items() if raw.get(k) != v}
    try:
        model, config = load_model(model_dir, lazy=lazy, strict=not lazy, model_config=overrides,
                                   trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise KDError(f"{model_dir}: {e}") from None
    if "rope_parameters" in config and "rope_parameters" not in cfg:
        config.pop("rope_parameters")  # load_model merged our keys over the original: the class ignores it
    return model, config


def build_skeleton(model_dir: str | Path, trust_remote_code: bool = False) -> LazyModel:
    """The mlx-lm model for `model_dir` with unevaluated parameters, validated against the shards' headers.

    mlx-lm's own loader builds and quantizes it (per-module bits / group size / mode, mxfp4, global scales) with
    `lazy=True`: `mx.load` maps each tensor without reading it. The streaming executor then installs real tensors
    read by byte range, so every parameter must be a tensor stored as is: a checkpoint that mlx-lm's `sanitize`
    transforms (HF layout) is refused with the command that converts it."""
    model_dir = Path(model_dir)
    files = WeightFiles(model_dir)
    model, config = _load_normalised(model_dir, lazy=True, trust_remote_code=trust_remote_code)
    params = dict(tree_flatten(model.parameters()))
    convert = f"python -m kd_mlx.teacher convert {model_dir} {model_dir}-mlx --keep-dtype"
    missing = sorted(set(params) - set(files.tensors))
    if missing:
        raise KDError(f"{model_dir}: tensor {missing[0]!r} is made by mlx-lm's sanitize (HF layout), streaming needs "
                      f"it stored as is; run `{convert}` first")
    for k, v in params.items():
        t = files.info(k)
        if tuple(v.shape) != t.shape:
            raise KDError(f"{t.file}: tensor {k!r} has shape {t.shape}, the model expects {tuple(v.shape)}")
    extra = sorted(set(files.tensors) - set(params))
    if extra and not all(_dropped_by_sanitize(model, k) for k in extra):
        raise KDError(f"{model_dir}: unexpected weights in the shards: {', '.join(extra[:3])}"
                      f"{' ...' if len(extra) > 3 else ''} (file {files.info(extra[0]).file.name})")
    return LazyModel(model, config, files, sorted(params))


def _dropped_by_sanitize(model: nn.Module, key: str) -> bool:
    """True when mlx-lm's sanitize drops this tensor (e.g. multi-token-prediction layers, rotary caches)."""
    if not hasattr(model, "sanitize"):
        return False
    return key not in model.sanitize({key: mx.zeros((0,))})


def load_in_memory(model_dir: str | Path, trust_remote_code: bool = False):
    """The plain reference: mlx-lm's own loader (whole model in memory), on the normalised config."""
    return _load_normalised(Path(model_dir), lazy=False, trust_remote_code=trust_remote_code)
