"""kd_mlx.prune: exactness of the surgery (the pruned model, written and loaded back by mlx-lm, gives the logits of
the original with the removed parts zeroed / skipped) for a tiny phi and tiny llamas (grouped-query and multi-head),
fast importance == plain reference, and the CLI end to end (importance from a real store, adapters fused, then
recovery with kd_mlx.train) with its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_lm.tuner.utils import load_adapters  # noqa: E402
from mlx_lm.utils import _get_classes, load_model  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from kd_mlx import prune  # noqa: E402
from kd_mlx.export import fuse_adapters  # noqa: E402
from kd_mlx.testing.models import tiny_phi_dir  # noqa: E402
from kd_mlx.train.batches import Example  # noqa: E402
from kd_mlx.utils import write_json_atomic  # noqa: E402

LETTERS = [32, 33, 34, 35]


def tiny_llama_dir(out: Path, tok_dir: Path, n_kv: int, seed: int = 0) -> Path:
    """A tiny mlx-lm llama (4 layers, 4 query heads, `n_kv` key/value heads) with the Phi tokenizer files."""
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": n_kv, "rms_norm_eps": 1e-5, "vocab_size": 51200,
              "tie_word_embeddings": True, "rope_theta": 10000.0, "max_position_embeddings": 2048}
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    # random-normal norms, so that no weight is at a symmetric value and the scores differ
    model.update({"model": {"norm": {"weight": 1 + 0.3 * mx.random.normal((64,))}}})
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    write_json_atomic(out / "config.json", config)
    for f in tok_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def random_examples(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(5, 14))
        p = rng.dirichlet(np.ones(4)).astype(np.float32)
        out.append(Example(f"q{i}", rng.integers(100, 50000, L).astype(np.int32), int(rng.integers(4)), p))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, phi_tok_dir):
    root = tmp_path_factory.mktemp("prune_models")
    return {"phi": tiny_phi_dir(root / "phi", seed=3, n_layers=4, hidden=64, heads=4, intermediate=96),
            "llama_gqa": tiny_llama_dir(root / "llama_gqa", phi_tok_dir, n_kv=2, seed=4),
            "llama_mha": tiny_llama_dir(root / "llama_mha", phi_tok_dir, n_kv=4, seed=5)}


def load(path: Path):
    model, config = load_model(path)
    model.eval()
    return model, config


def zeroed_reference_logits(path: Path, record: dict, tokens: mx.array) -> mx.array:
    """The original model with the removed parts skipped (layers) or zeroed (the output-projection columns of the
    removed MLP channels / heads)."""
    model, config = load(path)
    fam = prune.family_of(config)
    layers = list(model.model.layers)
    kept_layers = record["layers"]["kept"] if "layers" in record else list(range(len(layers)))
    model.model.layers = [layers[i] for i in kept_layers]
    for j, layer in enumerate(model.model.layers):
        if "mlp" in record:
            lin = getattr(layer.mlp, fam.mlp_out)
            keep = np.zeros(lin.weight.shape[1], np.float32)
            keep[record["mlp"]["kept"][j]] = 1
            lin.weight = lin.weight * mx.array(keep)
        if "heads" in record:
            lin = getattr(layer.self_attn, fam.attn_out)
            hd = prune._head_dim(layer.self_attn)
            keep = np.zeros(lin.weight.shape[1], np.float32)
            for h in record["heads"]["kept"][j]:
                keep[h * hd:(h + 1) * hd] = 1
            lin.weight = lin.weight * mx.array(keep)
    return model(tokens)


CASES = [
    ("phi", {"drop_layers": 1}),
    ("phi", {"mlp_keep": 0.5}),
    ("phi", {"drop_layers": 2, "mlp_keep": 0.75}),
    ("llama_gqa", {"drop_layers": 1}),
    ("llama_gqa", {"mlp_keep": 0.5}),
    ("llama_gqa", {"heads_keep": 0.5}),
    ("llama_mha", {"heads_keep": 0.75, "mlp_keep": 0.25}),
]


@pytest.mark.parametrize("name,request_", CASES)
def test_surgery_is_exact_and_mlx_lm_loads_it(models, tmp_path, name, request_):
    model, config = load(models[name])
    batches = prune.calibration_batches(random_examples(6, seed=1), batch_size=4)
    res = prune.prune_model(model, config, batches, prune.answer_kl_loss(model, LETTERS), **request_)
    out = prune.write_model_dir(tmp_path / "pruned", res.model, res.config, models[name], {"case": request_},
                                res.record)
    pruned, pconfig = load_model(out)  # what mlx-lm loads from the directory
    tokens = mx.array(np.random.default_rng(2).integers(100, 50000, (2, 11)).astype(np.int32))
    got, want = pruned(tokens), zeroed_reference_logits(models[name], res.record, tokens)
    assert got.shape == want.shape
    assert float(mx.abs(got - want).max()) < 1e-5
    assert float(mx.abs(got - load(models[name])[0](tokens)).max()) > 1e-3  # the pruning did change the model
    n_layers = config["num_hidden_layers"] - request_.get("drop_layers", 0)
    assert pconfig["num_hidden_layers"] == len(pruned.model.layers) == n_layers
    if "mlp_keep" in request_:
        assert pconfig["intermediate_size"] == round(request_["mlp_keep"] * config["intermediate_size"])
    if "heads_keep" in request_:
        nh, nkv = pconfig["num_attention_heads"], pconfig["num_key_value_heads"]
        assert nh == (2 if name == "llama_gqa" else 3) and nkv == (2 if name == "llama_gqa" else 3)
        assert pconfig["head_dim"] == 16
    assert res.record["parameters_after"] == sum(v.size for _, v in tree_flatten(pruned.parameters()))
    assert res.record["parameters_after"] < res.record["parameters_before"]
    assert json.loads((out / "importance.json").read_text())["parameters_after"] == res.record["parameters_after"]
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", ["phi", "llama_gqa"])
def test_layer_importance_equals_reference(models, name):
    model, config = load(models[name])
    fam = prune.family_of(config)
    batches = prune.calibration_batches(random_examples(7, seed=3), batch_size=3)
    loss = prune.answer_kl_loss(model, LETTERS)
    fast = prune.layer_importance(model, fam, batches, loss)
    ref = prune.layer_importance_reference(model, fam, batches, loss)
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-6)
    assert len(set(np.round(ref, 7))) == len(ref)  # distinct scores: the ranking below is not decided by ties
    assert prune.layers_to_keep(fast, 2) == prune.layers_to_keep(ref, 2)


@pytest.mark.parametrize("name,what", [("phi", "mlp"), ("llama_gqa", "mlp"), ("llama_gqa", "heads"),
                                       ("llama_mha", "heads")])
def test_width_importance_equals_reference(models, name, what):
    model, config = load(models[name])
    fam = prune.family_of(config)
    examples = random_examples(3, seed=4)
    fast = prune.width_importance(model, fam, prune.calibration_batches(examples, batch_size=2), what)
    ref = prune.width_importance_reference(model, fam, examples, what)
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-7)
    for f, r in zip(fast, ref):
        assert list(prune.top_units(f, len(f) // 2)) == list(prune.top_units(r, len(r) // 2))


def test_heads_to_keep_groups():
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.8])  # 6 query heads, 2 kv groups of 3
    kept, nh, nkv = prune.heads_to_keep(scores, 6, 2, 0.67)
    assert kept.tolist() == [1, 2, 4, 5] and (nh, nkv) == (4, 2)
    kept, nh, nkv = prune.heads_to_keep(scores, 6, 6, 0.5)
    assert kept.tolist() == [1, 2, 5] and (nh, nkv) == (3, 3)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_train import write_cmmlu, write_store_from_teacher

    from kd_mlx.data import load_cmmlu, make_splits
    from kd_mlx.testing.models import tiny_kimi_k2_dir

    root = tmp_path_factory.mktemp("prune_world")
    data = write_cmmlu(root / "cmmlu")
    cmmlu = load_cmmlu(data)
    write_json_atomic(root / "splits.json", make_splits(cmmlu, seed=0, val=0.2, test=0.2))
    teacher = tiny_kimi_k2_dir(root / "teacher", seed=1)
    student = tiny_phi_dir(root / "student", seed=2, n_layers=4, hidden=64, heads=4)
    store = write_store_from_teacher(root / "store", teacher, cmmlu, cmmlu.test_questions())
    return {"root": root, "data": data, "splits": root / "splits.json", "teacher": teacher, "student": student,
            "store": store}


def run_cli(module_main, args: list[str]):
    from click.testing import CliRunner

    return CliRunner().invoke(module_main, args, catch_exceptions=False)


def common(world) -> list[str]:
    return ["--store", str(world["store"]), "--data", str(world["data"]), "--splits", str(world["splits"]),
            "--teacher-tokenizer", str(world["teacher"]), "--no-progress"]


def test_cli_prunes_fused_adapters_then_recovers(world, tmp_path):
    from kd_mlx.train.cli import main as train_main

    run = tmp_path / "run"
    (tmp_path / "train.yaml").write_text("steps: 2\nbatch_size: 4\neval_every: 2\nsave_every: 2\nlearning_rate: 0.01\n")
    train_args = ["--config", str(tmp_path / "train.yaml"), *common(world)]
    r = run_cli(train_main, ["--student", str(world["student"]), *train_args, "--out", str(run)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "pruned"
    r = run_cli(prune.main_cmd, ["--student", str(world["student"]), "--adapters", str(run / "best"), *common(world),
                                 "--drop-layers", "1", "--mlp-keep", "0.5", "--calib-questions", "12",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "importance.json").read_text())
    cfg = json.loads((out / "prune_config.json").read_text())
    assert cfg["drop_layers"] == 1 and cfg["mlp_keep"] == 0.5 and record["calibration_questions"] == 12
    assert len(record["layers"]["dropped"]) == 1 and record["mlp"]["intermediate_size"] == 128

    # exactness with the adapters: fused with mlx-lm's machinery, then the removed parts skipped / zeroed
    fused, _ = load_model(world["student"])
    load_adapters(fused, str(run / "best"))  # mlx-lm's own loader, independent of kd_mlx's
    fused.eval()
    fuse_adapters(fused)
    fused_dir = tmp_path / "fused"
    prune.write_model_dir(fused_dir, fused, json.loads((world["student"] / "config.json").read_text()),
                          world["student"], {}, {})
    tokens = mx.array([[1000, 2000, 3000, 4000, 5000, 6000]])
    assert float(mx.abs(fused(tokens) - load(world["student"])[0](tokens)).max()) > 1e-3  # the adapters matter
    pruned, _ = load(out)
    assert float(mx.abs(pruned(tokens) - zeroed_reference_logits(fused_dir, record, tokens)).max()) < 1e-5

    r = run_cli(train_main, ["--student", str(out), *train_args, "--out", str(tmp_path / "recovered")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "recovered" / "best" / "adapters.safetensors").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--heads-keep", "0.5"], "cannot be removed"),
    (["--drop-layers", "4"], "--drop-layers must be between 0 and 3"),
    (["--mlp-keep", "1.5"], "--mlp-keep is the fraction kept"),
    ([], "nothing to prune"),
])
def test_cli_refuses_bad_requests_in_one_line(world, tmp_path, extra, message):
    r = run_cli(prune.main_cmd, ["--student", str(world["student"]), *common(world), *extra,
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


def test_cli_output_directory_rule(world, tmp_path):
    """An --out holding anything else, or being / containing / inside an input, is refused before any work."""
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for out, message in ((tmp_path / "busy", "choose another --out"), (world["store"], "the input"),
                         (world["root"], "the input"), (world["store"] / "sub", "the input")):
        r = run_cli(prune.main_cmd, ["--student", str(world["student"]), *common(world), "--drop-layers", "1",
                                     "--out", str(out)])
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine" and not (world["store"] / "sub").exists()
