"""Tests for kd_mlx.eval / `python -m kd_mlx.eval`: the official CMMLU protocol on a tiny Phi-shaped model.

Run: python -m pytest -q tests/test_eval.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from kd_mlx.utils import KDError

# Hand-written CMMLU-format fixture: three real subjects (their Chinese names go into the header), 5 dev each.
DEV = {
    "agronomy": [
        ("水稻属于哪一类作物", "粮食作物", "油料作物", "纤维作物", "糖料作物", "A"),
        ("下列哪种肥料属于氮肥", "过磷酸钙", "尿素", "氯化钾", "石灰", "B"),
        ("小麦的主要病害之一是", "稻瘟病", "玉米螟", "锈病", "棉铃虫", "C"),
        ("土壤酸碱度通常用什么表示", "温度", "湿度", "盐度", "pH值", "D"),
        ("下列哪种动物是反刍动物", "牛", "猪", "鸡", "兔", "A"),
    ],
    "anatomy": [
        ("人体最大的器官是", "肝脏", "皮肤", "心脏", "肺", "B"),
        ("成人骨骼一般有多少块", "106", "156", "206", "306", "C"),
        ("心脏有几个腔", "两个", "三个", "五个", "四个", "D"),
        ("红细胞的主要功能是", "运输氧气", "凝血", "免疫", "分泌激素", "A"),
        ("大脑分为左右两个", "半球", "脑叶", "脑干", "小脑", "A"),
    ],
    "arts": [
        ("《蒙娜丽莎》的作者是", "毕加索", "达·芬奇", "梵高", "莫奈", "B"),
        ("京剧中扮演女性角色的行当是", "生", "净", "旦", "丑", "C"),
        ("《二泉映月》是用什么乐器演奏的", "琵琶", "古筝", "笛子", "二胡", "D"),
        ("中国书法中的“书圣”指的是", "王羲之", "颜真卿", "柳公权", "欧阳询", "A"),
        ("油画起源于哪个地区", "亚洲", "欧洲", "非洲", "美洲", "B"),
    ],
}
TEST = {
    "agronomy": [
        ("玉米原产于哪个大洲", "亚洲", "欧洲", "美洲", "非洲", "C"),
        ("下列哪种作物是豆科植物，能够通过根瘤固定空气中的氮", "大豆", "小麦", "水稻", "高粱", "A"),
        ("蜜蜂在农业中的主要作用是", "除草", "授粉", "松土", "灭虫", "B"),
        ("温室大棚的主要作用是", "降低温度", "保持温度和湿度", "增加风速", "减少光照", "B"),
    ],
    "anatomy": [
        ("人体内负责过滤血液、产生尿液的器官是", "肾脏", "胃", "脾", "胆囊", "A"),
        ("膝关节属于", "不动关节", "微动关节", "滑膜关节", "软骨连结", "C"),
        ("胰岛素由哪个器官分泌", "甲状腺", "胰腺", "肾上腺", "垂体", "B"),
    ],
    "arts": [
        ("《清明上河图》的作者是", "张择端", "吴道子", "顾恺之", "王希孟", "A"),
        ("交响乐团中音域最低的弦乐器通常是", "小提琴", "中提琴", "大提琴", "低音提琴", "D"),
    ],
}
ZH = {"agronomy": "农学", "anatomy": "解剖学", "arts": "艺术学"}
LETTERS = "ABCD"


def write_cmmlu(root: Path, dev: dict = DEV, test: dict = TEST) -> Path:
    for split, table in (("dev", dev), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in table.items():
            with open(root / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, r in enumerate(rows):
                    w.writerow([i, *r])
    return root


def official_prompt(subject: str, shots: list[tuple], q: tuple) -> str:
    """The CMMLU prompt written out here from the paper's format, independently of kd_mlx.data."""

    def block(r):
        return f"题目：{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\n答案是："

    text = f"以下是关于{ZH[subject]}的单项选择题，请直接给出正确答案的选项。\n\n"
    text += "".join(block(s) + s[5] + "\n\n" for s in shots)
    return text + block(q)


@pytest.fixture(scope="module")
def peaked_phi(tmp_path_factory) -> Path:
    """tiny Phi-shaped model (real Phi tokenizer) with its head scaled up: peaked, decisive letter logits."""
    import mlx.core as mx

    from kd_mlx.testing.models import tiny_phi_dir

    d = tiny_phi_dir(tmp_path_factory.mktemp("phi"), seed=3, n_layers=2, hidden=64, heads=4)
    w = mx.load(str(d / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"] * 40.0
    w["lm_head.bias"] = w["lm_head.bias"] * 0.0
    mx.save_safetensors(str(d / "model.safetensors"), w)
    return d


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory) -> Path:
    return write_cmmlu(tmp_path_factory.mktemp("cmmlu"))


@pytest.fixture(scope="module")
def loaded(peaked_phi):
    from kd_mlx.eval import load_eval_model

    return load_eval_model(str(peaked_phi))


def direct_letter_logits(model, tokenizer, text: str) -> np.ndarray:
    """A separate plain forward: logits of " A".." D"-free letters (ids of "A".."D") at the last prompt token."""
    import mlx.core as mx

    ids = tokenizer.encode(text)
    letter_ids = [tokenizer.encode("：" + c)[-1] for c in LETTERS]
    return np.array(model(mx.array(ids)[None])[0, -1, mx.array(letter_ids)])


# ------------------------------------------------------------------------------------------------ tokens
def test_answer_token_ids_real_tokenizers(phi_tok, kimi_tok):
    from kd_mlx.data import answer_token_ids

    # GPT-2 BPE (Phi) and cl100k (Kimi format) both keep each letter as its own token after the fullwidth colon,
    # and it is the same id as the bare letter: 32..35 in both vocabularies.
    assert answer_token_ids(phi_tok) == [32, 33, 34, 35]
    assert answer_token_ids(kimi_tok) == [32, 33, 34, 35]
    for tok in (phi_tok, kimi_tok):
        assert [tok.decode([i]) for i in answer_token_ids(tok)] == list(LETTERS)


def test_answer_token_ids_rejects_merging_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kd_mlx.data import answer_token_ids
    from kd_mlx.tokenizer import HFTokenizer

    # whitespace word-level: "答案是：A" is one unknown word, so no letter is a token of its own
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "A": 1, "B": 2, "C": 3, "D": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(KDError, match="not a single token"):
        answer_token_ids(HFTokenizer(tok, name="words"))


def test_prefix_boundary_tokenization_differs(phi_tok):
    """Why prefix reuse works on token ids of the full prompt: BPE merges "\\n\\n" differently at a cut."""
    prefix, suffix = "答案是：A\n\n", "题目：水稻"
    assert phi_tok.encode(prefix) + phi_tok.encode(suffix) != phi_tok.encode(prefix + suffix)


# ------------------------------------------------------------------------------------------------ metrics
def test_summary_by_hand():
    from kd_mlx.eval import summarize_scores

    table = {"a": {"categories": ["STEM"]}, "b": {"categories": ["STEM", "China specific"]},
             "c": {"categories": ["Humanities"]}}
    s = summarize_scores({"a": [True, True, False, False], "b": [True, False, False], "c": [True]}, table)
    assert s["subjects"] == pytest.approx({"a": 50.0, "b": 100 / 3, "c": 100.0})
    assert s["overall"] == pytest.approx((50 + 100 / 3 + 100) / 3)  # unweighted over subjects, not questions
    assert s["categories"] == pytest.approx({"STEM": (50 + 100 / 3) / 2, "China specific": 100 / 3,
                                             "Humanities": 100.0})
    assert s["n"] == {"a": 4, "b": 3, "c": 1}


def test_calibration_by_hand():
    from kd_mlx.eval import calibration

    probs = np.array([[0.9, 0.05, 0.03, 0.02],   # conf .9, right
                      [0.1, 0.85, 0.03, 0.02],   # conf .85, wrong (answer A)
                      [0.3, 0.3, 0.35, 0.05],    # conf .35, right
                      [0.25, 0.25, 0.25, 0.25]])  # conf .25 -> argmax A, right
    answers = np.array([0, 0, 2, 0])
    c = calibration(probs, answers)
    # bins: (0.8,0.9] holds .9 and .85 (acc .5, conf .875); (0.3,0.4] .35 (acc 1); (0.2,0.3] .25 (acc 1)
    ece = 2 / 4 * abs(0.5 - 0.875) + 1 / 4 * abs(1 - 0.35) + 1 / 4 * abs(1 - 0.25)
    assert c["ece"] == pytest.approx(ece)
    brier = np.mean([0.1**2 + 0.05**2 + 0.03**2 + 0.02**2, 0.9**2 + 0.85**2 + 0.03**2 + 0.02**2,
                     0.3**2 + 0.3**2 + 0.65**2 + 0.05**2, 0.75**2 + 3 * 0.25**2])
    assert c["brier"] == pytest.approx(brier)
    assert [b["count"] for b in c["bins"]] == [0, 0, 1, 1, 0, 0, 0, 0, 2, 0]


# ------------------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("shots", [0, 5])
def test_hand_checked_predictions_and_overall(peaked_phi, fixture_data, loaded, tmp_path, shots):
    """Predictions equal a separate direct forward on hand-built prompts; overall is hand-averaged from them."""
    from kd_mlx.eval import DEFAULTS, run_eval

    cfg = dict(DEFAULTS, model=str(peaked_phi), data=str(fixture_data), shots=shots, batch_size=3,
               out=str(tmp_path / "res"))
    res = run_eval(cfg, progress=False)

    expected_pred, acc = {}, {}
    for subject, rows in TEST.items():
        right = 0
        for i, q in enumerate(rows):
            text = official_prompt(subject, DEV[subject][:shots], q)
            logits = direct_letter_logits(loaded.model, loaded.tokenizer, text)
            expected_pred[(subject, i)] = LETTERS[int(logits.argmax())]
            right += expected_pred[(subject, i)] == q[5]
        acc[subject] = 100.0 * right / len(rows)
    got = {}
    for subject in TEST:
        with open(tmp_path / "res" / "subjects" / f"{subject}.csv", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                got[(subject, int(row["index"]))] = row["prediction"]
                assert row["answer"] == TEST[subject][int(row["index"])][5]
                assert int(row["shots"]) == shots
                assert float(row["confidence"]) == pytest.approx(
                    max(float(row[f"prob_{c}"]) for c in LETTERS), abs=1e-6)
    assert got == expected_pred
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["subjects"] == pytest.approx(acc)
    assert summary["overall"] == pytest.approx(sum(acc.values()) / 3)
    # agronomy: Other; anatomy: STEM; arts: Humanities (subjects.json)
    assert summary["categories"] == pytest.approx({"Other": acc["agronomy"], "STEM": acc["anatomy"],
                                                   "Humanities": acc["arts"]})
    assert summary["n"] == {"agronomy": 4, "anatomy": 3, "arts": 2}
    assert res.summary["overall"] == summary["overall"]
    assert 0 <= summary["calibration"]["ece"] <= 1 and summary["throughput"]["questions_per_s"] > 0
    assert json.loads((tmp_path / "res" / "config.json").read_text())["shots"] == shots


def _fixture_prompts(loaded, fixture_data, shots=5):
    from kd_mlx.data import load_cmmlu
    from kd_mlx.eval import build_prompt_ids

    cm = load_cmmlu(fixture_data)
    qs = [q for s in sorted(cm.test) for q in cm.test[s]]
    seqs, keys, _, _ = build_prompt_ids(qs, cm.dev, loaded.tokenizer, shots, 2048)
    return seqs, keys


def test_batched_and_prefix_reuse_equal_reference(loaded, fixture_data):
    """Fast path (right padding, shared-prefix KV cache) == plain one-at-a-time full forwards."""
    from kd_mlx.eval import ScoreStats, answer_token_ids, letter_logits_batched, letter_logits_reference

    from kd_mlx.eval import _split_head

    seqs, keys = _fixture_prompts(loaded, fixture_data)
    assert _split_head(loaded.model) is not None  # the head-at-last-token path is the one being compared
    assert len({len(s) for s in seqs}) > 3  # different lengths: padding is exercised
    ids = answer_token_ids(loaded.tokenizer)
    ref = letter_logits_reference(loaded.model, seqs, ids)
    assert ref.std() > 1.0  # peaked logits: the argmax comparison is meaningful
    for batch, reuse in [(1, True), (3, True), (4, False), (16, True)]:
        stats = ScoreStats()
        fast = letter_logits_batched(loaded.model, seqs, ids, groups=keys, batch_size=batch, reuse_prefix=reuse,
                                     pad_id=50256, stats=stats)
        np.testing.assert_allclose(fast, ref, atol=2e-3, rtol=1e-4)
        assert (fast.argmax(1) == ref.argmax(1)).all()
        if reuse:
            assert stats.prefix_tokens > 0 and stats.computed_tokens < sum(len(s) for s in seqs)
        if batch > 1:
            assert stats.padded_tokens > 0


def test_length_batches_by_hand():
    from kd_mlx.eval import _length_batches

    lengths = [100, 40, 90, 80, 74, 30, 35, 76]
    # longest first: 100, 90, 80, 76 (>= 75) | 74, ... (< 0.75*100 -> new batch) 74 | 40, 35, 30
    assert _length_batches(list(range(8)), lengths, 4) == [[0, 2, 3, 7], [4], [1, 6, 5]]
    assert _length_batches(list(range(8)), lengths, 2) == [[0, 2], [3, 7], [4], [1, 6], [5]]


def test_padding_value_does_not_matter(loaded, fixture_data):
    from kd_mlx.eval import answer_token_ids, letter_logits_batched

    seqs, keys = _fixture_prompts(loaded, fixture_data, shots=0)
    ids = answer_token_ids(loaded.tokenizer)
    a = letter_logits_batched(loaded.model, seqs, ids, batch_size=9, reuse_prefix=False, pad_id=0)
    b = letter_logits_batched(loaded.model, seqs, ids, batch_size=9, reuse_prefix=False, pad_id=12345)
    np.testing.assert_array_equal(a, b)


def test_shot_fitting_long_example(peaked_phi, fixture_data, loaded, tmp_path):
    """A very long dev example is dropped first when the prompt does not fit; the rest stay in order."""
    from kd_mlx.eval import DEFAULTS, run_eval

    long_q = "请阅读下面的材料并回答问题。" + "水稻是中国最重要的粮食作物之一，其种植历史悠久。" * 40
    dev = {s: list(v) for s, v in DEV.items()}
    dev["agronomy"][1] = (long_q, "甲", "乙", "丙", "丁", "B")
    root = write_cmmlu(tmp_path / "cm", dev, {"agronomy": TEST["agronomy"]})
    tok = loaded.tokenizer
    q = TEST["agronomy"][1]
    full = len(tok.encode(official_prompt("agronomy", dev["agronomy"], q)))
    without_long = dev["agronomy"][:1] + dev["agronomy"][2:]
    fitted = len(tok.encode(official_prompt("agronomy", without_long, q)))
    limit = (full + fitted) // 2  # 5 shots do not fit, 4 (without the long one) do
    assert fitted < limit < full
    cfg = dict(DEFAULTS, model=str(peaked_phi), data=str(root), shots=5, max_tokens=limit,
               out=str(tmp_path / "res"))
    run_eval(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "res" / "subjects" / "agronomy.csv", encoding="utf-8")))
    row = rows[1]
    assert int(row["shots"]) == 4 and int(row["n_tokens"]) == fitted
    logits = direct_letter_logits(loaded.model, tok, official_prompt("agronomy", without_long, q))
    assert row["prediction"] == LETTERS[int(logits.argmax())]
    assert all(int(r["n_tokens"]) <= limit for r in rows)


# ------------------------------------------------------------------------------------------------ CLI
def _cli(args):
    from click.testing import CliRunner

    from kd_mlx.eval import main

    return CliRunner().invoke(main, args)


def test_cli_runs_and_writes(peaked_phi, fixture_data, tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("shots: 0\nbatch_size: 2\n")
    r = _cli(["--config", str(cfg), "--model", str(peaked_phi), "--data", str(fixture_data),
              "--subjects", "arts,anatomy", "--out", str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["shots"] == 0 and saved["batch_size"] == 2 and saved["subjects"] == "arts,anatomy"
    assert sorted(p.name for p in (tmp_path / "r" / "subjects").iterdir()) == ["anatomy.csv", "arts.csv"]


@pytest.mark.parametrize("case", ["missing_data", "unknown_subject", "bad_shots", "missing_model"])
def test_cli_bad_input_one_line(peaked_phi, fixture_data, tmp_path, case):
    args = {"missing_data": ["--model", str(peaked_phi), "--data", str(tmp_path / "nope")],
            "unknown_subject": ["--model", str(peaked_phi), "--data", str(fixture_data), "--subjects", "alchemy"],
            "bad_shots": ["--model", str(peaked_phi), "--data", str(fixture_data), "--shots", "7"],
            "missing_model": ["--model", str(tmp_path / "nomodel"), "--data", str(fixture_data)]}[case]
    r = _cli(args + ["--out", str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert {"missing_data": "nope", "unknown_subject": "alchemy", "bad_shots": "shots",
            "missing_model": "nomodel"}[case] in lines[0]
    assert not (tmp_path / "r" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ teacher
@pytest.mark.slow
def test_streaming_teacher_eval_equals_in_memory(fixture_data, tmp_path):
    """The teacher path (StreamingTeacher under a budget, prefix passed once per group) gives the in-memory
    mlx-lm results on a tiny Kimi-K2-shaped model with the Kimi-format tokenizer."""
    from kd_mlx.data import load_cmmlu
    from kd_mlx.eval import evaluate_model, load_eval_model
    from kd_mlx.testing.models import tiny_kimi_k2_dir

    d = tiny_kimi_k2_dir(tmp_path / "kimi", n_layers=2)
    cm = load_cmmlu(fixture_data)
    qs = [q for s in sorted(cm.test) for q in cm.test[s]]
    mem = load_eval_model(str(d))
    streamed = load_eval_model(str(d), memory_budget=4 * 2**20)
    assert mem.kind == "mlx" and streamed.kind == "streaming"
    a = evaluate_model(mem, qs, cm.dev, shots=5, batch_size=4, progress=False)
    b = evaluate_model(streamed, qs, cm.dev, shots=5, batch_size=4, progress=False)
    assert [r.prediction for r in a.questions] == [r.prediction for r in b.questions]
    np.testing.assert_allclose([r.probs for r in a.questions], [r.probs for r in b.questions], atol=1e-4)
    assert a.summary["overall"] == b.summary["overall"]
    assert max(max(r.probs) for r in a.questions) > 0.4  # not uniform: the comparison means something


def test_adapters_from_training_are_applied(peaked_phi, fixture_data, loaded, tmp_path):
    """LoRA adapters in mlx-lm's format (RUN/best/adapters.safetensors + adapter_config.json) change the scores
    exactly as the LoRA model computed directly."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from kd_mlx.eval import DEFAULTS, run_eval

    model, _ = load_model(peaked_phi)
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc2"]}
    linear_to_lora_layers(model, 2, lora)
    mx.random.seed(7)
    params = {k: mx.random.normal(v.shape) * 0.5 for k, v in tree_flatten(model.parameters())
              if k.endswith(("lora_a", "lora_b"))}
    model.load_weights(list(params.items()), strict=False)
    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    mx.save_safetensors(str(best / "adapters.safetensors"), params)
    (best / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                          "lora_parameters": lora}))
    run_eval(dict(DEFAULTS, model=str(peaked_phi), adapters=str(best), data=str(fixture_data), shots=0,
                  subjects="anatomy,arts", out=str(tmp_path / "res")), progress=False)
    changed = 0
    for subject in ("anatomy", "arts"):
        rows = list(csv.DictReader(open(tmp_path / "res" / "subjects" / f"{subject}.csv", encoding="utf-8")))
        for row in rows:
            text = official_prompt(subject, [], TEST[subject][int(row["index"])])
            with_lora = direct_letter_logits(model, loaded.tokenizer, text)
            base = direct_letter_logits(loaded.model, loaded.tokenizer, text)
            probs = np.exp(with_lora - with_lora.max()) / np.exp(with_lora - with_lora.max()).sum()
            np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in LETTERS], probs, atol=1e-4)
            assert row["prediction"] == LETTERS[int(with_lora.argmax())]
            changed += int(np.abs(with_lora - base).max() > 1e-2)
    assert changed > 0  # the adapters really move the logits
    r = _cli(["--model", str(peaked_phi), "--adapters", str(tmp_path / "nowhere"), "--data", str(fixture_data),
              "--out", str(tmp_path / "r2"), "--quiet"])
    assert r.exit_code == 1 and "adapter" in r.output and len(r.output.strip().splitlines()) == 1


def test_dequantized_cpu_path_equals_quantized(fixture_data, tmp_path):
    """On CPU a quantized model runs dequantized in fp32 (fast path); it agrees with MLX's quantized matmul."""
    from kd_mlx.data import load_cmmlu
    from kd_mlx.eval import evaluate_model, load_eval_model
    from kd_mlx.testing.models import tiny_kimi_k2_dir

    d = tiny_kimi_k2_dir(tmp_path / "kimi4", bits=4, n_layers=2)
    cm = load_cmmlu(fixture_data)
    qs = [q for s in sorted(cm.test) for q in cm.test[s]]
    deq = load_eval_model(str(d), dequantize=True)
    quant = load_eval_model(str(d), dequantize=False)
    assert "QuantizedLinear" not in repr(deq.model) and "Quantized" in repr(quant.model)
    a = evaluate_model(deq, qs, cm.dev, shots=0, progress=False)
    b = evaluate_model(quant, qs, cm.dev, shots=0, progress=False)
    np.testing.assert_allclose([r.probs for r in a.questions], [r.probs for r in b.questions], atol=1e-4)
    assert [r.prediction for r in a.questions] == [r.prediction for r in b.questions]


def test_eval_on_a_split_of_splits_json(peaked_phi, fixture_data, tmp_path):
    """--splits/--split evaluates exactly the split's questions (here: the held-out test split)."""
    from kd_mlx.data import load_cmmlu, make_splits

    splits = make_splits(load_cmmlu(fixture_data), seed=0, val=0.3, test=0.3)
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    r = _cli(["--model", str(peaked_phi), "--data", str(fixture_data), "--splits", str(tmp_path / "splits.json"),
              "--split", "test", "--shots", "0", "--out", str(tmp_path / "r"), "--quiet"])
    assert r.exit_code == 0, r.output
    got = set()
    for f in (tmp_path / "r" / "subjects").iterdir():
        got |= {row["id"] for row in csv.DictReader(open(f, encoding="utf-8"))}
    assert got == set(splits["test"]) and 0 < len(got) < 9
    r = _cli(["--model", str(peaked_phi), "--data", str(fixture_data), "--split", "val", "--out",
              str(tmp_path / "r2"), "--quiet"])
    assert r.exit_code == 1 and "--splits" in r.output
