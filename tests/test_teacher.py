"""Streaming teacher: streamed == mlx-lm in-memory forward, routed-experts-only reads, prefix sharing, budgets, errors,
convert, CLI. Tiny Kimi-K2-shaped models (fp32 and 4-bit) and the real SmolLM2-135M."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from kd_mlx.teacher import StreamingTeacher, reference_logprobs_at
from kd_mlx.teacher.loading import load_in_memory, normalise_config
from kd_mlx.testing.models import (smollm2_dir, tiny_family_dir, tiny_hf_kimi_k2_checkpoint, tiny_kimi_k2_dir,
                                    tiny_phi_dir)
from kd_mlx.utils import KDError

TOL = 1e-4


def memory_before() -> int:
    """MLX memory held before the code under test runs (arrays other tests keep alive in caches): the budget bounds
    the peak above it."""
    gc.collect()
    mx.clear_cache()
    return mx.get_active_memory()


@pytest.fixture(scope="session")
def kimi32(tmp_path_factory) -> Path:
    return tiny_kimi_k2_dir(tmp_path_factory.mktemp("kimi32"))


@pytest.fixture(scope="session")
def kimi4(tmp_path_factory) -> Path:
    return tiny_kimi_k2_dir(tmp_path_factory.mktemp("kimi4"), bits=4)


@pytest.fixture(scope="session")
def smol() -> Path:
    return smollm2_dir()


def _seqs(seed: int, lengths, vocab=100_000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def _check_equal(out, ref):
    assert len(out) == len(ref)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == np.float32
        assert float(np.abs(a - b).max()) <= TOL
        assert (a.argmax(-1) == b.argmax(-1)).all()
        assert np.allclose(np.exp(a.astype(np.float64)).sum(-1), 1.0, atol=1e-5)  # a real distribution over the full vocab


@pytest.mark.parametrize("which", ["kimi32", "kimi4"])
def test_streamed_equals_in_memory_under_budget_smaller_than_model(which, request):
    path = request.getfixturevalue(which)
    seqs = _seqs(1, (9, 14, 4))
    pos = [[0, 3, len(s) - 1] if len(s) > 3 else [len(s) - 1] for s in seqs]
    ref = reference_logprobs_at(path, seqs, pos)
    base = memory_before()
    t = StreamingTeacher(path, memory_budget=4_000_000)
    assert t.files.total_bytes > 2 * t.memory_budget  # the model does not fit
    mx.reset_peak_memory()
    out = t.logprobs_at(seqs, pos)
    peak = mx.get_peak_memory() - base
    _check_equal(out, ref)
    assert peak <= 1.1 * t.memory_budget, (peak, t.memory_budget)
    # the distributions are not uniform: the test would be vacuous otherwise
    assert max(float(np.exp(o).max()) for o in out) > 20 / 100_512


@pytest.mark.parametrize("kernel,dequant_min", [("gather", 16), ("dense", 1), ("dense", 10**9)],
                         ids=["gather-mlx-lm-switchglu", "dense-dequantized", "dense-quantized-matmul"])
def test_expert_kernels_agree_with_mlx_lm(kimi4, kernel, dequant_min):
    """Both MoE kernels (mlx-lm's SwitchGLU gather kernels; per-expert dense, dequantized or not) == reference."""
    seqs = _seqs(8, (12, 7))
    pos = [[len(s) - 1] for s in seqs]
    ref = reference_logprobs_at(kimi4, seqs, pos)
    for deq_layers in (False, True):  # attention/dense linears: quantized_matmul or dequantized fp32 (CPU path)
        t = StreamingTeacher(kimi4, 4_000_000, expert_kernel=kernel, dequant_min_tokens=dequant_min,
                             dequantize_layers=deq_layers)
        assert any(t.plan.dequant_layers) == deq_layers
        _check_equal(t.logprobs_at(seqs, pos), ref)


def test_direct_reads_equal_plain_reads(kimi4):
    """Weights read straight into MLX buffers give exactly the log-probs of the plain path (numpy read, then copy)."""
    seqs = _seqs(9, (12, 7))
    pos = [[3, len(s) - 1] for s in seqs]
    fast = StreamingTeacher(kimi4, 4_000_000).logprobs_at(seqs, pos)
    plain = StreamingTeacher(kimi4, 4_000_000, direct_reads=False).logprobs_at(seqs, pos)
    for a, b in zip(fast, plain):
        np.testing.assert_array_equal(a, b)
    # past the page cache (O_DIRECT; the default for models larger than physical memory): the same bytes
    t = StreamingTeacher(kimi4, 4_000_000, uncached_reads=True)
    assert not StreamingTeacher(kimi4, 4_000_000).files.uncached  # a small model: through the page cache
    for a, b in zip(t.logprobs_at(seqs, pos), plain):
        np.testing.assert_array_equal(a, b)
    if hasattr(os, "O_DIRECT"):
        assert t.files.uncached_bytes > 0


def test_head_read_during_last_layer_equals_reading_it_after(kimi32):
    """The LM head's first rows read on a second thread while the last layer runs (its expert groups then held
    smaller): same log-probs, same bytes read (the head once), MLX peak within the budget."""
    seqs = _seqs(10, (9, 6, 4))
    pos = [[0, len(s) - 1] for s in seqs]
    budget = 3_000_000
    after = StreamingTeacher(kimi32, budget, prefetch=False)
    ref = after.logprobs_at(seqs, pos)
    base = memory_before()
    t = StreamingTeacher(kimi32, budget, process_bytes=0)  # no interpreter memory counted: the head has room
    assert 0 < t.plan.head_prefetch_rows < t.vocab_size and 0 < t.plan.last_experts_per_group
    mx.reset_peak_memory()
    out = t.logprobs_at(seqs, pos)
    assert mx.get_peak_memory() - base <= 1.1 * budget
    _check_equal(out, ref)  # not bitwise: BLAS may sum differently for another slicing of the head
    assert t.stats.bytes_read == after.stats.bytes_read
    _check_equal(out, reference_logprobs_at(kimi32, seqs, pos))


def test_moe_reads_only_routed_experts(kimi32):
    """Bytes read from stacked expert tensors == (experts some token chose) x (bytes per expert), per layer."""
    seq = _seqs(2, (3,))
    model, _ = load_in_memory(kimi32)
    routed: dict[int, set] = {}
    for li, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "switch_mlp"):
            gate = layer.mlp.gate

            class Spy:  # records the router's choice in the reference forward
                def __init__(self, g, li):
                    self.g, self.li = g, li

                def __call__(self, x):
                    inds, scores = self.g(x)
                    routed.setdefault(self.li, set()).update(np.array(inds).reshape(-1).tolist())
                    return inds, scores

            layer.mlp.gate = Spy(gate, li)
    model(mx.array(seq))
    t = StreamingTeacher(kimi32, memory_budget=4_000_000)
    t.logprobs_at(seq, [[2]])
    per_expert = {li: b for li, b in enumerate(t.plan.expert_bytes) if b}
    expected = sum(len(routed[li]) * per_expert[li] for li in per_expert)
    assert t.stats.per_layer_experts == {li: len(v) for li, v in routed.items()}
    assert t.stats.expert_bytes_read == expected
    all_experts = sum(per_expert[li] * t.plan.n_experts[li] for li in per_expert)
    assert 0 < expected < all_experts  # 3 tokens x 2 experts cannot touch all 8 experts of both layers
    # total bytes: each weight once, except the embedding (only the 3 rows used)
    emb = t.files.info("model.embed_tokens.weight")
    assert t.stats.bytes_read < t.files.total_bytes - emb.nbytes + 3 * emb.row_bytes


def test_prefix_sharing_equals_recompute(kimi4):
    prefix = _seqs(3, (11,))[0]
    seqs = _seqs(4, (5, 8, 2))
    pos = [list(range(len(s))) for s in seqs]
    t = StreamingTeacher(kimi4, memory_budget=4_000_000, max_block=4)  # query blocks of 4: exercises the cache
    shared = t.logprobs_at(seqs, pos, prefix=prefix)
    recompute = t.logprobs_at([prefix + s for s in seqs], [[len(prefix) + p for p in ps] for ps in pos])
    ref = reference_logprobs_at(kimi4, seqs, pos, prefix=prefix)
    _check_equal(shared, recompute)
    _check_equal(shared, ref)


def test_many_chunks_and_reduce(kimi32):
    """A budget so small that sequences go in several chunks (several passes over the weights): same results."""
    seqs = _seqs(5, (6, 6, 7, 3, 5))
    pos = [[len(s) - 1] for s in seqs]
    ref = reference_logprobs_at(kimi32, seqs, pos)
    base = memory_before()
    t = StreamingTeacher(kimi32, memory_budget=1_500_000)
    mx.reset_peak_memory()
    top = t.logprobs_at(seqs, pos, reduce=lambda lp, _: int(np.argmax(lp[-1])))
    assert mx.get_peak_memory() - base <= 1.1 * 1_500_000
    assert t.stats.chunks > 1
    assert top == [int(np.argmax(r[-1])) for r in ref]


def test_task_threads_are_reused_across_calls(kimi32):
    """Tasks run on threads the executor keeps: many calls add no threads after the first (MLX keeps state per
    thread that is never released, and freeing its buffer cache walks all of it)."""
    import threading

    seqs = _seqs(6, (6, 7, 5))
    t = StreamingTeacher(kimi32, memory_budget=1_500_000)
    first = t.logprobs_at(seqs, [[len(s) - 1] for s in seqs])
    after_first = sum(th.name == "kd-task" for th in threading.enumerate())
    for _ in range(5):
        again = t.logprobs_at(seqs, [[len(s) - 1] for s in seqs])
    assert sum(th.name == "kd-task" for th in threading.enumerate()) == after_first
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    del t
    gc.collect()
    deadline = time.time() + 10
    while sum(th.name == "kd-task" for th in threading.enumerate()) >= after_first and time.time() < deadline:
        time.sleep(0.05)
    assert sum(th.name == "kd-task" for th in threading.enumerate()) < after_first  # a collected executor's end


def test_skeleton_allocates_nothing(kimi32):
    mx.clear_cache()
    before = mx.get_active_memory()
    t = StreamingTeacher(kimi32, memory_budget=None)
    assert mx.get_active_memory() - before < 1_000_000  # 52 MB model, nothing materialised
    assert t.files.bytes_read == 0


def test_budget_too_small_is_refused_up_front(kimi32):
    with pytest.raises(KDError, match="largest indivisible tensor model.layers.0.mlp"):
        StreamingTeacher(kimi32, memory_budget=20_000)
    with pytest.raises(KDError, match="too small"):
        StreamingTeacher(kimi32, memory_budget=200_000)


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_and_corrupt_shards_are_named(kimi4, tmp_path):
    m = _copy_model(kimi4, tmp_path / "missing")
    (m / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(KDError, match="missing shard .*model-00002-of-00003.safetensors"):
        StreamingTeacher(m, 4_000_000)
    m = _copy_model(kimi4, tmp_path / "truncated")
    f = m / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(KDError, match="corrupt shard .*model-00003-of-00003.safetensors"):
        StreamingTeacher(m, 4_000_000)
    m = _copy_model(kimi4, tmp_path / "garbage")
    f = m / "model-00001-of-00003.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(KDError, match="corrupt shard .*model-00001-of-00003.safetensors"):
        StreamingTeacher(m, 4_000_000)


def test_rope_parameters_are_normalised_or_refused(kimi32, tmp_path):
    cfg = json.loads((kimi32 / "config.json").read_text())
    # transformers 5 style: rope_theta and the yarn scaling inside rope_parameters
    t5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    t5["rope_parameters"] = {"rope_theta": cfg["rope_theta"], "rope_type": "yarn",
                             **{k: v for k, v in cfg["rope_scaling"].items() if k != "type"}}
    norm = normalise_config(t5)
    assert norm["rope_theta"] == cfg["rope_theta"] and norm["rope_scaling"]["factor"] == 32.0
    assert "rope_parameters" not in norm
    m = _copy_model(kimi32, tmp_path / "t5")
    (m / "config.json").write_text(json.dumps(t5))
    seqs, pos = _seqs(6, (6,)), [[1, 5]]
    _check_equal(StreamingTeacher(m, 4_000_000).logprobs_at(seqs, pos), reference_logprobs_at(kimi32, seqs, pos))
    _check_equal(reference_logprobs_at(m, seqs, pos), reference_logprobs_at(kimi32, seqs, pos))
    bad = dict(t5, rope_parameters={"full_attention": {"rope_theta": 1e4}, "sliding_attention": {"rope_theta": 1e4}})
    with pytest.raises(KDError, match="rope_parameters"):
        normalise_config(bad)


def test_kimi_tokenizer_loads_natively(kimi4):
    t = StreamingTeacher(kimi4, None)
    ids = t.tokenizer.encode("以下是关于中国历史的单项选择题")
    assert ids and t.tokenizer.decode(ids) == "以下是关于中国历史的单项选择题"


@pytest.mark.slow
def test_smollm2_streamed_equals_in_memory(smol):
    base = memory_before()
    t = StreamingTeacher(smol, memory_budget=20_000_000)
    assert t.files.total_bytes > 4 * t.memory_budget
    tok = t.tokenizer
    seqs = [tok.encode("The capital of France is"), tok.encode("1, 2, 3,")]
    pos = [list(range(len(s))) for s in seqs]
    mx.reset_peak_memory()
    out = t.logprobs_at(seqs, pos)
    assert mx.get_peak_memory() - base <= 1.1 * t.memory_budget
    model, _ = load_in_memory(smol)
    ref = reference_logprobs_at(smol, seqs, pos, model=model)
    _check_equal(out, ref)
    assert tok.decode([int(out[0][-1].argmax())]) == " Paris"
    assert 0.6 < float(np.exp(out[0][-1].max())) < 0.9  # a real, confident model (p(" Paris") ~ 0.77)
    prefix = tok.encode("Question: name the capital.\n")
    _check_equal(t.logprobs_at(seqs, pos, prefix=prefix), reference_logprobs_at(smol, seqs, pos, prefix, model=model))


@pytest.mark.parametrize("fp8,keep", [(False, False), (True, False), (False, True)], ids=["bf16", "fp8", "keep-dtype"])
def test_convert_matches_in_memory_quantization(fp8, keep, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, quantize_model

    from kd_mlx.teacher.cli import cli

    src = tiny_hf_kimi_k2_checkpoint(tmp_path / "hf", fp8=fp8)
    dst = tmp_path / "mlx"
    # the HF layout (per-expert tensors, kv_b_proj) streams only once converted: refused with the command
    with pytest.raises(KDError, match=f"kd_mlx.teacher convert {src}"):
        StreamingTeacher(src, None)
    # fp32 (--dtype) so that the streamed check below runs on CPU, where MLX has no bf16 gather_mm
    bits = ["--keep-dtype", "--dtype", "float32"] if keep else ["--bits", "4", "--group-size", "32"]
    r = CliRunner().invoke(cli, ["convert", str(src), str(dst), *bits, "--shard-size", "200KB"])
    assert r.exit_code == 0, r.output
    assert len(list(dst.glob("model-*.safetensors"))) > 1
    converted, cfg_out = load_model(dst)
    ref, cfg = load_model(src)  # mlx-lm: fp8 dequant + expert stacking + MLA split in sanitize, all in memory
    if keep:
        ref.set_dtype(mx.float32)
    else:
        ref, _ = quantize_model(ref, cfg, group_size=32, bits=4)
    assert ("quantization" in cfg_out) != keep
    a, b = dict(tree_flatten(converted.parameters())), dict(tree_flatten(ref.parameters()))
    assert set(a) == set(b)
    assert any(k.endswith("switch_mlp.gate_proj.scales") for k in a) != keep
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]), k
    # and it streams: expert-granular reads from the converted stacked experts
    seqs, pos = _seqs(7, (5,), vocab=1000), [[4]]
    _check_equal(StreamingTeacher(dst, None).logprobs_at(seqs, pos), reference_logprobs_at(dst, seqs, pos))


def test_convert_refuses_bad_input(tmp_path, kimi4):
    from kd_mlx.teacher.cli import cli

    r = CliRunner().invoke(cli, ["convert", str(kimi4), str(tmp_path / "o")])
    assert r.exit_code == 1 and "already an MLX quantized model" in r.output
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert r.exit_code == 1 and "not found" in r.output
    assert not (tmp_path / "o").exists()


def test_cli_score_and_inspect(kimi4, tmp_path):
    from safetensors.numpy import load_file

    from kd_mlx.teacher.cli import cli

    prompts = tmp_path / "p.jsonl"
    texts = ["The capital of France is", "以下是关于中国历史的单项选择题"]
    prompts.write_text("".join(json.dumps({"prompt": x}, ensure_ascii=False) + "\n" for x in texts))
    out = tmp_path / "s.safetensors"
    r = CliRunner().invoke(cli, ["score", str(kimi4), "--prompts", str(prompts), "--memory-budget", "4MB",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    lp = load_file(str(out))["logprobs"]
    assert lp.shape == (2, 100_512) and lp.dtype == np.float32
    t = StreamingTeacher(kimi4, None)
    seqs = [t.tokenizer.encode(x) for x in texts]
    ref = reference_logprobs_at(kimi4, seqs, [[len(s) - 1] for s in seqs])
    assert float(np.abs(lp - np.concatenate(ref)).max()) <= TOL
    saved = json.loads((tmp_path / "s.config.json").read_text())
    assert saved["memory_budget"] == "4MB" and saved["result"]["prompts"] == 2
    r = CliRunner().invoke(cli, ["inspect", str(kimi4), "--memory-budget", "4MB"])
    assert r.exit_code == 0 and "largest indivisible tensor" in r.output and "experts per group" in r.output
    r = CliRunner().invoke(cli, ["score", str(kimi4), "--prompts", str(prompts), "--memory-budget", "1KB",
                                 "--out", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "largest indivisible tensor" in r.output
    assert not (tmp_path / "x.safetensors").exists()
    prompts.write_text('{"prompt": "ok"}\nnot json\n')
    r = CliRunner().invoke(cli, ["score", str(kimi4), "--prompts", str(prompts), "--out", str(out)])
    assert r.exit_code == 1 and "p.jsonl:2" in r.output


def test_tiny_phi_student_loads_in_mlx_lm(tmp_path):
    import mlx_lm

    from kd_mlx.tokenizer import load_tokenizer

    d = tiny_phi_dir(tmp_path / "phi")
    model, _ = mlx_lm.load(str(d))
    tok = load_tokenizer(d)
    assert len(tok) == 50295
    assert model(mx.array([tok.encode("hello world")])).shape == (1, 2, 51200)
    assert tiny_phi_dir(tmp_path / "phi") == d  # idempotent
    # the student streams too (phi family): same log-probs
    seqs, pos = [tok.encode("def f(x):\n    return x")], [[0, 3]]
    _check_equal(StreamingTeacher(d, None).logprobs_at(seqs, pos), reference_logprobs_at(d, seqs, pos))
    assert os.path.exists(d / "config.json")


def test_synthetic_teacher_writer_small(tmp_path):
    """The real-width generator at toy width: a loadable mlx-lm 4-bit model of the asked depth / size."""
    from mlx_lm.utils import load_model

    from kd_mlx.testing.models import synthetic_kimi_k2_dir

    small = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 16,
             "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 64,
             "vocab_size": 100_512}
    d = synthetic_kimi_k2_dir(tmp_path / "syn", target_bytes=12_000_000, progress=False, **small)
    cfg = json.loads((d / "config.json").read_text())
    size = json.loads((d / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert size >= 12_000_000 and cfg["quantization"]["bits"] == 4
    load_model(d)  # names, shapes and quantization as mlx-lm expects
    seqs, pos = _seqs(9, (6,)), [[5]]
    _check_equal(StreamingTeacher(d, 8_000_000).logprobs_at(seqs, pos), reference_logprobs_at(d, seqs, pos))


def test_many_sequences_keep_the_experts_rows_within_the_budget(tmp_path):
    """A call of many sequences through a MoE whose tokens each select 8 experts: the experts stage holds one row per
    (token, expert), so chunks are sized for those rows too and the MLX peak stays within the budget; same
    log-probs as the in-memory model."""
    path = tiny_family_dir("qwen3_moe", tmp_path / "qwen_k8", overrides={"num_experts_per_tok": 8})
    total = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    seqs = _seqs(4, [24] * 40, vocab=4096)
    pos = [[0, len(s) - 1] for s in seqs]
    ref = reference_logprobs_at(path, seqs, pos)
    base = memory_before()
    t = StreamingTeacher(path, total // 2)
    mx.reset_peak_memory()
    out = t.logprobs_at(seqs, pos)
    assert mx.get_peak_memory() - base <= 1.1 * t.memory_budget
    assert t.stats.chunks > 1
    _check_equal(out, ref)
