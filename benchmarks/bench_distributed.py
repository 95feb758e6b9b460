"""Scale-out on this machine: 2 ranks (mlx.launch --backend ring, localhost) vs 1 process, for the teacher dump and
for training, in one run. Wall time of each whole command (process start, loading, examples included) and of the
part that parallelises, plus whether the 2-rank results equal the 1-process ones.

    python benchmarks/bench_distributed.py [--questions 48] [--steps 6] [--hidden 256]

Material: real CMMLU (../shared/cmmlu; the first `--questions` training and 16 validation questions of a seed-0
split), a tiny Kimi-K2-shaped teacher (kd_mlx.testing.models.tiny_kimi_k2_dir, cl100k tokenizer in Kimi's format)
dumped 1-shot with top-8 at the question tokens, and a Phi-shaped student (real Phi tokenizer, `--hidden` wide, 4
layers) trained with LoRA, batch 4 (2 per rank).

On one machine with 2 cores both ranks share the same cores and memory bandwidth: expect no speed-up (or a slow-down
from the second process's start-up and the all-reduce); the point is that the multi-rank paths run and give the
single-process results. The speed-up needs ranks on separate machines (mlx.launch --hostfile).

Measured (2026-11-29, Linux, 2 CPU cores shared with other jobs (load ~6), defaults):
    dump (48+16 real CMMLU questions, tiny Kimi-K2, 1-shot, top-8):
      1 process    38.8 s   2 ranks    48.0 s   speed-up 0.81x   store byte-identical: True
    train (6 steps, batch 4, student hidden 256 x 4 layers, LoRA):
      whole command: 1 process    46.9 s   2 ranks    53.2 s   speed-up 0.88x
      steps 2..6: 1 process  17.51 s   2 ranks  22.74 s   speed-up 0.77x   max relative loss difference 5.7e-06
As expected on one 2-core machine: no speed-up (two processes contend for the same cores); equal results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
CMMLU = REPO.parent / "shared" / "cmmlu"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd[:8])} ...\n{(r.stdout + r.stderr)[-3000:]}")
    return time.perf_counter() - t


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


@click.command()
@click.option("--questions", default=48, show_default=True, help="Training questions.")
@click.option("--steps", default=6, show_default=True)
@click.option("--hidden", default=256, show_default=True, help="Student width.")
def main(questions, steps, hidden):
    if not (CMMLU / "test").is_dir():
        raise SystemExit(f"needs the real CMMLU at {CMMLU}")
    from kd_mlx.data import load_cmmlu, make_splits
    from kd_mlx.testing.models import tiny_kimi_k2_dir, tiny_phi_dir
    from kd_mlx.utils import write_json_atomic

    launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    two = [launch, "-n", "2", "--backend", "ring", "--"]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cm = load_cmmlu(CMMLU)
        sp = make_splits(cm, seed=0, val=0.1, test=0.1)
        small = {"train": sp["train"][:questions], "val": sp["val"][:16], "test": sp["test"]}
        write_json_atomic(d / "splits.json", small)
        teacher = tiny_kimi_k2_dir(d / "teacher", seed=1)
        student = tiny_phi_dir(d / "student", seed=2, n_layers=4, hidden=hidden, heads=8)
        dump = [sys.executable, "-m", "kd_mlx.teacher", "dump", "--teacher", str(teacher), "--data", str(CMMLU),
                "--splits", str(d / "splits.json"), "--split", "train,val", "--shots", "1", "--top-k", "8",
                "--shard-size", "8", "--no-progress"]
        t_dump1 = _timed(dump + ["--out", str(d / "store1")])
        t_dump2 = _timed(two + dump + ["--out", str(d / "store2")])
        same_store = _files(d / "store1") == _files(d / "store2") and \
            (d / "store1" / "manifest.json").read_bytes() == (d / "store2" / "manifest.json").read_bytes()

        cfg = {"student": str(student), "store": str(d / "store1"), "data": str(CMMLU),
               "splits": str(d / "splits.json"), "teacher_tokenizer": str(teacher), "steps": steps,
               "batch_size": 4, "eval_every": steps, "save_every": steps, "learning_rate": 1e-3, "warmup_steps": 1,
               "max_grad_norm": 1.0, "patience": 0}
        (d / "train.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
        train = [sys.executable, "-m", "kd_mlx.train", "--config", str(d / "train.yaml"), "--no-progress"]
        t_train1 = _timed(train + ["--out", str(d / "run1")])
        t_train2 = _timed(two + train + ["--out", str(d / "run2")])

        def rows(run):
            return [json.loads(ln) for ln in (d / run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(ln)["kind"] == "train"]

        r1, r2 = rows("run1"), rows("run2")
        max_rel = max(abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-9) for a, b in zip(r1, r2))
        step_s = [sum(r["tokens"] / r["tokens_per_s"] for r in rs[1:]) for rs in (r1, r2)]  # step 1 compiles

    print(f"dump ({questions}+16 real CMMLU questions, tiny Kimi-K2, 1-shot, top-8):")
    print(f"  1 process {t_dump1:7.1f} s   2 ranks {t_dump2:7.1f} s   speed-up {t_dump1 / t_dump2:.2f}x   "
          f"store byte-identical: {same_store}")
    print(f"train ({steps} steps, batch 4, student hidden {hidden} x 4 layers, LoRA):")
    print(f"  whole command: 1 process {t_train1:7.1f} s   2 ranks {t_train2:7.1f} s   speed-up "
          f"{t_train1 / t_train2:.2f}x")
    print(f"  steps 2..{steps}: 1 process {step_s[0]:6.2f} s   2 ranks {step_s[1]:6.2f} s   speed-up "
          f"{step_s[0] / step_s[1]:.2f}x   max relative loss difference {max_rel:.1e}")


if __name__ == "__main__":
    main()
