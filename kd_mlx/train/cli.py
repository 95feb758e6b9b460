"""CLI: train a student on the teacher's store, resume a run, or sweep hyper-parameters.

    python -m kd_mlx.train --student DIR|HUB_ID --store STORE --data CMMLU_DIR --splits splits.json \\
        [--teacher-tokenizer DIR] [--config configs/train_phi15.yaml] --out RUN
    python -m kd_mlx.train --resume RUN            # continue from RUN/last (settings from RUN/config.json)
    mlx.launch -n 2 --backend ring -- python -m kd_mlx.train ...   # data parallel (batch_size = global batch)
    python -m kd_mlx.train sweep --config configs/train_sweep.yaml --grid temperature=1,2 \\
        --grid answer_weight=0.5,0.9 --steps 50 --out SWEEP

Every setting, its default and its help: `kd_mlx.train.config.TrainConfig` (= configs/train_phi15.yaml).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..utils import KDError, cli_errors, linux_blas_advice, load_yaml_config, merge_config
from .config import TrainConfig, defaults, help_text
from .run import format_sweep_table, parse_grid, read_run_config, run_sweep, run_training

# the settings with a flag (every other one: --config YAML); help and defaults come from TrainConfig
_FLAGS = {"student": str, "store": str, "data": str, "splits": str, "teacher_tokenizer": str, "out": str,
          "steps": int, "fine_tune_type": click.Choice(["lora", "dora", "full"]), "learning_rate": float,
          "batch_size": int, "seed": int}


def _with_common(fn):
    for name, kind in reversed(list(_FLAGS.items())):
        default = defaults()[name]
        shown = "" if default is None else f" [default: {default}]"
        fn = click.option(f"--{name.replace('_', '-')}", name, type=kind, help=help_text(name) + shown)(fn)
    fn = click.option("--no-verify", "verify_store", flag_value=False, default=None,
                      help="Skip the once-per-run sha256 check of the store's shards.")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="YAML config (every key of configs/train_phi15.yaml; flags win).")(fn)


def _cfg(config_path: str | None, flags: dict, base: dict | None = None) -> TrainConfig:
    """Defaults < the resumed run's recorded settings < YAML < flags, validated."""
    file_cfg = load_yaml_config(config_path)
    return TrainConfig.from_dict(merge_config(file_cfg, flags, {**defaults(), **(base or {})}))


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_with_common
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
@cli_errors
def main(ctx, config_path, resume, no_progress, **flags):
    """Distil the teacher's store into a student (LoRA/DoRA/full), with validation and checkpoints."""
    if ctx.invoked_subcommand is not None:
        if config_path or resume or any(v is not None for v in flags.values()):
            raise KDError(f"put options after the subcommand: python -m kd_mlx.train {ctx.invoked_subcommand} ...")
        return
    if advice := linux_blas_advice():
        click.echo(advice, err=True)
    base = None
    if resume:
        if flags.get("out") and Path(flags["out"]).resolve() != Path(resume).resolve():
            raise KDError("--resume RUN continues RUN in place: --out must be RUN or left out")
        base = read_run_config(resume)
        flags["out"] = resume
    cfg = _cfg(config_path, flags, base)
    summary = run_training(cfg, resume=bool(resume), progress=not no_progress)
    click.echo(json.dumps(summary, ensure_ascii=False))


@main.command("sweep")
@_with_common
@click.option("--grid", multiple=True, required=True, help="KEY=V1,V2,... (repeatable): the values to try.")
@click.option("--no-progress", is_flag=True)
@cli_errors
def sweep_cmd(config_path, grid, no_progress, **flags):
    """Short trials over a grid, ranked by validation accuracy; prints a table and writes OUT/sweep.json."""
    cfg = _cfg(config_path, flags)
    trials = run_sweep(cfg, parse_grid(grid), progress=not no_progress)
    click.echo(format_sweep_table(trials))
    click.echo(f"wrote {Path(cfg.out) / 'sweep.json'}")
