"""From questions + the teacher's store to training `Example`s in the student's token space.

For each question the run rebuilds the teacher's prompt text (same template, same shots as the dump) and checks it
against the store: the teacher tokenizer must re-encode the rebuilt text to exactly the stored token ids. Any
difference (another template, another number of shots, another teacher tokenizer) is refused with one line, before
any training. The student prompt is the same text when it fits the student's context, otherwise the official
rule (drop the longest shot) with the student's tokenizer; then token-level targets are only kept inside the
question part both prompts share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..utils import KDError
from .batches import Example


@dataclass
class StoreCheck:
    shots: int
    max_tokens: int | None
    add_bos: bool


def check_store_identity(store, teacher_tok, cfg: dict) -> StoreCheck:
    """Compare the store's identity with the run: teacher tokenizer fingerprint and shots (one-line errors)."""
    ident = store.identity
    fp = teacher_tok.fingerprint()
    if ident.get("tokenizer") not in (None, fp):
        raise KDError(f"store {store.path} was dumped with teacher tokenizer {ident['tokenizer']}, but the run's "
                      f"teacher tokenizer is {fp}: pass the teacher's tokenizer with --teacher-tokenizer")
    shots = cfg.get("shots")
    if shots is None:
        shots = ident.get("shots")
    if shots is None:
        raise KDError(f"store {store.path} does not say how many shots it used: set shots in the config")
    if ident.get("shots") is not None and int(ident["shots"]) != int(shots):
        raise KDError(f"store {store.path} was dumped with {ident['shots']} shots but the run asks for {shots}")
    max_tokens = ident.get("max_tokens")
    return StoreCheck(int(shots), int(max_tokens) if max_tokens else None, bool(ident.get("add_bos", False)))


class FirstTokenProjector:
    """Fallback teacher-id → student-id projection used only while `kd_mlx.align` is unavailable: a teacher token
    maps to the student token that is the longest prefix of its bytes (the student's first token of that text)."""

    def __init__(self, teacher_tok, student_tok):
        self.t, self.s = teacher_tok, student_tok
        self.by_bytes: dict[bytes, int] = {}
        for i in range(student_tok.vocab_size):
            try:
                b = student_tok.token_bytes(i)
            except Exception:
                continue
            if b and b not in self.by_bytes:
                self.by_bytes[b] = i
        self.max_len = max(len(b) for b in self.by_bytes)
        self.cache: dict[int, int] = {}

    def __call__(self, tid: int) -> int:
        w = self.cache.get(tid)
        if w is None:
            try:
                b = self.t.token_bytes(tid)
            except Exception:
                b = b""
            w = -1
            for n in range(min(len(b), self.max_len), 0, -1):
                if b[:n] in self.by_bytes:
                    w = self.by_bytes[b[:n]]
                    break
            self.cache[tid] = w
        return w


def project_positions(rec, t_offsets: np.ndarray, s_offsets: list[tuple[int, int]], shift: int, region_start: int,
                      project, max_positions: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token-level targets at student positions whose boundary coincides with a teacher boundary.

    Teacher row at position i is the distribution of token i+1; it is used where the teacher's token i+1 starts at
    a character c (in the shared question region) at which a student token j+1 also starts: the student's logits
    at j are then compared with the teacher's top-k projected onto student ids (mass summed per student id; ids
    that do not project go to the remainder, and so does the mass outside the top-k)."""
    s_start = {int(a): j for j, (a, _) in enumerate(s_offsets) if j > 0 and s_offsets[j - 1][1] == a}
    n_t = len(rec.token_ids)
    pos, ids, probs, rest = [], [], [], []
    for r, i in enumerate(rec.positions.tolist()):
        if i + 1 >= n_t:  # the answer position: covered by the answer loss
            continue
        c = int(t_offsets[i + 1][0])
        if c < region_start or int(t_offsets[i][1]) != c:  # outside the shared text, or not a clean boundary
            continue
        j1 = s_start.get(c - shift)
        if j1 is None:
            continue
        acc: dict[int, float] = {}
        for tid, lp in zip(rec.topk_ids[r].tolist(), rec.topk_logprobs[r].tolist()):
            w = project(int(tid))
            if w >= 0:
                acc[w] = acc.get(w, 0.0) + float(np.exp(lp))
        total = sum(acc.values())
        pos.append(j1 - 1)
        ids.append(list(acc))
        probs.append(list(acc.values()))
        rest.append(max(0.0, 1.0 - total))
    if max_positions is not None and len(pos) > max_positions:  # keep the ones nearest the answer
        pos, ids, probs, rest = pos[-max_positions:], ids[-max_positions:], probs[-max_positions:], rest[-max_positions:]
    m = max((len(x) for x in ids), default=1)
    ids_a = np.full((len(pos), m), -1, np.int32)
    probs_a = np.zeros((len(pos), m), np.float32)
    for r in range(len(pos)):
        ids_a[r, : len(ids[r])] = ids[r]
        probs_a[r, : len(probs[r])] = probs[r]
    return np.array(pos, np.int32), ids_a, probs_a, np.array(rest, np.float32)


def build_examples(questions: Sequence, cmmlu, store, teacher_tok, student_tok, cfg: dict, check: StoreCheck,
                   progress: bool = True, kind: str = "train") -> list[Example]:
    """Examples for `questions` (all must be in the store)."""
    from tqdm import tqdm

    from ..data import fit_prompt

    missing = [q.id for q in questions if q.id not in store]
    if missing:
        raise KDError(f"{len(missing)} {kind} question(s) are not in the store {store.path}, e.g. {missing[0]} "
                      f"(dump them first, or use the splits the store was made for)")
    project = FirstTokenProjector(teacher_tok, student_tok) if float(cfg["kd_weight"]) else None
    max_len = int(cfg["max_seq_len"])
    letters = "ABCD"
    out = []
    for q in tqdm(questions, desc=f"{kind} examples", disable=not progress, leave=False):
        rec = store[q.id]
        dev = cmmlu.dev.get(q.subject, [])
        bos = [teacher_tok.bos_id] if check.add_bos and teacher_tok.bos_id is not None else []
        t_prompt = fit_prompt(q, dev, check.shots, (lambda s: len(teacher_tok.encode(s)) + len(bos))
                              if check.max_tokens else None, check.max_tokens)
        t_ids = bos + teacher_tok.encode(t_prompt.text)
        if list(rec.token_ids) != t_ids:
            raise KDError(f"store prompt for {q.id} does not match the prompt this run builds (template, shots or "
                          f"teacher tokenizer differ from the dump: store identity {store.identity})")
        s_prompt = fit_prompt(q, dev, check.shots, student_tok.count, max_len)
        s_ids, s_offs = student_tok.encode_with_offsets(s_prompt.text)
        if len(s_ids) > max_len:
            raise KDError(f"{q.id}: the bare question is {len(s_ids)} student tokens, over max_seq_len={max_len}")
        gold = letters.index(q.answer) if q.answer in letters else int(rec.label)
        ex = Example(q.id, np.array(s_ids, np.int32), gold, rec.answer_probs)
        if project is not None and len(rec.positions):
            t_text, s_text = t_prompt.text, s_prompt.text
            shift = len(t_text) - len(s_text)
            # shared region: the whole text when identical, else the question part (the suffix)
            region = 0 if t_text == s_text else len(t_text) - len(t_prompt.suffix)
            t_offs = np.asarray(rec.offsets)  # one row per stored id (a BOS included), as positions index them
            ex.kd_pos, ex.kd_ids, ex.kd_probs, ex.kd_rest = project_positions(
                rec, t_offs, s_offs, shift, region, project, cfg.get("kd_max_positions"))
        out.append(ex)
    return out
