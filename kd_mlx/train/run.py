"""Orchestration: config defaults, preparing a run (data, splits, guards, store, tokenizers, examples), training,
and the hyper-parameter sweep."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..store import TOKENIZER_DIR, store_tokenizer
from ..utils import KDError, write_json_atomic

# Every key of configs/train_*.yaml (comments there); flags override the YAML, which overrides these.
DEFAULTS: dict[str, Any] = {
    # inputs / outputs
    "student": None, "store": None, "data": None, "splits": None, "out": None, "teacher_tokenizer": None,
    "train_split": "train", "val_split": "val", "eval_splits": ["val", "test"],
    "max_train_questions": None, "max_val_questions": None,
    # prompts
    "shots": None, "max_seq_len": 2048,
    # student and fine-tuning
    "dtype": "float32", "fine_tune_type": "lora", "num_layers": -1, "lora_rank": 8, "lora_scale": 20.0,
    "lora_dropout": 0.0, "lora_keys": None,
    # objective
    "answer_weight": 1.0, "kd_weight": 0.5, "ce_weight": 0.5, "temperature": 2.0, "ce_over": "vocab",
    "kd_max_positions": 64, "kd_tail": "bucket", "kd_temperature": 1.0, "kd_align": "bytes",
    # optimisation
    "steps": 500, "batch_size": 4, "eval_batch_size": None, "grad_accumulation": 1, "grad_checkpoint": False,
    "compile": True, "fast_head": True, "pad_to": 32, "learning_rate": 1e-4, "warmup_steps": 20,
    "min_lr_ratio": 0.1, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
    "max_grad_norm": 1.0, "seed": 0,
    # validation, checkpoints
    "eval_every": 50, "best_metric": "val_loss", "patience": 5, "save_every": 50, "keep_checkpoints": 3,
    # test hook: poison this step's batch with NaN to exercise the non-finite-loss stop
    "debug_nan_at_step": None,
}
REQUIRED = ("student", "store", "data", "splits", "out")


def check_config(cfg: dict) -> None:
    missing = [k for k in REQUIRED if not cfg.get(k)]
    if missing:
        raise KDError(f"missing required setting(s): {', '.join('--' + k for k in missing)}")
    for k in ("answer_weight", "kd_weight", "ce_weight"):
        if not (isinstance(cfg[k], (int, float)) and cfg[k] >= 0 and math.isfinite(cfg[k])):
            raise KDError(f"{k} must be a finite number >= 0, got {cfg[k]!r}")
    if not (cfg["answer_weight"] or cfg["kd_weight"] or cfg["ce_weight"]):
        raise KDError("all loss weights are 0: nothing to train")
    for k in ("temperature", "kd_temperature"):
        if not (float(cfg[k]) > 0 and math.isfinite(float(cfg[k]))):
            raise KDError(f"{k} must be a finite number > 0, got {cfg[k]}")
    if cfg["best_metric"] not in ("val_loss", "val_acc"):
        raise KDError(f"best_metric must be val_loss or val_acc, got {cfg['best_metric']!r}")
    if cfg.get("kd_tail", "bucket") not in ("bucket", "renorm"):
        raise KDError(f"kd_tail must be bucket or renorm, got {cfg['kd_tail']!r}")
    if cfg.get("kd_align", "bytes") not in ("bytes", "chars"):
        raise KDError(f"kd_align must be bytes or chars, got {cfg['kd_align']!r}")
    if cfg["ce_over"] not in ("vocab", "choices"):
        raise KDError(f"ce_over must be vocab or choices, got {cfg['ce_over']!r}")
    for k in ("steps", "batch_size", "eval_every", "save_every", "grad_accumulation", "pad_to"):
        if int(cfg[k]) < 1:
            raise KDError(f"{k} must be >= 1, got {cfg[k]}")


@dataclass
class Prepared:
    cfg: dict
    train: list
    val: list
    letter_ids: list[int]
    student_path: Path
    store_manifest: dict


def _teacher_tokenizer(cfg: dict, store):
    """The teacher tokenizer the store carries (STORE/tokenizer/); `teacher_tokenizer` overrides it and must have
    the store's fingerprint. A store written without tokenizer files falls back to its identity's "teacher"
    directory."""
    tok = store_tokenizer(store.path, store.identity, cfg.get("teacher_tokenizer"))
    if tok is None and store.identity.get("teacher") and Path(str(store.identity["teacher"])).is_dir():
        tok = store_tokenizer(store.path, store.identity, store.identity["teacher"])
    if tok is None:
        raise KDError(f"store {store.path} carries no teacher tokenizer ({TOKENIZER_DIR}/): pass the teacher's with "
                      f"--teacher-tokenizer DIR, or re-dump with this kd_mlx")
    return tok


def prepare(cfg: dict, progress: bool = True) -> Prepared:
    """Load data + splits (contamination guard first), the store (identity + per-prompt check), tokenizers,
    and build the training and validation examples."""
    from ..data import check_no_leak, load_cmmlu, load_splits, split_questions
    from ..evaluate import answer_token_ids
    from ..store import TopKStore
    from ..tokenizer import load_tokenizer
    from ..utils import resolve_model_path
    from .examples import build_examples, check_store_identity

    check_config(cfg)
    splits = load_splits(cfg["splits"])
    cmmlu = load_cmmlu(cfg["data"])
    train_q = split_questions(cmmlu, splits, cfg["train_split"])
    # the guard runs on the full training split, before any truncation or model loading
    if cfg["train_split"] in cfg["eval_splits"]:
        raise KDError(f"train_split {cfg['train_split']!r} is an evaluation split ({', '.join(cfg['eval_splits'])}): "
                      f"refusing to train on it")
    check_no_leak([q.id for q in train_q], splits, list(cfg["eval_splits"]))
    val_q = split_questions(cmmlu, splits, cfg["val_split"]) if cfg.get("val_split") else []
    if cfg.get("max_train_questions"):
        train_q = train_q[: int(cfg["max_train_questions"])]
    if cfg.get("max_val_questions"):
        val_q = val_q[: int(cfg["max_val_questions"])]
    if not train_q:
        raise KDError(f"split {cfg['train_split']!r} has no questions")
    store = TopKStore(cfg["store"])
    teacher_tok = _teacher_tokenizer(cfg, store)
    check = check_store_identity(store, teacher_tok, cfg)
    cfg["shots"] = check.shots
    student_path = resolve_model_path(cfg["student"])
    student_tok = load_tokenizer(student_path)
    letter_ids = answer_token_ids(student_tok)
    train = build_examples(train_q, cmmlu, store, teacher_tok, student_tok, cfg, check, progress, "train")
    val = build_examples(val_q, cmmlu, store, teacher_tok, student_tok, cfg, check, progress, "val") if val_q else []
    manifest = dict(store.manifest)
    store.close()
    return Prepared(cfg, train, val, letter_ids, student_path, manifest)


def train_prepared(prep: Prepared, cfg: dict, resume: bool = False, progress: bool = True, on_step=None,
                   group="auto") -> dict:
    """Load the student, set up its adapters, train; rank 0 writes RUN/config.json first.

    `group`: the data-parallel `mx.distributed` group ("auto": the launched world, None when single-process)."""
    import mlx.core as mx

    from .distributed import check_ranks_agree, digest, examples_digest, rank_of, world
    from .loop import train_loop
    from .model import load_student, setup_trainable, trainable_parameter_count

    if group == "auto":
        group = world()
    run = Path(cfg["out"])
    check_ranks_agree(group, config=digest({k: v for k, v in cfg.items() if k in DEFAULTS}),
                      store=digest(prep.store_manifest), train_examples=examples_digest(prep.train),
                      val_examples=examples_digest(prep.val))
    mx.random.seed(int(cfg["seed"]))  # the adapters' initialisation (the same on every rank)
    model, _, _ = load_student(str(prep.student_path), cfg["dtype"])
    acfg = setup_trainable(model, cfg)
    acfg["model"] = str(cfg["student"])
    if rank_of(group) == 0:
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / "config.json", {**cfg, "trainable_parameters": trainable_parameter_count(model),
                                                "n_train": len(prep.train), "n_val": len(prep.val),
                                                "ranks": group.size() if group is not None else 1})
    return train_loop(model, acfg, prep.train, prep.val, prep.letter_ids, cfg, run, resume=resume,
                      on_step=on_step, progress=progress, group=group)


def run_training(cfg: dict, resume: bool = False, progress: bool = True, on_step=None) -> dict:
    prep = prepare(cfg, progress)
    return train_prepared(prep, prep.cfg, resume, progress, on_step)


# ------------------------------------------------------------------------------------------------ sweep


def parse_grid(items: tuple[str, ...] | list[str]) -> dict[str, list]:
    """`["temperature=1,2", "answer_weight=0.5,0.9"]` -> {"temperature": [1, 2], ...} (YAML scalars)."""
    import yaml

    grid: dict[str, list] = {}
    for it in items:
        if "=" not in it:
            raise KDError(f"--grid wants KEY=V1,V2,..., got {it!r}")
        k, vs = it.split("=", 1)
        k = k.strip()
        if k not in DEFAULTS:
            raise KDError(f"--grid key {k!r} is not a training setting")
        vals = [yaml.safe_load(v) for v in vs.split(",") if v.strip()]
        if not vals:
            raise KDError(f"--grid {k} has no values")
        grid[k] = vals
    if not grid:
        raise KDError("give at least one --grid KEY=V1,V2")
    return grid


def run_sweep(cfg: dict, grid: dict[str, list], progress: bool = True) -> list[dict]:
    """Short trials over the grid (examples built once), ranked by best validation accuracy; writes
    OUT/sweep.json and each trial's run under OUT/trial_NNN/."""
    out = Path(cfg["out"])
    base = dict(cfg)
    base["best_metric"] = "val_acc"
    if any(k in grid for k in ("kd_weight",)) and not base["kd_weight"]:
        base["kd_weight"] = max(grid["kd_weight"])  # examples need KD targets if any trial uses them
    prep = prepare(dict(base), progress)
    if not prep.val:
        raise KDError("a sweep ranks trials by validation accuracy: the val split is empty")
    keys = list(grid)
    trials = []
    for n, values in enumerate(itertools.product(*(grid[k] for k in keys))):
        tcfg = {**prep.cfg, **dict(zip(keys, values)), "out": str(out / f"trial_{n:03d}")}
        check_config(tcfg)
        summary = train_prepared(prep, tcfg, progress=progress)
        rows = [json.loads(ln) for ln in (Path(tcfg["out"]) / "metrics.jsonl").read_text().splitlines() if ln]
        vals = [r for r in rows if r["kind"] == "val"]
        best = max(vals, key=lambda r: (r["val_acc"], -r["val_loss"])) if vals else {}
        trials.append({"trial": n, "params": dict(zip(keys, values)), "val_acc": best.get("val_acc"),
                       "val_loss": best.get("val_loss"), "best_step": best.get("step"), "run": tcfg["out"],
                       "stopped": summary.get("stopped")})
    trials.sort(key=lambda t: (-(t["val_acc"] or 0.0), t["val_loss"] if t["val_loss"] is not None else 1e30))
    for rank, t in enumerate(trials, 1):
        t["rank"] = rank
    write_json_atomic(out / "sweep.json", {"grid": grid, "steps": prep.cfg["steps"], "trials": trials})
    return trials


def format_sweep_table(trials: list[dict]) -> str:
    keys = list(trials[0]["params"]) if trials else []
    head = ["rank", *keys, "val_acc", "val_loss", "best_step"]
    rows = [[str(t["rank"]), *(str(t["params"][k]) for k in keys),
             "-" if t["val_acc"] is None else f"{t['val_acc']:.4f}",
             "-" if t["val_loss"] is None else f"{t['val_loss']:.4f}", str(t["best_step"])] for t in trials]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])
