"""Tests for kd_mlx.align on the real tokenizers (GPT-2 BPE as Phi-1.5; cl100k in Kimi's tiktoken.model format).

Teacher distributions are synthetic (the teacher's real next token plus other real vocabulary ids, Dirichlet
masses under 1) over real tokenizations of fixture sentences and of real CMMLU prompts when present."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest

from kd_mlx import align as A
from kd_mlx.store import StoreRecord, StoreWriter, TopKStore
from kd_mlx.teacher.dump import Summariser
from kd_mlx.utils import KDError


@dataclass
class Rec(StoreRecord):
    n_bos: int = 0  # BOS rows at the start (for the independent boundary checks)

SENTENCES = [
    "中华人民共和国成立于1949年10月1日。",
    "The quick brown fox jumps over the lazy dog.",
    "题目：下列哪个选项是正确的？\nA. 水的沸点是100°C\nB. 3.14159\nC. 鱻龘齉\nD. 以上都不对\n答案是：",
    "  leading spaces\tand\ttabs    and  many   spaces\n\n\nnewlines   ",
    "Numbers 1234567 and 3.14, 中文English混合text，标点！emoji 😀 and 𠀀.",
    "以下是关于高中数学的单项选择题，请直接给出正确答案的选项。\n\n题目：若x=2，则x²+1=\nA. 3\nB. 5\nC. 4\nD. 6\n答案是：B\n\n",
]


@pytest.fixture(scope="module")
def vmap_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vmap_cache")


@pytest.fixture(scope="module")
def vmap(kimi_tok, phi_tok, vmap_cache_dir):
    return A.VocabMap.build(kimi_tok, phi_tok, cache_dir=vmap_cache_dir)


def synthetic_record(t_tok, text: str, k: int = 8, seed: int = 0, bos: bool = False):
    """A store-shaped record for `text`: row i holds the real next teacher token first, then random real ids
    (some special, some partial-character byte tokens), true log-probs summing to < 1 (a tail outside top-k)."""
    rng = np.random.default_rng(seed)
    ids, offs = t_tok.encode_with_offsets(text)
    if bos:
        ids, offs = [t_tok.bos_id] + ids, [(0, 0)] + offs
    n = len(ids)
    topk = rng.integers(0, t_tok.vocab_size, (n, k))
    topk[:-1, 0] = ids[1:]
    topk[:, 1] = rng.choice(ids, n)  # other tokens of the same text: real words, several map to one student id
    # ids must be distinct within a row, as a real top-k is
    for r in range(n):
        seen = set()
        for c in range(k):
            while int(topk[r, c]) in seen:
                topk[r, c] = rng.integers(0, t_tok.vocab_size)
            seen.add(int(topk[r, c]))
    mass = rng.uniform(0.5, 0.999, n)
    lp = np.log(rng.dirichlet(np.ones(k) * 0.5, n) * mass[:, None]).astype(np.float32)
    return Rec(id="x", answer_logprobs=np.zeros(4, np.float32), token_ids=np.array(ids, np.int32),
               offsets=np.array(offs, np.int32), positions=np.arange(n, dtype=np.int32),
               topk_ids=topk.astype(np.int32), topk_logprobs=lp, n_bos=int(bos))


def byte_level_alignment(t_tok, s_tok, rec, s_ids, t_text: str, s_text: str, region_start: int) -> list[tuple]:
    """Independent check of the boundaries: (row, student position) for every teacher row whose prefix ends at a
    byte where a student token also ends (then a student token follows), on a character boundary, in the region."""
    nb = rec.n_bos
    t_ends = np.cumsum([len(t_tok.token_bytes(int(i))) for i in rec.token_ids[nb:]])
    s_ends = np.cumsum([len(s_tok.token_bytes(int(i))) for i in s_ids])
    byte_shift = len(t_text.encode()) - len(s_text.encode())
    region_b = len(t_text[:region_start].encode())
    char_starts = set(np.cumsum([0] + [len(ch.encode()) for ch in t_text]).tolist())
    s_end_at = {int(b): j for j, b in enumerate(s_ends[:-1])}  # a token j+1 follows
    out = []
    for r, i in enumerate(rec.positions.tolist()):
        if i + 1 >= len(rec.token_ids):
            continue
        b = int(t_ends[i - nb]) if i >= nb else 0  # the BOS row has read nothing
        if b >= region_b and b in char_starts and (b - byte_shift) in s_end_at:
            out.append((r, s_end_at[b - byte_shift]))
    return out


def token_prefix_bytes(tok, ids, n: int) -> bytes:
    return b"".join(tok.token_bytes(int(i)) for i in ids[:n])


def check_alignment(t_tok, s_tok, vmap, rec, s_ids, s_offs, shift: int, region_start: int, t_text: str, s_text: str,
                    max_positions=None):
    """All invariants of one aligned record; returns the result."""
    t_offs = rec.offsets
    pos, ids, probs, rest = out = A.align_record(rec, t_offs, s_offs, shift, region_start, vmap, max_positions)
    ref = A.align_record_reference(rec, t_offs, s_offs, shift, region_start, vmap, max_positions)
    # fast == reference
    np.testing.assert_array_equal(pos, ref[0])
    np.testing.assert_array_equal(ids, ref[1])
    np.testing.assert_allclose(probs, ref[2], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rest, ref[3], rtol=1e-6, atol=1e-6)
    # shapes, padding, sums
    n = len(pos)
    assert ids.shape == probs.shape and ids.shape[0] == n == rest.shape[0] and ids.shape[1] >= 1
    assert np.all(probs[ids < 0] == 0) and np.all(probs >= 0) and np.all(rest >= 0)
    np.testing.assert_allclose(probs.sum(-1) + rest, 1.0, atol=2e-6)
    for r in range(n):
        real = ids[r][ids[r] >= 0]
        assert len(set(real.tolist())) == len(real)  # one slot per student id
        assert np.all(ids[r][len(real):] == -1)  # padding at the end
    # the same boundaries as an independent byte-level computation
    rows, pos2 = A.aligned_rows(rec.positions, t_offs, s_offs, shift, region_start)
    expect = byte_level_alignment(t_tok, s_tok, rec, s_ids, t_text, s_text, region_start)
    assert list(zip(rows.tolist(), pos2.tolist())) == expect
    rows = rows[A._keep_last(len(rows), max_positions)]
    # the aligned student position has read exactly the text the teacher row has read (byte-exact)
    t_ids = rec.token_ids
    t_bos = rec.n_bos
    for r, j in zip(rows.tolist(), pos.tolist()):
        i = int(rec.positions[r])
        t_read = token_prefix_bytes(t_tok, t_ids[t_bos:], i + 1 - t_bos)
        s_read = token_prefix_bytes(s_tok, s_ids, j + 1)
        c = len(t_read.decode("utf-8"))
        assert t_text.encode().startswith(t_read) and s_text.encode().startswith(s_read)
        assert c >= region_start and t_read.decode()[region_start:] == s_read.decode()[region_start - shift:]
        # the teacher's real next token and the student's real next token start at the same byte
        assert t_text[c:].encode().startswith(t_tok.token_bytes(int(t_ids[i + 1])))
        assert s_text[c - shift:].encode().startswith(s_tok.token_bytes(int(s_ids[j + 1])))
    # each student target decodes to a byte prefix of (at least one of) the teacher candidates projected onto it
    for r, row in enumerate(rows.tolist()):
        cands = [int(t) for t in rec.topk_ids[row]]
        for sid in ids[r][ids[r] >= 0].tolist():
            sb = s_tok.token_bytes(sid)
            from_cands = [t for t in cands if vmap.student_id[t] == sid]
            assert from_cands and all(t_tok.token_bytes(t).startswith(sb) for t in from_cands)
    return out


# ------------------------------------------------------------------------------------------------- vocabulary map
def test_vocab_map_maps_each_teacher_token_to_a_byte_prefix(kimi_tok, phi_tok, vmap):
    sid = vmap.student_id
    assert sid.dtype == np.int32 and sid.shape == (kimi_tok.vocab_size,) and not vmap.is_identity
    specials = A.special_token_ids(kimi_tok)
    assert len(specials) == 256 and np.all(sid[sorted(specials)] == -1)
    assert vmap.coverage > 0.99  # everything but the specials maps (byte-level BPE covers every byte)
    s_special = A.special_token_ids(phi_tok)
    assert s_special == {50256}
    for tid in np.nonzero(sid >= 0)[0].tolist():
        assert kimi_tok.token_bytes(tid).startswith(phi_tok.token_bytes(int(sid[tid])))
    assert not np.isin(sid, list(s_special)).any()


def test_vocab_map_hand_checked(kimi_tok, phi_tok, vmap):
    def t1(text):  # a teacher token that is exactly `text`
        ids = kimi_tok.encode(text)
        assert len(ids) == 1, (text, ids)
        return ids[0]

    # whole words with the leading space map to the same word in GPT-2
    for w in [" the", " quick", "Hello", "\n\n", "    "]:
        assert phi_tok.token_bytes(int(vmap.student_id[t1(w)])) == w.encode()
    # a whole Chinese word maps to the student's first piece of its first character
    zh = "中国"
    s_first = phi_tok.encode(zh)[0]
    assert phi_tok.token_bytes(s_first) in ("中".encode(), "中".encode()[:1], "中".encode()[:2])
    assert vmap.student_id[t1(zh)] == s_first
    # a teacher token that is part of a character (not UTF-8) maps to the longest student byte-prefix
    partial = [t for t in range(2000, 100000) if len(kimi_tok.token_bytes(t)) >= 2
               and kimi_tok.token_bytes(t)[0] >= 0xE0 and A._decode_or_none(kimi_tok.token_bytes(t)) is None][:20]
    assert partial
    s_vocab = {phi_tok.token_bytes(i) for i in range(phi_tok.vocab_size)} - {phi_tok.token_bytes(50256)}
    for t in partial:
        b = kimi_tok.token_bytes(t)
        sb = phi_tok.token_bytes(int(vmap.student_id[t]))
        assert b.startswith(sb) and not any(b[:n] in s_vocab for n in range(len(sb) + 1, len(b) + 1))


def test_vocab_map_fast_equals_reference(kimi_tok, phi_tok, vmap):
    rng = np.random.default_rng(3)
    sid = vmap.student_id
    t_bytes = [kimi_tok.token_bytes(t) for t in range(kimi_tok.vocab_size)]
    non_utf8 = [t for t, b in enumerate(t_bytes) if b and A._decode_or_none(b) is None]
    sample = sorted(set(rng.choice(kimi_tok.vocab_size, 1500, replace=False).tolist()) | set(non_utf8[:500])
                    | set(range(kimi_tok.vocab_size - 256, kimi_tok.vocab_size, 17)))
    cache: dict = {}
    ref = [A.student_id_reference(kimi_tok, phi_tok, t, cache) for t in sample]
    np.testing.assert_array_equal(sid[sample], ref)


def test_vocab_map_cache_round_trip_and_keys(kimi_tok, phi_tok, vmap, vmap_cache_dir):
    path = A.VocabMap.cache_path(kimi_tok, phi_tok, vmap_cache_dir)
    assert vmap.source == "built" and path.exists()
    assert kimi_tok.fingerprint() in path.name and phi_tok.fingerprint() in path.name
    assert [p.name for p in vmap_cache_dir.iterdir()] == [path.name]  # the atomic write left no temporary file
    again = A.VocabMap.build(kimi_tok, phi_tok, cache_dir=vmap_cache_dir)
    assert again.source == "cache" and again.teacher_fingerprint == kimi_tok.fingerprint()
    assert again.student_fingerprint == phi_tok.fingerprint()
    np.testing.assert_array_equal(again.student_id, vmap.student_id)
    np.testing.assert_array_equal(again.teacher_len, vmap.teacher_len)
    np.testing.assert_array_equal(again.student_len, vmap.student_len)
    assert vmap.teacher_len[kimi_tok.bos_id] == 0 and vmap.teacher_len[kimi_tok.encode(" the")[0]] == 4
    # the other direction is another key, another file
    assert A.VocabMap.cache_path(phi_tok, kimi_tok, vmap_cache_dir) != path
    # a file under this key but for another pair is refused by load, and build replaces it
    saved = path.read_bytes()
    try:
        A.VocabMap(vmap.student_id[:-1], "0" * 16, phi_tok.fingerprint(), False).save(path)
        with pytest.raises(KDError, match="is for tokenizers"):
            A.VocabMap.load(path, expect=(kimi_tok.fingerprint(), phi_tok.fingerprint(), kimi_tok.vocab_size))
        rebuilt = A.VocabMap.build(kimi_tok, phi_tok, cache_dir=vmap_cache_dir)
        assert rebuilt.source == "built"
        np.testing.assert_array_equal(rebuilt.student_id, vmap.student_id)
        assert A.VocabMap.load(path).source == "cache"
        # a damaged file: a one-line error from load (build would rebuild it the same way)
        path.write_bytes(b"not an npz")
        with pytest.raises(KDError, match="cannot read vocabulary map"):
            A.VocabMap.load(path)
    finally:
        path.write_bytes(saved)


def test_default_cache_dir_and_unwritable_cache(monkeypatch, tmp_path, kimi_tok, phi_tok, vmap):
    monkeypatch.setenv("KD_MLX_CACHE", str(tmp_path / "c"))
    assert A.utils.cache_dir() == tmp_path / "c"
    assert A.VocabMap.cache_path(kimi_tok, phi_tok).parent == tmp_path / "c"
    # the default cache directory is unusable (a file): the map is built all the same, only not cached
    (tmp_path / "c").write_text("")
    vm = A.VocabMap.build(kimi_tok, phi_tok)
    assert vm.source == "built" and (tmp_path / "c").is_file()
    np.testing.assert_array_equal(vm.student_id, vmap.student_id)


# ------------------------------------------------------------------------------------------------- identity case
@pytest.mark.parametrize("which", ["kimi", "phi"])
def test_same_tokenizer_is_identity(which, kimi_tok, phi_tok, tmp_path):
    tok = kimi_tok if which == "kimi" else phi_tok
    vm = A.VocabMap.build(tok, tok, cache_dir=tmp_path)
    assert vm.is_identity and vm.source == "identity" and not list(tmp_path.iterdir())
    np.testing.assert_array_equal(vm.student_id, np.arange(tok.vocab_size))
    for seed, text in enumerate(SENTENCES):
        rec = synthetic_record(tok, text, seed=seed)
        ids, offs = tok.encode_with_offsets(text)
        pos, sids, probs, rest = check_alignment(tok, tok, vm, rec, ids, offs, 0, 0, text, text)
        # every position whose next token starts cleanly (between characters) is kept, at the same index
        offs = np.array(offs)
        clean = [i for i in range(len(ids) - 1) if offs[i, 1] == offs[i + 1, 0]]
        np.testing.assert_array_equal(pos, clean)
        np.testing.assert_array_equal(sids, rec.topk_ids[clean])  # unchanged, top-k order
        np.testing.assert_array_equal(probs, np.exp(rec.topk_logprobs[clean].astype(np.float64)).astype(np.float32))
        np.testing.assert_allclose(rest, 1 - np.exp(rec.topk_logprobs[clean].astype(np.float64)).sum(-1), atol=1e-6)


# ------------------------------------------------------------------------------------------- cross-tokenizer records
@pytest.mark.parametrize("bos", [False, True])
def test_fixture_sentences_kimi_to_phi(bos, kimi_tok, phi_tok, vmap):
    total_s, total_aligned = 0, 0
    for seed, text in enumerate(SENTENCES):
        rec = synthetic_record(kimi_tok, text, seed=seed, bos=bos)
        s_ids, s_offs = phi_tok.encode_with_offsets(text)
        pos, ids, probs, rest = check_alignment(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, 0, 0, text, text)
        assert len(pos) > 0 and len(set(pos.tolist())) == len(pos)
        total_s += len(s_ids) - 1
        total_aligned += len(pos)
    assert 0.2 < total_aligned / total_s < 1.0


def test_pieces_of_one_character_never_align(kimi_tok, phi_tok, vmap):
    text = "鱻龘齉"  # rare characters: GPT-2 splits each into several byte tokens
    s_ids, s_offs = phi_tok.encode_with_offsets(text)
    assert len(s_ids) > len(text)
    rec = synthetic_record(kimi_tok, text)
    pos, *_ = check_alignment(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, 0, 0, text, text)
    for j in pos.tolist():  # the student has read whole characters only
        assert A._decode_or_none(token_prefix_bytes(phi_tok, s_ids, j + 1)) is not None


def test_hand_computed_alignment(kimi_tok, phi_tok, vmap):
    # "Hello world" is [Hello][ world] for both; one row at the first token, candidates hand-chosen
    text = "Hello world"
    t_ids, t_offs = kimi_tok.encode_with_offsets(text)
    s_ids, s_offs = phi_tok.encode_with_offsets(text)
    assert len(t_ids) == 2 and len(s_ids) == 2
    world, worlds, the = kimi_tok.encode(" world")[0], kimi_tok.encode(" worlds")[0], kimi_tok.encode(" the")[0]
    eos = kimi_tok.eos_id
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05]], np.float32))
    rec = Rec(id="x", answer_logprobs=np.zeros(4, np.float32), token_ids=np.array(t_ids),
              offsets=np.array(t_offs), positions=np.array([0, 1]),
              topk_ids=np.array([[world, worlds, the, eos], [0, 1, 2, 3]], np.int32),
              topk_logprobs=np.concatenate([lp, lp]))
    pos, ids, probs, rest = check_alignment(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, 0, 0, text, text)
    s_world, s_the = phi_tok.encode(" world")[0], phi_tok.encode(" the")[0]
    assert pos.tolist() == [0]  # the last row (position 1) has no next token
    want = {s_world: 0.5 + (0.2 if vmap.student_id[worlds] == s_world else 0.0), s_the: 0.1}
    if vmap.student_id[worlds] != s_world:
        want[int(vmap.student_id[worlds])] = 0.2
    got = {int(i): float(p) for i, p in zip(ids[0], probs[0]) if i >= 0}
    assert got == pytest.approx(want) and ids[0, 0] == s_world
    assert rest[0] == pytest.approx(0.15 + 0.05)  # tail outside the top-k + the unmappable EOS


def test_shift_region_and_max_positions(kimi_tok, phi_tok, vmap):
    # the teacher's prompt has one more shot than the student's: only the shared question part aligns
    shot = SENTENCES[5]
    question = SENTENCES[2]
    t_text, s_text = shot + shot + question, shot + question
    rec = synthetic_record(kimi_tok, t_text, seed=9)
    s_ids, s_offs = phi_tok.encode_with_offsets(s_text)
    shift, region = len(t_text) - len(s_text), len(t_text) - len(question)
    pos, *_ = check_alignment(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, shift, region, t_text, s_text)
    s_region = len(s_text) - len(question)
    assert len(pos) > 5 and all(s_offs[j + 1][0] >= s_region for j in pos.tolist())
    for m in (0, 3, 1000):
        p2, i2, pr2, r2 = check_alignment(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, shift, region, t_text, s_text,
                                          max_positions=m)
        assert p2.tolist() == pos.tolist()[max(0, len(pos) - m):]


def test_empty_and_unaligned_records(kimi_tok, phi_tok, vmap):
    rec = synthetic_record(kimi_tok, "abc")
    out = A.align_record(rec, rec.offsets, [], 0, 0, vmap)
    ref = A.align_record_reference(rec, rec.offsets, [], 0, 0, vmap)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.shape[0] == 0
    assert out[1].shape == (0, 1) and out[1].dtype == np.int32 and out[2].dtype == np.float32
    # a record without top-k rows
    empty = replace(rec, positions=np.zeros(0, np.int32), topk_ids=np.zeros((0, 8), np.int32),
                    topk_logprobs=np.zeros((0, 8), np.float32))
    s_ids, s_offs = phi_tok.encode_with_offsets("abc")
    for out in (A.align_record(empty, empty.offsets, s_offs, 0, 0, vmap),
                A.align_record_reference(empty, empty.offsets, s_offs, 0, 0, vmap),
                A.align_record_bytes(empty, s_ids, "abc", "abc", 0, vmap),
                A.align_record_bytes_reference(empty, s_ids, "abc", "abc", 0, vmap)):
        assert [a.shape for a in out] == [(0,), (0, 1), (0, 1), (0,)]
    # rows whose candidates are all unmappable (specials) keep their whole mass in the remainder
    ids, probs, rest = A.project_topk(np.array([[kimi_tok.eos_id, kimi_tok.bos_id]]), np.log([[0.3, 0.3]]),
                                      vmap.student_id)
    assert ids.tolist() == [[-1]] and probs.tolist() == [[0.0]] and rest[0] == pytest.approx(1.0)


def test_rounding_over_one_is_renormalised(vmap, kimi_tok):
    t = [kimi_tok.encode(w)[0] for w in (" the", " a")]
    ids, probs, rest = A.project_topk(np.array([t]), np.log(np.array([[0.7, 0.3000004]])), vmap.student_id)
    assert rest[0] == 0 and probs.sum() == pytest.approx(1.0, abs=1e-7)


# --------------------------------------------------------------------------------------------------- real CMMLU text
def test_real_cmmlu_prompts(real_cmmlu, kimi_tok, phi_tok, vmap):
    from kd_mlx.data import build_prompt, load_cmmlu

    cm = load_cmmlu(real_cmmlu)
    rng = np.random.default_rng(5)
    subjects = cm.subjects
    n_checked, aligned, s_positions = 0, 0, 0
    for k, subject in enumerate(rng.choice(subjects, 12, replace=False).tolist()):
        qs = cm.test[subject]
        for q in [qs[int(i)] for i in rng.choice(len(qs), 2, replace=False)]:
            prompt = build_prompt(q, cm.dev[subject][:2])  # 2 shots: the full check loops in Python
            text = prompt.text
            rec = synthetic_record(kimi_tok, text, k=10, seed=k, bos=True)
            s_ids, s_offs = phi_tok.encode_with_offsets(text)
            pos, *_ = check_alignment(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, 0, 0, text, text)
            # and with fewer shots for the student: only the question part
            s_prompt = build_prompt(q, cm.dev[subject][:1])
            s2_ids, s2_offs = phi_tok.encode_with_offsets(s_prompt.text)
            shift, region = len(text) - len(s_prompt.text), len(text) - len(prompt.suffix)
            check_alignment(kimi_tok, phi_tok, vmap, rec, s2_ids, s2_offs, shift, region, text, s_prompt.text)
            n_checked += 1
            aligned += len(pos)
            s_positions += len(s_ids) - 1
    assert n_checked == 24
    assert 0.2 < aligned / s_positions < 0.9  # Chinese: ~2.2 student tokens per character, few shared boundaries


# ------------------------------------------------------------------------------------ byte-level boundaries (in chars)
def check_bytes(t_tok, s_tok, vmap, rec, s_ids, s_offs, shift, region_start, t_text, s_text, max_positions=None):
    # boundaries only (the context check is tested on its own): comparable with the char-offset version
    out = A.align_record_bytes(rec, s_ids, t_text, s_text, region_start, vmap, max_positions, context_check=False)
    ref = A.align_record_bytes_reference(rec, s_ids, t_text, s_text, region_start, vmap, max_positions,
                                         context_check=False)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert a.dtype == b.dtype and a.shape == b.shape
    pos, ids, probs, rest = out
    np.testing.assert_allclose(probs.sum(-1) + rest, 1.0, atol=2e-6)
    t_ends = np.cumsum([len(t_tok.token_bytes(int(i))) if i != t_tok.bos_id else 0 for i in rec.token_ids])
    s_ends = np.cumsum([len(s_tok.token_bytes(int(i))) for i in s_ids])
    rows, pos2 = A.aligned_rows_bytes(rec.positions, t_ends, s_ends, *A._byte_frame(t_text, s_text, region_start))
    rows, pos2 = rows[A._keep_last(len(rows), max_positions)], pos2[A._keep_last(len(pos2), max_positions)]
    np.testing.assert_array_equal(pos, pos2)
    tb, sb = t_text.encode(), s_text.encode()
    byte_shift, region_b = len(tb) - len(sb), len(t_text[:region_start].encode())
    for n, (r, j) in enumerate(zip(rows.tolist(), pos.tolist())):
        i = int(rec.positions[r])
        b = int(t_ends[i])
        assert b >= region_b and int(s_ends[j]) == b - byte_shift and j + 1 < len(s_ids)
        # both sides have read exactly the text up to that byte
        t_read = b"".join(t_tok.token_bytes(int(t)) for t in rec.token_ids[rec.n_bos: i + 1])
        assert t_read == tb[:b] and token_prefix_bytes(s_tok, s_ids, j + 1) == sb[: b - byte_shift]
        for sid in ids[n][ids[n] >= 0].tolist():
            cands = [t for t in rec.topk_ids[r].tolist() if vmap.student_id[t] == sid]
            assert cands and all(t_tok.token_bytes(t).startswith(s_tok.token_bytes(sid)) for t in cands)
    # between characters it finds exactly what the char-offset version finds
    char = A.align_record(rec, rec.offsets, s_offs, shift, region_start, vmap)
    char_rows, _ = A.aligned_rows(rec.positions, rec.offsets, s_offs, shift, region_start)
    full_rows, full_pos = A.aligned_rows_bytes(rec.positions, t_ends, s_ends, byte_shift, region_b)
    cb = set(np.cumsum([0] + [len(ch.encode()) for ch in t_text]).tolist())
    at_char = np.array([int(t_ends[rec.positions[r]]) in cb for r in full_rows.tolist()], bool)
    np.testing.assert_array_equal(full_rows[at_char] if len(full_rows) else full_rows, char_rows)
    np.testing.assert_array_equal(full_pos[at_char] if len(full_pos) else full_pos, char[0])
    return out, int((~at_char).sum()) if len(full_rows) else 0


@pytest.mark.parametrize("bos", [False, True])
def test_byte_alignment_extends_char_alignment(bos, kimi_tok, phi_tok, vmap):
    inside = 0
    for seed, text in enumerate(SENTENCES):
        rec = synthetic_record(kimi_tok, text, seed=seed, bos=bos)
        s_ids, s_offs = phi_tok.encode_with_offsets(text)
        _, n_inside = check_bytes(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, 0, 0, text, text)
        inside += n_inside
    assert inside > 0  # "鱻龘齉", "𠀀", "😀": both cut inside the character at the same byte somewhere
    shot, question = SENTENCES[5], SENTENCES[2]
    t_text, s_text = shot + shot + question, shot + question
    rec = synthetic_record(kimi_tok, t_text, seed=9, bos=bos)
    s_ids, s_offs = phi_tok.encode_with_offsets(s_text)
    for m in (None, 0, 4):
        check_bytes(kimi_tok, phi_tok, vmap, rec, s_ids, s_offs, len(t_text) - len(s_text), len(shot), t_text,
                    s_text, max_positions=m)


def test_byte_alignment_identity_keeps_every_boundary(kimi_tok, tmp_path):
    vm = A.VocabMap.build(kimi_tok, kimi_tok, cache_dir=tmp_path)
    text = SENTENCES[2] + SENTENCES[4]
    rec = synthetic_record(kimi_tok, text, seed=3)
    ids = list(rec.token_ids)
    pos, sids, probs, rest = A.align_record_bytes(rec, ids, text, text, 0, vm)
    assert pos.tolist() == list(range(len(ids) - 1))  # inside characters too; the context check drops nothing
    np.testing.assert_array_equal(sids, rec.topk_ids[:-1])
    np.testing.assert_array_equal(probs, np.exp(rec.topk_logprobs[:-1].astype(np.float64)).astype(np.float32))


def test_byte_alignment_refuses_mismatched_inputs(kimi_tok, phi_tok, vmap):
    text = SENTENCES[0]
    rec = synthetic_record(kimi_tok, text)
    s_ids = phi_tok.encode(text)
    with pytest.raises(KDError, match="do not belong together"):
        A.align_record_bytes(rec, s_ids[:-1], text, text, 0, vmap)
    with pytest.raises(KDError, match="do not belong together"):
        A.align_record_bytes(rec, s_ids, text + "x", text + "x", 0, vmap)
    with pytest.raises(KDError, match="common suffix"):
        A.align_record_bytes(rec, s_ids, text, text[:-1] + "?", 0, vmap)
    old = A.VocabMap(vmap.student_id, vmap.teacher_fingerprint, vmap.student_fingerprint, False)
    with pytest.raises(KDError, match="no token byte lengths"):
        A.align_record_bytes(rec, s_ids, text, text, 0, old)


# ------------------------------------------------------------------------------ exact targets from the full teacher row
def full_rows(t_tok, rec_ids: np.ndarray, seed: int) -> np.ndarray:
    """Realistic full teacher rows (P, V): the real next token plus tokens sharing its first bytes carry most of
    the mass (many Chinese candidates begin with one GPT-2 byte token), a long random tail."""
    rng = np.random.default_rng(seed)
    V = t_tok.vocab_size
    logits = rng.standard_normal((len(rec_ids), V)) * 1.5
    for r, t in enumerate(rec_ids[1:].tolist() + [rec_ids[0]]):
        logits[r, t] += 9.0
        logits[r, rng.integers(0, V, 60)] += rng.uniform(3, 7, 60)
    return (logits - np.logaddexp.reduce(logits, -1, keepdims=True)).astype(np.float32)


def projection_of_full_row(lp_row: np.ndarray, student_id: np.ndarray, T: float) -> dict[int, float]:
    """Plain: the full teacher row tempered at T, summed per student first token (−1 = unmappable)."""
    p = np.exp(lp_row.astype(np.float64) / T)
    p /= p.sum()
    return {int(c): float(m) for c, m in enumerate(np.bincount(student_id + 1, weights=p)[1:]) if m > 0}


@pytest.mark.parametrize("encoding", ["fp32", "q8rice"])
def test_projected_target_equals_projection_of_full_teacher_row(encoding, kimi_tok, phi_tok, vmap, tmp_path):
    """Dump-side summary (top-k + class masses + log Z_T) -> store -> alignment gives, on every listed student id,
    the exact projection of the whole teacher row (tempered at T), and the remainder is the mass of the rest."""
    text = SENTENCES[2]
    t_ids, t_offs = kimi_tok.encode_with_offsets(text)
    s_ids = phi_tok.encode(text)
    lp = full_rows(kimi_tok, np.array(t_ids), seed=1)
    k, temps = 8, [1.0, 2.0]
    summ = Summariser(k, kimi_tok.encode("A")[:1] * 4, temps, vmap.student_id)(lp)
    rec = StoreRecord(id="q", answer_logprobs=np.log(np.full(4, 0.25, np.float32)), token_ids=np.array(t_ids),
                      offsets=np.array(t_offs), positions=np.arange(len(t_ids), dtype=np.int32),
                      topk_ids=summ["topk_ids"], topk_logprobs=summ["topk_logprobs"], logz=summ["logz"],
                      class_mass=summ["class_mass"])
    ident = {"k": k, "encoding": encoding, "temperatures": temps, "student_tokenizer": phi_tok.fingerprint()}
    with StoreWriter(tmp_path / "s", ident, shard_size=4) as w:
        w.add(rec)
    with TopKStore(tmp_path / "s") as st:
        back = st["q"]
    tol = 1e-6 if encoding == "fp32" else 2e-3  # float16 class masses, 8-bit log-probs
    n_rows = 0
    for T in temps:
        pos, ids, probs, rest = A.align_record_bytes(back, s_ids, text, text, 0, vmap, temperature=T)
        ref = A.align_record_bytes_reference(back, s_ids, text, text, 0, vmap, temperature=T)
        for a, b in zip((pos, ids, probs, rest), ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        rows, apos = A.aligned_rows_bytes(back.positions, np.cumsum(vmap.teacher_len[t_ids]),
                                          np.cumsum(vmap.student_len[s_ids]), 0, 0)
        keep = ~A.context_mismatch(back, rows, apos, s_ids, vmap)
        assert len(pos) == int(keep.sum()) > 5
        for n, r in enumerate(rows[keep].tolist()):
            want = projection_of_full_row(lp[r], vmap.student_id, T)
            listed = [int(i) for i in ids[n] if i >= 0]
            got = dict(zip(listed, probs[n][: len(listed)].tolist()))
            assert got == pytest.approx({c: want[c] for c in listed}, abs=tol)
            assert rest[n] == pytest.approx(1.0 - sum(want[c] for c in listed), abs=tol * len(listed))
            n_rows += 1
    assert n_rows > 10


def test_exact_projection_hand_example(kimi_tok, phi_tok, vmap):
    """Issue 13's example: teacher 码 0.50, 示 0.30 in the top-2, 类 0.15 in the tail, all three beginning with the
    same GPT-2 byte token: the projection is 0.95 on that id and 0.05 outside, not 0.80 / 0.20."""
    tok = {c: kimi_tok.encode(c) for c in "码示类"}
    assert all(len(v) == 1 for v in tok.values())
    ma, shi, lei = (tok[c][0] for c in "码示类")
    first = int(vmap.student_id[ma])
    assert vmap.student_id[shi] == first == vmap.student_id[lei]
    row = np.full(kimi_tok.vocab_size, -np.inf, np.float32)
    other = kimi_tok.encode(" the")[0]
    row[[ma, shi, lei, other]] = np.log([0.50, 0.30, 0.15, 0.05])
    s = Summariser(2, [other] * 4, [1.0], vmap.student_id)(row[None])
    ids, probs, rest = A.project_topk(s["topk_ids"], s["topk_logprobs"], vmap.student_id, s["class_mass"][1.0])
    assert ids.tolist() == [[first]] and probs[0, 0] == pytest.approx(0.95, abs=1e-6)
    assert rest[0] == pytest.approx(0.05, abs=1e-6)
    ids0, probs0, rest0 = A.project_topk(s["topk_ids"], s["topk_logprobs"], vmap.student_id)  # top-k alone
    assert probs0[0, 0] == pytest.approx(0.80, abs=1e-6) and rest0[0] == pytest.approx(0.20, abs=1e-6)


def test_summariser_full_row_terms_equal_plain_loops(kimi_tok, vmap):
    from kd_mlx.teacher.dump import reference_summary

    ids = np.array(kimi_tok.encode(SENTENCES[0]))[:3]
    lp = full_rows(kimi_tok, ids, seed=2)[:, :3000]  # a vocabulary slice keeps the plain loops short
    lp = lp - np.logaddexp.reduce(lp, -1, keepdims=True)
    sid = vmap.student_id[:3000]
    fast = Summariser(5, [1, 2, 3, 4], [1.0, 2.0, 0.5], sid)(lp)
    ref = reference_summary(lp, 5, [1, 2, 3, 4], [1.0, 2.0, 0.5], sid)
    np.testing.assert_array_equal(fast["topk_ids"], ref["topk_ids"])
    for T in (1.0, 2.0, 0.5):
        np.testing.assert_allclose(fast["class_mass"][T], ref["class_mass"][T], rtol=1e-5, atol=1e-7)
        if T != 1.0:
            np.testing.assert_allclose(fast["logz"][T], ref["logz"][T], rtol=1e-6)


def test_context_check_drops_rows_whose_real_continuation_maps_elsewhere(kimi_tok, phi_tok, vmap):
    """Option lines "A. 农…": cl100k splits a bare " " before the Chinese word, GPT-2 writes " 农" with the space
    folded in: the teacher's real next token " " maps to the student's " ", which is not what the student emits
    there. Such rows are dropped (fast == reference), every other aligned row is kept."""
    text = "题目：下列哪种作物最耐旱？\nA. 农作物\nB. 小麦\nC. 水稻\nD. 玉米\n答案是："
    rec = synthetic_record(kimi_tok, text, seed=5)
    s_ids, s_offs = phi_tok.encode_with_offsets(text)
    t_ends = np.cumsum(vmap.teacher_len[rec.token_ids])
    s_ends = np.cumsum(vmap.student_len[s_ids])
    rows, pos = A.aligned_rows_bytes(rec.positions, t_ends, s_ends, 0, 0)
    bad = A.context_mismatch(rec, rows, pos, s_ids, vmap)
    space = kimi_tok.encode(" ")[0]
    bare_space = [r for r in rows[bad].tolist() if rec.token_ids[rec.positions[r] + 1] == space]
    assert len(bare_space) >= 3  # before 农, 小, 水, 玉: the teacher's next token is a bare " "
    out = A.align_record_bytes(rec, s_ids, text, text, 0, vmap)
    ref = A.align_record_bytes_reference(rec, s_ids, text, text, 0, vmap)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[0], pos[~bad])
    for j in out[0].tolist():  # what remains: the student's real next token is the teacher's, projected
        i = int(rec.positions[rows[pos == j][0]])
        assert vmap.student_id[rec.token_ids[i + 1]] == s_ids[j + 1]
    char = A.align_record(rec, rec.offsets, s_offs, 0, 0, vmap, s_ids=s_ids)
    char_ref = A.align_record_reference(rec, rec.offsets, s_offs, 0, 0, vmap, s_ids=s_ids)
    for a, b in zip(char, char_ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert set(char[0].tolist()) <= set(out[0].tolist())


def test_temperature_without_stored_normaliser_is_refused(kimi_tok, phi_tok, vmap):
    rec = synthetic_record(kimi_tok, SENTENCES[1])
    s_ids = phi_tok.encode(SENTENCES[1])
    with pytest.raises(KDError, match="temperatures 1,2"):
        A.align_record_bytes(rec, s_ids, SENTENCES[1], SENTENCES[1], 0, vmap, temperature=2.0)


# ------------------------------------------------------------------------------ mid-token rows (inside a teacher token)
def test_merges_with_on_gpt2_bytes(phi_tok):
    """GPT-2 writes 不 (e4 b8 8d) whole: after its piece e4 b8 the byte 8d cannot come next; 国 (e5 9b bd) it writes
    as e5 9b + bd, so bd can; 鱻 it writes byte by byte."""
    table = A._token_bytes_table(phi_tok)
    by = A._PrefixIndex(table, A.special_token_ids(phi_tok)).by_bytes
    assert phi_tok.encode("不") == [by["不".encode()]]
    assert A.merges_with(table, by, by[b"\xe4\xb8"], by[b"\x8d"])
    assert phi_tok.encode("国") == [by[b"\xe5\x9b"], by[b"\xbd"]]
    assert not A.merges_with(table, by, by[b"\xe5\x9b"], by[b"\xbd"])
    assert not A.merges_with(table, by, by[b"\xe9"], by[b"\xb1"]) and phi_tok.encode("鱻")[0] == by[b"\xe9"]
    assert not A.merges_with(table, by, by[b"\xe4\xb8"], -1)  # no class (the remainder): never ruled out


@pytest.mark.parametrize("encoding", ["fp32", "q8rice"])
def test_mid_token_rows_full_row_store_and_placement(encoding, kimi_tok, phi_tok, vmap, tmp_path):
    """Rows at student positions inside a teacher token: the projector equals the plain computation from the full
    row, survives the store (float16 in lossy encodings), and `align_record_bytes` places them where the plain
    loops do, beside the aligned rows, with max_positions over both kinds."""
    text = SENTENCES[0] + SENTENCES[2]
    t_ids, t_offs = kimi_tok.encode_with_offsets(text)
    s_ids = phi_tok.encode(text)
    lp = full_rows(kimi_tok, np.array(t_ids), seed=2)
    k = 8
    proj = A.MidTokenProjector(kimi_tok, phi_tok, k)
    mid = proj.rows(lp, t_ids, list(range(len(t_ids))), text)
    assert len(mid.row) > 5
    tb = text.encode("utf-8")
    t_ends = np.cumsum(vmap.teacher_len[t_ids])
    last_at = dict(zip(np.cumsum(vmap.student_len[s_ids]).tolist(), s_ids))  # the student token ending at a byte
    for a in range(0, len(mid.row), max(1, len(mid.row) // 4)):
        r, n = int(mid.row[a]), int(mid.nbytes[a])
        ref_ids, ref_probs = A.mid_token_row_reference(lp[r], tb[int(t_ends[r]):int(t_ends[r]) + n], kimi_tok,
                                                       phi_tok, k, last=last_at[int(t_ends[r]) + n])
        m = len(ref_ids)
        assert mid.ids[a, :m].tolist() == ref_ids and (mid.ids[a, m:] == -1).all()
        np.testing.assert_allclose(mid.probs[a, :m], ref_probs, rtol=1e-5, atol=1e-7)
    summ = Summariser(k, kimi_tok.encode("A")[:1] * 4, [1.0], vmap.student_id)(lp)
    rec = StoreRecord(id="q", answer_logprobs=np.log(np.full(4, 0.25, np.float32)), token_ids=np.array(t_ids),
                      offsets=np.array(t_offs), positions=np.arange(len(t_ids), dtype=np.int32),
                      topk_ids=summ["topk_ids"], topk_logprobs=summ["topk_logprobs"], logz=summ["logz"],
                      class_mass=summ["class_mass"], mid=mid)
    ident = {"k": k, "encoding": encoding, "temperatures": [1.0], "student_tokenizer": phi_tok.fingerprint(),
             "mid_token_rows": True}
    with StoreWriter(tmp_path / "s", ident, shard_size=4) as w:
        w.add(rec)
    with TopKStore(tmp_path / "s") as st:
        back = st["q"]
    tol = 0 if encoding == "fp32" else 1e-3
    np.testing.assert_array_equal(back.mid.row, mid.row)
    np.testing.assert_array_equal(back.mid.nbytes, mid.nbytes)
    np.testing.assert_array_equal(back.mid.ids[:, : mid.ids.shape[1]], mid.ids)
    np.testing.assert_allclose(back.mid.probs[:, : mid.ids.shape[1]], mid.probs, atol=tol)
    without = A.align_record_bytes(back, s_ids, text, text, 0, vmap, mid_token=False)
    for max_positions in (None, 7):
        fast = A.align_record_bytes(back, s_ids, text, text, 0, vmap, max_positions)
        ref = A.align_record_bytes_reference(back, s_ids, text, text, 0, vmap, max_positions)
        for a, b in zip(fast, ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    pos, ids, probs, rest = A.align_record_bytes(back, s_ids, text, text, 0, vmap)
    np.testing.assert_allclose(probs.sum(-1) + rest, 1.0, atol=5e-3)
    assert set(without[0].tolist()) < set(pos.tolist()) and len(pos) == len(set(pos.tolist()))
    # each added position is a student token ending strictly inside a teacher token, with that prefix's row
    s_ends = np.cumsum(vmap.student_len[s_ids])
    added = sorted(set(pos.tolist()) - set(without[0].tolist()))
    assert len(added) >= len(mid.row) // 2
    key = {(int(r), int(n)): a for a, (r, n) in enumerate(zip(mid.row, mid.nbytes))}
    for j in added:
        e = int(s_ends[j])
        i = int(np.searchsorted(t_ends, e, side="right")) - 1
        assert t_ends[i] < e < t_ends[i + 1]
        a = key[(i, e - int(t_ends[i]))]
        row = int(np.flatnonzero(pos == j)[0])
        m = int((mid.ids[a] >= 0).sum())
        assert ids[row, :m].tolist() == mid.ids[a, :m].tolist()
    # a shared text of the last character only, and none at all: the same rows as the plain loops
    for late in (len(text) - 1, len(text)):
        fast = A.align_record_bytes(back, s_ids, text, text, late, vmap)
        ref = A.align_record_bytes_reference(back, s_ids, text, text, late, vmap)
        for a, b in zip(fast, ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert len(fast[0]) == 0
    # a tempered run does not use them (T = 1 only)
    tempered = A.align_record_bytes(replace(back, logz={2.0: np.zeros(len(t_ids), np.float32)}), s_ids, text, text,
                                    0, vmap, temperature=2.0)
    assert len(tempered[0]) == len(without[0])


# ------------------------------------------------------------------------ boundary rows (one step of look-ahead)
def test_boundary_row_hand_example(kimi_tok, phi_tok, vmap):
    """Teacher row: the piece e4 b8 0.5, " the" 0.3, "A" 0.2. After e4 b8 the teacher goes on with 8d (0.6) or ad
    (0.4): GPT-2 writes 不 and 中 whole, so that mass lands on them, none on GPT-2's piece e4 b8. After " the":
    "ory" 0.5 (GPT-2 writes " theory") or a newline 0.5 (" the" stays). "A" has no look-ahead: its own class."""
    tid = {b: i for i, b in enumerate(A._token_bytes_table(kimi_tok))}
    sid = {b: i for i, b in enumerate(A._token_bytes_table(phi_tok))}
    V = kimi_tok.vocab_size

    def row(masses: dict[bytes, float]) -> np.ndarray:
        lp = np.full(V, -80.0)
        for b, m in masses.items():
            lp[tid[b]] = np.log(m)
        return lp.astype(np.float32)

    proj = A.MidTokenProjector(kimi_tok, phi_tok, 8, vmap.student_id)
    lp = row({b"\xe4\xb8": 0.5, b" the": 0.3, b"A": 0.2})
    looks = [(tid[b"\xe4\xb8"], row({b"\x8d": 0.6, b"\xad": 0.4})), (tid[b" the"], row({b"ory": 0.5, b"\n": 0.5}))]
    ids, probs = proj.boundary_row(lp, looks)
    got = {s: m for s, m in zip(ids.tolist(), probs.tolist()) if m > 1e-6}  # the rest: float32 rounding, the -80 floor
    want = {sid["不".encode()]: 0.3, sid["中".encode()]: 0.2, sid[b"A"]: 0.2, sid[b" theory"]: 0.15,
            sid[b" the"]: 0.15}
    assert set(got) == set(want)
    for s, m in want.items():
        assert got[s] == pytest.approx(m, abs=1e-6)
    ids, probs = proj.boundary_row(lp)  # no look-ahead: the context-free classes, as the top-k projection gives
    assert {s: round(m, 6) for s, m in zip(ids.tolist(), probs.tolist()) if m > 1e-6} == {
        sid[b"\xe4\xb8"]: 0.5, sid[b" the"]: 0.3, sid[b"A"]: 0.2}
    assert proj.extensions(tid[b"A"]) is not None  # GPT-2 has longer tokens beginning with "A" ...
    assert sid.get(b"A.") is None  # ... but none across the letter and a full stop (its pre-tokenizer cuts there)
    ref_ids, ref_probs = A.boundary_row_reference(lp, looks, vmap.student_id, kimi_tok, phi_tok, 8)
    assert ref_ids == proj.boundary_row(lp, looks)[0].tolist()


def test_boundary_row_equals_plain_loops(kimi_tok, phi_tok, vmap):
    """Realistic full rows of a real sentence: each row with the look-ahead of its real next token and of the
    candidates `lookahead_candidates` picks equals the plain loops over both vocabularies."""
    text = SENTENCES[0]
    t_ids = kimi_tok.encode(text)
    lp = full_rows(kimi_tok, np.array(t_ids), seed=5)
    proj = A.MidTokenProjector(kimi_tok, phi_tok, 8, vmap.student_id)
    at = proj.boundary_positions(t_ids, text)
    assert len(at) >= 4
    tried = 0
    for i in at[:4]:
        cands = proj.lookahead_candidates(lp[i], 2, 0.0, skip=t_ids[i + 1])
        assert all(proj.extensions(c) is not None and c != t_ids[i + 1] for c in cands)
        looks = [(t_ids[i + 1], lp[i + 1])] + [(c, lp[(i + 2 + j) % len(lp)]) for j, c in enumerate(cands)]
        ids, probs = proj.boundary_row(lp[i], looks)
        ref_ids, ref_probs = A.boundary_row_reference(lp[i], looks, vmap.student_id, kimi_tok, phi_tok, 8)
        assert ids.tolist() == ref_ids
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
        tried += len(cands)
    assert tried >= 4


def test_boundary_rows_replace_aligned_rows_without_context_check(kimi_tok, phi_tok, vmap):
    """Stored boundary rows (nbytes 0) take the place of the aligned rows' top-k projection, also where the
    context check would drop the row; fast == plain loops, with max_positions."""
    text = SENTENCES[2]
    t_ids, t_offs = kimi_tok.encode_with_offsets(text)
    s_ids = phi_tok.encode(text)
    lp = full_rows(kimi_tok, np.array(t_ids), seed=4)
    proj = A.MidTokenProjector(kimi_tok, phi_tok, 8, vmap.student_id)
    at = proj.boundary_positions(t_ids, text)
    got = [proj.boundary_row(lp[i], [(t_ids[i + 1], lp[i + 1])]) for i in at[::2]]  # half of them
    m = max(len(g[0]) for g in got)
    b_ids, b_probs = np.full((len(got), m), -1, np.int32), np.zeros((len(got), m), np.float32)
    for j, (a, b) in enumerate(got):
        b_ids[j, : len(a)], b_probs[j, : len(b)] = a, b
    inside = A.MidTokenProjector(kimi_tok, phi_tok, 8).rows(lp, t_ids, list(range(len(t_ids))), text)
    mid = A.concat_mid_rows([inside, A.MidTokenRows(np.array(at[::2], np.int32), np.zeros(len(got), np.int32),
                                                    b_ids, b_probs)])
    summ = Summariser(8, kimi_tok.encode("A")[:1] * 4, [1.0], vmap.student_id)(lp)
    rec = StoreRecord(id="q", answer_logprobs=np.log(np.full(4, 0.25, np.float32)), token_ids=np.array(t_ids),
                      offsets=np.array(t_offs), positions=np.arange(len(t_ids), dtype=np.int32),
                      topk_ids=summ["topk_ids"], topk_logprobs=summ["topk_logprobs"], logz=summ["logz"],
                      class_mass=summ["class_mass"], mid=mid)
    for max_positions in (None, 9):
        fast = A.align_record_bytes(rec, s_ids, text, text, 0, vmap, max_positions)
        ref = A.align_record_bytes_reference(rec, s_ids, text, text, 0, vmap, max_positions)
        for a, b in zip(fast, ref):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    pos, ids, probs, _ = A.align_record_bytes(rec, s_ids, text, text, 0, vmap)
    t_ends = np.cumsum(vmap.teacher_len[t_ids])
    s_ends = np.cumsum(vmap.student_len[s_ids])
    rows, apos = A.aligned_rows_bytes(rec.positions, t_ends, s_ends, 0, 0)
    dropped = apos[A.context_mismatch(rec, rows, apos, s_ids, vmap)]
    for j, i in enumerate(at[::2]):
        p = int(np.flatnonzero(s_ends == t_ends[i])[0])  # the student position before the shared boundary
        r = int(np.flatnonzero(pos == p)[0])
        assert ids[r, : len(got[j][0])].tolist() == got[j][0].tolist()
    # rows the context check drops come back exactly where a boundary row is stored
    kept_dropped = set(dropped.tolist()) & set(pos.tolist())
    assert kept_dropped and kept_dropped <= {int(np.flatnonzero(s_ends == t_ends[i])[0]) for i in at[::2]}
