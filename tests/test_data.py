"""CMMLU data layer on fixtures written here: loading (dir, zip, hub cache), validation, prompts, fitting, splits."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_mlx.data import (
    CMMLU,
    SPLIT_NAMES,
    Prompt,
    build_prompt,
    check_no_leak,
    content_hash,
    count_tokens_batch,
    count_tokens_reference,
    fit_prompt,
    fit_prompts,
    load_cmmlu,
    load_splits,
    make_splits,
    parse_csv,
    split_questions,
    subject_table,
)
from kd_mlx.data.cli import main as data_cli
from kd_mlx.utils import KDError

REPO = Path(__file__).resolve().parents[1]
HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]

AGRONOMY_DEV = [
    ("下列作物中属于豆科的是", "小麦", "大豆", "玉米", "水稻", "B"),
    ("土壤酸碱度用什么表示", "pH值", "EC值", "CEC", "有机质含量", "A"),
    ('"三农"问题不包括', "农业", "农村", "农民, 农场", "工业", "D"),  # quotes and a comma: CSV quoting
]
AGRONOMY_TEST = [
    ("肥料三要素是指", "氮、磷、钾", "钙、镁、硫", "铁、锰、锌", "碳、氢、氧", "A"),
    ("下列哪项是\n多行题干", " 前有空格", "B项", "C项", "D项", "C"),  # a newline inside a quoted field
]


def csv_bytes(rows, header=HEADER) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for i, r in enumerate(rows):
        w.writerow([i, *r])
    return buf.getvalue().encode("utf-8")


def write_cmmlu(root: Path, data: dict[str, dict[str, list]]) -> Path:
    """data: {split: {subject: rows}} in the official layout root/dev/*.csv, root/test/*.csv."""
    for split, subjects in data.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in subjects.items():
            (root / split / f"{subject}.csv").write_bytes(rows if isinstance(rows, bytes) else csv_bytes(rows))
    return root


@pytest.fixture
def small(tmp_path) -> Path:
    return write_cmmlu(tmp_path / "cmmlu", {"dev": {"agronomy": AGRONOMY_DEV}, "test": {"agronomy": AGRONOMY_TEST}})


# ------------------------------------------------------------------------------------------------- loading


def test_load_dir_fields_and_ids(small):
    c = load_cmmlu(small)
    assert c.subjects == ["agronomy"] and len(c) == 2 and len(c.dev["agronomy"]) == 3
    q = c.test["agronomy"][1]
    assert q.question == "下列哪项是\n多行题干" and q.choices == (" 前有空格", "B项", "C项", "D项")
    assert (q.split, q.index, q.answer, q.answer_index) == ("test", 1, "C", 2)
    expect_hash = hashlib.sha1("\x1f".join(["下列哪项是\n多行题干", " 前有空格", "B项", "C项", "D项"]).encode()).hexdigest()[:12]
    assert q.id == f"agronomy/test/{expect_hash}" and c.by_id(q.id) is q
    assert c.dev["agronomy"][2].question == '"三农"问题不包括' and c.dev["agronomy"][2].choices[2] == "农民, 农场"
    with pytest.raises(KDError, match="not in the CMMLU data"):
        c.by_id("agronomy/test/000000000000")


def test_ids_do_not_depend_on_file_order_and_duplicates_are_numbered(tmp_path):
    rows = AGRONOMY_TEST + [AGRONOMY_TEST[0]]  # a verbatim copy, as CMMLU has in anatomy and logical
    a = load_cmmlu(write_cmmlu(tmp_path / "a", {"test": {"agronomy": rows}}))
    b = load_cmmlu(write_cmmlu(tmp_path / "b", {"test": {"agronomy": rows[::-1]}}))
    ids = [q.id for q in a.test["agronomy"]]
    assert ids[2] == ids[0] + "-2" and len(set(ids)) == 3
    assert sorted(ids) == sorted(q.id for q in b.test["agronomy"])
    assert a.test["agronomy"][2].content_key == a.test["agronomy"][0].content_key == ids[0].rsplit("/", 1)[1]


def test_bom_and_blank_lines_are_tolerated(tmp_path):
    data = b"\xef\xbb\xbf" + csv_bytes(AGRONOMY_TEST) + b"\r\n"
    c = load_cmmlu(write_cmmlu(tmp_path / "c", {"test": {"agronomy": data}}))
    assert [q.question for q in c.test["agronomy"]] == [r[0] for r in AGRONOMY_TEST]


def _zip_of(root: Path, zpath: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*.csv")):
            zf.write(p, prefix + p.relative_to(root).as_posix())
    return zpath


@pytest.mark.parametrize("prefix", ["", "cmmlu/"])
def test_load_zip_equals_dir(small, tmp_path, prefix):
    z = _zip_of(small, tmp_path / "cmmlu_v1_0_1.zip", prefix)
    a, b = load_cmmlu(small), load_cmmlu(z)
    assert a.test == b.test and a.dev == b.dev
    assert b.source == str(z)


def _hub_cache(small: Path, cache: Path) -> Path:
    """The huggingface_hub cache layout of a download of haonan-li/cmmlu: blobs, refs/main, snapshots/<commit>
    with links to the blobs (README.md, cmmlu.py, cmmlu_v1_0_1.zip, as the hub repo ships it)."""
    repo = cache / "datasets--haonan-li--cmmlu"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    zbytes = _zip_of(small, cache / "tmp.zip").read_bytes()
    (cache / "tmp.zip").unlink()
    files = {"cmmlu_v1_0_1.zip": zbytes, "README.md": b"# CMMLU\n", "cmmlu.py": b"# loading script\n"}
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return cache


def test_load_from_hub_cache_offline(small, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = _hub_cache(small, tmp_path / "hub")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    c = load_cmmlu("haonan-li/cmmlu")  # the real snapshot_download resolves refs/main in the cache
    assert c.test == load_cmmlu(small).test
    assert c.source.endswith("cmmlu_v1_0_1.zip")
    with pytest.raises(KDError, match="cannot fetch dataset other/repo"):
        load_cmmlu("other/repo")


def test_show_cli_from_hub_id_subprocess(small, tmp_path):
    cache = _hub_cache(small, tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "kd_mlx.data", "show", "--data", "haonan-li/cmmlu", "--subject",
                        "agronomy", "--index", "0", "--shots", "0"], capture_output=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode("utf-8") == build_prompt(load_cmmlu(small).test["agronomy"][0]).text


def test_missing_data_and_unknown_subject(tmp_path):
    with pytest.raises(KDError, match="CMMLU data not found"):
        load_cmmlu(tmp_path / "nope")
    with pytest.raises(KDError, match="not a CMMLU directory"):
        load_cmmlu(tmp_path)
    write_cmmlu(tmp_path / "x", {"test": {"not_a_subject": AGRONOMY_TEST}})
    with pytest.raises(KDError, match="unknown subject 'not_a_subject'"):
        load_cmmlu(tmp_path / "x")


def test_subject_table_is_complete():
    t = subject_table()
    assert len(t) == 67 and t["agronomy"]["zh"] == "农学"
    cats = {}
    for s, v in t.items():
        for c in v["categories"]:
            cats[c] = cats.get(c, 0) + 1
    assert cats == {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15, "China specific": 15}


# ----------------------------------------------------------------------------------------- malformed files

GOOD = csv_bytes(AGRONOMY_TEST)
# (case, bytes of test/agronomy.csv, line, reason). Line 2 holds a two-line quoted question, so row 2 is line 4.
MALFORMED = [
    ("missing column", csv_bytes(AGRONOMY_TEST, header=["", "Question", "A", "B", "C", "Answer"]), 1,
     "missing column(s) D (header must be ,Question,A,B,C,D,Answer)"),
    ("bad answer letter", GOOD.replace(b",D\xe9\xa1\xb9,C\r\n", b",D\xe9\xa1\xb9,E\r\n"), 3,
     "answer 'E' is not one of A, B, C, D"),
    ("empty option", csv_bytes([AGRONOMY_TEST[1], ("题", "甲", "乙", "", "丁", "A")]), 4, "empty option C"),
    ("empty question", csv_bytes([AGRONOMY_TEST[1], ("  ", "甲", "乙", "丙", "丁", "A")]), 4, "empty question"),
    ("invalid UTF-8", csv_bytes([AGRONOMY_TEST[1], ("题XX", "甲", "乙", "丙", "丁", "A")]).replace(b"XX", b"\xff\xfe"),
     4, "invalid UTF-8"),
    ("wrong number of columns", GOOD + "2,题,甲,乙,丙,丁,A,多余\r\n".encode(), 5, "expected 7 columns, found 8"),
]


@pytest.mark.parametrize("case,data,line,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_row_one_line_error(tmp_path, case, data, line, reason):
    root = write_cmmlu(tmp_path / "bad", {"dev": {"agronomy": AGRONOMY_DEV}, "test": {"agronomy": data}})
    r = CliRunner().invoke(data_cli, ["show", "--data", str(root), "--subject", "agronomy", "--shots", "0"])
    assert r.exit_code == 1
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"error: {root / 'test' / 'agronomy.csv'}:{line}: {reason}"


def test_malformed_subprocess_no_traceback(tmp_path):
    root = write_cmmlu(tmp_path / "bad", {"test": {"agronomy": MALFORMED[4][1]}})
    r = subprocess.run([sys.executable, "-m", "kd_mlx.data", "split", "--data", str(root), "--out",
                        str(tmp_path / "s.json")], capture_output=True, cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: ") and "agronomy.csv:4: invalid UTF-8" in err
    assert not (tmp_path / "s.json").exists()  # nothing half-written


def test_skip_bad_reports_and_continues(tmp_path):
    rows = csv_bytes([("坏题", "甲", "", "丙", "丁", "A"), AGRONOMY_TEST[0], ("题", "甲", "乙", "丙", "丁", "X")])
    root = write_cmmlu(tmp_path / "bad", {"dev": {"agronomy": AGRONOMY_DEV}, "test": {"agronomy": rows}})
    c = load_cmmlu(root, skip_bad=True)
    assert [q.question for q in c.test["agronomy"]] == [AGRONOMY_TEST[0][0]]
    assert [(s.line, s.reason) for s in c.skipped] == [(2, "empty option B"), (4, "answer 'X' is not one of A, B, C, D")]
    r = CliRunner().invoke(data_cli, ["show", "--data", str(root), "--subject", "agronomy", "--shots", "0",
                                      "--skip-bad"])
    assert r.exit_code == 0
    assert r.stdout == build_prompt(c.test["agronomy"][0]).text
    assert "skipped 2 bad row(s)" in r.stderr and f"{root / 'test' / 'agronomy.csv'}:4: answer 'X'" in r.stderr


def test_unterminated_quote_is_a_one_line_error(tmp_path):
    data = GOOD + '2,"未闭合的引号,甲,乙,丙,丁,A\r\n'.encode()
    with pytest.raises(KDError, match=r"agronomy.csv:5: malformed CSV"):
        parse_csv(data, "agronomy.csv", "agronomy", "test")


_field = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_field, _field, _field, _field, _field, st.sampled_from("ABCD")), min_size=1, max_size=6))
def test_csv_quoting_round_trip(rows):
    """Any text (quotes, commas, newlines, CR, Chinese) written by a CSV writer reads back exactly."""
    qs = parse_csv(csv_bytes(rows), "x.csv", "agronomy", "test")
    assert [(q.question, *q.choices, q.answer) for q in qs] == [tuple(r) for r in rows]
    assert [q.index for q in qs] == list(range(len(rows)))


# --------------------------------------------------------------------------------------------------- prompts

ZERO_SHOT = ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
             "题目：肥料三要素是指\nA. 氮、磷、钾\nB. 钙、镁、硫\nC. 铁、锰、锌\nD. 碳、氢、氧\n答案是：")
TWO_SHOT = ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
            "题目：下列作物中属于豆科的是\nA. 小麦\nB. 大豆\nC. 玉米\nD. 水稻\n答案是：B\n\n"
            "题目：土壤酸碱度用什么表示\nA. pH值\nB. EC值\nC. CEC\nD. 有机质含量\n答案是：A\n\n"
            "题目：肥料三要素是指\nA. 氮、磷、钾\nB. 钙、镁、硫\nC. 铁、锰、锌\nD. 碳、氢、氧\n答案是：")


def test_prompt_zero_and_two_shot_exact(small):
    c = load_cmmlu(small)
    q, dev = c.test["agronomy"][0], c.dev["agronomy"]
    p0 = build_prompt(q)
    assert p0.text == ZERO_SHOT and p0.shots == 0
    assert p0.prefix == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    p2 = fit_prompt(q, dev, 2, None, None)
    assert p2.text == TWO_SHOT and p2.shots == 2
    assert p2.suffix == ZERO_SHOT[len(p0.prefix):]
    # the prefix is the same for every question of the subject (the teacher reuses its cache over it)
    assert fit_prompt(c.test["agronomy"][1], dev, 2, None, None).prefix == p2.prefix
    assert p2.text.encode("utf-8") == TWO_SHOT.encode("utf-8")
    # the CLI prints exactly that, nothing else
    r = CliRunner().invoke(data_cli, ["show", "--data", str(small), "--subject", "agronomy", "--index", "0",
                                      "--shots", "2"])
    assert r.exit_code == 0 and r.stdout_bytes == TWO_SHOT.encode("utf-8")


def test_prompt_keeps_option_whitespace_and_newlines(small):
    q = load_cmmlu(small).test["agronomy"][1]
    assert build_prompt(q).suffix == "题目：下列哪项是\n多行题干\nA.  前有空格\nB. B项\nC. C项\nD. D项\n答案是："


def test_cot_prompt_exact(small):
    c = load_cmmlu(small)
    p = build_prompt(c.test["agronomy"][0], c.dev["agronomy"][:1], cot=True)
    assert p.text == ("以下是关于农学的单项选择题，请分析并选出正确答案。\n\n"
                      "题目：下列作物中属于豆科的是\nA. 小麦\nB. 大豆\nC. 玉米\nD. 水稻\n答案是：B\n\n"
                      "题目：肥料三要素是指\nA. 氮、磷、钾\nB. 钙、镁、硫\nC. 铁、锰、锌\nD. 碳、氢、氧\n逐步分析并给出答案选项。")


def _long_dev(tmp_path) -> CMMLU:
    dev = [AGRONOMY_DEV[0], ("很长的题目" * 60, "甲", "乙", "丙", "丁", "C"), AGRONOMY_DEV[1],
           ("中等长度的题目" * 5, "甲", "乙", "丙", "丁", "A")]
    return load_cmmlu(write_cmmlu(tmp_path / "long", {"dev": {"agronomy": dev}, "test": {"agronomy": AGRONOMY_TEST}}))


def test_fit_drops_longest_shot_first(tmp_path, phi_tok):
    c = _long_dev(tmp_path)
    q, dev = c.test["agronomy"][0], c.dev["agronomy"]
    s0, s_long, s2, s_mid = dev
    for count in (len, lambda t: len(phi_tok.encode(t))):  # characters (hand-checkable) and real Phi tokens
        full = build_prompt(q, dev)
        assert fit_prompt(q, dev, 4, count, count(full.text)).text == full.text  # fits: untouched
        no_long = build_prompt(q, [s0, s2, s_mid])
        p = fit_prompt(q, dev, 4, count, count(no_long.text))
        assert p == no_long and p.shots == 3
        # one token/char less: the medium one goes next, order of the others kept
        p = fit_prompt(q, dev, 4, count, count(no_long.text) - 1)
        assert p.text == build_prompt(q, [s0, s2]).text
        # not even the 0-shot prompt fits: the header goes too (official), the question block stays whole
        p = fit_prompt(q, dev, 4, count, count(ZERO_SHOT) - 1)
        assert p == Prompt("", build_prompt(q).suffix, 0)
    # hand count: 4 shots of which the long one is 300 characters of question
    assert len(build_prompt(q, dev).text) - len(no_long.text) == len("题目：" + "很长的题目" * 60 +
                                                                    "\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案是：C\n\n")


def test_fit_ties_drop_the_later_shot(tmp_path):
    c = load_cmmlu(write_cmmlu(tmp_path / "t", {
        "dev": {"agronomy": [("题一", "甲", "乙", "丙", "丁", "A"), ("题二", "甲", "乙", "丙", "丁", "B")]},
        "test": {"agronomy": AGRONOMY_TEST}}))
    q, (a, b) = c.test["agronomy"][0], c.dev["agronomy"]
    p = fit_prompt(q, [a, b], 2, len, len(build_prompt(q, [a]).text))
    assert p == build_prompt(q, [a])


def test_fit_errors(small):
    c = load_cmmlu(small)
    with pytest.raises(KDError, match="has 3 dev examples, cannot take 5 shots"):
        fit_prompt(c.test["agronomy"][0], c.dev["agronomy"], 5, None, None)
    r = CliRunner().invoke(data_cli, ["show", "--data", str(small), "--subject", "agronomy", "--max-tokens", "9"])
    assert r.exit_code == 1 and r.stderr.strip() == "error: --max-tokens needs --tokenizer (tokens are counted with it)"
    r = CliRunner().invoke(data_cli, ["show", "--data", str(small), "--subject", "agronomy", "--index", "2",
                                      "--shots", "0"])
    assert r.exit_code == 1 and "--index 2 out of range: agronomy has 2 test questions" in r.stderr


def test_show_token_count_to_stderr(small, phi_tok_dir, phi_tok):
    r = CliRunner().invoke(data_cli, ["show", "--data", str(small), "--subject", "agronomy", "--shots", "2",
                                      "--tokenizer", str(phi_tok_dir), "--max-tokens", "2048"])
    assert r.exit_code == 0 and r.stdout == TWO_SHOT
    assert r.stderr.strip() == f"tokens: {len(phi_tok.encode(TWO_SHOT))}; shots: 2/2; max_tokens: 2048"


def test_fit_prompts_batch_equals_reference(tmp_path, phi_tok, kimi_tok):
    c = _long_dev(tmp_path)
    qs = c.test["agronomy"]
    for tok in (phi_tok, kimi_tok):
        texts = [build_prompt(q, c.dev["agronomy"][:k]).text for q in qs for k in range(5)]
        assert count_tokens_batch(tok, texts, 1) == count_tokens_reference(tok, texts, 1)
        for max_tokens in (50, 120, 200, 400, 10_000):
            ref = [fit_prompt(q, c.dev["agronomy"], 4, lambda t: len(tok.encode(t)) + 1, max_tokens) for q in qs]
            assert fit_prompts(qs, c.dev, 4, tok, max_tokens, extra_tokens=1) == ref


# ---------------------------------------------------------------------------------------------------- splits


def _split_fixture(root: Path, shuffle_seed: int | None = None) -> Path:
    rng = random.Random(shuffle_seed)
    agr = [(f"农学第{i}题：哪一项正确？", f"甲{i}", f"乙{i}", f"丙{i}", f"丁{i}", "ABCD"[i % 4]) for i in range(40)]
    ana = [(f"解剖学第{i}题", f"甲{i}", f"乙{i}", f"丙{i}", f"丁{i}", "ABCD"[i % 3]) for i in range(23)]
    shared = ("两个学科都有的题", "甲", "乙", "丙", "丁", "B")
    arts = [(f"艺术第{i}题", "甲", "乙", "丙", f"丁{i}", "A") for i in range(12)]
    arts += [arts[3], shared]  # a verbatim copy inside the subject, and one shared with astronomy
    astro = [(f"天文第{i}题", "甲", "乙", "丙", f"丁{i}", "D") for i in range(9)] + [shared]
    data = {"agronomy": agr, "anatomy": ana, "arts": arts, "astronomy": astro}
    if shuffle_seed is not None:
        data = {k: rng.sample(v, len(v)) for k, v in data.items()}
    dev = {k: [(f"{k}示例{i}", "甲", "乙", "丙", "丁", "A") for i in range(5)] for k in data}
    return write_cmmlu(root, {"dev": dev, "test": data})


def _no_source(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "source"}


def test_splits_deterministic_under_shuffled_files(tmp_path):
    a = make_splits(load_cmmlu(_split_fixture(tmp_path / "a")), seed=0)
    for shuffle in (1, 2):
        b = make_splits(load_cmmlu(_split_fixture(tmp_path / f"b{shuffle}", shuffle)), seed=0)
        assert b == a
    c = make_splits(load_cmmlu(_split_fixture(tmp_path / "a")), seed=1)
    assert c["test"] != a["test"]


def test_splits_stratified_disjoint_complete(tmp_path):
    cm = load_cmmlu(_split_fixture(tmp_path / "a"))
    s = make_splits(cm, seed=0, val=0.1, test=0.2)
    # exact per-subject proportions (round half up) where no duplicates intervene
    assert s["counts"]["agronomy"] == {"train": 28, "val": 4, "test": 8}
    assert s["counts"]["anatomy"] == {"train": 16, "val": 2, "test": 5}   # 23*0.2=4.6 -> 5, 2.3 -> 2
    for subject, c in s["counts"].items():
        in_subject = {n: sum(1 for i in s[n] if i.startswith(subject + "/")) for n in SPLIT_NAMES}
        assert in_subject == c and sum(c.values()) == len(cm.test[subject])
    sets = [set(s[n]) for n in SPLIT_NAMES]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == {q.id for q in cm.test_questions()}
    assert all("/dev/" not in i for i in set().union(*sets))
    assert s["n_questions"] == len(cm) and s["fractions"] == {"train": 0.7, "val": 0.1, "test": 0.2}
    check_no_leak(s["train"], s)


def test_duplicate_copies_share_a_split(tmp_path):
    cm = load_cmmlu(_split_fixture(tmp_path / "a"))
    for seed in range(6):
        s = make_splits(cm, seed=seed)
        where = {i: n for n in SPLIT_NAMES for i in s[n]}
        by_key: dict[str, set] = {}
        for q in cm.test_questions():
            by_key.setdefault(q.content_key, set()).add(where[q.id])
        assert all(len(v) == 1 for v in by_key.values())
    assert sum(1 for q in cm.test_questions() if q.content_key == content_hash("两个学科都有的题", ("甲", "乙", "丙", "丁"))) == 2


def test_check_no_leak(tmp_path):
    cm = load_cmmlu(_split_fixture(tmp_path / "a"))
    s = make_splits(cm)
    with pytest.raises(KDError, match=r"^3 training question\(s\) belong to evaluation split\(s\) val/test, e.g. "):
        check_no_leak(s["train"] + s["val"][:2] + s["test"][:1], s)
    with pytest.raises(KDError) as e:
        check_no_leak(s["test"][5:6] + s["train"], s)
    assert str(e.value).startswith("1 training question(s)") and f"e.g. {s['test'][5]} (in 'test')" in str(e.value)
    check_no_leak(s["val"], s, eval_splits=("test",))  # training on val is fine when only test is guarded
    # a verbatim copy of an evaluation question is a leak even under another id
    copy = next(q for q in cm.test["arts"] if q.id.endswith("-2"))
    fake = {"train": [copy.id], "val": [], "test": [copy.id[:-2]]}
    with pytest.raises(KDError, match="1 training question"):
        check_no_leak(fake["train"], fake)


def test_split_cli_load_splits_split_questions(tmp_path):
    root = _split_fixture(tmp_path / "a")
    out = tmp_path / "out" / "splits.json"
    (tmp_path / "cfg.yaml").write_text("seed: 3\nval: 0.25\n")
    r = CliRunner().invoke(data_cli, ["split", "--config", str(tmp_path / "cfg.yaml"), "--data", str(root),
                                      "--out", str(out), "--test", "0.3"])
    assert r.exit_code == 0, r.output
    s = load_splits(out)
    cm = load_cmmlu(root)
    assert _no_source(s) == make_splits(cm, seed=3, val=0.25, test=0.3)
    cfg = json.loads((tmp_path / "out" / "splits.config.json").read_text())
    assert (cfg["seed"], cfg["val"], cfg["test"]) == (3, 0.25, 0.3)
    val = split_questions(cm, s, "val")
    assert [q.id for q in val] == s["val"] and all(q.split == "test" for q in val)
    assert len(split_questions(cm, s, ["train", "test"])) == len(s["train"]) + len(s["test"])
    other = load_cmmlu(write_cmmlu(tmp_path / "other", {"test": {"agronomy": AGRONOMY_TEST}}))
    with pytest.raises(KDError, match="not in the data"):
        split_questions(other, s, "test")


def test_split_errors(tmp_path):
    root = _split_fixture(tmp_path / "a")
    r = CliRunner().invoke(data_cli, ["split", "--data", str(root), "--out", str(tmp_path / "s.json"),
                                      "--val", "0.6", "--test", "0.5"])
    assert r.exit_code == 1 and r.stderr.strip() == "error: val + test fractions must be at most 1, got 0.6 + 0.5"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["a/test/1"], "val": ["a/test/1"], "test": []}))
    with pytest.raises(KDError, match="in both 'train' and 'val'"):
        load_splits(bad)
    bad.write_text("{not json")
    with pytest.raises(KDError, match="not valid JSON"):
        load_splits(bad)
    with pytest.raises(KDError, match="splits file not found"):
        load_splits(tmp_path / "missing.json")


def test_show_wants_a_tokenizer_directory(small, tmp_path, phi_tok_dir, phi_tok):
    r = CliRunner().invoke(data_cli, ["show", "--data", str(small), "--subject", "agronomy", "--shots", "0",
                                      "--tokenizer", str(phi_tok_dir)])
    assert r.exit_code == 0 and r.stdout == ZERO_SHOT
    assert r.stderr.strip() == f"tokens: {len(phi_tok.encode(ZERO_SHOT))}; shots: 0/0"
    r = CliRunner().invoke(data_cli, ["show", "--data", str(small), "--subject", "agronomy", "--tokenizer", "gpt2"])
    assert r.exit_code == 1 and r.stderr.startswith("error: tokenizer directory not found: gpt2")


# ------------------------------------------------------------------------------------------------- transfer sets


TRANSFER_ROWS = [  # the user's own questions: no answer (empty), one with an answer
    ("水稻属于哪一科", "禾本科", "豆科", "茄科", "十字花科", ""),
    ("下列哪种是氮肥", "尿素", "过磷酸钙", "氯化钾", "石灰", "A"),
]


def test_transfer_set_loads_without_answers_and_is_its_own_split(small, tmp_path):
    write_cmmlu(small, {"transfer": {"agronomy": TRANSFER_ROWS}})
    # a second subject's file without an Answer column at all
    (small / "transfer" / "genetics.csv").write_bytes(
        csv_bytes([("显性基因用什么表示", "大写字母", "小写字母", "数字", "希腊字母")], header=HEADER[:-1]))
    (small / "subjects.json").write_text(json.dumps({"genetics": {"zh": "遗传学", "categories": ["STEM"]}}),
                                         encoding="utf-8")
    c = load_cmmlu(small)
    tq = c.transfer_questions()
    assert [q.answer for q in tq] == [None, "A", None] and [q.answer_index for q in tq] == [-1, 0, -1]
    assert [q.split for q in tq] == ["transfer"] * 3 and tq[0].id.startswith("agronomy/transfer/")
    assert c.subjects == ["agronomy"]  # transfer subjects are not test subjects
    assert c.by_id(tq[2].id).subject == "genetics" and c.subjects_table["genetics"]["categories"] == ["STEM"]
    splits = make_splits(c, seed=0, val=0.5, test=0.0)
    assert splits["transfer"] == sorted(q.id for q in tq)
    assert splits["n_questions"] == len(AGRONOMY_TEST) and splits["counts"]["genetics"]["transfer"] == 1
    p = tmp_path / "splits.json"
    p.write_text(json.dumps(splits))
    assert [q.id for q in split_questions(c, load_splits(p), "transfer")] == splits["transfer"]
    # the teacher can label them: the official prompt, with the data directory's own subject name in the header
    g = build_prompt(tq[2], [])
    assert g.text.startswith("以下是关于遗传学的单项选择题") and g.text.endswith("D. 希腊字母\n答案是：")
    # a bad answer in a transfer file is still an error (empty is allowed, "E" is not)
    write_cmmlu(small, {"transfer": {"agronomy": [("题", "a", "b", "c", "d", "E")]}})
    with pytest.raises(KDError, match=r"agronomy.csv:2: answer 'E' is not one of A, B, C, D \(or empty"):
        load_cmmlu(small)


def test_transfer_copy_of_an_evaluated_question_is_refused(small):
    q = AGRONOMY_TEST[0]
    write_cmmlu(small, {"transfer": {"agronomy": [(*q[:5], "")]}})
    c = load_cmmlu(small)
    with pytest.raises(KDError, match="transfer question\\(s\\) repeat a val/test question"):
        make_splits(c, seed=0, val=0.0, test=1.0)
    # the training guard by content covers transfer ids as well
    splits = make_splits(c, seed=0, val=0.0, test=0.0)  # all in train: no evaluated copy, accepted
    check_no_leak(splits["transfer"], splits, ["val", "test"])
    with pytest.raises(KDError, match="evaluation split"):
        check_no_leak(splits["transfer"], {**splits, "test": splits["train"]}, ["test"])


def test_own_subjects_load_with_their_subjects_json(tmp_path):
    root = write_cmmlu(tmp_path / "own", {"dev": {"my_domain": AGRONOMY_DEV}, "test": {"my_domain": AGRONOMY_TEST}})
    with pytest.raises(KDError, match="unknown subject 'my_domain'.*subjects.json"):
        load_cmmlu(root)
    (root / "subjects.json").write_text(json.dumps({"my_domain": {"zh": "我的领域"}}), encoding="utf-8")
    c = load_cmmlu(root)
    p = fit_prompt(c.test["my_domain"][0], c.dev["my_domain"], 1, None, None)
    assert p.prefix.startswith("以下是关于我的领域的单项选择题，请直接给出正确答案的选项。\n\n题目：下列作物中属于豆科的是")
    assert c.subjects_table["my_domain"]["categories"] == [] and "agronomy" in c.subjects_table
    (root / "subjects.json").write_text(json.dumps({"my_domain": {"name": "x"}}), encoding="utf-8")
    with pytest.raises(KDError, match="needs"):
        load_cmmlu(root)


def test_check_shots_names_the_subject_short_of_dev_rows(small):
    c = load_cmmlu(small)
    c.check_shots({"agronomy"}, 3)
    with pytest.raises(KDError, match="subject agronomy has 3 dev row\\(s\\).*fewer than the 4 shots"):
        c.check_shots({"agronomy"}, 4)
