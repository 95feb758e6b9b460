"""`python -m kd_mlx.eval`: CMMLU accuracy under the official protocol, for students (in memory) and the streamed
teacher.

    python -m kd_mlx.eval --model PHI_DIR --adapters run/best --data CMMLU_DIR --splits splits.json --split test \
        --shots 5 --out res_distilled/
    python -m kd_mlx.eval --model KIMI_DIR --memory-budget 16GB --data CMMLU_DIR --shots 5 --out res_teacher/

Writes RESULTS/subjects/<subject>.csv, RESULTS/summary.json (overall, categories, subjects, calibration,
throughput, memory) and RESULTS/config.json (the final config).

Protocol (CMMLU's own evaluation code): the prompt from `kd_mlx.data` (header + k dev shots + the question, shots
dropped until the prompt fits the model's context), one forward pass, and the prediction is the argmax over the
logits of the tokens "A", "B", "C", "D" at the last prompt position. A subject's accuracy is the percentage of its
questions answered right; `overall` is the unweighted mean of the subject accuracies and each category is the mean
over its subjects.

Two implementations of the scoring, kept side by side and tested to agree:
- `letter_logits_reference`: one question at a time, the full prompt each time (what the official script does);
- `letter_logits_batched`: questions sharing a few-shot prefix are scored against one KV cache of that prefix
  (mlx-lm's `KVCache`, computed once per subject and tiled over the batch), their suffixes right-padded into
  batches. Right padding under a causal mask cannot change any real token's output, and the logits are read at
  each sequence's last real token, so both give the same predictions.
The prefix shared by a group is the longest common prefix of the *token ids* of the full prompts, never the
tokenization of the prefix text alone (BPE merges across the prefix/suffix boundary, e.g. "\\n\\n" + "题").
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.utils import dequantize_model
from tqdm import tqdm

from .data import (CMMLU, LETTERS, answer_token_ids, load_cmmlu, load_splits, prompt_ids, read_add_bos,
                   split_questions, subject_table)
from .model_dir import head_split, load_model, read_adapter_config, read_raw_config
from .teacher import StreamingTeacher
from .tokenizer import load_tokenizer
from .utils import (KDError, cli_errors, config_int, is_hub_id, linux_blas_advice, load_yaml_config, merge_config, parse_bytes,
                    path_identity, peak_rss_bytes, prepare_output_dir, resolve_model_path, staged_output_dir,
                    write_json_atomic)

N_CALIBRATION_BINS = 10


# --------------------------------------------------------------------------------------------------- tokens
def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


# --------------------------------------------------------------------------------------------------- scoring
def letter_logits_reference(model, seqs: Sequence[Sequence[int]], answer_ids: Sequence[int],
                            on_item: Callable[[], None] | None = None) -> np.ndarray:
    """Plain reference: one full forward per question, logits of A-D at its last token. Returns (n, 4) float32."""

    ids = mx.array(list(answer_ids))
    out = np.zeros((len(seqs), 4), dtype=np.float32)
    for i, s in enumerate(seqs):
        logits = model(mx.array(list(s))[None])
        out[i] = np.array(logits[0, -1, ids].astype(mx.float32))
        if on_item:
            on_item()
    return out


def _plain_kv_caches(model) -> list | None:
    """mlx-lm's default per-layer KV caches, or None when the model uses another kind (then no prefix reuse)."""

    cache = make_prompt_cache(model)
    return cache if all(type(c) is KVCache for c in cache) else None


def _prefix_cache(model, prefix: Sequence[int]) -> list:
    """Run the shared prefix once (batch 1) and return its per-layer KVCache."""

    cache = _plain_kv_caches(model)
    model(mx.array(list(prefix))[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def _tile_cache(prefix_cache: list, batch: int) -> list:
    """Fresh KVCaches holding the prefix's keys/values repeated over `batch` rows (the suffix forward appends)."""

    out = []
    for c in prefix_cache:
        k, v = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
        t = KVCache()
        t.state = (mx.repeat(k, batch, axis=0), mx.repeat(v, batch, axis=0), c.offset)
        out.append(t)
    return out


def _split_head(model) -> Callable | None:
    """`f(x, cache, rows, cols) -> logits at (rows, cols)` that runs the LM head only at the read positions, or None.

    Projecting only the last real token of each row saves the (B, L, vocab) logits tensor (1.3 GB for Phi-1.5 at
    B=8, L=800 in fp32). `kd_mlx.model_dir.head_split` checks on a probe that body + head reproduce the model's own
    forward (models that post-process logits, e.g. soft-capping, keep the full forward). Cached on the model."""
    cached = getattr(model, "_kd_split_head", None)
    if cached is not None:
        return cached or None
    split = head_split(model)
    fn = None
    if split is not None:
        backbone, head = split

        def fn(x, cache, rows, cols):
            return head(backbone(x, cache)[rows, cols])

    try:
        object.__setattr__(model, "_kd_split_head", fn or False)
    except AttributeError:
        pass
    return fn


@dataclass
class ScoreStats:
    """What a scoring pass computed: tokens actually run through the model (prefix once + padded suffixes)."""

    computed_tokens: int = 0
    padded_tokens: int = 0
    prefix_tokens: int = 0
    batches: int = 0


def _groups(n: int, groups: Sequence[Any] | None) -> list[list[int]]:
    if groups is None:
        return [list(range(n))]
    by: dict[Any, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by[g].append(i)
    return list(by.values())


def _length_batches(members: list[int], lengths: Sequence[int], batch_size: int,
                    min_fill: float = 0.75) -> list[list[int]]:
    """Longest first, at most `batch_size` per batch, and a new batch whenever the next sequence is shorter than
    `min_fill` x the batch's width: padding stays under ~25% of the computed tokens."""
    order = sorted(members, key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and lengths[i] >= min_fill * lengths[batches[-1][0]]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def letter_logits_batched(model, seqs: Sequence[Sequence[int]], answer_ids: Sequence[int], *,
                          groups: Sequence[Any] | None = None, batch_size: int = 8, reuse_prefix: bool = True,
                          pad_id: int = 0, on_item: Callable[[], None] | None = None,
                          stats: ScoreStats | None = None) -> np.ndarray:
    """Fast path: per group (questions sharing a few-shot prefix), the common token prefix is run once into a KV
    cache; the rest of each prompt is right-padded into batches of `batch_size` and run against the tiled cache.
    Returns (n, 4) float32 logits of A-D at each sequence's last real token, in input order."""

    stats = stats if stats is not None else ScoreStats()
    ids = mx.array(list(answer_ids))
    out = np.zeros((len(seqs), 4), dtype=np.float32)
    can_cache = reuse_prefix and _plain_kv_caches(model) is not None
    split = _split_head(model)
    for members in _groups(len(seqs), groups if reuse_prefix else None):
        p = 0
        prefix_cache = None
        if can_cache and len(members) > 1:
            # keep at least one token per question after the prefix: its logits are the ones we read
            p = min(common_prefix_len([seqs[i] for i in members]), min(len(seqs[i]) for i in members) - 1)
            if p > 0:
                prefix_cache = _prefix_cache(model, seqs[members[0]][:p])
                stats.prefix_tokens += p
                stats.computed_tokens += p
        for chunk in _length_batches(members, [len(s) - p for s in seqs], batch_size):
            suffixes = [list(seqs[i][p:]) for i in chunk]
            lengths = [len(s) for s in suffixes]
            width = max(lengths)
            x = np.full((len(chunk), width), pad_id, dtype=np.int32)
            for r, s in enumerate(suffixes):
                x[r, : len(s)] = s
            cache = _tile_cache(prefix_cache, len(chunk)) if prefix_cache is not None else None
            rows, cols = mx.arange(len(chunk)), mx.array(lengths) - 1  # each row's last real token
            if split is not None:
                last = split(mx.array(x), cache, rows, cols)
            else:
                last = model(mx.array(x), cache=cache)[rows, cols]
            vals = np.array(last[:, ids].astype(mx.float32))
            for r, i in enumerate(chunk):
                out[i] = vals[r]
                if on_item:
                    on_item()
            stats.computed_tokens += len(chunk) * width
            stats.padded_tokens += len(chunk) * width - sum(lengths)
            stats.batches += 1
    return out


def letter_logits_streaming(teacher, seqs: Sequence[Sequence[int]], answer_ids: Sequence[int], *,
                            groups: Sequence[Any] | None = None, batch_size: int = 8, reuse_prefix: bool = True,
                            on_item: Callable[[], None] | None = None,
                            stats: ScoreStats | None = None) -> np.ndarray:
    """The same scores through `kd_mlx.teacher.StreamingTeacher.logprobs_at` (models larger than memory).

    Returns the full-vocab log-probs of A-D at the last token: they differ from the logits by one constant per
    question, so argmax and the softmax over the four letters are the same. One `logprobs_at` call per prefix
    group (one pass over the weights); `batch_size` is accepted for symmetry and unused."""
    stats = stats if stats is not None else ScoreStats()
    ids = list(answer_ids)
    out = np.zeros((len(seqs), 4), dtype=np.float32)

    def reduce(lp, _):
        return np.asarray(lp, dtype=np.float32).reshape(-1, np.asarray(lp).shape[-1])[-1, ids]

    for members in _groups(len(seqs), groups if reuse_prefix else None):
        p = 0
        if reuse_prefix and len(members) > 1:
            p = min(common_prefix_len([seqs[i] for i in members]), min(len(seqs[i]) for i in members) - 1)
        prefix = list(seqs[members[0]][:p]) if p > 0 else None
        stats.prefix_tokens += p
        stats.computed_tokens += p
        # one call per group: each call streams the weights from disk once, and the teacher fits its own
        # micro-batches to the memory budget (so `batch_size` does not apply here)
        suffixes = [list(seqs[i][p:]) for i in members]
        res = teacher.logprobs_at(suffixes, [[len(s) - 1] for s in suffixes], prefix=prefix, reduce=reduce)
        for r, i in enumerate(members):
            out[i] = np.asarray(res[r], dtype=np.float32).reshape(-1)[-4:]
            if on_item:
                on_item()
        stats.computed_tokens += sum(len(s) for s in suffixes)
        stats.batches += 1
    return out


# --------------------------------------------------------------------------------------------------- metrics
def softmax4(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def calibration(probs: np.ndarray, answers: np.ndarray, n_bins: int = N_CALIBRATION_BINS) -> dict:
    """ECE (equal-width bins on the max probability, |accuracy - confidence| weighted by bin size), multi-class
    Brier (mean over questions of sum over the 4 letters of (p - onehot)^2) and the bins for a reliability plot."""
    probs = np.asarray(probs, dtype=np.float64)
    answers = np.asarray(answers, dtype=np.int64)
    n = len(answers)
    if n == 0:
        return {"ece": None, "brier": None, "n_bins": n_bins, "bins": []}
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == answers).astype(np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(n), answers] = 1.0
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean())
    # bin b holds confidences in (b/n_bins, (b+1)/n_bins]; 0 goes to the first bin
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = idx == b
        cnt = int(m.sum())
        acc_b = float(correct[m].mean()) if cnt else None
        conf_b = float(conf[m].mean()) if cnt else None
        if cnt:
            ece += cnt / n * abs(acc_b - conf_b)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": cnt, "accuracy": acc_b, "confidence": conf_b})
    return {"ece": float(ece), "brier": brier, "n_bins": n_bins, "bins": bins}


def summarize_scores(subject_correct: dict[str, Sequence[bool]], table: dict[str, dict]) -> dict:
    """overall = unweighted mean of subject accuracies (percent); category = mean over its evaluated subjects."""
    subjects = {s: 100.0 * float(np.mean(c)) for s, c in sorted(subject_correct.items()) if len(c)}
    cats: dict[str, list[float]] = defaultdict(list)
    for s, acc in subjects.items():
        for c in table.get(s, {}).get("categories", []):
            cats[c].append(acc)
    return {
        "overall": float(np.mean(list(subjects.values()))) if subjects else None,
        "categories": {c: float(np.mean(v)) for c, v in sorted(cats.items())},
        "subjects": subjects,
        "n": {s: len(c) for s, c in sorted(subject_correct.items())},
    }




# --------------------------------------------------------------------------------------------------- models
@dataclass
class EvalModel:
    """A loaded model to score with: `kind` is "mlx" (in memory, mlx-lm) or "streaming" (StreamingTeacher)."""

    kind: str
    model: Any
    tokenizer: Any
    config: dict
    path: Path
    add_bos: bool = False

    @property
    def context_length(self) -> int | None:
        c = self.config
        for key in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len", "n_ctx"):
            v = c.get(key) or (c.get("text_config") or {}).get(key)
            if isinstance(v, int) and v > 0:
                return v
        return None


def _weights_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def load_eval_model(model: str, adapters: str | None = None, memory_budget: int | None = None,
                    dtype: str = "auto", trust_remote_code: bool = False, add_bos: bool | None = None,
                    fit_fraction: float = 0.6, dequantize: bool | None = None) -> EvalModel:
    """Load a model directory (or hub id) for evaluation.

    In memory through mlx-lm (with LoRA adapters from training, mlx-lm's format) unless a memory budget is given or
    the weights exceed `fit_fraction` of physical memory: then through the streaming teacher. On CPU a quantized
    model is dequantized and run in fp32 by default (`dequantize`, `dtype="auto"`). The tokenizer always
    comes from `kd_mlx.tokenizer.load_tokenizer` (Kimi's tiktoken format without remote code)."""

    path = resolve_model_path(model)
    read_raw_config(path)
    if adapters:
        read_adapter_config(adapters)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    bos = read_add_bos(path, tokenizer) if add_bos is None else add_bos
    if bos and tokenizer.bos_id is None:
        raise KDError(f"a BOS token was requested but the tokenizer of {path} has none")
    streaming = memory_budget is not None or _weights_bytes(path) > fit_fraction * _physical_memory()
    if streaming:
        if adapters:
            raise KDError("--adapters apply to in-memory students; the streaming teacher takes no adapters")
        teacher = StreamingTeacher(path, memory_budget, trust_remote_code=trust_remote_code)
        return EvalModel("streaming", teacher, tokenizer, dict(teacher.config), path, bos)

    net, config = load_model(path, adapters=adapters, trust_remote_code=trust_remote_code)
    on_cpu = mx.default_device() == mx.cpu
    if dequantize is None:
        # CPU quantized matmul runs at ~3 GFLOP/s, dequantized fp32 through BLAS ~100x faster; on GPU keep 4-bit
        dequantize = on_cpu
    if dequantize:

        net = dequantize_model(net)
    if dtype == "auto":
        # bf16/fp16 matmuls are slow on CPU; fp32 there, the checkpoint's dtype on GPU
        dtype = "float32" if on_cpu else None
    if dtype:
        net.set_dtype(getattr(mx, dtype))
    net.eval()
    return EvalModel("mlx", net, tokenizer, dict(config), path, bos)


# --------------------------------------------------------------------------------------------------- the run
@dataclass
class QuestionResult:
    id: str
    subject: str
    index: int
    answer: str
    prediction: str
    probs: list[float]
    n_tokens: int
    shots: int


@dataclass
class EvalResult:
    summary: dict
    questions: list[QuestionResult] = field(default_factory=list)


def build_prompt_ids(questions: Sequence, dev: dict[str, list], tokenizer, shots: int, max_tokens: int,
                     add_bos: bool = False, progress: bool = False) -> tuple[list[list[int]], list[str], list[int], int]:
    """Token ids of each question's official prompt (shots fitted to `max_tokens`), its few-shot prefix text (the
    grouping key for prefix reuse), the number of shots kept, and how many prompts had to be cut from the left
    (even 0-shot too long for `max_tokens`)."""
    seqs, keys, kept = [], [], []
    n_truncated = 0
    for q in tqdm(questions, desc="prompts", disable=not progress, leave=False):
        p = prompt_ids(q, dev.get(q.subject, []), tokenizer, shots, max_tokens, add_bos)
        seqs.append(p.ids)
        keys.append(p.prompt.prefix)
        kept.append(int(p.prompt.shots))
        n_truncated += p.truncated
    return seqs, keys, kept, n_truncated


def evaluate_model(em: EvalModel, questions: Sequence, dev: dict[str, list], *, shots: int = 5,
                   max_tokens: int = 2048, batch_size: int = 8, reuse_prefix: bool = True, reference: bool = False,
                   progress: bool = True, table: dict | None = None) -> EvalResult:
    """Score `questions` (kd_mlx.data Questions) with `em` under the official protocol; return the summary and the
    per-question results. Categories come from `table` (default: the packaged CMMLU table; a data directory with its
    own subjects.json passes `cmmlu.subjects_table`). `reference=True` runs the plain one-at-a-time loop (in-memory
    models only)."""


    if not questions:
        raise KDError("no questions to evaluate")
    ctx = em.context_length
    limit = min(max_tokens, ctx) if ctx else max_tokens
    answer_ids = answer_token_ids(em.tokenizer)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    seqs, keys, kept, n_truncated = build_prompt_ids(questions, dev, em.tokenizer, shots, limit, em.add_bos, progress)
    stats = ScoreStats()
    with tqdm(total=len(seqs), desc="eval", unit="q", disable=not progress) as bar:
        if em.kind == "streaming":
            if reference:
                raise KDError("the reference loop runs in-memory models only")
            logits = letter_logits_streaming(em.model, seqs, answer_ids, groups=keys, batch_size=batch_size,
                                             reuse_prefix=reuse_prefix, on_item=bar.update, stats=stats)
        elif reference:
            logits = letter_logits_reference(em.model, seqs, answer_ids, on_item=bar.update)
            stats.computed_tokens = sum(len(s) for s in seqs)
        else:
            pad = em.tokenizer.eos_id if em.tokenizer.eos_id is not None else 0
            logits = letter_logits_batched(em.model, seqs, answer_ids, groups=keys, batch_size=batch_size,
                                           reuse_prefix=reuse_prefix, pad_id=pad, on_item=bar.update, stats=stats)
    elapsed = time.perf_counter() - t0

    probs = softmax4(logits.astype(np.float64))
    answers = np.array([LETTERS.index(q.answer) for q in questions])
    preds = logits.argmax(axis=1)
    per_subject: dict[str, list[bool]] = defaultdict(list)
    results = []
    for i, q in enumerate(questions):
        per_subject[q.subject].append(bool(preds[i] == answers[i]))
        results.append(QuestionResult(q.id, q.subject, int(q.index), q.answer, LETTERS[int(preds[i])],
                                      [float(x) for x in probs[i]], len(seqs[i]), kept[i]))
    summary = summarize_scores(per_subject, table if table is not None else subject_table())
    summary["n_questions"] = len(questions)
    summary["calibration"] = calibration(probs, answers)
    prompt_tokens = sum(len(s) for s in seqs)
    summary["throughput"] = {
        "seconds": elapsed,
        "questions_per_s": len(questions) / elapsed if elapsed > 0 else None,
        "prompt_tokens_per_s": prompt_tokens / elapsed if elapsed > 0 else None,
        "computed_tokens_per_s": stats.computed_tokens / elapsed if elapsed > 0 else None,
        "prompt_tokens": prompt_tokens,
        "computed_tokens": stats.computed_tokens,
        "padded_tokens": stats.padded_tokens,
        "mean_prompt_tokens": prompt_tokens / len(seqs),
        "mean_shots": float(np.mean(kept)),
        "truncated_prompts": n_truncated,
    }
    summary["memory"] = {"mlx_peak_bytes": int(mx.get_peak_memory()), "peak_rss_bytes": peak_rss_bytes()}
    summary["model"] = {"path": str(em.path), "kind": em.kind, "context": ctx, "max_tokens": limit,
                        "answer_token_ids": answer_ids, "add_bos": em.add_bos}
    return EvalResult(summary, results)


CSV_COLUMNS = ["id", "index", "answer", "prediction", "correct", "prob_A", "prob_B", "prob_C", "prob_D",
               "confidence", "n_tokens", "shots"]


EVAL_KIND = "eval"
_PATH_KEYS = ("model", "adapters", "data", "splits")
_NOT_IDENTITY = ("out", "overwrite")  # settings that do not change the results


def eval_identity(cfg: dict) -> dict:
    """The settings that make an evaluation what it is (paths resolved): equal identities write equal results."""
    return {k: path_identity(v) if k in _PATH_KEYS else v for k, v in cfg.items() if k not in _NOT_IDENTITY}


def prepare_eval_out(cfg: dict) -> str:
    """The output-directory rule (kd_mlx.utils.prepare_output_dir) for a results directory."""
    return prepare_output_dir(cfg["out"], EVAL_KIND, eval_identity(cfg), [cfg.get(k) for k in _PATH_KEYS],
                              overwrite=bool(cfg.get("overwrite")))


def write_results(out: str | os.PathLike, result: EvalResult, config: dict | None = None,
                  overwrite: bool = False) -> Path:
    """RESULTS/subjects/<subject>.csv (one row per question, like the official output), summary.json, config.json.

    The whole directory is built under a temporary name and renamed onto `out`, so no file of an earlier result is
    left beside the new ones; `out` must pass the output-directory rule (`prepare_eval_out`)."""
    config = dict(config or {}, out=str(out), overwrite=overwrite)
    prepare_eval_out(config)
    by_subject: dict[str, list[QuestionResult]] = defaultdict(list)
    for r in result.questions:
        by_subject[r.subject].append(r)
    with staged_output_dir(out, EVAL_KIND, eval_identity(config)) as tmp:
        (tmp / "subjects").mkdir()
        for subject, rows in sorted(by_subject.items()):
            with open(tmp / "subjects" / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(CSV_COLUMNS)
                for r in sorted(rows, key=lambda r: r.index):
                    w.writerow([r.id, r.index, r.answer, r.prediction, int(r.answer == r.prediction),
                                *(f"{p:.6f}" for p in r.probs), f"{max(r.probs):.6f}", r.n_tokens, r.shots])
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / "summary.json", result.summary)
    return Path(out)


# --------------------------------------------------------------------------------------------------- data
def select_questions(data: str, splits: str | None = None, split: str = "test", subjects: Iterable[str] | None = None,
                     limit: int | None = None) -> tuple[list, dict[str, list]]:
    """Questions to evaluate (the CMMLU test set, or one split of splits.json) and the dev shots per subject."""
    cmmlu = load_eval_data(data)
    return pick_questions(cmmlu, splits, split, subjects, limit), dict(cmmlu.dev)


def load_eval_data(data: str) -> CMMLU:
    p = Path(data)
    if not p.exists() and not is_hub_id(data):
        raise KDError(f"CMMLU data directory not found: {data}")
    return load_cmmlu(data)


def pick_questions(cmmlu: CMMLU, splits: str | None = None, split: str = "test",
                   subjects: Iterable[str] | None = None, limit: int | None = None) -> list:
    """The questions of one split of splits.json (or the whole test set), optionally some subjects, `limit` each."""
    if splits:
        qs = split_questions(cmmlu, load_splits(splits), [split])
    else:
        if split != "test":
            raise KDError(f"--split {split} needs --splits splits.json (without it the CMMLU test set is used)")
        qs = [q for s in sorted(cmmlu.test) for q in cmmlu.test[s]]
    known = set(cmmlu.test) | set(cmmlu.dev)
    if subjects:
        wanted = [s for s in subjects if s]
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise KDError(f"unknown subject(s): {', '.join(unknown)} (see subjects.json for the 67 names)")
        qs = [q for q in qs if q.subject in set(wanted)]
    if limit:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for q in qs:
            if seen[q.subject] < limit:
                kept.append(q)
                seen[q.subject] += 1
        qs = kept
    if not qs:
        raise KDError("no questions selected (check --subjects / --split)")
    return qs


DEFAULTS: dict[str, Any] = {
    "model": None, "adapters": None, "memory_budget": None, "data": None, "splits": None, "split": "test",
    "shots": 5, "max_tokens": 2048, "batch_size": 8, "subjects": None, "limit": None, "out": None,
    "dtype": "auto", "dequantize": None, "trust_remote_code": False, "bos": None, "reuse_prefix": True,
    "reference": False, "overwrite": False,
}


def run_eval(cfg: dict, progress: bool = True) -> EvalResult:
    """The whole `python -m kd_mlx.eval` run from a merged config dict (keys of DEFAULTS)."""

    for key in ("model", "data", "out"):
        if not cfg.get(key):
            raise KDError(f"missing --{key.replace('_', '-')}")
    cfg = dict(cfg)
    for key, minimum in (("shots", 0), ("max_tokens", 1), ("batch_size", 1), ("limit", 1)):
        cfg[key] = config_int(cfg, key, minimum)
    if cfg["shots"] > 5:
        raise KDError(f"shots must be 0..5 (CMMLU has 5 dev questions per subject), got {cfg['shots']}")
    for key in ("dequantize", "trust_remote_code", "bos", "reuse_prefix", "reference", "overwrite"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise KDError(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16", "float16", None):
        raise KDError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg['dtype']!r}")
    for key in ("model", "adapters", "data", "splits", "split", "out", "memory_budget"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
            raise KDError(f"{key} must be a path or name, got {cfg[key]!r}")
    subjects = cfg["subjects"]
    if isinstance(subjects, str):
        subjects = [s.strip() for s in subjects.split(",")]
    prepare_eval_out(cfg)
    cmmlu = load_eval_data(cfg["data"])
    questions = pick_questions(cmmlu, cfg["splits"], cfg["split"], subjects, cfg["limit"])
    budget = parse_bytes(cfg["memory_budget"]) if cfg["memory_budget"] is not None else None
    if progress and (advice := linux_blas_advice()):
        click.echo(advice, err=True)
    em = load_eval_model(cfg["model"], cfg["adapters"], budget, cfg["dtype"], cfg["trust_remote_code"], cfg["bos"],
                         dequantize=cfg["dequantize"])
    result = evaluate_model(em, questions, dict(cmmlu.dev), table=cmmlu.subjects_table, shots=int(cfg["shots"]),
                            max_tokens=int(cfg["max_tokens"]), batch_size=int(cfg["batch_size"]),
                            reuse_prefix=bool(cfg["reuse_prefix"]),
                            reference=bool(cfg["reference"]), progress=progress)
    result.summary["shots"] = int(cfg["shots"])
    result.summary["adapters"] = cfg["adapters"]
    write_results(cfg["out"], result, cfg, overwrite=bool(cfg["overwrite"]))
    return result


# --------------------------------------------------------------------------------------------------- CLI
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config; flags override it.")
@click.option("--model", default=None, help="Model directory or hub id (student or teacher).")
@click.option("--adapters", default=None, help="LoRA adapter directory from training (e.g. RUN/best).")
@click.option("--memory-budget", default=None, help="Evaluate through the streaming teacher under this budget (16GB).")
@click.option("--data", default=None, help="CMMLU directory (dev/ test/) or hub id.")
@click.option("--splits", default=None, help="splits.json from `python -m kd_mlx.data split`.")
@click.option("--split", default=None, help="Split of splits.json to evaluate (default test).")
@click.option("--shots", type=int, default=None, help="Few-shot examples from dev/ (0 or 5; default 5).")
@click.option("--max-tokens", type=int, default=None, help="Prompt token limit (default 2048, capped by the context).")
@click.option("--batch-size", type=int, default=None, help="Questions per forward pass (default 8).")
@click.option("--subjects", default=None, help="Comma-separated subjects (default all).")
@click.option("--limit", type=int, default=None, help="At most this many questions per subject.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (auto: float32 on CPU, the checkpoint's on GPU).")
@click.option("--dequantize/--no-dequantize", default=None,
              help="Run a quantized model dequantized (default: yes on CPU, where quantized matmul is slow).")
@click.option("--bos/--no-bos", default=None, help="Prepend BOS (default: the tokenizer config's add_bos_token).")
@click.option("--reuse-prefix/--no-reuse-prefix", default=None, help="Share the few-shot prefix KV cache (default on).")
@click.option("--reference", is_flag=True, default=None, help="Plain one-question-at-a-time loop (slow; for checks).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow custom model/tokenizer code.")
@click.option("--out", default=None, help="Results directory (new, or --overwrite earlier eval results there).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace earlier eval results in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@cli_errors
def main(config_file, quiet, **flags) -> None:
    """Evaluate a model on CMMLU (official protocol)."""
    cfg = merge_config(load_yaml_config(config_file), flags, DEFAULTS)
    result = run_eval(cfg, progress=not quiet)
    s = result.summary
    cats = ", ".join(f"{c} {v:.2f}" for c, v in s["categories"].items())
    click.echo(f"overall {s['overall']:.2f}% over {len(s['subjects'])} subjects, {s['n_questions']} questions"
               f" ({s['throughput']['questions_per_s']:.2f} q/s); {cats}")
    click.echo(f"results in {cfg['out']}")


if __name__ == "__main__":
    main()
