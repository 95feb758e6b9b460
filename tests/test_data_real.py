"""The data layer on the real CMMLU (`KD_MLX_CMMLU`, default ../shared/cmmlu); skipped cleanly when absent."""

from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from kd_mlx.data import (
    SPLIT_NAMES,
    build_prompt,
    check_no_leak,
    count_tokens_batch,
    count_tokens_reference,
    fit_prompt,
    fit_prompts,
    load_cmmlu,
    make_splits,
    subject_table,
)
from kd_mlx.data.cli import main as data_cli
from kd_mlx.data.cli import question_prompt


@pytest.fixture(scope="module")
def cmmlu(real_cmmlu):
    return load_cmmlu(real_cmmlu)


def test_all_questions_load(cmmlu, real_cmmlu):
    assert len(cmmlu) == 11_582 and sum(len(v) for v in cmmlu.dev.values()) == 335
    assert cmmlu.subjects == sorted(subject_table()) and not cmmlu.skipped
    assert all(len(v) == 5 for v in cmmlu.dev.values())
    ids = [q.id for v in (*cmmlu.dev.values(), *cmmlu.test.values()) for q in v]
    assert len(set(ids)) == len(ids) == 11_917
    assert sum(1 for i in ids if i.endswith("-2")) == 2  # the two verbatim repeats (anatomy, logical)
    # row 0 of a file, read independently with the csv module
    with open(real_cmmlu / "test" / "agronomy.csv", encoding="utf-8", newline="") as f:
        row = list(csv.reader(f))[1]
    q = cmmlu.test["agronomy"][0]
    assert (q.question, *q.choices, q.answer) == tuple(row[1:])


def test_show_every_subject(cmmlu, real_cmmlu, phi_tok):
    zh = subject_table()
    for subject in cmmlu.subjects:
        last = len(cmmlu.test[subject]) - 1
        p, n = question_prompt(cmmlu, subject, last, 5, phi_tok, 2048)
        q = cmmlu.test[subject][last]
        assert p.text.startswith(f"以下是关于{zh[subject]['zh']}的单项选择题") and p.text.endswith("\n答案是：")
        assert p.suffix == build_prompt(q).suffix and p.shots == 5 and n == len(phi_tok.encode(p.text)) <= 2048
    # and the command itself, end to end, for one subject
    r = CliRunner().invoke(data_cli, ["show", "--data", str(real_cmmlu), "--subject", "college_law", "--index", "7",
                                      "--shots", "3"])
    assert r.exit_code == 0
    q = cmmlu.test["college_law"][7]
    assert r.stdout == build_prompt(q, cmmlu.dev["college_law"][:3]).text


def test_batch_token_counts_agree_with_reference(cmmlu, phi_tok, kimi_tok):
    qs = cmmlu.test_questions()[::97]  # 120 questions across all subjects
    texts = [build_prompt(q, cmmlu.dev[q.subject]).text for q in qs]
    for tok in (phi_tok, kimi_tok):
        assert count_tokens_batch(tok, texts) == count_tokens_reference(tok, texts)


def test_fit_prompts_agree_with_fit_prompt_when_dropping(cmmlu, phi_tok):
    qs = [q for s in ("college_law", "high_school_chemistry", "ancient_chinese") for q in cmmlu.test[s][:15]]
    count = lambda t: len(phi_tok.encode(t))  # noqa: E731
    ref = [fit_prompt(q, cmmlu.dev[q.subject], 5, count, 600) for q in qs]
    assert fit_prompts(qs, cmmlu.dev, 5, phi_tok, 600) == ref
    assert any(p.shots < 5 for p in ref)  # 600 tokens forces real shot dropping here
    assert all(count(p.text) <= 600 for p in ref if p.prefix)


def test_five_shot_prompts_fit_2048_under_phi(cmmlu, phi_tok):
    """Every 5-shot prompt fits Phi-1.5's 2048 context after fitting.

    Every byte-level BPE token covers at least one UTF-8 byte, so a prompt of <= 2048 bytes has <= 2048 tokens;
    only the longer prompts (a few hundred) are tokenized."""
    qs = cmmlu.test_questions()
    full = [build_prompt(q, cmmlu.dev[q.subject]) for q in qs]
    long_ = [(q, p) for q, p in zip(qs, full) if len(p.text.encode("utf-8")) > 2048]
    assert 0 < len(long_) < len(qs) // 10
    sample = [p.text for _, p in long_[:50]]
    assert all(n <= len(t.encode("utf-8")) for n, t in zip(count_tokens_batch(phi_tok, sample), sample))
    fitted = fit_prompts([q for q, _ in long_], cmmlu.dev, 5, phi_tok, 2048)
    counts = count_tokens_batch(phi_tok, [p.text for p in fitted])
    assert max(counts) <= 2048
    assert all(p.prefix for p in fitted)  # the header always fits


def test_real_splits(cmmlu):
    s = make_splits(cmmlu, seed=0, val=0.1, test=0.2)
    assert sum(len(s[n]) for n in SPLIT_NAMES) == 11_582 == s["n_questions"]
    assert len(s["counts"]) == 67
    for subject, c in s["counts"].items():
        n = len(cmmlu.test[subject])
        assert abs(c["test"] - n * 0.2) <= 1.5 and abs(c["val"] - n * 0.1) <= 1.5
    assert s == make_splits(cmmlu, seed=0, val=0.1, test=0.2)
    check_no_leak(s["train"], s)
    dev_ids = {q.id for v in cmmlu.dev.values() for q in v}
    assert not dev_ids & set(s["train"] + s["val"] + s["test"])
