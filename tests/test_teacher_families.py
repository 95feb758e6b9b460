"""Generic streaming over mlx-lm families: a tiny random model of each family, built with mlx-lm's own ModelArgs and
saved as mlx-lm saves it (fp32, 4-bit, mixed precision, mxfp4), streamed under a budget at most half its size,
equals mlx-lm's own in-memory forward of the same files; only the routed experts some token selected are read;
`teacher dump` of a hybrid linear-attention MoE model writes a valid store; each family's directory tokenizes as
mlx-lm's own loader does."""

from __future__ import annotations

import gc
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from kd_mlx.teacher import StreamingTeacher, reference_logprobs_at
from kd_mlx.teacher.dump import dump_store
from kd_mlx.teacher.loading import load_in_memory
from kd_mlx.teacher.streaming import Structure, _module_at, _swap
from kd_mlx.testing.models import TINY_VOCAB, families_markdown, tiny_family_configs, tiny_family_dir
from kd_mlx.tokenizer import HFTokenizer, load_tokenizer
from kd_mlx.utils import KDError, write_json_atomic

from test_dump import write_cmmlu
from test_tokenizer import SAMPLES, chinese_prompts, mlx_lm_ids

REPO = Path(__file__).resolve().parents[1]
FAMILIES = sorted(tiny_family_configs())
MOE = ["deepseek_v32", "glm4_moe", "gpt_oss", "kimi_k2", "kimi_k25", "kimi_k3", "minimax", "mixtral", "qwen3_5_moe",
       "qwen3_moe", "qwen3_next"]
TOL = 1e-4
# transformers builds its own tokenizer class for these model types, with its own pre-tokenizer
TOKENIZER_CLASS_REPLACES_PRE_TOKENIZER = {"qwen3_5_moe"}
MLX_LM_CANNOT_LOAD_TOKENIZER = {"kimi_k2"}


def memory_before() -> int:
    """MLX memory held before the code under test runs (arrays other tests keep alive in caches): the budget bounds
    the peak above it."""
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda family, quant=None: tiny_family_dir(family, root / f"{family}-{quant}", quant)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, TINY_VOCAB, size=6).tolist()
    seqs = [rng.integers(0, TINY_VOCAB, size=n).tolist() for n in (9, 14, 4)]
    pos = [[0, 3, len(s) - 1] if len(s) > 3 else [len(s) - 1] for s in seqs]
    return prefix, seqs, pos


def _routed_experts(path: Path, seqs: list[list[int]]) -> dict[int, set]:
    """Experts mlx-lm's own in-memory forward routes each token to, per layer (its experts modules recorded)."""
    model, _ = load_in_memory(path)
    s = Structure.of(model)
    routed: dict[int, set] = {}

    class Recorder:
        def __init__(self, module, li):
            self.module, self.li = module, li

        def __call__(self, x, indices):
            routed.setdefault(self.li, set()).update(np.array(indices).reshape(-1).tolist())
            return self.module(x, indices)

    for li, layer in enumerate(s.layers):
        for p in s.experts[li]:
            _swap(layer, p, Recorder(_module_at(layer, p), li))
    mx.disable_compile()  # as the streamed forward runs: router near-ties then break the same way
    try:
        for seq in seqs:
            mx.eval(model(mx.array([seq])))
    finally:
        mx.enable_compile()
    return routed


def _stream(path: Path, budget_fraction: float = 0.5, **kw) -> StreamingTeacher:
    size = StreamingTeacher(path, None).files.total_bytes
    t = StreamingTeacher(path, int(size * budget_fraction), **kw)
    assert not t.plan.resident and t.memory_budget <= size // 2
    return t


def _check(out, ref):
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == np.float32
        assert float(np.abs(a - b).max()) <= TOL
        assert (a.argmax(-1) == b.argmax(-1)).all()
    assert max(float(np.exp(o).max()) for o in out) > 20 / TINY_VOCAB  # not a uniform distribution


@pytest.mark.parametrize("quant", [None, "4bit"], ids=["fp32", "4bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_streamed_equals_mlx_lm(models, family, quant):
    """Prefix shared through mlx-lm's caches, query blocks of 4 tokens (longer than the 4-token sliding windows and
    sparse-attention top-k), budget half the model: equal to `model(prefix + sequence)` in memory."""
    path = models(family, quant)
    prefix, seqs, pos = _inputs()
    ref = reference_logprobs_at(path, seqs, pos, prefix=prefix)
    base = memory_before()
    t = _stream(path, max_block=4)
    mx.reset_peak_memory()
    out = t.logprobs_at(seqs, pos, prefix=prefix)
    _check(out, ref)
    # the budget bounds the model's memory; the asked rows of full-vocabulary logits are the caller's (dump bounds
    # positions per call): fp32 logits and their concatenation
    assert mx.get_peak_memory() - base <= 1.1 * t.memory_budget + 8 * TINY_VOCAB * sum(map(len, pos))


@pytest.mark.parametrize("quant", ["mixed", "mxfp4"])
@pytest.mark.parametrize("family", ["kimi_k25", "qwen3_5_moe", "gpt_oss", "glm4_moe"])
def test_mixed_precision_and_mxfp4_equal_mlx_lm(models, family, quant):
    """Per-module bits/group size overrides (3-bit experts, 6-bit shared expert, 8-bit embedding and head, router
    unquantized) and mxfp4: the plan sizes each module by its own bytes; logits equal mlx-lm's forward."""
    path = models(family, quant)
    prefix, seqs, pos = _inputs(1)
    t = _stream(path)
    f = t.files
    for i, keys in enumerate(t.layer_keys):
        assert t.plan.layer_bytes[i] - sum(f.info(k).nbytes for k in keys) in (0, t._dequant_bytes(i))
    _check(t.logprobs_at(seqs, pos, prefix=prefix), reference_logprobs_at(path, seqs, pos, prefix=prefix))


@pytest.mark.parametrize("family", MOE)
def test_moe_reads_only_the_routed_experts(models, family):
    """Bytes read from the stacked experts == (experts some token chose, per layer) x (bytes per expert), with the
    experts read in several groups (a budget a quarter of the model)."""
    path = models(family)
    _, seqs, _ = _inputs(2)
    seqs = [seqs[0][:3]]  # 6 (token, slot) choices cannot touch all 8 experts of a layer
    routed = _routed_experts(path, seqs)
    try:
        t = _stream(path, 0.25)
    except KDError:
        t = _stream(path, 0.5)
    t.logprobs_at(seqs, [[len(s) - 1] for s in seqs])
    assert t.stats.per_layer_experts == {li: len(v) for li, v in routed.items()}
    expected = sum(len(routed[li]) * t.plan.expert_bytes[li] for li in routed)
    assert t.stats.expert_bytes_read == expected
    assert 0 < expected < sum(t.plan.expert_bytes[li] * t.plan.n_experts[li] for li in routed)


def test_dump_of_a_hybrid_linear_attention_moe_writes_a_valid_store(tmp_path):
    from kd_mlx.store import TopKStore, verify_store

    teacher = tiny_family_dir("qwen3_next", tmp_path / "teacher", tokenizer="phi")
    data = write_cmmlu(tmp_path / "cmmlu", n_dev=2, n_test=3)
    size = StreamingTeacher(teacher, None).files.total_bytes
    cfg = {"teacher": str(teacher), "data": str(data), "shots": 2, "top_k": 4, "shard_size": 4,
           "positions": "answer", "memory_budget": str(size // 2), "encoding": "fp32", "out": str(tmp_path / "store")}
    dump_store(cfg, progress=False, log=lambda m: None)
    assert verify_store(tmp_path / "store") == []
    st = TopKStore(tmp_path / "store")
    assert len(st) == 6 and st.identity["model_type"] == "qwen3_next"
    rec = st[st.ids[0]]
    ref = reference_logprobs_at(teacher, [rec.token_ids.tolist()], [[len(rec.token_ids) - 1]])[0][0]
    assert np.abs(rec.topk_logprobs[-1] - np.sort(ref)[::-1][:4]).max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenization_equals_mlx_lm_loader(tmp_path, phi_tok_dir, family):
    """The tokenizer files `tiny_family_dir(..., tokenizer="phi")` writes, under each family's config.json: kd_mlx's
    ids are those of mlx-lm's own loader. For qwen3_5_moe transformers builds Qwen3_5Tokenizer, whose pre-tokenizer
    differs from the GPT-2 one of the tokenizer.json; where mlx-lm cannot load the tokenizer at all (kimi_k2's yarn
    config, which transformers does not parse) kd_mlx reads tokenizer.json alone."""
    d = tmp_path / family
    shutil.copytree(phi_tok_dir, d)
    write_json_atomic(d / "config.json", tiny_family_configs()[family])
    texts = chinese_prompts() + SAMPLES
    alone = HFTokenizer.from_file(d / "tokenizer.json")
    if family in MLX_LM_CANNOT_LOAD_TOKENIZER:
        with pytest.raises(AttributeError):
            mlx_lm_ids(d, texts)
        with pytest.warns(UserWarning, match="tokenizer.json alone"):
            tok = load_tokenizer(d)
        expected = [alone.encode(t) for t in texts]
    else:
        tok = load_tokenizer(d)
        expected = mlx_lm_ids(d, texts)
    assert [tok.encode(t) for t in texts] == expected
    assert ([alone.encode(t) for t in texts] != expected) == (family in TOKENIZER_CLASS_REPLACES_PRE_TOKENIZER)


def test_readme_lists_the_tested_families():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- families:start -->\n(.*?)<!-- families:end -->", readme, re.S)
    assert block is not None and block.group(1) == families_markdown(), \
        "README family list is stale: run `python scripts/readme_families.py`"


def test_inspect_prints_the_plan_for_every_family(models):
    from click.testing import CliRunner

    from kd_mlx.teacher.cli import cli

    for family in FAMILIES:
        path = models(family, "4bit")
        size = StreamingTeacher(path, None).files.total_bytes
        r = CliRunner().invoke(cli, ["inspect", str(path), "--memory-budget", str(int(size * 0.9))])
        assert r.exit_code == 0, (family, r.output)
        assert "largest indivisible tensor" in r.output and "experts per group" in r.output
        assert ("experts x" in r.output) == (family in MOE), family


def test_real_kimi_k2_layout_plans_under_16gb(tmp_path):
    """The real Kimi-K2-Base layout (61 layers, first dense, 384 experts, n_group 1, vocab 163,840, yarn rope) at
    4-bit, headers only: the skeleton builds without reading a weight and the plan streams it under 16 GB."""
    from click.testing import CliRunner

    from kd_mlx.teacher.cli import cli
    from kd_mlx.testing.models import kimi_k2_real_layout_dir

    path = kimi_k2_real_layout_dir(tmp_path / "kimi_k2")
    t = StreamingTeacher(path, 16 * 10**9)
    assert t.family == "deepseek_v3" and t.config["rope_scaling"]["type"] == "yarn" and t.vocab_size == 163_840
    assert t.plan.n_experts == [0] + [384] * 60
    per_expert = 3 * (2048 * 7168 // 2 + 2 * 2 * 2048 * 7168 // 64)  # 4-bit weight + bf16 scales and biases
    assert t.plan.expert_bytes == [0] + [per_expert] * 60
    assert 570e9 < t.files.total_bytes < 580e9 and not t.plan.resident and t.plan.experts_per_group >= 8
    assert t.files.bytes_read == 0
    r = CliRunner().invoke(cli, ["inspect", str(path), "--memory-budget", "16GB"])
    assert r.exit_code == 0 and "384 experts" in r.output and "parameters  1026.4" in r.output  # ~1T, as Kimi-K2
