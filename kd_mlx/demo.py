"""The one-command demo: a controlled Chinese task, a tiny teacher that knows it, and the real pipeline on top.

    python -m kd_mlx demo [--out demo_out] [--quick] [--seed 0] [--task majority|missing]
                                                                   (= bash scripts/run_demo.sh [--quick])

What it does, in order (every pipeline step is printed as the command a user would type):
1. writes a *controlled task* in CMMLU's on-disk layout (`task/dev/*.csv`, `task/test/*.csv`, official columns):
   Chinese questions about a list of items (words: fruit/animal/colour/vehicle; numbers written as Chinese
   numerals: one-digit/round ten/round hundred/other two-digit), options A–D = the four kinds. `majority` (the
   default): which kind is most frequent; `missing` (a second skill, for checking that the recipe carries over):
   which kind does not occur. Every question is a new list, so a held-out question needs the skill, not memory.
   With the preset key `transfer_factor` > 0 it also writes a transfer set (`task/transfer/`, Answer empty) that
   the teacher labels and the student learns from the teacher only (0 by default: with the demo's 360 labels a 4x
   transfer set measured 67.0% vs 70.4% without it at equal steps, mean of 3 student seeds, at 4.4x the dump; with
   20 labels per subject it is worth 9-23 points on both skills: benchmarks/kd_effect.py --labels);
2. `python -m kd_mlx.data split` -> splits.json (train/val/test);
3. **demo set-up** (not part of the pipeline): a tiny Kimi-K2-shaped teacher (deepseek_v3 architecture: MLA,
   routed + shared experts; Kimi-format tokenizer from the real cl100k file) is *trained first on questions of its
   own* (`teacher_questions`: generated, none in the task, so it knows more than the student's labels teach; plain
   MLX full fine-tuning of the answer letter; `teacher_lm_weight` > 0 adds the prompt's next tokens, so the
   teacher's distributions over the question text carry knowledge too) so that it has something to teach, then
   quantized to 4 bits and written with mlx-lm's `save_model`; the student is a tiny Phi-shaped model (random
   init, Phi-1.5's real GPT-2 BPE tokenizer);
4. `python -m kd_mlx.teacher dump` (streaming under a memory budget smaller than the teacher) ->
   `python -m kd_mlx.train` -> `python -m kd_mlx.eval` (teacher, baseline student, distilled student, held-out
   test split) -> `python -m kd_mlx.report`.
Artifacts: OUT/task, OUT/splits.json, OUT/models/{teacher_4bit,student}, OUT/store, OUT/run, OUT/results/*,
OUT/report/report.md, OUT/demo.json (figures and seconds per stage).

Measured 2026-11-30 (Linux x86_64, 2 cores, MLX CPU + OpenBLAS), default run (majority task, seed 0; teacher: 600
steps on 4,000 questions of its own at lr 3e-4; student recipe: full fine-tuning, lr 1e-3, 150 steps of 16,
answer-KL T=2 + 0.5 x gold CE over A-D + 0.1 x token KD at the answer position): held-out test accuracy (180
questions) teacher 81.7% | student baseline 22.8% | distilled 70.6% (0.86 x the teacher, 81% of the gap; validation
65.0% -> 76.7% -> 78.3%, best checkpoint at the last evaluation). `--task missing` with the same defaults: teacher
83.9% | baseline 27.8% | distilled 72.2%. `--quick` (the CI test; 400 questions): teacher 83.3% | baseline 25.0% |
distilled 64.2% (120 test questions; validation 60.0% -> 67.5% -> 67.5%). Alone on this 2-core machine the default
run took 4 min 1 s (set-up 62 s, dump 25 s, train 139 s; distilled 71.1% there: BLAS threads change the last bits).
Across student seeds see benchmarks/kd_effect.py: distillation closes ~80% of the gap on 3 of 3 seeds, and gold CE
alone (79.2%) still does better than distillation from this teacher (70.4%).
"""

from __future__ import annotations

import csv
import io
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import click
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

from .data import Question, answer_token_ids, content_hash, load_cmmlu, load_splits, make_splits, split_questions
from .eval import build_prompt_ids
from .testing.models import tiny_kimi_k2_dir, tiny_phi_dir
from .tokenizer import load_tokenizer
from .utils import (KDError, atomic_path, cli_errors, format_bytes, linux_blas_advice, prepare_output_dir,
                    write_json_atomic, write_output_marker)

LETTERS = ("A", "B", "C", "D")

# --------------------------------------------------------------------------------------------------------------
# Part 1: the controlled task
# --------------------------------------------------------------------------------------------------------------

_DIGITS = "零一二三四五六七八九"


def chinese_numeral(n: int) -> str:
    """Arabic -> Chinese numeral as written in primary school: 7 七, 10 十, 15 十五, 20 二十, 37 三十七,
    105 一百零五, 110 一百一十, 999 九百九十九. Defined for 0 <= n <= 9999."""
    if not 0 <= n <= 9999:
        raise ValueError(f"chinese_numeral: {n} out of range 0..9999")
    if n < 10:
        return _DIGITS[n]
    if n < 20:
        return "十" + (_DIGITS[n - 10] if n > 10 else "")
    out = []
    units = ((1000, "千"), (100, "百"), (10, "十"), (1, ""))
    zero_pending = False
    for value, name in units:
        d = (n // value) % 10
        if d == 0:
            if out:
                zero_pending = True
            continue
        if zero_pending:
            out.append("零")
            zero_pending = False
        out.append(_DIGITS[d] + name)
    return "".join(out)


def parse_chinese_numeral(text: str) -> int:
    """Inverse of `chinese_numeral` (used by the tests as a check of the generator)."""
    if text == "零":
        return 0
    total, digit = 0, None
    scale = {"千": 1000, "百": 100, "十": 10}
    for ch in text:
        if ch in _DIGITS:
            digit = _DIGITS.index(ch)
        elif ch in scale:
            total += (1 if digit is None else digit) * scale[ch]
            digit = None
        else:
            raise ValueError(f"not a Chinese numeral: {text!r}")
    return total + (digit or 0)


@dataclass(frozen=True)
class TaskItem:
    """One generated question: `kind` says which skill it tests; `answer` is the letter of the right option."""

    subject: str
    kind: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str


# The skill: "which kind of item is most frequent in this list". The options are the four kinds, always in the same
# order; a question is a list of 5 items with a unique most frequent kind. It generalises to unseen questions (any
# list), and it can be learnt from the whole question at once (count per kind, take the largest), not by position.
WORD_KINDS = {
    "水果": ("苹果", "香蕉", "橘子", "葡萄", "西瓜", "桃子", "梨", "草莓"),
    "动物": ("猫", "狗", "老虎", "兔子", "大象", "猴子", "马", "熊猫"),
    "颜色": ("红色", "蓝色", "绿色", "黄色", "白色", "黑色", "紫色", "灰色"),
    "交通工具": ("汽车", "火车", "飞机", "轮船", "自行车", "公交车", "地铁", "摩托车"),
}
NUMBER_KINDS = {  # Chinese numerals, written by `chinese_numeral`
    "一位数": tuple(range(1, 10)),
    "整十数": tuple(range(20, 100, 10)),
    "整百数": tuple(range(100, 1000, 100)),
    "其他两位数": tuple(n for n in range(21, 100) if n % 10),
}
# the count pattern of a 5-item list with a unique largest count (largest first)
_PATTERNS = ((5, 0, 0, 0), (4, 1, 0, 0), (3, 2, 0, 0), (3, 1, 1, 0), (2, 1, 1, 1))


def _majority_question(rng: random.Random, kinds: dict[str, tuple], stem: str, show) -> tuple[str, tuple, str]:
    names = list(kinds)
    answer = rng.randrange(4)
    pattern = rng.choice(_PATTERNS)
    others = [i for i in range(4) if i != answer]
    rng.shuffle(others)
    items = []
    for kind_index, count in zip([answer, *others], pattern):
        items += [show(rng.choice(kinds[names[kind_index]])) for _ in range(count)]
    rng.shuffle(items)
    return stem + "、".join(items), tuple(names), LETTERS[answer]


def _q_words(rng: random.Random) -> tuple[str, tuple, str]:
    return _majority_question(rng, WORD_KINDS, "下面这组词中，哪一类词最多：", str)


def _q_numbers(rng: random.Random) -> tuple[str, tuple, str]:
    return _majority_question(rng, NUMBER_KINDS, "下面这组数中，哪一类数最多：", chinese_numeral)


# The second skill (a task the recipe was not tuned on): "which kind is missing from this list". Six items drawn
# from exactly three of the four kinds (each at least once); the answer is the fourth kind. The options are the
# four kinds, as in the majority task, but the skill is presence, not frequency.
_MISSING_PATTERNS = ((4, 1, 1), (3, 2, 1), (2, 2, 2))


def _missing_question(rng: random.Random, kinds: dict[str, tuple], stem: str, show) -> tuple[str, tuple, str]:
    names = list(kinds)
    answer = rng.randrange(4)
    present = [i for i in range(4) if i != answer]
    rng.shuffle(present)
    items = []
    for kind_index, count in zip(present, rng.choice(_MISSING_PATTERNS)):
        items += [show(rng.choice(kinds[names[kind_index]])) for _ in range(count)]
    rng.shuffle(items)
    return stem + "、".join(items), tuple(names), LETTERS[answer]


def _q_missing_words(rng: random.Random) -> tuple[str, tuple, str]:
    return _missing_question(rng, WORD_KINDS, "下面这组词中，没有出现哪一类词：", str)


def _q_missing_numbers(rng: random.Random) -> tuple[str, tuple, str]:
    return _missing_question(rng, NUMBER_KINDS, "下面这组数中，没有出现哪一类数：", chinese_numeral)


# kind -> (subject, generator). Subject names come from CMMLU's table so the official header
# (以下是关于{subject_zh}的单项选择题…) is built exactly as for the real benchmark.
TASK_KINDS: dict[str, tuple[str, Callable[[random.Random], tuple[str, tuple, str]]]] = {
    "words": ("elementary_chinese", _q_words),
    "numbers": ("elementary_mathematics", _q_numbers),
    "missing_words": ("elementary_commonsense", _q_missing_words),
    "missing_numbers": ("logical", _q_missing_numbers),
}
# a task = the kinds whose questions it holds (one subject each)
TASKS: dict[str, tuple[str, ...]] = {"majority": ("words", "numbers"), "missing": ("missing_words", "missing_numbers")}
DEFAULT_KINDS = TASKS["majority"]


def generate_task(seed: int = 0, n_test: int = 200, n_dev: int = 5,
                  kinds: tuple[str, ...] = DEFAULT_KINDS, stream: str = "") -> dict[str, dict[str, list[TaskItem]]]:
    """Deterministic controlled task: {subject: {"dev": [...], "test": [...]}}, every question distinct.

    The benchmark questions (test/) are later split into train/val/test by `python -m kd_mlx.data split`, as for
    CMMLU: a held-out question is a list never seen in training, so answering it needs the skill, not memory.
    `stream` names an independent sequence of questions from the same seed (the transfer set's)."""
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown:
        raise KDError(f"unknown task kind(s) {unknown}; known: {sorted(TASK_KINDS)}")
    if n_test < 4 or n_dev < 0:
        raise KDError("the task needs at least 4 test questions per subject (and n_dev >= 0)")
    out: dict[str, dict[str, list[TaskItem]]] = {}
    for kind in kinds:
        subject, gen = TASK_KINDS[kind]
        # per kind: adding a kind leaves the others unchanged
        rng = random.Random(f"kd_mlx-demo/{seed}/{kind}" + (f"/{stream}" if stream else ""))
        seen: set[tuple] = set()
        items: list[TaskItem] = []
        while len(items) < n_dev + n_test:
            stem, choices, answer = gen(rng)
            if (stem, choices) in seen:
                continue
            seen.add((stem, choices))
            items.append(TaskItem(subject, kind, stem, choices, answer))  # type: ignore[arg-type]
        out[subject] = {"dev": items[:n_dev], "test": items[n_dev:]}
    return out


def fresh_items(seed: int, per_subject: int, kinds: tuple[str, ...], exclude: set[tuple[str, tuple]],
                stream: str) -> dict[str, list[TaskItem]]:
    """`per_subject` new answered questions per subject from the generator's independent sequence `stream`; a
    question equal to one in `exclude` (question, choices) is skipped."""
    fresh = generate_task(seed, per_subject * 2 + 8, 0, kinds, stream=stream)
    out = {}
    for subject, parts in fresh.items():
        new = [it for it in parts["test"] if (it.question, it.choices) not in exclude][:per_subject]
        if len(new) < per_subject:
            raise KDError(f"could not generate {per_subject} new {subject} questions")
        out[subject] = new
    return out


def transfer_items(seed: int, per_subject: int, kinds: tuple[str, ...],
                   exclude: set[tuple[str, tuple]]) -> dict[str, list[TaskItem]]:
    """A transfer set: `per_subject` new questions per subject, Answer left empty (the teacher labels them), none
    equal to one in `exclude`."""
    return {subject: [replace(it, answer="") for it in items]
            for subject, items in fresh_items(seed, per_subject, kinds, exclude, "transfer").items()}


def write_transfer_task(data_dir: Path, splits_path: Path, out_dir: Path, factor: int, seed: int,
                        labels: int = 0) -> tuple[Path, Path]:
    """A copy of a written task (dev/, test/ as they are; a transfer set it has is not copied) with a transfer set
    of `factor` x the train split's size per subject in `transfer/` (answers empty), and its splits.json:
    train/val/test exactly the original's, plus the split "transfer". Returns (task dir, splits.json). `factor` 0:
    the copy has no transfer set. `labels` > 0: the scarce-label setting: the train split keeps only its first
    `labels` questions per subject (id order; the rest belong to no split) and the transfer set is `factor` x that."""
    out_task = Path(out_dir) / "task"
    if out_task.resolve() == Path(data_dir).resolve() or \
            (Path(out_dir) / "splits.json").resolve() == Path(splits_path).resolve():
        raise KDError(f"write_transfer_task: {out_dir} would overwrite its input {data_dir} or {splits_path}")
    cmmlu = load_cmmlu(data_dir)
    splits = load_splits(splits_path)
    train = split_questions(cmmlu, splits, "train")
    if labels:
        kept = {s: [q for q in train if q.subject == s][:labels] for s in cmmlu.subjects}
        if any(len(qs) < labels for qs in kept.values()):
            raise KDError(f"write_transfer_task: labels={labels} but a subject's train split has fewer questions")
        train = [q for qs in kept.values() for q in qs]
    kinds = tuple(k for k, (subject, _) in TASK_KINDS.items() if subject in cmmlu.subjects)
    for split, part in (("dev", cmmlu.dev), ("test", cmmlu.test)):
        for subject, qs in part.items():
            with atomic_path(out_task / split / f"{subject}.csv") as tmp:
                tmp.write_text(_csv_text([TaskItem(q.subject, "", q.question, tuple(q.choices), q.answer or "")
                                          for q in qs]), encoding="utf-8")
    if factor:
        known = {(q.question, tuple(q.choices)) for qs in (*cmmlu.test.values(), *cmmlu.dev.values()) for q in qs}
        per_subject = factor * max(sum(q.subject == s for q in train) for s in cmmlu.subjects)
        for subject, items in transfer_items(seed, per_subject, kinds, known).items():
            with atomic_path(out_task / "transfer" / f"{subject}.csv") as tmp:
                tmp.write_text(_csv_text(items), encoding="utf-8")
    f = splits["fractions"]
    grown = make_splits(load_cmmlu(out_task), seed=int(splits["seed"]), val=f["val"], test=f["test"])
    if any(grown[s] != splits[s] for s in ("train", "val", "test")):
        raise KDError(f"{splits_path} was not made by `kd_mlx.data split` from {data_dir} (its splits differ)")
    if labels:
        grown["train"] = sorted(q.id for q in train)
        for subject, c in grown["counts"].items():
            c["train"] = sum(q.subject == subject for q in train)
        grown["n_questions"] = sum(len(grown[s]) for s in ("train", "val", "test"))
    write_json_atomic(Path(out_dir) / "splits.json", grown)
    return out_task, Path(out_dir) / "splits.json"


def _csv_text(items: list[TaskItem]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])  # the official header (unnamed index first)
    for i, it in enumerate(items):
        w.writerow([i, it.question, *it.choices, it.answer])
    return buf.getvalue()


def write_task(out_dir: str | Path, seed: int = 0, n_test: int = 200, n_dev: int = 5,
               kinds: tuple[str, ...] = DEFAULT_KINDS, n_transfer: int = 0) -> Path:
    """Write the controlled task as a CMMLU-layout directory: `dev/<subject>.csv`, `test/<subject>.csv`, and with
    `n_transfer` > 0 a transfer set `transfer/<subject>.csv` of that many unlabelled questions per subject."""
    out = Path(out_dir)
    task = generate_task(seed, n_test, n_dev, kinds)
    for subject, splits in task.items():
        for split, items in splits.items():
            with atomic_path(out / split / f"{subject}.csv") as tmp:
                tmp.write_text(_csv_text(items), encoding="utf-8")
    if n_transfer:
        known = {(it.question, it.choices) for parts in task.values() for items in parts.values() for it in items}
        for subject, items in transfer_items(seed, n_transfer, kinds, known).items():
            with atomic_path(out / "transfer" / f"{subject}.csv") as tmp:
                tmp.write_text(_csv_text(items), encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------------------------
# Part 2: demo set-up (NOT part of the pipeline): a teacher that knows the task, a student that does not
# --------------------------------------------------------------------------------------------------------------


def prompt_batches(seqs: list[list[int]], golds: list[int], batch_size: int, rng: random.Random,
                   pad_to: int = 16, lm_positions: int = 0):
    """Endless shuffled, right-padded batches (tokens, last index, gold 0..3, LM positions); lengths rounded up to
    `pad_to` so only a few shapes occur. LM positions: `lm_positions` prompt positions per row drawn uniformly
    (with replacement) below the last one, whose next token is a next-token target, shape (B, lm_positions)."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            extra = list(range(len(seqs)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        L = -(-max(len(seqs[i]) for i in idx) // pad_to) * pad_to
        toks = np.zeros((len(idx), L), np.int32)
        lm_pos = np.zeros((len(idx), lm_positions), np.int32)
        for r, i in enumerate(idx):
            toks[r, : len(seqs[i])] = seqs[i]
            lm_pos[r] = [rng.randrange(len(seqs[i]) - 1) for _ in range(lm_positions)]
        yield (mx.array(toks), mx.array([len(seqs[i]) - 1 for i in idx], dtype=mx.int32),
               mx.array([golds[i] for i in idx], dtype=mx.int32), mx.array(lm_pos))


def _hidden_and_head(model):
    """(backbone(tokens) -> hidden, head(hidden) -> logits) of an mlx-lm model, so the vocab-sized head is applied
    only at the answer position (the head is most of a tiny model's cost with a 100k vocab)."""
    inner = model.model
    head = model.lm_head if "lm_head" in model else inner.embed_tokens.as_linear
    return (lambda t: inner(t, None)), head


def letter_accuracy(model, seqs: list[list[int]], golds: list[int], letter_ids: list[int],
                    batch_size: int = 32) -> float:
    """Official scoring (argmax over the four letter logits at the last position), plain per-batch forward."""
    backbone, head = _hidden_and_head(model)
    lid = mx.array(letter_ids)
    correct = 0
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        L = max(map(len, chunk))
        toks = np.zeros((len(chunk), L), np.int32)
        for r, x in enumerate(chunk):
            toks[r, : len(x)] = x
        h = backbone(mx.array(toks))[mx.arange(len(chunk)), mx.array([len(x) - 1 for x in chunk])]
        pred = mx.argmax(head(h)[:, lid], axis=-1)
        correct += int((np.array(pred) == np.array(golds[s: s + batch_size])).sum())
    return correct / max(1, len(seqs))


def train_letter_model(model, seqs: list[list[int]], golds: list[int], letter_ids: list[int], *, steps: int,
                       learning_rate: float, batch_size: int = 16, seed: int = 0, lm_weight: float = 0.0,
                       lm_positions: int = 16, train_embeddings: bool = False, log_every: int = 0,
                       log=print) -> list[float]:
    """Plain MLX full fine-tuning of the demo teacher: cross-entropy of the gold letter (over the four letter
    logits) at the answer position, plus, with `lm_weight` > 0, `lm_weight` x the next-token cross-entropy (full
    vocabulary) at `lm_positions` random prompt positions per row: trained on whole sequences, the teacher's
    distributions over the question text carry what it knows (token-level KD has something to transfer).
    AdamW, linear warm-up then constant. Returns the loss per step."""
    mx.random.seed(seed)
    backbone, head = _hidden_and_head(model)
    lid = mx.array(letter_ids)
    model.train()
    if not train_embeddings:
        # the 100k-row embedding and head dominate the update cost of a tiny model; random rows are fine features
        model.model.embed_tokens.freeze()
        if "lm_head" in model:
            model.lm_head.freeze()

    def loss_fn(m, toks, last, gold, lm_pos):
        hidden = backbone(toks)
        h = hidden[mx.arange(toks.shape[0]), last]
        loss = nn.losses.cross_entropy(head(h)[:, lid], gold).mean()  # over the four letters (official scoring)
        if lm_weight:
            h_lm = mx.take_along_axis(hidden, lm_pos[..., None], axis=1)
            loss = loss + lm_weight * nn.losses.cross_entropy(head(h_lm), mx.take_along_axis(toks, lm_pos + 1, axis=1)).mean()
        return loss

    warm = max(1, steps // 10)

    def sched(step):  # linear warm-up, then constant
        return learning_rate * mx.minimum(1.0, (step + 1) / warm)

    opt = optim.AdamW(learning_rate=sched, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    batches = prompt_batches(seqs, golds, batch_size, random.Random(seed), lm_positions=lm_positions if lm_weight else 0)
    losses = []
    for step in range(1, steps + 1):
        loss, grads = loss_and_grad(model, *next(batches))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log(f"  step {step}/{steps}  loss {sum(losses[-log_every:]) / log_every:.3f}")
    model.eval()
    return losses


def task_prompts(data_dir: str | Path, splits_path: str | Path, split: str, tokenizer, shots: int,
                 add_bos: bool = False, max_tokens: int = 2048) -> tuple[list[list[int]], list[int]]:
    """Token ids of the official prompts of one split (exactly what kd_mlx.eval builds) and the gold indices."""
    cmmlu = load_cmmlu(data_dir)
    qs = split_questions(cmmlu, load_splits(splits_path), split)
    seqs, _, _, _ = build_prompt_ids(qs, dict(cmmlu.dev), tokenizer, shots, max_tokens, add_bos)
    return seqs, ["ABCD".index(q.answer) for q in qs]


def save_quantized(model, config: dict, src_dir: Path, out_dir: Path, bits: int = 4, group_size: int = 32) -> Path:
    """Quantize with mlx-lm (affine, `bits`) and write it as mlx-lm writes a converted model (safetensors + index +
    config) with the tokenizer files of `src_dir`, like a hub snapshot of an MLX 4-bit model."""
    model, config = quantize_model(model, dict(config), group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    save_model(out_dir, model)
    for f in src_dir.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.suffix in (".model", ".tiktoken")):
            shutil.copyfile(f, out_dir / f.name)
    save_config(config, out_dir / "config.json")
    return out_dir


def teacher_questions(data_dir: Path, per_subject: int, seed: int) -> list[Question]:
    """The demo teacher's own training questions: `per_subject` answered questions per subject of the task at
    `data_dir`, from their own stream of the generator, none equal to a question of the task (dev, test and
    transfer files), so nothing the student is evaluated on, or labelled with, is among them."""
    cmmlu = load_cmmlu(data_dir)
    known = {(q.question, tuple(q.choices))
             for part in (cmmlu.dev, cmmlu.test, cmmlu.transfer) for qs in part.values() for q in qs}
    kinds = tuple(k for k, (subject, _) in TASK_KINDS.items() if subject in cmmlu.subjects)
    return [Question(id=content_hash(it.question, it.choices), subject=subject, split="teacher", index=i,
                     question=it.question, choices=it.choices, answer=it.answer)
            for subject, items in fresh_items(seed, per_subject, kinds, known, "teacher").items()
            for i, it in enumerate(items)]


def build_demo_teacher(out_dir: Path, data_dir: Path, splits_path: Path, *, steps: int, questions: int,
                       learning_rate: float, shots: int, seed: int, lm_weight: float = 0.0, bits: int = 4,
                       log=print) -> dict:
    """Demo set-up: a tiny Kimi-K2-shaped model (deepseek_v3 architecture, Kimi-format tokenizer) trained with
    plain MLX full fine-tuning (the answer letter, plus the prompt's next tokens with `lm_weight`) on its own
    `questions` per subject (`teacher_questions`: a teacher knows more than the user's labelled data), then
    written as 4-bit safetensors. Returns what it measured (accuracy on the task's train and val splits)."""
    tic = time.perf_counter()
    init_dir = tiny_kimi_k2_dir(out_dir.parent / "teacher_init", seed=seed, n_layers=2, hidden=64,
                                n_routed_experts=4, experts_per_tok=2)
    model, config = load_model(init_dir)
    tok = load_tokenizer(init_dir)
    letters = answer_token_ids(tok)
    own = teacher_questions(data_dir, questions, seed)
    own_seqs, _, _, _ = build_prompt_ids(own, dict(load_cmmlu(data_dir).dev), tok, shots, 2048)
    train_seqs, train_gold = task_prompts(data_dir, splits_path, "train", tok, shots)
    val_seqs, val_gold = task_prompts(data_dir, splits_path, "val", tok, shots)
    what = "answer letter + next tokens of the prompt" if lm_weight else "answer letter"
    log(f"  training the teacher on {len(own)} questions of its own (none in the task) for {steps} steps (plain "
        f"MLX, full fine-tuning of the {what})")
    losses = train_letter_model(model, own_seqs, [q.answer_index for q in own], letters, steps=steps,
                                learning_rate=learning_rate, seed=seed, lm_weight=lm_weight,
                                log_every=max(1, steps // 5), log=log)
    acc = {"train": letter_accuracy(model, train_seqs, train_gold, letters),
           "val": letter_accuracy(model, val_seqs, val_gold, letters)}
    save_quantized(model, config, init_dir, out_dir, bits=bits)
    info = {"steps": steps, "questions": len(own), "learning_rate": learning_rate, "lm_weight": lm_weight,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "accuracy_fp32": acc, "bits": bits,
            "seconds": time.perf_counter() - tic}
    log(f"  teacher (fp32, before quantizing): task train split {acc['train']:.1%}, val split {acc['val']:.1%}; "
        f"{bits}-bit shards in {out_dir}")
    return info


# --------------------------------------------------------------------------------------------------------------
# Part 3: the real pipeline, run as a user would run it
# --------------------------------------------------------------------------------------------------------------

# Embedded defaults. `quick` is for CI: fewer questions and steps, answer-position dump only.
PRESETS: dict[str, dict] = {
    # the answer-position dump keeps the demo inside its time; benchmarks/kd_effect.py dumps question positions
    # too (token-level KD), which costs a full-vocabulary log-softmax per question token (~1 s per question here).
    # The teacher learns from its own questions (teacher_questions per subject, none in the task) at teacher_lr:
    # measured (majority task, 2,000 own questions): lr 3e-3 diverges (test 58% -> 23% by step 450), 1e-3 stays
    # near 60%, 3e-4 reaches 87% at 600 steps and holds (85% at 900).
    # transfer_factor: unlabelled questions per train question that the teacher labels (the transfer set).
    # The student recipe (here and in TRAIN_CONFIG) is benchmarks/kd_effect.py's measured best: lr 3e-3 left one
    # student seed per task at a constant answer, 1e-3 did not; batch 16 x 150 steps learns on every seed tried
    "full": {"n_test": 300, "shots": 0, "teacher_steps": 600, "teacher_questions": 2000, "teacher_lr": 3e-4,
             "student_steps": 150, "top_k": 16, "positions": "answer", "student_batch": 16,
             "teacher_lm_weight": 0.0, "transfer_factor": 0,
             "student_shape": {"n_layers": 2, "hidden": 64, "heads": 4}},
    "quick": {"n_test": 200, "shots": 0, "teacher_steps": 600, "teacher_questions": 2000, "teacher_lr": 3e-4,
              "student_steps": 150, "top_k": 8, "positions": "answer", "student_batch": 16,
              "teacher_lm_weight": 0.0, "transfer_factor": 0,
              "student_shape": {"n_layers": 2, "hidden": 64, "heads": 4}},
}

VAL_FRACTION, TEST_FRACTION = 0.1, 0.3  # of the task's questions, per subject (`kd_mlx.data split`)

# The distillation settings the demo passes to `python -m kd_mlx.train --config` (written to OUT/train.yaml). A
# random-init student has no pretrained weights to protect: full fine-tuning instead of LoRA.
TRAIN_CONFIG = {
    "fine_tune_type": "full", "learning_rate": 1e-3, "warmup_steps": 10, "min_lr_ratio": 1.0, "weight_decay": 0.0,
    "answer_weight": 1.0, "kd_weight": 0.1, "ce_weight": 0.5, "temperature": 2.0, "ce_over": "choices",
    "eval_every": 50, "save_every": 100, "patience": 0, "best_metric": "val_acc", "compile": False,
    "max_grad_norm": 1.0,
}


def python_m() -> list[str]:
    return [sys.executable, "-m"]


def run_command(argv: list[str], log=print, cwd: Path | None = None) -> float:
    """Run one pipeline command as a subprocess (printed as a user would type it); KDError if it fails."""
    shown = ["python" if a == sys.executable else a for a in argv]
    log(f"$ {shlex.join(shown)}")
    tic = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - tic
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and "\r" not in ln and not ln.startswith("Warn")]
    for ln in lines[-6:]:
        log(f"    {ln}")
    if proc.returncode != 0:
        raise KDError(f"step failed (exit {proc.returncode}): {shlex.join(shown)}")
    log(f"    ({dt:.1f} s)")
    return dt


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, task_name: str = "majority",
             preset: dict | None = None, log=print, overwrite: bool = False) -> dict:
    """The whole demo: task, set-up (teacher trained + quantized, student built), then the pipeline commands.
    `preset` changes keys of PRESETS (benchmarks). Returns a summary (also written to OUT/demo.json).

    OUT follows the output-directory rule: new or empty, or (with `overwrite`) an earlier demo's output, which is
    removed first so that no stage meets its own previous output."""
    p = {**PRESETS["quick" if quick else "full"], **(preset or {})}
    if task_name not in TASKS:
        raise KDError(f"unknown task {task_name!r}; known: {', '.join(TASKS)}")
    out = Path(out).resolve()
    identity = {"quick": quick, "seed": seed, "task": task_name, "preset": p}
    if prepare_output_dir(out, "demo", identity, overwrite=overwrite) == "replace":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_output_marker(out, "demo", identity)
    task, models = out / "task", out / "models"
    teacher, student = models / "teacher_4bit", models / "student"
    splits, store, run, results, report = (out / "splits.json", out / "store", out / "run", out / "results",
                                           out / "report")
    times: dict[str, float] = {}
    tic0 = time.perf_counter()

    log(f"== 1. the controlled task -> {task}")
    kinds = TASKS[task_name]
    # the transfer set: `transfer_factor` x the train split's questions per subject
    n_transfer = round(p["transfer_factor"] * p["n_test"] * (1 - VAL_FRACTION - TEST_FRACTION))
    write_task(task, seed=seed, n_test=p["n_test"], n_dev=5, kinds=kinds, n_transfer=n_transfer)
    example = next(iter(generate_task(seed, 4, 0, kinds).values()))["test"][0]
    log(f"  {len(kinds)} subjects x {p['n_test']} questions in CMMLU's layout (dev/ test/ CSVs), task {task_name}; "
        f"e.g.\n    {example.question}  "
        f"{' '.join(f'{l}. {c}' for l, c in zip(LETTERS, example.choices))}  -> {example.answer}")
    if n_transfer:
        log(f"  + a transfer set: {n_transfer} unlabelled questions per subject in transfer/ (Answer empty): the "
            f"teacher labels them, the student learns them from the teacher only")

    log(f"== 2. pipeline: leak-free splits -> {splits}")
    times["split"] = run_command([*python_m(), "kd_mlx.data", "split", "--data", str(task), "--out", str(splits),
                                  "--seed", str(seed), "--val", str(VAL_FRACTION), "--test", str(TEST_FRACTION)], log)

    log("== 3. demo set-up (not part of the pipeline): a teacher that knows the task, a student that does not")
    tic = time.perf_counter()
    info = build_demo_teacher(teacher, task, splits, steps=p["teacher_steps"], questions=p["teacher_questions"],
                              learning_rate=p["teacher_lr"], shots=p["shots"], seed=seed,
                              lm_weight=p["teacher_lm_weight"], log=log)
    tiny_phi_dir(student, seed=seed, **p["student_shape"])
    t_bytes = model_bytes(teacher)
    budget = int(t_bytes * 0.6)  # streamed: the teacher never fits whole in the budget
    log(f"  student: tiny Phi-shaped model (random init, real GPT-2 BPE tokenizer) -> {student}")
    times["setup"] = time.perf_counter() - tic

    log(f"== 4. pipeline: teacher dump, streamed under {format_bytes(budget)} (teacher on disk: "
        f"{format_bytes(t_bytes)}) -> {store}")
    dump_splits = "train,val" + (",transfer" if n_transfer else "")
    times["dump"] = run_command([*python_m(), "kd_mlx.teacher", "dump", "--teacher", str(teacher), "--data",
                                 str(task), "--splits", str(splits), "--split", dump_splits, "--shots",
                                 str(p["shots"]), "--top-k", str(p["top_k"]), "--positions", p["positions"],
                                 "--memory-budget", str(budget), "--student-tokenizer", str(student),
                                 "--out", str(store)], log)

    log(f"== 5. pipeline: distil into the student -> {run}")
    cfg_path = out / "train.yaml"
    cfg_path.write_text(yaml.safe_dump({**TRAIN_CONFIG, "steps": p["student_steps"], "batch_size": p["student_batch"],
                                        "transfer_split": "transfer" if n_transfer else None, "seed": seed},
                                       sort_keys=False))
    times["train"] = run_command([*python_m(), "kd_mlx.train", "--config", str(cfg_path), "--student",
                                  str(student), "--store", str(store), "--data", str(task), "--splits", str(splits),
                                  "--teacher-tokenizer", str(teacher), "--out", str(run), "--no-progress"], log)

    log(f"== 6. pipeline: evaluate on the held-out test split -> {results}/{{teacher,baseline,distilled}}")
    common = ["--data", str(task), "--splits", str(splits), "--split", "test", "--shots", str(p["shots"]), "--quiet"]
    evals = {"teacher": ["--model", str(teacher), "--memory-budget", str(budget)],
             "baseline": ["--model", str(student)],
             "distilled": ["--model", str(student), "--adapters", str(run / "best")]}
    for name, args in evals.items():
        times[f"eval_{name}"] = run_command([*python_m(), "kd_mlx.eval", *args, *common, "--out",
                                             str(results / name)], log)

    log(f"== 7. pipeline: report -> {report}")
    times["report"] = run_command([*python_m(), "kd_mlx.report", str(results / "teacher"),
                                   str(results / "baseline"), str(results / "distilled"), "--run", str(run),
                                   "--out", str(report)], log)
    overall = {}
    for name in evals:
        s = json.loads((results / name / "summary.json").read_text(encoding="utf-8"))
        overall[name] = s["overall"]
    summary = {"out": str(out), "quick": quick, "seed": seed, "task": task_name, "preset": p, "teacher_setup": info,
               "teacher_bytes": t_bytes, "memory_budget": budget, "overall": overall, "seconds": times,
               "total_seconds": time.perf_counter() - tic0, "report": str(report / "report.md")}
    write_json_atomic(out / "demo.json", summary)
    log("== result (held-out test split, accuracy %):")
    log(f"  teacher {overall['teacher']:.1f} | student baseline {overall['baseline']:.1f} | "
        f"distilled {overall['distilled']:.1f}   (chance 25.0)")
    log(f"  report: {report / 'report.md'}   total {summary['total_seconds']:.0f} s")
    return summary


@click.command("demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="demo_out", show_default=True, help="Directory for every artifact.")
@click.option("--quick", is_flag=True, help="Short version (CI): fewer questions and steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task", "task_name", type=click.Choice(list(TASKS)), default="majority", show_default=True,
              help="The controlled task: majority (which kind is most frequent) or missing (which kind is absent).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo's output in --out.")
@cli_errors
def demo_cmd(out: str, quick: bool, seed: int, task_name: str, overwrite: bool) -> None:
    """Run the whole pipeline on a controlled task with a tiny Kimi-K2-shaped teacher (no downloads)."""
    if (advice := linux_blas_advice()):
        click.echo(advice, err=True)
    run_demo(out, quick=quick, seed=seed, task_name=task_name, log=lambda s: click.echo(s), overwrite=overwrite)


def main() -> None:
    demo_cmd()


if __name__ == "__main__":
    main()
