"""The training loop: compiled step, gradient accumulation, AdamW with warm-up + cosine, validation with early
stopping, checkpoints that resume exactly, non-finite-loss stop, metrics JSONL + PNG.

The loop knows nothing of distillation: it takes the loss (`loss(model, batch) -> (total, parts)`, parts =
[answer_kl, token_kd, ce, n_correct]) and the batches as arguments, as mlx-lm's `train(loss=..., iterate_batches=...)`
does, and reports every train/validation row through `TrainingCallback`s (metrics.jsonl and the progress bar are
two of them). `Trainer` holds the pieces: `step`, `validate`, `checkpoint`, `save_best`, `finish`.

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
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import grad_checkpoint
from tqdm import tqdm

from ..utils import KDError, peak_rss_bytes, write_json_atomic
from .batches import Batch, BatchArrays
from .config import TrainConfig
from .model import FINGERPRINT_KEY, check_adapter_base, load_adapter_weights, save_adapters
from .objective import PART_NAMES

LOG_EVERY_FIELDS = ("loss",) + PART_NAMES
# loss(model, batch) -> (total, [answer_kl, token_kd, ce, n_correct]): parts are sums over the batch divided by the
# counts in `batch.norm` (rows, KD positions, rows with a gold answer)
LossFn = Callable[[nn.Module, BatchArrays], tuple[mx.array, mx.array]]


class TrainBatches(Protocol):
    """Endless training batches with a resumable position (`BatchStream` is one)."""

    def __next__(self) -> Batch: ...

    def position(self) -> dict: ...

    def seek(self, epoch: int, index: int) -> None: ...


class TrainingCallback:
    """Receives every logged row (mlx-lm's TrainingCallback, with our rows)."""

    def on_train_report(self, row: dict) -> None:
        """After each optimizer step: {"kind": "train", "step", "loss", parts, "train_acc", "lr", "tokens", ...}."""

    def on_val_report(self, row: dict) -> None:
        """After each validation: {"kind": "val", "step", "val_loss", "val_acc", "val_<part>", "improved", ...}."""


def make_schedule(cfg: TrainConfig) -> Callable:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
    `learning_rate * min_lr_ratio` at `steps`."""
    lr, steps, warm = cfg.learning_rate, cfg.steps, cfg.warmup_steps
    decay = optim.cosine_decay(lr, max(steps - warm, 1), lr * cfg.min_lr_ratio)
    if warm <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    return optim.AdamW(learning_rate=make_schedule(cfg), betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps,
                       weight_decay=cfg.weight_decay)




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


def _fresh_dir(path: Path) -> Path:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


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


def write_adapters_dir(model: nn.Module, acfg: dict, final: Path, json_files: dict[str, dict] | None = None,
                       optimizer: optim.Optimizer | None = None) -> Path:
    """Adapters (+ `json_files`, + the optimizer state) written to a temp directory, then moved onto `final`."""
    tmp = _fresh_dir(final.with_name(f".{final.name}.tmp"))
    save_adapters(model, acfg, tmp)
    if optimizer is not None:
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    for name, obj in (json_files or {}).items():
        write_json_atomic(tmp / name, obj)
    _replace_dir(tmp, final)
    return final


def save_checkpoint(run: Path, model: nn.Module, acfg: dict, optimizer: optim.Optimizer, state: dict,
                    keep: int) -> Path:
    ckdir = run / "checkpoints"
    final = write_adapters_dir(model, acfg, ckdir / f"step_{state['step']}", {"state.json": state}, optimizer)
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


# ------------------------------------------------------------------------------------------------ reporting


def json_row(row: dict) -> dict:
    """`row` with non-finite floats as null: metrics.jsonl stays JSON (a bare NaN is not)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class MetricsLog(TrainingCallback):
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
            f.write(json.dumps(json_row(row), allow_nan=False) + "\n")

    on_train_report = on_val_report = log


class ProgressBar(TrainingCallback):
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="train", disable=not enabled, dynamic_ncols=True)

    def on_train_report(self, row: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()


def plot_curves(metrics_path: Path, out_png: Path) -> None:
    """PNG of the training loss parts, learning rate and validation curves (matplotlib Agg, no display)."""
    # imported here: selecting the Agg backend at import time would change the backend of any program that
    # imports kd_mlx.train
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


def validate(model: nn.Module, loss: LossFn, batches: Iterable[Batch], cfg: TrainConfig, group=None) -> dict:
    """Mean loss parts and A–D accuracy (argmax over the four letter logits at the answer position, the official
    CMMLU scoring of kd_mlx.eval) over the validation batches, dropout off. With a data-parallel `group`,
    rank r scores batches r, r+size, ... and the sums are all-reduced (same result on every rank)."""
    was_training = model.training
    model.eval()
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    sums = mx.zeros(len(PART_NAMES) + 1)  # part sums (KD over positions), n_correct
    counts = np.zeros(3)  # rows, KD positions, rows with a gold answer
    for i, batch in enumerate(batches):
        counts += batch.counts()
        if i % size != rank:
            continue
        batch.norm = (1.0, 1.0, 1.0)  # sums: normalised once over the whole set below
        _, parts = loss(model, batch.arrays())
        sums = sums + parts
        mx.eval(sums)
    if size > 1:
        sums = mx.distributed.all_sum(sums, group=group, stream=mx.cpu)
    s = np.array(sums.tolist(), np.float64)
    if was_training:
        model.train()
    n, n_kd, n_gold = counts[0], max(counts[1], 1.0), max(counts[2], 1.0)
    parts = {"answer_kl": s[0] / n, "token_kd": s[1] / n_kd, "ce": s[2] / n_gold}
    total = cfg.answer_weight * parts["answer_kl"] + cfg.kd_weight * parts["token_kd"] + cfg.ce_weight * parts["ce"]
    out = {"val_loss": float(total), "val_acc": float(s[3] / n_gold), "val_n": int(n)}
    out.update({f"val_{k}": float(v) for k, v in parts.items()})
    return out


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return bool(new > best) if metric == "val_acc" else bool(new < best)


# ------------------------------------------------------------------------------------------------ the loop


class Trainer:
    """One training run's optimizer, compiled step and state (`state.json` of every checkpoint).

    Data parallel when `group` (an `mx.distributed` group) has more than one rank: every rank draws the same global
    batch, computes its contiguous slice, the gradients are averaged across ranks inside the compiled step (mlx's
    `average_gradients`, as mlx-lm's trainer does) and every rank applies the same update. Only rank 0 writes."""

    def __init__(self, model: nn.Module, adapter_config: dict, cfg: TrainConfig, run: Path, loss: LossFn,
                 group=None):
        self.model, self.acfg, self.cfg, self.run, self.loss = model, adapter_config, cfg, Path(run), loss
        self.rank, self.size = (group.rank(), group.size()) if group is not None else (0, 1)
        self.group = group if self.size > 1 else None
        self.main = self.rank == 0
        if cfg.batch_size % self.size:
            raise KDError(f"batch_size={cfg.batch_size} must be divisible by the number of ranks ({self.size})")
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(model.trainable_parameters())
        self.state = {"step": 0, "epoch": 0, "index": 0, "rng": None, "best_metric": None, "best_step": None,
                      "bad_evals": 0, "stopped": None}
        self.last_good: Path | None = None
        if cfg.grad_checkpoint:
            grad_checkpoint(model.layers[0])  # patches the block class (mlx-lm's own mechanism)
        self._captured: list | None = None
        self._step_call: Callable | None = None

    def _build_step(self) -> None:
        """The (compiled) step, built at the first step: after a resume has restored the state it captures."""
        self._captured = [self.model.state, self.optimizer.state, mx.random.state]
        step_fn = self._step_fn()
        self._step_call = (partial(mx.compile, inputs=self._captured, outputs=self._captured)(step_fn)
                           if self.cfg.compile else step_fn)

    def _step_fn(self) -> Callable:
        model, optimizer, group, max_norm = self.model, self.optimizer, self.group, self.cfg.max_grad_norm
        loss_and_grad = nn.value_and_grad(model, lambda m, *b: self.loss(m, BatchArrays(*b)))
        # each rank's loss is its share of the global mean (see objective._parts): the global gradient is the *sum*
        # over ranks = size x average_gradients; folded into the accumulation divisor
        grad_scale = self.size / self.cfg.grad_accumulation

        def step_fn(batch: tuple, prev_grad, do_update: bool):
            (loss, parts), grad = loss_and_grad(model, *batch)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            if do_update:
                if group is not None:
                    grad = nn.average_gradients(grad, group)
                if grad_scale != 1:
                    grad = tree_map(lambda g: g * grad_scale, grad)
                if max_norm:
                    grad, _ = optim.clip_grad_norm(grad, max_norm)
                optimizer.update(model, grad)
                grad = None
            return loss, parts, grad

        return step_fn

    def resume(self) -> None:
        """Restore adapters, optimizer, state and RNG from RUN/last."""
        ckpt = latest_checkpoint(self.run)
        if ckpt is None:
            raise KDError(f"nothing to resume in {self.run}: no checkpoint")
        if self.acfg.get(FINGERPRINT_KEY):
            check_adapter_base(ckpt, self.acfg.get("model"), self.acfg[FINGERPRINT_KEY])
        self.state = load_checkpoint(ckpt, self.model, self.optimizer)
        self.state["stopped"] = None  # a resumed run goes on to `steps`, even after an early stop
        _set_rng_state(self.state["rng"])
        self.last_good = ckpt

    def step(self, batches: Iterator[Batch]) -> dict:
        """One optimizer step over `grad_accumulation` micro-batches; returns its metrics row (global values)."""
        if self._step_call is None:
            self._build_step()
        step = self.state["step"] + 1
        accum = self.cfg.grad_accumulation
        tic = time.perf_counter()
        grad = None
        sums = mx.zeros(len(PART_NAMES) + 2)
        ntok = n_gold = 0
        for micro in range(accum):
            batch = next(batches)  # the global batch: identical on every rank
            ntok += batch.n_tokens
            n_gold += int(batch.counts()[2])
            if self.size > 1:
                batch = batch.shard(self.rank, self.size)
            loss, parts, grad = self._step_call(tuple(batch.arrays()), grad, micro == accum - 1)
            mx.eval(self._captured, loss, parts, grad)
            sums = sums + mx.concatenate([loss[None], parts])
        if self.group is not None:  # every rank logs (and decides on) the global values
            sums = mx.distributed.all_sum(sums, group=self.group, stream=mx.cpu)
        s = np.array(sums.tolist(), np.float64)
        dt = time.perf_counter() - tic
        row = {"kind": "train", "step": step, "loss": float(s[0] / accum)}
        row.update({k: float(s[1 + i] / accum) for i, k in enumerate(PART_NAMES)})
        row.update({"train_acc": float(s[4] / max(n_gold, 1)), "lr": float(self.optimizer.learning_rate.item()),
                    "tokens": ntok, "tokens_per_s": ntok / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    "peak_rss_gb": peak_rss_bytes() / 1e9})
        if self.size > 1:
            row["ranks"] = self.size
        self.state["step"] = step
        return row

    def validate(self, val_batches: Callable[[], Iterable[Batch]]) -> tuple[dict, bool]:
        """Validation row and whether it improved on the best so far (state updated; early stop decided)."""
        cfg = self.cfg
        v = validate(self.model, self.loss, val_batches(), cfg, self.group)
        improved = _better(cfg.best_metric, v[cfg.best_metric], self.state["best_metric"])
        if improved:
            self.state.update(best_metric=v[cfg.best_metric], best_step=self.state["step"], bad_evals=0)
        else:
            self.state["bad_evals"] += 1
            if cfg.patience and self.state["bad_evals"] >= cfg.patience:
                self.state["stopped"] = f"early stop: no improvement of {cfg.best_metric} in {cfg.patience} evaluations"
        return {"kind": "val", "step": self.state["step"], **v, "improved": improved}, improved

    def save_best(self, val_row: dict | None) -> None:
        """RUN/best: the adapters now (+ best.json with the validation row that made them best)."""
        if self.main:
            extra = {"best.json": {k: v for k, v in val_row.items() if k not in ("kind", "improved")}} if val_row else {}
            write_adapters_dir(self.model, self.acfg, self.run / "best", extra)

    def checkpoint(self, position: dict) -> None:
        """Checkpoint the step just taken (rank 0 writes; every rank knows where it is)."""
        self.state.update(position)
        self.state["rng"] = _rng_state()
        step = self.state["step"]
        if self.main:
            self.last_good = save_checkpoint(self.run, self.model, self.acfg, self.optimizer, dict(self.state),
                                             self.cfg.keep_checkpoints)
        else:
            self.last_good = self.run / "checkpoints" / f"step_{step}"

    def stop_non_finite(self, row: dict) -> None:
        where = f"last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint had been saved yet"
        self.state["stopped"] = "non-finite loss"
        raise KDError(f"non-finite loss ({row['loss']}) at step {row['step']}; training stopped, {where}")

    def finish(self) -> dict:
        """RUN/best when no validation made one (the final adapters), RUN/summary.json; returns the summary."""
        summary = {"step": self.state["step"], "best_step": self.state["best_step"],
                   "best_metric": self.state["best_metric"], "stopped": self.state["stopped"] or "completed",
                   "last_checkpoint": str(self.last_good) if self.last_good else None}
        if self.main:
            if not (self.run / "best").exists():
                self.save_best(None)
            write_json_atomic(self.run / "summary.json", summary)
        return summary


def train_loop(model: nn.Module, adapter_config: dict, cfg: TrainConfig, run: Path, loss: LossFn,
               train_batches: TrainBatches, val_batches: Callable[[], Iterable[Batch]] | None = None,
               resume: bool = False, callback: TrainingCallback | None = None, progress: bool = True,
               group=None) -> dict:
    """Train `model` (already set up by `setup_trainable`) on `train_batches` with `loss`; returns a summary dict.

    `val_batches()` gives a fresh iterable of validation batches (None: no validation; the final adapters become
    RUN/best). `callback` receives every train/validation row after it is logged (e.g. to interrupt a run)."""
    run = Path(run)
    trainer = Trainer(model, adapter_config, cfg, run, loss, group)
    if trainer.main:
        run.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.resume()
        train_batches.seek(trainer.state["epoch"], trainer.state["index"])
    reporters: list[TrainingCallback] = []
    bar = ProgressBar(cfg.steps, trainer.state["step"], progress and trainer.main)
    metrics = MetricsLog(run / "metrics.jsonl", trainer.state["step"] if resume else None) if trainer.main else None
    if metrics is not None:
        reporters += [metrics, bar]
    if callback is not None:
        reporters.append(callback)
    model.train()
    try:
        while trainer.state["step"] < cfg.steps:
            row = trainer.step(train_batches)
            step = row["step"]
            if not math.isfinite(row["loss"]):
                if metrics is not None:
                    metrics.on_train_report(row)
                trainer.stop_non_finite(row)
            for r in reporters:
                r.on_train_report(row)
            if val_batches is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_row, improved = trainer.validate(val_batches)
                if improved:
                    trainer.save_best(val_row)
                for r in reporters:
                    r.on_val_report(val_row)
            stop = trainer.state["stopped"] is not None
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                trainer.checkpoint(train_batches.position())
            if stop:
                break
    finally:
        bar.close()
        if trainer.main and (run / "metrics.jsonl").stat().st_size:
            try:
                plot_curves(run / "metrics.jsonl", run / "curves.png")
            except Exception as e:  # a plotting failure must not hide the training result
                print(f"warning: could not draw curves: {e}", file=sys.stderr)
    return trainer.finish()
