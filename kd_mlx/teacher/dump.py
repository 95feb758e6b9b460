"""The teacher dump: CMMLU prompts through the streaming teacher into a logits store (kd_mlx/store.py).

  python -m kd_mlx.teacher dump --teacher DIR|HUB_ID --data CMMLU_DIR --splits splits.json --split train,val \
      --shots 5 --top-k 32 --positions question --memory-budget 16GB --encoding q8rice --out STORE
  mlx.launch -n 2 --backend ring -- python -m kd_mlx.teacher dump ...   (same flags: ranks share the shards)

Per question: the official k-shot prompt (shots dropped until it fits --max-tokens, as the evaluation does), the
full-vocabulary log-probs of "A".."D" at the answer position, top-k log-probs and ids at every position of the
chosen span (`answer`: the last prompt token only; `question`: the tokens of the question block after the shots;
`prompt`: every token), the tokens' character offsets, and optionally the final (normed) hidden state of the
last token.

Work unit = one shard of `--shard-size` questions in the global order: shard i holds questions i*N..(i+1)*N-1 and
is computed by the same teacher calls whoever computes it and whenever. That makes the store independent of
interruptions (kill -9, rerun: finished shards are kept, the rest recomputed) and of the number of ranks (shard i
goes to rank i % world); the finished store is byte-identical in every case. Inside a shard, questions with the
same few-shot prefix run as one teacher call with their common token prefix computed once.

At the end rank 0 writes manifest.json (after a barrier), quality.json (teacher accuracy per subject, captured
top-k mass and full-distribution entropy, non-finite counts: merged from per-shard statistics kept in each shard's
metadata, so a resumed dump reports the same) and dump_config.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..align import MidTokenProjector, MidTokenRows, VocabMap, concat_mid_rows
from ..data import (LETTERS, Question, answer_token_ids, build_prompt, load_cmmlu, load_splits, prompt_ids,
                    read_add_bos, split_questions)
from ..safetensors_io import check_weight_dtypes, read_header, read_metadata
from ..store import (ENCODINGS, MANIFEST, StoreRecord, StoreWriter, build_manifest, save_tokenizer_files,
                     sort_rows_by_value)
from ..tokenizer import load_tokenizer
from ..utils import (KDError, cli_errors, linux_blas_advice, load_yaml_config, merge_config, parse_bytes,
                     resolve_model_path, sha256_text, write_json_atomic)
from .streaming import StreamingTeacher

POSITIONS = ("answer", "question", "prompt")
TEMPLATE = "cmmlu-official"
# fixed histogram edges so per-shard statistics merge exactly
MASS_EDGES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0001]
ENTROPY_EDGES = [0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 1e9]

DEFAULTS: dict[str, Any] = {
    "teacher": None, "data": None, "splits": None, "split": "train", "shots": 5, "top_k": 32,
    "positions": "question", "memory_budget": None, "encoding": "q8rice", "shard_size": 64, "hidden": False,
    "out": None, "max_questions": None, "max_tokens": 2048, "add_bos": None, "trust_remote_code": False,
    "student_tokenizer": None, "temperatures": "1", "lookahead": None,
}


# ----------------------------------------------------------------------------------------------------------
# identity


def template_hash() -> str:
    """Hash of the prompt template as rendered for a fixed synthetic question with one shot: changes whenever
    the header, the question block or the shot format changes."""
    q = Question(id="x/test/0", subject="computer_science", split="test", index=0, question="Q?",
                 choices=("a", "b", "c", "d"), answer="A")
    s = Question(id="x/dev/0", subject="computer_science", split="dev", index=0, question="S?",
                 choices=("e", "f", "g", "h"), answer="B")
    p = build_prompt(q, [s])
    return sha256_text(p.prefix + "\x1f" + p.suffix)[:16]


def teacher_fingerprint(model_dir: Path) -> tuple[str, str]:
    """(config hash, weights hash): config.json's content, and per weight file its name, size, safetensors header
    and the first and last MiB of its data (cheap even for a 1 TB checkpoint, yet another re-quantisation or
    other weights of the same shapes change it). Independent of the directory's name or path. Also refuses a header
    that gives a tensor a dtype no weight has (a flipped header byte), before any compute."""
    cfg = model_dir / "config.json"
    ch = sha256_text(cfg.read_bytes()) if cfg.exists() else "none"
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(read_header(f))
    check_weight_dtypes(tensors)
    for f in files:
        entries = {k: [t.dtype, list(t.shape), t.start, t.end] for k, t in tensors.items() if t.file == f}
        start = min((t.start for t in tensors.values() if t.file == f), default=8)
        size = f.stat().st_size
        h.update(f"{f.name}\x1f{size}\x1f".encode())
        h.update(json.dumps([entries, read_metadata(f)], sort_keys=True).encode())
        with open(f, "rb") as fh:
            if size - start <= 2 << 20:
                h.update(fh.read())
            else:
                fh.seek(start)
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return ch[:16], h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# per-question work


@dataclass
class PromptItem:
    """One question's teacher input: token ids (BOS included), char offsets, top-k positions, shared-prefix key."""

    qid: str
    subject: str
    label: int
    ids: list[int]
    offsets: list[tuple[int, int]]
    positions: list[int]
    prefix_key: str
    truncated: bool
    text: str  # the prompt text the ids encode


def build_items(questions, cmmlu, tokenizer, shots: int, positions: str, max_tokens: int | None, add_bos: bool
                ) -> list[PromptItem]:
    """The prompt of each question as the evaluation builds it (fit_prompt with the teacher's token count)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    items = []
    for q in questions:
        pt = prompt_ids(q, cmmlu.dev.get(q.subject, []), tokenizer, shots, max_tokens, bool(bos), offsets=True)
        p, ids, offs, truncated = pt.prompt, pt.ids, pt.offsets, pt.truncated
        n = len(ids)
        if positions == "answer":
            pos = [n - 1]
        elif positions == "question":
            pos = [i for i, (a, _) in enumerate(offs) if a >= len(p.prefix) and not (i < len(bos))] or [n - 1]
            pos = list(range(pos[0], n))  # contiguous up to the answer position
        else:
            pos = list(range(n))
        items.append(PromptItem(q.id, q.subject, LETTERS.index(q.answer) if q.answer in LETTERS else -1, ids,
                                offs, pos, p.prefix, truncated, p.text))
    return items


def _prefix_groups(items: Sequence[PromptItem]) -> list[list[int]]:
    """Indices grouped by few-shot prefix text, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.prefix_key, []).append(i)
    return list(groups.values())


def _shared_len(items: Sequence[PromptItem], group: Sequence[int]) -> int:
    """Tokens computed once for the group: their common prefix, short of every top-k position and last token."""
    if len(group) < 2:
        return 0
    seqs = [items[i].ids for i in group]
    n = min(len(s) for s in seqs)
    L = 0
    while L < n and all(s[L] == seqs[0][L] for s in seqs):
        L += 1
    return max(0, min([L] + [items[i].positions[0] for i in group] + [len(s) - 1 for s in seqs]))


class Summariser:
    """The `reduce` given to the teacher: full-vocab log-probs (p, V) of one question -> what the store keeps
    plus the per-position statistics (entropy, captured mass), so the (p, V) array is dropped at once.

    What exact token targets need from the full row is kept here too: log sum_v exp(lp_v / T) for every named
    temperature T != 1, and, given `student_id` (VocabMap.student_id: teacher id -> student first token), the
    full-row (tempered) mass of each top-k slot's student class."""

    def __init__(self, k: int, answer_ids: Sequence[int], temperatures: Sequence[float] = (1.0,),
                 student_id: np.ndarray | None = None):
        self.k = k
        self.answer_ids = np.asarray(answer_ids, np.int64)
        self.temperatures = sorted({1.0, *map(float, temperatures)})
        self.student_id = None if student_id is None else np.asarray(student_id, np.int64)

    def __call__(self, lp: np.ndarray) -> dict:
        lp = np.asarray(lp, np.float32)
        k = min(self.k, lp.shape[1])
        part = np.argpartition(-lp, k - 1, axis=1)[:, :k]
        # argpartition picks any of the values tied at the k-th place; keep the lowest ids (the reference rule)
        thr = np.take_along_axis(lp, part, 1).min(axis=1)
        for r in np.flatnonzero((lp >= thr[:, None]).sum(axis=1) > k):
            above = np.flatnonzero(lp[r] > thr[r])
            part[r] = np.concatenate([above, np.flatnonzero(lp[r] == thr[r])[: k - len(above)]])
        ids, vals = sort_rows_by_value(part.astype(np.int32), np.take_along_axis(lp, part, 1))
        p = np.exp(lp)
        ent = -(p * np.where(p > 0, lp, 0.0)).sum(axis=1, dtype=np.float64)  # 0 log 0 = 0
        logz, cmass = self.full_row_terms(lp, ids)
        return {"topk_ids": ids, "topk_logprobs": vals, "answer": lp[-1, self.answer_ids].astype(np.float32),
                "entropy": ent, "mass": np.exp(vals.astype(np.float64)).sum(axis=1), "logz": logz,
                "class_mass": cmass, "nonfinite": int((~np.isfinite(vals)).sum() + (~np.isfinite(ent)).sum())}

    def full_row_terms(self, lp: np.ndarray, ids: np.ndarray) -> tuple[dict, dict]:
        """({T: (p,) log-normaliser}, {T: (p, k) class mass per slot}) of full rows `lp` (p, V), top-k `ids`."""
        logz, cmass = {}, {}
        lp64 = lp.astype(np.float64)
        for t in self.temperatures:
            z = lp64 / t
            lz = np.logaddexp.reduce(z, axis=1) if t != 1.0 else np.zeros(len(lp64))
            if t != 1.0:
                logz[t] = lz.astype(np.float32)
            if self.student_id is None:
                continue
            V = lp.shape[1]
            sid = np.full(V, -1, np.int64)  # teacher ids beyond the tokenizer (a padded head) map to nothing
            sid[: min(V, len(self.student_id))] = self.student_id[:V]
            n_cls = int(sid.max()) + 2
            slot_cls = sid[ids] + 1  # 0 = unmappable
            cm = np.zeros(ids.shape, np.float64)
            for r in range(len(lp64)):
                totals = np.bincount(sid + 1, weights=np.exp(z[r] - lz[r]), minlength=n_cls)
                cm[r] = np.where(slot_cls[r] > 0, totals[slot_cls[r]], 0.0)
            cmass[t] = cm.astype(np.float32)
        return logz, cmass


def reference_summary(lp: np.ndarray, k: int, answer_ids: Sequence[int], temperatures: Sequence[float] = (1.0,),
                      student_id: np.ndarray | None = None) -> dict:
    """Plain version of Summariser: a full stable sort per row, per-token loops for the full-row terms."""
    lp = np.asarray(lp, np.float32)
    ids, vals, logz, cmass = [], [], {}, {}
    for row in lp:
        order = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k]
        ids.append(order)
        vals.append(row[order])
    for t in sorted({1.0, *map(float, temperatures)}):
        zs = [float(np.log(sum(np.exp(float(x) / t) for x in row))) for row in lp]
        if t != 1.0:
            logz[t] = np.array(zs, np.float32)
        if student_id is not None:
            rows = []
            for row, z, top in zip(lp, zs, ids):
                acc: dict[int, float] = {}
                for v, x in enumerate(row):
                    acc[int(student_id[v])] = acc.get(int(student_id[v]), 0.0) + float(np.exp(float(x) / t - z))
                rows.append([acc[int(student_id[v])] if student_id[v] >= 0 else 0.0 for v in top])
            cmass[t] = np.array(rows, np.float32)
    return {"topk_ids": np.array(ids, np.int32), "topk_logprobs": np.array(vals, np.float32),
            "answer": lp[-1, list(answer_ids)].astype(np.float32), "logz": logz, "class_mass": cmass}


class HiddenCapturingTeacher(StreamingTeacher):
    """StreamingTeacher that also keeps the final normed hidden states the LM head is applied to.

    `_run_chunk` applies `_head` once per chunk to the rows of all asked positions, in the order in which `reduce`
    is then called per sequence: each reduce call takes its own rows from the front."""

    captured: np.ndarray | None = None
    cursor = 0

    def _head(self, x):
        self.captured = np.array(x.astype(mx.float32))
        self.cursor = 0
        return super()._head(x)

    def take_hidden(self, n_rows: int) -> np.ndarray:
        rows = self.captured[self.cursor:self.cursor + n_rows]
        self.cursor += n_rows
        return rows


def _new_stats() -> dict:
    return {"rows": 0, "positions": 0, "subjects": {}, "mass_hist": [0] * (len(MASS_EDGES) - 1),
            "entropy_hist": [0] * (len(ENTROPY_EDGES) - 1), "mass_sum": 0.0, "entropy_sum": 0.0,
            "mass_min": None, "nonfinite": 0, "truncated": 0}


# bytes per asked position while the teacher turns hidden states into full-vocabulary log-probs (fp32 logits,
# the float64 log-softmax and its temporaries, the float32 result, the per-sequence copy)
LOGIT_BYTES_PER_ENTRY = 28


def max_call_positions(vocab: int, memory_budget: int | None) -> int:
    """Top-k positions per teacher call so that its full-vocabulary log-probs stay within a quarter of the budget
    (4 GiB without one): the teacher returns a whole chunk's rows at once, before `reduce` drops them."""
    cap = memory_budget // 4 if memory_budget else 4 << 30
    return max(1, cap // (vocab * LOGIT_BYTES_PER_ENTRY))


def _split_by_positions(items: Sequence[PromptItem], group: Sequence[int], limit: int | None) -> list[list[int]]:
    if not limit:
        return [list(group)]
    parts, cur, n = [], [], 0
    for i in group:
        p = len(items[i].positions)
        if cur and n + p > limit:
            parts.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += p
    return parts + [cur]


def compute_shard(teacher, items: Sequence[PromptItem], k: int, answer_ids: Sequence[int], hidden: bool,
                  max_positions: int | None = None, temperatures: Sequence[float] = (1.0,),
                  student: StudentSide | None = None) -> tuple[list[StoreRecord], dict]:
    """Records of one shard's questions (one teacher call per prefix group, split so that no call asks for more
    than `max_positions` top-k rows) and their statistics; with a `student` side also the class masses and the
    mid-token rows, from the full rows."""
    summarise = Summariser(k, answer_ids, temperatures, None if student is None else student.student_id)
    out: dict[int, tuple[dict, np.ndarray | None]] = {}
    groups = [g for pg in _prefix_groups(items) for g in _split_by_positions(items, pg, max_positions)]
    for group in groups:
        L = _shared_len(items, group)
        seqs = [items[i].ids[L:] for i in group]
        pos = [[p - L for p in items[i].positions] for i in group]

        def reduce(lp, j):
            s = summarise(lp)
            if student is not None:
                it = items[group[j]]
                s["mid"] = student.mid.rows(lp, it.ids, it.positions, it.text)
                if student.lookahead == 0:  # the real next token's split needs only rows this call has
                    row = {int(p): r for r, p in enumerate(it.positions)}
                    s["mid"] = concat_mid_rows([s["mid"], boundary_rows(student, it.ids, it.positions, it.text,
                                                                        lambda i: lp[row[i]])])
            h = teacher.take_hidden(lp.shape[0])[-1].copy() if hidden else None
            return s, h

        res = teacher.logprobs_at(seqs, pos, prefix=items[group[0]].ids[:L] if L else None, reduce=reduce)
        for i, r in zip(group, res):
            if student is not None and student.lookahead:  # after the call: it runs the teacher again
                r[0]["mid"] = concat_mid_rows([r[0]["mid"], looked_ahead_rows(teacher, student, items[i])])
            out[i] = r
    recs, st = [], _new_stats()
    for i, it in enumerate(items):
        s, h = out[i]
        recs.append(StoreRecord(
            id=it.qid, answer_logprobs=s["answer"], token_ids=np.asarray(it.ids, np.int32),
            offsets=np.asarray(it.offsets, np.int32).reshape(-1, 2), positions=np.asarray(it.positions, np.int32),
            topk_ids=s["topk_ids"], topk_logprobs=s["topk_logprobs"], hidden=h, label=it.label, logz=s["logz"],
            class_mass=s["class_mass"], mid=s.get("mid")))
        _add_stats(st, it, s)
    st["mass_sum"], st["entropy_sum"] = round(st["mass_sum"], 6), round(st["entropy_sum"], 6)
    return recs, st


def _add_stats(st: dict, it: PromptItem, s: dict) -> None:
    if it.label >= 0:  # teacher accuracy over answered questions only (a transfer set has no gold)
        sub = st["subjects"].setdefault(it.subject, [0, 0])
        sub[0] += int(int(np.argmax(s["answer"])) == it.label)
        sub[1] += 1
    st["rows"] += 1
    st["positions"] += len(it.positions)
    st["truncated"] += int(it.truncated)
    mass, ent = s["mass"], s["entropy"]
    st["mass_hist"] = [a + b for a, b in zip(st["mass_hist"], np.histogram(mass, MASS_EDGES)[0].tolist())]
    st["entropy_hist"] = [a + b for a, b in zip(st["entropy_hist"], np.histogram(ent, ENTROPY_EDGES)[0].tolist())]
    st["mass_sum"] += float(mass.sum())
    st["entropy_sum"] += float(ent.sum())
    mmin = float(mass.min())
    st["mass_min"] = mmin if st["mass_min"] is None else min(st["mass_min"], mmin)
    st["nonfinite"] += s["nonfinite"] + int((~np.isfinite(s["answer"])).sum())


def quality_report(store: Path, manifest: dict) -> dict:
    """Merge the per-shard statistics into the dump's quality report."""
    tot = _new_stats()
    for sh in manifest["shards"]:
        meta = read_metadata(store / sh["file"])
        if "quality" not in meta:
            raise KDError(f"{sh['file']}: no quality statistics (not written by the dump)")
        q = json.loads(meta["quality"])
        for key in ("rows", "positions", "nonfinite", "truncated"):
            tot[key] += q[key]
        for key in ("mass_sum", "entropy_sum"):
            tot[key] += q[key]
        for key in ("mass_hist", "entropy_hist"):
            tot[key] = [a + b for a, b in zip(tot[key], q[key])]
        if q["mass_min"] is not None:
            tot["mass_min"] = q["mass_min"] if tot["mass_min"] is None else min(tot["mass_min"], q["mass_min"])
        for s, (c, n) in q["subjects"].items():
            a = tot["subjects"].setdefault(s, [0, 0])
            a[0] += c
            a[1] += n
    subjects = {s: {"accuracy": round(100.0 * c / n, 2), "correct": c, "n": n}
                for s, (c, n) in sorted(tot["subjects"].items())}
    correct, n = sum(v["correct"] for v in subjects.values()), sum(v["n"] for v in subjects.values())
    P = max(tot["positions"], 1)
    return {
        "questions": tot["rows"], "topk_positions": tot["positions"], "k": manifest["k"],
        "accuracy": round(100.0 * correct / max(n, 1), 2),
        "accuracy_mean_over_subjects": round(float(np.mean([v["accuracy"] for v in subjects.values()])), 2)
        if subjects else None,
        "subjects": subjects,
        "captured_mass": {"mean": round(tot["mass_sum"] / P, 6), "min": tot["mass_min"], "edges": MASS_EDGES,
                          "hist": tot["mass_hist"]},
        "entropy_nats": {"mean": round(tot["entropy_sum"] / P, 6), "edges": ENTROPY_EDGES,
                         "hist": tot["entropy_hist"]},
        "nonfinite_values": tot["nonfinite"], "truncated_prompts": tot["truncated"],
    }


# ----------------------------------------------------------------------------------------------------------
# distributed helpers (mx.distributed; a plain run is a group of one)


def _group():
    return mx.distributed.init()


def _all_gather_bytes(group, data: bytes, width: int = 32) -> list[bytes]:
    """Each rank's `width` bytes of `data` (zero padded), gathered on every rank."""
    if group.size() == 1:
        return [data[:width].ljust(width, b"\0")]
    a = mx.array(np.frombuffer(data[:width].ljust(width, b"\0"), np.uint8).astype(np.int32))
    g = np.array(mx.distributed.all_gather(a, group=group, stream=mx.cpu)).reshape(group.size(), width)
    return [bytes(r.astype(np.uint8)) for r in g]


def _all_ok(group, ok: bool) -> bool:
    """Barrier: True only if every rank reports ok (a tiny all_sum)."""
    if group.size() == 1:
        return ok
    s = mx.distributed.all_sum(mx.array([1 if ok else 0], mx.int32), group=group, stream=mx.cpu)
    return int(np.array(s)[0]) == group.size()


# ----------------------------------------------------------------------------------------------------------
# the driver


def parse_temperatures(v: Any) -> list[float]:
    """"1,2" or [1, 2] -> [1.0, 2.0] (1 always included; each > 0 and finite)."""
    items = v if isinstance(v, (list, tuple)) else [x for x in str(v).split(",") if x.strip()]
    try:
        ts = sorted({1.0, *(float(x) for x in items)})
    except ValueError:
        raise KDError(f"--temperatures wants numbers like 1,2, got {v!r}") from None
    if not all(t > 0 and np.isfinite(t) for t in ts):
        raise KDError(f"--temperatures must be finite numbers > 0, got {v!r}")
    return ts


@dataclass
class DumpSettings:
    teacher: str
    data: str
    out: Path
    positions: str
    encoding: str
    k: int
    shots: int
    shard_size: int
    max_tokens: int | None
    budget: int | None
    temperatures: list[float]
    lookahead: int | None = None


def check_settings(cfg: dict) -> DumpSettings:
    """Every flag checked before anything is loaded (one-line KDErrors)."""
    for key in ("teacher", "data", "out"):
        if not cfg[key]:
            raise KDError(f"dump needs --{key}")
    if cfg["positions"] not in POSITIONS:
        raise KDError(f"--positions must be one of {', '.join(POSITIONS)}, not {cfg['positions']!r}")
    if cfg["encoding"] not in ENCODINGS:
        raise KDError(f"--encoding must be one of {', '.join(ENCODINGS)}, not {cfg['encoding']!r}")
    k, shots, shard_size = int(cfg["top_k"]), int(cfg["shots"]), int(cfg["shard_size"])
    if k < 1 or shard_size < 1 or shots < 0:
        raise KDError("--top-k and --shard-size must be >= 1, --shots >= 0")
    budget = None if cfg["memory_budget"] in (None, "", "none", "None") else parse_bytes(cfg["memory_budget"])
    lookahead = check_lookahead(cfg.get("lookahead"), cfg.get("student_tokenizer"))
    if lookahead and budget is not None:
        raise KDError("--lookahead > 0 runs the teacher once more per row with the whole model in memory: not with "
                      "--memory-budget (--lookahead 0 streams)")
    return DumpSettings(str(cfg["teacher"]), str(cfg["data"]), Path(cfg["out"]), str(cfg["positions"]),
                        str(cfg["encoding"]), k, shots, shard_size, int(cfg["max_tokens"]) if cfg["max_tokens"] else
                        None, budget, parse_temperatures(cfg["temperatures"]), lookahead)


def check_lookahead(lookahead: Any, student_tokenizer: str | None) -> int | None:
    """--lookahead as an int >= 0 (None: no boundary rows); it needs a student tokenizer."""
    if lookahead in (None, ""):
        return None
    try:
        n = int(lookahead)
    except (TypeError, ValueError):
        raise KDError(f"--lookahead must be an integer >= 0, got {lookahead!r}") from None
    if n < 0:
        raise KDError(f"--lookahead must be an integer >= 0, got {lookahead!r}")
    if not student_tokenizer:
        raise KDError("--lookahead needs --student-tokenizer (boundary rows are over the student's tokens)")
    return n


def select_questions(cfg: dict):
    """(cmmlu, questions in dump order)."""
    cmmlu = load_cmmlu(cfg["data"])
    if cfg["splits"]:
        names = [s.strip() for s in str(cfg["split"]).split(",") if s.strip()]
        questions = split_questions(cmmlu, load_splits(cfg["splits"]), names)
    else:
        questions = cmmlu.test_questions()
    if cfg["max_questions"]:
        questions = questions[: int(cfg["max_questions"])]
    if not questions:
        raise KDError("no questions to dump")
    cmmlu.check_shots({q.subject for q in questions}, int(cfg["shots"]))  # every subject, before any compute
    return cmmlu, questions


@dataclass
class StudentSide:
    """What the dump keeps for one student tokenizer: its fingerprint, the class map (teacher id -> student
    first token) and the mid-token projector."""

    fingerprint: str
    student_id: np.ndarray
    mid: MidTokenProjector
    lookahead: int | None = None  # boundary rows with this many look-ahead branches per row (None: no such rows)
    lookahead_min_mass: float = 0.01  # a branch only for teacher tokens at least this probable


def boundary_rows(student: StudentSide, ids: Sequence[int], positions: Sequence[int], text: str,
                  row_at: Callable[[int], np.ndarray], branched: tuple[list, Sequence[np.ndarray]] = ([], [])
                  ) -> MidTokenRows:
    """Rows at the boundaries the teacher's and the student's encodings of `text` share (stored with nbytes 0) for
    the record's `positions` i whose next position is one too. Where the student's first token of a teacher
    candidate c may be longer than c (it merges c with what follows), c's mass follows the teacher's next token
    after c: for the real next token from the row at i + 1 (`row_at(i + 1)`: the full row at a teacher position);
    for others from `branched` = (branches (i, c), their rows), one teacher step each (`branch_logprobs`)."""
    proj = student.mid
    row_of = {int(i): r for r, i in enumerate(positions)}
    at = [i for i in proj.boundary_positions(ids, text) if i in row_of and i + 1 in row_of]
    looks: dict[int, list] = {i: [(int(ids[i + 1]), row_at(i + 1))] for i in at}
    for (i, c), lq in zip(*branched):
        if i in looks:
            looks[i].append((int(c), lq))
    got = [proj.boundary_row(row_at(i), looks[i]) for i in at]
    m = max([len(g[0]) for g in got] + [1])
    ids_a, probs_a = np.full((len(got), m), -1, np.int32), np.zeros((len(got), m), np.float32)
    for j, (a, b) in enumerate(got):
        ids_a[j, : len(a)], probs_a[j, : len(b)] = a, b
    return MidTokenRows(np.array([row_of[i] for i in at], np.int32), np.zeros(len(at), np.int32), ids_a, probs_a)


def looked_ahead_rows(teacher, student: StudentSide, it: PromptItem) -> MidTokenRows:
    """`boundary_rows` of one item with `student.lookahead` teacher steps per boundary (the teacher run again on
    the item, whole model in memory), for its most probable candidates the student may merge."""
    proj, ids = student.mid, it.ids
    at = proj.boundary_positions(ids, it.text)

    def choose(rows: np.ndarray) -> list[tuple[int, int]]:
        return [(i, c) for i in at for c in proj.lookahead_candidates(rows[i], student.lookahead,
                                                                    student.lookahead_min_mass, skip=int(ids[i + 1]))]

    rows, branches, after = teacher.branch_logprobs(ids, choose)
    return boundary_rows(student, ids, it.positions, it.text, rows.__getitem__, (branches, after))


def student_side(teacher_tok, student_tokenizer: str | None, k: int, lookahead: int | None = None
                 ) -> StudentSide | None:
    """The student side for --student-tokenizer; None without one or when it is the teacher's own tokenizer (the
    class of a token is then itself and every boundary is shared: nothing to keep)."""
    if not student_tokenizer:
        return None
    student_tok = load_tokenizer(resolve_model_path(str(student_tokenizer)))
    vmap = VocabMap.build(teacher_tok, student_tok)
    if vmap.is_identity:
        return None
    return StudentSide(student_tok.fingerprint(), vmap.student_id,
                       MidTokenProjector(teacher_tok, student_tok, k, vmap.student_id), lookahead)


def make_identity(st: DumpSettings, teacher, model_dir: Path, add_bos: bool, answer_ids: Sequence[int],
                  hidden: bool, student: StudentSide | None) -> dict:
    """What makes two dumps interchangeable: the teacher by content (config + weights hashes, never its path),
    the tokenizers, the prompt template and every flag that changes the rows."""
    conf_hash, weights_hash = teacher_fingerprint(model_dir)
    return {
        "teacher_config_hash": conf_hash, "teacher_weights_hash": weights_hash,
        "model_type": teacher.config.get("model_type"), "tokenizer": teacher.tokenizer.fingerprint(),
        "template": TEMPLATE, "template_hash": template_hash(), "shots": st.shots, "positions": st.positions,
        "k": st.k, "encoding": st.encoding, "hidden_dim": int(teacher.config["hidden_size"]) if hidden else 0,
        "max_tokens": st.max_tokens, "add_bos": add_bos, "answer_token_ids": [int(a) for a in answer_ids],
        "temperatures": st.temperatures, "student_tokenizer": student and student.fingerprint,
        **({"mid_token_rows": True} if student else {}), **boundary_identity(student),
    }


def boundary_identity(student: StudentSide | None) -> dict:
    return {"boundary_rows": {"lookahead": student.lookahead, "min_mass": student.lookahead_min_mass}} \
        if student is not None and student.lookahead is not None else {}


def check_ranks_agree(group, identity: dict, ids: Sequence[str], st: DumpSettings) -> None:
    plan_hash = sha256_text(json.dumps({"identity": identity, "ids": list(ids), "shard_size": st.shard_size,
                                        "out": str(st.out.resolve())}, sort_keys=True))
    hashes = _all_gather_bytes(group, plan_hash.encode())
    if len(set(hashes)) > 1:
        bad = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise KDError(f"ranks disagree on the dump configuration (rank(s) {bad} differ from rank 0 in teacher, "
                      f"tokenizer, data, splits, flags or --out): run every rank with the same command and files")


def plan_shards(writer: StoreWriter, ids: Sequence[str], st: DumpSettings) -> tuple[list[list[str]], list[int]]:
    """(question ids of every shard, shards this rank computes: missing, damaged or a prefix to be grown)."""
    n_shards = (len(ids) + st.shard_size - 1) // st.shard_size
    planned = [list(ids[i * st.shard_size:(i + 1) * st.shard_size]) for i in range(n_shards)]
    todo = []
    for s in range(n_shards):
        have = writer.shard_ids.get(s)
        if have == planned[s]:
            continue
        if have is not None and not (len(have) < len(planned[s]) and planned[s][:len(have)] == have):
            raise KDError(f"store {st.out} holds other questions in {s:06d} than this dump plans there (different "
                          f"--split/--splits/--max-questions?): use another --out")
        if s % writer.world == writer.rank:
            todo.append(s)
    extra = [s for s in writer.shard_ids if s >= n_shards]
    if extra:
        raise KDError(f"store {st.out} has {len(extra)} shard(s) beyond the {n_shards} this dump plans (a larger "
                      f"question set was dumped here): use another --out")
    return planned, todo


def dump_store(cfg: dict, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Run the dump described by `cfg` (keys of DEFAULTS). Returns {"manifest", "quality", ...} on rank 0."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    st = check_settings(cfg)
    group = _group()
    rank, world = group.rank(), group.size()

    model_dir = Path(resolve_model_path(st.teacher))
    cls = HiddenCapturingTeacher if cfg["hidden"] else StreamingTeacher
    teacher = cls(model_dir, st.budget, trust_remote_code=bool(cfg["trust_remote_code"]))
    tok = teacher.tokenizer
    if st.k > teacher.vocab_size:
        raise KDError(f"--top-k {st.k} exceeds the teacher's vocabulary ({teacher.vocab_size})")
    answer_ids = answer_token_ids(tok)
    add_bos = read_add_bos(model_dir, tok) if cfg["add_bos"] is None else bool(cfg["add_bos"])
    student = student_side(tok, cfg["student_tokenizer"], st.k, st.lookahead)
    cmmlu, questions = select_questions(cfg)
    identity = make_identity(st, teacher, model_dir, add_bos, answer_ids, bool(cfg["hidden"]), student)
    ids = [q.id for q in questions]
    check_ranks_agree(group, identity, ids, st)

    writer = StoreWriter(st.out, identity, shard_size=st.shard_size, rank=rank, world=world)
    planned, todo = plan_shards(writer, ids, st)
    if rank == 0:
        save_tokenizer_files(st.out, model_dir, tok.fingerprint())
        done = sum(1 for s, want in enumerate(planned) if writer.shard_ids.get(s) == want)
        log(f"dump: {len(ids)} questions in {len(planned)} shard(s) of {st.shard_size}, {world} rank(s); {done} "
            f"already done" + (f"; {len(writer.damaged)} failed their hash and are recomputed" if writer.damaged
                               else ""))
    by_id = {q.id: q for q in questions}

    def compute(s: int) -> tuple[list[StoreRecord], dict]:
        items = build_items([by_id[i] for i in planned[s]], cmmlu, tok, st.shots, st.positions, st.max_tokens,
                            add_bos)
        return compute_shard(teacher, items, st.k, answer_ids, bool(cfg["hidden"]),
                             max_call_positions(teacher.vocab_size, st.budget), st.temperatures, student)

    t0 = time.perf_counter()
    write_shards(group, writer, todo, compute, progress)
    result = {"rank": rank, "world": world, "shards_written": len(todo), "wall_s": time.perf_counter() - t0,
              "teacher_wall_s": teacher.stats.wall_s, "tokens": teacher.stats.tokens}
    if rank != 0:
        return result
    return {**result, **finish_store(st.out, ids, {k_: cfg[k_] for k_ in DEFAULTS if k_ != "out"})}


def write_shards(group, writer: StoreWriter, todo: Sequence[int],
                 compute: Callable[[int], tuple[list[StoreRecord], dict]], progress: bool) -> None:
    """Compute and write this rank's shards; every rank stops together if one fails."""
    ok, err = True, None
    try:
        desc = f"rank {writer.rank} shards" if writer.world > 1 else "shards"
        for s in tqdm(todo, desc=desc, unit="shard", disable=not progress):
            recs, stats = compute(s)
            writer.write_shard(s, recs, {"quality": json.dumps(stats, sort_keys=True)})
    except BaseException as e:  # noqa: BLE001 - tell the other ranks before re-raising
        ok, err = False, e
    if not _all_ok(group, ok):
        if err is not None:
            raise err
        raise KDError("another rank failed (see its message); rerun the same command to resume")


def finish_store(out: Path, ids: Sequence[str], dump_config: dict) -> dict:
    """Rank 0, after the barrier: manifest.json, quality.json and dump_config.json (the flags, not --out: a store
    is the same wherever it lies)."""
    manifest = build_manifest(out, expected_ids=ids)
    quality = quality_report(out, manifest)
    write_json_atomic(out / "quality.json", quality)
    write_json_atomic(out / "dump_config.json", dump_config)
    return {"manifest": manifest, "quality": quality}


def dump_texts(teacher, texts: Sequence[str], out: str | Path, k: int, temperatures: Sequence[float] = (1.0,),
               student_tokenizer: str | None = None, encoding: str = "fp32", shard_size: int = 64,
               add_bos: bool = False, ids: Sequence[str] | None = None, progress: bool = False,
               lookahead: int | None = None) -> dict:
    """A store of plain texts (every position, `--positions prompt`), through the same shard computation as the
    CMMLU dump: for token-level distillation on text (kd_mlx.textkd). Resumable like the dump.

    `lookahead` (with a student tokenizer): also rows at the boundaries both encodings share (`boundary_rows`),
    with that many teacher steps per row for the candidates the student may merge with what follows (the teacher
    resident in memory); 0: only the real next token's split, from rows the dump has anyway (streamed too)."""
    tok = teacher.tokenizer
    st = DumpSettings("", "", Path(out), "prompt", encoding, int(k), 0, int(shard_size), None, None,
                      parse_temperatures(list(temperatures)))
    lookahead = check_lookahead(lookahead, student_tokenizer)
    if lookahead and not teacher.plan.resident:
        raise KDError("--lookahead > 0 needs the whole teacher in memory: run it without a memory budget")
    student = student_side(tok, student_tokenizer, st.k, lookahead)
    answer_ids = answer_token_ids(tok)
    conf_hash, weights_hash = teacher_fingerprint(Path(teacher.model_dir))
    identity = {"teacher_config_hash": conf_hash, "teacher_weights_hash": weights_hash,
                "tokenizer": tok.fingerprint(), "template": "text", "positions": "prompt", "k": st.k,
                "encoding": encoding, "hidden_dim": 0, "add_bos": add_bos, "temperatures": st.temperatures,
                "student_tokenizer": student and student.fingerprint, **({"mid_token_rows": True} if student else {}),
                **boundary_identity(student),
                "answer_token_ids": [int(a) for a in answer_ids]}
    ids = list(ids) if ids is not None else [f"text/{i:06d}" for i in range(len(texts))]
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    items = []
    for qid, text in zip(ids, texts):
        t_ids, offs = tok.encode_with_offsets(text)
        t_ids, offs = bos + list(t_ids), [(0, 0)] * len(bos) + [tuple(o) for o in offs]
        # one prefix group for all: a shard's texts go through the teacher in as few calls as the budget allows
        items.append(PromptItem(qid, "text", -1, t_ids, offs, list(range(len(t_ids))), "", False, text))
    by_id = {it.qid: it for it in items}
    writer = StoreWriter(st.out, identity, shard_size=st.shard_size)
    planned, todo = plan_shards(writer, ids, st)

    def compute(s: int) -> tuple[list[StoreRecord], dict]:
        return compute_shard(teacher, [by_id[i] for i in planned[s]], st.k, answer_ids, False, None,
                             st.temperatures, student)

    save_tokenizer_files(st.out, teacher.model_dir, tok.fingerprint())
    write_shards(_group(), writer, todo, compute, progress)
    return finish_store(st.out, ids, {"texts": len(texts), "k": st.k, "temperatures": st.temperatures,
                                      "student_tokenizer": student_tokenizer, "encoding": encoding})


def format_quality(q: dict, max_subjects: int = 10) -> str:
    lines = [f"teacher accuracy {q['accuracy']:.2f}% over {q['questions']} questions "
             f"(mean over {len(q['subjects'])} subjects {q['accuracy_mean_over_subjects']}%)"]
    for s, v in list(q["subjects"].items())[:max_subjects]:
        lines.append(f"  {s:<40} {v['accuracy']:6.2f}%  ({v['correct']}/{v['n']})")
    if len(q["subjects"]) > max_subjects:
        lines.append(f"  ... {len(q['subjects']) - max_subjects} more subjects in quality.json")
    m, e = q["captured_mass"], q["entropy_nats"]
    lines.append(f"top-{q['k']} captured mass: mean {m['mean']:.4f}, min {m['min']:.4f}; histogram "
                 + " ".join(f"[{a:g},{b:g}):{c}" for a, b, c in zip(m["edges"], m["edges"][1:], m["hist"])))
    lines.append(f"entropy (nats): mean {e['mean']:.3f}; histogram "
                 + " ".join(f"[{a:g},{b:g}):{c}" for a, b, c in zip(e["edges"], e["edges"][1:], e["hist"])))
    lines.append(f"non-finite values: {q['nonfinite_values']}; prompts cut to --max-tokens: {q['truncated_prompts']}")
    return "\n".join(lines)


@click.command()
@click.option("--teacher", default=None, help="teacher model directory or hub id (mlx-lm format)")
@click.option("--data", default=None, help="CMMLU directory (dev/ test/), zip or hub dataset id")
@click.option("--splits", default=None, help="splits.json (python -m kd_mlx.data split); omit: all test questions")
@click.option("--split", default=None, help="comma-separated split names (train)")
@click.option("--shots", type=int, default=None, help="few-shot examples per prompt (5)")
@click.option("--top-k", type=int, default=None, help="top-k log-probs kept per position (32)")
@click.option("--positions", type=click.Choice(POSITIONS), default=None,
              help="answer: last prompt token; question: the question block; prompt: every token (question)")
@click.option("--memory-budget", default=None, help="e.g. 16GB: hard limit for the streaming teacher")
@click.option("--encoding", default=None, help="top-k value encoding: fp32|fp16|q8|q8rice (q8rice)")
@click.option("--shard-size", type=int, default=None, help="questions per shard = unit of work and resume (64)")
@click.option("--hidden/--no-hidden", default=None, help="also keep the last token's final hidden state")
@click.option("--out", default=None, help="store directory")
@click.option("--max-questions", type=int, default=None, help="only the first N questions (demos)")
@click.option("--max-tokens", type=int, default=None, help="prompt token limit; shots dropped to fit (2048)")
@click.option("--add-bos/--no-add-bos", default=None, help="prepend BOS (default: the tokenizer config's choice)")
@click.option("--trust-remote-code", is_flag=True, default=None, help="allow the model's own tokenizer code")
@click.option("--student-tokenizer", default=None,
              help="student model/tokenizer dir: keep each top-k slot's full-row mass per student first token "
                   "(exact cross-tokenizer targets) and the rows at student positions inside a teacher token")
@click.option("--temperatures", default=None,
              help="token-KD temperatures to keep exact normalisers for, e.g. 1,2 (1)")
@click.option("--lookahead", type=int, default=None,
              help="with --student-tokenizer: rows at shared boundaries where a candidate the student merges with "
                   "what follows is split by the teacher's next token (0: the real next token only, streams; N: "
                   "also N more candidates per row, one teacher step each, whole model in memory)")
@click.option("--progress/--no-progress", default=True, help="progress bar")
@click.option("--config", "config_path", default=None, help="YAML config (flags win)")
@cli_errors
def dump(config_path, progress, **flags):
    """Teacher top-k log-probs and answer distributions of CMMLU prompts into a resumable logits store."""
    cfg = merge_config(load_yaml_config(config_path), flags, DEFAULTS)
    if (advice := linux_blas_advice()):
        click.echo(advice, err=True)
    res = dump_store(cfg, progress=progress, log=lambda m: click.echo(m, err=True))
    if "manifest" not in res:
        return
    m = res["manifest"]
    click.echo(format_quality(res["quality"]))
    click.echo(f"store {cfg['out']}: {m['num_rows']} questions, {m['num_positions']} top-k rows (k={m['k']}, "
               f"{m['encoding']}), {len(m['shards'])} shards; this run wrote {res['shards_written']} on rank 0 "
               f"in {res['wall_s']:.1f} s ({res['world']} rank(s)); {MANIFEST} and quality.json written")
