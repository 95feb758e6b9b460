"""The demo: the controlled task generator, and `python -m kd_mlx demo --quick` end to end.

    python -m pytest -q tests/test_demo.py
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter

import pytest

from kd_mlx.data import load_cmmlu, load_splits, make_splits, split_questions
from kd_mlx.demo import (DEFAULT_KINDS, NUMBER_KINDS, TASK_KINDS, TASKS, WORD_KINDS, chinese_numeral, generate_task,
                         parse_chinese_numeral, teacher_questions, write_task, write_transfer_task)
from kd_mlx.utils import KDError, write_json_atomic


def test_chinese_numerals_hand_checked_and_round_trip():
    expected = {0: "零", 7: "七", 10: "十", 15: "十五", 20: "二十", 37: "三十七", 100: "一百", 105: "一百零五",
                110: "一百一十", 999: "九百九十九", 1001: "一千零一", 2020: "二千零二十"}
    for n, text in expected.items():
        assert chinese_numeral(n) == text
    for n in range(0, 10000):
        assert parse_chinese_numeral(chinese_numeral(n)) == n
    with pytest.raises(ValueError):
        chinese_numeral(10000)
    with pytest.raises(ValueError):
        parse_chinese_numeral("三x")


def _kind_of_item(item: str, kinds: dict) -> str:
    for name, members in kinds.items():
        shown = [chinese_numeral(m) if isinstance(m, int) else m for m in members]
        if item in shown:
            return name
    raise AssertionError(f"item {item!r} belongs to no kind")


def test_answers_are_the_most_frequent_kind():
    task = generate_task(seed=3, n_test=150, n_dev=5)
    kinds_of = {"words": WORD_KINDS, "numbers": NUMBER_KINDS}
    for kind in DEFAULT_KINDS:
        subject = TASK_KINDS[kind][0]
        for it in task[subject]["dev"] + task[subject]["test"]:
            items = it.question.split("：", 1)[1].split("、")
            assert len(items) == 5
            counts = Counter(_kind_of_item(x, kinds_of[kind]) for x in items)
            (top, n_top), *rest = counts.most_common()
            assert not rest or rest[0][1] < n_top  # a unique answer
            assert it.choices == tuple(kinds_of[kind])
            assert it.choices["ABCD".index(it.answer)] == top
        letters = Counter(it.answer for it in task[subject]["test"])
        assert set(letters) == set("ABCD") and min(letters.values()) >= 20  # every letter used, roughly balanced


def test_missing_task_answers_are_the_absent_kind():
    task = generate_task(seed=4, n_test=120, n_dev=5, kinds=TASKS["missing"])
    kinds_of = {"missing_words": WORD_KINDS, "missing_numbers": NUMBER_KINDS}
    for kind in TASKS["missing"]:
        subject = TASK_KINDS[kind][0]
        for it in task[subject]["dev"] + task[subject]["test"]:
            items = it.question.split("：", 1)[1].split("、")
            present = {_kind_of_item(x, kinds_of[kind]) for x in items}
            assert len(items) == 6 and len(present) == 3
            assert it.choices == tuple(kinds_of[kind])
            assert set(it.choices) - present == {it.choices["ABCD".index(it.answer)]}
        assert set(Counter(it.answer for it in task[subject]["test"])) == set("ABCD")


def test_transfer_set_is_new_unlabelled_questions_in_their_own_split(tmp_path):
    write_task(tmp_path / "task", seed=0, n_test=60, n_dev=5, n_transfer=30)
    cmmlu = load_cmmlu(tmp_path / "task")
    transfer = cmmlu.transfer_questions()
    assert len(transfer) == 30 * len(DEFAULT_KINDS) and all(q.answer is None for q in transfer)
    known = {(q.question, tuple(q.choices)) for part in (cmmlu.dev, cmmlu.test) for qs in part.values() for q in qs}
    assert not known & {(q.question, tuple(q.choices)) for q in transfer}  # every transfer question is new
    splits = make_splits(cmmlu, seed=0, val=0.1, test=0.3)
    assert sorted(splits["transfer"]) == sorted(q.id for q in transfer)
    without = make_splits(load_cmmlu(write_task(tmp_path / "plain", seed=0, n_test=60, n_dev=5)), seed=0, val=0.1,
                          test=0.3)
    assert all(splits[s] == without[s] for s in ("train", "val", "test"))  # the transfer set moves no question


def test_teacher_questions_are_answered_and_none_is_in_the_task(tmp_path):
    write_task(tmp_path / "task", seed=0, n_test=60, n_dev=5, n_transfer=30)
    cmmlu = load_cmmlu(tmp_path / "task")
    own = teacher_questions(tmp_path / "task", 200, seed=0)
    assert len(own) == 200 * len(DEFAULT_KINDS) and {q.subject for q in own} == set(cmmlu.subjects)
    assert all(q.answer in "ABCD" for q in own) and len({(q.question, q.choices) for q in own}) == len(own)
    task = {(q.question, tuple(q.choices))
            for part in (cmmlu.dev, cmmlu.test, cmmlu.transfer) for qs in part.values() for q in qs}
    assert not task & {(q.question, tuple(q.choices)) for q in own}  # nothing evaluated or labelled by the student
    assert [q.id for q in teacher_questions(tmp_path / "task", 200, seed=0)] == [q.id for q in own]  # seeded


def test_transfer_task_copy_keeps_the_splits_and_adds_factor_x_train(tmp_path):
    write_task(tmp_path / "task", seed=0, n_test=60, n_dev=5)
    cmmlu = load_cmmlu(tmp_path / "task")
    write_json_atomic(tmp_path / "splits.json", make_splits(cmmlu, seed=0, val=0.1, test=0.3))
    splits = load_splits(tmp_path / "splits.json")
    data, grown_splits = write_transfer_task(tmp_path / "task", tmp_path / "splits.json", tmp_path / "t2", 2, seed=9)
    grown = load_splits(grown_splits)
    assert all(grown[s] == splits[s] for s in ("train", "val", "test"))
    copy = load_cmmlu(data)
    per_subject = max(sum(q.subject == s for q in split_questions(cmmlu, splits, "train")) for s in cmmlu.subjects)
    assert len(grown["transfer"]) == 2 * per_subject * len(cmmlu.subjects)
    new = split_questions(copy, grown, "transfer")
    assert all(q.answer is None for q in new)
    old = {(q.question, tuple(q.choices)) for qs in cmmlu.test.values() for q in qs}
    assert not old & {(q.question, tuple(q.choices)) for q in new}
    with pytest.raises(KDError, match="would overwrite its input"):
        write_transfer_task(data, grown_splits, tmp_path / "t2", 1, seed=9)
    # a task that has a transfer set of its own: the copy gets only the new one
    data3, splits3 = write_transfer_task(data, grown_splits, tmp_path / "t3", 1, seed=9)
    assert len(load_splits(splits3)["transfer"]) == per_subject * len(cmmlu.subjects)
    assert len(load_cmmlu(data3).transfer_questions()) == per_subject * len(cmmlu.subjects)


def test_transfer_task_with_scarce_labels_keeps_n_train_per_subject(tmp_path):
    write_task(tmp_path / "task", seed=0, n_test=60, n_dev=5)
    cmmlu = load_cmmlu(tmp_path / "task")
    write_json_atomic(tmp_path / "splits.json", make_splits(cmmlu, seed=0, val=0.1, test=0.3))
    splits = load_splits(tmp_path / "splits.json")
    data, scarce_path = write_transfer_task(tmp_path / "task", tmp_path / "splits.json", tmp_path / "s", 3, seed=9,
                                            labels=4)
    scarce = load_splits(scarce_path)
    assert scarce["val"] == splits["val"] and scarce["test"] == splits["test"]
    assert set(scarce["train"]) < set(splits["train"])
    copy = load_cmmlu(data)
    train = split_questions(copy, scarce, "train")
    assert sorted(sum(q.subject == s for q in train) for s in copy.subjects) == [4] * len(copy.subjects)
    assert all(scarce["counts"][s]["train"] == 4 and scarce["counts"][s]["transfer"] == 12 for s in copy.subjects)
    assert len(scarce["transfer"]) == 3 * 4 * len(copy.subjects)
    with pytest.raises(KDError, match="fewer questions"):
        write_transfer_task(tmp_path / "task", tmp_path / "splits.json", tmp_path / "s2", 1, seed=9, labels=1000)


def test_generator_is_deterministic_distinct_and_kinds_independent():
    a, b = generate_task(seed=1, n_test=80), generate_task(seed=1, n_test=80)
    assert a == b
    assert generate_task(seed=2, n_test=80) != a
    only_words = generate_task(seed=1, n_test=80, kinds=("words",))
    assert only_words["elementary_chinese"] == a["elementary_chinese"]
    for subject, parts in a.items():
        stems = [it.question for it in parts["dev"] + parts["test"]]
        assert len(stems) == len(set(stems)) == 85
    with pytest.raises(KDError):
        generate_task(kinds=("nope",))


def test_written_task_loads_splits_without_overlap(tmp_path):
    from kd_mlx.data import check_no_leak

    write_task(tmp_path / "task", seed=0, n_test=120, n_dev=5)
    with open(tmp_path / "task" / "test" / "elementary_chinese.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["", "Question", "A", "B", "C", "D", "Answer"] and len(rows) == 121
    cmmlu = load_cmmlu(tmp_path / "task")
    assert cmmlu.subjects == sorted(TASK_KINDS[k][0] for k in DEFAULT_KINDS)
    splits = make_splits(cmmlu, seed=0, val=0.1, test=0.3)
    train = split_questions(cmmlu, splits, "train")
    held = split_questions(cmmlu, splits, "val") + split_questions(cmmlu, splits, "test")
    check_no_leak([q.id for q in train], splits)
    train_text = {q.question for q in train}
    assert train_text and held and not train_text & {q.question for q in held}
    dev_text = {q.question for qs in cmmlu.dev.values() for q in qs}
    assert not dev_text & {q.question for q in held}


# `python -m kd_mlx demo --quick` (seed 0), measured 2026-11-30: teacher 83.3 | baseline 25.0 | distilled 64.2 on 120
# held-out test questions (+39.2 points; validation 60.0% -> 67.5% -> 67.5%); asserted with 11 questions of slack
QUICK_MARGIN = 30.0


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    from click.testing import CliRunner

    from kd_mlx.demo import demo_cmd

    out = tmp_path / "demo"
    res = CliRunner().invoke(demo_cmd, ["--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    for name in ("teacher", "baseline", "distilled"):
        s = json.loads((out / "results" / name / "summary.json").read_text(encoding="utf-8"))
        assert s["overall"] == summary["overall"][name]
        assert 0.0 <= s["overall"] <= 100.0 and s["n_questions"] > 0
        assert f"{s['overall']:.2f}" in report or f"{s['overall']:.1f}" in report
    assert (out / "store" / "manifest.json").is_file() and (out / "run" / "best" / "adapters.safetensors").is_file()
    # the teacher streamed under a budget smaller than its weights
    assert summary["memory_budget"] < summary["teacher_bytes"]
    assert "$ python -m kd_mlx.teacher dump" in res.output and "report:" in res.output
    # the seeded quick run distils: QUICK_MARGIN is the measured margin less a few test questions of slack
    overall = summary["overall"]
    assert overall["distilled"] - overall["baseline"] >= QUICK_MARGIN, overall
    rows = [json.loads(ln) for ln in (out / "run" / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    vals = [r for r in rows if r["kind"] == "val"]
    # validation accuracy rises: the best checkpoint is not the first evaluation
    assert len(vals) >= 2 and max(vals, key=lambda r: r["val_acc"])["step"] != vals[0]["step"], vals


def test_demo_refuses_an_out_it_did_not_write(tmp_path):
    """The output-directory rule, before any compute: a directory of someone else's files is never touched, and a
    rerun over an earlier demo needs --overwrite."""
    from click.testing import CliRunner

    from kd_mlx.demo import demo_cmd
    from kd_mlx.utils import write_output_marker

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine", encoding="utf-8")
    res = CliRunner().invoke(demo_cmd, ["--quick", "--out", str(other), "--overwrite"])
    assert res.exit_code == 1 and "not kd_mlx demo output" in res.output and "Traceback" not in res.output
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    write_output_marker(earlier, "demo", {"quick": True})
    (earlier / "demo.json").write_text("{}", encoding="utf-8")
    res = CliRunner().invoke(demo_cmd, ["--quick", "--out", str(earlier)])
    assert res.exit_code == 1 and "--overwrite" in res.output and (earlier / "demo.json").read_text() == "{}"
