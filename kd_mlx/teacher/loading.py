"""Load any mlx-lm model directory lazily: config normalisation, the model skeleton, the on-disk weight map.

`build_skeleton(model_dir)` builds the mlx-lm model with its own classes (quantized exactly as mlx-lm's loader
would) without materialising a single weight: parameters stay lazy (unevaluated) until the streaming executor
installs one layer's real tensors. The names and shapes on disk are checked against the skeleton up front.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..utils import KDError
from ..safetensors_io import WeightFiles


def read_config(model_dir: str | Path) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise KDError(f"no config.json in {model_dir}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KDError(f"{p} is not valid JSON: {e}") from None


def _args_fields(config: dict) -> set[str]:
    from mlx_lm.utils import _get_classes

    _, args_cls = _get_classes(config)
    return {f.name for f in dataclasses.fields(args_cls)}


def normalise_config(config: dict, model_dir: str | Path = "") -> dict:
    """Make a config safe for mlx-lm 0.32, or refuse it.

    transformers 5 writes `rope_parameters` (rope_theta + scaling in one dict) instead of `rope_theta` /
    `rope_scaling`; mlx-lm's older model classes ignore it and silently fall back to their default rope base, which
    makes logits wrong from position 1 on. Map it onto the classic keys when the model class does not read it."""
    cfg = json.loads(json.dumps(config))
    if "model_type" not in cfg:
        raise KDError(f"config.json in {model_dir} has no model_type")
    try:
        fields = _args_fields(cfg)
    except ValueError as e:
        raise KDError(f"{model_dir}: {e}") from None
    rp = cfg.get("rope_parameters")
    if rp is not None and "rope_parameters" not in fields:
        if not isinstance(rp, dict) or "rope_theta" not in rp:
            raise KDError(f"{model_dir}/config.json: rope_parameters {rp!r} cannot be mapped to rope_theta/rope_scaling "
                          f"for mlx-lm's {cfg['model_type']} (per-layer rope?): refusing to run with a wrong rope base")
        theta = float(rp["rope_theta"])
        if "rope_theta" in cfg and float(cfg["rope_theta"]) != theta:
            raise KDError(f"{model_dir}/config.json: rope_theta {cfg['rope_theta']} disagrees with "
                          f"rope_parameters.rope_theta {theta}")
        cfg["rope_theta"] = theta
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype not in (None, "default"):
            scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
            scaling["type"] = rtype
            scaling["rope_type"] = rtype
            if cfg.get("rope_scaling") not in (None, scaling):
                raise KDError(f"{model_dir}/config.json: rope_scaling disagrees with rope_parameters")
            cfg["rope_scaling"] = scaling
        cfg.pop("rope_parameters")
    return cfg


@dataclass
class LazyModel:
    """An mlx-lm model whose parameters are lazy, plus where each parameter lives on disk."""

    model: object  # mlx_lm Model
    config: dict
    files: WeightFiles
    param_keys: list[str]  # names in the model == names on disk (after sanitize, identity only)


def build_skeleton(model_dir: str | Path, trust_remote_code: bool = False) -> LazyModel:
    """The mlx-lm model for `model_dir` with unevaluated parameters, validated against the shards' headers."""
    import importlib.util

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, infer_quant_config

    model_dir = Path(model_dir)
    config = normalise_config(read_config(model_dir), model_dir)
    files = WeightFiles(model_dir)
    if (model_file := config.get("model_file")) is not None:
        if not trust_remote_code:
            raise KDError(f"{model_dir} needs custom model code ({model_file}); pass trust_remote_code to run it")
        spec = importlib.util.spec_from_file_location("custom_model", model_dir / model_file)
        arch = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(arch)
        model_cls, args_cls = arch.Model, arch.ModelArgs
    else:
        try:
            model_cls, args_cls = _get_classes(config)
        except ValueError as e:
            raise KDError(f"{model_dir}: {e}") from None
    model = model_cls(args_cls.from_dict(config))  # random init stays lazy: no memory used

    # Zero-size placeholders that carry each tensor's shape/dtype, for sanitize and quantization inference.
    raw = {k: _ShapeOnly(t.shape, t.dtype) for k, t in files.tensors.items()}
    if hasattr(model, "sanitize"):
        lazy = {k: mx.zeros((0,)) for k in files.tensors}  # cheap stand-ins (never evaluated)
        ids = {id(v): k for k, v in lazy.items()}
        try:
            sanitized = model.sanitize(dict(lazy))
        except Exception as e:  # sanitize needs to transform real data
            raise KDError(f"{model_dir}: checkpoint needs conversion before streaming ({type(e).__name__}: {e}); "
                          f"run `python -m kd_mlx.teacher convert`") from None
        keep = []
        for k, v in sanitized.items():
            if ids.get(id(v)) != k:
                raise KDError(f"{model_dir}: tensor {k!r} needs conversion by mlx-lm's sanitize before streaming; "
                              f"run `python -m kd_mlx.teacher convert` first")
            keep.append(k)
    else:
        keep = list(files.tensors)

    quant = config.get("quantization")
    if quant is not None:
        def predicate(p, m):
            if p in quant:
                return quant[p]
            if not hasattr(m, "to_quantized") or f"{p}.scales" not in raw:
                return False
            return infer_quant_config(p, m, raw)

        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"], mode=quant.get("mode", "affine"),
                    class_predicate=predicate)
    elif config.get("quantization_config"):
        raise KDError(f"{model_dir}: quantization_config {config['quantization_config'].get('quant_method')!r} is not "
                      f"an MLX quantization; run `python -m kd_mlx.teacher convert` first")
    model.eval()
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(keep))
    extra = sorted(set(keep) - set(params))
    if missing:
        raise KDError(f"{model_dir}: weights missing from the shards: {', '.join(missing[:3])}"
                      f"{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise KDError(f"{model_dir}: unexpected weights in the shards: {', '.join(extra[:3])}"
                      f"{' ...' if len(extra) > 3 else ''} (file {files.info(extra[0]).file.name})")
    for k, v in params.items():
        t = files.info(k)
        if tuple(v.shape) != t.shape:
            raise KDError(f"{t.file}: tensor {k!r} has shape {t.shape}, the model expects {tuple(v.shape)}")
    return LazyModel(model, config, files, sorted(params))


class _ShapeOnly:
    """Stands in for a weight where mlx-lm only reads `.shape` / `.dtype` (quantization inference)."""

    def __init__(self, shape, st_dtype: str):
        import mlx.core as mx

        self.shape = shape
        self.dtype = {"U8": mx.uint8, "F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32,
                      "U32": mx.uint32}.get(st_dtype, mx.float32)


def load_in_memory(model_dir: str | Path, trust_remote_code: bool = False):
    """The plain reference: mlx-lm's own loader (whole model in memory), on the normalised config."""
    from mlx_lm.utils import load_model

    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    cfg = normalise_config(raw, model_dir)
    overrides = {k: v for k, v in cfg.items() if raw.get(k) != v}
    model, config = load_model(model_dir, model_config=overrides, trust_remote_code=trust_remote_code)
    if "rope_parameters" in config and "rope_parameters" not in cfg:
        # load_model merged our keys over the original; drop the raw key the model class ignores
        config.pop("rope_parameters")
    return model, config
