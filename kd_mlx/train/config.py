"""The training configuration: one typed dataclass, the single source of every setting's default and help text.

`configs/train_phi15.yaml` lists every field with its default (a test checks that its keys and values equal
`TrainConfig()`'s); the CLI flags take their help text from here. Construction validates every value (type and
range) and fails with one line naming the key, so a bad setting stops the run before any data is read.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Union

from ..utils import KDError

FINE_TUNE_TYPES = ("lora", "dora", "full")
RUN_FORMAT = "kd_mlx.train/1"  # RUN/config.json["format"]: what a training run directory is


def _setting(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
             max: float | None = None, above: float | None = None, below: float | None = None) -> Any:
    """A config field: `default` (lists are copied per instance), its help text and its allowed range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above, "below": below}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- inputs / outputs
    student: str | None = _setting(None, "student model directory or hub id (any mlx-lm architecture)")
    store: str | None = _setting(None, "teacher logits store written by `python -m kd_mlx.teacher dump`")
    data: str | None = _setting(None, "CMMLU directory (dev/ test/, optional transfer/), zip or hub id")
    splits: str | None = _setting(None, "splits.json from `python -m kd_mlx.data split`")
    out: str | None = _setting(None, "run directory (checkpoints, metrics.jsonl, curves.png, best/)")
    teacher_tokenizer: str | None = _setting(
        None, "teacher tokenizer directory; null = the tokenizer the store carries (an override must match it)")
    verify_store: bool = _setting(True, "check the store's shard sha256 against its manifest once per run "
                                        "(--no-verify skips it)")
    train_split: str = _setting("train", "split trained on")
    val_split: str | None = _setting("val", "split for validation loss / A-D accuracy, early stopping and best/")
    eval_splits: list[str] = _setting(
        ["val", "test"], "splits guarded against training (val, test and val_split always are)")
    transfer_split: str | None = _setting(
        None, "split of extra questions (answers optional) trained on the teacher's terms only; null = none")
    max_train_questions: int | None = _setting(None, "use only the first N training questions (null = all)", min=1)
    max_val_questions: int | None = _setting(None, "use only the first N validation questions (null = all)", min=1)
    # ---- prompts
    shots: int | None = _setting(None, "k-shot; null = what the store was dumped with (another value is refused)",
                                 min=0)
    max_seq_len: int = _setting(2048, "student context: longer prompts drop their longest shot (official rule)",
                                min=1)
    # ---- student and fine-tuning (mlx-lm tuner layers)
    dtype: str = _setting("float32", "student weights dtype (float32 is the fast CPU path)",
                          choices=("float32", "float16", "bfloat16"))
    fine_tune_type: str = _setting("lora", "lora | dora | full", choices=FINE_TUNE_TYPES)
    num_layers: int = _setting(-1, "adapt the last N transformer blocks (-1 = all)", min=-1)
    lora_rank: int = _setting(8, "LoRA rank r", min=1)
    lora_scale: float = _setting(20.0, "LoRA scale (mlx-lm's convention: output += scale * x A B)", above=0)
    lora_dropout: float = _setting(0.0, "dropout on the LoRA input", min=0, below=1)
    lora_keys: list[str] | None = _setting(None, "target modules inside a block; null = the model type's default")
    # ---- objective: answer_weight*answer_kl + kd_weight*token_kd + ce_weight*ce
    answer_weight: float = _setting(1.0, "KL(teacher A-D || student A-D) at the answer position (tempered, x T^2)",
                                    min=0)
    kd_weight: float = _setting(0.5, "token-level KL against the aligned teacher top-k (0 = no token targets)",
                                min=0)
    ce_weight: float = _setting(0.5, "cross-entropy on the gold letter (questions without an answer: none)",
                                min=0)
    temperature: float = _setting(2.0, "temperature of the answer KL", above=0)
    ce_over: str = _setting("vocab", "vocab: CE over the whole vocabulary; choices: over the 4 letters only",
                            choices=("vocab", "choices"))
    kd_max_positions: int | None = _setting(64, "token-level targets kept per question (nearest the answer)",
                                            min=1)
    kd_tail: str = _setting("bucket", "bucket: teacher mass outside the top-k is one tail category; renorm: "
                            "rescale the top-k to 1", choices=("bucket", "renorm"))
    kd_temperature: float = _setting(1.0, "temperature of the token-level KL (1 is exact for a top-k store)",
                                     above=0)
    kd_align: str = _setting("bytes", "bytes: align where both tokenizers cut at the same byte; chars: at "
                             "character boundaries only", choices=("bytes", "chars"))
    # ---- optimisation
    steps: int = _setting(500, "optimizer steps", min=1)
    batch_size: int = _setting(4, "questions per micro-batch (global: split over ranks under mlx.launch)", min=1)
    eval_batch_size: int | None = _setting(None, "validation batch size (null = batch_size)", min=1)
    grad_accumulation: int = _setting(1, "micro-batches per optimizer step", min=1)
    grad_checkpoint: bool = _setting(False, "recompute block activations in the backward pass: less memory")
    compile: bool = _setting(True, "mx.compile the training step")
    fast_head: bool = _setting(True, "apply the LM head only at the positions the loss reads")
    pad_to: int = _setting(32, "sequence lengths rounded up to a multiple of this (fewer compiled shapes)", min=1)
    learning_rate: float = _setting(1.0e-4, "peak AdamW learning rate", above=0)
    warmup_steps: int = _setting(20, "linear warm-up from 0", min=0)
    min_lr_ratio: float = _setting(0.1, "cosine decay to learning_rate * min_lr_ratio at `steps`", min=0)
    weight_decay: float = _setting(0.01, "AdamW weight decay", min=0)
    adam_beta1: float = _setting(0.9, "AdamW beta1", min=0, below=1)
    adam_beta2: float = _setting(0.999, "AdamW beta2", min=0, below=1)
    adam_eps: float = _setting(1.0e-8, "AdamW epsilon", above=0)
    max_grad_norm: float | None = _setting(1.0, "clip the global gradient norm (null = no clipping)", above=0)
    seed: int = _setting(0, "adapters' initialisation, batch order, dropout", min=0)
    # ---- validation, checkpoints
    eval_every: int = _setting(50, "validate every N steps (and at the last step)", min=1)
    best_metric: str = _setting("val_loss", "val_loss (lower is better) or val_acc (higher): what best/ and early "
                                "stopping follow", choices=("val_loss", "val_acc"))
    patience: int = _setting(5, "stop after N validations without improvement (0 = never)", min=0)
    save_every: int = _setting(50, "checkpoint every N steps (adapters + optimizer + data position + RNG)", min=1)
    keep_checkpoints: int = _setting(3, "keep the newest N checkpoints (0 = all)", min=0)

    def __post_init__(self) -> None:
        hints = _type_hints()
        for f in fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            _check_range(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        if not (self.answer_weight or self.kd_weight or self.ce_weight):
            raise KDError("all loss weights (answer_weight, kd_weight, ce_weight) are 0: nothing to train")
        if self.num_layers == 0:
            raise KDError("num_layers must be -1 (all) or >= 1, got 0")

    @classmethod
    def from_dict(cls, values: dict, what: str = "config") -> "TrainConfig":
        """From a mapping of settings (YAML, JSON, flags); an unknown key is a one-line error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KDError(f"unknown {what} key(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with `changes` applied (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise KDError(f"unknown config key(s): {', '.join(unknown)}")
        return replace(self, **changes)

    @property
    def guarded_splits(self) -> list[str]:
        """Splits no training question may belong to: eval_splits, the validation split, and always val and test
        (a run's results are reported on them whatever eval_splits says)."""
        out = dict.fromkeys([*self.eval_splits, "val", "test"])
        if self.val_split:
            out[self.val_split] = None
        return list(out)


REQUIRED = ("student", "store", "data", "splits", "out")


def defaults() -> dict[str, Any]:
    """Every setting's default, as a plain dict (what configs/train_phi15.yaml lists)."""
    return TrainConfig().to_dict()


def help_text(name: str) -> str:
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


# ------------------------------------------------------------------------------------------------ validation

_HINTS: dict[str, Any] = {}


def _type_hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    return _HINTS


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a list of names")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` as type `tp` (int, float, bool, str, list[str], or X | None); KDError naming `key` otherwise."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        if value is None:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if value is None:
        raise KDError(f"setting {key} must be {_describe(tp)}, got null")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # a flag or YAML scalar "val,test"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise KDError(f"setting {key} must be a list of names, got {value!r}")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise KDError(f"setting {key} must be {_describe(tp)}, got {value!r}")


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise KDError(f"setting {key} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise KDError(f"setting {key} must be a finite number, got {value}")
    bounds = [(meta.get("min"), lambda b: value >= b, ">="), (meta.get("max"), lambda b: value <= b, "<="),
              (meta.get("above"), lambda b: value > b, ">"), (meta.get("below"), lambda b: value < b, "<")]
    for bound, ok, op in bounds:
        if bound is not None and not ok(bound):
            raise KDError(f"setting {key} must be {op} {bound:g}, got {value}")
