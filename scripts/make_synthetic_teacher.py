"""Write a Kimi-K2-shaped 4-bit mlx-lm model at the real dimensions (hidden 7168, MLA, 384 experts x 2048,
vocab 163,840), deep enough to reach a target size on disk; tensors are written one at a time (bounded memory).

    python scripts/make_synthetic_teacher.py OUT_DIR --target-size 32GB
    python scripts/make_synthetic_teacher.py OUT_DIR --layers 3 --float-dtype bfloat16
    python scripts/make_synthetic_teacher.py OUT_DIR --layers 4 --set hidden_size=2048 --set n_routed_experts=64
"""

from __future__ import annotations

import json

import click

from kd_mlx.testing.models import synthetic_kimi_k2_dir
from kd_mlx.utils import KDError, cli_errors, format_bytes, parse_bytes


@click.command()
@click.argument("out_dir")
@click.option("--target-size", default=None, help="smallest depth whose size on disk reaches this (e.g. 32GB)")
@click.option("--layers", type=int, default=None, help="exact number of layers (first one dense)")
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--group-size", type=int, default=64, show_default=True)
@click.option("--float-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="dtype of scales/biases/norms (float32: fast CPU compute)")
@click.option("--set", "sets", multiple=True, help="override a config value, e.g. hidden_size=2048")
@click.option("--seed", type=int, default=0, show_default=True)
@cli_errors
def main(out_dir, target_size, layers, bits, group_size, float_dtype, sets, seed):
    if (target_size is None) == (layers is None):
        raise KDError("give exactly one of --target-size and --layers")
    overrides = {}
    for s in sets:
        if "=" not in s:
            raise KDError(f"--set {s!r}: expected key=value")
        k, v = s.split("=", 1)
        overrides[k] = json.loads(v)
    out = synthetic_kimi_k2_dir(out_dir, target_bytes=parse_bytes(target_size) if target_size else None,
                                n_layers=layers, bits=bits, group_size=group_size, float_dtype=float_dtype,
                                seed=seed, **overrides)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    click.echo(f"{out}: {cfg['num_hidden_layers']} layers, {format_bytes(idx['metadata']['total_size'])} on disk")


if __name__ == "__main__":
    main()
