"""Tests of the logits store format (kd_mlx/store.py): round trips, encodings' error, resume, verify, CLI.

Shards are numbered globally (shard-NNNNNN); ranked writers (rank i % world writes shard i) give the same bytes
as one writer.

Run: pytest tests/test_store.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kd_mlx.safetensors_io import read_header, read_metadata
from kd_mlx.store import (ENCODINGS, StoreRecord, StoreWriter, TopKStore, _pack_u24, _rice_decode, _rice_encode,
                          decode_topk, encode_topk, sort_rows_by_value, sort_rows_by_value_reference, verify_store)
from kd_mlx.utils import KDError

VOCAB = 163_840  # Kimi-K2's vocabulary size: ids need 18 bits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def make_records(n: int, k: int = 16, seed: int = 0, hidden: int = 0, vocab: int = VOCAB) -> list[StoreRecord]:
    """Records with peaked, Zipf-like distributions (top-k of a full log-softmax, as the dump produces)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        n_tok = int(rng.integers(5, 30))
        ids = rng.integers(0, vocab, n_tok).astype(np.int32)
        starts = np.arange(n_tok, dtype=np.int32)
        offsets = np.stack([starts, starts + 1], axis=1)
        p = int(rng.integers(1, n_tok + 1))
        positions = np.sort(rng.choice(n_tok, p, replace=False)).astype(np.int32)
        tk_ids, tk_lp = [], []
        for _ in range(p):
            # heavy-tailed logits over a 4096-token window of the vocab: a realistic, peaked top-k
            base = int(rng.integers(0, vocab - 4096))
            logits = rng.standard_normal(4096) * 3.0 + np.log(1.0 / np.arange(1, 4097)) * 1.5
            lp = _log_softmax(logits.astype(np.float64))
            top = np.argsort(-lp)[:k]
            tk_ids.append(base + top)
            tk_lp.append(lp[top])
        ans = _log_softmax(rng.standard_normal(8))[:4].astype(np.float32)
        recs.append(StoreRecord(
            id=f"subj{i % 3}/test/{i:04d}", answer_logprobs=ans, token_ids=ids, offsets=offsets,
            positions=positions, topk_ids=np.array(tk_ids, np.int32), topk_logprobs=np.array(tk_lp, np.float32),
            hidden=rng.standard_normal(hidden).astype(np.float32) if hidden else None, label=int(rng.integers(0, 4))))
    return recs


def identity(k: int = 16, encoding: str = "fp32", hidden: int = 0, **kw) -> dict:
    return {"teacher": "tiny", "teacher_config_hash": "abc", "tokenizer": "tok1", "template": "t1", "shots": 5,
            "positions": "prompt", "k": k, "encoding": encoding, "hidden_dim": hidden, **kw}


def write_store(path: Path, recs, encoding="fp32", k=16, shard_size=4, hidden=0) -> dict:
    w = StoreWriter(path, identity(k, encoding, hidden), shard_size=shard_size)
    for r in recs:
        w.add(r)
    return w.close()


def files_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def kl_renorm(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    """KL(p || q) per row between the top-k rows renormalised (same id order)."""
    p = _log_softmax(p_lp.astype(np.float64))
    q = _log_softmax(q_lp.astype(np.float64))
    return (np.exp(p) * (p - q)).sum(-1)


def test_fp32_round_trip_exact_and_random_access_equals_iteration(tmp_path):
    recs = make_records(11, hidden=8)
    man = write_store(tmp_path / "s", recs, hidden=8)
    assert man["num_rows"] == 11 and len(man["shards"]) == 3  # shard size 4: 4 + 4 + 3
    st = TopKStore(tmp_path / "s")
    assert st.ids == [r.id for r in recs] and len(st) == 11
    it = list(st)
    for r, a in zip(recs, it):
        b = st[r.id]
        for got in (a, b):
            assert got.id == r.id and got.label == r.label
            np.testing.assert_array_equal(got.answer_logprobs, r.answer_logprobs)
            np.testing.assert_array_equal(got.token_ids, r.token_ids)
            np.testing.assert_array_equal(got.offsets, r.offsets)
            np.testing.assert_array_equal(got.positions, r.positions)
            np.testing.assert_array_equal(got.topk_ids, r.topk_ids)
            np.testing.assert_array_equal(got.topk_logprobs, r.topk_logprobs)
            np.testing.assert_array_equal(got.hidden, r.hidden)
        # the renormalised answer distribution, by hand
        e = np.exp(r.answer_logprobs.astype(np.float64))
        np.testing.assert_allclose(a.answer_probs, e / e.sum(), rtol=1e-6)
    # random access in a shuffled order gives the same as iteration
    for i in np.random.default_rng(1).permutation(11):
        np.testing.assert_array_equal(st[recs[i].id].topk_logprobs, it[i].topk_logprobs)
    with pytest.raises(KDError, match="not in the store"):
        st["nope"]
    st.close()


@pytest.mark.parametrize("encoding", ["fp16", "q8", "q8rice"])
def test_lossy_encodings_error_is_bounded(tmp_path, encoding):
    recs = make_records(10, k=32, seed=3, hidden=4)
    write_store(tmp_path / encoding, recs, encoding=encoding, k=32, hidden=4)
    st = TopKStore(tmp_path / encoding)
    kls, max_abs = [], 0.0
    for r in recs:
        got = st[r.id]
        np.testing.assert_array_equal(got.token_ids, r.token_ids)
        np.testing.assert_array_equal(got.answer_logprobs, r.answer_logprobs)  # always float32
        assert got.topk_ids.shape == r.topk_ids.shape
        # same token set per row; compare values id by id
        for i in range(len(r.positions)):
            assert sorted(got.topk_ids[i]) == sorted(r.topk_ids[i])
            exact = dict(zip(r.topk_ids[i].tolist(), r.topk_logprobs[i].tolist()))
            dec = np.array([exact[t] for t in got.topk_ids[i]])
            max_abs = max(max_abs, float(np.abs(dec - got.topk_logprobs[i]).max()))
            kls.append(float(kl_renorm(dec[None], got.topk_logprobs[i][None])[0]))
            assert (np.diff(got.topk_logprobs[i]) <= 0).all()  # rank order
        np.testing.assert_allclose(got.hidden, r.hidden, rtol=1e-3, atol=1e-3)
    st.close()
    # fp16: relative 2^-11 on values up to ~20 nats; q8: half a step of (top1-min)/255 (gap ~15 nats here)
    bound = {"fp16": 0.01, "q8": 0.05, "q8rice": 0.05}[encoding]
    assert max_abs < bound
    assert np.mean(kls) < 1e-3 and max(kls) < 5e-3


def test_q8rice_decodes_exactly_like_q8():
    recs = make_records(6, k=32, seed=5)
    rows = [(r.topk_ids, r.topk_logprobs) for r in recs]
    a, b = encode_topk("q8", rows), encode_topk("q8rice", rows)
    r0 = 0
    for qi, r in enumerate(recs):
        r1 = r0 + len(r.positions)
        ia, va = decode_topk("q8", a.__getitem__, 32, qi, r0, r1)
        ib, vb = decode_topk("q8rice", b.__getitem__, 32, qi, r0, r1)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(va, vb)
        r0 = r1
    # and it is smaller: ids cost < 24 bits each
    nb = lambda t: sum(x.nbytes for x in t.values())  # noqa: E731
    assert nb(b) < nb(a)


def test_rice_and_uint24_codes_round_trip_edge_cases():
    rng = np.random.default_rng(0)
    cases = [np.zeros(7, np.int64), np.array([0, 1, 2, 3], np.int64), np.array([2**24 - 1], np.int64),
             rng.integers(0, 5000, 300), rng.integers(0, 2**20, 64), np.zeros(0, np.int64)]
    for d in cases:
        b, u, r = _rice_encode(d)
        out = _rice_decode(b, np.frombuffer(u, np.uint8), np.frombuffer(r, np.uint8), len(d))
        np.testing.assert_array_equal(out, d)
    ids = np.array([[0, 1, 255, 256, 65535, 65536, 2**24 - 1]], np.int64)
    packed = _pack_u24(ids)
    assert packed.dtype == np.uint8 and packed.shape == (1, 21)
    from kd_mlx.store import _unpack_u24
    np.testing.assert_array_equal(_unpack_u24(packed, 7), ids)
    with pytest.raises(KDError, match="uint24"):
        _pack_u24(np.array([[2**24]]))


def test_vectorised_sort_matches_plain_reference():
    rng = np.random.default_rng(2)
    ids = np.stack([rng.choice(1000, 16, replace=False) for _ in range(50)]).astype(np.int32)
    lps = np.round(rng.standard_normal((50, 16)), 1).astype(np.float32)  # many ties
    a, b = sort_rows_by_value_reference(ids, lps), sort_rows_by_value(ids, lps)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_shards_are_plain_safetensors_and_deterministic(tmp_path):
    from safetensors.numpy import load_file

    recs = make_records(6, hidden=4)
    write_store(tmp_path / "a", recs, encoding="q8rice", hidden=4)
    write_store(tmp_path / "b", recs, encoding="q8rice", hidden=4)
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")
    shard = sorted((tmp_path / "a").glob("shard-*.safetensors"))[0]
    ref = load_file(str(shard))  # the reference safetensors reader agrees with ours
    from kd_mlx.store import _Shard
    s = _Shard(shard)
    assert set(ref) == set(s.entries)
    for name, arr in ref.items():
        np.testing.assert_array_equal(arr, s[name])
    s.close()
    import mlx.core as mx
    arrays = mx.load(str(shard))
    np.testing.assert_array_equal(np.array(arrays["token_ids"]), ref["token_ids"])
    assert set(read_header(shard)) == set(ref)
    assert json.loads(read_metadata(shard)["ids"]) == [r.id for r in recs[:4]]


def test_resume_after_partial_write_is_byte_identical(tmp_path):
    recs = make_records(10)
    write_store(tmp_path / "full", recs)
    # "killed" run: 2 shards finished, 1 row buffered (lost), a half-written temporary shard left behind
    w = StoreWriter(tmp_path / "part", identity(), shard_size=4)
    for r in recs[:9]:
        w.add(r)
    del w
    (tmp_path / "part" / ".tmp-shard-000002.safetensors").write_bytes(b"\x10\x00garbage")
    assert not (tmp_path / "part" / "manifest.json").exists()
    with pytest.raises(KDError, match="no manifest"):
        TopKStore(tmp_path / "part")
    assert verify_store(tmp_path / "part")  # unfinished: reported
    w = StoreWriter(tmp_path / "part", identity(), shard_size=4)
    assert w.done_ids == {r.id for r in recs[:8]}
    for r in recs:
        if r.id not in w.done_ids:
            w.add(r)
    w.close()
    assert files_bytes(tmp_path / "part") == files_bytes(tmp_path / "full")
    assert verify_store(tmp_path / "part") == []
    # rerunning on a finished store adds nothing and changes nothing
    w = StoreWriter(tmp_path / "part", identity(), shard_size=4)
    assert len(w.done_ids) == 10
    w.close()
    assert files_bytes(tmp_path / "part") == files_bytes(tmp_path / "full")
    with pytest.raises(KDError, match="already in the store"):
        StoreWriter(tmp_path / "part", identity(), shard_size=4).add(recs[0])


def test_append_new_questions_to_finished_store(tmp_path):
    recs = make_records(7)
    write_store(tmp_path / "s", recs[:5])
    w = StoreWriter(tmp_path / "s", identity(), shard_size=4)
    for r in recs[5:]:
        w.add(r)
    w.close()
    st = TopKStore(tmp_path / "s")
    assert st.ids == [r.id for r in recs]
    np.testing.assert_array_equal(st[recs[6].id].topk_ids, recs[6].topk_ids)
    assert verify_store(tmp_path / "s") == []


@pytest.mark.parametrize("change", [{"k": 8}, {"teacher_config_hash": "zzz"}, {"tokenizer": "tok2"},
                                    {"template": "t2"}, {"encoding": "q8"}])
def test_mismatched_identity_is_refused(tmp_path, change):
    recs = make_records(6)
    write_store(tmp_path / "s", recs[:5])  # finished store
    ident = {**identity(), **change}
    key = next(iter(change))
    with pytest.raises(KDError, match=f"written with {key}="):
        StoreWriter(tmp_path / "s", ident, shard_size=4)
    # unfinished store (no manifest yet): the shards' own identity is checked
    w = StoreWriter(tmp_path / "u", identity(), shard_size=4)
    for r in recs[:5]:
        w.add(r)
    del w
    with pytest.raises(KDError, match=f"written with {key}="):
        StoreWriter(tmp_path / "u", ident, shard_size=4)
    with pytest.raises(KDError, match="shard size"):
        StoreWriter(tmp_path / "u", identity(), shard_size=3)


def test_writer_rejects_bad_records(tmp_path):
    r = make_records(1)[0]
    w = StoreWriter(tmp_path / "s", identity(k=8), shard_size=4)
    with pytest.raises(KDError, match="top-k arrays must be"):
        w.add(r)
    with pytest.raises(KDError, match="unknown encoding"):
        StoreWriter(tmp_path / "t", identity(encoding="int4"))


def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kd_mlx.store", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ})


def test_verify_detects_a_flipped_byte_and_non_finite_values_cli(tmp_path):
    recs = make_records(9)
    write_store(tmp_path / "s", recs, encoding="q8rice")
    ok = _run_cli("verify", str(tmp_path / "s"))
    assert ok.returncode == 0, ok.stderr
    assert "9 questions" in ok.stdout
    shown = _run_cli("show", str(tmp_path / "s"), "--id", recs[2].id)
    assert shown.returncode == 0
    js = json.loads(shown.stdout)
    assert js["id"] == recs[2].id and len(js["topk"]) == len(recs[2].positions)
    assert js["token_ids"] == recs[2].token_ids.tolist()
    missing = _run_cli("show", str(tmp_path / "s"), "--id", "nope")
    assert missing.returncode == 1 and "not in the store" in missing.stderr and "Traceback" not in missing.stderr
    # flip one byte in the data of the second shard
    shard = tmp_path / "s" / "shard-000001.safetensors"
    b = bytearray(shard.read_bytes())
    b[-5] ^= 0x01
    shard.write_bytes(bytes(b))
    bad = _run_cli("verify", str(tmp_path / "s"))
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert any("shard-000001" in ln and "sha256" in ln for ln in lines) and "Traceback" not in bad.stderr
    # non-finite values are reported even when the checksums are right
    recs2 = make_records(3)
    recs2[1].answer_logprobs[2] = np.nan
    recs2[2].topk_logprobs[0, 3] = np.inf
    write_store(tmp_path / "n", recs2, encoding="fp32")
    probs = verify_store(tmp_path / "n")
    assert any("non-finite answer" in p for p in probs) and any("non-finite top-k" in p for p in probs)
    assert not any("sha256" in p for p in probs)


def test_ranked_writers_give_the_single_writer_store(tmp_path):
    """Two writers placing shard i on rank i % 2 (any order) == one writer adding the rows in order."""
    from kd_mlx.store import build_manifest

    recs = make_records(10)
    write_store(tmp_path / "one", recs)
    w0 = StoreWriter(tmp_path / "two", identity(), shard_size=4, rank=0, world=2)
    w1 = StoreWriter(tmp_path / "two", identity(), shard_size=4, rank=1, world=2)
    w1.write_shard(1, recs[4:8])
    with pytest.raises(KDError, match="belongs to rank 1"):
        w0.write_shard(1, recs[4:8])
    w0.write_shard(2, recs[8:])
    with pytest.raises(KDError, match="shard-000000.safetensors is missing"):
        build_manifest(tmp_path / "two")
    w0.write_shard(0, recs[:4])
    with pytest.raises(KDError, match="not the 9 asked for"):
        build_manifest(tmp_path / "two", expected_ids=[r.id for r in recs[:9]])
    build_manifest(tmp_path / "two", expected_ids=[r.id for r in recs])
    assert files_bytes(tmp_path / "two") == files_bytes(tmp_path / "one")
    # a resumed writer sees every rank's shards
    w = StoreWriter(tmp_path / "two", identity(), shard_size=4, rank=1, world=2)
    assert w.shard_ids == {0: [r.id for r in recs[:4]], 1: [r.id for r in recs[4:8]], 2: [r.id for r in recs[8:]]}


def test_weight_files_read_rows_equals_indexing_the_whole_tensor(tmp_path):
    """The row reader (runs found in numpy) returns exactly `tensor[rows]` for ranges, gaps, repeats, any order."""
    import mlx.core as mx

    from kd_mlx.safetensors_io import WeightFiles

    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 3, 4)).astype(np.float32)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.array(w)})
    files = WeightFiles(tmp_path)
    for rows in ([], [7], list(range(50)), list(range(10, 30)), [3, 4, 5, 9, 10, 2, 2, 49], [49, 48, 47]):
        got = files.read_rows_np("w", rows)
        np.testing.assert_array_equal(got, w[np.asarray(rows, dtype=np.int64)].reshape(len(rows), 3, 4))
    np.testing.assert_array_equal(files.read_rows_np("w", np.arange(5, 40)), w[5:40])


def test_weight_files_read_mx_equals_the_numpy_path(tmp_path):
    """Reads straight into MLX buffers == numpy reads copied by `to_mx`, for each storage dtype, whole or by rows."""
    import mlx.core as mx

    from kd_mlx.safetensors_io import WeightFiles

    rng = np.random.default_rng(1)
    tensors = {"f32": mx.array(rng.standard_normal((50, 3, 4)).astype(np.float32)),
               "f16": mx.array(rng.standard_normal((7, 5)).astype(np.float16)),
               "bf16": mx.array(rng.standard_normal((9, 6)).astype(np.float32)).astype(mx.bfloat16),
               "u32": mx.array(rng.integers(0, 2**31, (8, 3)).astype(np.uint32)),
               "scalar": mx.array(np.float32(2.5)), "empty": mx.zeros((0, 4))}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    files = WeightFiles(tmp_path)
    for k, v in tensors.items():
        got = files.read_mx(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        assert mx.array_equal(got, files.read(k)).item() and mx.array_equal(got, v).item()
        if v.ndim and v.shape[0] > 3:
            for rows in ([3, 1, 2, 2], [], list(range(v.shape[0]))):
                want = files.to_mx(k, files.read_rows_np(k, rows))
                assert mx.array_equal(files.read_mx(k, rows), want).item()


def test_weight_files_uncached_reads_equal_the_cached_ones(tmp_path):
    """O_DIRECT reads (whole tensors at any file offset; rows of 4096-byte multiples, runs in any order, each run's
    aligned read overlapping its neighbours) == reads through the page cache; rows of other sizes fall back."""
    import mlx.core as mx

    from kd_mlx.safetensors_io import WeightFiles

    rng = np.random.default_rng(2)
    tensors = {"head": mx.array(rng.standard_normal((3, 1001)).astype(np.float32)),
               "experts": mx.array(rng.standard_normal((16, 32, 64)).astype(np.float32)),  # 8 KiB rows
               "scales": mx.array(rng.standard_normal((16, 1024)).astype(np.float32)).astype(mx.bfloat16),  # 2 KiB
               "tail": mx.array(rng.standard_normal((5,)).astype(np.float16))}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    plain, direct = WeightFiles(tmp_path), WeightFiles(tmp_path)
    direct.uncached = True
    assert len({plain.info(k).start % 4096 for k in tensors}) > 1  # tensors at different block offsets
    for k, v in tensors.items():
        got = direct.read_mx(k)
        assert got.dtype == v.dtype and got.shape == v.shape and mx.array_equal(got, v).item()
    for rows in ([0, 1, 2, 5, 6, 9, 15], [3], [15, 0, 1, 2], list(range(16)), []):
        for k in ("experts", "scales"):
            assert mx.array_equal(direct.read_mx(k, rows), plain.read_mx(k, rows)).item(), (k, rows)
    if hasattr(os, "O_DIRECT") and direct._direct_fd(tmp_path / "model.safetensors") is not None:
        # the scales' 2 KiB rows went through the page cache; everything else did not
        assert 0 < direct.uncached_bytes < direct.bytes_read
    assert plain.uncached_bytes == 0
