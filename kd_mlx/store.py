"""The logits store: what the student learns from. This module is the only owner of its on-disk format.

Layout of a store directory::

    STORE/
      manifest.json              written last, atomically: identity, encoding, k, row ids, shards + sha256
      shard-000000.safetensors   N questions each (fixed shard size), ragged arrays flattened with offsets
      shard-000001.safetensors   global numbering: shard i holds questions i*N..(i+1)*N-1 of the dump's order
      ...

Shards are numbered globally, whoever writes them: a distributed dump gives shard i to rank i % world, so the
finished store does not depend on the number of ranks (byte-identical to a single-process dump).

Every shard is a plain safetensors file (readable by `safetensors`, `mx.load`, numpy) written by our own
deterministic writer: tensors in name order, header JSON with sorted keys, no timestamps. Identical inputs
therefore give byte-identical shards, which is what makes "kill -9, rerun the same command" produce exactly
the store an uninterrupted run produces: finished shards are found on disk (they only ever appear through an
atomic rename), the pending rows are recomputed, and the manifest is rebuilt from the shards.

Per question (row) a shard holds:

- `answer_logprobs` (Q, 4) float32: full-vocab log-probs of the tokens "A".."D" at the answer position
- `labels` (Q,) int8: gold answer 0..3 (-1 unknown)
- `token_ids` (T,) int32 + `token_splits` (Q+1,) int64: the teacher's prompt token ids
- `char_offsets` (T, 2) int32: (start, end) character offsets of each token in the prompt text
- `positions` (P,) int32 + `position_splits` (Q+1,) int64: token indices that carry a top-k row; the row at
  position i is the teacher's distribution of token i+1 (for the last prompt token: of the answer)
- the top-k payload, in one of the value encodings below
- `logz_t<T>` (P,) float32 for every temperature T != 1 named at dump time (identity "temperatures"):
  log sum_v exp(logprob_v / T) over the full vocabulary, so that the tempered teacher at a listed id is exactly
  exp(logprob / T - logz) (a top-k alone cannot give the tempered normaliser)
- `class_mass_t<T>` (P, k) for every named T when the dump was given a student tokenizer (identity
  "student_tokenizer" = its fingerprint): for each top-k slot, the full-vocabulary (tempered) teacher mass of all
  teacher tokens whose student-side first token is that slot's (kd_mlx.align.VocabMap); the exact projection of
  the full row onto the listed student ids. Slots are kept in ascending-id order (recoverable from the decoded
  ids whatever the encoding); float32 for `fp32`, else float16
- `hidden` (Q, d) optional pooled final hidden state (float32 for `fp32`, else float16)
- mid-token rows, when the identity says `mid_token_rows` (a dump with a student tokenizer, kd_mlx.align
  `MidTokenProjector`): `mid_splits` (Q+1,) int64; `mid_row` (M,) int32 (which of the question's top-k rows),
  `mid_nbytes` (M,) int32 (bytes of that row's next token the student has written), `mid_ids` (M, k) int32 student
  ids padded -1, `mid_probs` (M, k) (float32 for `fp32`, else float16): the teacher's next-token distribution given
  those bytes, over the student token that begins the rest; nbytes 0 (a text dump with `lookahead`, identity
  `boundary_rows`): the row's own distribution over the student's first tokens at a boundary both share, where a
  candidate the student would merge with what follows is split by the teacher's next step
  (kd_mlx.teacher.dump `boundary_rows`)

Each shard's metadata holds `content_sha256` (its tensors + metadata), so a shard proves its own integrity; the
manifest also keeps each file's sha256. A resumed dump recomputes every shard that fails either; training checks
the manifest hashes once per run.

Value encodings (top-k log-probs and their token ids; bytes per top-k row at k=32 in brackets):

- `fp32`   exact reference: int32 ids, float32 log-probs [256]
- `fp16`   ids packed as 3 bytes (uint24, vocab < 16.7M), float16 log-probs [160]
- `q8`     uint24 ids; log-probs as uint8 steps below the row's top-1 value (kept as float32) with a per-row
           float16 step = (top1 - min) / 255 [134]
- `q8rice` the same uint8 values, but the ids of each row sorted ascending and their gaps Rice-coded (one
           parameter per question; unary and remainder bit streams kept apart so both decode vectorised);
           the rank order is recovered from the decoded values [~90, depends on the ids]

Decoded rows are always returned sorted by log-prob, descending (ties: lower id first). The encoding error
of the lossy encodings is measured in tests/test_store.py and benchmarks/bench_store.py, not assumed.

Format version 2 (version 1 stores have no content hashes, log-normalisers or class masses: re-dump them).

CLI: `python -m kd_mlx.store verify STORE` (checksums, counts, NaN/Inf; exit 1 and one line per problem) and
`python -m kd_mlx.store show STORE --id QID` (JSON).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import click
import numpy as np

from .align import MidTokenRows
from .safetensors_io import NUMPY_TO_ST, numpy_dtype, read_header, read_metadata, write_numpy
from .tokenizer import Tokenizer, load_tokenizer
from .utils import KDError, cli_errors, sha256_file, write_json_atomic

FORMAT = "kd_mlx.store"
VERSION = 2
ENCODINGS = ("fp32", "fp16", "q8", "q8rice")
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
# the files kd_mlx.tokenizer.load_tokenizer reads (whichever the teacher has); config.json because its model_type
# picks the tokenizer class transformers (hence mlx-lm) builds, which can replace tokenizer.json's pre-tokenizer
TOKENIZER_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "config.json")
_SHARD_RE = re.compile(r"^shard-(\d{6})\.safetensors$")
_TMP_PREFIX = ".tmp-"
# identity keys every store has; the dump adds teacher/tokenizer/template/shots/positions/...
REQUIRED_IDENTITY = ("k", "encoding")


def temperature_tag(t: float) -> str:
    """Tensor-name form of a temperature: 2.0 -> "2", 1.5 -> "1.5"."""
    return f"{float(t):g}"


def identity_temperatures(identity: Mapping[str, Any]) -> list[float]:
    return sorted({1.0, *(float(t) for t in identity.get("temperatures") or [])})


# ----------------------------------------------------------------------------------------------------------
# records


@dataclass
class StoreRecord:
    """One question's teacher targets (see the module docstring for the meaning of each field)."""

    id: str
    answer_logprobs: np.ndarray  # (4,) float32, log-probs under the full vocab
    token_ids: np.ndarray  # (n,) int32
    offsets: np.ndarray  # (n, 2) int32 char offsets into the prompt text
    positions: np.ndarray  # (p,) int32 token indices with a top-k row
    topk_ids: np.ndarray  # (p, k) int32, sorted by log-prob descending
    topk_logprobs: np.ndarray  # (p, k) float32
    hidden: np.ndarray | None = None  # (d,) float32
    label: int = -1  # gold answer 0..3, -1 if unknown
    logz: dict[float, np.ndarray] = field(default_factory=dict)  # T != 1 -> (p,) log sum_v exp(lp_v / T)
    class_mass: dict[float, np.ndarray] = field(default_factory=dict)  # T -> (p, k), slots as topk_ids
    mid: MidTokenRows | None = None  # rows at student positions inside a teacher token (T = 1)

    @property
    def answer_probs(self) -> np.ndarray:
        """The 4-way answer distribution (renormalised over A-D)."""
        a = self.answer_logprobs.astype(np.float64)
        e = np.exp(a - a.max())
        return (e / e.sum()).astype(np.float32)

    def tempered_topk(self, temperature: float) -> np.ndarray:
        """(p, k) log-probs of the listed ids under the full-vocabulary teacher tempered at T:
        logprob / T - log sum_v exp(logprob_v / T). Exact; needs the dump to have named T."""
        lp = np.asarray(self.topk_logprobs, np.float64)
        if temperature == 1.0:
            return lp
        if temperature not in self.logz:
            raise KDError(f"the store has no log-normaliser for temperature {temperature:g} (it has "
                          f"{sorted([1.0, *self.logz])}): re-dump with --temperatures 1,{temperature:g} or use 1")
        return lp / temperature - np.asarray(self.logz[temperature], np.float64)[:, None]

    def to_json(self, max_positions: int | None = None) -> dict:
        p = len(self.positions) if max_positions is None else min(max_positions, len(self.positions))
        return {
            "id": self.id,
            "label": "ABCD"[self.label] if 0 <= self.label < 4 else None,
            "answer_logprobs": [float(x) for x in self.answer_logprobs],
            "answer_probs": [float(x) for x in self.answer_probs],
            "num_tokens": int(len(self.token_ids)),
            "token_ids": [int(x) for x in self.token_ids],
            "offsets": [[int(a), int(b)] for a, b in self.offsets],
            "num_positions": int(len(self.positions)),
            "topk": [
                {"position": int(self.positions[i]),
                 "ids": [int(x) for x in self.topk_ids[i]],
                 "logprobs": [round(float(x), 6) for x in self.topk_logprobs[i]]}
                for i in range(p)
            ],
            "hidden_dim": None if self.hidden is None else int(self.hidden.shape[-1]),
            "mid_token_rows": None if self.mid is None else int(len(self.mid.row)),
        }


# ----------------------------------------------------------------------------------------------------------
# shard files: plain safetensors through kd_mlx.safetensors_io, each tensor of a known name and dtype

# dtype of every tensor a shard may hold (a header byte flipped to another dtype is refused, not misread)
_TENSOR_DTYPES = {
    "answer_logprobs": ("F32",), "labels": ("I8",), "token_ids": ("I32",), "token_splits": ("I64",),
    "char_offsets": ("I32",), "positions": ("I32",), "position_splits": ("I64",), "topk_ids": ("I32",),
    "topk_logprobs": ("F32",), "topk_ids_u24": ("U8",), "topk_logprobs_f16": ("F16",), "topk_q8": ("U8",),
    "topk_top1": ("F32",), "topk_step": ("F16",), "rice_b": ("U8",), "rice_unary": ("U8",),
    "rice_unary_splits": ("I64",), "rice_rem": ("U8",), "rice_rem_splits": ("I64",), "hidden": ("F32", "F16"),
    "mid_splits": ("I64",), "mid_row": ("I32",), "mid_nbytes": ("I32",), "mid_ids": ("I32",),
    "mid_probs": ("F32", "F16"),
}
_PER_TEMPERATURE_DTYPES = {"logz": ("F32",), "class_mass": ("F32", "F16")}
CONTENT_HASH_KEY = "content_sha256"


def _expected_dtypes(name: str) -> tuple[str, ...] | None:
    if name in _TENSOR_DTYPES:
        return _TENSOR_DTYPES[name]
    base = name.rsplit("_t", 1)[0]
    return _PER_TEMPERATURE_DTYPES.get(base) if name.startswith(base + "_t") else None


def content_hash(tensors: Mapping[str, tuple[str, Sequence[int], bytes | memoryview]], meta: Mapping[str, str]
                 ) -> str:
    """sha256 of a shard's tensors (name, dtype, shape, bytes) and metadata (without this hash): kept in the shard's
    own metadata, so any shard proves its integrity without a manifest (a flipped data byte or dtype shows)."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in sorted(meta.items()) if k != CONTENT_HASH_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        dt, shape, data = tensors[name]
        h.update(json.dumps([name, dt, list(shape)]).encode())
        h.update(data)
    return h.hexdigest()


def write_shard_file(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
    """Write one shard with its content hash in the metadata (deterministic bytes)."""
    parts = {n: (NUMPY_TO_ST[np.asarray(a).dtype], np.shape(a), np.ascontiguousarray(a).tobytes())
             for n, a in tensors.items()}
    write_numpy(path, dict(tensors), {**meta, CONTENT_HASH_KEY: content_hash(parts, meta)})


class _Shard:
    """Memory-mapped view of one shard: arrays are sliced from the file without reading it whole."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = read_header(path)
        self.meta = read_metadata(path)
        for name, e in self.entries.items():
            want = _expected_dtypes(name)
            if want is not None and e.dtype not in want:
                raise KDError(f"{path.name}: tensor {name} has dtype {e.dtype}, a store shard holds "
                              f"{'/'.join(want)} there (corrupted header): rerun the dump to recompute this shard")
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._cache: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> np.ndarray:
        a = self._cache.get(name)
        if a is None:
            e = self.entries.get(name)
            if e is None:
                raise KDError(f"{self.path.name}: missing tensor {name}")
            count = int(np.prod(e.shape)) if e.shape else 1
            dt = numpy_dtype(e.dtype)
            a = np.frombuffer(self._mm, dtype=dt, count=count, offset=e.start).reshape(e.shape) if count \
                else np.zeros(e.shape, dt)
            self._cache[name] = a
        return a

    def hash_ok(self) -> bool:
        """The shard's content equals the hash written with it."""
        want = self.meta.get(CONTENT_HASH_KEY)
        parts = {n: (e.dtype, e.shape, self._mm[e.start:e.end] if self._mm else b"") for n, e in self.entries.items()}
        return want is not None and content_hash(parts, self.meta) == want

    def close(self) -> None:
        self._cache.clear()
        try:
            if self._mm is not None:
                self._mm.close()
        except BufferError:  # arrays handed out still point into the map; the GC closes it later
            pass
        self._f.close()


# ----------------------------------------------------------------------------------------------------------
# value encodings


def _pack_u24(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise KDError("token id outside 0..16,777,215 cannot be packed as uint24 (use --encoding fp32)")
    b = ids.astype("<u4").reshape(*ids.shape, 1).view(np.uint8)  # (..., 4) little-endian bytes
    return np.ascontiguousarray(b[..., :3]).reshape(*ids.shape[:-1], ids.shape[-1] * 3)


def _unpack_u24(b: np.ndarray, k: int) -> np.ndarray:
    b = np.asarray(b, dtype=np.uint8).reshape(-1, k, 3)
    full = np.zeros((b.shape[0], k, 4), np.uint8)
    full[..., :3] = b
    return full.view("<u4").reshape(b.shape[0], k).astype(np.int32)


def _quantise_q8(lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of log-probs -> (uint8 steps below top-1, top-1 float32, step float16). Non-finite rows: top1=NaN."""
    lps = np.asarray(lps, np.float32)
    rows = lps.shape[0]
    finite = np.isfinite(lps).all(axis=1)
    safe = np.where(finite[:, None], lps, 0.0).astype(np.float32)
    top1 = safe.max(axis=1) if rows else np.zeros(0, np.float32)
    gap = (top1 - safe.min(axis=1)) if rows else np.zeros(0, np.float32)
    step = np.maximum(gap / 255.0, 2.0 ** -14).astype(np.float16)
    # the step is stored as float16: round it up when needed so the smallest value still fits in 255 steps
    short = step.astype(np.float32) * 255.0 < gap
    step[short] = np.nextafter(step[short], np.float16(np.inf))
    q = np.rint((top1[:, None] - safe) / step.astype(np.float32)[:, None])
    q = np.clip(q, 0, 255).astype(np.uint8)
    top1 = np.where(finite, top1, np.nan).astype(np.float32)
    return q, top1, step


def _dequantise_q8(q: np.ndarray, top1: np.ndarray, step: np.ndarray) -> np.ndarray:
    return (top1[:, None].astype(np.float32) - q.astype(np.float32) * step.astype(np.float32)[:, None])


def sort_rows_by_value_reference(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain reference: rows sorted by log-prob descending, ties by id ascending (what every decoder returns)."""
    out_i, out_v = np.array(ids, np.int32, copy=True), np.array(lps, np.float32, copy=True)
    for r in range(len(out_i)):
        order = sorted(range(out_i.shape[1]), key=lambda j: (-float(lps[r, j]), int(ids[r, j])))
        out_i[r], out_v[r] = np.asarray(ids[r])[order], np.asarray(lps[r])[order]
    return out_i, out_v


def sort_rows_by_value(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by log-prob descending, ties by id ascending (vectorised `sort_rows_by_value_reference`)."""
    if ids.size == 0:
        return ids.astype(np.int32), lps.astype(np.float32)
    o1 = np.argsort(ids, axis=1, kind="stable")
    v1 = np.take_along_axis(lps, o1, 1)
    o2 = np.argsort(-v1, axis=1, kind="stable")
    order = np.take_along_axis(o1, o2, 1)
    return np.take_along_axis(ids, order, 1).astype(np.int32), np.take_along_axis(lps, order, 1).astype(np.float32)


def _rice_encode(deltas: np.ndarray) -> tuple[int, bytes, bytes]:
    """Rice code of non-negative ints with the best parameter b: (b, unary stream, remainder stream)."""
    d = deltas.astype(np.int64).ravel()
    if d.size == 0:
        return 0, b"", b""
    costs = [int((d >> b).sum()) + d.size * (1 + b) for b in range(25)]
    b = int(np.argmin(costs))
    qs = d >> b
    # unary: q zeros then a terminating one
    ends = np.cumsum(qs + 1) - 1
    bits = np.zeros(int(ends[-1]) + 1, np.uint8)
    bits[ends] = 1
    unary = np.packbits(bits).tobytes()
    if b:
        r = d & ((1 << b) - 1)
        rbits = ((r[:, None] >> np.arange(b - 1, -1, -1)) & 1).astype(np.uint8)
        rem = np.packbits(rbits.ravel()).tobytes()
    else:
        rem = b""
    return b, unary, rem


def _rice_decode(b: int, unary: np.ndarray, rem: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(np.unpackbits(unary))[:n]
    if len(ends) < n:
        raise KDError("corrupt q8rice id stream (too few codes)")
    qs = np.diff(ends, prepend=-1) - 1
    d = qs.astype(np.int64) << b
    if b:
        rbits = np.unpackbits(rem)[: n * b]
        if len(rbits) < n * b:
            raise KDError("corrupt q8rice id stream (remainders truncated)")
        d |= rbits.reshape(n, b).astype(np.int64) @ (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
    return d


def encode_topk(encoding: str, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Encode per-question top-k rows [(ids (p,k), logprobs (p,k)), ...] into flat shard tensors."""
    if encoding not in ENCODINGS:
        raise KDError(f"unknown encoding {encoding!r} (choose from {', '.join(ENCODINGS)})")
    k = rows[0][0].shape[1] if rows else 0
    ids = np.concatenate([r[0] for r in rows]).astype(np.int64) if rows else np.zeros((0, k), np.int64)
    lps = np.concatenate([r[1] for r in rows]).astype(np.float32) if rows else np.zeros((0, k), np.float32)
    if encoding == "fp32":
        return {"topk_ids": ids.astype(np.int32), "topk_logprobs": lps}
    if encoding == "fp16":
        return {"topk_ids_u24": _pack_u24(ids), "topk_logprobs_f16": lps.astype(np.float16)}
    if encoding == "q8":
        q, top1, step = _quantise_q8(lps)
        return {"topk_ids_u24": _pack_u24(ids), "topk_q8": q, "topk_top1": top1, "topk_step": step}
    # q8rice: sort each row by id, code the gaps; values follow the id order
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise KDError("token id outside 0..16,777,215 cannot be stored with q8rice (use --encoding fp32)")
    order = np.argsort(ids, axis=1, kind="stable")
    sids = np.take_along_axis(ids, order, 1)
    slps = np.take_along_axis(lps, order, 1)
    if sids.size and (np.diff(sids, axis=1) <= 0).any():
        raise KDError("q8rice needs distinct token ids within a top-k row")
    q, top1, step = _quantise_q8(slps)
    bs, un, re_, un_off, re_off = [], [], [], [0], [0]
    start = 0
    for r in rows:
        p = len(r[0])
        s = sids[start:start + p]
        start += p
        deltas = np.diff(s, axis=1, prepend=-1) - 1 if p else np.zeros((0, k), np.int64)
        b, u, rm = _rice_encode(deltas)
        bs.append(b)
        un.append(u)
        re_.append(rm)
        un_off.append(un_off[-1] + len(u))
        re_off.append(re_off[-1] + len(rm))
    return {"topk_q8": q, "topk_top1": top1, "topk_step": step, "rice_b": np.array(bs, np.uint8),
            "rice_unary": np.frombuffer(b"".join(un), np.uint8), "rice_unary_splits": np.array(un_off, np.int64),
            "rice_rem": np.frombuffer(b"".join(re_), np.uint8), "rice_rem_splits": np.array(re_off, np.int64)}


def decode_topk(encoding: str, get: Callable[[str], np.ndarray], k: int, qi: int, r0: int, r1: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Decode rows r0:r1 (those of question `qi` of the shard) -> (ids (p,k) int32, logprobs (p,k) float32)."""
    if encoding == "fp32":
        ids = np.asarray(get("topk_ids")[r0:r1], np.int32)
        lps = np.asarray(get("topk_logprobs")[r0:r1], np.float32)
        return ids, lps  # stored already in rank order: exact
    if encoding == "fp16":
        ids = _unpack_u24(get("topk_ids_u24")[r0:r1], k)
        lps = get("topk_logprobs_f16")[r0:r1].astype(np.float32)
        return sort_rows_by_value(ids, lps)
    lps = _dequantise_q8(get("topk_q8")[r0:r1], get("topk_top1")[r0:r1], get("topk_step")[r0:r1])
    if encoding == "q8":
        ids = _unpack_u24(get("topk_ids_u24")[r0:r1], k)
        return sort_rows_by_value(ids, lps)
    if encoding == "q8rice":
        us, rs = get("rice_unary_splits"), get("rice_rem_splits")
        d = _rice_decode(int(get("rice_b")[qi]), get("rice_unary")[us[qi]:us[qi + 1]],
                         get("rice_rem")[rs[qi]:rs[qi + 1]], (r1 - r0) * k)
        ids = (np.cumsum(d.reshape(r1 - r0, k) + 1, axis=1) - 1) if r1 > r0 else np.zeros((0, k), np.int64)
        return sort_rows_by_value(ids.astype(np.int32), lps)
    raise KDError(f"unknown encoding {encoding!r} in store")


def encode_extras(identity: Mapping[str, Any], recs: Sequence["StoreRecord"], encoding: str, k: int
                  ) -> dict[str, np.ndarray]:
    """The per-temperature tensors (`logz_t<T>`, `class_mass_t<T>`) of one shard's records."""
    out: dict[str, np.ndarray] = {}
    if not recs:
        return out
    ids = np.concatenate([np.asarray(r.topk_ids, np.int64).reshape(-1, k) for r in recs])
    order = np.argsort(ids, axis=1, kind="stable")  # class masses kept in ascending-id slot order
    for t in identity_temperatures(identity):
        tag = temperature_tag(t)
        if t != 1.0:
            out[f"logz_t{tag}"] = np.concatenate([np.asarray(r.logz[t], np.float32).reshape(-1) for r in recs])
        if identity.get("student_tokenizer"):
            cm = np.concatenate([np.asarray(r.class_mass[t], np.float32).reshape(-1, k) for r in recs])
            out[f"class_mass_t{tag}"] = np.take_along_axis(cm, order, 1).astype(
                np.float32 if encoding == "fp32" else np.float16)
    return out


def encode_mid(recs: Sequence["StoreRecord"], encoding: str, k: int) -> dict[str, np.ndarray]:
    """The mid-token row tensors of one shard's records (every record has `mid`)."""
    mids = [r.mid for r in recs]
    n = sum(len(m.row) for m in mids)
    ids, probs = np.full((n, k), -1, np.int32), np.zeros((n, k), np.float32)
    r = 0
    for m in mids:
        c, w = len(m.row), (np.shape(m.ids)[1] if len(m.row) else 0)
        ids[r:r + c, :w], probs[r:r + c, :w] = m.ids, m.probs
        r += c
    return {"mid_splits": np.concatenate([[0], np.cumsum([len(m.row) for m in mids])]).astype(np.int64),
            "mid_row": np.concatenate([np.asarray(m.row, np.int32) for m in mids]),
            "mid_nbytes": np.concatenate([np.asarray(m.nbytes, np.int32) for m in mids]),
            "mid_ids": ids, "mid_probs": probs.astype(np.float32 if encoding == "fp32" else np.float16)}


def decode_mid(get: Callable[[str], np.ndarray], row: int) -> MidTokenRows:
    """The mid-token rows of the shard's question `row`."""
    sp = get("mid_splits")
    a, b = int(sp[row]), int(sp[row + 1])
    return MidTokenRows(np.array(get("mid_row")[a:b], np.int32), np.array(get("mid_nbytes")[a:b], np.int32),
                        np.array(get("mid_ids")[a:b], np.int32), np.array(get("mid_probs")[a:b], np.float32))


def decode_extras(identity: Mapping[str, Any], get: Callable[[str], np.ndarray], ids: np.ndarray, r0: int, r1: int
                  ) -> tuple[dict[float, np.ndarray], dict[float, np.ndarray]]:
    """(logz, class_mass) of rows r0:r1 whose decoded ids are `ids` (p, k), class masses in the ids' slot order."""
    logz, cmass = {}, {}
    rank = np.argsort(np.argsort(ids, axis=1, kind="stable"), axis=1, kind="stable")  # slot -> ascending-id slot
    for t in identity_temperatures(identity):
        tag = temperature_tag(t)
        if t != 1.0:
            logz[t] = np.asarray(get(f"logz_t{tag}")[r0:r1], np.float32)
        if identity.get("student_tokenizer"):
            cmass[t] = np.take_along_axis(np.asarray(get(f"class_mass_t{tag}")[r0:r1], np.float32), rank, 1)
    return logz, cmass


def topk_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of the top-k payload among a shard's tensors (for bytes-per-position figures)."""
    return sum(int(a.nbytes) for n, a in tensors.items() if n.startswith(("topk_", "rice_")))


# ----------------------------------------------------------------------------------------------------------
# identity / manifest helpers


def identity_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def _identity_mismatch(path: Path, stored: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    keys = sorted(set(stored) | set(new))
    diff = [k for k in keys if stored.get(k) != new.get(k)]
    if not diff:
        return None
    k = diff[0]
    more = f" (and {len(diff) - 1} more: {', '.join(diff[1:])})" if len(diff) > 1 else ""
    return (f"store {path} was written with {k}={stored.get(k)!r} but this run has {k}={new.get(k)!r}{more}; "
            f"refusing to mix them: use another --out or the original settings")


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def _shard_index(p: Path) -> int:
    return int(_SHARD_RE.match(p.name).group(1))


def _list_shards(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if _SHARD_RE.match(p.name)) if path.is_dir() else []


def _shard_info(s: "_Shard") -> tuple[dict, list[str], dict]:
    try:
        identity = json.loads(s.meta["identity"])
        ids = json.loads(s.meta["ids"])
        counts = json.loads(s.meta["counts"])
    except (KeyError, ValueError):
        raise KDError(f"{s.path}: shard metadata missing or unreadable (not written by kd_mlx.store?)") from None
    if int(s.meta.get("version", 0)) != VERSION:
        raise KDError(_old_version_message(s.path.parent, s.meta.get("version")))
    return identity, ids, counts


def _old_version_message(path: Path, version: Any) -> str:
    return (f"store {path} has format version {version}, this kd_mlx reads version {VERSION} (exact token targets need "
            f"what version {VERSION} keeps): re-dump it with python -m kd_mlx.teacher dump into a new --out")


def read_manifest(path: str | os.PathLike) -> dict:
    """manifest.json of a finished store, checked: format, version, keys, shard file names. One-line KDErrors."""
    path = Path(path)
    if not path.is_dir():
        raise KDError(f"store not found: {path}")
    man = path / MANIFEST
    if not man.exists():
        raise KDError(f"{path} has no {MANIFEST}: not a finished store (rerun the dump command to finish it)")
    try:
        m = json.loads(man.read_text(encoding="utf-8"))
        if not isinstance(m, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise KDError(f"{man} is truncated or not valid JSON: rerun the dump command that made this store (it keeps "
                      f"the shards that pass their hash and rewrites the manifest)") from None
    if m.get("format") != FORMAT:
        raise KDError(f"{path} is not a kd_mlx store (manifest format {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise KDError(_old_version_message(path, m.get("version")))
    missing = [k for k in ("identity", "encoding", "k", "shards", "ids") if k not in m]
    if missing:
        raise KDError(f"{man} lacks {', '.join(missing)}: rerun the dump command that made this store")
    for i, sh in enumerate(m["shards"]):
        if not isinstance(sh, dict) or sh.get("file") != _shard_name(i):
            raise KDError(f"{man}: shard entry {i} names {sh.get('file') if isinstance(sh, dict) else sh!r}, not "
                          f"{_shard_name(i)} (shards are plain file names inside the store): rerun the dump")
    return m


def save_tokenizer_files(store: str | os.PathLike, src_dir: str | os.PathLike, fingerprint: str) -> None:
    """Copy the teacher tokenizer's files into STORE/tokenizer/ (once; atomic), so training needs only the store.
    An existing copy must have the same fingerprint."""
    dst = Path(store) / TOKENIZER_DIR
    if dst.exists():
        fp = load_tokenizer(dst).fingerprint()
        if fp != fingerprint:
            raise KDError(f"{dst} holds tokenizer {fp}, not the teacher's {fingerprint}: use another --out")
        return
    names = [n for n in TOKENIZER_FILES if (Path(src_dir) / n).is_file()]
    if names in ([], ["config.json"]):
        raise KDError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src_dir}")
    tmp = Path(store) / f"{_TMP_PREFIX}{TOKENIZER_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for n in names:
        shutil.copyfile(Path(src_dir) / n, tmp / n)
    fp = load_tokenizer(tmp).fingerprint()
    if fp != fingerprint:
        shutil.rmtree(tmp)
        raise KDError(f"the tokenizer files of {src_dir} load as {fp}, not {fingerprint}: cannot copy them")
    os.replace(tmp, dst)


def store_tokenizer(path: str | os.PathLike, identity: Mapping[str, Any], override: str | os.PathLike | None = None
                    ) -> Tokenizer | None:
    """The teacher tokenizer a store was dumped with: `override` (must have the store's fingerprint), else the copy
    inside the store; None when neither exists."""
    src = Path(override) if override else Path(path) / TOKENIZER_DIR
    if not override and not src.is_dir():
        return None
    tok = load_tokenizer(src)
    want = identity.get("tokenizer")
    if want is not None and tok.fingerprint() != want:
        raise KDError(f"teacher tokenizer {src} has fingerprint {tok.fingerprint()}, but store {path} was dumped with "
                      f"{want}: pass the teacher's own tokenizer (or none: the store carries it)")
    return tok


def build_manifest(path: str | os.PathLike, expected_ids: Sequence[str] | None = None) -> dict:
    """(Re)build and atomically write manifest.json from the shard files on disk (global shard order).

    Deterministic: it depends only on the shards' bytes. A multi-rank dump calls this once (rank 0), after every
    rank closed its writer with `write_manifest=False`. Shards must be numbered 0..n-1 without a gap, pass their
    content hash, and with `expected_ids` the rows must be exactly those ids in that order."""
    path = Path(path)
    shards = _list_shards(path)
    if not shards:
        raise KDError(f"no shards in {path}: nothing to finalise")
    idx = [_shard_index(p) for p in shards]
    if idx != list(range(len(idx))):
        gap = next(i for i in range(len(idx) + 1) if i not in set(idx))
        raise KDError(f"store {path}: shard {_shard_name(gap)} is missing (an unfinished rank? rerun the dump)")
    identity = shard_size = None
    ids: list[str] = []
    entries = []
    for p in shards:
        s = _Shard(p)
        try:
            if not s.hash_ok():
                raise KDError(f"{p}: content does not match its hash (corrupted): rerun the dump to recompute it")
            ident, sids, counts = _shard_info(s)
            if identity is None:
                identity, shard_size = ident, int(s.meta.get("shard_size", 0))
            elif (msg := _identity_mismatch(path, identity, ident)) is not None:
                raise KDError(f"{p.name}: {msg}")
        finally:
            s.close()
        ids.extend(sids)
        entries.append({"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size, "rows": len(sids),
                        **{k: int(v) for k, v in counts.items()}})
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise KDError(f"store {path}: question {dup} appears in more than one shard")
    if expected_ids is not None and list(expected_ids) != ids:
        raise KDError(f"store {path}: the shards hold {len(ids)} questions, not the {len(expected_ids)} asked for "
                      f"in this order (a different question set was dumped here: use another --out)")
    tok_dir = path / TOKENIZER_DIR
    manifest = {
        "format": FORMAT, "version": VERSION, "identity": identity, "identity_hash": identity_hash(identity),
        "encoding": identity["encoding"], "k": identity["k"], "shard_size": shard_size,
        "num_rows": len(ids), "num_tokens": sum(e["tokens"] for e in entries),
        "num_positions": sum(e["positions"] for e in entries), "shards": entries, "ids": ids,
        "tokenizer_files": {p.name: sha256_file(p) for p in sorted(tok_dir.iterdir())} if tok_dir.is_dir() else {},
    }
    write_json_atomic(path / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# writer


class StoreWriter:
    """Writes fixed-size shards atomically (temporary name, fsync, rename); resumable; one writer per rank.

    On start it checks every shard on disk: one whose content fails its own hash, or (with a readable manifest)
    the manifest's sha256, is listed in `damaged` and not counted as done, so the dump recomputes it instead of
    passing corruption on. Sound shards' identity is checked against `identity` (a mismatch is refused with one
    line naming the key) and their ids are exposed in `done_ids` and per shard in `shard_ids`.

    Two ways to write:
    - `add(rec)` (sequential, one process): records are buffered and written as shards numbered after the last
      one on disk. The caller skips `done_ids` and feeds the rest *in the same order*, so shard i always holds
      questions i*N..(i+1)*N-1 and a rerun after kill -9 reproduces the uninterrupted store byte for byte.
      Appending new questions to a finished store with the same identity starts a new shard.
    - `write_shard(index, recs)` (the dump, any number of ranks): the caller places shard `index` itself; only
      shards with index % world == rank may be written by this writer.
    `close()` writes the last (partial) buffered shard, then (unless `write_manifest=False`) the manifest."""

    def __init__(self, path: str | os.PathLike, identity: Mapping[str, Any], shard_size: int = 256,
                 rank: int = 0, world: int = 1):
        self.path = Path(path)
        self.identity = json.loads(json.dumps(dict(identity), sort_keys=True))  # plain JSON types only
        for key in REQUIRED_IDENTITY:
            if key not in self.identity:
                raise KDError(f"store identity lacks {key!r}")
        if self.identity["encoding"] not in ENCODINGS:
            raise KDError(f"unknown encoding {self.identity['encoding']!r} (choose from {', '.join(ENCODINGS)})")
        self.k = int(self.identity["k"])
        self.temperatures = identity_temperatures(self.identity)
        if shard_size < 1:
            raise KDError("shard size must be at least 1")
        if not 0 <= rank < world:
            raise KDError(f"rank {rank} outside a world of {world}")
        self.shard_size = int(shard_size)
        self.rank, self.world = int(rank), int(world)
        if self.path.exists() and not self.path.is_dir():
            raise KDError(f"store path {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for p in self.path.iterdir():  # leftovers of an interrupted write of ours: never complete, always redone
            m = _SHARD_RE.match(p.name[len(_TMP_PREFIX):]) if p.name.startswith(_TMP_PREFIX) else None
            if (m and int(m.group(1)) % self.world == self.rank) or (
                    self.rank == 0 and p.name.startswith(".manifest.json.") and p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
        self.done_ids: set[str] = set()
        self.shard_ids: dict[int, list[str]] = {}
        self.damaged: list[int] = []
        listed = self._manifest_hashes()
        for p in _list_shards(self.path):
            ident_ids = self._sound_shard(p, listed.get(p.name))
            if ident_ids is None:
                self.damaged.append(_shard_index(p))
                continue
            ident, ids, meta = ident_ids
            if (msg := _identity_mismatch(self.path, ident, self.identity)) is not None:
                raise KDError(msg)
            if int(meta.get("shard_size", self.shard_size)) != self.shard_size:
                raise KDError(f"store {self.path} uses shard size {meta.get('shard_size')}, this run "
                              f"{self.shard_size}; use the same --shard-size to resume")
            self.shard_ids[_shard_index(p)] = ids
            self.done_ids.update(ids)
        self._next_index = max(self.shard_ids) + 1 if self.shard_ids else 0
        self._buf: list[StoreRecord] = []
        self._closed = False

    def _manifest_hashes(self) -> dict[str, str]:
        """{file: sha256} from manifest.json; {} when there is none or it is damaged (it is rebuilt at the end)."""
        man = self.path / MANIFEST
        if not man.exists():
            return {}
        try:
            m = json.loads(man.read_text(encoding="utf-8"))
            shards = m["shards"]
            fmt, version, ident = m.get("format"), m.get("version"), m.get("identity", {})
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return {}
        if fmt != FORMAT:
            raise KDError(f"{self.path} is not a kd_mlx store (manifest format {fmt!r})")
        if version != VERSION:
            raise KDError(_old_version_message(self.path, version))
        if (msg := _identity_mismatch(self.path, ident, self.identity)) is not None:
            raise KDError(msg)
        return {s["file"]: s["sha256"] for s in shards if isinstance(s, dict) and "file" in s and "sha256" in s}

    @staticmethod
    def _sound_shard(p: Path, manifest_sha: str | None) -> tuple[dict, list[str], dict] | None:
        """(identity, ids, metadata) of a shard that passes its content hash (and the manifest's), else None."""
        try:
            s = _Shard(p)
        except KDError:
            return None
        try:
            if not s.hash_ok() or (manifest_sha is not None and sha256_file(p) != manifest_sha):
                return None
            ident, ids, _ = _shard_info(s)
            return ident, ids, dict(s.meta)
        finally:
            s.close()

    def _check(self, rec: StoreRecord) -> None:
        p = len(rec.positions)
        if rec.topk_ids.shape != (p, self.k) or rec.topk_logprobs.shape != (p, self.k):
            raise KDError(f"{rec.id}: top-k arrays must be ({p}, {self.k}), got {rec.topk_ids.shape} / "
                          f"{rec.topk_logprobs.shape}")
        if np.shape(rec.answer_logprobs) != (4,):
            raise KDError(f"{rec.id}: answer_logprobs must have 4 values")
        if np.shape(rec.offsets) != (len(rec.token_ids), 2):
            raise KDError(f"{rec.id}: offsets must be ({len(rec.token_ids)}, 2)")
        hd = None if rec.hidden is None else int(np.shape(rec.hidden)[-1])
        want = self.identity.get("hidden_dim", 0) or None
        if hd != want:
            raise KDError(f"{rec.id}: hidden state of size {hd}, the store's identity says {want}")
        for t in self.temperatures:
            if t != 1.0 and np.shape(rec.logz.get(t)) != (p,):
                raise KDError(f"{rec.id}: the identity names temperature {t:g}: logz[{t:g}] must be ({p},)")
            if self.identity.get("student_tokenizer") and np.shape(rec.class_mass.get(t)) != (p, self.k):
                raise KDError(f"{rec.id}: the identity names a student tokenizer: class_mass[{t:g}] must be "
                              f"({p}, {self.k})")
        if self.identity.get("mid_token_rows"):
            m = rec.mid
            if m is None:
                raise KDError(f"{rec.id}: the identity says mid_token_rows but the record has none")
            n = len(m.row)
            if np.shape(m.nbytes) != (n,) or np.ndim(m.ids) != 2 or len(m.ids) != n or np.shape(m.probs) != np.shape(
                    m.ids) or (n and (np.shape(m.ids)[1] > self.k or np.min(m.row) < 0 or np.max(m.row) >= p
                                      or np.min(m.nbytes) < 0)):
                raise KDError(f"{rec.id}: mid-token rows must be row (M,) in 0..{p - 1}, nbytes (M,) >= 0, ids and "
                              f"probs (M, <= {self.k})")

    def add(self, rec: StoreRecord) -> None:
        if rec.id in self.done_ids or any(r.id == rec.id for r in self._buf):
            raise KDError(f"question {rec.id} is already in the store {self.path}")
        self._check(rec)
        self._buf.append(rec)
        if len(self._buf) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        recs, self._buf = self._buf, []
        self.write_shard(self._next_index, recs)
        self._next_index += 1

    def write_shard(self, index: int, recs: Sequence[StoreRecord], extra_meta: Mapping[str, str] | None = None
                    ) -> Path:
        """Write shard `index` (replacing one already there) atomically; returns its path."""
        if index % self.world != self.rank:
            raise KDError(f"shard {index} belongs to rank {index % self.world}, not to rank {self.rank}")
        if not 0 < len(recs) <= self.shard_size:
            raise KDError(f"a shard holds 1..{self.shard_size} questions, got {len(recs)}")
        for r in recs:
            self._check(r)
        tensors = shard_tensors(recs, self.identity, self.k)
        counts = {"tokens": int(len(tensors["token_ids"])), "positions": int(len(tensors["positions"]))}
        meta = {"format": FORMAT, "version": str(VERSION), "identity": json.dumps(self.identity, sort_keys=True),
                "ids": json.dumps([r.id for r in recs], ensure_ascii=True), "counts": json.dumps(counts),
                "shard_size": str(self.shard_size), **dict(extra_meta or {})}
        name = _shard_name(index)
        tmp = self.path / f"{_TMP_PREFIX}{name}"
        write_shard_file(tmp, tensors, meta)
        # a manifest from an earlier run no longer describes the shards: drop it before the store changes
        (self.path / MANIFEST).unlink(missing_ok=True)
        os.replace(tmp, self.path / name)
        ids = [r.id for r in recs]
        for old in self.shard_ids.get(index, []):
            self.done_ids.discard(old)
        self.shard_ids[index] = ids
        self.done_ids.update(ids)
        if index in self.damaged:
            self.damaged.remove(index)
        return self.path / name

    def close(self, write_manifest: bool = True) -> dict | None:
        """Write the pending rows, then (rank 0 / single writer) the manifest. Returns the manifest."""
        if self._closed:
            return None
        self._flush()
        self._closed = True
        if write_manifest and _list_shards(self.path):
            return build_manifest(self.path)
        return None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an error keep the finished shards (resumable) but do not write a partial shard or a manifest
        if exc_type is None:
            self.close()


def shard_tensors(recs: Sequence[StoreRecord], identity: Mapping[str, Any], k: int) -> dict[str, np.ndarray]:
    """The flat tensors of one shard (ragged arrays concatenated, with (Q+1,) split offsets)."""
    def splits(lengths):
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    encoding = identity["encoding"]
    t: dict[str, np.ndarray] = {
        "answer_logprobs": np.stack([np.asarray(r.answer_logprobs, np.float32) for r in recs]),
        "labels": np.array([r.label for r in recs], np.int8),
        "token_ids": np.concatenate([np.asarray(r.token_ids, np.int32) for r in recs]),
        "token_splits": splits([len(r.token_ids) for r in recs]),
        "char_offsets": np.concatenate([np.asarray(r.offsets, np.int32).reshape(-1, 2) for r in recs]),
        "positions": np.concatenate([np.asarray(r.positions, np.int32) for r in recs]),
        "position_splits": splits([len(r.positions) for r in recs]),
    }
    t.update(encode_topk(encoding, [(np.asarray(r.topk_ids).reshape(-1, k), np.asarray(r.topk_logprobs).reshape(-1, k))
                                    for r in recs]))
    t.update(encode_extras(identity, recs, encoding, k))
    if identity.get("mid_token_rows"):
        t.update(encode_mid(recs, encoding, k))
    if recs[0].hidden is not None:
        t["hidden"] = np.stack([np.asarray(r.hidden, np.float32) for r in recs]).astype(
            np.float32 if encoding == "fp32" else np.float16)
    return t


# ----------------------------------------------------------------------------------------------------------
# reader


class TopKStore:
    """Read a finished store: `.manifest`, `.ids`, `len()`, `store[qid]` (random access), ordered iteration.

    `verify_hashes()` checks every shard against the manifest (training does it once per run);
    `check_answers()` refuses non-finite answer rows."""

    def __init__(self, path: str | os.PathLike, max_open: int = 8):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.identity: dict = self.manifest["identity"]
        self.encoding: str = self.manifest["encoding"]
        self.k: int = int(self.manifest["k"])
        self.ids: list[str] = list(self.manifest["ids"])
        self._where: dict[str, tuple[int, int]] = {}
        i = 0
        for si, sh in enumerate(self.manifest["shards"]):
            for row in range(sh["rows"]):
                self._where[self.ids[i]] = (si, row)
                i += 1
        self._open: dict[int, _Shard] = {}
        self._max_open = max_open

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, qid: str) -> bool:
        return qid in self._where

    def verify_hashes(self) -> None:
        """Every listed shard (and tokenizer file) has the sha256 the manifest gives; one-line KDError otherwise."""
        bad = [sh["file"] for sh in self.manifest["shards"]
               if not (self.path / sh["file"]).is_file() or sha256_file(self.path / sh["file"]) != sh["sha256"]]
        tok = self.path / TOKENIZER_DIR
        bad += [f"{TOKENIZER_DIR}/{n}" for n, h in self.manifest.get("tokenizer_files", {}).items()
                if Path(n).name != n or not (tok / n).is_file() or sha256_file(tok / n) != h]
        if bad:
            raise KDError(f"store {self.path}: {len(bad)} file(s) differ from the manifest's sha256 (e.g. {bad[0]}; "
                          f"corrupted or replaced): rerun the dump command to recompute them, or --no-verify")

    def check_answers(self) -> None:
        """Refuse answer rows that are not a distribution: NaN, +inf, all -inf, or above log 1."""
        bad, first = 0, None
        i = 0
        for si, sh in enumerate(self.manifest["shards"]):
            a = np.asarray(self._shard(si)["answer_logprobs"], np.float64)
            with np.errstate(invalid="ignore"):
                ok = ~np.isnan(a).any(1) & ~np.isposinf(a).any(1) & np.isfinite(a).any(1) & (a.max(1) <= 1e-3)
            if not ok.all():
                bad += int((~ok).sum())
                first = first or self.ids[i + int(np.flatnonzero(~ok)[0])]
            i += sh["rows"]
        if bad:
            raise KDError(f"store {self.path}: {bad} question(s) have answer log-probs that are not a distribution "
                          f"(NaN, +inf or all -inf; e.g. {first}): re-dump them")

    def _shard(self, si: int) -> _Shard:
        s = self._open.get(si)
        if s is None:
            if len(self._open) >= self._max_open:  # small FIFO of open maps
                self._open.pop(next(iter(self._open))).close()
            s = _Shard(self.path / self.manifest["shards"][si]["file"])
            self._open[si] = s
        return s

    def __getitem__(self, qid: str) -> StoreRecord:
        try:
            si, row = self._where[qid]
        except KeyError:
            raise KDError(f"question {qid} is not in the store {self.path}") from None
        return self._record(self._shard(si), row, qid)

    def _record(self, sh: _Shard, row: int, qid: str) -> StoreRecord:
        ts, ps = sh["token_splits"], sh["position_splits"]
        t0, t1, p0, p1 = int(ts[row]), int(ts[row + 1]), int(ps[row]), int(ps[row + 1])
        ids, lps = decode_topk(self.encoding, sh.__getitem__, self.k, row, p0, p1)
        logz, cmass = decode_extras(self.identity, sh.__getitem__, ids, p0, p1)
        hidden = np.asarray(sh["hidden"][row], np.float32) if "hidden" in sh else None
        mid = decode_mid(sh.__getitem__, row) if self.identity.get("mid_token_rows") else None
        return StoreRecord(
            id=qid, answer_logprobs=np.array(sh["answer_logprobs"][row], np.float32),
            token_ids=np.array(sh["token_ids"][t0:t1], np.int32), offsets=np.array(sh["char_offsets"][t0:t1], np.int32),
            positions=np.array(sh["positions"][p0:p1], np.int32), topk_ids=ids, topk_logprobs=lps,
            hidden=hidden, label=int(sh["labels"][row]), logz=logz, class_mass=cmass, mid=mid)

    def __iter__(self) -> Iterator[StoreRecord]:
        i = 0
        for si, sh in enumerate(self.manifest["shards"]):
            s = self._shard(si)
            for row in range(sh["rows"]):
                yield self._record(s, row, self.ids[i])
                i += 1

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()

    def __enter__(self) -> "TopKStore":
        return self

    def __exit__(self, *a) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# verification


def verify_store(path: str | os.PathLike) -> list[str]:
    """Every problem found, one line each (empty list = the store is sound)."""
    path = Path(path)
    try:
        m = read_manifest(path)
    except KDError as e:
        return [str(e)]
    problems: list[str] = []
    if identity_hash(m["identity"]) != m.get("identity_hash"):
        problems.append(f"{MANIFEST}: identity_hash does not match the identity")
    listed = {s["file"] for s in m["shards"]}
    for p in sorted(path.iterdir()):
        if p.name.startswith(_TMP_PREFIX) or p.name.endswith(".tmp"):
            problems.append(f"{p.name}: leftover temporary file of an interrupted write")
        elif _SHARD_RE.match(p.name) and p.name not in listed:
            problems.append(f"{p.name}: shard not listed in the manifest (interrupted append? rerun the dump)")
    if len(set(m["ids"])) != len(m["ids"]):
        problems.append(f"{MANIFEST}: duplicate question ids")
    if sum(s["rows"] for s in m["shards"]) != len(m["ids"]) or m.get("num_rows") != len(m["ids"]):
        problems.append(f"{MANIFEST}: shard row counts do not add up to the {len(m['ids'])} ids")
    for n, h in m.get("tokenizer_files", {}).items():
        f = path / TOKENIZER_DIR / n
        if Path(n).name != n or not f.is_file() or sha256_file(f) != h:
            problems.append(f"{TOKENIZER_DIR}/{n}: missing or sha256 mismatch")
    enc, k = m["encoding"], int(m["k"])
    i0 = 0
    for sh in m["shards"]:
        name = sh["file"]
        ids = m["ids"][i0:i0 + sh["rows"]]
        i0 += sh["rows"]
        p = path / name
        if not p.exists():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(p) != sh["sha256"]:
            problems.append(f"{name}: sha256 mismatch (file changed or corrupted)")
        try:
            s = _Shard(p)
        except KDError as e:
            problems.append(str(e))
            continue
        try:
            if not s.hash_ok():
                problems.append(f"{name}: content does not match its own hash (corrupted)")
            problems.extend(_verify_shard(s, sh, ids, enc, k, m["identity"]))
        except (KDError, ValueError, IndexError) as e:
            problems.append(f"{name}: unreadable ({e})")
        finally:
            s.close()
    return problems


def _verify_shard(s: _Shard, sh: dict, ids: list[str], enc: str, k: int, identity: dict) -> list[str]:
    name = s.path.name
    out = []
    try:
        meta_ids = json.loads(s.meta.get("ids", "null"))
        meta_ident = json.loads(s.meta.get("identity", "null"))
    except ValueError:
        return [f"{name}: metadata is not valid JSON"]
    if meta_ids != ids:
        out.append(f"{name}: row ids differ from the manifest")
    if meta_ident != identity:
        out.append(f"{name}: identity differs from the manifest")
    q = len(ids)
    ts, ps = s["token_splits"], s["position_splits"]
    checks = [
        (s["answer_logprobs"].shape == (q, 4), "answer_logprobs shape"),
        (s["labels"].shape == (q,), "labels shape"),
        (len(ts) == q + 1 and ts[0] == 0 and (np.diff(ts) >= 0).all() and ts[-1] == len(s["token_ids"]),
         "token splits"),
        (len(ps) == q + 1 and ps[0] == 0 and (np.diff(ps) >= 0).all() and ps[-1] == len(s["positions"]),
         "position splits"),
        (s["char_offsets"].shape == (len(s["token_ids"]), 2), "char_offsets shape"),
        (int(ts[-1]) == sh.get("tokens"), "token count vs manifest"),
        (int(ps[-1]) == sh.get("positions"), "position count vs manifest"),
    ]
    out += [f"{name}: bad {what}" for ok, what in checks if not ok]
    if out:
        return out
    bad = int((~np.isfinite(s["answer_logprobs"])).sum())
    if bad:
        out.append(f"{name}: {bad} non-finite answer log-probs")
    if "hidden" in s and (n := int((~np.isfinite(s["hidden"].astype(np.float32))).sum())):
        out.append(f"{name}: {n} non-finite hidden values")
    if "mid_probs" in s and (n := int((~np.isfinite(s["mid_probs"].astype(np.float32))).sum())):
        out.append(f"{name}: {n} non-finite mid-token probabilities")
    # positions must index into the question's tokens
    for qi in range(q):
        pos = s["positions"][ps[qi]:ps[qi + 1]]
        if len(pos) and (pos.min() < 0 or pos.max() >= ts[qi + 1] - ts[qi]):
            out.append(f"{name}: {ids[qi]} has positions outside its {ts[qi + 1] - ts[qi]} tokens")
    nonfinite = 0
    for qi in range(q):
        tids, lps = decode_topk(enc, s.__getitem__, k, qi, int(ps[qi]), int(ps[qi + 1]))
        nonfinite += int((~np.isfinite(lps)).sum())
        if tids.shape != (ps[qi + 1] - ps[qi], k):
            out.append(f"{name}: {ids[qi]} top-k has shape {tids.shape}")
        elif len(tids) and (tids.min() < 0):
            out.append(f"{name}: {ids[qi]} has negative top-k ids")
    if nonfinite:
        out.append(f"{name}: {nonfinite} non-finite top-k log-probs")
    return out


# ----------------------------------------------------------------------------------------------------------
# CLI: python -m kd_mlx.store verify|show


@click.group(help="Inspect and check a kd_mlx logits store.")
def cli() -> None:
    pass


@cli.command("verify", help="Check checksums, counts, shapes and NaN/Inf; exit 1 with one line per problem.")
@click.argument("store", type=click.Path())
@cli_errors
def verify_cmd(store: str) -> None:
    problems = verify_store(store)
    for p in problems:
        click.echo(f"problem: {p}", err=True)
    if problems:
        raise SystemExit(1)
    m = read_manifest(store)
    click.echo(f"ok: {m['num_rows']} questions, {m['num_positions']} top-k rows (k={m['k']}, "
               f"{m['encoding']}), {len(m['shards'])} shards")


@cli.command("show", help="Print one question's record as JSON.")
@click.argument("store", type=click.Path())
@click.option("--id", "qid", required=True, help="question id (see manifest.json 'ids')")
@click.option("--max-positions", type=int, default=None, help="print at most this many top-k rows")
@cli_errors
def show_cmd(store: str, qid: str, max_positions: int | None) -> None:
    with TopKStore(store) as st:
        click.echo(json.dumps(st[qid].to_json(max_positions), ensure_ascii=False, indent=1))


def main() -> None:
    cli(prog_name="python -m kd_mlx.store")


if __name__ == "__main__":
    main()
