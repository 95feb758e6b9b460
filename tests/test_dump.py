"""The teacher dump (kd_mlx/teacher/dump.py) with the tiny Kimi-K2-shaped teacher (Kimi-format tokenizer) and the
real SmolLM2-135M: exact round trip, answer distribution equal to a direct `teacher score` forward and to mlx-lm's
in-memory forward, hidden state, SIGKILL + resume byte-identical, mismatches refused, verify catches a flipped byte,
and `mlx.launch -n 2 --backend ring` byte-identical to a single process. A small CMMLU-format fixture is written here.

Run: pytest tests/test_dump.py   (~2 min on 2 cores; the distributed and SIGKILL tests are marked slow)
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
import mlx.nn as nn  # noqa: E402

from kd_mlx.utils import KDError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ("elementary_mathematics", "college_mathematics")
LETTERS = "ABCD"


def write_cmmlu(root: Path, n_dev: int = 2, n_test: int = 5) -> Path:
    """Arithmetic questions in the official CMMLU CSV layout (gold letter rotates)."""
    for s_i, subject in enumerate(SUBJECTS):
        rng = np.random.default_rng(s_i)
        for split, n in (("dev", n_dev), ("test", n_test)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i in range(n):
                    a, b = int(rng.integers(2, 60)), int(rng.integers(2, 60))
                    opts = [a + b, a + b + 1, a + b - 2, a + b + 10]
                    k = i % 4
                    opts[0], opts[k] = opts[k], opts[0]
                    w.writerow([i, f"{a}加{b}等于多少？（{split}{i}）", *map(str, opts), LETTERS[k]])
    return root


def files_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dump_args(cfg: dict) -> list[str]:
    args = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is not None:
            args += [flag, str(v)]
    return args


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from kd_mlx.teacher.dump import dump_store
    from kd_mlx.testing import phi_tokenizer_dir
    from kd_mlx.testing.models import tiny_kimi_k2_dir

    root = tmp_path_factory.mktemp("dump_world")
    data = write_cmmlu(root / "cmmlu")
    teacher = tiny_kimi_k2_dir(root / "teacher", seed=3)
    student_tok = phi_tokenizer_dir(root / "phi_tok")
    base = {"teacher": str(teacher), "data": str(data), "shots": 2, "top_k": 8, "shard_size": 3,
            "positions": "question", "hidden": True, "temperatures": "1,2", "student_tokenizer": str(student_tok)}
    exact = {**base, "encoding": "fp32", "out": str(root / "exact")}
    packed = {**base, "encoding": "q8rice", "out": str(root / "packed")}
    res = dump_store(exact, progress=False, log=lambda m: None)
    dump_store(packed, progress=False, log=lambda m: None)
    return {"root": root, "data": data, "teacher": teacher, "exact": exact, "packed": packed, "result": res,
            "student_tok": student_tok}


def test_round_trip_exact_and_equal_to_mlx_lm_forward(world):
    """fp32 store == what the teacher computed (recomputed here, bit for bit); answer log-probs, top-k and the
    hidden state agree with mlx-lm's in-memory forward of the same prompt; token ids/offsets are the prompt's."""
    from mlx_lm.utils import load_model

    from kd_mlx.data import fit_prompt, load_cmmlu
    from kd_mlx.data import answer_token_ids
    from kd_mlx.store import TopKStore, verify_store
    from kd_mlx.align import VocabMap
    from kd_mlx.align import mid_token_row_reference
    from kd_mlx.teacher.dump import (HiddenCapturingTeacher, build_items, compute_shard, max_call_positions,
                                     student_side)
    from kd_mlx.tokenizer import load_tokenizer

    st = TopKStore(world["exact"]["out"])
    cmmlu = load_cmmlu(world["data"])
    qs = cmmlu.test_questions()
    assert st.ids == [q.id for q in qs] and len(st.manifest["shards"]) == 4
    assert verify_store(st.path) == []
    ident = st.identity
    for key in ("teacher_config_hash", "teacher_weights_hash", "tokenizer", "template", "template_hash",
                "shots", "positions", "k", "encoding", "hidden_dim", "max_tokens", "add_bos", "temperatures",
                "student_tokenizer"):
        assert key in ident
    assert "teacher" not in ident  # the teacher is known by content, never by its path
    teacher = HiddenCapturingTeacher(world["teacher"], None)
    tok = teacher.tokenizer
    letters = answer_token_ids(tok)
    assert ident["tokenizer"] == tok.fingerprint() and ident["hidden_dim"] == 64
    # the store carries the teacher tokenizer (self-contained: train needs nothing else from the teacher)
    assert load_tokenizer(st.path / "tokenizer").fingerprint() == tok.fingerprint()
    s_tok = load_tokenizer(world["student_tok"])
    student_id = VocabMap.build(tok, s_tok).student_id
    assert ident["student_tokenizer"] == s_tok.fingerprint() and ident["mid_token_rows"] is True
    student = student_side(tok, str(world["student_tok"]), 8)

    # round trip: the records of shard 1 recomputed through the same call are stored exactly
    items = build_items(qs[3:6], cmmlu, tok, 2, "question", 2048, ident["add_bos"])
    recs, _ = compute_shard(teacher, items, 8, letters, True, max_call_positions(teacher.vocab_size, None),
                            [1.0, 2.0], student)
    for r in recs:
        got = st[r.id]
        for f in ("answer_logprobs", "token_ids", "offsets", "positions", "topk_ids", "topk_logprobs", "hidden"):
            np.testing.assert_array_equal(getattr(got, f), getattr(r, f), err_msg=f)
        assert got.label == r.label
        np.testing.assert_array_equal(got.logz[2.0], r.logz[2.0])
        for t in (1.0, 2.0):
            np.testing.assert_array_equal(got.class_mass[t], r.class_mass[t])
        w = r.mid.ids.shape[1]
        for f in ("row", "nbytes", "ids", "probs"):
            np.testing.assert_array_equal(getattr(got.mid, f)[..., :w] if f in ("ids", "probs") else
                                          getattr(got.mid, f), getattr(r.mid, f), err_msg=f)
    # calls split to bound the log-prob memory (one question per call here: no shared prefix) give the same
    # values up to float rounding
    split, _ = compute_shard(teacher, items, 8, letters, True, max_positions=1)
    for a, b in zip(recs, split):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4)
        np.testing.assert_allclose(a.answer_logprobs, b.answer_logprobs, atol=1e-4)

    model, _ = load_model(Path(world["teacher"]))
    for q in qs[::3]:  # both subjects, first/middle/last shard
        rec = st[q.id]
        p = fit_prompt(q, cmmlu.dev[q.subject], 2, None, None)
        ids, offs = tok.encode_with_offsets(p.text)
        assert rec.token_ids.tolist() == ids and rec.offsets.tolist() == [list(o) for o in offs]
        assert rec.label == LETTERS.index(q.answer)
        # question positions: from the first token of the question block to the answer position
        first = min(i for i, (a, _) in enumerate(offs) if a >= len(p.prefix))
        assert rec.positions.tolist() == list(range(first, len(ids)))
        h = model.model(mx.array([ids]))
        lp = np.array(nn.log_softmax(model.lm_head(h)[0].astype(mx.float32), axis=-1))
        # fp32 over a 100k vocabulary: the streamed log-normaliser differs from mlx-lm's by up to ~3e-4 per row
        np.testing.assert_allclose(rec.answer_logprobs, lp[-1, letters], atol=5e-4)
        np.testing.assert_allclose(rec.topk_logprobs, np.sort(lp[rec.positions], axis=-1)[:, ::-1][:, :8], atol=5e-4)
        np.testing.assert_allclose(np.take_along_axis(lp[rec.positions], rec.topk_ids, 1), rec.topk_logprobs,
                                   atol=5e-4)
        np.testing.assert_allclose(rec.hidden, np.array(h[0, -1].astype(mx.float32)), atol=1e-4)
        # what exact targets need, from the full row: log Z at T=2 and each slot's student-class mass
        full = lp[rec.positions].astype(np.float64)
        np.testing.assert_allclose(rec.logz[2.0], np.logaddexp.reduce(full / 2, -1), atol=5e-4)
        for r in range(len(full)):
            totals = np.bincount(student_id + 1, weights=np.exp(full[r]), minlength=student_id.max() + 2)
            want = np.where(student_id[rec.topk_ids[r]] >= 0, totals[student_id[rec.topk_ids[r]] + 1], 0.0)
            np.testing.assert_allclose(rec.class_mass[1.0][r], want, atol=5e-4)
        np.testing.assert_allclose(rec.answer_probs.sum(), 1.0, atol=1e-6)
        # mid-token rows: exactly the student boundaries strictly inside each next teacher token, each row the full
        # row conditioned on the bytes written (plain loops over both vocabularies)
        tb = p.text.encode("utf-8")
        t_ends = np.cumsum([len(tok.token_bytes(int(i))) for i in ids])
        s_list = s_tok.encode(p.text)
        last_at = dict(zip(np.cumsum([len(s_tok.token_bytes(int(i))) for i in s_list]).tolist(), s_list))
        s_ends = set(last_at)
        want_keys = [(r, e - int(t_ends[i])) for r, i in enumerate(rec.positions.tolist()) if i + 1 < len(ids)
                     for e in range(int(t_ends[i]) + 1, int(t_ends[i + 1])) if e in s_ends]
        assert list(zip(rec.mid.row.tolist(), rec.mid.nbytes.tolist())) == want_keys and len(want_keys) > 3
        for a in range(0, len(want_keys), max(1, len(want_keys) // 3)):
            r, n = want_keys[a]
            i = int(rec.positions[r])
            ref_ids, ref_probs = mid_token_row_reference(lp[i], tb[int(t_ends[i]):int(t_ends[i]) + n], tok, s_tok, 8,
                                                         last=last_at[int(t_ends[i]) + n])
            m = len(ref_ids)
            assert rec.mid.ids[a, :m].tolist() == ref_ids and (rec.mid.ids[a, m:] == -1).all()
            np.testing.assert_allclose(rec.mid.probs[a, :m], ref_probs, atol=5e-4)


def test_answer_distribution_equals_teacher_score(world, tmp_path):
    """The stored A-D log-probs equal `python -m kd_mlx.teacher score` of the same prompt texts."""
    from safetensors.numpy import load_file

    from kd_mlx.data import fit_prompt, load_cmmlu
    from kd_mlx.data import answer_token_ids
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.cli import score_prompts

    st = TopKStore(world["packed"]["out"])
    cmmlu = load_cmmlu(world["data"])
    qs = cmmlu.test_questions()
    texts = [fit_prompt(q, cmmlu.dev[q.subject], 2, None, None).text for q in qs]
    score_prompts(world["teacher"], texts, None, tmp_path / "s.safetensors", add_bos=st.identity["add_bos"],
                  progress=False)
    lp = load_file(str(tmp_path / "s.safetensors"))["logprobs"]
    from kd_mlx.tokenizer import load_tokenizer

    letters = answer_token_ids(load_tokenizer(world["teacher"]))
    got = np.stack([st[q.id].answer_logprobs for q in qs])
    np.testing.assert_allclose(got, lp[:, letters], atol=5e-4)
    # q8rice top-k: same ids as the fp32 store where the values are apart, values within the q8 step
    ex = TopKStore(world["exact"]["out"])
    for q in qs:
        a, b = ex[q.id], st[q.id]
        step = (a.topk_logprobs[:, :1] - a.topk_logprobs[:, -1:]) / 255
        assert (np.abs(np.sort(a.topk_logprobs, 1) - np.sort(b.topk_logprobs, 1)) <= step * 0.5 + 1e-5).all()
        assert all(set(x) == set(y) for x, y in zip(a.topk_ids.tolist(), b.topk_ids.tolist()))


def test_summariser_equals_plain_reference():
    """Vectorised top-k (argpartition + sort) == a full stable sort per row, ties to the lower id."""
    from kd_mlx.teacher.dump import Summariser, reference_summary

    rng = np.random.default_rng(0)
    logits = np.round(rng.standard_normal((6, 300)) * 2, 1)  # rounding makes ties
    lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    fast = Summariser(16, [3, 5, 7, 9])(lp)
    ref = reference_summary(lp, 16, [3, 5, 7, 9])
    for key in ("topk_ids", "topk_logprobs", "answer"):
        np.testing.assert_array_equal(fast[key], ref[key])
    p = np.exp(lp.astype(np.float64))
    np.testing.assert_allclose(fast["entropy"], -(p * lp).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(fast["mass"], np.sort(p, -1)[:, ::-1][:, :16].sum(-1), rtol=1e-5)


def test_quality_report(world):
    import json

    q = json.loads((Path(world["exact"]["out"]) / "quality.json").read_text())
    from kd_mlx.store import TopKStore

    st = TopKStore(world["exact"]["out"])
    recs = list(st)
    correct = sum(int(np.argmax(r.answer_logprobs)) == r.label for r in recs)
    assert q["questions"] == 10 and q["accuracy"] == round(100 * correct / 10, 2)
    assert set(q["subjects"]) == set(SUBJECTS) and sum(v["n"] for v in q["subjects"].values()) == 10
    mass = np.concatenate([np.exp(r.topk_logprobs.astype(np.float64)).sum(-1) for r in recs])
    assert q["topk_positions"] == len(mass) == sum(q["captured_mass"]["hist"]) == sum(q["entropy_nats"]["hist"])
    assert abs(q["captured_mass"]["mean"] - mass.mean()) < 1e-5 and abs(q["captured_mass"]["min"] - mass.min()) < 1e-6
    assert q["nonfinite_values"] == 0 and q["entropy_nats"]["mean"] > 0


def test_mismatch_refused_and_flipped_byte_detected(world, tmp_path):
    from click.testing import CliRunner

    from kd_mlx.store import verify_store
    from kd_mlx.teacher.cli import cli
    from kd_mlx.teacher.dump import dump_store

    out = tmp_path / "s"
    shutil.copytree(world["packed"]["out"], out)
    from kd_mlx.testing.models import tiny_kimi_k2_dir

    other = tiny_kimi_k2_dir(tmp_path / "teacher", seed=4)  # same name and config, other weights
    for change in ({"top_k": 4}, {"shots": 1}, {"encoding": "fp16"}, {"positions": "answer"}, {"hidden": False},
                   {"teacher": str(other)}):
        with pytest.raises(KDError, match="written with"):
            dump_store({**world["packed"], "out": str(out), **change}, progress=False, log=lambda m: None)
    with pytest.raises(KDError, match="other questions|beyond"):
        dump_store({**world["packed"], "out": str(out), "max_questions": 4, "shard_size": 3}, progress=False,
                   log=lambda m: None)
    r = CliRunner().invoke(cli, ["dump", *dump_args({**world["packed"], "out": str(out), "top_k": 4}),
                                 "--no-progress"])
    assert r.exit_code == 1 and "written with k=" in r.output and "Traceback" not in r.output
    assert files_bytes(out) == files_bytes(Path(world["packed"]["out"]))  # refused runs changed nothing
    # one flipped byte in a shard's data
    shard = out / "shard-000002.safetensors"
    b = bytearray(shard.read_bytes())
    b[len(b) // 2] ^= 0x10
    shard.write_bytes(bytes(b))
    problems = verify_store(out)
    assert any("shard-000002" in p and "sha256" in p for p in problems)


def test_extend_a_finished_dump_equals_one_run(world, tmp_path):
    """--max-questions 4 then the full 10 on the same store: the partial last shard is redone, bytes as one run."""
    from kd_mlx.teacher.dump import dump_store

    cfg = {**world["packed"], "out": str(tmp_path / "s")}
    dump_store({**cfg, "max_questions": 4}, progress=False, log=lambda m: None)
    dump_store(cfg, progress=False, log=lambda m: None)
    assert files_bytes(tmp_path / "s") == files_bytes(Path(world["packed"]["out"]))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_sigkill_mid_dump_then_resume_is_byte_identical(world, tmp_path):
    from kd_mlx.teacher.dump import dump_store

    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "kd_mlx.teacher", "dump",
           *dump_args({**world["packed"], "out": str(out)}), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "shard-000000.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "manifest.json").exists() and len(list(out.glob("shard-*"))) < 4
    dump_store({**world["packed"], "out": str(out)}, progress=False, log=lambda m: None)
    assert files_bytes(out) == files_bytes(Path(world["packed"]["out"]))


@pytest.mark.slow
def test_mlx_launch_two_ranks_byte_identical(world, tmp_path):
    launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    out = tmp_path / "s"
    cmd = [launch, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "kd_mlx.teacher", "dump",
           *dump_args({**world["packed"], "out": str(out)}), "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files_bytes(out) == files_bytes(Path(world["packed"]["out"]))
    # ranks that disagree (rank 1 asks for another k) stop with one clear line before computing anything
    bad = tmp_path / "bad"
    shell = " ".join(cmd[6:] + ["--out", str(bad)]) + ' --top-k "$((8 + MLX_RANK))"'
    r = subprocess.run([launch, "-n", "2", "--backend", "ring", "--", "sh", "-c", shell], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    # (mlx.launch itself may exit 0 when its ranks fail: check what the ranks said and left)
    assert "ranks disagree on the dump configuration" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout and not list(bad.glob("shard-*"))
    assert not (bad / "manifest.json").exists()


from kd_mlx.testing.models import smollm2_fp32_dir  # noqa: E402  (shared fp32 conversion)


@pytest.mark.slow
def test_real_smollm2_answer_distribution(tmp_path):
    """Real pretrained SmolLM2-135M: stored answer log-probs and top-k equal mlx-lm's in-memory forward."""
    from mlx_lm.utils import load_model

    from kd_mlx.data import fit_prompt, load_cmmlu
    from kd_mlx.data import answer_token_ids
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.dump import dump_store
    from kd_mlx.tokenizer import load_tokenizer

    model_dir = smollm2_fp32_dir()
    data = write_cmmlu(tmp_path / "cmmlu", n_dev=1, n_test=1)
    cfg = {"teacher": str(model_dir), "data": str(data), "shots": 1, "top_k": 16, "shard_size": 4,
           "positions": "answer", "encoding": "fp16", "out": str(tmp_path / "s")}
    dump_store(cfg, progress=False, log=lambda m: None)
    st = TopKStore(tmp_path / "s")
    tok = load_tokenizer(model_dir)
    letters = answer_token_ids(tok)
    model, _ = load_model(Path(model_dir))
    cmmlu = load_cmmlu(data)
    masses = []
    for q in cmmlu.test_questions():
        rec = st[q.id]
        ids = ([tok.bos_id] if st.identity["add_bos"] else []) + tok.encode(
            fit_prompt(q, cmmlu.dev[q.subject], 1, None, None).text)
        assert rec.token_ids.tolist() == ids and rec.positions.tolist() == [len(ids) - 1]
        lp = np.array(nn.log_softmax(model(mx.array([ids]))[0, -1].astype(mx.float32)))
        np.testing.assert_allclose(rec.answer_logprobs, lp[letters], atol=2e-4)
        top = np.argsort(-lp)[:16]
        np.testing.assert_allclose(rec.topk_logprobs[0], lp[top], rtol=1e-3, atol=2e-4)  # fp16 values
        masses.append(np.exp(lp[top]).sum())
    assert min(masses) > 0.3  # a real LM: peaked distributions, unlike a random init


def test_prompt_and_answer_position_spans(world, tmp_path):
    """--positions prompt: a top-k row at every token (no shared prefix); answer: only the last token. Both agree
    with the question-span dump on the rows they share."""
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.dump import dump_store

    for positions in ("prompt", "answer"):
        out = tmp_path / positions
        dump_store({**world["exact"], "positions": positions, "max_questions": 2, "hidden": False,
                    "out": str(out)}, progress=False, log=lambda m: None)
        full = TopKStore(world["exact"]["out"])
        for rec in TopKStore(out):
            n = len(rec.token_ids)
            want = list(range(n)) if positions == "prompt" else [n - 1]
            assert rec.positions.tolist() == want and rec.hidden is None
            ref = full[rec.id]
            assert rec.token_ids.tolist() == ref.token_ids.tolist()
            # the answer row agrees with the question-span dump's last row (other call grouping: float rounding)
            np.testing.assert_allclose(rec.topk_logprobs[-1], ref.topk_logprobs[-1], atol=1e-4)
            np.testing.assert_allclose(rec.answer_logprobs, ref.answer_logprobs, atol=1e-4)


def test_dump_texts_every_position_with_class_masses_and_resume(world, tmp_path):
    """Plain texts through the dump's shard computation: a row at every token, log Z / class masses kept, the
    tokenizer carried; a rerun after losing a shard and the manifest gives the same bytes."""
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.dump import dump_texts
    from kd_mlx.teacher.streaming import StreamingTeacher

    teacher = StreamingTeacher(world["teacher"], None)
    texts = ["题目：下列哪种作物最耐旱？\nA. 农作物", "The quick brown fox.", "1+1=2，对吗？"]
    out = tmp_path / "texts"
    dump_texts(teacher, texts, out, 4, [1.0, 2.0], str(world["student_tok"]), encoding="fp16", shard_size=2)
    before = files_bytes(out)
    st = TopKStore(out)
    assert st.identity["template"] == "text" and (out / "tokenizer").is_dir()
    for text, rec in zip(texts, st):
        ids = teacher.tokenizer.encode(text)
        assert rec.token_ids.tolist() == ids and rec.positions.tolist() == list(range(len(ids)))
        assert set(rec.logz) == {2.0} and set(rec.class_mass) == {1.0, 2.0}
        p = np.exp(rec.topk_logprobs.astype(np.float64))
        cm = rec.class_mass[1.0]
        assert np.all((cm >= p - 1e-3) | (cm == 0))  # a class holds at least its listed token (0: unmappable)
    st.close()
    (out / "shard-000001.safetensors").unlink()
    (out / "manifest.json").unlink()
    dump_texts(teacher, texts, out, 4, [1.0, 2.0], str(world["student_tok"]), encoding="fp16", shard_size=2)
    assert files_bytes(out) == before


def test_branch_logprobs_equal_the_extended_sequences(world):
    """One forward + one cached step per branch == the teacher's forward of ids[:i + 1] + [c] (tiny Kimi-K2:
    MLA caches); streamed under a budget it is refused."""
    from kd_mlx.teacher.streaming import StreamingTeacher

    teacher = StreamingTeacher(world["teacher"], None)
    ids = teacher.tokenizer.encode("题目：下列哪种作物最耐旱？\nA. 农作物")
    branches = [(0, 5), (3, 100), (len(ids) - 1, 7), (5, 9), (3, 11)]
    rows, got, after = teacher.branch_logprobs(ids, lambda r: branches, batch=3)  # two batches, one padded
    assert got == branches and after.shape == (5, teacher.vocab_size)
    np.testing.assert_allclose(rows, teacher.logprobs_at([ids], [list(range(len(ids)))])[0], atol=1e-4)
    for (i, c), lq in zip(branches, after):
        np.testing.assert_allclose(lq, teacher.logprobs_at([ids[:i + 1] + [c]], [[i + 1]])[0][0], atol=1e-4)
    streamed = StreamingTeacher(world["teacher"], teacher.plan.total_bytes // 2)
    with pytest.raises(KDError, match="whole teacher in memory"):
        streamed.branch_logprobs(ids, lambda r: branches)


@pytest.mark.slow
def test_dump_texts_boundary_rows_real_smollm2(tmp_path, phi_tok_dir):
    """Real SmolLM2-135M -> GPT-2: with `lookahead` the store holds a row at every boundary both encodings share
    (nbytes 0), each the plain loops' row from the same teacher rows and branch steps; candidates GPT-2 merges
    with what follows exist and get their branch; bad settings are refused before any compute."""
    from kd_mlx.align import boundary_row_reference
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.dump import dump_texts, student_side
    from kd_mlx.teacher.streaming import StreamingTeacher

    teacher = StreamingTeacher(smollm2_fp32_dir(), None)
    tok = teacher.tokenizer
    texts = ["题目：下列关于中国古代科举制度的说法，正确的是", "The theory of the firm"]
    out = tmp_path / "s"
    with pytest.raises(KDError, match="needs --student-tokenizer"):
        dump_texts(teacher, texts, out, 8, lookahead=2)
    with pytest.raises(KDError, match="lookahead must be an integer >= 0"):
        dump_texts(teacher, texts, out, 8, student_tokenizer=str(phi_tok_dir), lookahead=-1)
    assert not out.exists()
    dump_texts(teacher, texts, out, 8, student_tokenizer=str(phi_tok_dir), encoding="fp32", lookahead=2)
    st = TopKStore(out)
    assert st.identity["boundary_rows"] == {"lookahead": 2, "min_mass": 0.01}
    student = student_side(tok, str(phi_tok_dir), 8)
    proj = student.mid
    s_tok = proj.student_tok
    branched = 0
    for text, rec in zip(texts, st):
        ids = rec.token_ids.tolist()
        at = proj.boundary_positions(ids, text)
        b = rec.mid.nbytes == 0
        assert rec.mid.row[b].tolist() == at and len(at) >= 4
        rows, branches, after = teacher.branch_logprobs(
            ids, lambda r: [(i, c) for i in at for c in proj.lookahead_candidates(r[i], 2, 0.01, skip=ids[i + 1])])
        branched += len(branches)
        for a, i in list(zip(np.flatnonzero(b), at))[::3]:
            looks = [(ids[i + 1], rows[i + 1])] + [(c, lq) for (j, c), lq in zip(branches, after) if j == i]
            ref_ids, ref_probs = boundary_row_reference(rows[i], looks, student.student_id, tok, s_tok, 8)
            m = len(ref_ids)
            assert rec.mid.ids[a, :m].tolist() == ref_ids
            np.testing.assert_allclose(rec.mid.probs[a, :m], ref_probs, rtol=1e-4, atol=1e-6)
    assert branched >= 3
    # lookahead 0: the real next token's split only, from the dump's own rows: streamed under a budget too
    streamed = StreamingTeacher(smollm2_fp32_dir(), teacher.plan.total_bytes // 2)
    with pytest.raises(KDError, match="whole teacher in memory"):
        dump_texts(streamed, texts, tmp_path / "no", 8, student_tokenizer=str(phi_tok_dir), lookahead=1)
    dump_texts(streamed, texts, tmp_path / "s0", 8, student_tokenizer=str(phi_tok_dir), encoding="fp32", lookahead=0)
    for text, rec in zip(texts, TopKStore(tmp_path / "s0")):
        ids = rec.token_ids.tolist()
        rows = teacher.logprobs_at([ids], [list(range(len(ids)))])[0]
        b = np.flatnonzero(rec.mid.nbytes == 0)
        assert rec.mid.row[b].tolist() == proj.boundary_positions(ids, text)
        for a in b[::3]:
            i = int(rec.mid.row[a])
            ref_ids, ref_probs = boundary_row_reference(rows[i], [(ids[i + 1], rows[i + 1])], student.student_id,
                                                        tok, s_tok, 8)
            assert rec.mid.ids[a, : len(ref_ids)].tolist() == ref_ids
            np.testing.assert_allclose(rec.mid.probs[a, : len(ref_ids)], ref_probs, rtol=1e-3, atol=1e-5)


def test_cmmlu_dump_lookahead_zero_streams_and_train_uses_the_rows(world, tmp_path):
    """`teacher dump --lookahead 0` under a memory budget: boundary rows at the question positions whose boundary
    GPT-2 shares (the real next token's split, from the dump's own rows), equal to the plain loops; the other
    tensors equal the dump without them; training's byte alignment puts them at those positions."""
    from kd_mlx.align import VocabMap, align_record_bytes, aligned_rows_bytes, boundary_row_reference
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.dump import dump_store, student_side
    from kd_mlx.teacher.streaming import StreamingTeacher

    teacher = StreamingTeacher(world["teacher"], None)
    out = tmp_path / "b"
    dump_store({**world["exact"], "lookahead": 0, "max_questions": 3, "memory_budget": teacher.plan.total_bytes // 2,
                "hidden": False, "out": str(out)}, progress=False, log=lambda m: None)
    st, plain = TopKStore(out), TopKStore(world["exact"]["out"])
    assert st.identity["boundary_rows"] == {"lookahead": 0, "min_mass": 0.01}
    tok = teacher.tokenizer
    student = student_side(tok, str(world["student_tok"]), 8)
    s_tok = student.mid.student_tok
    vmap = VocabMap.build(tok, s_tok)
    for rec in st:
        ref = plain[rec.id]
        np.testing.assert_allclose(rec.topk_logprobs, ref.topk_logprobs, atol=1e-4)
        inside = rec.mid.nbytes > 0
        assert rec.mid.row[inside].tolist() == ref.mid.row.tolist()
        ids = rec.token_ids.tolist()
        text = tok.decode(ids)
        pos = rec.positions.tolist()
        want = [pos.index(i) for i in student.mid.boundary_positions(ids, text) if i in pos and i + 1 in pos]
        b = np.flatnonzero(~inside)
        assert rec.mid.row[b].tolist() == want and len(want) >= 3
        rows = teacher.logprobs_at([ids], [pos])[0]
        for a in b[:2]:
            r = int(rec.mid.row[a])
            ref_ids, ref_probs = boundary_row_reference(rows[r], [(ids[pos[r] + 1], rows[r + 1])], student.student_id,
                                                        tok, s_tok, 8)
            got = dict(zip(rec.mid.ids[a].tolist(), rec.mid.probs[a].tolist()))
            for i, p in zip(ref_ids[:4], ref_probs[:4]):  # the streamed rows differ from these by float rounding
                assert got.get(i) == pytest.approx(p, rel=1e-3)
        s_ids = s_tok.encode(text)
        t_ends = np.cumsum(vmap.teacher_len[rec.token_ids])
        s_ends = np.cumsum(vmap.student_len[s_ids])
        rows_b, at_pos = aligned_rows_bytes(rec.positions, t_ends, s_ends, 0, 0)
        kd_pos = align_record_bytes(rec, s_ids, text, text, 0, vmap)[0]
        with_row = np.isin(rows_b, rec.mid.row[b])
        assert with_row.any() and set(at_pos[with_row].tolist()) <= set(kd_pos.tolist())
