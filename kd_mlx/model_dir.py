"""One loader for every model directory (teacher, student, export): read config.json the way mlx-lm 0.32 must see
it, refuse what it would misread, load the model (with adapters), and fingerprint a base model.

mlx-lm builds a model from `config.json` with `ModelArgs.from_dict`, which silently drops keys its class does not
know and falls back to defaults. transformers 5 writes `rope_parameters` (`{"rope_theta": ..., "rope_type": ...,
"partial_rotary_factor": ...}`) instead of the top-level `rope_theta` / `rope_scaling` / `partial_rotary_factor`
that mlx-lm's llama, phi, qwen2... read: loaded as is, such a checkpoint runs with rope base 10000 and gives wrong
logits from position 1 on, with no error. `read_model_config` maps those keys onto the classic ones or refuses the
config in one line, and names a missing required key (e.g. gemma's `head_dim`) instead of a TypeError traceback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import _get_classes
from mlx_lm.utils import load_model as mlx_lm_load_model

from .utils import KDError

FINGERPRINT_KEY = "base_model_fingerprint"  # in adapter_config.json: the base model the adapters were trained on
# Rope keys of transformers-5 `rope_parameters` that are top-level fields of mlx-lm's classes, not rope scaling.
_TOP_LEVEL_ROPE_KEYS = ("partial_rotary_factor",)
_CONFIG_KEYS_NOT_IDENTITY = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")
_FINGERPRINT_BLOCKS = 64  # 4 KiB samples of each weight file's data (see base_model_fingerprint)
_FINGERPRINT_BLOCK = 4096


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KDError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}): restore or re-create it") from None
    except UnicodeDecodeError:
        raise KDError(f"{what} {path} is not UTF-8 text: restore or re-create it") from None


def read_raw_config(model_dir: str | os.PathLike) -> dict:
    """config.json as written (a JSON object), KDError naming the file otherwise."""
    d = Path(model_dir)
    if not d.is_dir():
        raise KDError(f"model directory not found: {d}" if not d.exists() else f"model path {d} is a file, "
                      "not a model directory")
    p = d / "config.json"
    if not p.is_file():
        raise KDError(f"{d} is not a model directory: config.json missing")
    cfg = _read_json(p, "model config")
    if not isinstance(cfg, dict):
        raise KDError(f"model config {p} must be a JSON object")
    return cfg


def _model_args_class(config: dict, where: str) -> type:
    if not isinstance(config.get("model_type"), str):
        raise KDError(f"{where}/config.json has no model_type: not an mlx-lm model directory")
    try:
        return _get_classes(config)[1]
    except ValueError as e:
        raise KDError(f"{where}/config.json: {str(e).splitlines()[0]} (mlx-lm has no model_type "
                      f"{config['model_type']!r})") from None


def normalise_config(config: dict, model_dir: str | os.PathLike = "", check_required: bool = True) -> dict:
    """A copy of `config` that mlx-lm 0.32 reads as transformers meant it, or KDError.

    `rope_parameters` (transformers 5) becomes `rope_theta` (+ `rope_scaling` for a non-default rope type, +
    `partial_rotary_factor`) when the model class does not read `rope_parameters` itself; values that disagree with
    existing top-level keys, per-layer-type rope dicts and keys with no mlx-lm counterpart are refused. With
    `check_required`, a field the model class needs and the config lacks is named (mlx-lm raises a TypeError)."""
    where = str(model_dir) or "model"
    cfg = json.loads(json.dumps(config))
    args_cls = _model_args_class(cfg, where)
    fields = {f.name: f for f in dataclasses.fields(args_cls)}
    rp = cfg.get("rope_parameters")
    if rp is not None and "rope_parameters" not in fields:
        if not isinstance(rp, dict) or "rope_theta" not in rp:
            raise KDError(f"{where}/config.json: rope_parameters {rp!r} cannot be mapped to rope_theta/rope_scaling "
                          f"for mlx-lm's {cfg['model_type']} (per-layer rope?): refusing to run with a wrong rope base")
        theta = float(rp["rope_theta"])
        if "rope_theta" in cfg and float(cfg["rope_theta"]) != theta:
            raise KDError(f"{where}/config.json: rope_theta {cfg['rope_theta']} disagrees with "
                          f"rope_parameters.rope_theta {theta}: fix one of them")
        cfg["rope_theta"] = theta
        rest = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type", "type")}
        for key in _TOP_LEVEL_ROPE_KEYS:
            if key in rest:
                value = rest.pop(key)
                if key not in fields:
                    raise KDError(f"{where}/config.json: rope_parameters.{key} has no counterpart in mlx-lm's "
                                  f"{cfg['model_type']}: refusing to run with a wrong rope")
                if key in cfg and cfg[key] != value:
                    raise KDError(f"{where}/config.json: {key} {cfg[key]} disagrees with rope_parameters.{key} "
                                  f"{value}: fix one of them")
                cfg[key] = value
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype not in (None, "default"):
            if "rope_scaling" not in fields:
                raise KDError(f"{where}/config.json: rope type {rtype!r} but mlx-lm's {cfg['model_type']} has no "
                              f"rope scaling: refusing to run with a wrong rope")
            scaling = dict(rest, type=rtype, rope_type=rtype)
            if cfg.get("rope_scaling") not in (None, scaling):
                raise KDError(f"{where}/config.json: rope_scaling {cfg['rope_scaling']} disagrees with "
                              f"rope_parameters {rp}: fix one of them")
            cfg["rope_scaling"] = scaling
        elif rest:
            raise KDError(f"{where}/config.json: rope_parameters key(s) {', '.join(sorted(rest))} have no "
                          f"counterpart in mlx-lm's {cfg['model_type']}: refusing to run with a wrong rope")
        cfg.pop("rope_parameters")
    if check_required and args_cls.from_dict.__func__ is BaseModelArgs.from_dict.__func__:
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and n not in cfg]
        if missing:
            raise KDError(f"{where}/config.json lacks {', '.join(missing)}, required by mlx-lm's "
                          f"{cfg['model_type']}: add {'it' if len(missing) == 1 else 'them'} to config.json")
    return cfg


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """config.json of `model_dir`, normalised for mlx-lm (see `normalise_config`)."""
    return normalise_config(read_raw_config(model_dir), model_dir)


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("model*.safetensors"))


def check_safetensors(path: Path, fix: str) -> None:
    """A safetensors file whose header parses and whose tensors lie inside the file (a cut download or a
    damaged file would otherwise surface as a RuntimeError from deep inside mx.load); KDError naming it and `fix`."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise KDError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0] or type(e).__name__}): "
                      f"{fix}") from None
    if 8 + n + end > size:
        raise KDError(f"{path} is cut short ({size} bytes, its header needs {8 + n + end}): {fix}")


def base_model_fingerprint(model_dir: str | os.PathLike) -> str:
    """16 hex chars that identify a base model's weights: sha256 over the normalised config (canonical JSON, without
    the keys a re-save changes: a transformers-5 re-save has the fingerprint of the original) and, per
    `model*.safetensors` file (by name), its size, its header and 64 evenly spaced 4 KiB samples of its data.

    Headers alone are equal for two students of the same shape; the samples tell their weights apart (two
    trainings or initialisations differ in every block) while reading ~256 KiB per file, not the whole model."""
    d = Path(model_dir)
    h = hashlib.sha256()
    config = {k: v for k, v in read_model_config(d).items() if k not in _CONFIG_KEYS_NOT_IDENTITY}
    h.update(json.dumps(config, sort_keys=True).encode())
    files = _weight_files(d)
    if not files:
        raise KDError(f"{d} has no model*.safetensors weights")
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise KDError(f"{f} is not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise KDError(f"{f} is not a safetensors file (header longer than the file)")
            h.update(f.name.encode() + struct.pack("<Q", size) + head + fh.read(n))
            start, length = 8 + n, size - 8 - n
            if length <= _FINGERPRINT_BLOCKS * _FINGERPRINT_BLOCK:
                h.update(fh.read())
                continue
            step = (length - _FINGERPRINT_BLOCK) / (_FINGERPRINT_BLOCKS - 1)
            for i in range(_FINGERPRINT_BLOCKS):
                fh.seek(start + int(i * step))
                h.update(fh.read(_FINGERPRINT_BLOCK))
    return h.hexdigest()[:16]


def read_adapter_config(adapters: str | os.PathLike) -> tuple[Path, dict]:
    """An adapters directory in mlx-lm's format (adapters.safetensors + adapter_config.json) and its config."""
    d = Path(adapters).expanduser()
    if not d.is_dir():
        raise KDError(f"adapters directory not found: {d}" if not d.exists() else
                      f"adapters path {d} is a file: give the directory holding adapters.safetensors (e.g. RUN/best)")
    for name in ("adapters.safetensors", "adapter_config.json"):
        if not (d / name).is_file():
            raise KDError(f"{d} is not an mlx-lm adapters directory: {name} missing")
    cfg = _read_json(d / "adapter_config.json", "adapter config")
    check_safetensors(d / "adapters.safetensors", "re-run training or give the run's best/ directory")
    if not isinstance(cfg, dict):
        raise KDError(f"adapter config {d / 'adapter_config.json'} must be a JSON object")
    if cfg.get("fine_tune_type", "lora") != "full":
        missing = [k for k in ("num_layers", "lora_parameters") if k not in cfg]
        if missing:
            raise KDError(f"adapter config {d / 'adapter_config.json'} lacks {', '.join(missing)}")
    return d, cfg


def check_adapters_base(adapters_dir: Path, adapter_cfg: dict, model_dir: Path) -> None:
    """Refuse adapters trained on another base model: adapter_config.json's `base_model_fingerprint` (written at
    training time) must equal `model_dir`'s. Adapters without it (older runs, mlx-lm's own trainer) are checked
    against the model their config names ("model") when that directory still exists; otherwise they pass."""
    want = adapter_cfg.get(FINGERPRINT_KEY)
    named = adapter_cfg.get("model")
    if want is None and isinstance(named, str) and Path(named).expanduser().is_dir():
        named_dir = Path(named).expanduser()
        if named_dir.resolve() == Path(model_dir).resolve():
            return
        try:
            want = base_model_fingerprint(named_dir)
        except KDError:
            return  # the named directory is no longer a model: nothing to compare with
    if want is None:
        return
    got = base_model_fingerprint(model_dir)
    if got != want:
        raise KDError(f"adapters {adapters_dir} were trained on another base model (fingerprint {want}"
                      f"{f', {named}' if named else ''}), not {model_dir} ({got}): give the student they were "
                      f"trained on")


def load_model(model_dir: str | os.PathLike, *, adapters: str | os.PathLike | None = None, lazy: bool = False,
               trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """mlx-lm's `load_model` on the normalised config (passed as its `model_config` overrides), then LoRA / DoRA /
    full adapters (mlx-lm's format, checked against the base fingerprint). Every failure is a one-line KDError."""
    d = Path(model_dir)
    raw = read_raw_config(d)
    cfg = normalise_config(raw, d)
    overrides = {k: v for k, v in cfg.items() if raw.get(k) != v}
    if not _weight_files(d):
        raise KDError(f"{d} is not a model directory: no model*.safetensors weights")
    for f in _weight_files(d):
        check_safetensors(f, "re-download or re-convert the model")
    try:
        model, config = mlx_lm_load_model(d, lazy=lazy, model_config=overrides, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise KDError(f"cannot load model {d}: {str(e).strip(chr(39)).splitlines()[0]}") from None
    if "rope_parameters" in config and "rope_parameters" not in cfg:
        config.pop("rope_parameters")  # mapped onto the classic keys above
    if adapters is not None:
        a, acfg = read_adapter_config(adapters)
        check_adapters_base(a, acfg, d)
        try:
            model = load_adapters(model, str(a))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            lines = str(e).strip("'\"").splitlines() or [type(e).__name__]
            detail = lines[0] + (f" {lines[1].strip()}" if len(lines) > 1 else "")
            raise KDError(f"adapters {a} do not fit model {d}: {detail}") from None
    return model, dict(config)


# ------------------------------------------------------------------------------------------------ model structure
def head_split(model: nn.Module) -> tuple[Callable, Callable] | None:
    """(backbone(tokens, cache=None) -> hidden, head(hidden) -> logits) for mlx-lm models shaped `model.model` + `lm_head`
    (or tied embeddings); None when the model does not look like that or the split does not reproduce
    `model(tokens)` (e.g. logit soft-capping), in which case the reference path is used."""
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    if "lm_head" in model:
        head = model.lm_head
    elif hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        head = inner.embed_tokens.as_linear
    else:
        return None

    def backbone(tokens: mx.array, cache: list | None = None) -> mx.array:
        return inner(tokens, cache)

    # numerical check on a tiny input: the split must equal the model's own forward. In eval mode: with LoRA
    # dropout active the two forwards would differ, and would draw from the RNG (a resumed run must not)
    was_training = model.training
    model.eval()
    try:
        x = mx.array([[1, 2, 3]], dtype=mx.int32)
        ref, fast = model(x), head(backbone(x))
        if ref.shape != fast.shape or not mx.allclose(ref, fast, rtol=1e-4, atol=1e-4).item():
            return None
    except Exception:  # any architecture whose backbone does not take (tokens, cache)
        return None
    finally:
        model.train(was_training)
    return backbone, head
