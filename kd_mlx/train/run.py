"""Orchestration: preparing a run (data, splits, guards, store, tokenizers, examples), the run directory rule,
training with the distillation objective, and the hyper-parameter sweep."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import yaml

from ..data import answer_token_ids, check_no_leak, load_cmmlu, load_splits, split_questions
from ..store import TOKENIZER_DIR, TopKStore, store_tokenizer
from ..tokenizer import load_tokenizer
from ..utils import KDError, describe_dir, resolve_model_path, write_json_atomic, write_output_marker
from .batches import BatchStream, eval_batches
from .config import REQUIRED, RUN_FORMAT, TrainConfig, defaults
from .distributed import check_ranks_agree, digest, examples_digest, rank_of, world
from .examples import build_examples, check_store_identity
from .loop import LossFn, TrainingCallback, latest_checkpoint, train_loop
from .model import (
    FINGERPRINT_KEY,
    base_model_fingerprint,
    check_adapter_base,
    load_student,
    setup_trainable,
    trainable_parameter_count,
)
from .objective import head_split, objective

DEFAULTS = defaults()  # every setting's default as a dict (= configs/train_phi15.yaml)
# settings a resumed run may change: how far it goes (and `shots` left null = "what the store says")
RESUMABLE_CHANGES = ("steps",)
TRAIN_KIND = "train"  # the output-directory kind of a run directory (kd_mlx.utils output marker)


def as_config(cfg: TrainConfig | dict) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)


def check_required(cfg: TrainConfig) -> None:
    missing = [k for k in REQUIRED if not getattr(cfg, k)]
    if missing:
        raise KDError(f"missing required setting(s): {', '.join('--' + k.replace('_', '-') for k in missing)}")


@dataclass
class Prepared:
    cfg: TrainConfig
    train: list
    val: list
    letter_ids: list[int]
    student_path: Path
    store_manifest: dict


# ------------------------------------------------------------------------------------------------ run directory


def read_run_config(run: str | Path) -> dict:
    """The settings recorded in RUN/config.json (validated); one-line errors for a missing or broken file."""
    f = Path(run) / "config.json"
    if not f.is_file():
        raise KDError(f"cannot resume {run}: no config.json there (not a kd_mlx.train run directory)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"cannot resume {run}: {f} is not valid JSON ({e}); start a new run with another --out") from None
    if not isinstance(data, dict) or data.get("format", RUN_FORMAT) != RUN_FORMAT:
        raise KDError(f"cannot resume {run}: {f} is not a kd_mlx.train run config")
    names = {fl.name for fl in fields(TrainConfig)}
    settings = {k: v for k, v in data.items() if k in names}
    try:
        TrainConfig.from_dict(settings)
    except KDError as e:
        raise KDError(f"cannot resume {run}: {f}: {e}") from None
    return settings


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """The output-directory rule: RUN is new (or empty), or, with resume, a kd_mlx.train run made with the same
    settings (only `steps` may change); anything else is refused with one line naming what is there. RUN never
    is, contains or lies inside an input."""
    out = Path(cfg.out).resolve()
    for key in ("student", "store", "data", "splits", "teacher_tokenizer"):
        value = getattr(cfg, key)
        if value and Path(value).exists():
            p = Path(value).resolve()
            if _within(out, p) or _within(p, out):
                raise KDError(f"--out {cfg.out} overlaps the {key} input {value}: choose a run directory apart "
                              f"from the inputs")
    if out.exists() and not out.is_dir():
        raise KDError(f"--out {cfg.out} is a file, not a run directory")
    if resume:
        recorded = read_run_config(out)
        given = cfg.to_dict()
        differ = [k for k, v in recorded.items()
                  if k not in (*RESUMABLE_CHANGES, "out") and given.get(k) != v and not (k == "shots" and given[k] is None)]
        if differ:
            k = differ[0]
            raise KDError(f"--resume {cfg.out}: {k} is {given[k]!r} but the run was made with {recorded[k]!r} "
                          f"({len(differ)} setting(s) differ; only {', '.join(RESUMABLE_CHANGES)} may change): start "
                          f"a new run with another --out")
        last = latest_checkpoint(out)
        if last is None:
            raise KDError(f"nothing to resume in {cfg.out}: no checkpoint")
        check_adapter_base(last, resolve_model_path(cfg.student))
        return
    if not out.is_dir() or not any(out.iterdir()):
        return
    kind, words = describe_dir(out)
    if kind == TRAIN_KIND or (out / "config.json").is_file():
        last = latest_checkpoint(out)
        where = f"last checkpoint {last.name}" if last else "no checkpoint"
        raise KDError(f"--out {cfg.out} already holds a training run ({where}): continue it with --resume "
                      f"{cfg.out}, or choose a new --out")
    raise KDError(f"--out {cfg.out} holds {words}: choose a new or empty run directory")


# ------------------------------------------------------------------------------------------------ preparing


def _teacher_tokenizer(cfg: TrainConfig, store):
    """The teacher tokenizer the store carries (STORE/tokenizer/); `teacher_tokenizer` overrides it and must have
    the store's fingerprint. A store written without tokenizer files falls back to its identity's "teacher"
    directory."""
    tok = store_tokenizer(store.path, store.identity, cfg.teacher_tokenizer)
    if tok is None and store.identity.get("teacher") and Path(str(store.identity["teacher"])).is_dir():
        tok = store_tokenizer(store.path, store.identity, store.identity["teacher"])
    if tok is None:
        raise KDError(f"store {store.path} carries no teacher tokenizer ({TOKENIZER_DIR}/): pass the teacher's with "
                      f"--teacher-tokenizer DIR, or re-dump with this kd_mlx")
    return tok


def check_student_vocab(student_path: Path, tokenizer) -> None:
    """The student's embedding must have a row for every id its tokenizer can produce."""
    try:
        vocab = json.loads((student_path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"cannot read {student_path / 'config.json'}: {e}") from None
    if isinstance(vocab, int) and vocab < tokenizer.vocab_size:
        raise KDError(f"student {student_path} has vocab_size {vocab} but its tokenizer has {tokenizer.vocab_size} "
                      f"tokens (ids past the embedding): use the tokenizer the student was made with")


def prepare(cfg: TrainConfig | dict, progress: bool = True) -> Prepared:
    """Check the settings and inputs (contamination guard first, then the store's identity, the shots every subject
    needs, the student's vocabulary), then build the training and validation examples."""
    cfg = as_config(cfg)
    check_required(cfg)
    splits = load_splits(cfg.splits)
    cmmlu = load_cmmlu(cfg.data)
    # the guard runs on the full training split, before any truncation or model loading
    guarded = cfg.guarded_splits
    for key in ("train_split", "transfer_split"):
        name = getattr(cfg, key)
        if name in guarded:
            raise KDError(f"{key} {name!r} is evaluated in this run or after it (guarded splits: "
                          f"{', '.join(guarded)}): refusing to train on it")
    train_q = split_questions(cmmlu, splits, cfg.train_split)
    transfer_q = split_questions(cmmlu, splits, cfg.transfer_split) if cfg.transfer_split else []
    check_no_leak([q.id for q in train_q + transfer_q], splits, [g for g in guarded if g in splits])
    val_q = split_questions(cmmlu, splits, cfg.val_split) if cfg.val_split else []
    if cfg.max_train_questions:
        train_q = train_q[: cfg.max_train_questions]
    if cfg.max_val_questions:
        val_q = val_q[: cfg.max_val_questions]
    if not train_q:
        raise KDError(f"split {cfg.train_split!r} has no questions")
    store = TopKStore(cfg.store)
    teacher_tok = _teacher_tokenizer(cfg, store)
    check = check_store_identity(store, teacher_tok, cfg)
    cfg = cfg.replace(shots=check.shots)
    cmmlu.check_shots({q.subject for q in train_q + transfer_q + val_q}, check.shots)
    student_path = resolve_model_path(cfg.student)
    student_tok = load_tokenizer(student_path)
    check_student_vocab(student_path, student_tok)
    letter_ids = answer_token_ids(student_tok)
    train = build_examples(train_q + transfer_q, cmmlu, store, teacher_tok, student_tok, cfg, check, progress,
                           "train")
    val = build_examples(val_q, cmmlu, store, teacher_tok, student_tok, cfg, check, progress, "val") if val_q else []
    manifest = dict(store.manifest)
    store.close()
    return Prepared(cfg, train, val, letter_ids, student_path, manifest)


# ------------------------------------------------------------------------------------------------ training


def distillation_loss(model, cfg: TrainConfig, letter_ids: list[int]) -> LossFn:
    """The objective of kd_mlx.train.objective as the loop's loss (LM head only where the loss reads, when the
    model's head splits off exactly)."""
    split = head_split(model) if cfg.fast_head else None
    letters = mx.array(letter_ids, dtype=mx.int32)
    return lambda m, batch: objective(m, split, batch, letters, cfg)


def train_prepared(prep: Prepared, cfg: TrainConfig | dict, resume: bool = False, progress: bool = True,
                   callback: TrainingCallback | None = None, loss: LossFn | None = None, group="auto") -> dict:
    """Load the student, set up its adapters, train; rank 0 writes RUN/config.json first.

    `loss`: the loss the loop minimises (default: `distillation_loss`); `group`: the data-parallel
    `mx.distributed` group ("auto": the launched world, None when single-process)."""
    cfg = as_config(cfg)
    if group == "auto":
        group = world()
    run = Path(cfg.out)
    check_ranks_agree(group, config=digest(cfg.to_dict()), store=digest(prep.store_manifest),
                      train_examples=examples_digest(prep.train), val_examples=examples_digest(prep.val))
    mx.random.seed(cfg.seed)  # the adapters' initialisation (the same on every rank)
    model, _, _ = load_student(str(prep.student_path), cfg.dtype)
    acfg = setup_trainable(model, cfg)
    acfg[FINGERPRINT_KEY] = base_model_fingerprint(prep.student_path)
    if rank_of(group) == 0:
        run.mkdir(parents=True, exist_ok=True)
        write_output_marker(run, TRAIN_KIND, {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES})
        write_json_atomic(run / "config.json", {"format": RUN_FORMAT, **cfg.to_dict(),
                                                "trainable_parameters": trainable_parameter_count(model),
                                                "n_train": len(prep.train), "n_val": len(prep.val),
                                                "ranks": group.size() if group is not None else 1})
    train_batches = BatchStream(prep.train, cfg.batch_size, cfg.seed, cfg.pad_to)
    val_batches = ((lambda: eval_batches(prep.val, cfg.eval_batch_size or cfg.batch_size, cfg.pad_to))
                   if prep.val else None)
    return train_loop(model, acfg, cfg, run, loss or distillation_loss(model, cfg, prep.letter_ids), train_batches,
                      val_batches, resume=resume, callback=callback, progress=progress, group=group)


def run_training(cfg: TrainConfig | dict, resume: bool = False, progress: bool = True,
                 callback: TrainingCallback | None = None) -> dict:
    cfg = as_config(cfg)
    check_required(cfg)
    check_run_dir(cfg, resume)
    prep = prepare(cfg, progress)
    return train_prepared(prep, prep.cfg, resume, progress, callback)


# ------------------------------------------------------------------------------------------------ sweep


def parse_grid(items: tuple[str, ...] | list[str]) -> dict[str, list]:
    """`["temperature=1,2", "answer_weight=0.5,0.9"]` -> {"temperature": [1, 2], ...} (YAML scalars)."""
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


# settings the examples (prompts, KD targets) are built from
EXAMPLE_SETTINGS = ("kd_temperature", "kd_align", "kd_max_positions", "max_seq_len", "train_split", "val_split",
                    "transfer_split", "max_train_questions", "max_val_questions")


def run_sweep(cfg: TrainConfig | dict, grid: dict[str, list], progress: bool = True) -> list[dict]:
    """Short trials over the grid (examples built once per value of EXAMPLE_SETTINGS), ranked by best validation accuracy; writes
    OUT/sweep.json and each trial's run under OUT/trial_NNN/."""
    cfg = as_config(cfg)
    check_required(cfg)
    out = Path(cfg.out)
    if out.is_dir() and any(out.iterdir()):
        raise KDError(f"sweep --out {out} is not empty: choose a new directory")
    base = cfg.replace(best_metric="val_acc")
    if "kd_weight" in grid and not base.kd_weight:
        base = base.replace(kd_weight=max(grid["kd_weight"]))  # examples need KD targets if any trial uses them
    keys = list(grid)
    trial_cfgs = [base.replace(**dict(zip(keys, values)), out=str(out / f"trial_{n:03d}"))  # validated up front
                  for n, values in enumerate(itertools.product(*(grid[k] for k in keys)))]
    # examples are built once per distinct value of the settings they depend on (the KD targets are tempered and
    # aligned when they are built), so a grid over e.g. kd_temperature never trains on stale targets
    preps: dict[tuple, Prepared] = {}
    trials = []
    for n, tcfg in enumerate(trial_cfgs):
        params = {k: getattr(tcfg, k) for k in keys}
        built_from = tuple((k, repr(getattr(tcfg, k))) for k in EXAMPLE_SETTINGS if k in keys)
        if built_from not in preps:
            preps[built_from] = prepare(base.replace(**{k: getattr(tcfg, k) for k, _ in built_from}), progress)
            if not preps[built_from].val:
                raise KDError("a sweep ranks trials by validation accuracy: the val split is empty")
        prep = preps[built_from]
        summary = train_prepared(prep, tcfg.replace(shots=prep.cfg.shots), progress=progress)
        rows = [json.loads(ln) for ln in (Path(tcfg.out) / "metrics.jsonl").read_text().splitlines() if ln]
        vals = [r for r in rows if r["kind"] == "val"]
        best = max(vals, key=lambda r: (r["val_acc"], -r["val_loss"])) if vals else {}
        trials.append({"trial": n, "params": params, "val_acc": best.get("val_acc"),
                       "val_loss": best.get("val_loss"), "best_step": best.get("step"), "run": tcfg.out,
                       "stopped": summary.get("stopped")})
    trials.sort(key=lambda t: (-(t["val_acc"] or 0.0), t["val_loss"] if t["val_loss"] is not None else 1e30))
    for rank, t in enumerate(trials, 1):
        t["rank"] = rank
    write_json_atomic(out / "sweep.json", {"grid": grid, "steps": base.steps, "trials": trials})
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
