"""Cross-tokenizer alignment: the teacher's top-k next-token distributions expressed over the student's vocabulary.

Teacher (Kimi-K2, tiktoken, whole Chinese words) and student (Phi-1.5, GPT-2 byte-level BPE, ~2.2 tokens per
Chinese character) cut the same text differently. A teacher row is usable for the student only where both have
read exactly the same text and are about to predict the token that starts at the same place:

1. **Aligned boundaries.** The teacher row at token i is the distribution of token i+1, whose text starts where
   token i ends. It is used when that point lies in the text both prompts share and a student token j (followed by
   another, j+1) ends at the same point of the text: the student's logits at j are then the target.
   `align_record` works from char offsets: character c = end
   of teacher token i must be ≥ `region_start`, token i must end cleanly at c and a student token j+1 must start
   cleanly at c − shift. Char offsets follow `kd_mlx.tokenizer` (byte-level pieces of one character share that
   character's span), so "token k−1 ends where token k starts" holds exactly when the boundary falls between two
   characters: the several GPT-2 tokens of one Chinese character never create a false boundary inside it.
   `align_record_bytes` compares byte positions instead (from the token ids and both texts), so it also aligns
   where both tokenizers cut one character at the same byte (cl100k splits rarer Chinese characters into bytes
   too): on CMMLU with the cl100k stand-in that is ~22% more aligned positions; there the teacher's candidates are
   the remaining byte pieces, i.e. a distribution over which character it is.
2. **Projection (vocabulary level, precomputed once per tokenizer pair).** Each teacher candidate maps to the
   student token that would begin it: the student's first token of the candidate's bytes encoded on their own.
   Candidates that are not valid UTF-8 (pieces of a character) fall back to the longest student token that is a
   byte prefix of them; special/control tokens on either side, and empty tokens, map to nothing (−1).
   Probabilities of candidates mapping to the same student id are summed; the mass outside the top-k and the
   mass of unmappable candidates is kept as an explicit remainder, so that `probs.sum(-1) + rest == 1`.
   `kd_mlx.losses.projected_kl` compares that remainder with the student's mass outside the listed ids.
   **Exact projection.** Many teacher tokens share one student first token (754 pure-Chinese cl100k tokens land on
   107 GPT-2 ids), so tail tokens outside the top-k belong to listed student ids too. A store dumped with
   `--student-tokenizer` keeps, per top-k slot, the full-row mass of its student class (`StoreRecord.class_mass`):
   the target is then the exact projection of the whole teacher row onto the listed ids, the remainder exactly the
   mass of the other classes. Without it the top-k sum is a lower bound of each listed id's mass.
3. **Tempering.** At a token-KD temperature T != 1 the target is the full teacher row tempered (p^(1/T) / Z_T over
   the whole vocabulary, Z_T kept by the dump) and then projected; a store without Z_T for T is refused.
4. **Context check.** A row is dropped when the student's real next token is not the projection of the teacher's
   real next token (given the student ids): there the context-free map is wrong about how the student continues
   the text. Cases: a bare " " the teacher splits before a Chinese word (the student writes " 农" as one
   piece), byte pieces, merges. Measured share of aligned rows: benchmarks/bench_align.py.
5. **Boundary rows (look-ahead).** A dump with `--lookahead` stores, at each boundary both encodings share, the
   row over student first tokens with the context-free map corrected where it is wrong: a candidate c whose class
   is all of c's bytes, and that the student could merge with what follows (GPT-2's e4 b8 before 8d is 不; " the"
   before "ory" is " theory"), has its mass split by the teacher's next token after c — exact for the real next
   token (the dump's row at the next position) and for the `lookahead` most probable others (one teacher step
   each, `StreamingTeacher.branch_logprobs`). Such a row replaces the top-k projection and needs no context check
   (`boundary_targets`). Depth one: where c + d could still grow into a longer student token, the longest one
   that c + d already spells is taken.

What the projection assumes (and where it is only approximate):

- **Context-free first token** (where there is no boundary row). The student token that begins a candidate is
  computed from the candidate alone. In context the student's BPE also sees the text after the candidate: for the
  teacher's candidate "中国" the student in context may produce a longer or differently merged first token of the
  following characters, and for a candidate "hel" (of "hello") the student would really emit "hello". The mapped
  token is always a byte prefix of the candidate (tested), so it is the student's first step towards the same
  text, never a different text.
- **Leading spaces.** GPT-2 and tiktoken both attach a single leading space to the following word (" the"), so
  word candidates keep their meaning. A teacher candidate that is whitespace alone (" ", "\\n\\n") maps to the
  student's whitespace token, although before a word the student would fold the space into the word token
  (" 中"); where the teacher splits "A. " + "中国" the student has no boundary after the space, so that position is
  simply not aligned. Phi's 38 added whitespace tokens (2-31 spaces, 2-9 tabs) are ordinary targets.
- **Same tokenizer → identity.** When both tokenizers have the same fingerprint the map is the identity, every
  clean boundary aligns, ids are returned unchanged (in top-k order) and probs = exp(logprobs) exactly.
- Only the top-k of the teacher is known: the tail outside it is not redistributed (it is the remainder).
- Measured on all CMMLU test prompts (benchmarks/bench_align.py): at aligned positions the teacher's real next
  token maps to the student's real next token 93-95% of the time; in nearly all other cases the student's real
  token is longer than the teacher's (e.g. it merges what the teacher splits), which a context-free map cannot know.

`align_record` and `align_record_bytes` (vectorised numpy) have plain-loop references beside them
(`*_reference`); tests check they agree. The vocabulary map is cached as
`vocabmap-<teacher fp>-<student fp>-v2.npz` under `$KD_MLX_CACHE` (default ~/.cache/kd_mlx), keyed by both
tokenizer fingerprints and written atomically.
"""

from __future__ import annotations

import bisect
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import utils
from .utils import KDError, atomic_path

VOCABMAP_FORMAT = 2


# ---------------------------------------------------------------------------------------------------------------
# vocabulary map
# ---------------------------------------------------------------------------------------------------------------


def special_token_ids(tok) -> set[int]:
    """Ids of a tokenizer's special/control tokens (never alignment targets nor sources)."""
    specials = getattr(tok, "_specials", None)  # TiktokenTokenizer: reserved + named specials
    if isinstance(specials, dict):
        return {int(i) for i in specials.values()}
    raw = getattr(tok, "_tok", None)  # HFTokenizer: added tokens flagged special (Phi's whitespace ones are not)
    if raw is not None and hasattr(raw, "get_added_tokens_decoder"):
        return {int(i) for i, t in raw.get_added_tokens_decoder().items() if getattr(t, "special", False)}
    return set()


def _token_bytes_table(tok) -> list[bytes]:
    out = []
    for i in range(tok.vocab_size):
        try:
            out.append(tok.token_bytes(i))
        except Exception:  # a hole in the id range (padded vocabularies)
            out.append(b"")
    return out


class _PrefixIndex:
    """The longest student token that is a byte prefix of some bytes (the fallback for partial characters)."""

    def __init__(self, student_bytes: Sequence[bytes], excluded: set[int]):
        self.by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(student_bytes):
            if b and i not in excluded and b not in self.by_bytes:  # first (lowest) id wins for duplicates
                self.by_bytes[b] = i
        self.max_len = max((len(b) for b in self.by_bytes), default=0)

    def longest_prefix(self, b: bytes) -> int:
        for n in range(min(len(b), self.max_len), 0, -1):
            sid = self.by_bytes.get(b[:n])
            if sid is not None:
                return sid
        return -1


def _first_token(ids: Sequence[int], b: bytes, student_bytes: Sequence[bytes], excluded: set[int],
                 prefix: _PrefixIndex) -> int:
    """The student's first token of a candidate's encoding, if it is a genuine byte prefix; else the fallback."""
    if ids:
        sid = int(ids[0])
        if sid not in excluded and 0 <= sid < len(student_bytes) and student_bytes[sid] \
                and b.startswith(student_bytes[sid]):
            return sid
    return prefix.longest_prefix(b)


def _decode_or_none(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _encode_many(student_tok, texts: list[str]) -> list[list[int]]:
    """Batch encoding through the native batch encoders behind kd_mlx's tokenizer classes, else one by one."""
    raw = getattr(student_tok, "_tok", None)
    if raw is not None and hasattr(raw, "encode_batch"):
        return [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    enc = getattr(student_tok, "_enc", None)
    if enc is not None and hasattr(enc, "encode_ordinary_batch"):
        return enc.encode_ordinary_batch(texts)
    return [student_tok.encode(t) for t in texts]


def _byte_lengths(table: Sequence[bytes], specials: set[int]) -> np.ndarray:
    # special tokens (a BOS) stand for no text: 0 bytes of the prompt
    out = np.fromiter((len(b) for b in table), np.int32, len(table))
    if specials:
        out[[i for i in specials if i < len(out)]] = 0
    return out


def token_byte_lengths(tok) -> np.ndarray:
    """(V,) int32: the number of text bytes each token stands for (0 for special tokens)."""
    return _byte_lengths(_token_bytes_table(tok), special_token_ids(tok))


def build_student_ids(teacher_tok, student_tok) -> np.ndarray:
    """(V_teacher,) int32: the student token that begins each teacher token (−1 = unmappable). Batched encoding."""
    return _build(teacher_tok, student_tok)[0]


def _build(teacher_tok, student_tok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t_bytes = _token_bytes_table(teacher_tok)
    s_bytes = _token_bytes_table(student_tok)
    t_special, s_special = special_token_ids(teacher_tok), special_token_ids(student_tok)
    prefix = _PrefixIndex(s_bytes, s_special)
    out = np.full(len(t_bytes), -1, np.int32)
    texts, text_ids = [], []
    for tid, b in enumerate(t_bytes):
        if not b or tid in t_special:
            continue
        s = _decode_or_none(b)
        if s is None:
            out[tid] = prefix.longest_prefix(b)
        else:
            texts.append(s)
            text_ids.append(tid)
    for tid, ids in zip(text_ids, _encode_many(student_tok, texts)):
        out[tid] = _first_token(ids, t_bytes[tid], s_bytes, s_special, prefix)
    return out, _byte_lengths(t_bytes, t_special), _byte_lengths(s_bytes, s_special)


def student_id_reference(teacher_tok, student_tok, tid: int, _cache: dict | None = None) -> int:
    """Plain per-token version of `build_student_ids` (one `encode` call per token), for the tests."""
    key = (id(teacher_tok), id(student_tok))
    if _cache is not None and key in _cache:
        s_bytes, s_special, t_special, prefix = _cache[key]
    else:
        s_bytes = _token_bytes_table(student_tok)
        s_special, t_special = special_token_ids(student_tok), special_token_ids(teacher_tok)
        prefix = _PrefixIndex(s_bytes, s_special)
        if _cache is not None:
            _cache[key] = (s_bytes, s_special, t_special, prefix)
    b = teacher_tok.token_bytes(tid)
    if not b or tid in t_special:
        return -1
    s = _decode_or_none(b)
    if s is None:
        return prefix.longest_prefix(b)
    return _first_token(student_tok.encode(s), b, s_bytes, s_special, prefix)


@dataclass
class VocabMap:
    """Teacher id → student id (the student token that begins the teacher token), one entry per teacher id."""

    student_id: np.ndarray  # (V_teacher,) int32, −1 = unmappable
    teacher_fingerprint: str
    student_fingerprint: str
    is_identity: bool
    source: str = "built"  # "built" | "cache" | "identity"
    teacher_len: np.ndarray | None = None  # (V_teacher,) bytes of text per token (0: specials), for byte alignment
    student_len: np.ndarray | None = None  # (V_student,)

    @property
    def coverage(self) -> float:
        """Fraction of teacher ids that map to a student token."""
        return float((self.student_id >= 0).mean()) if len(self.student_id) else 0.0

    @staticmethod
    def cache_path(teacher_tok, student_tok, cache_dir: str | os.PathLike | None = None) -> Path:
        d = Path(cache_dir) if cache_dir is not None else utils.cache_dir()
        return d / f"vocabmap-{teacher_tok.fingerprint()}-{student_tok.fingerprint()}-v{VOCABMAP_FORMAT}.npz"

    @classmethod
    def build(cls, teacher_tok, student_tok, cache_dir: str | os.PathLike | None = None,
              use_cache: bool = True) -> "VocabMap":
        """The map for this tokenizer pair: identity when both are the same tokenizer, else loaded from the cache
        (keyed by both fingerprints) or built and cached (atomic write)."""
        t_fp, s_fp = teacher_tok.fingerprint(), student_tok.fingerprint()
        if t_fp == s_fp:
            n = token_byte_lengths(teacher_tok)
            return cls(np.arange(teacher_tok.vocab_size, dtype=np.int32), t_fp, s_fp, True, "identity", n, n)
        path = cls.cache_path(teacher_tok, student_tok, cache_dir)
        if use_cache and path.exists():
            try:
                return cls.load(path, expect=(t_fp, s_fp, teacher_tok.vocab_size))
            except KDError:
                pass  # a stale or damaged cache file is rebuilt and replaced
        sid, t_len, s_len = _build(teacher_tok, student_tok)
        vmap = cls(sid, t_fp, s_fp, False, "built", t_len, s_len)
        if use_cache:
            try:
                vmap.save(path)
            except OSError:  # an unwritable cache only costs the rebuild next time; the map itself is fine
                pass
        return vmap

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                lengths = {} if self.teacher_len is None or self.student_len is None else {
                    "teacher_len": self.teacher_len.astype(np.int32), "student_len": self.student_len.astype(np.int32)}
                np.savez(f, student_id=self.student_id.astype(np.int32), format=np.int32(VOCABMAP_FORMAT), **lengths,
                         teacher_fingerprint=np.str_(self.teacher_fingerprint),
                         student_fingerprint=np.str_(self.student_fingerprint))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: tuple[str, str, int] | None = None) -> "VocabMap":
        """Read a saved map; `expect=(teacher_fp, student_fp, teacher_vocab)` refuses one for another pair."""
        try:
            with np.load(path, allow_pickle=False) as z:
                sid = z["student_id"].astype(np.int32)
                t_len = z["teacher_len"].astype(np.int32) if "teacher_len" in z.files else None
                s_len = z["student_len"].astype(np.int32) if "student_len" in z.files else None
                fmt, t_fp, s_fp = int(z["format"]), str(z["teacher_fingerprint"]), str(z["student_fingerprint"])
        except Exception as e:
            raise KDError(f"cannot read vocabulary map {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        if fmt != VOCABMAP_FORMAT:
            raise KDError(f"vocabulary map {path} has format {fmt}, expected {VOCABMAP_FORMAT}")
        if expect is not None and (t_fp, s_fp, len(sid)) != tuple(expect):
            raise KDError(f"vocabulary map {path} is for tokenizers {t_fp}/{s_fp} ({len(sid)} ids), not "
                          f"{expect[0]}/{expect[1]} ({expect[2]} ids)")
        return cls(sid, t_fp, s_fp, t_fp == s_fp, "cache", t_len, s_len)


# ---------------------------------------------------------------------------------------------------------------
# record alignment
# ---------------------------------------------------------------------------------------------------------------


def aligned_rows(positions, t_offsets, s_offsets, shift: int, region_start: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, pos): indices into the record's top-k rows that land on an aligned boundary, and for each the student
    position whose logits predict the student token starting there. Vectorised."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    t_off = _as_offsets(t_offsets)
    s_off = _as_offsets(s_offsets)
    n_t = len(t_off)
    rows = np.nonzero((positions >= 0) & (positions + 1 < n_t))[0]  # the last row (the answer) has no next token
    i = positions[rows]
    c = t_off[i + 1, 0]
    keep = (t_off[i, 1] == c) & (c >= region_start)  # clean teacher boundary inside the shared text
    rows, c = rows[keep], c[keep]
    if len(s_off) < 2 or not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    j1 = np.nonzero(s_off[1:, 0] == s_off[:-1, 1])[0] + 1  # clean student starts (j1 > 0: a position predicts it)
    starts = s_off[j1, 0]  # non-decreasing
    target = c - shift
    k = np.searchsorted(starts, target, side="right") - 1  # the last student token starting there
    hit = k >= 0
    hit[hit] = starts[k[hit]] == target[hit]
    return rows[hit], j1[k[hit]] - 1


def project_topk(topk_ids, topk_logprobs, student_id: np.ndarray, class_mass=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-k rows (n, k) → student (ids (n, m) padded −1, probs (n, m), rest (n,)). Vectorised: one stable
    argsort of (row, student id) keys groups equal ids, `np.add.reduceat` sums their mass. Within a row ids keep
    the order of their first candidate (top-k order); rest = 1 − Σ probs (a row whose top-k sums past 1 by
    rounding is renormalised).

    `class_mass (n, k)`: the full-row mass of each slot's student class (the store's `class_mass`); a group then
    takes that mass (the largest of its slots, which agree up to the encoding) instead of the sum of its listed
    candidates: the exact projection of the full row."""
    tid = np.asarray(topk_ids, np.int64)
    n = tid.shape[0]
    if n == 0 or tid.size == 0:
        return np.full((n, 1), -1, np.int32), np.zeros((n, 1), np.float32), np.ones(n, np.float32)
    V = len(student_id)
    if tid.min() < 0 or tid.max() >= V:  # out-of-vocabulary ids (padding) map to nothing
        sid = np.where((tid >= 0) & (tid < V), student_id[np.clip(tid, 0, V - 1)], -1).astype(np.int64)
    else:
        sid = student_id[tid].astype(np.int64)
    p = np.exp(np.asarray(topk_logprobs, np.float64)).ravel()
    n_s = int(sid.max()) + 2
    key = (sid + 1 + np.arange(n)[:, None] * n_s).ravel()  # row-major; sid −1 → key row*n_s (dropped below)
    order = np.argsort(key, kind="stable")  # equal keys stay in top-k order: the first is the first candidate
    sk = key[order]
    starts = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
    mass = np.add.reduceat(p[order], starts)
    if class_mass is not None:
        cm = np.asarray(class_mass, np.float64).ravel()[order]
        mass = np.maximum(mass, np.maximum.reduceat(cm, starts))
    g_key, g_first = sk[starts], order[starts]
    real = g_key % n_s != 0
    g_key, g_first, mass = g_key[real], g_first[real], mass[real]
    by_first = np.argsort(g_first, kind="stable")  # groups in row-major order of their first candidate
    g_key, mass = g_key[by_first], mass[by_first]
    g_row, g_sid = g_key // n_s, g_key % n_s - 1
    counts = np.bincount(g_row, minlength=n)
    m = max(int(counts.max()), 1)
    slot = np.arange(len(g_row)) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = np.full((n, m), -1, np.int32)
    probs = np.zeros((n, m), np.float64)
    ids[g_row, slot] = g_sid
    probs[g_row, slot] = mass
    total = probs.sum(-1)
    over = total > 1.0
    if over.any():
        probs[over] /= total[over, None]
        total = probs.sum(-1)
    rest = np.maximum(0.0, 1.0 - total)
    return ids, probs.astype(np.float32), rest.astype(np.float32)


def _as_offsets(offsets) -> np.ndarray:
    if isinstance(offsets, np.ndarray):
        return offsets.astype(np.int64, copy=False).reshape(-1, 2)
    # a list of (start, end) tuples, as encode_with_offsets returns: fromiter is ~3x faster than np.asarray
    return np.fromiter(itertools.chain.from_iterable(offsets), np.int64, 2 * len(offsets)).reshape(-1, 2)


def _topk_rows(rec, rows: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, log-probs of the full row tempered at T, class masses at T or None) of the record's top-k `rows`."""
    ids = np.asarray(rec.topk_ids)
    k = ids.shape[1] if ids.ndim == 2 else ids.size // max(len(rec.positions), 1)  # an empty record: (0,)
    ids = ids.reshape(len(rec.positions), k)
    lp = np.asarray(rec.topk_logprobs) if temperature == 1.0 else rec.tempered_topk(temperature)
    lp = lp.reshape(len(rec.positions), k)
    cm = getattr(rec, "class_mass", {}).get(temperature)  # any record-shaped object; a StoreRecord may carry it
    return ids[rows], lp[rows], None if cm is None else np.asarray(cm).reshape(len(rec.positions), k)[rows]


def context_mismatch(rec, rows: np.ndarray, pos: np.ndarray, s_ids, vmap: "VocabMap") -> np.ndarray:
    """(n,) bool: aligned rows where the student's real next token is not the map of the teacher's real next
    token (the context-free class of the row's true continuation is wrong there)."""
    t_next = np.asarray(rec.token_ids, np.int64)[np.asarray(rec.positions, np.int64)[rows] + 1]
    s_next = np.asarray(s_ids, np.int64)[np.asarray(pos, np.int64) + 1]
    return vmap.student_id[t_next] != s_next


def _keep_last(n: int, max_positions: int | None) -> slice:
    # keep the positions nearest the answer (max_positions=0 keeps none)
    return slice(0, n) if max_positions is None else slice(max(0, n - int(max_positions)), n)


def _targets(rec, rows: np.ndarray, pos: np.ndarray, vmap: VocabMap, max_positions: int | None,
             temperature: float, s_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Context check (with `s_ids`), keep the last `max_positions`, project the rows tempered at T."""
    if s_ids is not None and len(rows):
        keep = ~context_mismatch(rec, rows, pos, s_ids, vmap)
        rows, pos = rows[keep], pos[keep]
    keep = _keep_last(len(rows), max_positions)
    rows, pos = rows[keep], pos[keep]
    t_ids, t_lp, cmass = _topk_rows(rec, rows, temperature)
    ids, probs, rest = project_topk(t_ids, t_lp, vmap.student_id, cmass)
    return pos.astype(np.int32), ids, probs, rest


def align_record(rec, t_offsets, s_offsets, shift: int, region_start: int, vmap: VocabMap,
                 max_positions: int | None = None, temperature: float = 1.0, s_ids=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Token-level targets for the student from one store record.

    rec: a `StoreRecord` (token_ids, positions (P,), topk_ids (P,k), topk_logprobs (P,k)); t_offsets (T, 2) char
    offsets of the teacher tokens (one row per stored id, a BOS included); s_offsets the student's char offsets of
    its own prompt; shift = len(teacher text) − len(student text) (the student prompt may hold fewer shots: the
    shared text is the end of both); region_start: first teacher character of the shared text.

    temperature: the full teacher row tempered at T, then projected (exact with the store's logz / class masses);
    s_ids: the student's prompt ids, to drop rows that fail the context check (module docstring); max_positions
    keeps the last rows after that check.

    Returns (pos (n,) int32 student positions whose logits predict the next student token, ids (n, m) int32 student
    ids padded with −1, probs (n, m) float32, rest (n,) float32) with probs.sum(-1) + rest == 1."""
    rows, pos = aligned_rows(rec.positions, t_offsets, s_offsets, shift, region_start)
    return _targets(rec, rows, pos, vmap, max_positions, temperature, s_ids)


def align_record_reference(rec, t_offsets, s_offsets, shift: int, region_start: int, vmap: VocabMap,
                           max_positions: int | None = None, temperature: float = 1.0, s_ids=None):
    """Plain loops, same contract as `align_record`."""
    s_start = {}
    for j in range(1, len(s_offsets)):
        if int(s_offsets[j - 1][1]) == int(s_offsets[j][0]):
            s_start[int(s_offsets[j][0])] = j
    n_t = len(t_offsets)
    found = []
    for r, i in enumerate(np.asarray(rec.positions).tolist()):
        if i < 0 or i + 1 >= n_t:
            continue
        c = int(t_offsets[i + 1][0])
        if c < region_start or int(t_offsets[i][1]) != c:
            continue
        j1 = s_start.get(c - shift)
        if j1 is not None:
            found.append((r, j1 - 1))
    return _project_reference(rec, found, vmap, max_positions, temperature, s_ids)


def _project_reference(rec, found: list[tuple[int, int]], vmap: VocabMap, max_positions: int | None,
                       temperature: float, s_ids):
    """Plain context check, keep-last and projection of the rows `found` = [(row, student position)]: per student
    id in top-k order, the tempered mass of its listed candidates, or its class mass when the store has it."""
    V = len(vmap.student_id)
    if s_ids is not None:
        found = [(r, j) for r, j in found
                 if int(vmap.student_id[int(rec.token_ids[int(rec.positions[r]) + 1])]) == int(s_ids[j + 1])]
    found = found[_keep_last(len(found), max_positions)]
    cmass = getattr(rec, "class_mass", {}).get(temperature)
    pos, ids, probs, rest = [], [], [], []
    for r, j in found:
        acc: dict[int, float] = {}
        whole: dict[int, float] = {}  # the class mass the store gives, per student id
        for slot, (tid, lp) in enumerate(zip(np.asarray(rec.topk_ids[r]).tolist(),
                                             np.asarray(rec.topk_logprobs[r]).tolist())):
            sid = int(vmap.student_id[tid]) if 0 <= tid < V else -1
            if sid < 0:
                continue
            if temperature != 1.0:
                lp = lp / temperature - float(rec.logz[temperature][r])
            acc[sid] = acc.get(sid, 0.0) + float(np.exp(lp))
            if cmass is not None:
                whole[sid] = max(whole.get(sid, 0.0), float(cmass[r][slot]))
        acc = {c: max(m, whole.get(c, 0.0)) for c, m in acc.items()}
        total = sum(acc.values())
        if total > 1.0:
            acc = {k: v / total for k, v in acc.items()}
        pos.append(j)
        ids.append(list(acc))
        probs.append(list(acc.values()))
        rest.append(max(0.0, 1.0 - sum(acc.values())))
    m = max((len(x) for x in ids), default=1) or 1
    ids_a = np.full((len(pos), m), -1, np.int32)
    probs_a = np.zeros((len(pos), m), np.float32)
    for r in range(len(pos)):
        ids_a[r, : len(ids[r])] = ids[r]
        probs_a[r, : len(probs[r])] = probs[r]
    return np.array(pos, np.int32), ids_a, probs_a, np.array(rest, np.float32)


# ---------------------------------------------------------------------------------------------------------------
# byte-level boundaries: also inside a character
# ---------------------------------------------------------------------------------------------------------------
# Char offsets cannot say where inside a character a token ends, so `align_record` only aligns between characters.
# Both tokenizers also split characters into byte pieces (GPT-2 nearly every Chinese character, cl100k the rarer
# ones); where both cut a character at the same byte, the teacher's next-token distribution (over the remaining
# bytes: which character it is) is a valid target too. These functions find boundaries from the tokens' byte
# lengths instead, so they need the token ids of both sides and the two texts.


def _byte_frame(t_text: str, s_text: str, region_start: int) -> tuple[int, int]:
    """(byte shift, first teacher byte of the shared text); the shared text must end both prompts."""
    shared = t_text[region_start:]
    if not s_text.endswith(shared):
        raise KDError(f"the student prompt does not end with the teacher's text from character {region_start} "
                      f"(the shared part must be a common suffix)")
    return len(t_text.encode("utf-8")) - len(s_text.encode("utf-8")), len(t_text[:region_start].encode("utf-8"))


def _byte_ends(ids, lengths: np.ndarray | None, text: str, side: str) -> np.ndarray:
    if lengths is None:
        raise KDError("this vocabulary map has no token byte lengths (an old cache file?): rebuild it")
    ends = np.cumsum(lengths[np.asarray(ids, np.int64)], dtype=np.int64)
    n = len(text.encode("utf-8"))
    if (ends[-1] if len(ends) else 0) != n:
        raise KDError(f"the {side} token ids stand for {ends[-1] if len(ends) else 0} bytes but the {side} text has "
                      f"{n}: ids and text do not belong together")
    return ends


def aligned_rows_bytes(positions, t_ends: np.ndarray, s_ends: np.ndarray, byte_shift: int,
                       region_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `aligned_rows`, from byte ends of the tokens: row i aligns where teacher token i ends at byte b of the
    shared text and a student token j (followed by another) ends at b − byte_shift."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    rows = np.flatnonzero((positions >= 0) & (positions + 1 < len(t_ends)))
    b = t_ends[positions[rows]]
    keep = b >= region_b
    rows, target = rows[keep], b[keep] - byte_shift
    ends = s_ends[:-1]  # non-decreasing
    k = np.searchsorted(ends, target, side="right") - 1
    hit = k >= 0
    hit[hit] = ends[k[hit]] == target[hit]
    return rows[hit], k[hit]


def align_record_bytes(rec, s_ids, t_text: str, s_text: str, region_start: int, vmap: VocabMap,
                       max_positions: int | None = None, temperature: float = 1.0, context_check: bool = True,
                       mid_token: bool = True):
    """`align_record` with boundaries compared in bytes (also inside characters). rec.token_ids must encode
    `t_text` (a BOS is fine: specials stand for no text), `s_ids` must encode `s_text`; the shared text is
    t_text[region_start:], which must end s_text. Same outputs as `align_record` (with its context check on
    `s_ids` unless `context_check=False`). With `mid_token` and a record that carries `mid` rows (a dump with
    --student-tokenizer), student positions inside a teacher token get those rows too (T = 1 only); max_positions
    then keeps the last rows of both kinds."""
    byte_shift, region_b = _byte_frame(t_text, s_text, region_start)
    t_ends = _byte_ends(rec.token_ids, vmap.teacher_len, t_text, "teacher")
    s_ends = _byte_ends(s_ids, vmap.student_len, s_text, "student")
    rows, pos = aligned_rows_bytes(rec.positions, t_ends, s_ends, byte_shift, region_b)
    mid = getattr(rec, "mid", None) if mid_token and temperature == 1.0 else None
    if mid is None or not len(mid.row):
        return _targets(rec, rows, pos, vmap, max_positions, temperature, s_ids if context_check else None)
    at_boundary, has = boundary_targets(mid, rows, pos)
    aligned = _targets(rec, rows[~has], pos[~has], vmap, None, temperature, s_ids if context_check else None)
    inside = mid_token_targets(mid, rec.positions, t_ends, s_ends, byte_shift, region_b)
    return _merge_rows([at_boundary, aligned, inside], max_positions)


def boundary_targets(mid: MidTokenRows, rows: np.ndarray, pos: np.ndarray
                     ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """((pos, ids, probs, rest) of the aligned rows that have a stored boundary row (nbytes 0), which replaces the
    projection of their top-k; (len(rows),) bool: which ones). No context check: the boundary row already follows
    the teacher's real next token onto the student token the text continues with."""
    b = np.flatnonzero(np.asarray(mid.nbytes) == 0)
    stored = np.asarray(mid.row, np.int64)[b]
    has = np.isin(rows, stored)
    order = np.argsort(stored, kind="stable")
    src = b[order][np.searchsorted(stored[order], rows[has])]
    ids = np.asarray(mid.ids, np.int32)[src]
    probs = np.asarray(mid.probs, np.float32)[src]
    rest = np.maximum(0.0, 1.0 - probs.sum(-1, dtype=np.float64)).astype(np.float32)
    return (pos[has].astype(np.int32), ids, probs, rest), has


def mid_token_targets(mid: MidTokenRows, positions, t_ends: np.ndarray, s_ends: np.ndarray, byte_shift: int,
                      region_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pos, ids, probs, rest) at student positions j whose token ends strictly inside a teacher token that starts
    in the shared text, where the record has the row for (the teacher position before it, bytes already written)."""
    positions = np.asarray(positions, np.int64).reshape(-1)
    row_at = np.full(len(t_ends), -1, np.int64)
    ok = (positions >= 0) & (positions < len(t_ends))
    row_at[positions[ok]] = np.flatnonzero(ok)
    e = s_ends[:-1] + byte_shift  # student token j ends at e (teacher bytes); j + 1 exists
    k = np.searchsorted(t_ends, e, side="right")  # the first teacher token ending after e
    i = np.clip(k - 1, 0, max(len(t_ends) - 1, 0))
    hit = (k >= 1) & (k < len(t_ends))
    hit &= (t_ends[i] < e) & (t_ends[i] >= region_b)
    r = np.where(hit, row_at[i], -1)
    hit &= r >= 0
    per_row = 1 << 20  # one key per (row, bytes written): bytes per token are far fewer
    keys = np.asarray(mid.row, np.int64) * per_row + np.asarray(mid.nbytes, np.int64)
    order = np.argsort(keys, kind="stable")
    want = r * per_row + (e - t_ends[i])
    at = np.clip(np.searchsorted(keys[order], want), 0, max(len(keys) - 1, 0))
    hit &= len(keys) > 0
    hit[hit] = keys[order][at[hit]] == want[hit]
    j = np.flatnonzero(hit)
    src = order[at[j]]
    width = max(1, np.shape(mid.ids)[1] if np.ndim(mid.ids) == 2 else 1)
    probs = np.asarray(mid.probs, np.float32).reshape(-1, width)[src]
    rest = np.maximum(0.0, 1.0 - probs.sum(-1, dtype=np.float64)).astype(np.float32)
    return j.astype(np.int32), np.asarray(mid.ids, np.int32).reshape(-1, width)[src], probs, rest


def _merge_rows(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], max_positions: int | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of several kinds (disjoint positions) in position order, ids/probs padded to one width, last kept."""
    n = sum(len(p[0]) for p in parts)
    m = max([p[1].shape[1] for p in parts if p[1].ndim == 2 and len(p[0])] + [1])
    pos = np.concatenate([p[0] for p in parts]).astype(np.int32)
    ids, probs = np.full((n, m), -1, np.int32), np.zeros((n, m), np.float32)
    r = 0
    for p in parts:
        c = len(p[0])
        if c:
            ids[r:r + c, : p[1].shape[1]], probs[r:r + c, : p[2].shape[1]] = p[1], p[2]
        r += c
    rest = np.concatenate([p[3] for p in parts]).astype(np.float32)
    order = np.argsort(pos, kind="stable")[_keep_last(n, max_positions)]
    ids, probs = ids[order], probs[order]
    width = max(1, int(np.flatnonzero((ids >= 0).any(0)).max(initial=-1)) + 1)  # no all-padding columns
    return pos[order], ids[:, :width], probs[:, :width], rest[order]


def align_record_bytes_reference(rec, s_ids, t_text: str, s_text: str, region_start: int, vmap: VocabMap,
                                 max_positions: int | None = None, temperature: float = 1.0,
                                 context_check: bool = True, mid_token: bool = True):
    """Plain loops over the tokens' bytes; same contract as `align_record_bytes`."""
    byte_shift, region_b = _byte_frame(t_text, s_text, region_start)
    s_end_at, e = {}, 0
    for j, sid in enumerate(list(s_ids)[:-1]):
        e += int(vmap.student_len[sid])
        s_end_at[e] = j
    t_end, e = [], 0
    for tid in np.asarray(rec.token_ids).tolist():
        e += int(vmap.teacher_len[tid])
        t_end.append(e)
    found = []
    for r, i in enumerate(np.asarray(rec.positions).tolist()):
        if 0 <= i and i + 1 < len(t_end) and t_end[i] >= region_b and (t_end[i] - byte_shift) in s_end_at:
            found.append((r, s_end_at[t_end[i] - byte_shift]))
    mid = getattr(rec, "mid", None) if mid_token and temperature == 1.0 else None
    if mid is None or not len(mid.row):
        return _project_reference(rec, found, vmap, max_positions, temperature, s_ids if context_check else None)
    table = {(int(r), int(n)): a for a, (r, n) in enumerate(zip(mid.row, mid.nbytes))}

    def stored_row(j: int, a: int) -> tuple:
        keep = np.asarray(mid.ids[a]) >= 0
        pr = [float(x) for x in np.asarray(mid.probs[a])[keep]]
        return j, [int(x) for x in np.asarray(mid.ids[a])[keep]], pr, max(0.0, 1.0 - sum(pr))

    rows = [stored_row(j, table[(r, 0)]) for r, j in found if (r, 0) in table]  # boundary rows: no context check
    found = [(r, j) for r, j in found if (r, 0) not in table]
    pos, ids, probs, rest = _project_reference(rec, found, vmap, None, temperature, s_ids if context_check else None)
    rows += [(int(pos[a]), [int(x) for x in ids[a] if x >= 0], list(probs[a][: int((ids[a] >= 0).sum())]),
              float(rest[a])) for a in range(len(pos))]
    row_of = {int(i): r for r, i in enumerate(np.asarray(rec.positions).tolist())}
    for b, j in sorted(s_end_at.items()):
        e = b + byte_shift
        for i in range(len(t_end) - 1):
            if t_end[i] < e < t_end[i + 1] and t_end[i] >= region_b and i in row_of:
                a = table.get((row_of[i], e - t_end[i]))
                if a is not None:
                    rows.append(stored_row(j, a))
    rows.sort(key=lambda x: x[0])
    rows = rows[_keep_last(len(rows), max_positions)]
    m = max([len(x[1]) for x in rows] + [1])
    ids_a = np.full((len(rows), m), -1, np.int32)
    probs_a = np.zeros((len(rows), m), np.float32)
    for a, (_, i_, p_, _) in enumerate(rows):
        ids_a[a, : len(i_)], probs_a[a, : len(p_)] = i_, p_
    return (np.array([x[0] for x in rows], np.int32), ids_a, probs_a, np.array([x[3] for x in rows], np.float32))

# ---------------------------------------------------------------------------------------------------------------
# mid-token rows: student positions inside a teacher token
# ---------------------------------------------------------------------------------------------------------------
# Where the student has written some bytes p of the teacher's next token t but not all of it (GPT-2 writes most
# Chinese characters in byte pieces, the teacher whole words), no aligned row exists. Only the dump's full row has
# the target: the teacher's tokens that begin with p, renormalised (the teacher's next token given that its text
# begins with p), each mass on the student token that begins the rest of its bytes (the longest student token that
# is a byte prefix of it; a teacher token equal to p has no rest and goes to the remainder). Teacher tokens whose
# rest the student would have merged into the token it just wrote are left out: that the student stopped there
# says the text does not go on that way (GPT-2 after the piece e4 b8 is not before 8d: it writes 不 whole).
# The dump stores these rows for the student boundaries of its own text (`MidTokenProjector`);
# `align_record_bytes` places them. Measured on SmolLM2 -> GPT-2 text KD: benchmarks/kd_token_effect.py. T = 1
# only: a tempered conditional would need its own normaliser per prefix.


@dataclass
class MidTokenRows:
    """A record's rows inside teacher tokens: `row` indexes the record's top-k rows (the teacher position before
    the token), `nbytes` how many bytes of that position's next token the student has already written."""

    row: np.ndarray  # (M,) int32
    nbytes: np.ndarray  # (M,) int32, 0 < nbytes < bytes of the next teacher token
    ids: np.ndarray  # (M, m) int32 student ids, −1 padding, by mass descending
    probs: np.ndarray  # (M, m) float32; the remainder is 1 − probs.sum(-1)


def concat_mid_rows(parts: Sequence[MidTokenRows]) -> MidTokenRows:
    """Several row sets of one record (ids/probs (M, m), m >= 1) as one, padded to the widest."""
    m = max(np.shape(p.ids)[1] for p in parts)

    def widen(a, fill):
        a = np.asarray(a)
        return np.pad(a, ((0, 0), (0, m - a.shape[1])), constant_values=fill)

    return MidTokenRows(np.concatenate([np.asarray(p.row, np.int32) for p in parts]),
                        np.concatenate([np.asarray(p.nbytes, np.int32) for p in parts]),
                        np.concatenate([widen(p.ids, -1) for p in parts]).astype(np.int32),
                        np.concatenate([widen(p.probs, 0) for p in parts]).astype(np.float32))


class MidTokenProjector:
    """Conditional teacher rows at byte prefixes of the next teacher token, over student ids (dump side)."""

    def __init__(self, teacher_tok, student_tok, k: int, student_id: np.ndarray | None = None):
        self.k = int(k)
        # teacher id -> the student token that begins it (VocabMap.student_id): the class of a boundary row; built
        # on first use when not given (the mid-token rows never need it)
        self._student_id = None if student_id is None else np.asarray(student_id, np.int64)
        self._teacher_tok = teacher_tok
        self.t_bytes = _token_bytes_table(teacher_tok)
        for i in special_token_ids(teacher_tok):
            if i < len(self.t_bytes):
                self.t_bytes[i] = b""  # specials stand for no text: never a candidate
        self.t_len = np.array([len(b) for b in self.t_bytes], np.int64)
        s_bytes, s_special = _token_bytes_table(student_tok), special_token_ids(student_tok)
        self.s_len = _byte_lengths(s_bytes, s_special)
        self.student_tok = student_tok
        self._s_prefix = _PrefixIndex(s_bytes, s_special)
        self._s_bytes = s_bytes
        self._by_head: dict[bytes, list[int]] = {}  # the first 1..3 bytes -> teacher ids beginning with them
        for v, b in enumerate(self.t_bytes):
            for n in range(1, min(len(b), 3) + 1):
                self._by_head.setdefault(b[:n], []).append(v)
        self._groups: dict[tuple[bytes, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._s_sorted = sorted(self._s_prefix.by_bytes)  # student tokens by bytes: those extending b are a run
        self._reachable: dict[int, bool] = {}
        self._extensions: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def _group(self, p: bytes, last: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate teacher ids, their class index, the class ids) for prefix p after the student token `last`;
        cached per (prefix, last)."""
        g = self._groups.get((p, last))
        if g is None:
            pool = self._by_head.get(p[:3], [])
            cand = [v for v in pool if self.t_bytes[v].startswith(p)] if len(p) > 3 else list(pool)
            sid = [self._s_prefix.longest_prefix(self.t_bytes[v][len(p):]) for v in cand]
            if last is not None:
                keep = [not merges_with(self._s_bytes, self._s_prefix.by_bytes, last, c) for c in sid]
                cand, sid = [v for v, k in zip(cand, keep) if k], [c for c, k in zip(sid, keep) if k]
            classes, inv = np.unique(np.array(sid, np.int64), return_inverse=True)
            g = (np.array(cand, np.int64), inv.reshape(-1), classes)
            if len(self._groups) > 65536:  # bounded: distinct prefixes of one dump are far fewer
                self._groups.clear()
            self._groups[(p, last)] = g
        return g

    def row(self, lp: np.ndarray, p: bytes, last: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids (≤ k,), probs) of one full log-prob row `lp` (V,) conditioned on the next token beginning with p
        and, with the student token `last` that wrote the end of p, on a continuation the student writes after
        `last` (not merged into it); None when no teacher token is left or their mass underflows."""
        cand, inv, classes = self._group(p, last)
        inside = cand < len(lp)  # a head narrower than the tokenizer (never in practice)
        cand, inv = cand[inside], inv[inside]
        if not len(cand):
            return None
        mass = np.exp(np.asarray(lp, np.float64)[cand])
        z = mass.sum()
        if not np.isfinite(z) or z <= 0:
            return None
        by_class = np.bincount(inv, weights=mass / z, minlength=len(classes))
        real = classes >= 0
        cls, m = classes[real], by_class[real]
        order = np.lexsort((cls, -m))[: self.k]  # mass descending, ties: lower id
        return cls[order].astype(np.int32), m[order].astype(np.float32)

    def rows(self, lp: np.ndarray, token_ids: Sequence[int], positions: Sequence[int], text: str
             ) -> MidTokenRows:
        """The mid-token rows of one record: `lp` (P, V) its full rows at `positions`, `token_ids` the teacher
        tokens of `text`; the student boundaries are those of the student's own encoding of `text`."""
        ids = np.asarray(token_ids, np.int64)
        t_ends = np.cumsum(self.t_len[ids])
        s_ids = self.student_tok.encode_with_offsets(text)[0]
        s_ends = np.cumsum(self.s_len[np.asarray(s_ids, np.int64)]) if len(s_ids) else np.zeros(0, np.int64)
        tb = text.encode("utf-8")
        out_row, out_n, out_ids, out_p = [], [], [], []
        for r, i in enumerate(np.asarray(positions, np.int64).tolist()):
            if i + 1 >= len(ids):
                continue
            b0, b1 = int(t_ends[i]), int(t_ends[i + 1])
            lo, hi = np.searchsorted(s_ends, b0, side="right"), np.searchsorted(s_ends, b1, side="left")
            for q in range(int(lo), int(hi)):
                e = int(s_ends[q])
                got = self.row(lp[r], tb[b0:e], int(s_ids[q]))
                if got is not None and len(got[0]):
                    out_row.append(r)
                    out_n.append(e - b0)
                    out_ids.append(got[0])
                    out_p.append(got[1])
        m = max([len(x) for x in out_ids] + [1])
        ids_a = np.full((len(out_ids), m), -1, np.int32)
        probs_a = np.zeros((len(out_ids), m), np.float32)
        for j, (a, b) in enumerate(zip(out_ids, out_p)):
            ids_a[j, : len(a)], probs_a[j, : len(b)] = a, b
        return MidTokenRows(np.array(out_row, np.int32), np.array(out_n, np.int32), ids_a, probs_a)

    # ---- rows at shared boundaries, with one step of look-ahead
    @property
    def student_id(self) -> np.ndarray:
        if self._student_id is None:
            self._student_id = build_student_ids(self._teacher_tok, self.student_tok).astype(np.int64)
        return self._student_id

    def _writes_alone(self, u: int) -> bool:
        """Whether the student's encoder produces token u for its own text (a token the pre-tokenizer always cuts,
        e.g. "A." across a letter and a full stop, never begins a continuation); partial characters: assumed."""
        ok = self._reachable.get(u)
        if ok is None:
            text = _decode_or_none(self._s_bytes[u])
            ok = text is None or list(self.student_tok.encode(text)) == [u]
            self._reachable[u] = ok
        return ok

    def extensions(self, c: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(teacher ids d, student ids) for teacher token c followed by d where the student writes a longer first
        token than c's own class (the longest student token that is a byte prefix of c + d and longer than c);
        None when c's class is not all of c's bytes or no student token extends it. Cached per c."""
        if c in self._extensions:
            return self._extensions[c]
        out = None
        b = self.t_bytes[c] if 0 <= c < len(self.t_bytes) else b""
        s = int(self.student_id[c]) if 0 <= c < len(self.student_id) else -1
        if b and s >= 0 and self._s_bytes[s] == b:
            ext: dict[bytes, int] = {}
            for u in self._s_sorted[bisect.bisect_right(self._s_sorted, b):]:
                if not u.startswith(b):
                    break
                sid = self._s_prefix.by_bytes[u]
                if self._writes_alone(sid):
                    ext[u] = sid
            if ext:
                longest = max(len(u) for u in ext) - len(b)
                heads = {u[len(b):len(b) + 1] for u in ext}  # the next token must begin with one of these bytes
                pool = itertools.chain.from_iterable(self._by_head.get(h, ()) for h in heads)
                d_ids, cls = [], []
                for d in pool:
                    tail = self.t_bytes[d][:longest]
                    for n in range(len(tail), 0, -1):
                        sid = ext.get(b + tail[:n])
                        if sid is not None:
                            d_ids.append(d)
                            cls.append(sid)
                            break
                if d_ids:
                    out = (np.array(d_ids, np.int64), np.array(cls, np.int64))
        self._extensions[c] = out
        return out

    def lookahead_candidates(self, lp: np.ndarray, n: int, min_mass: float, skip: int | None = None) -> list[int]:
        """The (at most n) most probable teacher tokens of row `lp` with probability >= min_mass that the student
        may write with a longer first token (`extensions`), other than `skip`."""
        if n <= 0:
            return []
        top = np.argsort(-np.asarray(lp), kind="stable")[: 4 * n + 4]
        out = []
        for c in top.tolist():
            if np.exp(float(lp[c])) < min_mass or len(out) == n:
                break
            if c != skip and self.extensions(c) is not None:
                out.append(c)
        return out

    def boundary_row(self, lp: np.ndarray, looks: Sequence[tuple[int, np.ndarray]] = ()
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(ids (<= k,), probs) of a full row `lp` (V,) over the student's first tokens where both have a boundary:
        each teacher token's mass on its class, except for each look-ahead (c, the teacher's row after c): there c's
        mass follows the next token d, onto the longer student token c + d begins where there is one."""
        p = np.exp(np.asarray(lp, np.float64))
        V = len(p)
        sid = np.full(V, -1, np.int64)
        sid[: min(V, len(self.student_id))] = self.student_id[:V]
        n_cls = max(int(sid.max()) + 2, 1)
        totals = np.bincount(sid + 1, weights=p, minlength=n_cls)
        for c, lq in looks:
            ext = self.extensions(int(c))
            if ext is None or c >= V:
                continue
            d, cls = ext
            inside = d < len(lq)
            moved = p[c] * np.exp(np.asarray(lq, np.float64)[d[inside]])
            totals[sid[c] + 1] -= moved.sum()
            totals += np.bincount(cls[inside] + 1, weights=moved, minlength=n_cls)[:n_cls]
        totals = np.maximum(totals[1:], 0.0)  # class 0: unmappable tokens (the remainder)
        order = np.lexsort((np.arange(len(totals)), -totals))[: self.k]
        order = order[totals[order] > 0]
        return order.astype(np.int32), totals[order].astype(np.float32)

    def boundary_positions(self, token_ids: Sequence[int], text: str) -> list[int]:
        """Teacher positions i (i + 1 < len) whose token ends where a token of the student's own encoding of
        `text` ends: there both predict the token that starts at the same byte."""
        ids = np.asarray(token_ids, np.int64)
        t_ends = np.cumsum(self.t_len[ids])
        s_ids = self.student_tok.encode_with_offsets(text)[0]
        s_ends = set(np.cumsum(self.s_len[np.asarray(s_ids, np.int64)]).tolist()) if len(s_ids) else set()
        return [i for i in range(len(ids) - 1) if int(t_ends[i]) in s_ends]


def merges_with(student_bytes: Sequence[bytes], by_bytes: dict[bytes, int], last: int, c: int) -> bool:
    """Whether the student token `last` followed by the first bytes of token `c` is itself a student token: then
    the student would have written that longer token, and a student that wrote `last` is not before `c`."""
    if c < 0:
        return False
    lb, cb = student_bytes[last], student_bytes[c]
    return any(lb + cb[:n] in by_bytes for n in range(1, len(cb) + 1))


def _student_bytes_plain(student_tok) -> dict[bytes, int]:
    """bytes -> student id (the lowest id of equal bytes; specials and empty tokens left out), token by token."""
    s_special = special_token_ids(student_tok)
    out: dict[bytes, int] = {}
    for s in range(student_tok.vocab_size):
        try:
            b = student_tok.token_bytes(s)
        except Exception:
            continue
        if b and s not in s_special and b not in out:
            out[b] = s
    return out


def mid_token_row_reference(lp: np.ndarray, p: bytes, teacher_tok, student_tok, k: int, last: int | None = None
                            ) -> tuple[list[int], list[float]] | None:
    """Plain version of `MidTokenProjector.row`: a loop over the whole teacher vocabulary and, per candidate, over
    the student vocabulary for the longest byte prefix of its rest (and, after `last`, whether `last` plus the start
    of that prefix is a student token)."""
    t_special = special_token_ids(teacher_tok)
    s_bytes = _student_bytes_plain(student_tok)
    acc: dict[int, float] = {}
    z = 0.0
    for v in range(min(teacher_tok.vocab_size, len(lp))):
        try:
            b = teacher_tok.token_bytes(v)
        except Exception:
            continue
        if v in t_special or not b.startswith(p) or not b:
            continue
        rest = b[len(p):]
        best = max((n for n in range(1, len(rest) + 1) if rest[:n] in s_bytes), default=0)
        if best and last is not None:
            lb = student_tok.token_bytes(last)
            if any(lb + rest[:n] in s_bytes for n in range(1, best + 1)):
                continue
        m = float(np.exp(float(lp[v])))
        z += m
        if best:
            sid = s_bytes[rest[:best]]
            acc[sid] = acc.get(sid, 0.0) + m
    if z <= 0:
        return None
    ranked = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [s for s, _ in ranked], [m / z for _, m in ranked]


def boundary_row_reference(lp: np.ndarray, looks: Sequence[tuple[int, np.ndarray]], student_id: np.ndarray,
                           teacher_tok, student_tok, k: int) -> tuple[list[int], list[float]]:
    """Plain version of `MidTokenProjector.boundary_row`: per teacher token its class (`student_id`); for a looked-
    ahead c whose class is all of its bytes, per next token d the longest student token longer than c that is a byte
    prefix of c + d and that the student's encoder writes for its own text, found by slicing."""
    s_bytes = _student_bytes_plain(student_tok)
    longest = max(len(b) for b in s_bytes)

    def writes_alone(b: bytes) -> bool:
        try:
            return list(student_tok.encode(b.decode("utf-8"))) == [s_bytes[b]]
        except UnicodeDecodeError:
            return True

    t_special = special_token_ids(teacher_tok)

    def t_bytes(v: int) -> bytes:
        try:
            return b"" if v in t_special else teacher_tok.token_bytes(v)
        except Exception:
            return b""

    acc: dict[int, float] = {}
    after = {int(c): lq for c, lq in looks}
    for v in range(len(lp)):
        cls = int(student_id[v]) if v < len(student_id) else -1
        p = float(np.exp(float(lp[v])))
        bv = t_bytes(v) if v in after else b""
        if cls < 0 or not bv or student_tok.token_bytes(cls) != bv:
            if cls >= 0:
                acc[cls] = acc.get(cls, 0.0) + p
            continue
        for d in range(len(after[v])):
            full = bv + t_bytes(d)
            target = cls
            for n in range(min(len(full), longest), len(bv), -1):
                if full[:n] in s_bytes and writes_alone(full[:n]):
                    target = s_bytes[full[:n]]
                    break
            acc[target] = acc.get(target, 0.0) + p * float(np.exp(float(after[v][d])))
    ranked = sorted(((s, m) for s, m in acc.items() if m > 0), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [s for s, _ in ranked], [m for _, m in ranked]
