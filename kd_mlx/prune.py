"""Structured pruning of an mlx-lm student: drop whole layers, MLP channels or attention heads, ranked by their
importance on the training split, and write the smaller model as an mlx-lm model directory.

    python -m kd_mlx.prune --student DIR [--adapters RUN/best] --store STORE --data CMMLU --splits splits.json \
        [--teacher-tokenizer DIR] (--drop-layers N | --mlp-keep 0.5 | --heads-keep 0.75) --out PRUNED
    python -m kd_mlx.train --student PRUNED --store STORE --data CMMLU --splits splits.json --out RUN   # KD recovery
    python -m kd_mlx.eval --model PRUNED --adapters RUN/best --data CMMLU --splits splits.json --split test --out RES

Importance (measured on `--calib-questions` questions of the train split, the same prompts training uses):
- layer i: the increase of the KD loss (answer-KL of the student's A–D distribution against the store's teacher
  A–D distribution, temperature 1) when layer i is skipped. The `--drop-layers N` layers whose removal costs the
  least are dropped (one shot, not greedy: one skip at a time).
- MLP channel j of a layer: the mean over prompt tokens of the norm of what the channel adds to the residual stream,
  |a_j| · ||W_out[:, j]|| (a_j its activation, W_out the down projection); each layer keeps its top
  `round(mlp_keep · intermediate_size)` channels (the config has one intermediate size for all layers).
- attention head h: the mean norm of the head's output through the output projection, ||o_h · W_o[:, h]ᵀ||. With
  grouped-query attention every key/value head is kept and each group keeps the same number of query heads.
  mlx-lm's `phi` derives its head size from hidden_size / num_heads, so its heads cannot be removed (KDError).

Why these scores: the layer score is the loss the user cares about, measured exactly (skipping a layer is an
exact operation on a residual network); per-channel and per-head ablation by loss would cost one forward per
channel, so they use the size of the removed contribution, which is what zeroing it changes in the residual stream.
The fast paths (`layer_importance`, `width_importance`) have plain references beside them
(`layer_importance_reference`: one full forward per skipped layer; `width_importance_reference`: one ablation per
channel / head) and tests that they agree.

With `--adapters` the LoRA (or full) adapters are fused first with mlx-lm's own machinery (`load_adapters` + the
tuner layers' `fuse`). The output directory holds the pruned weights and `config.json` (mlx-lm loads it), the
student's tokenizer files, `prune_config.json` (the final configuration) and `importance.json` (every score and
what was kept). The output directory follows the project's rule (`kd_mlx.utils.prepare_output_dir`): new or
empty, or an earlier pruned model replaced with `--overwrite`; never an input or a directory around one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.base import create_attention_mask
from mlx_lm.utils import _get_classes, save_config, save_model

from . import losses
from .export import copy_tokenizer_files, fuse_adapters
from .model_dir import load_model, read_adapter_config, read_model_config
from .train.batches import Example, collate
from .train.run import DEFAULTS as TRAIN_DEFAULTS, prepare
from .utils import (KDError, cli_errors, load_yaml_config, merge_config, path_identity, prepare_output_dir,
                    resolve_model_path, staged_output_dir, write_json_atomic)


@dataclass(frozen=True)
class Family:
    """Where the prunable parts of one mlx-lm architecture live (module names inside a block)."""

    mlp_in: tuple[str, ...]  # linears whose output rows are the MLP channels
    mlp_out: str  # linear whose input columns are the MLP channels
    attn_out: str  # attention output projection (input columns grouped by head)
    final_norm: str  # the backbone's last norm (`model.model.<final_norm>`)
    heads_prunable: bool


FAMILIES: dict[str, Family] = {
    "phi": Family(("fc1",), "fc2", "dense", "final_layernorm", heads_prunable=False),
    "llama": Family(("gate_proj", "up_proj"), "down_proj", "o_proj", "norm", heads_prunable=True),
}

DEFAULTS: dict[str, Any] = {
    "student": None, "adapters": None, "store": None, "data": None, "splits": None, "teacher_tokenizer": None,
    "out": None, "drop_layers": None, "mlp_keep": None, "heads_keep": None,
    "calib_split": "train", "calib_questions": 128, "batch_size": 8, "max_seq_len": 2048, "dtype": "float32",
    "overwrite": False,
}
PRUNE_KIND = "prune"  # the output-directory kind (kd_mlx.utils.prepare_output_dir)
# the settings that determine the pruned model (the output directory's identity)
IDENTITY_KEYS = ("student", "adapters", "store", "data", "splits", "teacher_tokenizer", "drop_layers", "mlp_keep",
                 "heads_keep", "calib_split", "calib_questions", "batch_size", "max_seq_len", "dtype")


def family_of(config: dict) -> Family:
    mtype = config.get("model_type")
    if mtype not in FAMILIES:
        raise KDError(f"pruning supports mlx-lm model types {', '.join(FAMILIES)}; the student is {mtype!r}")
    return FAMILIES[mtype]


# --------------------------------------------------------------------------------------------------------------
# The backbone, one layer at a time
# --------------------------------------------------------------------------------------------------------------

def head_of(model: nn.Module) -> Callable[[mx.array], mx.array]:
    """The LM head: `lm_head`, or the tied embedding."""
    if "lm_head" in model:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def layer_inputs(model: nn.Module, tokens: mx.array) -> tuple[list[mx.array], Any]:
    """Hidden states entering every layer, plus the state after the last one (N+1 arrays), and the mask."""
    h = model.model.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    states = [h]
    for layer in model.model.layers:
        h = layer(h, mask, None)
        states.append(h)
    return states, mask


def final_hidden(model: nn.Module, family: Family, h: mx.array) -> mx.array:
    return getattr(model.model, family.final_norm)(h)


# A loss over a batch: (normed final hidden states, batch) -> (sum of the per-item losses, number of items).
LossFn = Callable[[mx.array, Any], tuple[mx.array, float]]


def answer_kl_loss(model: nn.Module, letter_ids: Sequence[int]) -> LossFn:
    """The KD loss of the answer position: answer-KL (temperature 1) of the student's A–D distribution against
    the store's teacher A–D distribution, summed over the batch's questions. The batch is `Batch.arrays()`."""
    head, letters = head_of(model), mx.array(list(letter_ids))

    def fn(hidden: mx.array, batch: tuple) -> tuple[mx.array, float]:
        _, lengths, _, t_ans, *_ = batch
        h_ans = hidden[mx.arange(hidden.shape[0]), lengths - 1]
        kl = losses.answer_kl(head(h_ans), letters, t_ans, temperature=1.0, reduction="sum")
        return kl, float(hidden.shape[0])

    return fn


def layer_importance(model: nn.Module, family: Family, batches: Sequence[tuple], loss_fn: LossFn) -> np.ndarray:
    """(n_layers,) mean loss with layer i skipped minus the mean loss of the whole model.

    Fast path: the states entering every layer come from one full forward; skipping layer i then only reruns the
    layers after it (about half the work of one full forward per skip)."""
    n = len(model.model.layers)
    base, skipped, count = 0.0, np.zeros(n), 0.0
    for batch in batches:
        states, mask = layer_inputs(model, batch[0])
        loss, k = loss_fn(final_hidden(model, family, states[-1]), batch)
        base += loss.item()
        count += k
        for i in range(n):
            h = states[i]
            for layer in model.model.layers[i + 1:]:
                h = layer(h, mask, None)
            skipped[i] += loss_fn(final_hidden(model, family, h), batch)[0].item()
    return (skipped - base) / max(count, 1.0)


def layer_importance_reference(model: nn.Module, family: Family, batches: Sequence[tuple],
                               loss_fn: LossFn) -> np.ndarray:
    """Plain version: the model's own forward with the layer list lacking layer i, once per layer."""
    layers = list(model.model.layers)

    def mean_loss() -> float:
        total, count = 0.0, 0.0
        for batch in batches:
            hidden = model.model(batch[0], None)
            loss, k = loss_fn(hidden, batch)
            total += loss.item()
            count += k
        return total / max(count, 1.0)

    base = mean_loss()
    out = np.zeros(len(layers))
    try:
        for i in range(len(layers)):
            model.model.layers = layers[:i] + layers[i + 1:]
            out[i] = mean_loss() - base
    finally:
        model.model.layers = layers
    return out


class _Tally:
    """Sums shared by the wrapped projections of one scoring pass (a plain object: not part of the module tree)."""

    def __init__(self):
        self.valid: mx.array | None = None  # (B, L) 1 for real tokens of the current batch
        self.sums: dict[int, mx.array] = {}


class _ContributionTally(nn.Module):
    """Wraps an output projection; on every call adds, per input group (an MLP channel: group 1; a head: group
    head_dim), the norm of that group's contribution to the output summed over the valid tokens."""

    def __init__(self, linear: nn.Linear, group: int, tally: _Tally, key: int):
        super().__init__()
        self.linear = linear
        self.group, self.tally, self.key = group, tally, key

    def __call__(self, x: mx.array) -> mx.array:
        w = self.linear.weight  # (D_out, F)
        valid = self.tally.valid
        if self.group == 1:
            per = mx.abs(x) * mx.linalg.norm(w, axis=0)  # |a_j| · ||W[:, j]||: the norm of a rank-1 contribution
        else:
            B, L, F = x.shape
            G = F // self.group
            contrib = mx.einsum("blgk,dgk->blgd", x.reshape(B, L, G, self.group), w.reshape(w.shape[0], G, self.group))
            per = mx.linalg.norm(contrib, axis=-1)  # (B, L, G)
        s = (per * valid[..., None]).sum(axis=(0, 1))
        sums = self.tally.sums
        sums[self.key] = sums[self.key] + s if self.key in sums else s
        return self.linear(x)


def _valid_mask(batch: tuple) -> mx.array:
    tokens, lengths = batch[0], batch[1]
    return (mx.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(mx.float32)


def width_importance(model: nn.Module, family: Family, batches: Sequence[tuple], what: str) -> np.ndarray:
    """(n_layers, units) mean contribution norm per MLP channel (`what="mlp"`) or attention head (`"heads"`), over
    the valid tokens of `batches` (`tokens, lengths, ...`), from one batched forward per batch."""
    tally = _Tally()
    saved = []
    for i, layer in enumerate(model.model.layers):
        parent = layer.mlp if what == "mlp" else layer.self_attn
        name = family.mlp_out if what == "mlp" else family.attn_out
        group = 1 if what == "mlp" else _head_dim(layer.self_attn)
        lin = getattr(parent, name)
        saved.append((parent, name, lin))
        setattr(parent, name, _ContributionTally(lin, group, tally, i))
    n_tokens = 0.0
    try:
        for batch in batches:
            tally.valid = _valid_mask(batch)
            model.model(batch[0], None)  # the tallies are the output; evaluated below
            mx.eval(list(tally.sums.values()))
            n_tokens += float(batch[1].sum().item())
    finally:
        for parent, name, lin in saved:
            setattr(parent, name, lin)
    return np.stack([np.array(tally.sums[i]) for i in range(len(saved))]) / max(n_tokens, 1.0)


def _head_dim(attn: nn.Module) -> int:
    n_heads = getattr(attn, "n_heads", None) or attn.num_heads
    return attn.q_proj.weight.shape[0] // n_heads


def _n_heads(attn: nn.Module) -> tuple[int, int]:
    if hasattr(attn, "n_heads"):
        return attn.n_heads, attn.n_kv_heads
    return attn.num_heads, attn.num_key_value_heads


def width_importance_reference(model: nn.Module, family: Family, examples: Sequence[Example], what: str
                               ) -> np.ndarray:
    """Plain version, one example and one unit at a time: zero the unit's columns of the output projection, rerun
    that module on the same input, and take the norm of the change of its output per token."""
    layers = list(model.model.layers)
    rows = []
    n_tokens = sum(len(e) for e in examples)
    for li, layer in enumerate(layers):
        parent = layer.mlp if what == "mlp" else layer.self_attn
        out_name = family.mlp_out if what == "mlp" else family.attn_out
        lin = getattr(parent, out_name)
        group = 1 if what == "mlp" else _head_dim(layer.self_attn)
        units = lin.weight.shape[1] // group
        scores = np.zeros(units)
        for ex in examples:
            tokens = mx.array(ex.tokens)[None]
            states, mask = layer_inputs(model, tokens)
            x = _module_input(layer, family, states[li], mask, what)
            call = (lambda: parent(x)) if what == "mlp" else (lambda: parent(x, mask, None))
            full = call()
            w = lin.weight
            for u in range(units):
                cols = np.ones(w.shape[1], np.float32)
                cols[u * group:(u + 1) * group] = 0.0
                lin.weight = w * mx.array(cols)
                change = full - call()
                scores[u] += float(mx.linalg.norm(change, axis=-1).sum().item())
            lin.weight = w
        rows.append(scores / n_tokens)
    return np.stack(rows)


def _module_input(layer: nn.Module, family: Family, h: mx.array, mask: Any, what: str) -> mx.array:
    """The input the block hands its MLP / attention, for the reference."""
    x = layer.input_layernorm(h)
    if what == "heads" or family is FAMILIES["phi"]:  # phi: attention and MLP read the same normed input
        return x
    return layer.post_attention_layernorm(h + layer.self_attn(x, mask, None))


# --------------------------------------------------------------------------------------------------------------
# Surgery
# --------------------------------------------------------------------------------------------------------------

def layers_to_keep(scores: np.ndarray, drop: int) -> list[int]:
    """Indices of the layers kept: the `drop` with the smallest loss increase go (ties: the later layer goes)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(set(range(len(scores))) - set(order[:drop]))


def top_units(scores: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` highest-scoring indices, in their original order (ties: the lower index wins)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return np.sort(order[:keep])


def heads_to_keep(scores: np.ndarray, n_heads: int, n_kv: int, keep_frac: float) -> tuple[np.ndarray, int, int]:
    """(kept query heads, new n_heads, new n_kv_heads). Multi-head attention: whole heads (query, key, value) go.
    Grouped-query: every key/value head stays and each group keeps its top `round(keep · group size)` query heads,
    so the groups stay contiguous and equal, as the attention kernel requires."""
    if n_kv == n_heads:
        keep = max(1, round(keep_frac * n_heads))
        return top_units(scores, keep), keep, keep
    rep = n_heads // n_kv
    per_group = max(1, round(keep_frac * rep))
    kept = [g * rep + top_units(scores[g * rep:(g + 1) * rep], per_group) for g in range(n_kv)]
    return np.concatenate(kept), per_group * n_kv, n_kv


def _rows(idx: np.ndarray, size: int) -> mx.array:
    """Row indices of the units `idx`, each `size` rows wide."""
    return mx.array((idx[:, None] * size + np.arange(size)[None, :]).reshape(-1).astype(np.int32))


def _slice_linear(weights: dict, prefix: str, rows: mx.array | None = None, cols: mx.array | None = None) -> None:
    w = weights[f"{prefix}.weight"]
    if rows is not None:
        w = mx.take(w, rows, axis=0)
        if f"{prefix}.bias" in weights:
            weights[f"{prefix}.bias"] = mx.take(weights[f"{prefix}.bias"], rows, axis=0)
    if cols is not None:
        w = mx.take(w, cols, axis=1)
    weights[f"{prefix}.weight"] = w


@dataclass
class Plan:
    """What to keep: layer indices (of the model before pruning), per kept layer the MLP channels and query heads."""

    layers: list[int]
    mlp: dict[int, np.ndarray] | None = None
    heads: dict[int, np.ndarray] | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None

    def to_json(self) -> dict:
        units = lambda d: None if d is None else {str(i): np.asarray(v).tolist() for i, v in d.items()}  # noqa: E731
        return {"layers": list(self.layers), "mlp": units(self.mlp), "heads": units(self.heads),
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads}


def apply_plan(model: nn.Module, config: dict, plan: Plan) -> tuple[nn.Module, dict]:
    """A new model (built by mlx-lm from the new config, weights loaded strictly) and its config."""
    family = family_of(config)
    old = dict(tree_flatten(model.parameters()))
    new: dict[str, mx.array] = {}
    for name, v in old.items():
        if not name.startswith("model.layers."):
            new[name] = v
    config = dict(config)
    for j, i in enumerate(plan.layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{j}."
        layer_w = {dst + k[len(src):]: v for k, v in old.items() if k.startswith(src)}
        attn = model.model.layers[i].self_attn
        if plan.mlp is not None:
            ch = mx.array(plan.mlp[i].astype(np.int32))
            for name in family.mlp_in:
                _slice_linear(layer_w, f"{dst}mlp.{name}", rows=ch)
            _slice_linear(layer_w, f"{dst}mlp.{family.mlp_out}", cols=ch)
        if plan.heads is not None:
            hd = _head_dim(attn)
            n_heads, n_kv = _n_heads(attn)
            q_rows = _rows(plan.heads[i], hd)
            _slice_linear(layer_w, f"{dst}self_attn.q_proj", rows=q_rows)
            _slice_linear(layer_w, f"{dst}self_attn.{family.attn_out}", cols=q_rows)
            if plan.n_kv_heads != n_kv:  # multi-head attention: the key/value heads go with their query heads
                for name in ("k_proj", "v_proj"):
                    _slice_linear(layer_w, f"{dst}self_attn.{name}", rows=q_rows)
        new.update(layer_w)
    config["num_hidden_layers"] = len(plan.layers)
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = [config["layer_types"][i] for i in plan.layers]
    if plan.mlp is not None:
        config["intermediate_size"] = int(len(next(iter(plan.mlp.values()))))
    if plan.heads is not None:
        config["head_dim"] = _head_dim(model.model.layers[0].self_attn)
        config["num_attention_heads"], config["num_key_value_heads"] = int(plan.n_heads), int(plan.n_kv_heads)
    model_cls, args_cls = _get_classes(config)
    pruned = model_cls(args_cls.from_dict(config))
    pruned.load_weights(list(new.items()), strict=True)
    mx.eval(pruned.parameters())
    return pruned, config


def count_parameters(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


@dataclass
class PruneResult:
    model: nn.Module
    config: dict
    record: dict


def prune_model(model: nn.Module, config: dict, batches: Sequence[tuple], loss_fn: LossFn | None, *,
                drop_layers: int = 0, mlp_keep: float | None = None, heads_keep: float | None = None
                ) -> PruneResult:
    """Score and prune in this order: layers (needs `loss_fn`), then heads, then MLP channels, each scored on the
    model left by the previous step. `batches` are `Batch.arrays()`-like tuples starting `tokens, lengths`."""
    family = family_of(config)
    check_prune_request(config, drop_layers, mlp_keep, heads_keep)
    record: dict[str, Any] = {"parameters_before": count_parameters(model), "model_type": config["model_type"]}
    if drop_layers:
        scores = layer_importance(model, family, batches, loss_fn)
        kept = layers_to_keep(scores, drop_layers)
        model, config = apply_plan(model, config, Plan(kept))
        record["layers"] = {"score": scores.tolist(), "kept": kept,
                            "dropped": sorted(set(range(len(scores))) - set(kept))}
    if heads_keep is not None and heads_keep < 1:
        scores = width_importance(model, family, batches, "heads")
        n_heads, n_kv = _n_heads(model.model.layers[0].self_attn)
        kept = {i: heads_to_keep(s, n_heads, n_kv, heads_keep) for i, s in enumerate(scores)}
        nh, nkv = kept[0][1], kept[0][2]
        model, config = apply_plan(model, config, Plan(list(range(len(scores))), heads={i: k[0] for i, k in kept.items()},
                                                       n_heads=nh, n_kv_heads=nkv))
        record["heads"] = {"score": scores.tolist(), "kept": [k[0].tolist() for k in kept.values()],
                           "num_attention_heads": nh, "num_key_value_heads": nkv}
    if mlp_keep is not None and mlp_keep < 1:
        scores = width_importance(model, family, batches, "mlp")
        keep = max(1, round(mlp_keep * scores.shape[1]))
        kept = {i: top_units(s, keep) for i, s in enumerate(scores)}
        model, config = apply_plan(model, config, Plan(list(range(len(scores))), mlp=kept))
        record["mlp"] = {"score": scores.tolist(), "kept": [k.tolist() for k in kept.values()],
                         "intermediate_size": keep}
    record["parameters_after"] = count_parameters(model)
    return PruneResult(model, config, record)


def check_prune_request(config: dict, drop_layers: int | None, mlp_keep: float | None,
                        heads_keep: float | None) -> None:
    """One-line errors for a request the model cannot take, from its config alone (before any compute)."""
    family = family_of(config)
    if not drop_layers and mlp_keep is None and heads_keep is None:
        raise KDError("nothing to prune: give --drop-layers N, --mlp-keep FRACTION and/or --heads-keep FRACTION")
    if "quantization" in config or "quantization_config" in config:
        raise KDError("the student is quantized: prune the full-precision model, then quantize with "
                      "python -m kd_mlx.export --quantize")
    n_layers = int(config["num_hidden_layers"])
    if drop_layers is not None and not 0 <= int(drop_layers) < n_layers:
        raise KDError(f"--drop-layers must be between 0 and {n_layers - 1} (the student has {n_layers} layers), "
                      f"got {drop_layers}")
    for name, v in (("--mlp-keep", mlp_keep), ("--heads-keep", heads_keep)):
        if v is not None and not (0 < float(v) <= 1):
            raise KDError(f"{name} is the fraction kept, in (0, 1]; got {v}")
    if heads_keep is not None and heads_keep < 1 and not family.heads_prunable:
        raise KDError(f"mlx-lm's {config['model_type']} derives its head size from hidden_size / num_heads, so heads "
                      f"cannot be removed: use --drop-layers or --mlp-keep")


# --------------------------------------------------------------------------------------------------------------
# Writing the model directory
# --------------------------------------------------------------------------------------------------------------

def write_model_dir(out: Path, model: nn.Module, config: dict, tokenizer_src: Path, final_config: dict,
                    record: dict, identity: dict | None = None) -> Path:
    """Weights + config.json (mlx-lm's writers), tokenizer files, prune_config.json, importance.json; built under a
    temporary name beside `out`, loaded back with mlx-lm, then renamed onto `out` (`staged_output_dir`; the caller
    checked `out` with `prepare_output_dir`)."""
    with staged_output_dir(out, PRUNE_KIND, identity or {}) as tmp:
        save_model(tmp, model, donate_model=False)
        save_config(dict(config), tmp / "config.json")
        copied = copy_tokenizer_files(tokenizer_src, tmp)
        if not copied:
            raise KDError(f"student {tokenizer_src} has no tokenizer files to copy (tokenizer.json, ...)")
        write_json_atomic(tmp / "prune_config.json", final_config)
        write_json_atomic(tmp / "importance.json", record)
        load_model(tmp, lazy=True)
    return Path(out)


def load_fused_student(student: Path, adapters: str | None, dtype: str) -> tuple[nn.Module, dict]:
    """The student with its adapters fused (`kd_mlx.model_dir.load_model` applies them with mlx-lm's
    `load_adapters`, then the tuner layers' own `fuse`), cast to `dtype`."""
    model, config = load_model(student, adapters=adapters)
    if adapters:
        model.eval()
        fuse_adapters(model)
    model.update(tree_map_floats(model.parameters(), getattr(mx, dtype)))
    mx.eval(model.parameters())
    return model, config


def tree_map_floats(tree: Any, dtype: mx.Dtype) -> Any:
    return tree_map(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x, tree)


def calibration_batches(examples: Sequence[Example], batch_size: int) -> list[tuple]:
    """Padded `Batch.arrays()` tuples, length-sorted (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [collate([examples[i] for i in order[s:s + batch_size]], pad_to=8).arrays()
            for s in range(0, len(order), batch_size)]


def run_prune(cfg: dict, progress: bool = True) -> PruneResult:
    """The CLI: checks, calibration examples from the train split (through `kd_mlx.train.run.prepare`, so the
    prompts and the store checks are the training run's), scores, surgery, the model directory."""
    for key in ("student", "store", "data", "splits", "out"):
        if not cfg.get(key):
            raise KDError(f"missing required setting --{key.replace('_', '-')}")
    student = resolve_model_path(cfg["student"])
    model_config = read_model_config(student)
    check_prune_request(model_config, cfg["drop_layers"], cfg["mlp_keep"], cfg["heads_keep"])
    if cfg["dtype"] not in ("float32", "float16", "bfloat16"):
        raise KDError(f"--dtype must be float32, float16 or bfloat16, got {cfg['dtype']}")
    if int(cfg["calib_questions"]) < 1 or int(cfg["batch_size"]) < 1:
        raise KDError("--calib-questions and --batch-size must be >= 1")
    if cfg["adapters"]:
        read_adapter_config(cfg["adapters"])
    identity = {k: path_identity(cfg[k]) if k in ("student", "adapters", "store", "data", "splits",
                                                 "teacher_tokenizer") else cfg[k] for k in IDENTITY_KEYS}
    prepare_output_dir(cfg["out"], PRUNE_KIND, identity, [cfg["student"], cfg["adapters"], cfg["store"], cfg["data"],
                                                          cfg["splits"], cfg["teacher_tokenizer"]],
                       overwrite=bool(cfg["overwrite"]))
    out = Path(cfg["out"])
    tcfg = {**TRAIN_DEFAULTS, "student": str(student), "store": cfg["store"], "data": cfg["data"],
            "splits": cfg["splits"], "out": str(out), "teacher_tokenizer": cfg["teacher_tokenizer"],
            "train_split": cfg["calib_split"], "val_split": None, "max_train_questions": int(cfg["calib_questions"]),
            "max_seq_len": int(cfg["max_seq_len"]), "kd_weight": 0.0}
    prep = prepare(tcfg, progress)
    batches = calibration_batches(prep.train, int(cfg["batch_size"]))
    model, config = load_fused_student(student, cfg["adapters"], cfg["dtype"])
    config["torch_dtype"] = cfg["dtype"]
    model.eval()
    res = prune_model(model, config, batches, answer_kl_loss(model, prep.letter_ids),
                      drop_layers=int(cfg["drop_layers"] or 0), mlp_keep=cfg["mlp_keep"], heads_keep=cfg["heads_keep"])
    res.record["calibration_questions"] = len(prep.train)
    write_model_dir(out, res.model, res.config, student, cfg, res.record, identity)
    return res


def _explicit(ctx: click.Context, names: Sequence[str]) -> dict:
    from click.core import ParameterSource

    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}


@click.command("prune", help=__doc__.split("\n\n")[0])
@click.option("--student", help="Student model: directory or hub id.")
@click.option("--adapters", type=click.Path(), help="Adapters dir (mlx-lm format, e.g. RUN/best), fused first.")
@click.option("--store", type=click.Path(), help="The teacher's top-k store (its A–D distributions score layers).")
@click.option("--data", help="CMMLU directory (or hub id) the store was dumped from.")
@click.option("--splits", type=click.Path(), help="splits.json.")
@click.option("--teacher-tokenizer", type=click.Path(), help="The teacher's tokenizer dir (default: from the store).")
@click.option("--drop-layers", type=int, help="Number of layers to remove.")
@click.option("--mlp-keep", type=float, help="Fraction of MLP channels kept in every layer.")
@click.option("--heads-keep", type=float, help="Fraction of attention (query) heads kept in every layer.")
@click.option("--calib-split", help="Split the importance is measured on.  [default: train]")
@click.option("--calib-questions", type=int, help="Questions used to measure importance.  [default: 128]")
@click.option("--batch-size", type=int, help="Calibration batch size.  [default: 8]")
@click.option("--max-seq-len", type=int, help="Student prompt length limit.  [default: 2048]")
@click.option("--dtype", help="Weights dtype of the pruned model.  [default: float32]")
@click.option("--out", type=click.Path(), help="Output model directory (new, or --overwrite an earlier pruned model).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an earlier pruned model in --out.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config, merged under the flags.")
@click.option("--progress/--no-progress", default=True)
@click.pass_context
@cli_errors
def main_cmd(ctx: click.Context, config_file: str | None, progress: bool, **_: Any) -> None:
    cfg = merge_config(load_yaml_config(config_file), _explicit(ctx, list(DEFAULTS)), DEFAULTS)
    res = run_prune(cfg, progress)
    r = res.record
    click.echo(f"wrote {cfg['out']}: {r['parameters_before'] / 1e6:.2f}M -> {r['parameters_after'] / 1e6:.2f}M "
               f"parameters" + (f"; dropped layers {r['layers']['dropped']}" if "layers" in r else ""))
    click.echo(f"recover: python -m kd_mlx.train --student {cfg['out']} --store {cfg['store']} --data {cfg['data']} "
               f"--splits {cfg['splits']} --out RUN")


def main(argv: Sequence[str] | None = None) -> None:
    main_cmd.main(args=list(argv) if argv is not None else None, prog_name="python -m kd_mlx.prune")


if __name__ == "__main__":
    main()
