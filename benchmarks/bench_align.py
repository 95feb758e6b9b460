"""Benchmark cross-tokenizer alignment (kd_mlx.align) on all 11,582 CMMLU test questions.

    source scripts/setup_env.sh && python benchmarks/bench_align.py [--data ../shared/cmmlu] [--k 32] \
        [--positions question|prompt] [--real-model-questions 16]

Teacher tokenizer: cl100k in Kimi's tiktoken.model format (the project's Kimi-K2 stand-in); student: Phi-1.5's
GPT-2 BPE. Prompts: official 5-shot, fitted to 2048 student tokens (the same text on both sides, as in training
when it fits). Teacher rows: the positions the dump stores (`--positions question`: tokens of the question part,
the dump's default; `prompt`: every token), k=32, from a real-text stand-in for the teacher: a bigram model of
the teacher's tokens estimated on the CMMLU questions themselves (Dirichlet-smoothed towards the unigram, α=20;
true full-vocabulary log-probs, so the top-k leaves a real tail). A real neural distribution is measured too:
SmolLM2-135M (real pretrained, its own BPE as the "teacher" tokenizer) on `--real-model-questions` 0-shot prompts,
its top-k projected onto Phi's vocabulary.

Prints: vocabulary-map build time (cold, and loaded from the cache) against the old path (FirstTokenProjector over
the whole teacher vocabulary); records aligned per second for align_record (vectorised), align_record_reference
(plain loops) and the old project_positions + FirstTokenProjector, ratios measured in this run, fast == reference
checked on every record; the fraction of student positions that receive a teacher signal; the mean projected mass;
diagnostics of the projection's assumptions; peak RSS.

Measured 2026-11-29, Linux, 2 CPU cores shared with other jobs (load ~5: absolute times are noisy, ratios are
from the same run), all 11,582 test questions, --positions question, k=32:
    vocab map (100,512 teacher ids, coverage 0.9975): cold build 4.93 s (the old projector over the whole vocab
        0.61 s: it skips the BPE encoding); cached load 0.23 s (22x); 88.3% of ids map as the old longest-prefix rule
    tokenizing both sides 65.4 s (not counted); 1,266,602 teacher rows
    align_record 14.2 s = 814 records/s; align_record_reference 80.1 s (5.6x slower); old project_positions
        120.2 s (8.4x slower); fast == reference on 11,582/11,582, same positions as the old path on all
    align_record_bytes 24.2 s = 479 records/s; its reference 155.1 s (6.4x slower); equal on 11,582/11,582
    student positions with a teacher signal (question part): 48.3% by char offsets (84.7 per question),
        58.7% by bytes (103.0 per question); mean projected mass 0.633 (chars) / 0.687 (bytes) = the mean top-32
        mass (unmappable 0.0000)
    context check: the teacher's real next token maps to the student's real next token at 95.4% of aligned
        positions (the student's real token is a byte prefix of the teacher's at 95.6%)
    SmolLM2-135M real top-32 (16 questions, 0-shot): mean top-k mass 0.863, projected 0.863, signal at 50.3%
    peak RSS 4,650 MiB (every prompt's tokens and results are held for the statistics)
  --positions prompt --max-questions 2000 --real-model-questions 0 (1,089,568 rows):
    align_record 10.9 s = 184 records/s (reference 7.6x slower, old path 7.2x slower); align_record_bytes 12.7 s
    (reference 8.8x slower); signal 49.3% (chars) / 60.2% (bytes) of all prompt positions; mass 0.661 / 0.702;
    context check 93.5% (byte prefix 94.9%); peak RSS 1,690 MiB
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
from tqdm import tqdm

from kd_mlx import align as A
from kd_mlx.data import build_prompt, fit_prompts, format_shot, load_cmmlu
from kd_mlx.testing import kimi_tokenizer_dir, phi_tokenizer_dir
from kd_mlx.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


# --- the path align.py replaced, kept verbatim from kd_mlx/train/examples.py (commit 637306a) as the peer measured
# in this run: a per-id Python projector (longest student byte prefix) and per-row Python loops.
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


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


class BigramTeacher:
    """p(next | prev) = (count(prev, next) + α u(next)) / (count(prev) + α), u the unigram (add-0.01); top-k table."""

    def __init__(self, streams: list[np.ndarray], vocab: int, k: int, alpha: float = 20.0):
        allt = np.concatenate(streams)
        u = np.bincount(allt, minlength=vocab).astype(np.float64) + 0.01
        self.u = u / u.sum()
        prev = np.concatenate([s[:-1] for s in streams]).astype(np.int64)
        nxt = np.concatenate([s[1:] for s in streams]).astype(np.int64)
        keys, cnt = np.unique(prev * vocab + nxt, return_counts=True)
        p_of, n_of = keys // vocab, keys % vocab
        uni_top = np.argsort(-self.u)[: 2 * k]
        self.k, self.vocab = k, vocab
        self.row_of = np.full(vocab, -1, np.int64)
        starts = np.searchsorted(p_of, np.unique(p_of))
        ends = np.append(starts[1:], len(p_of))
        ids_t, lp_t = [], []
        for r, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
            total = cnt[a:b].sum()
            cand = np.union1d(n_of[a:b], uni_top)
            c = np.zeros(len(cand))
            c[np.searchsorted(cand, n_of[a:b])] = cnt[a:b]
            score = (c + alpha * self.u[cand]) / (total + alpha)
            top = np.argsort(-score, kind="stable")[:k]
            ids_t.append(cand[top])
            lp_t.append(np.log(score[top]))
            self.row_of[p_of[a]] = r
        top = uni_top[:k]  # unseen previous token: the unigram
        ids_t.append(top)
        lp_t.append(np.log(self.u[top]))
        self.ids = np.stack(ids_t).astype(np.int32)
        self.lp = np.stack(lp_t).astype(np.float32)

    def rows(self, prev_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self.row_of[np.asarray(prev_ids, np.int64)]
        r = np.where(r < 0, len(self.ids) - 1, r)
        return self.ids[r], self.lp[r]


def make_record(t_ids, t_offs, positions, teacher: BigramTeacher):
    ids, lp = teacher.rows(np.asarray(t_ids)[positions])
    return SimpleNamespace(token_ids=np.asarray(t_ids, np.int32), offsets=np.asarray(t_offs, np.int32).reshape(-1, 2),
                           positions=np.asarray(positions, np.int32), topk_ids=ids, topk_logprobs=lp)


def question_positions(offs, prefix_len: int, mode: str) -> list[int]:
    # the dump's rule: "question" = tokens starting in the question part, "prompt" = every token
    if mode == "prompt":
        return list(range(len(offs)))
    return [i for i, (a, _) in enumerate(offs) if a >= prefix_len] or [len(offs) - 1]


def timed(fn, items, desc: str):
    t = time.perf_counter()
    out = [fn(*it) for it in tqdm(items, desc=desc, leave=False, disable=None)]
    return out, time.perf_counter() - t


def same(a, b) -> bool:
    return (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.allclose(a[2], b[2], atol=1e-6)
            and np.allclose(a[3], b[3], atol=1e-6))


def real_model_section(cm, phi_tok, n_questions: int, k: int, mode: str) -> None:
    """Real top-k from SmolLM2-135M (its own tokenizer as the teacher's), projected onto Phi's vocabulary."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from kd_mlx.testing.models import smollm2_dir

    d = smollm2_dir()
    model, _ = load_model(d)
    if mx.default_device() == mx.cpu:  # CPU: dequantized fp32 through BLAS is ~100x faster than 4-bit matmuls
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    tok = load_tokenizer(d)
    vmap = A.VocabMap.build(tok, phi_tok, use_cache=False)
    rng = np.random.default_rng(0)
    qs = cm.test_questions()
    qs = [qs[int(i)] for i in rng.choice(len(qs), n_questions, replace=False)]
    topk_mass, proj_mass, n_sig, n_pos, t_model = [], [], 0, 0, 0.0
    for q in tqdm(qs, desc="SmolLM2 rows", leave=False, disable=None):
        p = build_prompt(q)  # 0-shot: the model runs on CPU
        ids, offs = tok.encode_with_offsets(p.text)
        t = time.perf_counter()
        logits = model(mx.array([ids]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        pos = question_positions(offs, len(p.prefix), mode)
        lp = lp[mx.array(pos)]
        top = mx.argpartition(-lp, k - 1, axis=-1)[:, :k]
        top_lp = mx.take_along_axis(lp, top, axis=-1)
        mx.eval(top, top_lp)
        t_model += time.perf_counter() - t
        rec = SimpleNamespace(token_ids=np.array(ids), offsets=np.array(offs), positions=np.array(pos),
                              topk_ids=np.array(top), topk_logprobs=np.array(top_lp))
        s_ids, s_offs = phi_tok.encode_with_offsets(p.text)
        out = A.align_record(rec, rec.offsets, s_offs, 0, 0, vmap)
        assert same(out, A.align_record_reference(rec, rec.offsets, s_offs, 0, 0, vmap))
        rows, _ = A.aligned_rows(rec.positions, rec.offsets, s_offs, 0, 0)
        topk_mass += np.exp(rec.topk_logprobs[rows].astype(np.float64)).sum(-1).tolist()
        proj_mass += out[2].sum(-1).tolist()
        n_sig += len(out[0])
        n_pos += sum(1 for j in range(len(s_ids) - 1) if mode == "prompt" or s_offs[j + 1][0] >= len(p.prefix))
    print(f"SmolLM2-135M real top-{k} ({n_questions} questions, 0-shot, model {t_model:.1f} s; teacher vocab "
          f"{tok.vocab_size}, map coverage {vmap.coverage:.4f}): mean top-k mass {np.mean(topk_mass):.3f}, "
          f"projected {np.mean(proj_mass):.3f}, signal at {n_sig / max(n_pos, 1):.1%} of student positions")


@click.command()
@click.option("--data", default=None, help="CMMLU directory [default: $KD_MLX_CMMLU or ../shared/cmmlu]")
@click.option("--k", type=int, default=32, help="teacher top-k per row (the dump's default)")
@click.option("--shots", type=int, default=5)
@click.option("--max-tokens", type=int, default=2048, help="student context the prompts are fitted to")
@click.option("--positions", "mode", type=click.Choice(["question", "prompt"]), default="question")
@click.option("--max-questions", type=int, default=None, help="only the first N test questions")
@click.option("--real-model-questions", type=int, default=16, help="0 skips the SmolLM2 section")
def main(data, k, shots, max_tokens, mode, max_questions, real_model_questions) -> None:
    data = data or os.environ.get("KD_MLX_CMMLU") or str(REPO.parent / "shared" / "cmmlu")
    print(f"bench_align: data={data} k={k} shots={shots} max_tokens={max_tokens} positions={mode}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_align_"))
    kimi = load_tokenizer(kimi_tokenizer_dir(tmp / "kimi"))
    phi = load_tokenizer(phi_tokenizer_dir(tmp / "phi"))
    kimi.token_bytes(0), phi.token_bytes(0)  # build the tokenizers' byte tables outside the timings

    # --- vocabulary map: cold, cached, and the old lazy projector over the whole teacher vocabulary
    t = time.perf_counter()
    vmap = A.VocabMap.build(kimi, phi, cache_dir=tmp / "cache")
    t_cold = time.perf_counter() - t
    t = time.perf_counter()
    cached = A.VocabMap.build(kimi, phi, cache_dir=tmp / "cache")
    t_cached = time.perf_counter() - t
    assert cached.source == "cache" and np.array_equal(cached.student_id, vmap.student_id)
    t = time.perf_counter()
    old = FirstTokenProjector(kimi, phi)
    old_ids = np.array([old(i) for i in range(kimi.vocab_size)])
    t_old = time.perf_counter() - t
    print(f"vocab map ({kimi.vocab_size} teacher ids, coverage {vmap.coverage:.4f}): cold build {t_cold:.2f} s "
          f"(old projector over the whole vocab {t_old:.2f} s, {t_old / t_cold:.1f}x); cached load {t_cached:.2f} s "
          f"({t_cold / t_cached:.0f}x); same id as the old longest-prefix rule for "
          f"{np.mean(old_ids == vmap.student_id):.1%} of teacher ids")

    # --- prompts, tokenizations and teacher rows
    cm = load_cmmlu(data)
    qs = cm.test_questions()[:max_questions]
    prompts = fit_prompts(qs, cm.dev, shots, phi, max_tokens)
    t = time.perf_counter()
    t_tok = [kimi.encode_with_offsets(p.text) for p in tqdm(prompts, desc="teacher tokens", leave=False, disable=None)]
    s_tok = [phi.encode_with_offsets(p.text) for p in tqdm(prompts, desc="student tokens", leave=False, disable=None)]
    t_tokenize = time.perf_counter() - t
    streams = [np.array(kimi.encode(q.question + "\n" + "\n".join(q.choices)), np.int64) for q in qs]
    streams += [np.array(kimi.encode(format_shot(q)), np.int64) for d in cm.dev.values() for q in d]
    t = time.perf_counter()
    teacher = BigramTeacher([s for s in streams if len(s) > 1], kimi.vocab_size, k)
    t_bigram = time.perf_counter() - t
    recs = [make_record(ti, to, question_positions(to, len(p.prefix), mode), teacher)
            for p, (ti, to) in zip(prompts, t_tok)]
    n_rows = sum(len(r.positions) for r in recs)
    print(f"{len(qs)} prompts ({shots}-shot, fitted to {max_tokens}); tokenizing both sides {t_tokenize:.1f} s "
          f"(not counted below); bigram teacher table {t_bigram:.1f} s; {n_rows:,} teacher rows")

    # --- alignment throughput: fast, reference, old path (char offsets); byte-level boundaries
    n = len(recs)
    items = [(r, r.offsets, so, 0, 0, vmap, None) for r, (_, so) in zip(recs, s_tok)]
    fast, t_fast = timed(A.align_record, items, "align_record")
    ref, t_ref = timed(A.align_record_reference, items, "reference")
    old_items = [(r, r.offsets, so, 0, 0, old, None) for r, (_, so) in zip(recs, s_tok)]
    olds, t_oldp = timed(project_positions, old_items, "old project_positions")
    n_same = sum(same(a, b) for a, b in zip(fast, ref))
    print(f"align {n} records (char offsets): align_record {t_fast:.2f} s = {n / t_fast:,.0f} records/s; "
          f"reference {t_ref:.1f} s ({t_ref / t_fast:.1f}x slower); old project_positions {t_oldp:.1f} s "
          f"({t_oldp / t_fast:.1f}x slower); fast == reference on {n_same}/{n} records; same positions as the old "
          f"path on {sum(np.array_equal(a[0], b[0]) for a, b in zip(fast, olds))}/{n}")
    del olds, ref
    b_items = [(r, si, p.text, p.text, 0, vmap, None) for r, p, (si, _) in zip(recs, prompts, s_tok)]
    fast_b, t_fast_b = timed(A.align_record_bytes, b_items, "align_record_bytes")
    ref_b, t_ref_b = timed(A.align_record_bytes_reference, b_items, "bytes reference")
    n_same_b = sum(same(a, b) for a, b in zip(fast_b, ref_b))
    del ref_b
    print(f"align {n} records (byte boundaries): align_record_bytes {t_fast_b:.2f} s = {n / t_fast_b:,.0f} "
          f"records/s; reference {t_ref_b:.1f} s ({t_ref_b / t_fast_b:.1f}x slower); fast == reference on "
          f"{n_same_b}/{n} records")

    # --- what the student gets
    n_pos = 0
    for p, (s_ids, s_offs) in zip(prompts, s_tok):
        lo = 0 if mode == "prompt" else len(p.prefix)
        n_pos += int(np.sum(A._as_offsets(s_offs)[1:, 0] >= lo))
    where = "prompt" if mode == "prompt" else "question-part"
    for name, res in (("char offsets", fast), ("byte boundaries", fast_b)):
        n_sig = sum(len(f[0]) for f in res)
        mass = np.concatenate([f[2].sum(-1) for f in res])
        print(f"{name}: student positions with a teacher signal {n_sig / n_pos:.1%} ({n_sig:,} of {n_pos:,} {where} "
              f"positions, {n_sig / n:.1f} per question); mean projected mass {mass.mean():.3f}")
    topk_mass, proj_mass, agree, prefix_ok, n_al = [], [], 0, 0, 0
    for rec, f, (s_ids, s_offs) in zip(recs, fast, s_tok):
        rows, pos = A.aligned_rows(rec.positions, rec.offsets, s_offs, 0, 0)
        topk_mass.append(np.exp(rec.topk_logprobs[rows].astype(np.float64)).sum(-1))
        proj_mass.append(f[2].sum(-1))
        t_next = rec.token_ids[rec.positions[rows] + 1]
        s_next = np.asarray(s_ids)[pos + 1]
        agree += int(np.sum(vmap.student_id[t_next] == s_next))
        prefix_ok += sum(kimi.token_bytes(int(a)).startswith(phi.token_bytes(int(b)))
                         for a, b in zip(t_next.tolist(), s_next.tolist()))
        n_al += len(rows)
    topk_mass, proj_mass = np.concatenate(topk_mass), np.concatenate(proj_mass)
    print(f"char offsets: mean projected mass {proj_mass.mean():.4f} of a mean top-{k} mass {topk_mass.mean():.4f} "
          f"(unmappable {max(0.0, topk_mass.mean() - proj_mass.mean()):.4f}); context check: the teacher's real next "
          f"token maps to the student's real next token at {agree / n_al:.1%} of aligned positions (the student's real "
          f"token is a byte prefix of the teacher's at {prefix_ok / n_al:.1%})")
    if real_model_questions:
        real_model_section(cm, phi, real_model_questions, k, mode)
    print(f"peak RSS {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
