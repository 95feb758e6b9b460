"""The streaming executor: run an mlx-lm model far larger than memory under a hard memory budget.

Layer-major order. For a chunk of sequences: embed (only the embedding rows of the tokens present), then for each
layer install only that layer's weights into the mlx-lm model's own layer module, run every micro-batch of the chunk
through it, and release them. MoE layers (deepseek_v3 / kimi_k2 `switch_mlp`) run in two passes: pass A runs
attention, the router and the shared expert (recording each token's MLP input and routing); pass B reads only the
experts some token selected, by byte range from the stacked expert tensors, in groups that fit the budget, and adds
their weighted outputs (the routed part of an MoE layer is a pure residual addition, so deferring it is exact).
The final norm and LM head run only at the asked positions, the head read in vocabulary slices.

A background thread reads the next layer (or expert group) from disk while the current one computes, when the
budget has room for both. A k-shot prefix shared by all sequences is computed once per layer; its KV cache (mlx-lm's
`KVCache`) is reused by every suffix, which equals recomputing prefix + suffix.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..utils import KDError, format_bytes, resolve_model_path
from .loading import LazyModel, build_skeleton

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "deepseek_v3", "phi")


# ------------------------------------------------------------------------------------------------ architecture
class Arch:
    """Where an mlx-lm model keeps its embedding, layers, final norm and head (per supported family)."""

    def __init__(self, model, config: dict):
        family = type(model).__module__.rsplit(".", 1)[-1]
        if family not in SUPPORTED:
            raise KDError(f"model type {config.get('model_type')!r} ({family}) is not supported by the streaming "
                          f"executor (supported: {', '.join(SUPPORTED)}); use the in-memory path")
        self.family = family
        inner = model.model
        self.embed = inner.embed_tokens
        self.embed_prefix = "model.embed_tokens"
        self.layers = list(inner.layers)
        if family == "llama" and getattr(inner, "swa_idx", None) is not None:
            raise KDError("sliding-window llama layers are not supported by the streaming executor")
        if family == "phi":
            self.norm, self.norm_prefix = inner.final_layernorm, "model.final_layernorm"
        else:
            self.norm, self.norm_prefix = inner.norm, "model.norm"
        if "lm_head" in model:
            self.head, self.head_prefix, self.tied = model.lm_head, "lm_head", False
        else:
            self.head, self.head_prefix, self.tied = self.embed, self.embed_prefix, True
        self.mask_array = family == "deepseek_v3"  # MLA uses the mask as an additive score array

    def is_moe(self, i: int) -> bool:
        mlp = getattr(self.layers[i], "mlp", None)
        return mlp is not None and hasattr(mlp, "switch_mlp") and hasattr(mlp, "gate")

    def apply_head(self, x):
        return self.embed.as_linear(x) if self.tied else self.head(x)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    budget: int | None
    layer_bytes: list[int]  # resident (non-expert) bytes per layer
    expert_bytes: list[int]  # bytes of one routed expert per layer (0: dense)
    n_experts: list[int]
    largest_tensor: tuple[str, int]
    act_budget: int  # bytes for activations (hidden states, attention, MLP intermediates)
    prefetch_layers: bool
    experts_per_group: int
    prefetch_experts: bool
    head_rows: int  # vocabulary rows of the LM head read at once
    total_bytes: int
    dequant_layers: list = field(default_factory=list)  # per layer: quantized linears run dequantized
    # (their fp32 copies are counted in layer_bytes)

    def describe(self) -> dict:
        return {
            "memory_budget": self.budget, "model_bytes_on_disk": self.total_bytes,
            "largest_indivisible_tensor": {"name": self.largest_tensor[0], "bytes": self.largest_tensor[1]},
            "max_layer_resident_bytes": max(self.layer_bytes), "max_expert_bytes": max(self.expert_bytes),
            "activation_budget": self.act_budget, "prefetch_layers": self.prefetch_layers,
            "experts_per_group": self.experts_per_group, "prefetch_experts": self.prefetch_experts,
            "lm_head_rows_per_read": self.head_rows, "dequantized_layers": [i for i, d in enumerate(self.dequant_layers) if d],
        }


class _Prefetcher:
    """One background reader thread: file reads release the GIL, so they overlap MLX compute."""

    def __init__(self, enabled: bool):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-prefetch") if enabled else None

    def submit(self, fn: Callable, *args) -> Future:
        if self.pool is None:
            f: Future = Future()
            f.set_result(fn(*args))
            return f
        return self.pool.submit(fn, *args)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class StreamStats:
    bytes_read: int = 0
    expert_bytes_read: int = 0
    experts_loaded: int = 0
    layer_passes: int = 0
    chunks: int = 0
    tokens: int = 0
    prefix_tokens: int = 0
    wall_s: float = 0.0
    io_wait_s: float = 0.0
    per_layer_experts: dict = field(default_factory=dict)


class _MoERecorder:
    """Stands in for a deepseek_v3 MoE block during pass A: routes, runs the shared expert, records the rest."""

    def __init__(self, moe):
        self.moe = moe
        self.records: list[tuple[Any, Any, Any]] = []

    def __call__(self, x):
        import mlx.core as mx

        inds, scores = self.moe.gate(x)
        # the shared expert's output is kept apart and added with the routed sum in pass B, in the same order as
        # mlx-lm's `h + (routed + shared)`, so low-precision (bf16) models round exactly as the reference does
        shared = self.moe.shared_experts(x) if self.moe.config.n_shared_experts is not None else mx.zeros_like(x)
        self.records.append((x, inds, scores, shared))
        return mx.zeros_like(x)


class StreamingTeacher:
    """Log-probs of a model of any size under a memory budget (bytes; None = no budget, everything fits).

    `logprobs_at(sequences, positions, prefix=None, reduce=None)`: for each sequence (token ids after `prefix`),
    the float32 log-softmax over the full vocabulary at `positions[i]` (indices into the sequence, not counting the
    prefix) as a numpy array (len(positions[i]), vocab), or `reduce(that array)`."""

    def __init__(self, model_dir: str | Path, memory_budget: int | None = None, *, trust_remote_code: bool = False,
                 prefetch: bool = True, max_block: int = 512, progress: bool = False,
                 expert_kernel: str | None = None, dequant_min_tokens: int = 16,
                 dequantize_layers: bool | None = None):
        from mlx.utils import tree_flatten

        self.model_dir = resolve_model_path(str(model_dir))
        self.trust_remote_code = trust_remote_code
        lm: LazyModel = build_skeleton(self.model_dir, trust_remote_code)
        self.model, self.config, self.files = lm.model, lm.config, lm.files
        self.arch = Arch(self.model, self.config)
        self.memory_budget = memory_budget
        self.max_block = max_block
        import mlx.core as mx

        # MoE kernels: mlx-lm's SwitchGLU (gather_mm/gather_qmm: the fast path on Metal/CUDA) or per-expert dense
        # matmuls (the fast path on CPU, where gather_mm runs one matrix-vector product per token)
        if expert_kernel is None:
            expert_kernel = "dense" if mx.default_device() == mx.cpu else "gather"
        if expert_kernel not in ("gather", "dense"):
            raise KDError(f"expert_kernel must be 'gather' or 'dense', not {expert_kernel!r}")
        self.expert_kernel = expert_kernel
        self.dequant_min_tokens = dequant_min_tokens
        # CPU: run each layer's quantized linears dequantized (fp32 BLAS ~30x faster than CPU quantized_matmul),
        # when the plan has room for the dequantized copy; Metal/CUDA keep mlx-lm's quantized kernels
        self._want_dequant = (mx.default_device() == mx.cpu) if dequantize_layers is None else dequantize_layers
        self.progress = progress
        self._tokenizer = None
        keys = lm.param_keys
        n = len(self.arch.layers)
        self.layer_keys: list[list[str]] = [[] for _ in range(n)]
        self.expert_keys: list[list[str]] = [[] for _ in range(n)]
        for k in keys:
            if k.startswith("model.layers."):
                i = int(k.split(".")[2])
                (self.expert_keys if ".mlp.switch_mlp." in k else self.layer_keys)[i].append(k)
        self.embed_keys = [k for k in keys if k.startswith(self.arch.embed_prefix + ".")]
        self.norm_keys = [k for k in keys if k.startswith(self.arch.norm_prefix + ".")]
        self.head_keys = [k for k in keys if k.startswith(self.arch.head_prefix + ".")]
        # the skeleton's own (lazy, never evaluated) parameters: restored to release real weights
        self._lazy = dict(tree_flatten(self.model.parameters()))
        self.plan = self._make_plan(prefetch)
        self.stats = StreamStats()

    # -------------------------------------------------------------------------------------------- public
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.files.info(self.head_keys[0]).shape[0])

    def logprobs_at(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                    prefix: Sequence[int] | None = None, reduce: Callable | None = None) -> list:
        import mlx.core as mx

        if len(sequences) != len(positions):
            raise KDError(f"{len(sequences)} sequences but {len(positions)} position lists")
        seqs = [list(map(int, s)) for s in sequences]
        pre = list(map(int, prefix)) if prefix else []
        V = self.config.get("vocab_size") or self.vocab_size
        for i, (s, p) in enumerate(zip(seqs, positions)):
            if not s:
                raise KDError(f"sequence {i} is empty")
            if any(not 0 <= int(q) < len(s) for q in p):
                raise KDError(f"sequence {i}: positions {list(p)} outside 0..{len(s) - 1}")
            if any(not 0 <= t < V for t in s):
                raise KDError(f"sequence {i}: token id outside the vocabulary (0..{V - 1})")
        t0 = time.perf_counter()
        read0 = self.files.bytes_read
        results: list = [None] * len(seqs)
        # a small MLX buffer cache: freed buffers mostly go back to the OS (the budget is about RSS too), without
        # paying fresh page faults for every intermediate
        cap = (self.memory_budget // 8) if self.memory_budget else 1 << 30
        old_cache_limit = mx.set_cache_limit(cap)
        prefetcher = _Prefetcher(self.plan.prefetch_layers or self.plan.prefetch_experts)
        try:
            for chunk in self._chunks(seqs, pre):
                out = self._run_chunk(chunk, seqs, positions, pre, prefetcher)
                for i, lp in out.items():
                    results[i] = reduce(lp) if reduce is not None else lp
                self.stats.chunks += 1
        finally:
            prefetcher.close()
            self._restore(list(self._lazy))
            mx.set_cache_limit(old_cache_limit)
            mx.clear_cache()
        self.stats.bytes_read += self.files.bytes_read - read0
        self.stats.tokens += sum(len(s) for s in seqs)
        self.stats.prefix_tokens += len(pre)
        self.stats.wall_s += time.perf_counter() - t0
        return results

    def score_texts(self, texts: Sequence[str], add_bos: bool = False) -> np.ndarray:
        """Last-position log-probs (prompts x vocab) of each text."""
        tok = self.tokenizer
        seqs = [([tok.bos_id] if add_bos and tok.bos_id is not None else []) + tok.encode(t) for t in texts]
        out = self.logprobs_at(seqs, [[len(s) - 1] for s in seqs])
        return np.stack([o[0] for o in out]).astype(np.float32)

    # -------------------------------------------------------------------------------------------- plan
    def _make_plan(self, prefetch: bool) -> Plan:
        f = self.files
        n = len(self.arch.layers)
        layer_bytes = [sum(f.info(k).nbytes for k in ks) for ks in self.layer_keys]
        n_experts = [f.info(ks[0]).shape[0] if ks else 0 for ks in self.expert_keys]
        expert_bytes = [sum(f.info(k).row_bytes for k in ks) for ks in self.expert_keys]
        row_split = set(self.embed_keys) | set(self.head_keys) | {k for ks in self.expert_keys for k in ks}
        indivisible = [(k, f.info(k).nbytes) for ks in self.layer_keys for k in ks] + \
                      [(k, f.info(k).nbytes) for k in self.norm_keys if k not in row_split]
        largest = max(indivisible, key=lambda kv: kv[1]) if indivisible else ("", 0)
        head_row = sum(f.info(k).row_bytes for k in self.head_keys)
        total = f.total_bytes
        B = self.memory_budget
        D = int(self.config["hidden_size"])
        deq = [self._dequant_bytes(ks) for ks in self.layer_keys] if self._want_dequant else [0] * n
        if B is None:
            return Plan(None, [a + b for a, b in zip(layer_bytes, deq)], expert_bytes, n_experts, largest, 1 << 62,
                        prefetch, max(n_experts + [1]), prefetch, max(1, self.vocab_size), total,
                        [d > 0 for d in deq])
        if largest[1] > B:
            raise KDError(f"memory budget {format_bytes(B)} is below the largest indivisible tensor "
                          f"{largest[0]} ({format_bytes(largest[1])})")
        E0 = max(expert_bytes) if any(expert_bytes) else 0
        act_min0 = self._act_bytes(1, min(16, self.max_block), 16) + 16 * D * 4 * 4
        # a layer runs dequantized only where the copy leaves half the budget free; others keep quantized kernels
        use_deq = [d > 0 and a + d + E0 + act_min0 <= B // 2 for a, d in zip(layer_bytes, deq)]
        layer_bytes = [a + (d if u else 0) for a, d, u in zip(layer_bytes, deq, use_deq)]
        W = max(layer_bytes)
        E = max(expert_bytes) if any(expert_bytes) else 0
        # the smallest useful activation space: one block of 16 tokens through the widest layer
        act_min = self._act_bytes(1, min(16, self.max_block), 16) + 16 * D * 4 * 4
        need = W + E + act_min
        if need > B:
            i = int(np.argmax(layer_bytes))
            raise KDError(f"memory budget {format_bytes(B)} is too small: layer {i} needs "
                          f"{format_bytes(W)} of resident weights + {format_bytes(E)} per expert + "
                          f"{format_bytes(act_min)} of activations (at least {format_bytes(need)})")
        free = B - W - E
        act = max(act_min, int(0.4 * free))
        pre_layers = prefetch and (2 * W + act <= B)
        window = B - act - (W if pre_layers else 0)
        if E:
            per = max(1, window // E)
            pre_exp = prefetch and per >= 2
            experts_per_group = max(1, per // 2) if pre_exp else max(1, per)
        else:
            experts_per_group, pre_exp = 1, False
        # LM head slices: rows and their logits (n_pos rows of fp32 per vocab entry, bounded by activations)
        head_rows = max(1, min(self.vocab_size, (B - act) // max(1, 2 * head_row)))
        return Plan(B, layer_bytes, expert_bytes, n_experts, largest, act, pre_layers, experts_per_group,
                    pre_exp, head_rows, total, use_deq)

    def _dequant_bytes(self, keys: list[str]) -> int:
        """Bytes of the dequantized copies of a layer's quantized linear weights."""
        f = self.files
        n = 0
        for k in keys:
            if k.endswith(".scales") and k[:-len("scales")] + "weight" in f.tensors:
                s = f.info(k)
                if s.dtype != "F32":  # half-precision models compute in half precision: keep mlx-lm's kernels
                    return 0
                item = 4
                gs = self._group_size(k[:-len("scales")] + "weight") or 64
                n += int(np.prod(s.shape[:-1])) * s.shape[-1] * gs * item
        return n

    def _dequantize_layer(self, layer):
        """Swap the layer's QuantizedLinear modules (not the routed experts) for Linear ones holding the dequantized
        weights; returns the originals to put back."""
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_unflatten

        orig, new = [], []
        for name, m in layer.named_modules():
            if isinstance(m, nn.QuantizedLinear) and "switch_mlp" not in name:
                w = mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, mode=m.mode)
                lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                lin.weight = w
                if "bias" in m:
                    lin.bias = m["bias"]
                mx.eval(lin.parameters())
                orig.append((name, m))
                new.append((name, lin))
        if not new:
            return None
        layer.update_modules(tree_unflatten(new))
        return tree_unflatten(orig)

    def _dims(self) -> tuple[int, int, int, int]:
        c = self.config
        D = int(c["hidden_size"])
        H = int(c.get("num_attention_heads", 1))
        I = int(c.get("intermediate_size", 4 * D))
        if c.get("moe_intermediate_size"):
            I = max(I, int(c["moe_intermediate_size"]) * (int(c.get("num_experts_per_tok", 1))
                                                          + int(c.get("n_shared_experts") or 0)))
        if "qk_nope_head_dim" in c:  # MLA: per key, nope-keys + values are expanded per head
            hd = int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"]) + int(c["v_head_dim"])
        else:
            hd = 2 * int(c.get("head_dim") or D // H)
        return D, H, I, hd

    def _act_bytes(self, batch: int, q: int, lk: int) -> int:
        """Transient bytes for `batch` sequences, `q` query tokens attending to `lk` keys (a safe overestimate)."""
        D, H, I, hd = self._dims()
        per_q = 10 * D + 4 * I + 4 * H * lk + 2 * H * hd
        per_k = 3 * H * hd + 2 * D
        return 4 * batch * (q * per_q + lk * per_k)

    # -------------------------------------------------------------------------------------------- scheduling
    def _chunks(self, seqs: list[list[int]], pre: list[int]):
        """Groups of sequence indices whose hidden states stay resident together across all layers."""
        D = int(self.config["hidden_size"])
        V = self.vocab_size
        resident = self.plan.act_budget // 2
        per_tok = 4 * D * 4  # hidden in, hidden out, MoE record input, routed sum (fp32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        chunk, used = [], len(pre) * per_tok * 2
        for i in order:
            cost = len(seqs[i]) * per_tok + 4 * V  # + its log-probs row
            if chunk and used + cost > resident:
                yield chunk
                chunk, used = [], len(pre) * per_tok * 2
            chunk.append(i)
            used += cost
        if chunk:
            yield chunk

    def _microbatches(self, chunk: list[int], seqs, lk_extra: int) -> tuple[list[list[int]], int]:
        """Micro-batches (similar lengths) and the query block size, both fitted to half the activation budget."""
        budget = self.plan.act_budget // 2
        longest = max(len(seqs[i]) for i in chunk)
        q = min(self.max_block, longest)
        while q > 1 and self._act_bytes(1, q, longest + lk_extra) > budget:
            q //= 2
        batches, cur = [], []
        for i in chunk:  # chunk is sorted longest first
            L = len(seqs[i])
            trial = cur + [i]
            Lmax = len(seqs[trial[0]])
            if cur and (self._act_bytes(len(trial), min(q, Lmax), Lmax + lk_extra) > budget or L < Lmax // 2):
                batches.append(cur)
                trial = [i]
            cur = trial
        if cur:
            batches.append(cur)
        return batches, q

    # -------------------------------------------------------------------------------------------- weights
    def _install(self, arrays: dict) -> None:
        from mlx.utils import tree_unflatten

        self.model.update(tree_unflatten(list(arrays.items())))

    def _restore(self, keys: list[str]) -> None:
        self._install({k: self._lazy[k] for k in keys})

    def _read_np(self, keys: list[str]) -> dict:
        return {k: self.files.read_np(k) for k in keys}

    def _read_rows_np(self, keys: list[str], rows) -> dict:
        return {k: self.files.read_rows_np(k, rows) for k in keys}

    def _to_mx(self, arrays_np: dict) -> dict:
        import mlx.core as mx

        out = {}
        for k in list(arrays_np):
            out[k] = self.files.to_mx(k, arrays_np.pop(k))  # drop each numpy buffer as soon as it is copied
            mx.eval(out[k])
        return out

    def _wait(self, fut: Future):
        t = time.perf_counter()
        r = fut.result()
        self.stats.io_wait_s += time.perf_counter() - t
        return r

    # -------------------------------------------------------------------------------------------- execution
    def _run_chunk(self, chunk, seqs, positions, pre, prefetcher: _Prefetcher) -> dict:
        import mlx.core as mx

        batches, q = self._microbatches(chunk, seqs, len(pre))
        # embedding: only the rows of the tokens present
        all_ids = np.unique(np.concatenate([np.asarray(seqs[i]) for i in chunk] + ([np.asarray(pre)] if pre else [])))
        emb = self._to_mx(self._read_rows_np(self.embed_keys, all_ids))
        self._install(emb)
        lut = {int(t): j for j, t in enumerate(all_ids)}
        hs, valid = [], []
        for b in batches:
            Lmax = max(len(seqs[i]) for i in b)
            ids = np.zeros((len(b), Lmax), dtype=np.int32)
            mask = np.zeros((len(b), Lmax), dtype=bool)
            for r, i in enumerate(b):
                ids[r, :len(seqs[i])] = [lut[t] for t in seqs[i]]
                mask[r, :len(seqs[i])] = True
            h = self.arch.embed(mx.array(ids))
            mx.eval(h)
            hs.append(h)
            valid.append(mask)
        hp = None
        if pre:
            hp = self.arch.embed(mx.array([[lut[t] for t in pre]], dtype=mx.int32))
            mx.eval(hp)
        self._restore(self.embed_keys)
        del emb

        n = len(self.arch.layers)
        fut = prefetcher.submit(self._read_np, self.layer_keys[0])
        layers = range(n)
        if self.progress:
            from tqdm import tqdm

            layers = tqdm(layers, desc="layers", unit="layer", leave=False)
        for li in layers:
            w = self._to_mx(self._wait(fut))
            fut = None
            if self.plan.prefetch_layers and li + 1 < n:
                fut = prefetcher.submit(self._read_np, self.layer_keys[li + 1])
            self._install(w)
            del w
            layer = self.arch.layers[li]
            swapped = self._dequantize_layer(layer) if self.plan.dequant_layers[li] else None
            recorder = None
            if self.arch.is_moe(li):
                recorder = _MoERecorder(layer.mlp)
                moe = layer.mlp
                layer.mlp = recorder  # plain attribute swap for pass A
            try:
                prefix_state = None
                if hp is not None:
                    hp, cache = self._layer_forward(layer, hp, None, q, recorder, keep_cache=True)
                    prefix_state = (cache.keys[..., :cache.offset, :], cache.values[..., :cache.offset, :])
                    mx.eval(prefix_state)
                for bi, h in enumerate(hs):
                    hs[bi], _ = self._layer_forward(layer, h, prefix_state, q, recorder)
            finally:
                if recorder is not None:
                    layer.mlp = moe
                if swapped is not None:
                    layer.update_modules(swapped)
            self._restore(self.layer_keys[li])
            del prefix_state
            if recorder is not None:
                hp, hs = self._experts(li, layer.mlp, recorder, hp, hs, valid, prefetcher)
            mx.clear_cache()
            self.stats.layer_passes += 1
            if fut is None and li + 1 < n:
                fut = prefetcher.submit(self._read_np, self.layer_keys[li + 1])

        # final norm + LM head, only at the asked positions
        sel = []
        owners = []
        for b, h in zip(batches, hs):
            for r, i in enumerate(b):
                p = [int(x) for x in positions[i]]
                sel.append(h[r, mx.array(p, dtype=mx.int32)] if p else h[r, :0])
                owners.append((i, len(p)))
        x = mx.concatenate(sel, axis=0)[None]
        del hs
        nw = self._to_mx(self._read_np(self.norm_keys))
        self._install(nw)
        x = self.arch.norm(x)
        mx.eval(x)
        self._restore(self.norm_keys)
        logits = self._head(x[0])
        out = {}
        o = 0
        for i, k in owners:
            out[i] = logits[o:o + k].copy()
            o += k
        return out

    def _layer_forward(self, layer, h, prefix_state, q: int, recorder, keep_cache: bool = False):
        """One layer over a (B, L, D) batch, in query blocks of `q` tokens with a KV cache (exactly causal)."""
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask
        from mlx_lm.models.cache import KVCache

        B, L, _ = h.shape
        n_rec = len(recorder.records) if recorder is not None else 0
        if prefix_state is None and L <= q and not keep_cache:
            mask = create_attention_mask(h, None, return_array=self.arch.mask_array)
            out = layer(h, mask, None)
            cache = None
            mx.eval(out, *(recorder.records[-1] if recorder is not None else ()))
        else:
            cache = KVCache()
            if prefix_state is not None:
                k, v = prefix_state
                cache.keys = mx.repeat(k, B, axis=0) if B > 1 else k
                cache.values = mx.repeat(v, B, axis=0) if B > 1 else v
                cache.offset = k.shape[2]
            outs = []
            for s in range(0, L, q):
                hb = h[:, s:s + q]
                mask = create_attention_mask(hb, cache, return_array=self.arch.mask_array)
                ob = layer(hb, mask, cache)
                mx.eval(ob, cache.keys, cache.values, *(recorder.records[-1] if recorder is not None else ()))
                outs.append(ob)
            out = mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
            mx.eval(out)
        if recorder is not None:  # merge this batch's block records into one (x, inds, scores) per batch
            recs = recorder.records[n_rec:]
            del recorder.records[n_rec:]
            recorder.records.append(tuple(mx.concatenate([r[j] for r in recs], axis=1) if len(recs) > 1
                                          else recs[0][j] for j in range(4)))
        return out, cache

    def _experts(self, li: int, moe, recorder: _MoERecorder, hp, hs, valid, prefetcher: _Prefetcher):
        """Pass B: read only the routed experts, group by group, and add their weighted outputs."""
        import mlx.core as mx

        recs = recorder.records  # [prefix?] + one per micro-batch, in order
        blocks = []  # (x_valid (T, D), inds (T, k), scores (T, k), flat valid index, target)
        targets = ([("p", None)] if hp is not None else []) + [("b", bi) for bi in range(len(hs))]
        for (kind, bi), (x, inds, scores, shared) in zip(targets, recs):
            Bb, L, D = x.shape
            if kind == "p":
                idx = np.arange(L)
            else:
                idx = np.nonzero(valid[bi].reshape(-1))[0]
            ii = mx.array(idx.astype(np.int32))
            blocks.append((x.reshape(Bb * L, D)[ii], inds.reshape(Bb * L, -1)[ii], scores.reshape(Bb * L, -1)[ii],
                           ii, kind, bi, shared.reshape(Bb * L, D)[ii]))
        recorder.records = []
        X = mx.concatenate([b[0] for b in blocks], axis=0)
        I_np = np.array(mx.concatenate([b[1] for b in blocks], axis=0))
        S = mx.concatenate([b[2] for b in blocks], axis=0)
        mx.eval(X, S)
        R = mx.zeros(X.shape, dtype=mx.float32)
        used = np.unique(I_np)
        self.stats.per_layer_experts[li] = len(used)
        keys = self.expert_keys[li]
        g = self.plan.experts_per_group
        groups = [used[s:s + g] for s in range(0, len(used), g)]
        switch = moe.switch_mlp
        read0 = self.files.bytes_read
        fut = prefetcher.submit(self._read_rows_np, keys, groups[0]) if groups else None
        for gi, grp in enumerate(groups):
            w = self._to_mx(self._wait(fut))
            fut = None
            if gi + 1 < len(groups):
                if self.plan.prefetch_experts:
                    fut = prefetcher.submit(self._read_rows_np, keys, groups[gi + 1])
            self._install(w)
            del w
            local = np.full(int(I_np.max()) + 1, -1, dtype=np.int32)
            local[grp] = np.arange(len(grp), dtype=np.int32)
            t, j = np.nonzero(np.isin(I_np, grp))
            if self.expert_kernel == "gather":  # mlx-lm's own SwitchGLU (gather_mm / gather_qmm)
                tt = mx.array(t.astype(np.int32))
                y = switch(X[tt], mx.array(local[I_np[t, j]])[:, None])  # (n, 1, D)
                contrib = y[:, 0, :].astype(mx.float32) * S[tt, mx.array(j.astype(np.int32))][:, None]
                R = R.at[tt].add(contrib)
                mx.eval(R)
            else:
                R = self._experts_dense(switch, grp, local, I_np, t, j, X, S, R)
            self._restore(keys)
            contrib = y = None
            if fut is None and gi + 1 < len(groups):
                fut = prefetcher.submit(self._read_rows_np, keys, groups[gi + 1])
            self.stats.experts_loaded += len(grp)
        self.stats.expert_bytes_read += self.files.bytes_read - read0
        # scatter the routed sums back onto the layer outputs
        o = 0
        for x, inds, scores, ii, kind, bi, shared in blocks:
            T = x.shape[0]
            r = R[o:o + T].astype(shared.dtype) + shared  # = mlx-lm's MoE output: routed + shared
            o += T
            if kind == "p":
                hp = (hp[0] + r.astype(hp.dtype))[None]
                mx.eval(hp)
            else:
                h = hs[bi]
                Bb, L, D = h.shape
                flat = h.reshape(Bb * L, D).at[ii].add(r.astype(h.dtype))
                hs[bi] = flat.reshape(Bb, L, D)
                mx.eval(hs[bi])
        return hp, hs

    def _experts_dense(self, switch, grp, local, I_np, t, j, X, S, R):
        """Per-expert dense matmuls over the tokens routed to each expert (the CPU fast path: MLX's CPU gather_mm
        does one matrix-vector product per token). Same maths as SwitchGLU: down(act(up(x), gate(x)));
        4-bit experts with many tokens are dequantized first (fp32 BLAS is ~30x faster than CPU quantized_matmul)."""
        import mlx.core as mx

        e_of = local[I_np[t, j]]
        order = np.argsort(e_of, kind="stable")
        bounds = np.searchsorted(e_of[order], np.arange(len(grp) + 1))

        def proj(lin, e: int, x):
            if "scales" in lin:  # QuantizedSwitchLinear
                if x.shape[0] >= self.dequant_min_tokens:
                    w = mx.dequantize(lin["weight"][e], lin["scales"][e], lin.get("biases")[e]
                                      if lin.get("biases") is not None else None, lin.group_size, lin.bits,
                                      mode=lin.mode)
                    y = x @ w.T
                else:
                    y = mx.quantized_matmul(x, lin["weight"][e], lin["scales"][e],
                                            lin.get("biases")[e] if lin.get("biases") is not None else None,
                                            transpose=True, group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
            else:
                y = x @ lin["weight"][e].T
            if "bias" in lin:
                y = y + lin["bias"][e]
            return y

        for e in range(len(grp)):
            sel = order[bounds[e]:bounds[e + 1]]
            if not len(sel):
                continue
            tt = mx.array(t[sel].astype(np.int32))
            x = X[tt]
            h = switch.activation(proj(switch.up_proj, e, x), proj(switch.gate_proj, e, x))
            y = proj(switch.down_proj, e, h)
            contrib = y.astype(mx.float32) * S[tt, mx.array(j[sel].astype(np.int32))][:, None]
            R = R.at[tt].add(contrib)
            mx.eval(R)
        return R

    def _head(self, x):
        """Log-softmax over the full vocabulary of `x` (n, D), reading the head `head_rows` vocabulary rows at a time."""
        import mlx.core as mx

        V = self.vocab_size
        step = self.plan.head_rows
        parts = []
        for a in range(0, V, step):
            rows = np.arange(a, min(V, a + step))
            w = self._to_mx(self._read_rows_np(self.head_keys, rows))
            self._install(w)
            del w
            part = self.arch.apply_head(x)
            mx.eval(part)
            parts.append(part.astype(mx.float32))
            self._restore(self.head_keys)
        logits = mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        from .reference import log_softmax_np

        return log_softmax_np(logits)

    # -------------------------------------------------------------------------------------------- inspect
    def describe(self) -> dict:
        f = self.files
        n_params = 0
        for k, t in f.tensors.items():
            n = int(np.prod(t.shape))
            if t.dtype == "U32" and k.endswith(".weight"):
                scales = k[:-len("weight")] + "scales"
                if scales in f.tensors:  # packed quantized weights: 32 bits per uint32
                    in_dim = f.info(scales).shape[-1] * (self._group_size(k) or 64)
                    n = n // t.shape[-1] * in_dim
            if k.endswith((".scales", ".biases")) and k[:-6] + "weight" in f.tensors:
                continue
            n_params += n
        layers = []
        for i in range(len(self.arch.layers)):
            layers.append({"layer": i, "resident_bytes": self.plan.layer_bytes[i],
                           "experts": self.plan.n_experts[i], "bytes_per_expert": self.plan.expert_bytes[i]})
        return {"model": str(self.model_dir), "model_type": self.config.get("model_type"),
                "family": self.arch.family, "parameters": n_params, "bytes_on_disk": f.total_bytes,
                "files": [p.name for p in f.files], "layers": layers, "plan": self.plan.describe()}

    def _group_size(self, key: str) -> int | None:
        q = self.config.get("quantization") or {}
        base = key[:-len(".weight")]
        if isinstance(q.get(base), dict):
            return int(q[base]["group_size"])
        return int(q["group_size"]) if "group_size" in q else None

    def bytes_per_question(self, tokens: int, experts_touched_fraction: float | None = None) -> int:
        """Rough bytes read per question in a chunk of one: every resident weight + the routed experts."""
        f = self.files
        per = sum(self.plan.layer_bytes) + sum(f.info(k).nbytes for k in self.norm_keys)
        per += sum(f.info(k).nbytes for k in self.head_keys)
        k = int(self.config.get("num_experts_per_tok") or 0)
        for e, ne in zip(self.plan.expert_bytes, self.plan.n_experts):
            if ne:
                frac = experts_touched_fraction if experts_touched_fraction is not None else \
                    1 - (1 - k / ne) ** tokens
                per += int(e * ne * frac)
        return per


__all__ = ["StreamingTeacher", "Plan", "StreamStats", "Arch"]
