"""`python -m kd_mlx.eval`: CMMLU accuracy of a model under the official protocol (logic in kd_mlx.evaluate).

    python -m kd_mlx.eval --model PHI_DIR --adapters run/best --data CMMLU_DIR --splits splits.json --split test \
        --shots 5 --out res_distilled/
    python -m kd_mlx.eval --model KIMI_DIR --memory-budget 16GB --data CMMLU_DIR --shots 5 --out res_teacher/

Writes RESULTS/subjects/<subject>.csv, RESULTS/summary.json (overall, categories, subjects, calibration,
throughput, memory) and RESULTS/config.json (the final config).
"""

from __future__ import annotations

import click

from .utils import cli_errors, linux_blas_advice, load_yaml_config, merge_config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config; flags override it.")
@click.option("--model", default=None, help="Model directory or hub id (student or teacher).")
@click.option("--adapters", default=None, help="LoRA adapter directory from training (e.g. RUN/best).")
@click.option("--memory-budget", default=None, help="Evaluate through the streaming teacher under this budget (16GB).")
@click.option("--data", default=None, help="CMMLU directory (dev/ test/) or hub id.")
@click.option("--splits", default=None, help="splits.json from `python -m kd_mlx.data split`.")
@click.option("--split", default=None, help="Split of splits.json to evaluate (default test).")
@click.option("--shots", type=int, default=None, help="Few-shot examples from dev/ (0 or 5; default 5).")
@click.option("--max-tokens", type=int, default=None, help="Prompt token limit (default 2048, capped by the context).")
@click.option("--batch-size", type=int, default=None, help="Questions per forward pass (default 8).")
@click.option("--subjects", default=None, help="Comma-separated subjects (default all).")
@click.option("--limit", type=int, default=None, help="At most this many questions per subject.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (auto: float32 on CPU, the checkpoint's on GPU).")
@click.option("--dequantize/--no-dequantize", default=None,
              help="Run a quantized model dequantized (default: yes on CPU, where quantized matmul is slow).")
@click.option("--bos/--no-bos", default=None, help="Prepend BOS (default: the tokenizer config's add_bos_token).")
@click.option("--reuse-prefix/--no-reuse-prefix", default=None, help="Share the few-shot prefix KV cache (default on).")
@click.option("--reference", is_flag=True, default=None, help="Plain one-question-at-a-time loop (slow; for checks).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Allow custom model/tokenizer code.")
@click.option("--out", default=None, help="Results directory.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@cli_errors
def main(config_file, quiet, **flags) -> None:
    """Evaluate a model on CMMLU (official protocol)."""
    from .evaluate import DEFAULTS, run_eval

    cfg = merge_config(load_yaml_config(config_file), flags, DEFAULTS)
    advice = linux_blas_advice()
    if advice:
        click.echo(advice, err=True)
    result = run_eval(cfg, progress=not quiet)
    s = result.summary
    cats = ", ".join(f"{c} {v:.2f}" for c, v in s["categories"].items())
    click.echo(f"overall {s['overall']:.2f}% over {len(s['subjects'])} subjects, {s['n_questions']} questions"
               f" ({s['throughput']['questions_per_s']:.2f} q/s); {cats}")
    click.echo(f"results in {cfg['out']}")


if __name__ == "__main__":
    main()
