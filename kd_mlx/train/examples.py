"""From questions + the teacher's store to training `Example`s in the student's token space.

For each question the run rebuilds the teacher's prompt text (same template, same shots as the dump) and checks it
against the store: the teacher tokenizer must re-encode the rebuilt text to exactly the stored token ids. Any
difference (another template, another number of shots, another teacher tokenizer) is refused with one line, before
any training. The student prompt is the same text when it fits the student's context, otherwise the official
rule (drop the longest shot) with the student's tokenizer; then token-level targets come from `kd_mlx.align`
(teacher top-k projected onto student ids at positions where both tokenizers cut the shared text at the same byte,
or character with kd_align=chars), only inside the question part both prompts share.

The targets are exact where the store allows it: the full teacher row tempered at `kd_temperature` (the store must
keep log Z_T for it: `teacher dump --temperatures 1,T`), projected with the full-row class masses when the store was
dumped with this student's tokenizer (`teacher dump --student-tokenizer`); otherwise the top-k sum per student id
(a lower bound, the rest in the remainder), said once as a warning. Such a store also carries the rows at student
positions inside a teacher token (`kd_mlx.align.MidTokenRows`), used with kd_align bytes at kd_temperature 1.

Config keys read here: kd_weight, kd_align, kd_max_positions, kd_temperature, max_seq_len, shots, and
`verify_store` (default true; false = `--no-verify`: skip the once-per-run check of the shards' sha256).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ..align import VocabMap, align_record, align_record_bytes
from ..data import fit_prompt, prompt_ids
from ..store import identity_temperatures
from ..utils import KDError
from .batches import Example
from .config import TrainConfig


@dataclass
class StoreCheck:
    shots: int
    max_tokens: int | None
    add_bos: bool


def check_store_identity(store, teacher_tok, cfg: TrainConfig) -> StoreCheck:
    """Check the store before any example is built: its files against the manifest's sha256 (unless
    `verify_store` is false), answer rows that are distributions, the teacher tokenizer fingerprint, shots, and
    that a token-KD temperature != 1 has its stored log-normaliser (one-line errors)."""
    if cfg.verify_store:
        store.verify_hashes()
    store.check_answers()
    ident = store.identity
    fp = teacher_tok.fingerprint()
    if ident.get("tokenizer") not in (None, fp):
        raise KDError(f"store {store.path} was dumped with teacher tokenizer {ident['tokenizer']}, but the run's "
                      f"teacher tokenizer is {fp}: pass the teacher's tokenizer with --teacher-tokenizer")
    shots = cfg.shots
    if shots is None:
        shots = ident.get("shots")
    if shots is None:
        raise KDError(f"store {store.path} does not say how many shots it used: set shots in the config")
    if ident.get("shots") is not None and int(ident["shots"]) != int(shots):
        raise KDError(f"store {store.path} was dumped with {ident['shots']} shots but the run asks for {shots}")
    t_kd = float(cfg.kd_temperature)
    if cfg.kd_weight and t_kd not in identity_temperatures(ident):
        raise KDError(f"kd_temperature {t_kd:g} needs the full rows' log-normaliser at that temperature, and store "
                      f"{store.path} keeps it for {identity_temperatures(ident)}: re-dump with --temperatures "
                      f"1,{t_kd:g} or set kd_temperature to one of those")
    max_tokens = ident.get("max_tokens")
    return StoreCheck(int(shots), int(max_tokens) if max_tokens else None, bool(ident.get("add_bos", False)))


def build_examples(questions: Sequence, cmmlu, store, teacher_tok, student_tok, cfg: TrainConfig, check: StoreCheck,
                   progress: bool = True, kind: str = "train") -> list[Example]:
    """Examples for `questions` (all must be in the store)."""
    missing = [q.id for q in questions if q.id not in store]
    if missing:
        raise KDError(f"{len(missing)} {kind} question(s) are not in the store {store.path}, e.g. {missing[0]} "
                      f"(dump them first, or use the splits the store was made for)")
    vmap = VocabMap.build(teacher_tok, student_tok) if cfg.kd_weight else None
    exact = vmap is not None and (vmap.is_identity
                                  or store.identity.get("student_tokenizer") == student_tok.fingerprint())
    if vmap is not None and not exact:
        warnings.warn(f"store {store.path} has no class masses for the student tokenizer {student_tok.fingerprint()}: "
                      f"token-KD targets are top-k sums per student id, tail mass of listed ids counted as remainder "
                      f"(teacher dump --student-tokenizer makes them exact)", stacklevel=2)
    t_kd = float(cfg.kd_temperature)
    by_bytes = cfg.kd_align == "bytes"
    if exact and store.identity.get("mid_token_rows") and (t_kd != 1.0 or not by_bytes):
        warnings.warn(f"store {store.path} has mid-token rows (targets inside teacher tokens); they are used with "
                      f"kd_align bytes at kd_temperature 1 only, this run has {cfg.kd_align} at {t_kd:g}",
                      stacklevel=2)
    max_len = cfg.max_seq_len
    out = []
    for q in tqdm(questions, desc=f"{kind} examples", disable=not progress, leave=False):
        rec = store[q.id]
        if not exact:  # class masses and mid-token rows belong to another student tokenizer
            rec = replace(rec, class_mass={}, mid=None)
        dev = cmmlu.dev.get(q.subject, [])
        t = prompt_ids(q, dev, teacher_tok, check.shots, check.max_tokens,
                       check.add_bos and teacher_tok.bos_id is not None)
        t_prompt = t.prompt
        if list(rec.token_ids) != t.ids:
            raise KDError(f"store prompt for {q.id} does not match the prompt this run builds (template, shots or "
                          f"teacher tokenizer differ from the dump: store identity {store.identity})")
        s_prompt = fit_prompt(q, dev, check.shots, student_tok.count, max_len)
        s_ids, s_offs = student_tok.encode_with_offsets(s_prompt.text)
        if len(s_ids) > max_len:
            raise KDError(f"{q.id}: the bare question is {len(s_ids)} student tokens, over max_seq_len={max_len}")
        gold = q.answer_index if q.answer else int(rec.label)  # -1: no answer (transfer set), no CE
        ex = Example(q.id, np.array(s_ids, np.int32), gold, rec.answer_probs)
        if vmap is not None and len(rec.positions):
            t_text, s_text = t_prompt.text, s_prompt.text
            # shared region: the whole text when identical, else the question part (the suffix)
            region = 0 if t_text == s_text else len(t_text) - len(t_prompt.suffix)
            if by_bytes:  # boundaries compared in bytes: also where both cut inside one character
                ex.kd_pos, ex.kd_ids, ex.kd_probs, ex.kd_rest = align_record_bytes(
                    rec, s_ids, t_text, s_text, region, vmap, cfg.kd_max_positions, t_kd)
            else:
                t_offs = np.asarray(rec.offsets)  # one row per stored id (a BOS included), as positions index them
                ex.kd_pos, ex.kd_ids, ex.kd_probs, ex.kd_rest = align_record(
                    rec, t_offs, s_offs, len(t_text) - len(s_text), region, vmap, cfg.kd_max_positions, t_kd,
                    s_ids=s_ids)
        out.append(ex)
    return out
