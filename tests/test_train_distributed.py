"""Data-parallel kd_mlx.train over `mlx.launch -n 2 --backend ring` on localhost: a global batch split over two
ranks gives the same losses and adapters as one process with that batch; ranks started with different settings
stop with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from test_train import world  # noqa: E402,F401  (the same tiny Kimi-K2 -> Phi world)

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch() -> str:
    return shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


def _config(world, path: Path, **over) -> Path:
    cfg = {"student": str(world["student"]), "store": str(world["store"]), "data": str(world["data"]),
           "splits": str(world["splits"]), "steps": 4, "batch_size": 4, "grad_accumulation": 2, "eval_every": 2,
           "save_every": 2, "learning_rate": 5e-3, "warmup_steps": 1, "lora_rank": 4, "lora_scale": 10.0,
           "pad_to": 16, "kd_max_positions": 16, "patience": 0, "max_grad_norm": 1.0, "max_val_questions": 6}
    cfg.update(over)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()), encoding="utf-8")
    return path


def _rows(run: Path, kind: str) -> list[dict]:
    return [r for r in (json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln)
            if r["kind"] == kind]


@pytest.mark.slow
def test_two_ranks_equal_one_process(world, tmp_path):  # noqa: F811
    cfg = _config(world, tmp_path / "dp.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    base = [sys.executable, "-m", "kd_mlx.train", "--config", str(cfg), "--no-progress"]
    r1 = subprocess.run(base + ["--out", str(one)], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([_launch(), "-n", "2", "--backend", "ring", "--", *base, "--out", str(two)], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and (two / "summary.json").exists(), (r2.stdout + r2.stderr)[-3000:]
    assert json.loads((two / "config.json").read_text())["ranks"] == 2
    a, b = _rows(one, "train"), _rows(two, "train")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    assert all(x["ranks"] == 2 for x in b) and all("ranks" not in x for x in a)
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]  # the same global batches
        for k in ("loss", "answer_kl", "token_kd", "ce", "train_acc", "lr"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)
    for x, y in zip(_rows(one, "val"), _rows(two, "val")):  # validation split over ranks, sums all-reduced
        for k in ("val_loss", "val_acc", "val_token_kd"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), k
    wa = mx.load(str(one / "last" / "adapters.safetensors"))
    wb = mx.load(str(two / "last" / "adapters.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:  # Adam's m/sqrt(v) amplifies float-order noise in near-zero gradients: compare to the scale
        x, y = np.array(wa[k]), np.array(wb[k])
        assert np.abs(x - y).max() <= 1e-3 * np.abs(x).max(), k  # measured <= 1.7e-4 of the scale
    assert not any(np.allclose(np.array(wa[k]), 0) for k in wa if "lora_b" in k)  # it did train


@pytest.mark.slow
def test_ranks_that_disagree_stop_with_one_line(world, tmp_path):  # noqa: F811
    cfg = _config(world, tmp_path / "dp.yaml", steps=2)
    bad = tmp_path / "bad"
    # rank 1 asks for another learning rate
    shell = (f"{sys.executable} -m kd_mlx.train --config {cfg} --no-progress --out {bad} "
             f'--learning-rate "0.00$((1 + MLX_RANK))"')
    r = subprocess.run([_launch(), "-n", "2", "--backend", "ring", "--", "sh", "-c", shell], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "ranks disagree on config" in out, out[-3000:]
    assert "Traceback" not in out
    assert not (bad / "metrics.jsonl").exists() and not (bad / "checkpoints").exists()
    # a batch that does not split over the ranks
    cfg3 = _config(world, tmp_path / "odd.yaml", steps=2, batch_size=3)
    r = subprocess.run([_launch(), "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "kd_mlx.train",
                        "--config", str(cfg3), "--no-progress", "--out", str(tmp_path / "odd")], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert "must be divisible by the number of ranks" in r.stdout + r.stderr
