"""Benchmark: does transferring the teacher's attention help the student? (seed stage 3: attention weights)

    python -m kd_mlx demo --out demo_out                                        # task, splits, store, teacher
    nice -n 15 python benchmarks/kd_attention.py --demo demo_out --out /tmp/kd_attention --seeds 0,1,2 \\
        --weights 0,1,4
    nice -n 15 python benchmarks/kd_attention.py --demo demo_out --out /tmp/kd_attention --weights 0,1 \\
        --targets teacher_init                           # the control; runs already in the out log are reused

What is transferred: the attention of the answer position (the last prompt token, where the letter is read) over
the prompt, averaged over heads, for the last layer ("last") or layer by layer ("each", teacher layer i -> student
layer i). Teacher and student tokenize the same prompt text differently (Kimi tiktoken vs GPT-2 BPE), so both are
mapped onto the *common segments* of the text: the spans between byte offsets where both tokenizations cut. A
segment's mass is the exact sum of its tokens' attention on either side (no spreading of a token's mass over
characters). Loss added to the demo recipe (`kd_mlx.demo.TRAIN_CONFIG`, through kd_mlx.train's own loop with an
injected loss; kd_mlx/train and the store are unchanged):

    total = recipe objective + weight · KL(teacher segment attention ‖ student segment attention)

The attention probabilities come from `record_attention`: it swaps the `scaled_dot_product_attention` name that an
mlx-lm family module imports from `mlx_lm.models.base` for an explicit softmax(q·kᵀ·scale + mask)·v that also
keeps the probabilities (differentiable), so any mlx-lm family gives its attention without re-implementing it.
The teacher's is computed once per question (train, val, test) with the demo's 4-bit teacher, dequantized to fp32
(as kd_mlx.eval runs it on CPU). Every arm trains a fresh random-init tiny Phi student (seed = init and batch
order) on the same train split for the same steps; held-out accuracy on the demo's test split by kd_mlx.eval
(official protocol, last-step weights). Diagnostics on the test split: KL(teacher ‖ student) of the segment
attention and top-segment agreement, for the untrained student and each trained one; and what the teacher's
attention says about the task: its mass on the list items, and the share of that mass on the items of the gold
kind against those items' share of the list (attention that tracks the answer would put more there).

Measured 2026-11-30 (Linux x86_64, 2 cores shared with other jobs, MLX CPU + OpenBLAS, OPENBLAS_NUM_THREADS=1), on
the demo run of kd_mlx.demo's defaults (majority task, seed 0: train 360 / val 60 / test 180 questions; teacher
61.1% test). Every arm: the demo recipe (full fine-tuning, lr 1e-3, 150 steps of 16, answer-KL T=2 + 0.5 x gold CE
+ 0.1 x token KD at the answer position), layers=last. Test accuracy (%) per student seed 0 / 1 / 2, and on the
test split: mean KL(teacher ‖ student) of the segment attention, top-segment agreement, the student's mass on the
list items (all against the trained teacher):

    arm                                            seed 0  seed 1  seed 2   mean    KL    top seg  item mass
    untrained student                               22.8    19.4    25.0    22.4   3.34    0.02     0.13
    recipe (w = 0)                                  71.1    65.0    54.4    63.5   6.47    0.03     0.25
    recipe + attention KL, w = 1                    76.7    73.3    66.7    72.2   0.80    0.47     0.36
    recipe + attention KL, w = 4                    64.4    67.2    55.6    62.4   0.74    0.45     0.36
    w = 1 toward the untrained teacher (control)    65.0    65.0    62.8    64.3   4.03    0.00     0.17

The same on the current demo's run (main's kd_mlx.demo defaults: the teacher trained on 2,000 questions of its own,
81.7% test; same student, recipe, splits sizes and steps):

    arm                                            seed 0  seed 1  seed 2   mean    KL    top seg  item mass
    untrained student                               22.8    19.4    25.0    22.4   1.56    0.00     0.13
    recipe (w = 0)                                  70.6    74.4    66.1    70.4   5.58    0.07     0.54
    recipe + attention KL, w = 1                    76.1    78.9    78.9    78.0   0.30    0.42     0.42
    w = 1 toward the untrained teacher (control)    62.8    71.7    67.8    67.4   1.72    0.01     0.17

Teachers (test split; 61.1% / 81.7% teacher): mass on the list items, layer 0 0.25 / 0.27, layer 1 0.37 / 0.40,
the items being 10.6% of the characters; share of the item mass on the gold kind's items (layer 1) 0.67 / 0.68
against their 0.71 share of the item characters; top segment 0.41 / 0.19 of the last layer's mass. Before training
(teacher_init, the same for both): item mass 0.18 / 0.16 (layers 0 / 1), top segment 0.13; KL(trained ‖ init) layer
0 2.8 / 0.5, layer 1 4.4 / 1.9. The recipe arm reproduces benchmarks/kd_effect.py's recipe rows exactly on both runs
(71.1 / 65.0 / 54.4 and 70.6 / 74.4 / 66.1; its attention runs through the recorder too, w = 0); gold CE alone
there: 79.2% on both. 150 steps took 168-285 s per run (machine load 3-6); peak MLX memory 71 MiB in every arm (the
explicit attention of 16 x 4 heads x ~190² is ~10 MB a layer), process peak RSS 0.58 GiB.

Reading: w = 1 gains 8.7 points with the 61% teacher (paired +5.6 / +8.3 / +12.3) and 7.6 with the 81.7% teacher
(+5.5 / +4.5 / +12.8): 6 of 6 seed pairs. The control (the untrained teacher's attention as the target: +0.8 and
-3.0 points) says the gain is the trained teacher's pattern, not attention regularisation as such; item mass alone
does not explain it (with the 81.7% teacher the recipe's student already has more mass on the items than the
teacher); the pattern does not carry the answer (no preference for the gold kind's items). w = 4 (measured with the
61% teacher only) loses the gain, and task learning is slower (validation 25% at step 50 on seed 1); a likely cause,
not measured: the term takes most of the clipped (max_grad_norm 1) step. The second skill does NOT confirm it
(`--task missing` demo, seed 0, main's defaults: teacher 83.9%; `--weights 0,1`): recipe 72.2 / 57.2 / 56.7 (62.0),
w = 1 59.4 / 61.7 / 66.1 (62.4), paired -12.8 / +4.5 / +9.4, with the student's attention moved to the teacher's
(KL 9.18 -> 0.50, top segment 0.00 -> 0.42). So w = 1 is no default: a weight needs more tasks and a deeper
teacher/student pair before it enters the product.

What entering the product would take (not done; kd_mlx/train and the store format are unchanged): `teacher dump
--attention` storing per question the answer row, mean over heads, per layer (float16; Kimi-K2 61 layers x ~800
tokens 5-shot ≈ 100 KB a question; the streaming executor runs mlx-lm's own layer modules inside its stand-ins, so
the same swap should record there, one list per task thread: not tried), an identity key naming the summary; in
train, the common-segment targets built beside `align_record_bytes` in examples.py, a loss in kd_mlx/losses.py with
its reference, and keys `attention_weight` (0 until measured on another task) and `attention_layers` (teacher layer
-> student layer; only last -> last is measured). The student side should compute only the answer row,
softmax(q_answer·Kᵀ), beside the fast SDPA: this recorder's full matrices cost 32 heads x 2048² x 4 B = 512 MB a
layer a row for Phi-1.5 at 2k tokens.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd_mlx.data import load_cmmlu, load_splits, prompt_ids, split_questions  # noqa: E402
from kd_mlx.demo import (NUMBER_KINDS, PRESETS, TRAIN_CONFIG, WORD_KINDS,  # noqa: E402
                         parse_chinese_numeral)
from kd_mlx.eval import evaluate_model, load_eval_model, select_questions  # noqa: E402
from kd_mlx.model_dir import head_split  # noqa: E402
from kd_mlx.store import TopKStore  # noqa: E402
from kd_mlx.testing.models import tiny_phi_dir  # noqa: E402
from kd_mlx.tokenizer import load_tokenizer  # noqa: E402
from kd_mlx.train.batches import BatchArrays  # noqa: E402
from kd_mlx.train.objective import objective  # noqa: E402
from kd_mlx.train.run import DEFAULTS, as_config, prepare, train_prepared  # noqa: E402
from kd_mlx.utils import KDError  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Attention probabilities of any mlx-lm model


def attention_probs(queries: mx.array, keys: mx.array, scale: float, mask, sinks: mx.array | None = None) -> mx.array:
    """softmax(q·kᵀ·scale + mask) with mx.fast.scaled_dot_product_attention's conventions: keys with fewer heads are
    shared by groups of query heads; mask "causal" (aligned to the last key), boolean (False = masked) or additive;
    `sinks` (one logit per head) take part in the softmax and are dropped from the result. (B, Hq, Lq, Lk), fp32."""
    n_q, n_kv = queries.shape[1], keys.shape[1]
    if n_q != n_kv:
        keys = mx.repeat(keys, n_q // n_kv, axis=1)
    scores = (queries.astype(mx.float32) * scale) @ keys.astype(mx.float32).swapaxes(-1, -2)
    neg = mx.array(mx.finfo(mx.float32).min, mx.float32)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        q_len, k_len = scores.shape[-2:]
        mask = mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(k_len)[None]
    if mask is not None:
        scores = mx.where(mask, scores, neg) if mask.dtype == mx.bool_ else scores + mask.astype(mx.float32)
    if sinks is not None:
        sink = mx.broadcast_to(sinks.astype(mx.float32)[None, :, None, None], (*scores.shape[:-1], 1))
        return mx.softmax(mx.concatenate([sink, scores], axis=-1), axis=-1, precise=True)[..., 1:]
    return mx.softmax(scores, axis=-1, precise=True)


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[mx.array]]:
    """Inside the block, every attention call of `model`'s mlx-lm family runs explicitly and appends its
    probabilities (B, H, Lq, Lk) to the yielded list, in call order (layer by layer for one forward). Outputs equal
    mlx-lm's own to float32 rounding (tests/test_attention_kd.py); gradients flow through the recorded arrays."""
    family = sys.modules[type(model).__module__]
    original = getattr(family, "scaled_dot_product_attention", None)
    if original is None:
        raise KDError(f"{family.__name__} does not call mlx_lm.models.base.scaled_dot_product_attention: its "
                      f"attention cannot be recorded this way")
    probs: list[mx.array] = []

    def explicit(queries, keys, values, cache, scale, mask, sinks=None):
        if hasattr(cache, "bits"):
            raise KDError("recording attention needs an unquantized KV cache")
        p = attention_probs(queries, keys, scale, mask, sinks)
        probs.append(p)
        n_q, n_kv = queries.shape[1], values.shape[1]
        if n_q != n_kv:
            values = mx.repeat(values, n_q // n_kv, axis=1)
        return (p @ values.astype(mx.float32)).astype(queries.dtype)

    family.scaled_dot_product_attention = explicit
    try:
        yield probs
    finally:
        family.scaled_dot_product_attention = original


def last_row_attention(probs: list[mx.array], lengths: mx.array) -> mx.array:
    """(layers, B, Lk): each layer's attention of position lengths-1 (the answer position), mean over heads."""
    B, H, _, Lk = probs[0].shape
    idx = mx.broadcast_to((lengths - 1).reshape(B, 1, 1, 1), (B, H, 1, Lk))
    return mx.stack([mx.take_along_axis(p, idx, axis=2)[:, :, 0].mean(axis=1) for p in probs])


def answer_attention(model: nn.Module, seqs: list[list[int]], batch_size: int = 16) -> list[np.ndarray]:
    """Per prompt: (layers, n_tokens) attention of its last token over its tokens, mean over heads."""
    backbone = model.model
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        toks = np.zeros((len(chunk), max(map(len, chunk))), np.int32)
        for r, x in enumerate(chunk):
            toks[r, : len(x)] = x
        lengths = mx.array([len(x) for x in chunk], dtype=mx.int32)
        with record_attention(model) as probs:
            mx.eval(backbone(mx.array(toks), None))
        rows = np.array(last_row_attention(probs, lengths))
        out += [rows[:, r, : len(x)] for r, x in enumerate(chunk)]
    return out


# --------------------------------------------------------------------------------------------------------------
# Common segments of two tokenizations of one text


def byte_ends(tok, ids: list[int]) -> np.ndarray:
    return np.cumsum([len(tok.token_bytes(i)) for i in ids], dtype=np.int64)


def common_segments(t_ends: np.ndarray, s_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Segment index of every teacher and student token, segments = spans between byte offsets where both cut."""
    if t_ends[-1] != s_ends[-1]:
        raise KDError("teacher and student token ids do not cover the same text")
    cuts = np.intersect1d(t_ends, s_ends)
    return np.searchsorted(cuts, t_ends), np.searchsorted(cuts, s_ends), len(cuts)


def segment_mass(att: np.ndarray, seg: np.ndarray, n_seg: int) -> np.ndarray:
    """(layers, n_seg) from (layers, n_tokens) token attention."""
    return np.stack([np.bincount(seg, weights=a, minlength=n_seg) for a in att])


@dataclass
class QuestionAttention:
    qid: str
    text: str
    s_ids: list[int]
    s_seg: np.ndarray  # (n_student_tokens,) segment of each student token
    t_offsets: list[tuple[int, int]]  # teacher tokens' character spans (diagnostics)
    t_att: np.ndarray  # (layers, n_teacher_tokens)
    target: np.ndarray  # (layers, n_seg) teacher segment attention


def teacher_attention(teacher_dir: Path, student_tok, questions: list, dev: dict, shots: int,
                      max_tokens: int) -> dict[str, QuestionAttention]:
    """The teacher's answer-position attention for each question, on the common segments with the student."""
    em = load_eval_model(str(teacher_dir), dtype="float32")  # CPU: dequantized to fp32, as kd_mlx.eval runs it
    t_tok = em.tokenizer
    t_prompts = [prompt_ids(q, dev.get(q.subject, []), t_tok, shots, max_tokens, em.add_bos, offsets=True)
                 for q in questions]
    atts = answer_attention(em.model, [p.ids for p in t_prompts])
    out = {}
    for q, p, att in zip(questions, t_prompts, atts):
        s = prompt_ids(q, dev.get(q.subject, []), student_tok, shots, max_tokens)
        if s.prompt.text != p.prompt.text or p.truncated or s.truncated or em.add_bos:
            raise KDError(f"{q.id}: teacher and student prompts differ; this benchmark needs the same text")
        t_seg, s_seg, n_seg = common_segments(byte_ends(t_tok, p.ids), byte_ends(student_tok, s.ids))
        out[q.id] = QuestionAttention(q.id, p.prompt.text, list(s.ids), s_seg, list(p.offsets), att,
                                      segment_mass(att, t_seg, n_seg))
    return out


# --------------------------------------------------------------------------------------------------------------
# The loss: recipe objective + weight x attention KL


def attention_kl(student_seg: mx.array, target: mx.array, valid: mx.array) -> mx.array:
    """Sum over rows of KL(target ‖ student) over segments; (rows, S) each, `valid` marks real segments."""
    t = mx.where(valid, target, 0.0)
    log_ratio = mx.log(mx.maximum(t, 1e-12)) - mx.log(mx.maximum(student_seg, 1e-12))
    return mx.where(t > 0, t * log_ratio, 0.0).sum()


class AttentionTargets:
    """Teacher segment attention looked up by a batch row's student token ids (the loop's batches carry arrays
    only); arrays padded to the batch: segment of every token (-1 at padding) and the target per segment."""

    def __init__(self, table: dict[str, QuestionAttention], layers: str):
        self.by_ids = {tuple(a.s_ids): a for a in table.values()}
        self.layers = layers

    def batch(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[mx.array, mx.array, mx.array]:
        rows = [self.by_ids[tuple(tokens[b, : lengths[b]].tolist())] for b in range(len(lengths))]
        S = max(r.target.shape[1] for r in rows)
        n_layers = rows[0].target.shape[0] if self.layers == "each" else 1
        seg = np.full(tokens.shape, -1, np.int32)
        target = np.zeros((n_layers, len(rows), S), np.float32)
        for b, r in enumerate(rows):
            seg[b, : len(r.s_seg)] = r.s_seg
            target[:, b, : r.target.shape[1]] = r.target if self.layers == "each" else r.target[-1:]
        return mx.array(seg), mx.array(target), mx.array(np.arange(S)[None] < np.array(
            [r.target.shape[1] for r in rows])[:, None])


def attention_kd_loss(cfg: dict, letter_ids: list[int], targets: AttentionTargets, weight: float) -> Callable:
    """The loop's loss: kd_mlx.train's objective (fast head path) + weight · mean over rows (and layers, with
    "each") of KL(teacher ‖ student) segment attention of the answer position."""
    tcfg = as_config(cfg)
    letters = mx.array(letter_ids, dtype=mx.int32)
    splits: dict[int, object] = {}

    def loss(m: nn.Module, batch: BatchArrays):
        if id(m) not in splits:
            splits[id(m)] = head_split(m)
        with record_attention(m) as probs:
            total, parts = objective(m, splits[id(m)], batch, letters, tcfg)
        seg, target, valid = targets.batch(np.array(batch.tokens), np.array(batch.lengths))
        rows = last_row_attention(probs, batch.lengths)  # (layers, B, L)
        rows = rows if targets.layers == "each" else rows[-1:]
        S = target.shape[-1]
        onehot = (seg[..., None] == mx.arange(S)).astype(mx.float32)  # (B, L, S)
        student_seg = (rows[:, :, None, :] @ onehot[None])[:, :, 0]  # (layers, B, S)
        kl = sum(attention_kl(student_seg[i], target[i], valid) for i in range(rows.shape[0]))
        kl = kl / (rows.shape[0] * batch.tokens.shape[0])
        return total + weight * kl, parts

    return loss


# --------------------------------------------------------------------------------------------------------------
# Diagnostics


def item_kinds(text: str) -> tuple[list[tuple[int, int, str]], list[str]]:
    """The list items of a demo question: (char start, char end, kind) each, and the option kinds A-D in order."""
    start = text.index("：", text.index("题目：") + 3) + 1  # after the stem's colon
    end = text.index("\nA.", start)
    options = [text[text.index(f"\n{c}. ") + 4:].split("\n", 1)[0] for c in "ABCD"]
    items, pos = [], start
    for word in text[start:end].split("、"):
        if options[0] in WORD_KINDS:
            kind = next(k for k, words in WORD_KINDS.items() if word in words)
        else:
            kind = next(k for k, nums in NUMBER_KINDS.items() if parse_chinese_numeral(word) in nums)
        items.append((pos, pos + len(word), kind))
        pos += len(word) + 1
    return items, options


def char_mass(att: np.ndarray, offsets: list[tuple[int, int]], n_chars: int) -> np.ndarray:
    """Token attention (n_tokens,) spread evenly over each token's characters -> (n_chars,)."""
    out = np.zeros(n_chars)
    for a, (s, e) in zip(att, offsets):
        if e > s:
            out[s:e] += a / (e - s)
    return out


def item_stats(text: str, att: np.ndarray, offsets: list[tuple[int, int]], gold: int) -> dict:
    """Mass on the list items (and the items' share of the characters); the share of the item mass on items of the
    gold kind (and those items' share of the item characters)."""
    items, options = item_kinds(text)
    chars = char_mass(att, offsets, len(text))
    on = np.zeros(len(text), bool)
    gold_on = np.zeros(len(text), bool)
    for s, e, kind in items:
        on[s:e] = True
        gold_on[s:e] = kind == options[gold]
    item_mass = chars[on].sum()
    return {"item_mass": item_mass, "item_chars": on.mean(),
            "gold_share": chars[gold_on].sum() / max(item_mass, 1e-12), "gold_chars": gold_on.sum() / on.sum()}


def student_segments(model: nn.Module, table: dict[str, QuestionAttention],
                     qids: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The student's answer-position attention per question: on the common segments, and per student token."""
    atts = answer_attention(model, [table[q].s_ids for q in qids])
    return [segment_mass(a, table[q].s_seg, table[q].target.shape[1]) for q, a in zip(qids, atts)], atts


def compare(model: nn.Module, table: dict[str, QuestionAttention], questions: list, student_tok) -> dict:
    """On `questions`: mean KL(teacher ‖ student) of the last layer's segment attention, how often the top segment
    agrees, and the student's own item statistics."""
    qids = [q.id for q in questions]
    segs, atts = student_segments(model, table, qids)
    kl, top, stats = [], [], []
    for q, s, a in zip(questions, segs, atts):
        t = table[q.id].target[-1]
        m = t > 0
        kl.append(float((t[m] * (np.log(t[m]) - np.log(np.maximum(s[-1][m], 1e-12)))).sum()))
        top.append(int(np.argmax(t) == np.argmax(s[-1])))
        _, offs = student_tok.encode_with_offsets(table[q.id].text)
        stats.append(item_stats(table[q.id].text, a[-1], offs, q.answer_index))
    return {"kl_last": statistics.mean(kl), "top_agree": statistics.mean(top),
            **{k: statistics.mean(s[k] for s in stats) for k in stats[0]}}


def teacher_stats(table: dict[str, QuestionAttention], questions: list) -> dict:
    out = {}
    for layer in range(table[questions[0].id].t_att.shape[0]):
        st = [item_stats(table[q.id].text, table[q.id].t_att[layer], table[q.id].t_offsets, q.answer_index)
              for q in questions]
        out[f"layer{layer}"] = {k: statistics.mean(s[k] for s in st) for k in st[0]}
    # how peaked: the largest segment's mass, last layer
    out["top_segment_mass"] = statistics.mean(float(table[q.id].target[-1].max()) for q in questions)
    return out


def attention_shift(trained: dict[str, QuestionAttention], init: dict[str, QuestionAttention],
                    questions: list) -> dict:
    """Per layer, how far training moved the teacher's answer-position attention from its initialisation (same
    tokens): mean KL(trained ‖ init) and how often the top token is the same."""
    out = {}
    for layer in range(trained[questions[0].id].t_att.shape[0]):
        kl, top = [], []
        for q in questions:
            t, s = trained[q.id].t_att[layer], init[q.id].t_att[layer]
            m = t > 0
            kl.append(float((t[m] * (np.log(t[m]) - np.log(np.maximum(s[m], 1e-12)))).sum()))
            top.append(int(np.argmax(t) == np.argmax(s)))
        out[f"layer{layer}"] = {"kl_trained_init": statistics.mean(kl), "top_agree": statistics.mean(top)}
    return out


def test_accuracy(student: Path, adapters: Path | None, data: Path, splits: Path, shots: int) -> float:
    questions, dev = select_questions(str(data), str(splits), "test")
    em = load_eval_model(str(student), str(adapters) if adapters else None, dtype="float32")
    return float(evaluate_model(em, questions, dev, shots=shots, batch_size=16, progress=False).summary["overall"])


def arm_name(weight, layers: str, targets: str) -> str:
    if weight == "untrained":
        return "untrained"
    return (f"w{weight:g}" + (f"_{layers}" if weight and layers != "last" else "")
            + ("" if targets == "teacher" else f"_{targets}"))


def fmt(d: dict) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in d.items())


@click.command()
@click.option("--demo", "demo_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Output of `python -m kd_mlx demo` (its task, splits, store and 4-bit teacher are read only).")
@click.option("--out", required=True, help="Where students, runs and kd_attention.jsonl/json go.")
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--weights", default="0,1,4", show_default=True, help="Attention-KL weights (0 = the recipe alone).")
@click.option("--layers", type=click.Choice(["last", "each"]), default="last", show_default=True)
@click.option("--targets", "target_source", type=click.Choice(["teacher", "teacher_init"]), default="teacher",
              show_default=True, help="Whose attention the student is pulled toward: the trained demo teacher, or "
              "the same model before its training (a control: structured attention without the task).")
@click.option("--steps", type=int, default=None, help="Optimizer steps per run (default: the demo's).")
def main(demo_dir, out, seeds, weights, layers, target_source, steps):
    demo, out_dir = Path(demo_dir).resolve(), Path(out).resolve()
    if out_dir == demo or demo in out_dir.parents:
        raise click.BadParameter("--out must lie outside the demo directory (its inputs are read only)")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads((demo / "demo.json").read_text(encoding="utf-8"))
    data, splits, teacher, store = demo / "task", demo / "splits.json", demo / "models" / "teacher_4bit", demo / "store"
    ident = TopKStore(store).identity
    shots, max_tokens = int(ident.get("shots", 0)), int(ident.get("max_tokens") or 2048)
    steps = int(steps or summary["preset"]["student_steps"])
    seed_list = [int(s) for s in seeds.split(",")]
    weight_list = [float(w) for w in weights.split(",")]
    cmmlu = load_cmmlu(data)
    sp = load_splits(splits)
    qs = {name: split_questions(cmmlu, sp, name) for name in ("train", "val", "test")}
    student_tok = load_tokenizer(demo / "models" / "student")

    tic = time.perf_counter()
    table = teacher_attention(teacher, student_tok, [q for v in qs.values() for q in v], dict(cmmlu.dev), shots,
                              max_tokens)
    t_stats = {"train": teacher_stats(table, qs["train"]), "test": teacher_stats(table, qs["test"])}
    print(f"teacher attention for {len(table)} questions in {time.perf_counter() - tic:.1f} s; segments per prompt "
          f"{statistics.mean(a.target.shape[1] for a in table.values()):.1f}, student tokens "
          f"{statistics.mean(len(a.s_ids) for a in table.values()):.1f}", flush=True)
    for split, st in t_stats.items():
        for layer, d in st.items():
            print(f"  teacher {split:5s} {layer}: " + (fmt(d) if isinstance(d, dict) else f"{d:.3f}"), flush=True)
    init_dir = demo / "models" / "teacher_init"  # the demo teacher before its training (the demo keeps it)
    if target_source == "teacher_init" and not init_dir.is_dir():
        raise click.BadParameter(f"--targets teacher_init needs {init_dir}")
    if init_dir.is_dir():
        init = teacher_attention(init_dir, student_tok, [q for v in qs.values() for q in v], dict(cmmlu.dev), shots,
                                 max_tokens)
        t_stats["init_test"] = teacher_stats(init, qs["test"])
        t_stats["shift_test"] = attention_shift(table, init, qs["test"])
        for key in ("init_test", "shift_test"):
            for layer, d in t_stats[key].items():
                print(f"  teacher {key} {layer}: " + (fmt(d) if isinstance(d, dict) else f"{d:.3f}"), flush=True)
    # diagnostics always compare with the trained teacher's attention
    targets = AttentionTargets(table if target_source == "teacher" else init, layers)

    shape = summary["preset"].get("student_shape", PRESETS["full"]["student_shape"])
    students = {s: tiny_phi_dir(out_dir / f"student_seed{s}", seed=s, **shape) for s in seed_list}
    base_cfg = {**DEFAULTS, **TRAIN_CONFIG, "transfer_split": None, "data": str(data), "splits": str(splits),
                "store": str(store), "teacher_tokenizer": str(teacher), "steps": steps,
                "batch_size": summary["preset"]["student_batch"], "eval_every": 50, "save_every": steps}
    prep = prepare({**base_cfg, "student": str(students[seed_list[0]]), "seed": seed_list[0],
                    "out": str(out_dir / "unused")}, progress=False)

    log = out_dir / "kd_attention.jsonl"  # one line per finished run; a rerun skips runs already there
    done = {}
    if log.is_file():
        for ln in log.read_text(encoding="utf-8").splitlines():
            r = json.loads(ln)
            done[(r["seed"], r["weight"], r["layers"], r["steps"], r.get("targets", "teacher"))] = r
    for seed in seed_list:
        key = (seed, "untrained", "last", 0, "teacher")  # no attention term: the same for any --layers
        if key not in done:
            em = load_eval_model(str(students[seed]), dtype="float32")
            rec = {"seed": seed, "weight": "untrained", "layers": "last", "steps": 0,
                   "test": test_accuracy(students[seed], None, data, splits, shots),
                   **compare(em.model, table, qs["test"], student_tok)}
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            done[key] = rec
        print(f"seed {seed} untrained: test {done[key]['test']:.1f}  " +
              fmt({k: v for k, v in done[key].items() if k in ("kl_last", "top_agree", "item_mass", "gold_share")}),
              flush=True)
    for w in weight_list:  # weight by weight, each over all seeds: a partial run gives whole rows
        for seed in seed_list:
            key = (seed, w, layers if w else "last", steps, target_source if w else "teacher")
            if key not in done:
                run = out_dir / f"seed{seed}_{arm_name(*key[1:3], key[4])}"
                cfg = {**base_cfg, **prep.cfg.to_dict(), "student": str(students[seed]), "seed": seed,
                       "out": str(run), "steps": steps}
                if run.exists():  # an unfinished run (finished ones are in the log)
                    shutil.rmtree(run)
                mx.reset_peak_memory()
                tic = time.perf_counter()
                train_prepared(replace(prep, student_path=students[seed]), cfg, progress=False,
                               loss=attention_kd_loss(cfg, prep.letter_ids, targets, w))
                dt = time.perf_counter() - tic
                em = load_eval_model(str(students[seed]), str(run / "last"), dtype="float32")
                rec = {"seed": seed, "weight": w, "layers": key[2], "steps": steps, "targets": key[-1],
                       "test": test_accuracy(students[seed], run / "last", data, splits, shots),
                       **compare(em.model, table, qs["test"], student_tok), "seconds": dt,
                       "peak_mlx_mib": mx.get_peak_memory() / 2**20,
                       "val_curve": [(r["step"], round(r["val_acc"] * 100, 1)) for r in map(
                           json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]}
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                done[key] = rec
            r = done[key]
            print(f"seed {seed} {arm_name(*key[1:3], key[4])}: test {r['test']:.1f}  " +
                  fmt({k: v for k, v in r.items() if k in ("kl_last", "top_agree", "item_mass", "gold_share")}) +
                  f"  val {r.get('val_curve')}  ({r.get('seconds', 0):.0f} s)", flush=True)

    print(f"\nheld-out test accuracy (%) and test-split attention agreement with the teacher (last layer), "
          f"seeds {seed_list}, {steps} steps, layers={layers}; teacher {summary['overall']['teacher']:.1f}")
    table_rows = {}
    # every arm of this out directory's log with these seeds and steps (earlier invocations included)
    rows = {}
    order = sorted(done, key=lambda k: (k[1] != "untrained", str(k[1]), k[2:], k[0]))  # untrained first
    for seed, w, lay, st, src in order:
        r = done[(seed, w, lay, st, src)]
        if seed in seed_list and st in (0, steps):
            rows.setdefault(arm_name(w, lay, src), []).append(r)
    rows = {arm: rs for arm, rs in rows.items() if len(rs) == len(seed_list)}
    for arm, rs in rows.items():
        m = {k: statistics.mean(r[k] for r in rs) for k in ("test", "kl_last", "top_agree", "item_mass", "gold_share")}
        sd = statistics.stdev([r["test"] for r in rs]) if len(rs) > 1 else 0.0
        table_rows[arm] = {**m, "test_std": sd, "per_seed": [r["test"] for r in rs]}
        per_seed = ", ".join(f"{x:.1f}" for x in table_rows[arm]["per_seed"])
        print(f"  {arm:16s} test {m['test']:5.1f} ± {sd:4.1f} (per seed {per_seed})"
              f"  KL {m['kl_last']:.3f}  top-seg agree {m['top_agree']:.3f}  item mass {m['item_mass']:.3f}  "
              f"gold share {m['gold_share']:.3f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"process peak RSS {rss / 2**30:.2f} GiB")
    result = {"command": " ".join(sys.argv), "machine": f"{platform.system()} {platform.machine()}",
              "teacher_test": summary["overall"]["teacher"], "teacher_attention": t_stats, "seeds": seed_list,
              "steps": steps, "layers": layers, "targets": target_source, "recipe": TRAIN_CONFIG, "arms": table_rows,
              "peak_rss_bytes": rss}
    (out_dir / "kd_attention.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_dir / 'kd_attention.json'}")


if __name__ == "__main__":
    main()
