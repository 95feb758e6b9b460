"""The training loop: compiled step, gradient accumulation, AdamW with warm-up + cosine, validation with early
stopping, checkpoints that resume exactly, non-finite-loss stop, metrics JSONL + PNG.

Run layout:
    RUN/config.json                      final merged config
    RUN/metrics.jsonl                    one line per optimizer step ("kind": "train") and per validation ("val")
    RUN/curves.png                       loss parts, learning rate, validation loss/accuracy
    RUN/checkpoints/step_N/              adapters.safetensors, adapter_config.json, optimizer.safetensors, state.json
    RUN/last -> checkpoints/step_N       the newest checkpoint (symlink; a copy where symlinks are unavailable)
    RUN/best/                            adapters of the best validation so far (+ best.json), mlx-lm loadable
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..utils import KDError, write_json_atomic
from .batches import BatchStream, Example, eval_batches
from .model import load_adapter_weights, save_adapters
from .objective import PART_NAMES, head_split, objective

LOG_EVERY_FIELDS = ("loss",) + PART_NAMES


def make_schedule(cfg: dict) -> Callable:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
    `learning_rate * min_lr_ratio` at `steps`."""
    lr, steps, warm = float(cfg["learning_rate"]), int(cfg["steps"]), int(cfg["warmup_steps"])
    decay = optim.cosine_decay(lr, max(steps - warm, 1), lr * float(cfg["min_lr_ratio"]))
    if warm <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(cfg: dict) -> optim.Optimizer:
    return optim.AdamW(learning_rate=make_schedule(cfg), betas=[float(cfg["adam_beta1"]), float(cfg["adam_beta2"])],
                       eps=float(cfg["adam_eps"]), weight_decay=float(cfg["weight_decay"]))


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


# ------------------------------------------------------------------------------------------------ checkpoints


def _assign_in_place(tree, flat: dict, prefix: str = "") -> None:
    """Replace the leaves of a nested dict/list `tree` with `flat[path]`, keeping the containers (the compiled step
    captured them)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in list(items):
        path = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            _assign_in_place(v, flat, path + ".")
        elif isinstance(v, mx.array):
            if path not in flat:
                raise KDError(f"checkpoint optimizer state lacks {path}")
            tree[k] = flat[path]


def _rng_state() -> list[int]:
    return [int(x) for x in mx.random.state[0].tolist()]


def _set_rng_state(s: list[int]) -> None:
    # mx.random.seed(n) sets the key to [n >> 32, n & 0xffffffff]: any state can be restored this way
    mx.random.seed((int(s[0]) << 32) | int(s[1]))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place (old one removed only after the new one is complete)."""
    if final.is_symlink() or final.is_file():
        final.unlink()
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _point_last(run: Path, target: Path) -> None:
    link = run / "last"
    tmp = run / ".last.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink() if not tmp.is_dir() or tmp.is_symlink() else shutil.rmtree(tmp)
    try:
        os.symlink(os.path.relpath(target, run), tmp)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some filesystems): a copy
        shutil.copytree(target, tmp)
        _replace_dir(tmp, link)


def save_checkpoint(run: Path, model: nn.Module, acfg: dict, optimizer: optim.Optimizer, state: dict,
                    keep: int) -> Path:
    ckdir = run / "checkpoints"
    final = ckdir / f"step_{state['step']}"
    tmp = ckdir / f".step_{state['step']}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapters(model, acfg, tmp)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    write_json_atomic(tmp / "state.json", state)
    _replace_dir(tmp, final)
    _point_last(run, final)
    if keep > 0:  # prune the oldest checkpoints
        done = sorted((p for p in ckdir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for p in done[:-keep]:
            shutil.rmtree(p)
    return final


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict:
    """Restore adapters and optimizer state (in place); returns state.json. RNG restored by the caller."""
    if not (ckpt / "state.json").is_file():
        raise KDError(f"{ckpt} is not a complete checkpoint (no state.json)")
    load_adapter_weights(model, ckpt)
    optimizer.init(model.trainable_parameters())
    flat = mx.load(str(ckpt / "optimizer.safetensors"))
    _assign_in_place(optimizer.state, flat)
    return json.loads((ckpt / "state.json").read_text())


def latest_checkpoint(run: Path) -> Path | None:
    last = run / "last"
    if last.exists():
        return last.resolve()
    done = sorted((p for p in (run / "checkpoints").glob("step_*") if (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("_")[1]))
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Append-only JSONL; on resume, lines after the checkpoint's step are dropped so the file equals the
    uninterrupted run's."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """PNG of the training loss parts, learning rate and validation curves (matplotlib Agg, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    tr = [r for r in rows if r["kind"] == "train"]
    va = [r for r in rows if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in LOG_EVERY_FIELDS:
        xs = [r["step"] for r in tr if r.get(name) is not None]
        axes[0].plot(xs, [r[name] for r in tr if r.get(name) is not None], label=name)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in tr], [r["lr"] for r in tr])
    axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    if va:
        axes[2].plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="val loss")
        ax2 = axes[2].twinx()
        ax2.plot([r["step"] for r in va], [r["val_acc"] for r in va], "s--", color="C1", label="val acc")
        ax2.set_ylabel("A–D accuracy")
    axes[2].set_title("validation")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out_png)


# ------------------------------------------------------------------------------------------------ evaluation


def validate(model: nn.Module, split, examples: list[Example], letter_ids: mx.array, cfg: dict,
             group=None) -> dict:
    """Mean objective parts and A–D accuracy (argmax over the four letter logits at the answer position, the
    official CMMLU scoring of kd_mlx.eval) over the validation examples, dropout off. With a data-parallel
    `group`, rank r scores batches r, r+size, ... and the sums are all-reduced (same result on every rank)."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    sums = mx.zeros(len(PART_NAMES) + 1)  # part sums (KD over positions), n_correct
    counts = np.zeros(2)  # rows, KD positions
    for i, batch in enumerate(eval_batches(examples, int(cfg["eval_batch_size"] or cfg["batch_size"]),
                                           int(cfg["pad_to"]))):
        counts += batch.counts()
        if i % size != rank:
            continue
        batch.norm = (1.0, 1.0)  # sums: normalised once over the whole set below
        _, parts = objective(model, split, batch.arrays(), letter_ids, cfg)
        sums = sums + parts
        mx.eval(sums)
    if size > 1:
        sums = mx.distributed.all_sum(sums, group=group, stream=mx.cpu)
    s = np.array(sums.tolist(), np.float64)
    if was_training:
        model.train()
    n, n_kd = counts[0], max(counts[1], 1.0)
    parts = {"answer_kl": s[0] / n, "token_kd": s[1] / n_kd, "ce": s[2] / n}
    loss = sum(float(cfg[w]) * parts[k] for k, w in (("answer_kl", "answer_weight"), ("token_kd", "kd_weight"),
                                                      ("ce", "ce_weight")))
    out = {"val_loss": float(loss), "val_acc": float(s[3] / n), "val_n": int(n)}
    out.update({f"val_{k}": float(v) for k, v in parts.items()})
    return out


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return bool(new > best) if metric == "val_acc" else bool(new < best)


# ------------------------------------------------------------------------------------------------ the loop


def train_loop(model: nn.Module, acfg: dict, train_examples: list[Example], val_examples: list[Example],
               letter_ids: list[int], cfg: dict, run: Path, resume: bool = False,
               on_step: Callable[[int, dict], None] | None = None, progress: bool = True, group=None) -> dict:
    """Train `model` (already set up by `setup_trainable`) on the examples; returns a summary dict.

    Data parallel when `group` (an `mx.distributed` group) has more than one rank: every rank draws the same global
    batch of `batch_size` rows, computes its contiguous slice, the gradients are averaged across ranks inside the
    compiled step (mlx's `average_gradients`, as mlx-lm's trainer does) and every rank applies the same update.
    Only rank 0 writes metrics, checkpoints and adapters; a resume reads RUN/last on every rank.

    `on_step(step, row)` is called after each optimizer step's metrics are logged (tests use it to interrupt a
    run). `cfg["debug_nan_at_step"]` (test hook) makes that step's loss normaliser NaN, to exercise the
    non-finite-loss stop."""
    from tqdm import tqdm

    run = Path(run)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    if size == 1:
        group = None
    main = rank == 0
    if main:
        run.mkdir(parents=True, exist_ok=True)
    letter_ids_mx = mx.array(letter_ids, dtype=mx.int32)
    accum = int(cfg["grad_accumulation"])
    if accum < 1:
        raise KDError("grad_accumulation must be >= 1")
    if int(cfg["batch_size"]) % size:
        raise KDError(f"batch_size={cfg['batch_size']} must be divisible by the number of ranks ({size})")
    steps = int(cfg["steps"])
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())

    state = {"step": 0, "epoch": 0, "index": 0, "rng": None, "best_metric": None, "best_step": None,
             "bad_evals": 0, "stopped": None}
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise KDError(f"nothing to resume in {run}: no checkpoint")
        state = load_checkpoint(ckpt, model, optimizer)
        _set_rng_state(state["rng"])
    metrics = Metrics(run / "metrics.jsonl", state["step"] if resume else None) if main else None
    stream = BatchStream(train_examples, int(cfg["batch_size"]), int(cfg["seed"]), int(cfg["pad_to"]),
                         state["epoch"], state["index"])

    split = head_split(model) if cfg.get("fast_head", True) else None
    if cfg.get("grad_checkpoint"):
        from mlx_lm.tuner.trainer import grad_checkpoint  # patches the block class (mlx-lm's own mechanism)

        grad_checkpoint(model.layers[0])
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: objective(m, split, b, letter_ids_mx, cfg))
    max_norm = cfg.get("max_grad_norm")
    # each rank's loss is its share of the global mean (see objective._parts): the global gradient is the *sum*
    # over ranks = size x average_gradients; folded into the accumulation divisor
    grad_scale = size / accum

    def step_fn(batch, prev_grad, do_update):
        (loss, parts), grad = loss_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            if group is not None:
                grad = nn.average_gradients(grad, group)
            if grad_scale != 1:
                grad = tree_map(lambda g: g * grad_scale, grad)
            if max_norm:
                grad, _ = optim.clip_grad_norm(grad, float(max_norm))
            optimizer.update(model, grad)
            grad = None
        return loss, parts, grad

    captured = [model.state, optimizer.state, mx.random.state]
    step_call = partial(mx.compile, inputs=captured, outputs=captured)(step_fn) if cfg.get("compile", True) else step_fn

    model.train()
    last_good = latest_checkpoint(run) if resume else None
    eval_every, save_every = int(cfg["eval_every"]), int(cfg["save_every"])
    patience = int(cfg["patience"]) if cfg.get("patience") else 0
    bar = tqdm(total=steps, initial=state["step"], desc="train", disable=not (progress and main), dynamic_ncols=True)
    summary: dict = {}
    try:
        while state["step"] < steps:
            step = state["step"] + 1
            tic = time.perf_counter()
            grad = None
            sums = mx.zeros(len(PART_NAMES) + 2)
            ntok = nseq = 0
            for micro in range(accum):
                batch = next(stream)  # the global batch: identical on every rank
                ntok += batch.n_tokens
                nseq += len(batch.qids)
                if size > 1:
                    batch = batch.shard(rank, size)
                if cfg.get("debug_nan_at_step") == step:  # test hook: a NaN loss normaliser (NaN loss + gradient)
                    batch.norm = (float("nan"), float("nan"))
                loss, parts, grad = step_call(batch.arrays(), grad, micro == accum - 1)
                mx.eval(captured, loss, parts, grad)
                sums = sums + mx.concatenate([loss[None], parts])
            if group is not None:  # every rank logs (and decides on) the global values
                sums = mx.distributed.all_sum(sums, group=group, stream=mx.cpu)
            s = np.array(sums.tolist(), np.float64)
            dt = time.perf_counter() - tic
            lr = float(optimizer.learning_rate.item())
            row = {"kind": "train", "step": step, "loss": float(s[0] / accum)}
            row.update({k: float(s[1 + i] / accum) for i, k in enumerate(PART_NAMES)})
            row.update({"train_acc": float(s[4] / nseq), "lr": lr, "tokens": ntok, "tokens_per_s": ntok / dt,
                        "peak_memory_gb": mx.get_peak_memory() / 1e9, "peak_rss_gb": peak_rss_bytes() / 1e9})
            if size > 1:
                row["ranks"] = size
            state["step"] = step
            if not math.isfinite(row["loss"]):
                if main:
                    metrics.log(row)
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint had been saved yet"
                state["stopped"] = "non-finite loss"
                raise KDError(f"non-finite loss ({row['loss']}) at step {step}; training stopped, {where}")
            if main:
                metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

            stop = False
            if val_examples and (step % eval_every == 0 or step == steps):
                v = validate(model, split, val_examples, letter_ids_mx, cfg, group)
                improved = _better(cfg["best_metric"], v[cfg["best_metric"]], state["best_metric"])
                if main:
                    metrics.log({"kind": "val", "step": step, **v, "improved": improved})
                if improved:
                    state["best_metric"], state["best_step"], state["bad_evals"] = v[cfg["best_metric"]], step, 0
                    if main:
                        tmp = run / ".best.tmp"
                        if tmp.exists():
                            shutil.rmtree(tmp)
                        save_adapters(model, acfg, tmp)
                        write_json_atomic(tmp / "best.json", {"step": step, **v})
                        _replace_dir(tmp, run / "best")
                else:
                    state["bad_evals"] += 1
                    if patience and state["bad_evals"] >= patience:
                        stop = True
                        state["stopped"] = f"early stop: no improvement of {cfg['best_metric']} in {patience} evaluations"
            state.update(stream.position())
            state["rng"] = _rng_state()
            if step % save_every == 0 or step == steps or stop:
                if main:
                    last_good = save_checkpoint(run, model, acfg, optimizer, dict(state), int(cfg["keep_checkpoints"]))
                else:
                    last_good = run / "checkpoints" / f"step_{step}"
            if on_step is not None:
                on_step(step, row)
            if stop:
                break
        summary = {"step": state["step"], "best_step": state["best_step"], "best_metric": state["best_metric"],
                   "stopped": state["stopped"] or "completed", "last_checkpoint": str(last_good) if last_good else None}
    finally:
        bar.close()
        if main and (run / "metrics.jsonl").stat().st_size:
            try:
                plot_curves(run / "metrics.jsonl", run / "curves.png")
            except Exception as e:  # a plotting failure must not hide the training result
                print(f"warning: could not draw curves: {e}", file=sys.stderr)
    if not main:
        return summary
    if not (run / "best").exists():  # no validation set: the final adapters stand in as "best"
        tmp = run / ".best.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapters(model, acfg, tmp)
        _replace_dir(tmp, run / "best")
    write_json_atomic(run / "summary.json", summary)
    return summary
