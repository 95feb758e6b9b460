"""Teacher vs baseline vs distilled on CMMLU: a Markdown report with PNG plots.

    python -m kd_mlx.report res_teacher/ res_baseline/ res_distilled/ --run run/ --out report/

Reads each RESULTS/summary.json written by `python -m kd_mlx.eval`, and RUN/metrics.jsonl (one JSON object per
line with "step" and loss keys) when `--run` is given. Writes REPORT/report.md, REPORT/categories.png,
REPORT/subject_deltas.png, REPORT/reliability.png, REPORT/training.png (with --run and metrics) and
REPORT/config.json. With `--prune bench_prune.json` (benchmarks/bench_prune.py) the report also gets the pruning
trade-off table (parameters, tokens/s, memory, accuracy or bits per byte before/after KD recovery) and
REPORT/prune_tradeoff.png (accuracy vs tokens/s).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import click

from .utils import (KDError, atomic_path, cli_errors, format_bytes, load_yaml_config, merge_config, path_identity,
                    prepare_output_dir, staged_output_dir, write_json_atomic)

MODELS = ("teacher", "baseline", "distilled")
COLORS = {"teacher": "#4c72b0", "baseline": "#999999", "distilled": "#dd8452"}
CATEGORY_ORDER = ["STEM", "Humanities", "Social Science", "Other", "China specific"]


def load_summary(results: str | os.PathLike) -> dict:
    """RESULTS/summary.json as written by kd_mlx.eval (KDError naming the problem otherwise)."""
    p = Path(results)
    f = p / "summary.json" if p.is_dir() else p
    if not f.is_file():
        raise KDError(f"no summary.json in {p} (run python -m kd_mlx.eval --out {p} first)")
    try:
        s = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"{f} is not valid JSON ({str(e).splitlines()[0]}): re-run python -m kd_mlx eval") from None
    if not isinstance(s, dict):
        raise KDError(f"{f} is not a kd_mlx eval summary (not a JSON object)")
    for key in ("overall", "subjects", "categories"):
        if key not in s:
            raise KDError(f"{f} has no {key!r}: not a kd_mlx.eval summary")
    scores = [s["overall"], *(s["subjects"].values() if isinstance(s["subjects"], dict) else [None]),
              *(s["categories"].values() if isinstance(s["categories"], dict) else [None])]
    if (not isinstance(s["subjects"], dict) or not isinstance(s["categories"], dict)
            or any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in scores)):
        raise KDError(f"{f}: overall, subjects and categories must hold accuracies (numbers): re-run "
                      f"python -m kd_mlx eval")
    return s


def load_metrics(run: str | os.PathLike | None) -> list[dict]:
    """RUN/metrics.jsonl rows that have a "step" (bad lines skipped); [] when the run or the file is absent."""
    if run is None:
        return []
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted run
        if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
            rows.append(r)
    return rows


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.1f}%"


def targets(s: dict[str, dict]) -> dict:
    """The headline figures: distilled overall as a fraction of the teacher's, and its gain over the baseline."""
    t, b, d = (s[m]["overall"] for m in MODELS)
    return {
        "distilled_over_teacher": d / t if t else None,
        "gain_over_baseline_points": d - b,
        "teacher_minus_baseline_points": t - b,
        # share of the teacher-baseline gap that distillation closed
        "gap_closed": (d - b) / (t - b) if t != b else None,
    }


def _throughput(s: dict) -> tuple[float | None, float | None]:
    th = s.get("throughput") or {}
    return th.get("questions_per_s"), th.get("prompt_tokens_per_s")


# --------------------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_categories(s: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    cats = [c for c in CATEGORY_ORDER if any(c in s[m]["categories"] for m in MODELS)]
    cats += sorted({c for m in MODELS for c in s[m]["categories"]} - set(cats))
    labels = ["Overall"] + cats
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 4))
    for k, m in enumerate(MODELS):
        vals = [s[m]["overall"]] + [s[m]["categories"].get(c, np.nan) for c in cats]
        ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=m, color=COLORS[m])
    ax.axhline(25, color="k", lw=0.8, ls=":", label="chance (25%)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("CMMLU accuracy by category")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_subject_deltas(s: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    common = sorted(set(s["distilled"]["subjects"]) & set(s["baseline"]["subjects"]))
    deltas = sorted(((s["distilled"]["subjects"][k] - s["baseline"]["subjects"][k], k) for k in common))
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.2 * len(deltas) + 1)))
    ax.barh([k for _, k in deltas], [d for d, _ in deltas],
            color=["#55a868" if d >= 0 else "#c44e52" for d, _ in deltas])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("distilled − baseline (points)")
    ax.set_title("Per-subject change from distillation")
    ax.tick_params(axis="y", labelsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_reliability(s: dict[str, dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    for m in MODELS:
        cal = s[m].get("calibration") or {}
        pts = [(b["confidence"], b["accuracy"]) for b in cal.get("bins", []) if b.get("count")]
        if pts:
            ax.plot(*zip(*pts), "o-", color=COLORS[m], label=f"{m} (ECE {_fmt(cal.get('ece'), 3)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max letter probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)
    plt.close(fig)


def loss_keys(rows: list[dict]) -> list[str]:
    keys = {k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))}
    return sorted(keys)


def plot_training(rows: list[dict], path: Path) -> bool:
    """Loss curves against step (one line per numeric key containing "loss"); False if nothing to plot."""
    import matplotlib.pyplot as plt

    keys = loss_keys(rows)
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training curves")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------- markdown
def render_markdown(s: dict[str, dict], paths: dict[str, str], metrics: list[dict], plots: list[str],
                    run: str | None) -> str:
    from .data import subject_table

    table = subject_table()
    tg = targets(s)
    out = ["# CMMLU: teacher vs baseline vs distilled", ""]
    out += ["| | teacher | baseline | distilled |", "|---|---|---|---|"]
    out.append("| results | " + " | ".join(f"`{paths[m]}`" for m in MODELS) + " |")
    out.append("| model | " + " | ".join(f"`{(s[m].get('model') or {}).get('path', '?')}`" for m in MODELS) + " |")
    out.append("| shots | " + " | ".join(str(s[m].get("shots", "?")) for m in MODELS) + " |")
    out.append("| questions | " + " | ".join(str(s[m].get("n_questions", "?")) for m in MODELS) + " |")
    subj_sets = [set(s[m]["subjects"]) for m in MODELS]
    if not (subj_sets[0] == subj_sets[1] == subj_sets[2]):
        out += ["", "**Warning:** the three results cover different subjects; overall figures are not comparable."]
    ns = [s[m].get("n") for m in MODELS]
    if all(ns) and not (ns[0] == ns[1] == ns[2]):
        out += ["", "**Warning:** the three results have different question counts per subject."]

    out += ["", "## Targets", "", "| figure | value |", "|---|---|"]
    out.append(f"| distilled / teacher (overall) | {_pct(tg['distilled_over_teacher'])} |")
    out.append(f"| distilled − baseline (overall) | {tg['gain_over_baseline_points']:+.2f} points |")
    out.append(f"| teacher − baseline (overall) | {tg['teacher_minus_baseline_points']:+.2f} points |")
    gc = tg["gap_closed"]
    out.append(f"| share of the teacher−baseline gap closed | {_pct(gc)} |")

    out += ["", "## Overall and categories (accuracy, %)", "",
            "| | teacher | baseline | distilled | distilled − baseline |", "|---|---|---|---|---|"]
    out.append("| **Overall** | " + " | ".join(f"**{_fmt(s[m]['overall'])}**" for m in MODELS)
               + f" | **{s['distilled']['overall'] - s['baseline']['overall']:+.2f}** |")
    cats = [c for c in CATEGORY_ORDER if any(c in s[m]["categories"] for m in MODELS)]
    cats += sorted({c for m in MODELS for c in s[m]["categories"]} - set(cats))
    for c in cats:
        v = [s[m]["categories"].get(c) for m in MODELS]
        d = f"{v[2] - v[1]:+.2f}" if v[1] is not None and v[2] is not None else "–"
        out.append(f"| {c} | " + " | ".join(_fmt(x) for x in v) + f" | {d} |")

    out += ["", "## Calibration", "", "| | teacher | baseline | distilled |", "|---|---|---|---|"]
    for key, label in (("ece", "ECE (10 bins)"), ("brier", "Brier")):
        out.append(f"| {label} | " + " | ".join(_fmt((s[m].get("calibration") or {}).get(key), 4) for m in MODELS) + " |")

    out += ["", "## Throughput and memory", "", "| | teacher | baseline | distilled |", "|---|---|---|---|"]
    qps = [_throughput(s[m])[0] for m in MODELS]
    tps = [_throughput(s[m])[1] for m in MODELS]
    out.append("| questions/s | " + " | ".join(_fmt(x, 3) for x in qps) + " |")
    out.append("| prompt tokens/s | " + " | ".join(_fmt(x, 1) for x in tps) + " |")
    for key, label in (("mlx_peak_bytes", "MLX peak memory"), ("peak_rss_bytes", "process peak RSS")):
        vals = [(s[m].get("memory") or {}).get(key) for m in MODELS]
        out.append(f"| {label} | " + " | ".join(format_bytes(v) if v is not None else "–" for v in vals) + " |")
    kinds = [(s[m].get("model") or {}).get("kind", "?") for m in MODELS]
    out.append("| executor | " + " | ".join(kinds) + " |")
    if qps[0] and qps[2]:
        out += ["", f"Student/teacher speed ratio (distilled q/s ÷ teacher q/s): **{qps[2] / qps[0]:.2f}×**."]

    out += ["", "## Training", ""]
    if run is None:
        out.append("No run given (`--run RUN`).")
    elif not metrics:
        out.append(f"No metrics in `{run}` (metrics.jsonl missing or empty).")
    else:
        keys = loss_keys(metrics)
        last = metrics[-1]
        out.append(f"{len(metrics)} metric rows from `{run}/metrics.jsonl`, last step {last['step']}.")
        if keys:
            out += ["", "| loss | first | last | min |", "|---|---|---|---|"]
            for k in keys:
                vals = [r[k] for r in metrics if isinstance(r.get(k), (int, float))]
                out.append(f"| {k} | {_fmt(vals[0], 4)} | {_fmt(vals[-1], 4)} | {_fmt(min(vals), 4)} |")

    out += ["", "## Plots", ""]
    out += [f"![{p}]({p})" for p in plots]

    out += ["", "## Subjects (accuracy, %)", "",
            "| subject | 中文 | categories | teacher | baseline | distilled | distilled − baseline |",
            "|---|---|---|---|---|---|---|"]
    for k in sorted(set().union(*subj_sets)):
        v = [s[m]["subjects"].get(k) for m in MODELS]
        d = f"{v[2] - v[1]:+.2f}" if v[1] is not None and v[2] is not None else "–"
        info = table.get(k, {})
        out.append(f"| {k} | {info.get('zh', '')} | {', '.join(info.get('categories', []))} | "
                   + " | ".join(_fmt(x) for x in v) + f" | {d} |")
    return "\n".join(out) + "\n"


REPORT_KIND = "report"


def build_report(teacher: str, baseline: str, distilled: str, out: str, run: str | None = None,
                 overwrite: bool = False, config: dict | None = None, prune: str | None = None) -> Path:
    """Write REPORT/report.md, its PNG plots, targets.json and config.json; return the report path.

    REPORT follows the output-directory rule (kd_mlx.utils.prepare_output_dir): new, or an earlier report replaced
    with `overwrite`, never one of the inputs; it is built under a temporary name and renamed when complete."""
    import matplotlib

    matplotlib.use("Agg")
    paths = {"teacher": teacher, "baseline": baseline, "distilled": distilled}
    s = {m: load_summary(p) for m, p in paths.items()}
    for m in MODELS:
        if s[m]["overall"] is None:
            raise KDError(f"{paths[m]}/summary.json has no overall score (empty evaluation?)")
    if run is not None and not Path(run).is_dir():
        raise KDError(f"run directory not found: {run}")
    prune_rows = load_prune_rows(prune) if prune else None
    identity = {**{m: path_identity(p) for m, p in paths.items()}, "run": path_identity(run)}
    if prune:
        identity["prune"] = path_identity(prune)
    prepare_output_dir(out, REPORT_KIND, identity, [*paths.values(), run, prune], overwrite=overwrite)
    with staged_output_dir(out, REPORT_KIND, identity) as outp:
        plots = ["categories.png", "subject_deltas.png", "reliability.png"]
        plot_categories(s, outp / plots[0])
        plot_subject_deltas(s, outp / plots[1])
        plot_reliability(s, outp / plots[2])
        metrics = load_metrics(run)
        if metrics and plot_training(metrics, outp / "training.png"):
            plots.append("training.png")
        md = render_markdown(s, paths, metrics, plots, run)
        if prune_rows:
            md += "\n" + prune_section(prune_rows, prune, outp)
        with atomic_path(outp / "report.md") as tmp:
            tmp.write_text(md, encoding="utf-8")
        write_json_atomic(outp / "targets.json", {"overall": {m: s[m]["overall"] for m in MODELS}, **targets(s)})
        write_json_atomic(outp / "config.json", {**(config or {}), **paths, "run": run, "out": str(out)})
    return Path(out) / "report.md"


# --------------------------------------------------------------------------------------------------- pruning
PRUNE_NAMES = {"none": "unpruned", "layers": "layers removed", "mlp": "MLP width removed", "heads": "heads removed"}


def load_prune_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of benchmarks/bench_prune.py's bench_prune.json (KDError naming the problem otherwise)."""
    f = Path(path)
    if not f.is_file():
        raise KDError(f"pruning benchmark file not found: {f} (benchmarks/bench_prune.py writes OUT/bench_prune.json)")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KDError(f"{f} is not valid JSON: {e}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows or not all(isinstance(r, dict) and {"part", "what", "fraction"} <= set(r) for r in rows):
        raise KDError(f"{f} has no rows with part/what/fraction: not a bench_prune.py output")
    return rows


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None)


def prune_groups(rows: list[dict]) -> list[dict]:
    """One entry per (part, what, fraction): figures averaged over seeds (mean, std where several seeds), speed
    ratios against the part's unpruned row."""
    keys = sorted({(r["part"], r["what"], float(r["fraction"])) for r in rows},
                  key=lambda k: (k[0], k[1] != "none", k[1], k[2]))
    out = []
    for part, what, frac in keys:
        rs = [r for r in rows if (r["part"], r["what"], float(r["fraction"])) == (part, what, frac)]
        g: dict[str, Any] = {"part": part, "what": what, "fraction": frac, "seeds": len(rs)}
        for k in ("parameters", "prompt_tps", "generation_tps", "peak_memory_gb", "accuracy_pruned",
                  "accuracy_recovered", "bpb_pruned", "bpb_kd", "bpb_ce", "kd_closes", "ce_closes"):
            g[k], g[k + "_std"] = _mean_std([r.get(k) for r in rs])
        out.append(g)
    for g in out:
        base = next((b for b in out if b["part"] == g["part"] and b["what"] == "none"), None)
        for k in ("prompt_tps", "generation_tps", "parameters"):
            ok = base and base.get(k) and g.get(k)
            g[k + "_ratio"] = g[k] / base[k] if ok else None
    return out


def _pm(m: float | None, sd: float | None, digits: int = 1) -> str:
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def prune_table(rows: list[dict]) -> str:
    """Markdown trade-off tables: one for the demo task (accuracy %), one for the real model (bits per byte)."""
    groups = prune_groups(rows)
    out = []
    demo = [g for g in groups if g["part"] == "demo"]
    if demo:
        out += ["| pruned | seeds | parameters | prompt tok/s | generation tok/s | peak memory | accuracy pruned (%) "
                "| after KD recovery (%) |", "|---|---|---|---|---|---|---|---|"]
        for g in demo:
            out.append(f"| {_prune_label(g)} | {g['seeds']} | {_params(g)} | {_speed(g, 'prompt_tps')} | "
                       f"{_speed(g, 'generation_tps')} | {_fmt(g['peak_memory_gb'] and g['peak_memory_gb'] * 1e3, 0)} MB | "
                       f"{_pm(g['accuracy_pruned'], g['accuracy_pruned_std'])} | "
                       f"{_pm(g['accuracy_recovered'], g['accuracy_recovered_std'])} |")
        out.append("")
    real = [g for g in groups if g["part"] != "demo"]
    if real:
        out += ["| pruned | parameters | prompt tok/s | generation tok/s | peak memory | bits/byte pruned | after KD "
                "recovery | after CE recovery | share of the loss KD / CE closed |", "|---|---|---|---|---|---|---|---|---|"]
        for g in real:
            closes = (f"{_pct(g['kd_closes'])} / {_pct(g['ce_closes'])}" if g["kd_closes"] is not None else "–")
            out.append(f"| {_prune_label(g)} ({g['part']}) | {_params(g)} | {_speed(g, 'prompt_tps')} | "
                       f"{_speed(g, 'generation_tps')} | {_fmt(g['peak_memory_gb'])} GB | {_fmt(g['bpb_pruned'], 3)} | "
                       f"{_fmt(g['bpb_kd'], 3)} | {_fmt(g['bpb_ce'], 3)} | {closes} |")
        out.append("")
    return "\n".join(out)


def _prune_label(g: dict) -> str:
    return PRUNE_NAMES["none"] if g["what"] == "none" else f"{100 * g['fraction']:.0f}% {PRUNE_NAMES.get(g['what'], g['what'])}"


def _params(g: dict) -> str:
    if g["parameters"] is None:
        return "–"
    r = g["parameters_ratio"]
    return f"{g['parameters'] / 1e6:.2f}M" + (f" ({r:.2f}×)" if r is not None and g["what"] != "none" else "")


def _speed(g: dict, key: str) -> str:
    if g[key] is None:
        return "–"
    r = g[key + "_ratio"]
    v = g[key]
    return (f"{v:.0f}" if v >= 100 else f"{v:.1f}") + (f" ({r:.2f}×)" if r is not None and g["what"] != "none" else "")


def plot_prune_tradeoff(rows: list[dict], path: Path) -> None:
    """Accuracy (demo) and bits per byte (real model) against prompt tokens/s, before and after recovery."""
    import matplotlib.pyplot as plt

    groups = prune_groups(rows)
    parts = [p for p in ("demo", "smollm2") if any(g["part"] == p for g in groups)]
    parts += sorted({g["part"] for g in groups} - set(parts))
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        gs = [g for g in groups if g["part"] == part and g["prompt_tps"]]
        demo = part == "demo"
        series = ([("accuracy_pruned", "before recovery", "#c44e52"),
                   ("accuracy_recovered", "after KD recovery", "#55a868")]
                  if demo else [("bpb_pruned", "before recovery", "#c44e52"), ("bpb_kd", "after KD recovery", "#55a868"),
                                ("bpb_ce", "after CE recovery", "#8172b2")])
        for key, label, color in series:
            pts = [(g["prompt_tps"], g[key], g) for g in gs if g[key] is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=label, zorder=3)
        for g in gs:
            y = g["accuracy_pruned"] if demo else g["bpb_pruned"]
            if y is not None:
                ax.annotate(_prune_label(g), (g["prompt_tps"], y), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        ax.margins(x=0.2, y=0.1)  # room for the labels
        ax.set_xlabel("prompt tokens/s")
        ax.set_ylabel("held-out accuracy (%)" if demo else "bits per byte (lower is better)")
        ax.set_title("demo task" if demo else f"{part}: language modelling")
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def prune_section(rows: list[dict], source: str, outp: Path) -> str:
    """Write OUTP/prune_tradeoff.png; return the report's Markdown section (table + plot)."""
    plot_prune_tradeoff(rows, outp / "prune_tradeoff.png")
    return ("## Pruning: accuracy vs speed\n\n"
            f"From `{source}` (benchmarks/bench_prune.py): every pruned model before and after KD recovery from "
            "the same teacher store; speed ratios against the unpruned model of the same part.\n\n"
            + prune_table(rows) + "\n![accuracy vs tokens/s](prune_tradeoff.png)\n")


DEFAULTS: dict[str, Any] = {"run": None, "out": None, "overwrite": False, "prune": None}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("results_teacher")
@click.argument("results_baseline")
@click.argument("results_distilled")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config; flags override it.")
@click.option("--run", default=None, help="Training run directory (RUN/metrics.jsonl) for training curves.")
@click.option("--out", default=None, help="Report directory (new, or --overwrite an earlier report there).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an earlier report in --out.")
@click.option("--prune", default=None, help="bench_prune.json (benchmarks/bench_prune.py): adds the pruning trade-off.")
@cli_errors
def main(results_teacher, results_baseline, results_distilled, config_file, **flags) -> None:
    """Report teacher vs baseline vs distilled CMMLU results (Markdown + PNG)."""
    cfg = merge_config(load_yaml_config(config_file), flags, DEFAULTS)
    if not cfg["out"]:
        raise KDError("missing --out")
    path = build_report(results_teacher, results_baseline, results_distilled, cfg["out"], cfg["run"],
                        overwrite=bool(cfg["overwrite"]), config=cfg, prune=cfg["prune"])
    tg = json.loads((Path(cfg["out"]) / "targets.json").read_text())
    ratio = tg["distilled_over_teacher"]
    click.echo(f"overall teacher {tg['overall']['teacher']:.2f} | baseline {tg['overall']['baseline']:.2f} | "
               f"distilled {tg['overall']['distilled']:.2f} (" + (f"{100 * ratio:.1f}% of teacher, " if ratio else "")
               + f"{tg['gain_over_baseline_points']:+.2f} points over baseline)")
    click.echo(f"report: {path}")


if __name__ == "__main__":
    main()
