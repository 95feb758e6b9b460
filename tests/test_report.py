"""Tests for kd_mlx.report / `python -m kd_mlx.report`: tables, targets, PNG plots, bad input.

Run: python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _summary(subjects: dict[str, float], qps: float, ece: float, bins=None) -> dict:
    """A summary.json in kd_mlx.eval's layout, with hand-chosen numbers."""
    from kd_mlx.data import subject_table

    table = subject_table()
    cats: dict[str, list[float]] = {}
    for s, a in subjects.items():
        for c in table[s]["categories"]:
            cats.setdefault(c, []).append(a)
    return {
        "overall": sum(subjects.values()) / len(subjects),
        "categories": {c: sum(v) / len(v) for c, v in cats.items()},
        "subjects": subjects, "n": {s: 10 for s in subjects}, "n_questions": 10 * len(subjects), "shots": 5,
        "calibration": {"ece": ece, "brier": 0.7, "n_bins": 10,
                        "bins": bins or [{"lo": b / 10, "hi": (b + 1) / 10, "count": 5 if b in (3, 6) else 0,
                                          "accuracy": 0.3 if b == 3 else 0.7, "confidence": b / 10 + 0.05}
                                         for b in range(10)]},
        "throughput": {"questions_per_s": qps, "prompt_tokens_per_s": qps * 800},
        "memory": {"mlx_peak_bytes": 2**30, "peak_rss_bytes": 3 * 2**30},
        "model": {"path": "m", "kind": "mlx"},
    }


def _write(d: Path, summary: dict) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary, ensure_ascii=False))
    return str(d)


@pytest.fixture()
def three(tmp_path):
    # agronomy: Other; anatomy: STEM; ancient_chinese: China specific + Social Science
    t = _write(tmp_path / "t", _summary({"agronomy": 80.0, "anatomy": 70.0, "ancient_chinese": 60.0}, 0.5, 0.05))
    b = _write(tmp_path / "b", _summary({"agronomy": 30.0, "anatomy": 25.0, "ancient_chinese": 20.0}, 10.0, 0.02))
    d = _write(tmp_path / "d", _summary({"agronomy": 50.0, "anatomy": 40.0, "ancient_chinese": 20.0}, 10.0, 0.08))
    return t, b, d


def _run_cli(args):
    from click.testing import CliRunner

    from kd_mlx.report import main

    return CliRunner().invoke(main, args)


def test_report_tables_targets_and_pngs(three, tmp_path):
    import matplotlib.image as mpimg

    t, b, d = three
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "train_loss": 3.0 / (s + 1), "val_loss": 3.5 / (s + 1)}) for s in range(0, 50, 5)]
    (run / "metrics.jsonl").write_text("\n".join(lines + ['{"step": 55, "train_lo']) + "\n")  # a cut last line
    r = _run_cli([t, b, d, "--run", str(run), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    # overall by hand: teacher (80+70+60)/3 = 70, baseline 25, distilled (50+40+20)/3 = 36.67
    assert "| **Overall** | **70.00** | **25.00** | **36.67** | **+11.67** |" in md
    assert "| distilled / teacher (overall) | 52.4% |" in md  # 36.667 / 70
    assert "| distilled − baseline (overall) | +11.67 points |" in md
    assert "| share of the teacher−baseline gap closed | 25.9% |" in md  # 11.667 / 45
    assert "| STEM | 70.00 | 25.00 | 40.00 | +15.00 |" in md
    assert "| agronomy | 农学 | Other | 80.00 | 30.00 | 50.00 | +20.00 |" in md
    assert "| ancient_chinese | 古汉语 |" in md and "| +0.00 |" in md
    assert "Student/teacher speed ratio (distilled q/s ÷ teacher q/s): **20.00×**" in md
    assert "| ECE (10 bins) | 0.0500 | 0.0200 | 0.0800 |" in md
    assert "| MLX peak memory | 1.0 GiB | 1.0 GiB | 1.0 GiB |" in md
    assert "| train_loss | 3.0000 | 0.0652 | 0.0652 |" in md  # 3/(0+1) ... 3/(45+1)
    for png in ("categories.png", "subject_deltas.png", "reliability.png", "training.png"):
        assert f"![{png}]({png})" in md
        img = mpimg.imread(tmp_path / "rep" / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert np.asarray(img).std() > 0.01  # something was drawn
    tg = json.loads((tmp_path / "rep" / "targets.json").read_text())
    assert tg["distilled_over_teacher"] == pytest.approx((110 / 3) / 70)
    assert tg["gain_over_baseline_points"] == pytest.approx(110 / 3 - 25)
    assert json.loads((tmp_path / "rep" / "config.json").read_text())["run"] == str(run)
    assert not list((tmp_path / "rep").glob(".*.tmp"))


def test_report_without_run_metrics(three, tmp_path):
    t, b, d = three
    (tmp_path / "emptyrun").mkdir()
    r = _run_cli([t, b, d, "--run", str(tmp_path / "emptyrun"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")
    assert "metrics.jsonl missing or empty" in md and not (tmp_path / "rep" / "training.png").exists()
    r = _run_cli([t, b, d, "--out", str(tmp_path / "rep2")])
    assert r.exit_code == 0 and "No run given" in (tmp_path / "rep2" / "report.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["missing_results", "bad_json", "missing_run"])
def test_report_bad_input_one_line(three, tmp_path, case):
    t, b, d = three
    if case == "missing_results":
        args = [t, b, str(tmp_path / "nothing"), "--out", str(tmp_path / "rep")]
    elif case == "bad_json":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "summary.json").write_text("{not json")
        args = [t, str(tmp_path / "bad"), d, "--out", str(tmp_path / "rep")]
    else:
        args = [t, b, d, "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "rep")]
    r = _run_cli(args)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert not (tmp_path / "rep" / "report.md").exists()


def test_report_from_real_eval_runs(tmp_path):
    """End to end: three real kd_mlx.eval runs (a tiny Kimi-K2-shaped teacher with the Kimi-format tokenizer and two
    tiny Phi students) on the hand-written fixture, then the report."""
    from kd_mlx.eval import DEFAULTS, run_eval
    from kd_mlx.report import build_report
    from kd_mlx.testing.models import tiny_kimi_k2_dir, tiny_phi_dir

    from test_eval import write_cmmlu  # tests/ is on sys.path under pytest

    data = write_cmmlu(tmp_path / "cm")
    models = {"teacher": tiny_kimi_k2_dir(tmp_path / "kimi", n_layers=2),
              "baseline": tiny_phi_dir(tmp_path / "phi0", seed=0),
              "distilled": tiny_phi_dir(tmp_path / "phi1", seed=1)}
    res = {}
    for name, model in models.items():
        out = tmp_path / f"res_{name}"
        r = run_eval(dict(DEFAULTS, model=str(model), data=str(data), shots=5, batch_size=4, out=str(out)),
                     progress=False)
        res[name] = str(out)
        assert r.summary["n_questions"] == 9 and 0 <= r.summary["overall"] <= 100
    rep = build_report(res["teacher"], res["baseline"], res["distilled"], str(tmp_path / "rep"))
    md = rep.read_text(encoding="utf-8")
    s = {k: json.loads((Path(v) / "summary.json").read_text()) for k, v in res.items()}
    assert (f"| **Overall** | **{s['teacher']['overall']:.2f}** | **{s['baseline']['overall']:.2f}** | "
            f"**{s['distilled']['overall']:.2f}** |") in md
    assert s["teacher"]["model"]["answer_token_ids"] == [32, 33, 34, 35]  # cl100k letters


def test_report_rerun_follows_the_output_rule(three, tmp_path):
    """A second report into the same --out is refused without --overwrite; with it the whole directory is replaced
    (no training.png left from a run given before), and the report can never be written into one of its inputs."""
    t, b, d = three
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 1.0}) + "\n")
    rep = tmp_path / "rep"
    assert _run_cli([t, b, d, "--run", str(run), "--out", str(rep)]).exit_code == 0
    assert (rep / "training.png").exists()
    before = (rep / "report.md").read_bytes()
    r = _run_cli([t, b, d, "--out", str(rep)])
    assert r.exit_code == 1 and "differs in: run" in r.output and "--overwrite" in r.output
    assert (rep / "report.md").read_bytes() == before
    r = _run_cli([t, b, d, "--out", str(rep), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert not (rep / "training.png").exists() and "No run given" in (rep / "report.md").read_text(encoding="utf-8")
    summary = (Path(t) / "summary.json").read_bytes()
    r = _run_cli([t, b, d, "--out", t, "--overwrite"])
    assert r.exit_code == 1 and "is the input" in r.output and (Path(t) / "summary.json").read_bytes() == summary
    assert sorted(p.name for p in Path(t).iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------------ pruning


def _prune_rows() -> dict:
    """bench_prune.json's layout with hand-chosen figures: two demo seeds for 0 % and 25 % of the layers, one
    SmolLM2 configuration with both recoveries."""
    demo = [{"part": "demo", "what": w, "fraction": f, "seed": s, "parameters": p, "prompt_tps": t,
             "generation_tps": t / 10, "peak_memory_gb": 0.02, "accuracy_pruned": a, "accuracy_recovered": r}
            for w, f, p, t, s, a, r in [("none", 0.0, 8e6, 1000.0, 0, 40.0, 41.0), ("none", 0.0, 8e6, 1000.0, 1, 42.0, 43.0),
                                         ("layers", 0.25, 6e6, 1250.0, 0, 30.0, 40.0),
                                         ("layers", 0.25, 6e6, 1350.0, 1, 34.0, 42.0)]]
    real = [{"part": "smollm2", "what": "none", "fraction": 0.0, "seed": 0, "parameters": 134e6, "prompt_tps": 200.0,
             "generation_tps": 20.0, "peak_memory_gb": 0.6, "bpb_pruned": 2.0},
            {"part": "smollm2", "what": "layers", "fraction": 0.25, "seed": 0, "parameters": 100e6, "prompt_tps": 250.0,
             "generation_tps": 25.0, "peak_memory_gb": 0.5, "bpb_pruned": 3.0, "bpb_kd": 2.4, "bpb_ce": 2.8,
             "kd_closes": 0.6, "ce_closes": 0.2}]
    return {"rows": demo + real, "meta": {}}


def test_prune_tradeoff_table_and_plot(three, tmp_path):
    from kd_mlx.report import prune_groups

    bench = tmp_path / "bench_prune.json"
    bench.write_text(json.dumps(_prune_rows()))
    groups = {(g["part"], g["what"], g["fraction"]): g for g in prune_groups(_prune_rows()["rows"])}
    g = groups[("demo", "layers", 0.25)]
    assert g["seeds"] == 2 and g["accuracy_recovered"] == 41.0 and g["accuracy_pruned_std"] == pytest.approx(2 ** 0.5 * 2)
    assert g["prompt_tps_ratio"] == pytest.approx(1300 / 1000) and g["parameters_ratio"] == pytest.approx(0.75)
    r = _run_cli([*three, "--out", str(tmp_path / "rep"), "--prune", str(bench)])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Pruning: accuracy vs speed" in md
    assert "| 25% layers removed | 2 | 6.00M (0.75×) | 1300 (1.30×) | 130 (1.30×) | 20 MB | 32.0 ± 2.8 | 41.0 ± 1.4 |" in md
    assert ("| 25% layers removed (smollm2) | 100.00M (0.75×) | 250 (1.25×) | 25.0 (1.25×) | 0.50 GB | 3.000 | 2.400 | "
            "2.800 | 60.0% / 20.0% |") in md
    png = (tmp_path / "rep" / "prune_tradeoff.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_prune_report_bad_input_one_line(three, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [{"part": "demo"}]}))
    for arg in (str(bad), str(tmp_path / "missing.json")):
        r = _run_cli([*three, "--out", str(tmp_path / "rep"), "--prune", arg])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "rep").exists()
