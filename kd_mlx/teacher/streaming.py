"""The streaming executor: run any mlx-lm model far larger than memory under a hard memory budget.

mlx-lm's own model object (built lazily, no weight read) runs its own forward; no family needs an adapter. The
executor only swaps four kinds of module for stand-ins while a call runs, found by type, not by family:

- each decoder layer (the model's longest list of modules): its weights are installed just before it runs and
  released after, the next layer read by a background thread meanwhile;
- each routed-experts module (any module whose children are mlx-lm `SwitchLinear`/`QuantizedSwitchLinear`:
  `SwitchGLU`, `SwitchMLP`, gpt-oss's experts...): only the experts the tokens selected are read, by byte range,
  in groups that fit the budget, and the module runs on each group with its indices remapped;
- each embedding outside the layers: only the rows of the tokens present are read;
- the LM head (`lm_head`, or a tied embedding's `as_linear`): applied only at the asked positions, its weights
  read in vocabulary slices, the first one on a second thread while the last layer runs.

Weights are read straight into MLX buffers (`WeightFiles.read_mx`; `direct_reads=False` is the plain numpy path),
past the page cache when the streamed model is larger than physical memory (O_DIRECT where the OS allows;
`uncached_reads` forces either way).

Layer-major order: one chunk of sequences is split into tasks (the shared prefix, then micro-batches of similar
length, each cut into query blocks), every task runs `model(ids, cache=...)` on its own thread, and the threads
take turns (exactly one runs at a time) so that each layer is read once per chunk: every task runs layer i before
layer i+1 is installed, and an experts module runs once per layer on the tokens of all tasks. A task continues
from its predecessor (the prefix, or the previous query block) through mlx-lm's own cache objects, whose state is
copied in layer by layer; this covers KV caches, hybrid linear-attention / SSM state (`ArraysCache`) and sliding
windows (a full `KVCache` with mlx-lm's window masks, so nothing is evicted between blocks).

When the whole model fits (no budget, or a budget above its size) the weights are read once and stay resident;
the same code runs with nothing swapped in and out, which is the honest peer of the streamed run.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import ArraysCache, BatchKVCache, CacheList, KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from tqdm import tqdm

from ..tokenizer import load_tokenizer
from ..utils import KDError, format_bytes, resolve_model_path, use_one_malloc_arena
from .loading import LazyModel, build_skeleton
from .reference import log_softmax_np

_SWITCH = (SwitchLinear, QuantizedSwitchLinear)
_EMBED = (nn.Embedding, nn.QuantizedEmbedding)
_LINEAR = (nn.Linear, nn.QuantizedLinear)


# ------------------------------------------------------------------------------------------------ structure
@dataclass
class Structure:
    """Where the streamed modules of an mlx-lm model are: found by module type, the same for every family."""

    layers_owner: nn.Module  # the module holding the decoder layer list
    layers_attr: str
    layers_prefix: str  # parameter path of the list, e.g. "model.layers"
    layers: list
    experts: list[list[str]]  # per layer: paths (relative to the layer) of routed-experts modules
    embeds: list[str]  # paths of embeddings outside the layers
    head: str | None  # path of the LM head (None: tied to the embedding)

    @classmethod
    def of(cls, model: nn.Module) -> Structure:
        owner, attr, prefix, layers = None, "", "", []
        for path, m in model.named_modules():
            for name, child in m.items():
                if isinstance(child, list) and len(child) > len(layers) and \
                        all(isinstance(c, nn.Module) for c in child if c is not None):
                    owner, attr, layers = m, name, child
                    prefix = f"{path}.{name}" if path else name
        if not layers:
            raise KDError(f"{type(model).__module__}: no list of decoder layers found")
        experts = []
        for layer in layers:
            found = []
            for path, m in (layer.named_modules() if layer is not None else []):
                kids = [c for c in m.children().values() if isinstance(c, nn.Module) and c.parameters()]
                own = [k for k, v in m.items() if isinstance(v, mx.array)]
                if kids and all(isinstance(c, _SWITCH) for c in kids) and not own:
                    found.append(path)
            experts.append(found)
        embeds, head = [], None
        for path, m in model.named_modules():
            if path.startswith(prefix + "."):
                continue
            if isinstance(m, _EMBED):
                embeds.append(path)
            elif isinstance(m, _LINEAR) and path.rsplit(".", 1)[-1] == "lm_head":
                head = path
        return cls(owner, attr, prefix, layers, experts, embeds, head)


def _module_at(root: nn.Module, path: str):
    m = root
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def _swap(root: nn.Module, path: str, stand_in) -> Callable[[], None]:
    """Make attribute `path` of `root` resolve to `stand_in` for attribute access (the forward) while the module
    tree (parameters, `update`) keeps the real module; returns the undo."""
    parent_path, _, name = path.rpartition(".")
    parent = _module_at(root, parent_path) if parent_path else root
    object.__setattr__(parent, name, stand_in)
    return lambda: parent.__dict__.pop(name, None)


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    budget: int | None
    layer_bytes: list[int]  # resident (non-expert) bytes per layer, dequantized copies included
    expert_bytes: list[int]  # bytes of one routed expert per layer (all its experts modules; 0: dense)
    n_experts: list[int]
    largest_tensor: tuple[str, int]
    act_budget: int  # bytes for activations (hidden states, attention, MLP intermediates)
    prefetch_layers: bool
    experts_per_group: int
    prefetch_experts: bool
    head_rows: int  # vocabulary rows of the LM head read at once
    total_bytes: int
    resident: bool  # the whole model fits: read once, kept installed
    dequant_layers: list = field(default_factory=list)  # per layer: quantized linears run dequantized (fp32)
    head_prefetch_rows: int = 0  # vocabulary rows of the LM head read while the last layer runs
    last_experts_per_group: int = 0  # the last layer's expert groups, smaller to leave room for that read

    def describe(self) -> dict:
        return {
            "memory_budget": self.budget, "model_bytes_on_disk": self.total_bytes, "resident": self.resident,
            "largest_indivisible_tensor": {"name": self.largest_tensor[0], "bytes": self.largest_tensor[1]},
            "max_layer_resident_bytes": max(self.layer_bytes), "max_expert_bytes": max(self.expert_bytes),
            "activation_budget": self.act_budget, "prefetch_layers": self.prefetch_layers,
            "experts_per_group": self.experts_per_group, "prefetch_experts": self.prefetch_experts,
            "lm_head_rows_per_read": self.head_rows, "lm_head_rows_read_during_last_layer": self.head_prefetch_rows,
            "dequantized_layers": [i for i, d in enumerate(self.dequant_layers) if d],
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


# ------------------------------------------------------------------------------------------------ tasks
class _Abort(Exception):
    """Raised inside a task thread when the chunk is abandoned."""


class _Task:
    """One `model(ids, cache=caches)` call on its own thread, parked at every barrier (embedding, layer entry,
    experts module, head) until the coordinator has done that stage's shared work."""

    def __init__(self, ids: np.ndarray, caches: list, pred: _Task | None, asked: list[tuple[int, int]]):
        self.ids, self.caches, self.pred, self.asked = ids, caches, pred, asked  # asked: (row, local position)
        self.successors = 0
        self.taken: dict[int, int] = {}  # per layer: successors that have not yet copied this task's cache
        self.barrier: tuple | None = None  # (stage key, kind, payload)
        self.reply: Any = None
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        self.abort = False
        self._go = threading.Semaphore(0)
        self._parked = threading.Semaphore(0)

    def _main(self, model) -> None:
        _current.task = self
        self._go.acquire()
        try:
            if self.abort:
                raise _Abort()
            out = model(mx.array(self.ids), cache=self.caches)
            mx.eval(out)
            self.result = out
        except BaseException as e:  # handed to the coordinator
            self.error = e
        finally:
            self.done = True
            self.barrier = None
            self._parked.release()

    def resume(self) -> None:
        """Let the task run until its next barrier (or its end); the coordinator blocks meanwhile."""
        if isinstance(self.reply, mx.array):
            mx.eval(self.reply)  # MLX streams are per thread: the task gets evaluated arrays
        self._go.release()
        self._parked.acquire()

    def wait(self, stage: tuple, kind: str, payload) -> Any:
        # MLX streams are per thread: what crosses to the coordinator is evaluated here first
        # (the caches too: a successor may copy them while this task is parked inside a layer)
        mx.eval([a for a in (payload if isinstance(payload, tuple) else (payload,)) if isinstance(a, mx.array)],
                [_cache_arrays(c) for c in self.caches])
        self.barrier = (stage, kind, payload)
        self._parked.release()
        self._go.acquire()
        if self.abort:
            raise _Abort()
        reply, self.reply = self.reply, None  # the model may update it in place (`h *= scale`) on this thread
        return reply


_current = threading.local()


class _TaskThreads:
    """The threads tasks run on, kept and reused for the executor's lifetime. MLX keeps per-thread state that is
    never released, and freeing its buffer cache (`mx.clear_cache`, `mx.set_cache_limit`) walks all of it: with a
    new thread per task, each call of a long dump got slower (~100 ms per clear after 1,000 threads)."""

    def __init__(self):
        self._idle: list[_TaskThread] = []
        self._lock = threading.Lock()

    def start(self, task: _Task, model) -> None:
        with self._lock:
            worker = self._idle.pop() if self._idle else _TaskThread(self)
        worker.run(task, model)

    def _done(self, worker: _TaskThread) -> None:
        with self._lock:
            self._idle.append(worker)

    def close(self) -> None:
        """End the idle threads (called when the executor is collected)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.run(None, None)


class _TaskThread:
    def __init__(self, pool: _TaskThreads):
        self.pool = pool
        self.job: tuple | None = None
        self._ready = threading.Semaphore(0)
        threading.Thread(target=self._loop, daemon=True, name="kd-task").start()

    def run(self, task: _Task, model) -> None:
        self.job = (task, model)
        self._ready.release()

    def _loop(self) -> None:
        while True:
            self._ready.acquire()
            (task, model), self.job = self.job, None
            if task is None:
                return
            task._main(model)
            _current.task = None  # the finished task's arrays are not kept alive by an idle thread
            del task, model
            self.pool._done(self)


def _barrier(stage: tuple, kind: str, payload=None):
    return _current.task.wait(stage, kind, payload)


class _StandIn:
    """Takes a module's place in the forward; everything but the call is the real module's."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __getattr__(self, name):
        return getattr(self.module, name)


class _LayerStandIn(_StandIn):
    def __init__(self, layer: nn.Module, index: int):
        super().__init__(layer)
        self.index = index

    def __call__(self, *args, **kwargs):
        task = _current.task
        _barrier((self.index, 0), "layer", self.index)
        out = self.module(*args, **kwargs)
        cache = task.caches[self.index]
        mx.eval(out, _cache_arrays(cache))
        if task.successors == 0:
            _drop_state(cache)
        return out


class _ExpertsStandIn(_StandIn):
    def __init__(self, module: nn.Module, layer: int, slot: int):
        super().__init__(module)
        self.layer, self.slot = layer, slot

    def __call__(self, x, indices):
        return _barrier((self.layer, 1 + self.slot), "experts", (self, x, indices))


class _EmbedStandIn(_StandIn):
    """An embedding: its rows are read for the tokens present; as a tied head (`as_linear`) it is the LM head."""

    def __init__(self, module: nn.Module, path: str, n_layers: int):
        super().__init__(module)
        self.path, self.n_layers = path, n_layers

    def __call__(self, ids):
        return _barrier((-1, 0), "embed", (self, ids))

    def as_linear(self, x):
        return _barrier((self.n_layers, 0), "head", (self, x))


class _HeadStandIn(_StandIn):
    def __init__(self, module: nn.Module, n_layers: int):
        super().__init__(module)
        self.n_layers = n_layers

    def __call__(self, x):
        return _barrier((self.n_layers, 0), "head", (self, x))


def _cache_arrays(c) -> list:
    if isinstance(c, CacheList):
        return [a for s in c.caches for a in _cache_arrays(s)]
    if isinstance(c, KVCache):
        return [a for a in (c.keys, c.values) if a is not None]
    if isinstance(c, ArraysCache):
        return [a for a in c.cache if a is not None]
    return []


def _drop_state(c) -> None:
    """Free a cache's arrays once no later task continues from them (its offset stays)."""
    if isinstance(c, CacheList):
        for s in c.caches:
            _drop_state(s)
    elif isinstance(c, KVCache):
        c.keys = c.values = None
    elif isinstance(c, ArraysCache):
        c.cache = [None] * len(c.cache)


def _continue_from(dst, src, batch: int) -> None:
    """Give `dst` (a task's cache for one layer) the state `src` reached (its predecessor's), repeated to `batch`."""
    def rep(a):
        return mx.repeat(a, batch, axis=0) if a is not None and a.shape[0] == 1 and batch > 1 else a

    if isinstance(src, CacheList):
        for d, s in zip(dst.caches, src.caches):
            _continue_from(d, s, batch)
    elif isinstance(src, KVCache):
        if src.keys is not None:
            k, v = src.keys[..., :src.offset, :], src.values[..., :src.offset, :]
            dst.keys, dst.values, dst.offset = rep(k), rep(v), src.offset
    elif isinstance(src, ArraysCache):
        dst.cache = [rep(a) for a in src.cache]
    else:
        raise KDError(f"cache type {type(src).__name__} cannot be continued by the streaming executor")
    mx.eval(_cache_arrays(dst))  # MLX streams are per thread: the task's thread must get evaluated arrays


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: as if every model fitted


def _rss_outside_mlx() -> int:
    """Resident bytes of this process not held by MLX arrays or MLX's buffer cache (Linux; 0 where /proc is
    absent)."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
    return max(0, rss - mx.get_active_memory() - mx.get_cache_memory())


def _set_offset(c, offset: int) -> None:
    """Start a task's caches at its first token's position, so the masks mlx-lm builds at the top of the forward
    (from `cache.offset`) are those of the full sequence."""
    if isinstance(c, CacheList):
        for s in c.caches:
            _set_offset(s, offset)
    elif isinstance(c, KVCache):
        c.offset = offset


def _full_cache(c):
    """mlx-lm's per-layer cache with sliding-window caches replaced by full KV caches (keys never evicted between
    query blocks; mlx-lm's window masks then select the window)."""
    if isinstance(c, RotatingKVCache):
        return KVCache()
    if isinstance(c, CacheList):
        return CacheList(*[_full_cache(s) for s in c.caches])
    return c


# ------------------------------------------------------------------------------------------------ executor
class StreamingTeacher:
    """Log-probs of a model of any size under a memory budget (bytes; None = no budget, everything fits).

    `logprobs_at(sequences, positions, prefix=None, reduce=None)`: for each sequence (token ids after `prefix`),
    the float32 log-softmax over the full vocabulary at `positions[i]` (indices into the sequence, not counting the
    prefix) as a numpy array (len(positions[i]), vocab), or `reduce(that array, i)`."""

    def __init__(self, model_dir: str | Path, memory_budget: int | None = None, *, trust_remote_code: bool = False,
                 prefetch: bool = True, max_block: int = 512, progress: bool = False,
                 expert_kernel: str | None = None, dequant_min_tokens: int = 16,
                 dequantize_layers: bool | None = None, direct_reads: bool = True,
                 min_expert_groups: int = 4, process_bytes: int | None = None, uncached_reads: bool | None = None):
        if memory_budget is not None:  # the budget is about RSS too: before any thread of ours allocates
            use_one_malloc_arena()
        self.model_dir = resolve_model_path(str(model_dir))
        self.trust_remote_code = trust_remote_code
        lm: LazyModel = build_skeleton(self.model_dir, trust_remote_code)
        self.model, self.config, self.files = lm.model, lm.config, lm.files
        self.text_config = {**self.config, **(self.config.get("text_config") or {})}
        self.structure = Structure.of(self.model)
        self.family = type(self.model).__module__.rsplit(".", 1)[-1]
        self.memory_budget = memory_budget
        self.max_block = max_block
        # MoE kernels: mlx-lm's own experts module (gather_mm/gather_qmm: the fast path on Metal/CUDA) or per-expert
        # dense matmuls (the fast path on CPU, where gather_mm runs one matrix-vector product per token)
        if expert_kernel is None:
            expert_kernel = "dense" if mx.default_device() == mx.cpu else "gather"
        if expert_kernel not in ("gather", "dense"):
            raise KDError(f"expert_kernel must be 'gather' or 'dense', not {expert_kernel!r}")
        self.expert_kernel = expert_kernel
        self.dequant_min_tokens = dequant_min_tokens
        # CPU: run each layer's quantized linears dequantized (fp32 BLAS ~30x faster than CPU quantized_matmul)
        # when the plan has room for the copy; Metal/CUDA keep mlx-lm's quantized kernels
        self._want_dequant = (mx.default_device() == mx.cpu) if dequantize_layers is None else dequantize_layers
        # weights read straight into MLX buffers; False: into numpy, then copied (the plain reference path)
        self.direct_reads = direct_reads
        self.min_expert_groups = min_expert_groups
        self.progress = progress
        self._tokenizer = None
        self._key_groups(lm.param_keys)
        caches = make_prompt_cache(self.model)
        if len(caches) != len(self.structure.layers):
            raise KDError(f"{self.family}: {len(caches)} caches for {len(self.structure.layers)} layers; the streaming "
                          f"executor needs one cache per decoder layer")
        # the skeleton's own (lazy, never evaluated) parameters: restored to release real weights
        self._lazy = dict(tree_flatten(self.model.parameters()))
        # MLX streams are per thread and the forward runs on task threads: the modules' own constants (rope
        # frequencies...) are computed here, once
        mx.eval([v for _, m in self.model.named_modules() for k, v in m.items()
                 if k.startswith("_") and isinstance(v, mx.array)])
        # this process's memory outside MLX (interpreter, libraries, tokenizer) shares the budget with the LM head
        # read-ahead (the peak RSS is what the budget bounds); None: measured now, the skeleton built
        self.process_bytes = _rss_outside_mlx() if process_bytes is None else process_bytes
        self.plan = self._make_plan(prefetch)
        # a streamed model larger than physical memory cannot stay in the page cache between calls: its reads go
        # past it where the OS allows (O_DIRECT: no CPU copy competing with the forward for the cores); a smaller
        # one is read through it (repeated calls then copy from memory instead of reading the disk again)
        if uncached_reads is None:
            uncached_reads = direct_reads and not self.plan.resident and self.plan.total_bytes > _physical_memory()
        self.files.uncached = uncached_reads
        self.stats = StreamStats()
        self._installed_all = False
        self._head_fut: Future | None = None  # the LM head rows read while the last layer runs
        self._threads = _TaskThreads()
        weakref.finalize(self, self._threads.close)

    def _key_groups(self, keys: list[str]) -> None:
        s = self.structure
        n = len(s.layers)
        self.layer_keys: list[list[str]] = [[] for _ in range(n)]
        self.expert_keys: list[dict[str, list[str]]] = [{p: [] for p in s.experts[i]} for i in range(n)]
        self.embed_keys: dict[str, list[str]] = {p: [] for p in s.embeds}
        self.head_keys: list[str] = []
        self.other_keys: list[str] = []
        for k in keys:
            if k.startswith(s.layers_prefix + "."):
                rest = k[len(s.layers_prefix) + 1:]
                i, _, local = rest.partition(".")
                i = int(i)
                mod = next((p for p in s.experts[i] if local.startswith(p + ".")), None)
                (self.expert_keys[i][mod] if mod else self.layer_keys[i]).append(k)
            elif s.head and k.startswith(s.head + "."):
                self.head_keys.append(k)
            elif (e := next((p for p in s.embeds if k.startswith(p + ".")), None)) is not None:
                self.embed_keys[e].append(k)
            else:
                self.other_keys.append(k)
        if s.head is None:  # tied: the embedding whose rows are the vocabulary
            self.head_keys = next(iter(self.embed_keys.values()), [])

    # -------------------------------------------------------------------------------------------- public
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.files.info(self.head_keys[0]).shape[0])

    def logprobs_at(self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                    prefix: Sequence[int] | None = None, reduce: Callable | None = None) -> list:
        if len(sequences) != len(positions):
            raise KDError(f"{len(sequences)} sequences but {len(positions)} position lists")
        seqs = [list(map(int, s)) for s in sequences]
        pre = list(map(int, prefix)) if prefix else []
        V = self.text_config.get("vocab_size") or self.vocab_size
        for i, (s, p) in enumerate(zip(seqs, positions)):
            if not s:
                raise KDError(f"sequence {i} is empty")
            if any(not 0 <= int(q) < len(s) for q in p):
                raise KDError(f"sequence {i}: positions {list(p)} outside 0..{len(s) - 1}")
            if any(not 0 <= t < V for t in s + pre):
                raise KDError(f"sequence {i}: token id outside the vocabulary (0..{V - 1})")
        t0 = time.perf_counter()
        read0 = self.files.bytes_read
        results: list = [None] * len(seqs)
        # a small MLX buffer cache: freed buffers mostly go back to the OS (the budget is about RSS too), without
        # paying fresh page faults for every intermediate; kept across layers, so that the next layer's weights are
        # read into buffers the last one freed (fresh pages cost ~3x a reused buffer here)
        old_cache_limit = mx.set_cache_limit(self._cache_limit())
        prefetcher = _Prefetcher(not self.plan.resident and (self.plan.prefetch_layers or self.plan.prefetch_experts))
        head_reader = _Prefetcher(not self.plan.resident and self.plan.head_prefetch_rows > 0)
        undo = self._swap_in()
        # functions mlx-lm compiles (mx.compile) keep the MLX stream of the thread that traced them, and the
        # forward runs on task threads: compiled code is used uncompiled while streaming
        compile_on = not os.environ.get("MLX_DISABLE_COMPILE")
        mx.disable_compile()
        try:
            if self.plan.resident and not self._installed_all:
                self._install_all()
            for chunk in self._chunks(seqs, pre):
                out = self._run_chunk(chunk, seqs, positions, pre, prefetcher, head_reader)
                for i, lp in out.items():
                    results[i] = reduce(lp, i) if reduce is not None else lp
                self.stats.chunks += 1
        finally:
            for u in reversed(undo):
                u()
            if compile_on:
                mx.enable_compile()
            prefetcher.close()
            head_reader.close()
            if not self.plan.resident:
                self._restore(list(self._lazy))
            mx.set_cache_limit(old_cache_limit)
            mx.clear_cache()
        self.stats.bytes_read += self.files.bytes_read - read0
        self.stats.tokens += sum(len(s) for s in seqs)
        self.stats.prefix_tokens += len(pre)
        self.stats.wall_s += time.perf_counter() - t0
        return results

    def branch_logprobs(self, ids: Sequence[int], choose: Callable[[np.ndarray], Sequence[tuple[int, int]]],
                        batch: int = 64) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
        """(rows, branches, branch rows): the float32 log-softmax after every token of `ids` (n, V); `choose(rows)`
        names branches (i, c); for each, the log-softmax after ids[:i + 1] + [c] (len(branches), V). One forward of
        `ids` fills mlx-lm's KV caches, then each batch of branches is one step from those caches cut at i + 1
        (left-padded: mlx-lm's BatchKVCache). Needs the whole model in memory: streamed, every batch of one-token
        steps would read every layer again."""
        if not self.plan.resident:
            raise KDError("branch log-probs need the whole teacher in memory: run it without a memory budget (or "
                          "with one above its size)")
        caches = make_prompt_cache(self.model)
        if not all(type(c) is KVCache for c in caches):
            raise KDError(f"{self.family}: branch log-probs need a plain KV cache in every layer")
        if not self._installed_all:
            self._install_all()
        n = len(ids)
        logits = self.model(mx.array([list(map(int, ids))], dtype=mx.int32), cache=caches)[0]
        rows = log_softmax_np(np.array(logits.astype(mx.float32)))
        branches = [(int(i), int(c)) for i, c in choose(rows)]
        if any(not 0 <= i < n for i, _ in branches):
            raise KDError(f"a branch starts outside 0..{n - 1}")
        kv = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in caches]
        out = []
        for s in range(0, len(branches), batch):
            part = branches[s:s + batch]
            ends = np.array([i + 1 for i, _ in part], np.int64)
            pad = ends.max() - ends
            # row b: pad[b] ignored positions, then the first ends[b] keys/values of the sequence
            at = mx.array(np.maximum(np.arange(int(ends.max()))[None] - pad[:, None], 0).astype(np.int32))
            step = []
            for k, v in kv:
                c = BatchKVCache(pad.tolist())
                c.update_and_fetch(k[0][:, at].transpose(1, 0, 2, 3), v[0][:, at].transpose(1, 0, 2, 3))
                step.append(c)
            logits = self.model(mx.array([[c] for _, c in part], dtype=mx.int32), cache=step)[:, -1]
            out.append(log_softmax_np(np.array(logits.astype(mx.float32))))
        return rows, branches, np.concatenate(out) if out else np.zeros((0, rows.shape[1]), np.float32)

    def score_texts(self, texts: Sequence[str], add_bos: bool = False) -> np.ndarray:
        """Last-position log-probs (prompts x vocab) of each text."""
        tok = self.tokenizer
        seqs = [([tok.bos_id] if add_bos and tok.bos_id is not None else []) + tok.encode(t) for t in texts]
        out = self.logprobs_at(seqs, [[len(s) - 1] for s in seqs])
        return np.stack([o[0] for o in out]).astype(np.float32)

    # -------------------------------------------------------------------------------------------- plan
    def _make_plan(self, prefetch: bool) -> Plan:
        """Sizes come from the bytes on disk of each tensor, so every module counts with its own bits (mixed-
        precision quants, mxfp4) and dequantized copies with their fp32 size."""
        f = self.files
        n = len(self.structure.layers)
        layer_bytes = [sum(f.info(k).nbytes for k in ks) for ks in self.layer_keys]
        n_experts = [max((f.info(ks[0]).shape[0] for ks in mods.values() if ks), default=0)
                     for mods in self.expert_keys]
        expert_bytes = [sum(f.info(k).row_bytes for ks in mods.values() for k in ks) for mods in self.expert_keys]
        head_keys = set(self.head_keys)
        indivisible = [(k, f.info(k).nbytes) for ks in self.layer_keys for k in ks] + \
                      [(k, f.info(k).nbytes) for k in self.other_keys]
        largest = max(indivisible, key=lambda kv: kv[1]) if indivisible else ("", 0)
        head_row = sum(f.info(k).row_bytes for k in head_keys)
        other = sum(f.info(k).nbytes for k in self.other_keys)
        total = f.total_bytes
        B = self.memory_budget
        D = int(self.text_config["hidden_size"])
        deq = [self._dequant_bytes(i) for i in range(n)] if self._want_dequant else [0] * n
        act_min = self._act_bytes(1, min(16, self.max_block), 16) + 16 * D * 4 * 4
        if B is None or total + sum(deq) + 4 * act_min <= B:
            act = (1 << 62) if B is None else B - total - sum(deq)
            return Plan(B, [a + d for a, d in zip(layer_bytes, deq)], expert_bytes, n_experts, largest, act,
                        False, max(n_experts + [1]), False, self.vocab_size, total, True, [d > 0 for d in deq])
        if largest[1] > B:
            raise KDError(f"memory budget {format_bytes(B)} is below the largest indivisible tensor "
                          f"{largest[0]} ({format_bytes(largest[1])})")
        E = max(expert_bytes) if any(expert_bytes) else 0
        # a layer runs dequantized only where the copy leaves half the budget free; others keep quantized kernels
        use_deq = [d > 0 and a + d + E + act_min + other <= B // 2 for a, d in zip(layer_bytes, deq)]
        layer_bytes = [a + (d if u else 0) for a, d, u in zip(layer_bytes, deq, use_deq)]
        W = max(layer_bytes) + other
        need = W + E + act_min
        if need > B:
            i = int(np.argmax(layer_bytes))
            raise KDError(f"memory budget {format_bytes(B)} is too small: layer {i} needs "
                          f"{format_bytes(W)} of resident weights + {format_bytes(E)} per expert + "
                          f"{format_bytes(act_min)} of activations (at least {format_bytes(need)})")
        free = B - W - E
        act = max(act_min, int(0.4 * free))
        pre_layers = prefetch and (2 * W + act <= B)
        window = B - act - W - (W if pre_layers else 0)
        if E:
            per = max(1, window // E)
            pre_exp = prefetch and per >= 2
            experts_per_group = max(1, per // 2) if pre_exp else max(1, per)
        else:
            experts_per_group, pre_exp = 1, False
        # LM head slices: rows and their logits (bounded by what activations leave)
        head_rows = max(1, min(self.vocab_size, (B - act - other) // max(1, 2 * head_row)))
        # the head's first rows are read on a second thread while the last layer runs (its read otherwise waits
        # for the last layer), in the room that layer leaves: no next layer is prefetched there, and its expert
        # groups are held to ~1/min_expert_groups of its experts
        last_group = min(experts_per_group, -(-n_experts[-1] // self.min_expert_groups)) if expert_bytes[-1] else 0
        held_last = layer_bytes[-1] + other + act + last_group * expert_bytes[-1] * (2 if pre_exp else 1)
        copies = 1 if self.direct_reads else 2  # the plain path holds the numpy read and its MLX copy
        # freed buffers MLX keeps count too, and as much again for the blocks the C allocator keeps (peak RSS minus
        # MLX's peak, the process and MLX's cache: 0.14 GiB = 1.07x MLX's cache on bench_teacher (b), 64 prompts)
        room = B - held_last - self.process_bytes - 2 * self._cache_limit()
        head_prefetch = min(self.vocab_size, max(0, room) // max(1, copies * head_row)) if prefetch else 0
        return Plan(B, layer_bytes, expert_bytes, n_experts, largest, act, pre_layers, experts_per_group,
                    pre_exp, head_rows, total, False, use_deq, head_prefetch, last_group)

    def _cache_limit(self) -> int:
        """MLX's buffer cache while a call runs (freed buffers kept for reuse): an eighth of the budget."""
        return (self.memory_budget // 8) if self.memory_budget else 1 << 30

    def _dequant_bytes(self, i: int) -> int:
        """Bytes of the fp32 copies of layer i's quantized linears (0 unless the model computes in fp32)."""
        layer = self.structure.layers[i]
        if layer is None:
            return 0
        floats = [self.files.info(k).dtype for k in self.layer_keys[i]
                  if self.files.info(k).dtype in ("F32", "F16", "BF16") and not k.endswith((".scales", ".biases"))]
        if not floats or any(d != "F32" for d in floats):  # half-precision models keep mlx-lm's kernels
            return 0
        n = 0
        for _, m in layer.named_modules():
            if isinstance(m, nn.QuantizedLinear):
                n += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits * 4
        return n

    def _dims(self) -> tuple[int, int, int, int]:
        c = self.text_config
        D = int(c["hidden_size"])
        H = int(c.get("num_attention_heads") or 1)
        I = int(c.get("intermediate_size") or 4 * D)
        moe = c.get("moe_intermediate_size")
        if moe:
            k = int(c.get("num_experts_per_tok") or c.get("num_experts_per_token") or 1)
            I = max(I, int(moe) * (k + int(c.get("n_shared_experts") or 1)))
        if "qk_nope_head_dim" in c:  # MLA: per key, nope-keys + values are expanded per head
            hd = int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"]) + int(c["v_head_dim"])
        else:
            hd = 2 * int(c.get("head_dim") or D // H)
        return D, H, I, hd

    def _experts_per_token(self) -> int:
        """Routed experts each token selects (the config's name for it varies by family; at most all of them)."""
        c = self.text_config
        k = c.get("num_experts_per_tok") or c.get("num_experts_per_token") or c.get("moe_topk")
        return int(k) if k else max(self.plan.n_experts + [0])

    def _act_bytes(self, batch: int, q: int, lk: int) -> int:
        """Transient bytes for `batch` sequences, `q` query tokens attending to `lk` keys (a safe overestimate)."""
        D, H, I, hd = self._dims()
        per_q = 10 * D + 4 * I + 4 * H * lk + 2 * H * hd
        per_k = 3 * H * hd + 2 * D
        return 4 * batch * (q * per_q + lk * per_k)

    # -------------------------------------------------------------------------------------------- scheduling
    def _chunks(self, seqs: list[list[int]], pre: list[int]):
        """Groups of sequence indices whose hidden states stay resident together across all layers."""
        D = int(self.text_config["hidden_size"])
        V = self.vocab_size
        resident = self.plan.act_budget // 2
        per_tok = 4 * D * 4  # hidden in, hidden out, experts input and output (fp32)
        if any(self.plan.n_experts):  # the experts stage's output: one row per (token, selected expert)
            per_tok += 4 * D * self._experts_per_token()
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

    def _new_caches(self, offset: int) -> list:
        caches = [_full_cache(c) for c in make_prompt_cache(self.model)]
        for c in caches:
            _set_offset(c, offset)
        return caches

    def _tasks(self, chunk, seqs, positions, pre) -> tuple[list[_Task], list[tuple[int, list]]]:
        """The chunk's tasks in run order, and per sequence (in the order results are returned) where each asked
        position's row is: (sequence, [(task, index among that task's asked rows)])."""
        batches, q = self._microbatches(chunk, seqs, len(pre))
        tasks: list[_Task] = []
        prefix_task = None
        if pre:
            prefix_task = _Task(np.array([pre], dtype=np.int32), self._new_caches(0), None, [])
            tasks.append(prefix_task)
        owners = []
        for b in batches:
            Lmax = max(len(seqs[i]) for i in b)
            ids = np.zeros((len(b), Lmax), dtype=np.int32)
            for r, i in enumerate(b):
                ids[r, :len(seqs[i])] = seqs[i]
            pred = prefix_task
            where: dict[tuple[int, int], tuple[_Task, int]] = {}
            for s in range(0, Lmax, q):
                asked = sorted({(r, int(p) - s) for r, i in enumerate(b) for p in positions[i] if s <= int(p) < s + q})
                t = _Task(ids[:, s:s + q], self._new_caches(len(pre) + s), pred, asked)
                for j, (r, lp) in enumerate(asked):
                    where[(r, lp + s)] = (t, j)
                if pred is not None:
                    pred.successors += 1
                tasks.append(t)
                pred = t
            for r, i in enumerate(b):
                owners.append((i, [where[(r, int(p))] for p in positions[i]]))
        return tasks, owners

    # -------------------------------------------------------------------------------------------- execution
    def _swap_in(self) -> list[Callable[[], None]]:
        s = self.structure
        n = len(s.layers)
        undo = []
        stand_ins = [_LayerStandIn(layer, i) if layer is not None else None for i, layer in enumerate(s.layers)]
        object.__setattr__(s.layers_owner, s.layers_attr, stand_ins)
        undo.append(lambda: s.layers_owner.__dict__.pop(s.layers_attr, None))
        for i, layer in enumerate(s.layers):
            for slot, p in enumerate(s.experts[i]):
                undo.append(_swap(layer, p, _ExpertsStandIn(_module_at(layer, p), i, slot)))
        for p in s.embeds:
            undo.append(_swap(self.model, p, _EmbedStandIn(_module_at(self.model, p), p, n)))
        if s.head:
            undo.append(_swap(self.model, s.head, _HeadStandIn(_module_at(self.model, s.head), n)))
        return undo

    def _run_chunk(self, chunk, seqs, positions, pre, prefetcher: _Prefetcher, head_reader: _Prefetcher) -> dict:
        tasks, owners = self._tasks(chunk, seqs, positions, pre)
        n = len(self.structure.layers)
        bar = tqdm(total=n, desc="layers", unit="layer", leave=False) if self.progress else None
        state = {"layer": None, "swapped": None, "fut": None, "bar": bar, "prefetcher": prefetcher,
                 "head_reader": head_reader}
        self._head_fut = None
        for t in tasks:
            self._threads.start(t, self.model)
        try:
            if not self.plan.resident:
                self._install(self._to_mx(self._read(self.other_keys)))
                state["fut"] = prefetcher.submit(self._read, self.layer_keys[0])
            for t in tasks:
                t.resume()
                self._raise_if_failed(t)
            while not all(t.done for t in tasks):
                parked = [t for t in tasks if not t.done]
                stage = min(t.barrier[0] for t in parked)
                group = [t for t in parked if t.barrier[0] == stage]
                kind = group[0].barrier[1]
                if kind == "layer":
                    self._enter_layer(stage[0], state, prefetcher)
                    for t in group:
                        if t.pred is not None:
                            self._take_state(t, stage[0])
                        t.resume()
                        self._raise_if_failed(t)
                    continue
                if kind == "embed":
                    self._embed_stage(group)
                elif kind == "experts":
                    self._experts_stage(stage[0], group, prefetcher)
                elif kind == "head":
                    self._leave_layer(state)
                    self._head_stage(group, owners)
                for t in group:
                    t.resume()
                    self._raise_if_failed(t)
            self._leave_layer(state)
        finally:
            for t in tasks:
                if not t.done:
                    t.abort = True
                    t.resume()
            if bar is not None:
                bar.close()
            for f in (state["fut"], self._head_fut):
                if f is not None:
                    f.result()
            self._head_fut = None
        out = {}
        for i, where in owners:
            rows = [np.asarray(t.result[0, j].astype(mx.float32)) for t, j in where]
            out[i] = log_softmax_np(np.stack(rows)) if rows else np.zeros((0, self.vocab_size), np.float32)
        return out

    @staticmethod
    def _raise_if_failed(t: _Task) -> None:
        if t.error is not None:
            raise t.error

    def _take_state(self, t: _Task, i: int) -> None:
        _continue_from(t.caches[i], t.pred.caches[i], t.ids.shape[0])
        left = t.pred.taken[i] = t.pred.taken.get(i, t.pred.successors) - 1
        if left == 0:
            _drop_state(t.pred.caches[i])

    def _enter_layer(self, i: int, state: dict, prefetcher: _Prefetcher) -> None:
        self._leave_layer(state)
        state["layer"] = i
        if self.plan.resident:
            return
        w = self._to_mx(self._wait(state["fut"]))
        state["fut"] = None
        if self.plan.prefetch_layers and i + 1 < len(self.layer_keys):
            state["fut"] = prefetcher.submit(self._read, self.layer_keys[i + 1])
        self._install(w)
        del w
        if i == len(self.layer_keys) - 1 and self.plan.head_prefetch_rows:
            self._head_fut = state["head_reader"].submit(self._read_rows, self.head_keys,
                                                            np.arange(self.plan.head_prefetch_rows))
        if self.plan.dequant_layers[i]:
            state["swapped"] = self._dequantize_layer(self.structure.layers[i])

    def _leave_layer(self, state: dict) -> None:
        i = state["layer"]
        if i is None:
            return
        state["layer"] = None
        if state["bar"] is not None:
            state["bar"].update(1)
        self.stats.layer_passes += 1
        if self.plan.resident:
            return
        if state["swapped"] is not None:
            self.structure.layers[i].update_modules(state["swapped"])
            state["swapped"] = None
        self._restore(self.layer_keys[i])
        # the next layer's read starts now when the budget had no room to overlap it with this layer
        if state["fut"] is None and i + 1 < len(self.layer_keys):
            state["fut"] = state["prefetcher"].submit(self._read, self.layer_keys[i + 1])

    def _embed_stage(self, group: list[_Task]) -> None:
        """Each embedding reads only the rows of the tokens present (all tasks at once)."""
        by_module: dict[str, list[_Task]] = {}
        for t in group:
            by_module.setdefault(t.barrier[2][0].path, []).append(t)
        for path, ts in by_module.items():
            stand_in = ts[0].barrier[2][0]
            ids = [np.asarray(t.barrier[2][1]) for t in ts]
            if self.plan.resident:
                for t, a in zip(ts, ids):
                    t.reply = stand_in.module(mx.array(a))
                    mx.eval(t.reply)
                continue
            keys = self.embed_keys[path]
            rows = np.unique(np.concatenate([a.reshape(-1) for a in ids]))
            self._install(self._to_mx(self._read_rows(keys, rows)))
            for t, a in zip(ts, ids):
                t.reply = stand_in.module(mx.array(np.searchsorted(rows, a).astype(np.int32)))
                mx.eval(t.reply)
            self._restore(keys)

    def _head_stage(self, group: list[_Task], owners) -> None:
        """The LM head at the asked positions only, every task's rows in one matrix (in the order results are
        returned), the head read `head_rows` vocabulary rows at a time."""
        picked = {}
        for t in group:
            x = t.barrier[2][1]
            picked[id(t)] = x[mx.array([r for r, _ in t.asked], dtype=mx.int32),
                              mx.array([p for _, p in t.asked], dtype=mx.int32)] if t.asked else None
        order = [(t, j) for _, where in owners for t, j in where]
        V = self.vocab_size
        if not order:
            for t in group:
                t.reply = mx.zeros((1, 0, V))
            return
        X = mx.concatenate([picked[id(t)][j:j + 1] for t, j in order], axis=0)
        logits = self._head(X)
        at = {}
        for k, (t, j) in enumerate(order):
            at[(id(t), j)] = k
        for t in group:
            idx = [at[(id(t), j)] for j in range(len(t.asked))]
            t.reply = logits[mx.array(idx, dtype=mx.int32)][None] if idx else mx.zeros((1, 0, V), dtype=logits.dtype)

    def _head(self, x):
        """The LM head applied to `x` (n, D): logits (n, V), its first rows those read during the last layer (if
        any), the rest read `head_rows` vocabulary rows at a time."""
        s = self.structure
        apply = _module_at(self.model, s.head) if s.head else _module_at(self.model, s.embeds[0]).as_linear
        if self.plan.resident:
            out = apply(x)
            mx.eval(out)
            return out
        V, step = self.vocab_size, self.plan.head_rows
        fut, self._head_fut = self._head_fut, None
        start = self.plan.head_prefetch_rows if fut is not None else 0
        parts = []
        for a in ([None] if fut is not None else []) + list(range(start, V, step)):
            w = self._to_mx(self._wait(fut) if a is None else
                            self._read_rows(self.head_keys, np.arange(a, min(V, a + step))))
            self._install(w)
            del w
            part = apply(x)
            mx.eval(part)
            parts.append(part)
            self._restore(self.head_keys)
        return mx.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def _experts_stage(self, li: int, group: list[_Task], prefetcher: _Prefetcher) -> None:
        """One routed-experts module for every task: read only the experts some token selected, group by group,
        and run mlx-lm's module on each group with the indices remapped to the rows installed. The tokens of all
        tasks go in one matrix, so each expert runs once per layer on every token that chose it."""
        stand_in = group[0].barrier[2][0]
        switch = stand_in.module
        xs, inds = [], []
        for t in group:
            _, x, idx = t.barrier[2]
            mx.eval(x, idx)
            xs.append(x.reshape(-1, x.shape[-1]))
            inds.append(np.asarray(idx).reshape(-1, idx.shape[-1]))
        X = mx.concatenate(xs, axis=0) if len(xs) > 1 else xs[0]
        I = np.concatenate(inds, axis=0) if len(inds) > 1 else inds[0]
        del xs
        used = np.unique(I)
        self.stats.per_layer_experts[li] = len(used)
        path = self.structure.experts[li][stand_in.slot]
        keys = self.expert_keys[li][path]
        # every (token, slot) row is written once into one output, in place (MLX donates the buffer to each
        # scatter): the stage holds that output and one expert's rows, not all rows twice more
        out, written = None, 0
        if self.plan.resident:
            groups = [used]
        else:
            # at least `min_expert_groups` reads, so that reading a group overlaps computing the previous one
            last = li == len(self.structure.layers) - 1 and self.plan.last_experts_per_group
            cap = self.plan.last_experts_per_group if last else self.plan.experts_per_group
            n = max(-(-len(used) // cap), min(self.min_expert_groups, len(used)))
            groups = np.array_split(used, n)
        fut = None if self.plan.resident else prefetcher.submit(self._read_rows, keys, groups[0])
        for gi, grp in enumerate(groups):
            if self.plan.resident:
                local = np.arange(int(used.max()) + 1, dtype=np.int32)
            else:
                w = self._to_mx(self._wait(fut))
                # counted by what was read for this module (the head may be read meanwhile on another thread)
                self.stats.expert_bytes_read += sum(a.nbytes for a in w.values())
                fut = None
                if gi + 1 < len(groups) and self.plan.prefetch_experts:
                    fut = prefetcher.submit(self._read_rows, keys, groups[gi + 1])
                self._install(w)
                del w
                local = np.full(int(used.max()) + 1, -1, dtype=np.int32)
                local[grp] = np.arange(len(grp), dtype=np.int32)
            for flat, y in self._expert_outputs(switch, X, I, grp, local):
                if out is None:
                    out = mx.zeros((I.size, y.shape[-1]), dtype=y.dtype)
                out[mx.array(flat.astype(np.int32))] = y
                mx.eval(out)
                written += len(flat)
                del y
            if not self.plan.resident:
                self._restore(keys)
                if fut is None and gi + 1 < len(groups):
                    fut = prefetcher.submit(self._read_rows, keys, groups[gi + 1])
            self.stats.experts_loaded += len(grp)
        if written != I.size:
            raise RuntimeError(f"routed experts of layer {li}: {written} of {I.size} (token, slot) rows computed")
        k, start = I.shape[1], 0
        for t, ind in zip(group, inds):
            idx = t.barrier[2][2]
            t.reply = out[start * k:(start + len(ind)) * k].reshape(*idx.shape, out.shape[-1])
            start += len(ind)

    def _expert_outputs(self, switch, X, I: np.ndarray, grp, local: np.ndarray) -> Iterator[tuple[np.ndarray, Any]]:
        """Outputs of the experts in `grp` for the (token, slot) pairs that chose them, as (flat token x slot
        indices, rows), one run at a time: mlx-lm's module with remapped indices ("gather"), or one dense matmul
        per expert."""
        k = I.shape[1]
        t, j = np.nonzero(np.isin(I, grp))
        if not len(t):
            return
        flat = t * k + j
        if self.expert_kernel == "gather":
            y = switch(X[mx.array(t.astype(np.int32))], mx.array(local[I[t, j]])[:, None])[:, 0]
            mx.eval(y)
            yield flat, y
            return
        e_of = local[I[t, j]]
        for e in np.unique(e_of):
            sel = np.nonzero(e_of == e)[0]
            undo = [_swap(switch, name, _OneExpert(child, int(e), self.dequant_min_tokens))
                    for name, child in switch.children().items() if isinstance(child, _SWITCH)]
            try:
                y = switch(X[mx.array(t[sel].astype(np.int32))], mx.zeros((len(sel), 1), dtype=mx.uint32))[:, 0]
                mx.eval(y)
            finally:
                for u in undo:
                    u()
            yield flat[sel], y

    # -------------------------------------------------------------------------------------------- weights
    def _install_all(self) -> None:
        """The whole model read once and kept (the plan found it fits), quantized layers dequantized where planned."""
        keys = list(self._lazy)
        for s in range(0, len(keys), 64):
            self._install(self._to_mx(self._read(keys[s:s + 64])))
        for i, layer in enumerate(self.structure.layers):
            if self.plan.dequant_layers[i]:
                self._dequantize_layer(layer)
        self._installed_all = True

    def _dequantize_layer(self, layer):
        """Swap the layer's QuantizedLinear modules (not the routed experts) for Linear ones holding the dequantized
        weights; returns the originals to put back."""
        orig, new = [], []
        for name, m in layer.named_modules():
            if isinstance(m, nn.QuantizedLinear):
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

    def _install(self, arrays: dict) -> None:
        self.model.update(tree_unflatten(list(arrays.items())), strict=False)

    def _restore(self, keys: list[str]) -> None:
        self._install({k: self._lazy[k] for k in keys})

    def _read(self, keys: list[str]) -> dict:
        """Whole tensors: MLX arrays read in place (direct reads) or numpy buffers for `_to_mx` (the plain path)."""
        if self.direct_reads:
            return {k: self.files.read_mx(k) for k in keys}
        return {k: self.files.read_np(k) for k in keys}

    def _read_rows(self, keys: list[str], rows) -> dict:
        if self.direct_reads:
            return {k: self.files.read_mx(k, rows) for k in keys}
        return {k: self.files.read_rows_np(k, rows) for k in keys}

    def _to_mx(self, arrays: dict) -> dict:
        """MLX arrays of what `_read`/`_read_rows` returned (numpy buffers copied, MLX arrays as they are)."""
        out = {}
        for k in list(arrays):
            a = arrays.pop(k)  # mx.array copies: each numpy buffer is dropped at once
            out[k] = a if isinstance(a, mx.array) else self.files.to_mx(k, a)
        mx.eval(list(out.values()))  # one evaluation for all (a tiny model pays ~0.1 ms per call)
        return out

    def _wait(self, fut: Future):
        t = time.perf_counter()
        r = fut.result()
        self.stats.io_wait_s += time.perf_counter() - t
        return r

    # -------------------------------------------------------------------------------------------- inspect
    def describe(self) -> dict:
        f = self.files
        n_params = 0
        modules = dict(self.model.named_modules())
        for k, t in f.tensors.items():
            base, _, leaf = k.rpartition(".")
            m = modules.get(base)
            if leaf in ("scales", "biases", "global_scale") and hasattr(m, "bits"):
                continue
            n = int(np.prod(t.shape))
            if leaf == "weight" and hasattr(m, "bits"):  # packed quantized weights
                n = n * 32 // m.bits
            n_params += n
        layers = [{"layer": i, "resident_bytes": self.plan.layer_bytes[i], "experts": self.plan.n_experts[i],
                   "bytes_per_expert": self.plan.expert_bytes[i]} for i in range(len(self.structure.layers))]
        return {"model": str(self.model_dir), "model_type": self.config.get("model_type"), "family": self.family,
                "parameters": n_params, "bytes_on_disk": f.total_bytes, "files": [p.name for p in f.files],
                "layers": layers, "plan": self.plan.describe()}

    def bytes_per_question(self, tokens: int, experts_touched_fraction: float | None = None) -> int:
        """Rough bytes read per question in a chunk of one: every resident weight + the routed experts."""
        f = self.files
        per = sum(self.plan.layer_bytes) + sum(f.info(k).nbytes for k in self.other_keys + self.head_keys)
        k = self._experts_per_token()
        for e, ne in zip(self.plan.expert_bytes, self.plan.n_experts):
            if ne:
                frac = experts_touched_fraction if experts_touched_fraction is not None else \
                    1 - (1 - min(k, ne) / ne) ** tokens
                per += int(e * ne * frac)
        return per


class _OneExpert:
    """Stands in for a `SwitchLinear`/`QuantizedSwitchLinear` when every token goes to expert `e`: one dense matmul
    (4-bit weights dequantized first for enough tokens: fp32 BLAS is ~30x faster than CPU quantized_matmul)."""

    def __init__(self, lin: nn.Module, e: int, dequant_min_tokens: int):
        self.lin, self.e, self.dequant_min_tokens = lin, e, dequant_min_tokens

    def __call__(self, x, indices, sorted_indices=False):
        lin, e = self.lin, self.e
        if isinstance(lin, QuantizedSwitchLinear):
            biases = lin.get("biases")
            b = biases[e] if biases is not None else None
            extra = {"global_scale": lin.global_scale[e]} if getattr(lin, "global_scale", None) is not None else {}
            if x.size // x.shape[-1] >= self.dequant_min_tokens:
                w = mx.dequantize(lin["weight"][e], lin["scales"][e], b, lin.group_size, lin.bits, mode=lin.mode,
                                  **extra)
                y = x @ w.T
            else:
                y = mx.quantized_matmul(x, lin["weight"][e], lin["scales"][e], b, transpose=True,
                                        group_size=lin.group_size, bits=lin.bits, mode=lin.mode, **extra)
        else:
            y = x @ lin["weight"][e].T
        if "bias" in lin:
            y = y + lin["bias"][e]
        return y


__all__ = ["StreamingTeacher", "Plan", "StreamStats", "Structure"]
