"""Training throughput and peak memory: kd_mlx.train's step vs mlx_lm.lora (plain SFT), same student, same LoRA
settings, same token sequences, each in its own process (clean peak memory), in one run.

    python benchmarks/bench_train.py [--layers 2] [--steps 6] [--batch-size 4] [--shots 1] [--n 48]

Student: Phi-1.5's real widths (hidden 2048, 32 heads, intermediate 8192, vocab 51,200) with `--layers` blocks
(kd_mlx.testing.models.tiny_phi_dir), fp32. Sequences: real CMMLU prompts (../shared/cmmlu, `--shots`-shot, Phi's
GPT-2 BPE) + the gold letter. LoRA rank 8, scale 20, all 6 Phi targets, all blocks, AdamW, lr 1e-5, batch 4.
kd_mlx.train runs its full objective (answer KL + token KD at 64 positions with 8 targets each + CE; the
teacher targets are synthetic here: the benchmark measures cost, not learning); mlx_lm.lora its default loss
(CE at every position) through `mlx_lm.tuner.trainer.train`. Tokens/s counts prompt tokens over the timed steps
(the first step, which compiles, excluded on both sides).

Measured (2026-11-29, Linux, 2 CPU cores shared with other jobs (load ~6), OpenBLAS preloaded, defaults: 2 layers,
1-shot prompts of mean 364 tokens, batch 4, 6 timed steps):
    kd_mlx.train      107.1 tok/s   peak mx 3.43 GB   peak RSS 3.17 GB
    mlx_lm.lora        76.2 tok/s   peak mx 6.08 GB   peak RSS 5.30 GB
    ratio kd/lora: throughput 1.41x (goal >= 0.9), peak mx 0.56x, peak RSS 0.60x (goal <= 1.1)
The gain is the LM head applied only where the loss reads (answer + 64 KD positions) instead of at every position:
at vocab 51,200 the head is most of a short Phi's compute and its (B, L, V) logits most of the memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

CMMLU = Path(__file__).resolve().parents[2] / "shared" / "cmmlu"
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}


def sequences(tok, n: int, shots: int, seed: int = 0) -> list[tuple[list[int], int, int]]:
    """(prompt ids, gold 0-3, letter id) of the first n test questions over subjects (round robin)."""
    from kd_mlx.data import fit_prompt, load_cmmlu
    from kd_mlx.data import answer_token_ids

    cm = load_cmmlu(CMMLU)
    letters = answer_token_ids(tok)
    out, i = [], 0
    while len(out) < n:
        for s in cm.subjects:
            if i < len(cm.test[s]) and len(out) < n:
                q = cm.test[s][i]
                ids = tok.encode(fit_prompt(q, cm.dev[s], shots, None, None).text)
                g = "ABCD".index(q.answer)
                out.append((ids, g, letters[g]))
        i += 1
    return out


def run_kd(student: Path, seqs, steps: int, batch: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from kd_mlx.data import answer_token_ids
    from kd_mlx.tokenizer import load_tokenizer
    from kd_mlx.train.batches import BatchStream, Example
    from kd_mlx.train.config import TrainConfig
    from kd_mlx.train.loop import train_loop
    from kd_mlx.train.model import load_student, setup_trainable
    from kd_mlx.train.run import distillation_loss

    rng = np.random.default_rng(0)
    exs = []
    for n, (ids, g, _) in enumerate(seqs):
        t = np.array(ids, np.int32)
        P = min(64, len(t) - 1)
        pos = np.arange(len(t) - 1 - P, len(t) - 1, dtype=np.int32)
        kd_ids = np.concatenate([t[pos + 1][:, None], rng.integers(0, 50000, (P, 7))], 1).astype(np.int32)
        probs = np.full((P, 8), 0.1 / 7, np.float32)
        probs[:, 0] = 0.8
        exs.append(Example(f"q{n}", t, g, np.eye(4, dtype=np.float32)[g] * 0.9 + 0.025, pos, kd_ids,
                           probs * 0.95, np.full(P, 0.05, np.float32)))
    cfg = TrainConfig(student=str(student), steps=steps + 1, batch_size=batch, learning_rate=1e-5, warmup_steps=0,
                      lora_rank=LORA["rank"], lora_scale=LORA["scale"], eval_every=10**6, save_every=10**6,
                      max_grad_norm=None, keep_checkpoints=1)
    mx.random.seed(0)
    model, _, _ = load_student(str(student), "float32")
    acfg = setup_trainable(model, cfg)
    letters = answer_token_ids(load_tokenizer(student))
    mx.reset_peak_memory()
    with tempfile.TemporaryDirectory() as d:
        train_loop(model, acfg, cfg, Path(d), distillation_loss(model, cfg, letters),
                   BatchStream(exs, cfg.batch_size, cfg.seed, cfg.pad_to), progress=False)
        rows = [json.loads(ln) for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:]  # step 1 compiles
    toks = sum(r["tokens"] for r in timed)
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": toks / secs, "peak_mx_gb": mx.get_peak_memory() / 1e9, "steps": len(timed)}


def run_lora(student: Path, seqs, steps: int, batch: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from kd_mlx.train.model import DEFAULT_LORA_KEYS, load_student

    mx.random.seed(0)
    model, _, _ = load_student(str(student), "float32")
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {**LORA, "keys": DEFAULT_LORA_KEYS["phi"]})
    data = [(ids + [letter], 0) for ids, _, letter in seqs]  # prompt + gold letter, loss on every token

    reports: list[dict] = []

    class Clock(TrainingCallback):  # one report per step: its tokens and its own step time (mlx-lm's clock)
        def on_train_loss_report(self, info):
            reports.append(info)

    with tempfile.TemporaryDirectory() as d:
        args = TrainingArgs(batch_size=batch, iters=steps + 1, steps_per_report=1, steps_per_eval=10**6,
                            steps_per_save=10**6, max_seq_length=4096, adapter_file=str(Path(d) / "a.safetensors"))
        mx.reset_peak_memory()
        train(model, optim.AdamW(learning_rate=1e-5), data, None, args=args, training_callback=Clock())
    toks = [b["trained_tokens"] - a["trained_tokens"] for a, b in zip(reports, reports[1:])]
    secs = [n / r["tokens_per_second"] for n, r in zip(toks, reports[1:])]  # step 1 (compiles) excluded
    return {"tokens_per_s": sum(toks) / sum(secs), "peak_mx_gb": mx.get_peak_memory() / 1e9, "steps": len(toks)}


def _peak_rss_gb() -> float:
    from kd_mlx.utils import peak_rss_bytes

    return peak_rss_bytes() / 1e9


@click.command()
@click.option("--layers", default=2, show_default=True)
@click.option("--steps", default=6, show_default=True, help="Timed steps (one more compiles).")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--shots", default=1, show_default=True)
@click.option("--n", default=48, show_default=True, help="Questions.")
@click.option("--which", type=click.Choice(["kd", "lora"]), default=None, hidden=True)
@click.option("--student", default=None, hidden=True)
def main(layers, steps, batch_size, shots, n, which, student):
    if which:  # child process: one side, prints one JSON line
        from kd_mlx.tokenizer import load_tokenizer

        seqs = sequences(load_tokenizer(student), n, shots)
        res = (run_kd if which == "kd" else run_lora)(Path(student), seqs, steps, batch_size)
        res["peak_rss_gb"] = _peak_rss_gb()
        res["mean_tokens"] = sum(len(s[0]) for s in seqs) / len(seqs)
        print("RESULT " + json.dumps(res))
        return
    if not (CMMLU / "test").is_dir():
        raise SystemExit(f"needs the real CMMLU at {CMMLU}")
    from kd_mlx.testing.models import tiny_phi_dir

    with tempfile.TemporaryDirectory() as d:
        st = tiny_phi_dir(Path(d) / "phi", n_layers=layers, hidden=2048, heads=32, intermediate=8192)
        out = {}
        for side in ("kd", "lora"):
            cmd = [sys.executable, __file__, "--which", side, "--student", str(st), "--steps", str(steps),
                   "--batch-size", str(batch_size), "--shots", str(shots), "--n", str(n)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not line:
                raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
            out[side] = json.loads(line[0][7:])
    kd, lo = out["kd"], out["lora"]
    print(f"student: Phi-1.5 widths, {layers} layers, fp32; LoRA r{LORA['rank']} all 6 targets; batch {batch_size}; "
          f"{shots}-shot CMMLU prompts, mean {kd['mean_tokens']:.0f} tokens; {steps} timed steps")
    for name, r in (("kd_mlx.train", kd), ("mlx_lm.lora", lo)):
        print(f"{name:13s} {r['tokens_per_s']:9.1f} tok/s   peak mx {r['peak_mx_gb']:.2f} GB   "
              f"peak RSS {r['peak_rss_gb']:.2f} GB")
    print(f"ratio kd/lora: throughput {kd['tokens_per_s'] / lo['tokens_per_s']:.2f}x (goal >= 0.9), peak mx "
          f"{kd['peak_mx_gb'] / lo['peak_mx_gb']:.2f}x, peak RSS {kd['peak_rss_gb'] / lo['peak_rss_gb']:.2f}x "
          f"(goal <= 1.1)")


if __name__ == "__main__":
    main()
