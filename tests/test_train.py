"""kd_mlx.train: tiny Phi-shaped student (real Phi/GPT-2 BPE), a store written from a real tiny Kimi-K2 forward, a
small CMMLU-format fixture written here. Loss decreases, exact LoRA parameter counts, exact resume, guards, NaN stop,
fast objective == reference, adapters load in mlx-lm, sweep."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

SUBJECTS = {"elementary_mathematics": "初等数学", "college_mathematics": "大学数学"}
LETTERS = "ABCD"
SHOTS = 1
TOPK = 8


def _questions(subject_seed: int, n: int) -> list[tuple]:
    """Deterministic arithmetic questions with four options (the gold letter rotates)."""
    rng = np.random.default_rng(subject_seed)
    rows = []
    for i in range(n):
        a, b = int(rng.integers(2, 60)), int(rng.integers(2, 60))
        right = a + b
        opts = [right, right + 1, right - 2, right + 10]
        k = i % 4
        opts[0], opts[k] = opts[k], opts[0]
        rows.append((f"{a}加{b}等于多少？（第{subject_seed}-{i}题）", *map(str, opts), LETTERS[k]))
    return rows


def write_cmmlu(root: Path) -> Path:
    for s_i, subject in enumerate(SUBJECTS):
        for split, n in (("dev", 2), ("test", 20)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, r in enumerate(_questions(100 * s_i + (0 if split == "dev" else 1), n)):
                    w.writerow([i, *r])
    return root


def write_store_from_teacher(store_dir: Path, teacher_dir: Path, cmmlu, questions, shots: int = SHOTS,
                             identity_extra: dict | None = None) -> Path:
    """A store written with StoreWriter from a real forward of the tiny teacher: answer log-probs of A–D at the
    last position, top-k at every token of the question part (the prompt's suffix)."""
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    from kd_mlx.data import fit_prompt
    from kd_mlx.data import answer_token_ids
    from kd_mlx.store import StoreRecord, StoreWriter
    from kd_mlx.tokenizer import load_tokenizer

    model, _ = load_model(teacher_dir)
    tok = load_tokenizer(teacher_dir)
    letters = answer_token_ids(tok)
    ident = {"teacher": str(teacher_dir), "tokenizer": tok.fingerprint(), "template": "cmmlu", "shots": shots,
             "positions": "suffix", "k": TOPK, "encoding": "fp32", "hidden_dim": 0, **(identity_extra or {})}
    with StoreWriter(store_dir, ident, shard_size=16) as w:
        for q in questions:
            p = fit_prompt(q, cmmlu.dev[q.subject], shots, None, None)
            ids, offs = tok.encode_with_offsets(p.text)
            lp = nn.log_softmax(model(mx.array([ids]))[0].astype(mx.float32), axis=-1)
            lp_np = np.array(lp)
            pos = np.array([i for i, (a, _) in enumerate(offs) if a >= len(p.prefix)], np.int32)
            part = np.argpartition(-lp_np[pos], TOPK, axis=-1)[:, :TOPK]  # top-k, then sorted
            top = np.take_along_axis(part, np.argsort(-np.take_along_axis(lp_np[pos], part, -1), -1), -1).astype(np.int32)
            w.add(StoreRecord(id=q.id, answer_logprobs=lp_np[-1, letters].astype(np.float32),
                              token_ids=np.array(ids, np.int32), offsets=np.array(offs, np.int32), positions=pos,
                              topk_ids=top, topk_logprobs=np.take_along_axis(lp_np[pos], top, -1).astype(np.float32),
                              label=LETTERS.index(q.answer)))
    return store_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from kd_mlx.data import load_cmmlu, make_splits
    from kd_mlx.testing.models import tiny_kimi_k2_dir, tiny_phi_dir
    from kd_mlx.utils import write_json_atomic

    root = tmp_path_factory.mktemp("train_world")
    data = write_cmmlu(root / "cmmlu")
    cmmlu = load_cmmlu(data)
    splits = make_splits(cmmlu, seed=0, val=0.2, test=0.2)
    write_json_atomic(root / "splits.json", splits)
    teacher = tiny_kimi_k2_dir(root / "teacher", seed=1)
    student = tiny_phi_dir(root / "student", seed=2, n_layers=2, hidden=64, heads=4)
    store = write_store_from_teacher(root / "store", teacher, cmmlu, cmmlu.test_questions())
    return {"root": root, "data": data, "splits": root / "splits.json", "teacher": teacher, "student": student,
            "store": store, "cmmlu": cmmlu, "split_ids": splits}


def cfg_for(world, out: Path, **kw):
    from kd_mlx.train.config import TrainConfig

    base = dict(student=str(world["student"]), store=str(world["store"]), data=str(world["data"]),
                splits=str(world["splits"]), out=str(out), steps=8, batch_size=4, eval_every=4, save_every=4,
                learning_rate=5e-3, warmup_steps=1, lora_rank=4, lora_scale=10.0, pad_to=16, kd_max_positions=16,
                patience=0, max_grad_norm=None)
    return TrainConfig(**{**base, **kw})


def train_rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if ln and json.loads(ln)["kind"] == "train"]


def invoke(args: list[str]):
    from click.testing import CliRunner

    from kd_mlx.train.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def cli_args(world, out: Path, *extra: str) -> list[str]:
    return ["--student", str(world["student"]), "--store", str(world["store"]), "--data", str(world["data"]),
            "--splits", str(world["splits"]), "--out", str(out), "--no-progress", *extra]


# ------------------------------------------------------------------------------------------------ pieces


def test_lora_parameter_count_exact(world):
    from kd_mlx.train.config import TrainConfig
    from kd_mlx.train.model import load_student, setup_trainable, trainable_parameter_count

    d, inter, r = 64, 256, 4
    base = {"fine_tune_type": "lora", "num_layers": -1, "lora_rank": r, "lora_scale": 10.0, "lora_dropout": 0.0,
            "lora_keys": None, "student": "x"}
    attn = 4 * (d * r + r * d)  # q, k, v, dense: A (in x r) + B (r x out)
    mlp = (d * r + r * inter) + (inter * r + r * d)  # fc1, fc2
    cases = [({}, 2 * (attn + mlp)), ({"num_layers": 1}, attn + mlp),
             ({"lora_keys": ["self_attn.q_proj", "mlp.fc2"]}, 2 * ((d * r + r * d) + (inter * r + r * d))),
             # DoRA adds one magnitude per output feature of each adapted linear
             ({"fine_tune_type": "dora"}, 2 * (attn + mlp + 4 * d + inter + d)),
             # full fine-tuning of the last block: its every weight and bias, layer norm included
             ({"fine_tune_type": "full", "num_layers": 1},
              4 * (d * d + d) + (d * inter + inter) + (inter * d + d) + 2 * d)]
    for over, want in cases:
        model, _, _ = load_student(str(world["student"]))
        setup_trainable(model, TrainConfig(**{**base, **over}))
        assert trainable_parameter_count(model) == want, over


def test_yaml_config_equals_the_typed_defaults():
    """configs/train_phi15.yaml lists every TrainConfig field with its default value, each key commented."""
    import yaml

    from kd_mlx.train.config import TrainConfig, defaults

    path = Path(__file__).resolve().parents[1] / "configs" / "train_phi15.yaml"
    text = path.read_text(encoding="utf-8")
    assert yaml.safe_load(text) == defaults()
    assert TrainConfig.from_dict(yaml.safe_load(text)) == TrainConfig()
    for key in defaults():
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{key}:"))
        assert "#" in line, key


def test_typed_config_validates_on_construction():
    from kd_mlx.train.config import TrainConfig
    from kd_mlx.utils import KDError

    assert TrainConfig(steps=4.0, learning_rate="1e-4", eval_splits="val,test").steps == 4  # YAML/flag forms
    assert TrainConfig(learning_rate="1e-4").learning_rate == 1e-4
    bad = [({"steps": "four"}, "setting steps must be an integer, got 'four'"),
           ({"learning_rate": -1.0}, "setting learning_rate must be > 0, got -1.0"),
           ({"learning_rate": float("nan")}, "setting learning_rate must be a finite number, got nan"),
           ({"lora_rank": 0}, "setting lora_rank must be >= 1, got 0"),
           ({"compile": "yes"}, "setting compile must be true or false"),
           ({"fine_tune_type": "qlora"}, "setting fine_tune_type must be one of lora, dora, full"),
           ({"answer_weight": 0, "kd_weight": 0, "ce_weight": 0}, "all loss weights"),
           ({"steps": True}, "setting steps must be an integer, got True")]
    for kw, msg in bad:
        with pytest.raises(KDError) as e:
            TrainConfig(**kw)
        assert msg in str(e.value) and len(str(e.value).splitlines()) == 1, (kw, str(e.value))
    with pytest.raises(KDError, match="unknown config key"):
        TrainConfig.from_dict({"stepz": 3})


def test_batches_bucketed_deterministic_and_complete():
    from kd_mlx.train.batches import BatchStream, Example, collate, epoch_batches

    rng = np.random.default_rng(0)
    exs = [Example(f"q{i}", np.arange(int(n), dtype=np.int32), i % 4, np.full(4, 0.25, np.float32))
           for i, n in enumerate(rng.integers(3, 70, 23))]
    b1 = epoch_batches(exs, 4, seed=5, epoch=0, pad_to=16)
    assert b1 == epoch_batches(exs, 4, seed=5, epoch=0, pad_to=16)
    assert b1 != epoch_batches(exs, 4, seed=5, epoch=1, pad_to=16)
    assert sorted(i for b in b1 for i in b) == list(range(23))
    # length bucketing: batches are formed from the length-sorted order, so at most one batch spans two buckets
    # per bucket boundary
    buckets = [{-(-len(exs[i]) // 16) for i in b} for b in b1]
    assert sum(len(s) > 1 for s in buckets) <= len({-(-len(e) // 16) for e in exs}) - 1
    c = collate([exs[0], exs[1]], pad_to=16)
    assert c.tokens.shape[1] % 16 == 0 and c.lengths.tolist() == [len(exs[0]), len(exs[1])]
    assert (c.tokens[0, len(exs[0]):] == 0).all()
    # a stream resumed from a saved position yields exactly the same batches
    s = BatchStream(exs, 4, seed=5, pad_to=16)
    first = [next(s).qids for _ in range(9)]
    pos = BatchStream(exs, 4, seed=5, pad_to=16)
    for _ in range(4):
        next(pos)
    resumed = BatchStream(exs, 4, seed=5, pad_to=16, **pos.position())
    assert [next(resumed).qids for _ in range(5)] == first[4:]


def test_fast_objective_matches_reference(world):
    import mlx.nn as nn

    from kd_mlx.train.objective import head_split, objective, objective_reference
    from kd_mlx.train.run import prepare

    cfg = cfg_for(world, world["root"] / "unused", temperature=2.0, answer_weight=1.0, kd_weight=0.7, ce_weight=0.3)
    prep = prepare(cfg, progress=False)
    cfg = prep.cfg
    from kd_mlx.train.batches import collate
    from kd_mlx.train.model import load_student, setup_trainable

    assert sum(len(e.kd_pos) for e in prep.train) > 0, "the alignment must produce token-level targets"
    model, _, _ = load_student(str(world["student"]))
    setup_trainable(model, cfg.replace(lora_dropout=0.0))
    # make the adapters non-zero so the gradients differ from the base model's
    model.update(nn.utils.tree_map(lambda x: x + 0.01, model.trainable_parameters()))
    split = head_split(model)
    assert split is not None
    batch = collate(prep.train[:3], pad_to=16).arrays()
    letters = mx.array(prep.letter_ids)
    fast = nn.value_and_grad(model, lambda m: objective(m, split, batch, letters, cfg))(model)
    ref = nn.value_and_grad(model, lambda m: objective_reference(m, batch, letters, cfg))(model)
    (lf, pf), gf = fast
    (lr, pr), gr = ref
    assert np.allclose(np.array(pf), np.array(pr), rtol=1e-4, atol=1e-5)
    assert abs(lf.item() - lr.item()) <= 1e-4 * max(1.0, abs(lr.item()))
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(gf), tree_flatten(gr)):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-3, atol=1e-6), k
    # the parts are the real losses: hand-check the answer KL of row 0 against the plain reference
    from kd_mlx.losses import answer_kl_reference

    logits = np.array(model(batch[0]))
    b0 = prep.train[:3]
    want = np.mean([answer_kl_reference(logits[i, len(e) - 1], prep.letter_ids, e.teacher_answer_probs,
                                        temperature=2.0) for i, e in enumerate(b0)])
    assert abs(float(pf[0]) - want) < 1e-4


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_train_cli_loss_decreases_and_adapters_load_in_mlx_lm(world, tmp_path):
    run = tmp_path / "run"
    # the default warm-up (20 steps) is longer than this run: a config file sets a short one, as a user would
    (tmp_path / "short.yaml").write_text("warmup_steps: 2\n", encoding="utf-8")
    r = invoke(cli_args(world, run, "--steps", "18", "--learning-rate", "0.01", "--config", str(tmp_path / "short.yaml")))
    assert r.exit_code == 0, r.output
    rows = train_rows(run)
    assert [x["step"] for x in rows] == list(range(1, 19))
    assert rows[-1]["lr"] < 0.01 and max(x["lr"] for x in rows) == pytest.approx(0.01, rel=1e-3)
    for key in ("loss", "answer_kl", "token_kd", "ce", "lr", "tokens_per_s", "peak_memory_gb"):
        assert all(math.isfinite(x[key]) for x in rows), key
    # the training set (24 questions, batch 4) repeats every 6 steps: compare the first and last epoch, per part.
    # The token-level part is not required to fall here: the store comes from a *random* Kimi-K2 whose top-k is
    # peaked on arbitrary ids, and this random 2-layer student's frozen head bounds its logits (|logit| < ~5 over
    # 51,200 ids), so it cannot reproduce those rows in 18 steps (measured: even the true next tokens as targets
    # barely move). test_token_kd_form checks that part's loss form by hand instead.
    def epoch_mean(key, part):
        return float(np.mean([x[key] for x in part]))

    # measured (exact token targets): answer_kl 0.99 -> 0.61, ce 10.26 -> 9.13, loss 8.06 -> 7.07; the answer terms
    # fall the same with kd_weight 0 (0.98 -> 0.60)
    for key, ratio in (("answer_kl", 0.7), ("ce", 0.95), ("loss", 0.95)):
        first, last = epoch_mean(key, rows[:6]), epoch_mean(key, rows[-6:])
        assert last < ratio * first, (key, first, last)
    assert epoch_mean("token_kd", rows[-6:]) <= 1.02 * epoch_mean("token_kd", rows[:6])
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["shots"] == SHOTS and recorded["steps"] == 18
    from kd_mlx.train.run import read_run_config

    cfg = cfg_for(world, run).replace(**read_run_config(run))
    for f in ("curves.png", "summary.json", "best/adapters.safetensors", "best/adapter_config.json",
              "last/optimizer.safetensors", "last/state.json"):
        assert (run / f).exists(), f
    # mlx-lm loads the adapters as its own (mlx_lm.load(..., adapter_path=RUN/best))
    from mlx_lm import load

    from kd_mlx.train.model import load_adapter_weights, load_student, setup_trainable

    m_lm, _ = load(str(world["student"]), adapter_path=str(run / "best"))
    ours, _, _ = load_student(str(world["student"]))
    setup_trainable(ours, cfg)
    load_adapter_weights(ours, run / "best")
    x = mx.array([[10, 20, 30, 40]])
    assert np.allclose(np.array(m_lm(x)), np.array(ours(x)), atol=1e-5)
    base, _, _ = load_student(str(world["student"]))
    assert not np.allclose(np.array(base(x)), np.array(ours(x)), atol=1e-4)  # the adapters did something


def test_token_kd_form():
    """The default token-level loss (tail bucket, kd_temperature 1) by hand on the cases that motivated it."""
    from kd_mlx import losses
    from kd_mlx.train.objective import kd_targets

    V, k = 51200, 8
    student = mx.zeros((1, V))  # a uniform student
    ids = mx.array([[3, 5, 7, 11, 13, 17, 19, 23]])
    flat = mx.full((1, k), 1.0 / V)  # a flat teacher: its top-8 hold 8/V of the mass
    rest = mx.array([1.0 - k / V])

    def kl(probs, rest_, tail, T=1.0):
        p, r = kd_targets(probs, rest_, tail)
        return losses.projected_kl(student, ids, p, r, temperature=T).item()

    assert abs(kl(flat, rest, "bucket")) < 1e-4  # the student already is the teacher: nothing to learn
    assert kl(flat, rest, "renorm") == pytest.approx(math.log(V / k), rel=1e-4)  # renorm invents confidence
    # at T=2 the targets arrive tempered from the full teacher row (a uniform row stays uniform) and the loss tempers
    # only the student: the same exact student is still at KL 0 (no inflated tail category)
    assert abs(kl(flat, rest, "bucket", T=2.0)) < 1e-4
    # a peaked teacher (95% in the top-8): both forms ask for nearly the same thing
    peaked = mx.full((1, k), 0.95 / k)
    b, r = kl(peaked, mx.array([0.05]), "bucket"), kl(peaked, mx.array([0.05]), "renorm")
    want_b = 0.95 * math.log((0.95 / k) / (1 / V)) + 0.05 * math.log(0.05 / ((V - k) / V))
    assert b == pytest.approx(want_b, rel=1e-4) and r == pytest.approx(math.log(V / k), rel=1e-4)
    assert abs(b - r) / r < 0.1


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(world, tmp_path):
    from kd_mlx.train.run import run_training

    kw = dict(steps=6, save_every=2, eval_every=3, lora_dropout=0.1, grad_accumulation=2)  # dropout: RNG restored
    run_training(cfg_for(world, tmp_path / "a", **kw), progress=False)

    from kd_mlx.train.loop import TrainingCallback

    class Interrupt(Exception):
        pass

    class StopAt3(TrainingCallback):
        def on_train_report(self, row):
            if row["step"] == 3:
                raise Interrupt

    with pytest.raises(Interrupt):
        run_training(cfg_for(world, tmp_path / "b", **kw), progress=False, callback=StopAt3())
    assert (tmp_path / "b" / "last").resolve().name == "step_2"
    run_training(cfg_for(world, tmp_path / "b", **kw), resume=True, progress=False)
    keys = ("step", "loss", "answer_kl", "token_kd", "ce", "train_acc", "lr", "tokens")
    a = [{k: r[k] for k in keys} for r in train_rows(tmp_path / "a")]
    b = [{k: r[k] for k in keys} for r in train_rows(tmp_path / "b")]
    assert a == b  # bit-identical curve
    wa = mx.load(str(tmp_path / "a" / "last" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "b" / "last" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path):
    from kd_mlx.train.objective import objective_reference
    from kd_mlx.train.run import prepare, train_prepared
    from kd_mlx.utils import KDError

    run = tmp_path / "nan"
    # an uncompiled step, so the loss below can count its calls: NaN from the third optimizer step on
    cfg = cfg_for(world, run, save_every=2, eval_every=100, steps=6, compile=False)
    prep = prepare(cfg, progress=False)
    letters = mx.array(prep.letter_ids)
    calls = []

    def goes_nan(model, batch):
        calls.append(1)
        total, parts = objective_reference(model, batch, letters, prep.cfg)
        return (total * float("nan") if len(calls) >= 3 else total), parts

    with pytest.raises(KDError) as e:
        train_prepared(prep, prep.cfg, progress=False, loss=goes_nan)
    msg = str(e.value)
    assert "non-finite loss" in msg and "step 3" in msg and "step_2" in msg and len(msg.splitlines()) == 1
    assert (run / "last").resolve().name == "step_2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2"]
    good = mx.load(str(run / "last" / "adapters.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in good.values())
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 2
    # metrics.jsonl stays JSON: the NaN row holds null, not a bare NaN
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["loss"] is None


def test_contamination_guard_fires(world, tmp_path):
    # train on a split that is also evaluated
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_split: val\n")
    r = invoke(cli_args(world, tmp_path / "c", "--config", str(cfg)))
    assert r.exit_code == 1 and "refusing to train on it" in r.output and len(r.output.strip().splitlines()) == 1
    # a hand-made splits file that puts a test question into train
    # a hand-made splits file: a test question moved into train, and a verbatim copy of it (same content, another
    # subject's id) left in test: the copy must count as a leak
    s = dict(world["split_ids"])
    s = {**s, "train": s["train"] + s["test"][:1], "test": s["test"][1:]}
    subject, split, h = s["train"][-1].split("/")
    other = "college_mathematics" if subject != "college_mathematics" else "elementary_mathematics"
    s["test"] = s["test"] + [f"{other}/{split}/{h}"]
    p = tmp_path / "leaky.json"
    p.write_text(json.dumps(s))
    args = cli_args(world, tmp_path / "c2")
    args[args.index("--splits") + 1] = str(p)
    r = invoke(args)
    assert r.exit_code == 1 and "evaluation split" in r.output, r.output


def test_store_mismatch_checks_fire(world, tmp_path):
    from kd_mlx.testing import phi_tokenizer_dir

    # another teacher tokenizer than the dump's
    r = invoke(cli_args(world, tmp_path / "t", "--teacher-tokenizer", str(phi_tokenizer_dir(tmp_path / "tok"))))
    assert r.exit_code == 1 and "teacher tokenizer" in r.output and len(r.output.strip().splitlines()) == 1
    # another number of shots than the dump's
    cfg = tmp_path / "s.yaml"
    cfg.write_text("shots: 2\n")
    r = invoke(cli_args(world, tmp_path / "s", "--config", str(cfg)))
    assert r.exit_code == 1 and "shots" in r.output
    # a store whose prompts were built differently (2 shots) but whose identity does not say so
    from kd_mlx.data import split_questions

    qs = split_questions(world["cmmlu"], world["split_ids"], ["train", "val"])
    other = write_store_from_teacher(tmp_path / "store2", world["teacher"], world["cmmlu"], qs, shots=2,
                                     identity_extra={"shots": None})
    args = cli_args(world, tmp_path / "p")
    args[args.index("--store") + 1] = str(other)
    args += ["--config", str(tmp_path / "one.yaml")]
    (tmp_path / "one.yaml").write_text("shots: 1\n")
    r = invoke(args)
    assert r.exit_code == 1 and "does not match the prompt this run builds" in r.output, r.output


@pytest.mark.slow
def test_sweep_ranks_trials(world, tmp_path):
    from click.testing import CliRunner

    from kd_mlx.train.cli import main

    cfg = tmp_path / "sw.yaml"
    cfg.write_text(f"student: {world['student']}\nstore: {world['store']}\ndata: {world['data']}\n"
                   f"splits: {world['splits']}\nlora_rank: 4\npad_to: 16\nkd_max_positions: 8\n")
    r = CliRunner().invoke(main, ["sweep", "--config", str(cfg), "--grid", "temperature=1,2", "--grid",
                                  "answer_weight=0.5", "--steps", "2", "--out", str(tmp_path / "sw"),
                                  "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    sw = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [t["rank"] for t in sw["trials"]] == [1, 2]
    accs = [t["val_acc"] for t in sw["trials"]]
    assert accs == sorted(accs, reverse=True)
    assert {t["params"]["temperature"] for t in sw["trials"]} == {1, 2}
    assert "val_acc" in r.output


@pytest.mark.slow
def test_transfer_set_labelled_by_the_dump_trains_on_teacher_terms_only(world, tmp_path):
    """Questions without answers (DATA/transfer/) go through the real dump (label -1) and training: their rows add
    to the teacher's terms and to nothing else (no CE, no accuracy)."""
    import shutil

    from kd_mlx.data import load_cmmlu, make_splits
    from kd_mlx.store import TopKStore
    from kd_mlx.teacher.dump import dump_store
    from kd_mlx.train.batches import collate
    from kd_mlx.train.model import load_student, setup_trainable
    from kd_mlx.train.objective import head_split, objective
    from kd_mlx.train.run import prepare, train_prepared
    from kd_mlx.utils import write_json_atomic

    data = Path(shutil.copytree(world["data"], tmp_path / "cmmlu"))
    (data / "transfer").mkdir()
    for s_i, subject in enumerate(SUBJECTS):  # no Answer column at all
        with open(data / "transfer" / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["", "Question", "A", "B", "C", "D"])
            for i, r in enumerate(_questions(700 + s_i, 4)):
                w.writerow([i, *r[:5]])
    cmmlu = load_cmmlu(data)
    splits = make_splits(cmmlu, seed=0, val=0.2, test=0.2)
    assert len(splits["transfer"]) == 8
    write_json_atomic(tmp_path / "splits.json", splits)
    store = tmp_path / "store"
    dump_store({"teacher": str(world["teacher"]), "data": str(data), "splits": str(tmp_path / "splits.json"),
                "split": "train,val,transfer", "shots": SHOTS, "top_k": TOPK, "encoding": "fp32",
                "out": str(store)}, progress=False, log=lambda m: None)
    assert {TopKStore(store)[i].label for i in splits["transfer"]} == {-1}  # the teacher labels them, no gold

    cfg = cfg_for(world, tmp_path / "run", data=str(data), splits=str(tmp_path / "splits.json"), store=str(store),
                  teacher_tokenizer=str(world["teacher"]), transfer_split="transfer", steps=2, eval_every=2,
                  save_every=2)
    prep = prepare(cfg, progress=False)
    transfer = [e for e in prep.train if "/transfer/" in e.qid]
    labelled = [e for e in prep.train if "/transfer/" not in e.qid]
    assert len(transfer) == 8 and {e.gold for e in transfer} == {-1} and min(e.gold for e in labelled) >= 0
    assert all(len(e.kd_pos) for e in transfer)  # token-level targets too

    model, _, _ = load_student(str(world["student"]))
    setup_trainable(model, prep.cfg)
    split, letters = head_split(model), mx.array(prep.letter_ids)

    def parts(exs):
        return np.array(objective(model, split, collate(exs, pad_to=16).arrays(), letters, prep.cfg)[1])

    both, lab, tr = parts(labelled[:2] + transfer[:2]), parts(labelled[:2]), parts(transfer[:2])
    assert tr[2] == 0.0 and tr[3] == 0.0  # no CE and no accuracy without an answer
    assert both[2] == pytest.approx(lab[2], rel=1e-5) and both[3] == lab[3]  # CE: the labelled rows' mean
    assert both[0] == pytest.approx((lab[0] + tr[0]) / 2, rel=1e-5)  # answer KL: every row
    summary = train_prepared(prep, prep.cfg, progress=False)
    assert summary["stopped"] == "completed" and all(math.isfinite(r["loss"]) for r in train_rows(tmp_path / "run"))
