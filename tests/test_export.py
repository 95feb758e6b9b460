"""Tests for kd_mlx.export: fuse (logits equal base + LoRA), quantize (accuracy on fixture data), the model
directory and its card, `ask`, and a real mlx_lm.server answering chat-completions over HTTP.

    python -m pytest -q tests/test_export.py
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

from kd_mlx.utils import KDError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECT = "elementary_mathematics"  # 初等数学

# Fixture questions in CMMLU form (hand-written, answers spread over A-D), written as a CMMLU-format CSV. They use
# different words so that a tiny model can tell them apart after a few LoRA steps.
FIXTURE = [
    ("中国的首都是哪座城市？", "上海", "北京", "广州", "深圳", "B"),
    ("水在标准大气压下的沸点是多少摄氏度？", "100", "90", "80", "120", "A"),
    ("一年有几个季节？", "两个", "三个", "四个", "五个", "C"),
    ("太阳从哪个方向升起？", "西方", "北方", "南方", "东方", "D"),
    ("《红楼梦》的作者是谁？", "曹雪芹", "罗贯中", "施耐庵", "吴承恩", "A"),
    ("人体最大的器官是什么？", "心脏", "皮肤", "肝脏", "大脑", "B"),
    ("三角形的内角和是多少度？", "90度", "360度", "180度", "270度", "C"),
    ("光合作用主要吸收哪种气体？", "氧气", "氮气", "氢气", "二氧化碳", "D"),
    ("长城主要修建于哪个方向的边境？", "北方", "南方", "东方", "西方", "A"),
    ("熊猫主要吃什么？", "鱼", "竹子", "苹果", "米饭", "B"),
    ("地球绕太阳一周大约需要多久？", "一天", "一个月", "一年", "十年", "C"),
    ("铁在潮湿空气中容易发生什么变化？", "熔化", "蒸发", "发光", "生锈", "D"),
]
N_FIXTURE = len(FIXTURE)


def _fixture_rows(split: str) -> list[list[str]]:
    rows = FIXTURE if split == "test" else FIXTURE[:2]
    return [[str(i), *row] for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def fixture_cmmlu(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cmmlu_fixture")
    for split in ("dev", "test"):
        (d / split).mkdir()
        with open(d / split / f"{SUBJECT}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
            w.writerows(_fixture_rows(split))
    return d


@pytest.fixture(scope="module")
def fixture_questions(fixture_cmmlu):
    from kd_mlx.data import load_cmmlu

    return load_cmmlu(fixture_cmmlu).test[SUBJECT]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from kd_mlx.testing import tiny_phi_dir

    return tiny_phi_dir(tmp_path_factory.mktemp("student") / "phi", seed=0, n_layers=2, hidden=64, heads=4)


LORA_CONFIG = {"rank": 4, "scale": 2.0, "dropout": 0.0,
               "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1",
                        "mlp.fc2"]}


def _lora_model(student_dir: Path, seed: int):
    """The student with mlx-lm LoRA layers on every target of both layers; lora_b made non-zero (seeded)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(student_dir)
    model.freeze()
    linear_to_lora_layers(model, 2, LORA_CONFIG)
    mx.random.seed(seed)
    # mlx-lm initialises lora_b to zero (fused == base): give it values so the fuse test can fail
    new = [(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.trainable_parameters())
           if k.endswith("lora_b")]
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())
    return model


def _save_adapters(model, best: Path, run_config: dict | None = None, student: Path | None = None) -> Path:
    """Write adapters exactly as mlx-lm's trainer does: trainable params + adapter_config.json."""
    from mlx.utils import tree_flatten

    best.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(best / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (best / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": LORA_CONFIG,
         **({"model": str(student)} if student else {})}, indent=1))
    if run_config is not None:
        (best.parent / "config.json").write_text(json.dumps(run_config, indent=1))
    return best


BEST = {"step": 300, "val_loss": 1.234, "val_acc": 0.375}
RUN_CONFIG = {"student": "tiny-phi", "loss": "forward_kl", "alpha": 0.5, "temperature": 2.0, "learning_rate": 3e-4,
              "iters": 1234, "seed": 7, "lora_rank": 4}
# as kd_mlx.eval writes it: percentages, per-subject question counts
TRAIN_SUMMARY = {"steps": 40, "best_step": 30, "val_acc": 0.875, "val_loss": 0.25, "overall": 87.5}
SUMMARY = {"overall": 31.25, "categories": {"STEM": 30.0, "Humanities": 32.5},
           "subjects": {SUBJECT: 31.25, "anatomy": 25.0}, "n": {SUBJECT: 16, "anatomy": 8}}


@pytest.fixture(scope="module")
def run_dir(student, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    _save_adapters(_lora_model(student, seed=1), run / "best", RUN_CONFIG, student)
    (run / "best" / "best.json").write_text(json.dumps(BEST))
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(dict(SUMMARY, adapters=str(run / "best"))))
    # the trainer's own summary.json (training numbers) and the base model's evaluation sit beside them: neither is
    # an evaluation of these adapters
    (run / "summary.json").write_text(json.dumps(TRAIN_SUMMARY))
    (run / "baseline").mkdir()
    (run / "baseline" / "summary.json").write_text(json.dumps(dict(SUMMARY, overall=12.5, adapters=None)))
    return run


@pytest.fixture(scope="module")
def exported(student, run_dir, tmp_path_factory) -> Path:
    from kd_mlx.export import export_model

    out = tmp_path_factory.mktemp("models") / "fused"
    export_model(str(student), run_dir / "best", out)
    return out


def _prompt_ids(text: str, model_dir: Path) -> list[int]:
    from kd_mlx.tokenizer import load_tokenizer

    return load_tokenizer(model_dir).encode(text)


PROMPT = "以下是关于初等数学的单项选择题，请直接给出正确答案的选项。\n\n题目：3加5等于多少？\nA. 7\nB. 8\nC. 9\nD. 10\n答案是："


# ---------------------------------------------------------------------------------------------------------------

def test_fused_logits_equal_base_plus_adapters(student, run_dir, exported):
    """The fused weights W + s·Bᵀ·Aᵀ give the same logits as the unfused base + LoRA forward (fp32, 2e-5)."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    ids = mx.array([_prompt_ids(PROMPT, student)])
    base, _ = load_model(student)
    base_logits = base(ids)
    adapted, _ = load_model(student)
    load_adapters(adapted, str(run_dir / "best"))
    ref = adapted(ids)
    fused, cfg = load_model(exported)
    got = fused(ids)
    assert cfg.get("quantization") is None and got.dtype == mx.float32
    err = mx.abs(got - ref).max().item()
    effect = mx.abs(ref - base_logits).max().item()
    assert effect > 0.05, f"adapters barely change the logits ({effect}): the test could not fail"
    assert err <= 2e-5, f"fused vs base+adapters max |diff| {err}"
    # no LoRA layers remain: the directory holds plain Linear weights
    assert not any("lora" in k for k in mx.load(str(exported / "model.safetensors")))


def test_model_directory_and_card(student, exported):
    from mlx_lm import load

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "kd_mlx_export.json"} <= names
    assert not [n for n in exported.parent.iterdir() if n.name.startswith(".")], "temporary dirs left behind"
    assert (exported / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert "**Overall: 31.25%**" in card and "| STEM | 30.00% |" in card and f"| {SUBJECT} | 31.25% | 16 |" in card
    # the exact training configuration, as JSON in the card and in the export record
    assert json.dumps(RUN_CONFIG, indent=1) in card and '"rank": 4' in card
    record = json.loads((exported / "kd_mlx_export.json").read_text(encoding="utf-8"))
    assert record["training_config"] == RUN_CONFIG and record["eval_summary"]["overall"] == SUMMARY["overall"]
    evaluation = card.split("## Evaluation")[1].split("## Training configuration")[0]
    assert "87.50" not in evaluation and "12.50" not in evaluation and "31.25" in evaluation
    assert record["best_step"] == BEST and '"val_acc": 0.375' in card
    assert record["fused_layers"] == 12 and record["added_chat_template"] is True
    _, tok = load(str(exported))
    assert tok.has_chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered == PROMPT


def _fixture_scores(model_dir: Path, questions) -> tuple[float, list[list[float]], list[str]]:
    """Accuracy, A-D probabilities and predicted letters of `model_dir` on the fixture, through `Asker`."""
    from kd_mlx.export import LETTERS, Asker

    asker = Asker(model_dir)
    probs, preds = [], []
    for q in questions:
        text = f"题目：{q.question}\n" + "\n".join(f"{k}. {c}" for k, c in zip(LETTERS, q.choices))
        r = asker.ask(text, SUBJECT)
        probs.append([r.probs[k] for k in LETTERS])
        preds.append(r.letter)
    acc = sum(p == q.answer for p, q in zip(preds, questions)) / len(questions)
    return acc, probs, preds


@pytest.mark.slow
def test_quantized_accuracy_on_fixture(student, run_dir, exported, fixture_questions, tmp_path):
    """Export 8-bit and 4-bit; report fixture accuracy of fp32 / 8 / 4-bit (a random tiny student: near chance, the
    point is the comparison); the A-D probabilities stay within 0.02 (8-bit) / 0.15 (4-bit) of the fused fp32
    model's, and 8-bit changes no prediction whose fp32 margin exceeds twice that tolerance."""
    from kd_mlx.export import export_model

    results = {32: _fixture_scores(exported, fixture_questions)}
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        res = export_model(str(student), run_dir / "best", out, quantize=bits, group_size=32)
        assert res.quantization["bits"] == bits and res.quantization["group_size"] == 32
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == bits
        results[bits] = _fixture_scores(out, fixture_questions)
    acc32, p32, pred32 = results[32]
    lines = [f"fixture accuracy ({N_FIXTURE} questions): fp32 {acc32:.3f}"]
    for bits, tol in ((8, 0.02), (4, 0.15)):
        acc, p, pred = results[bits]
        dp = max(abs(a - b) for pa, pb in zip(p, p32) for a, b in zip(pa, pb))
        agree = sum(a == b for a, b in zip(pred, pred32)) / len(pred)
        lines.append(f"{bits}-bit {acc:.3f} (agrees with fp32 on {agree:.3f}, max |dp(A-D)| {dp:.4f})")
        assert dp <= tol, f"{bits}-bit answer probabilities differ from fp32 by {dp:.4f} (tolerance {tol})"
        if bits == 8:
            for pa, a, b in zip(p32, pred32, pred):
                top2 = sorted(pa)[-2:]
                if top2[1] - top2[0] > 2 * tol:
                    assert a == b, "8-bit flipped a confident fp32 prediction"
    print("\n" + "; ".join(lines))


def test_official_prompt_matches_data_module():
    """The plain prompt in export equals kd_mlx.data's official one (byte for byte)."""
    from kd_mlx.data import Question, build_prompt
    from kd_mlx.export import official_prompt

    q = Question(id="x", subject=SUBJECT, split="test", index=0, question="1加1等于几？", choices=("1", "2", "3", "4"),
                 answer="B")
    assert official_prompt(q.question, q.choices, "初等数学") == build_prompt(q, []).text


@pytest.mark.parametrize("text", [
    "题目：1加1等于几？\nA. 1\nB. 2\nC. 3\nD. 4",
    "题目：1加1等于几？\\nA. 1\\nB. 2\\nC. 3\\nD. 4",            # literal backslash-n, as typed in a shell
    "1加1等于几？ A. 1 B. 2 C. 3 D. 4",                            # options on one line
    "题目:1加1等于几？\nA．1\nB．2\nC．3\nD．4\n答案是：",           # full-width dots, trailing cue
])
def test_parse_question_forms(text):
    from kd_mlx.export import parse_question

    assert parse_question(text) == ("1加1等于几？", ("1", "2", "3", "4"))


@pytest.mark.parametrize("text,needle", [
    ("题目：1加1等于几？\nA. 1\nB. 2\nC. 3", "four options"),
    ("A. 1\nB. 2\nC. 3\nD. 4", "question text is empty"),
    ("", "four options"),
])
def test_parse_question_rejects(text, needle):
    from kd_mlx.export import parse_question

    with pytest.raises(KDError, match=needle):
        parse_question(text)


QUESTION = "题目：中国的首都是哪座城市？\nA. 上海\nB. 北京\nC. 广州\nD. 深圳"


def test_ask_cli_prints_letter_and_probabilities(exported):
    """`python -m kd_mlx ask`: a letter and four probabilities summing to 1, equal to a full-vocabulary reference
    (log-softmax over the whole vocabulary at the last position, A-D renormalised)."""
    from click.testing import CliRunner

    from kd_mlx.export import cli as main
    from kd_mlx.eval import answer_token_ids, load_eval_model
    from kd_mlx.export import build_ask_prompt, parse_question

    r = CliRunner().invoke(main, ["ask", str(exported), QUESTION, "--subject", "初等数学"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0] in ("A", "B", "C", "D") and [ln.split()[0] for ln in lines[1:]] == ["A", "B", "C", "D"]
    probs = [float(ln.split()[1]) for ln in lines[1:]]
    assert abs(sum(probs) - 1) <= 2e-4 and "ABCD"[probs.index(max(probs))] == lines[0]

    rj = CliRunner().invoke(main, ["ask", str(exported), QUESTION, "--subject", SUBJECT, "--json"])
    got = json.loads(rj.output)
    p = [got["probs"][k] for k in "ABCD"]
    assert abs(sum(p) - 1) <= 1e-6
    # reference: full-vocabulary log-softmax, letters picked and renormalised
    em = load_eval_model(str(exported))
    ids = em.tokenizer.encode(build_ask_prompt(*parse_question(QUESTION), SUBJECT))
    logp = em.model(mx.array([ids]))[0, -1]
    logp = logp - mx.logsumexp(logp)
    ref = mx.exp(logp[mx.array(answer_token_ids(em.tokenizer))])
    ref = (ref / ref.sum()).tolist()
    assert max(abs(a - b) for a, b in zip(p, ref)) <= 1e-5
    assert got["answer"] == "ABCD"[ref.index(max(ref))] and got["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("args,needle", [
    (["题目：只有两个选项\nA. 1\nB. 2"], "four options"),
    ([QUESTION, "--subject", "astrology"], "unknown CMMLU subject"),
])
def test_ask_cli_bad_input_is_one_line(exported, args, needle):
    from click.testing import CliRunner

    from kd_mlx.export import cli as main

    r = CliRunner().invoke(main, ["ask", str(exported), *args])
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_export_cli_errors_leave_nothing(student, run_dir, exported, tmp_path):
    """Bad adapters / existing output / mismatched adapters: one line, exit 1, no directory written."""
    from click.testing import CliRunner

    from kd_mlx.export import cli

    def run(*args):
        return CliRunner().invoke(cli, list(map(str, args)))

    r = run("--student", student, "--adapters", tmp_path / "nope", "--out", tmp_path / "o1")
    assert r.exit_code == 1 and "adapters directory not found" in r.output
    r = run("--student", student, "--adapters", run_dir / "best", "--out", exported)
    assert r.exit_code == 1 and "already holds this export output" in r.output
    # adapters trained for another student shape
    from kd_mlx.testing import tiny_phi_dir

    other = tiny_phi_dir(tmp_path / "other", hidden=32, heads=2)
    bad = _save_adapters(_lora_model(other, seed=3), tmp_path / "bad" / "best")
    r = run("--student", student, "--adapters", bad, "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "do not fit model" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_cli_with_yaml_config(student, run_dir, tmp_path):
    """`--config` YAML under the flags; the final configuration saved in the model directory; --overwrite."""
    from click.testing import CliRunner

    from kd_mlx.export import EXPORT_RECORD, cli

    out = tmp_path / "m"
    cfg = tmp_path / "export.yaml"
    # no student: taken from the adapters' adapter_config.json ("model", as kd_mlx.train writes it)
    cfg.write_text(f"adapters: {run_dir / 'best'}\nout: {tmp_path / 'ignored'}\n"
                   "quantize: '8'\ngroup_size: 64\n")
    for _ in range(2):  # second time replaces the first (atomically)
        r = CliRunner().invoke(cli, ["--config", str(cfg), "--out", str(out), "--overwrite"])
        assert r.exit_code == 0, r.output
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["config"]["out"] == str(out) and record["config"]["quantize"] == 8
    assert record["config"]["group_size"] == 64 and record["quantization"]["bits"] == 8
    assert record["config"]["student"] == str(student)
    assert not (tmp_path / "ignored").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_server_answers_chat_completions(exported):
    """`python -m kd_mlx.export serve` on 127.0.0.1: a real HTTP chat-completions request is answered with the
    model's greedy continuation of the CMMLU prompt; the server is stopped afterwards."""
    from mlx_lm import generate, load

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "kd_mlx.export", "serve", str(exported), "--port", str(port),
                             "--log-level", "WARNING"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # bounded wait for readiness: /health answers 200 once the model is loaded
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("server not ready within 90 s")
            time.sleep(0.5)
        reply = _post_json(base + "/v1/chat/completions", {
            "model": "default_model", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4, "temperature": 0.0})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
    msg = reply["choices"][0]["message"]
    assert reply["object"] == "chat.completion" and msg["role"] == "assistant"
    # the plain chat template makes the served prompt exactly the CMMLU prompt
    assert reply["usage"]["prompt_tokens"] == len(_prompt_ids(PROMPT, exported))
    assert 1 <= reply["usage"]["completion_tokens"] <= 4
    model, tok = load(str(exported))
    assert msg["content"] == generate(model, tok, prompt=PROMPT, max_tokens=reply["usage"]["completion_tokens"])


def test_export_dtype_cast(student, run_dir, tmp_path):
    """--dtype float16: weights and config.json say float16; logits stay close to the fp32 export (fp16 rounding)."""
    from mlx_lm.utils import load_model

    from kd_mlx.export import export_model

    out = export_model(str(student), run_dir / "best", tmp_path / "f16", dtype="float16").path
    w = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    ids = mx.array([_prompt_ids(PROMPT, student)])
    m16, _ = load_model(out)
    m32, _ = load_model(export_model(str(student), run_dir / "best", tmp_path / "f32").path)
    m16.set_dtype(mx.float32)  # compare the rounding of the weights, not fp16 arithmetic on CPU
    assert mx.abs(m16(ids) - m32(ids)).max().item() <= 0.05


def test_serve_bad_model_dir_is_one_line(tmp_path):
    from click.testing import CliRunner

    from kd_mlx.export import cli

    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "model directory not found" in r.output and len(r.output.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "empty"), "--port", "8081"])
    assert r.exit_code == 1 and "config.json missing" in r.output
