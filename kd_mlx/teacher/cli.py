"""`python -m kd_mlx.teacher inspect|score|convert` (and `dump`, registered from kd_mlx/teacher/dump.py).

  python -m kd_mlx.teacher inspect MODEL --memory-budget 16GB
  python -m kd_mlx.teacher score MODEL --prompts prompts.jsonl --memory-budget 16GB --out scores.safetensors
  python -m kd_mlx.teacher convert SRC DST --bits 4 --group-size 64
  python -m kd_mlx.teacher convert SRC DST --keep-dtype
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from ..safetensors_io import StreamingShardWriter
from ..utils import (KDError, cli_errors, format_bytes, linux_blas_advice, load_yaml_config, merge_config, parse_bytes,
                     peak_rss_bytes, resolve_model_path, write_json_atomic)
from .convert import KEEP_DTYPE, convert_checkpoint, describe_conversion
from .streaming import StreamingTeacher


@click.group()
def cli() -> None:
    """The teacher: inspect a model, score prompts under a memory budget, convert checkpoints to MLX."""


def _budget(v) -> int | None:
    return None if v in (None, "", "none", "None") else parse_bytes(v)




INSPECT_DEFAULTS = {"memory_budget": None, "tokens": 800, "json_out": None}


@cli.command()
@click.argument("model")
@click.option("--memory-budget", default=None, help="e.g. 16GB; shows the plan under this budget")
@click.option("--tokens", type=int, default=None, help="prompt length for the bytes-per-question estimate (800)")
@click.option("--json-out", default=None, help="also write the report as JSON here")
@click.option("--config", "config_path", default=None, help="YAML config (flags win)")
@cli_errors
def inspect(model, memory_budget, tokens, json_out, config_path):
    """Parameters, bytes on disk, per-layer sizes, largest tensor, and the plan under the budget (any family)."""
    cfg = merge_config(load_yaml_config(config_path),
                       {"memory_budget": memory_budget, "tokens": tokens, "json_out": json_out}, INSPECT_DEFAULTS)
    t = StreamingTeacher(resolve_model_path(model), _budget(cfg["memory_budget"]))
    d = t.describe()
    d["bytes_read_per_question_estimate"] = t.bytes_per_question(int(cfg["tokens"]))
    p = d["plan"]
    click.echo(f"model       {d['model']} ({d['model_type']} via mlx-lm {d['family']})")
    click.echo(f"parameters  {d['parameters'] / 1e9:.3f} B   on disk {format_bytes(d['bytes_on_disk'])} "
               f"in {len(d['files'])} file(s)")
    lt = p["largest_indivisible_tensor"]
    click.echo(f"largest indivisible tensor  {lt['name']} ({format_bytes(lt['bytes'])})")
    for row in d["layers"]:
        ex = (f", {row['experts']} experts x {format_bytes(row['bytes_per_expert'])}" if row["experts"] else "")
        click.echo(f"  layer {row['layer']:>3}: resident {format_bytes(row['resident_bytes'])}{ex}")
    if p["memory_budget"] is not None:
        click.echo(f"plan under {format_bytes(p['memory_budget'])}: activations {format_bytes(p['activation_budget'])}, "
                   f"prefetch layers {p['prefetch_layers']}, experts per group {p['experts_per_group']} "
                   f"(prefetch {p['prefetch_experts']}), LM head rows per read {p['lm_head_rows_per_read']}")
    click.echo(f"bytes read per question (~{cfg['tokens']} tokens, one per pass): "
               f"{format_bytes(d['bytes_read_per_question_estimate'])}; one pass over the weights serves a whole "
               f"chunk of questions")
    if cfg["json_out"]:
        write_json_atomic(cfg["json_out"], {"report": d, "config": cfg})


SCORE_DEFAULTS = {"prompts": None, "memory_budget": None, "out": None, "add_bos": False, "trust_remote_code": False}


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise KDError(f"prompts file not found: {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise KDError(f"{p}:{n}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise KDError(f"{p}:{n}: expected an object with a non-empty string \"prompt\"")
        out.append(obj["prompt"])
    if not out:
        raise KDError(f"{p}: no prompts")
    return out


def score_prompts(model: str | Path, prompts: list[str], memory_budget: int | None, out: str | Path,
                  add_bos: bool = False, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Last-position full-vocabulary log-probs of each prompt through the streaming executor -> `out`."""
    t = StreamingTeacher(resolve_model_path(str(model)), memory_budget, trust_remote_code=trust_remote_code,
                         progress=progress)
    mx.reset_peak_memory()
    lp = t.score_texts(prompts, add_bos=add_bos)
    w = StreamingShardWriter(Path(out), [("logprobs", "F32", tuple(lp.shape))],
                             metadata={"format": "kd_mlx.scores", "model": str(model)})
    try:
        w.write("logprobs", np.ascontiguousarray(lp, dtype=np.float32))
        w.close()
    except BaseException:
        w.abort()
        raise
    return {"prompts": len(prompts), "vocab": int(lp.shape[1]), "bytes_read": t.stats.bytes_read,
            "expert_bytes_read": t.stats.expert_bytes_read, "wall_s": round(t.stats.wall_s, 3),
            "peak_mlx_bytes": int(mx.get_peak_memory()), "peak_rss_bytes": peak_rss_bytes(),
            "argmax_tokens": [t.tokenizer.decode([int(i)]) for i in lp.argmax(axis=1)]}


@cli.command()
@click.argument("model")
@click.option("--prompts", default=None, help='JSONL file, one {"prompt": "..."} per line')
@click.option("--memory-budget", default=None, help="e.g. 16GB (hard limit on MLX memory)")
@click.option("--out", default=None, help="output .safetensors (tensor 'logprobs', prompts x vocab, float32)")
@click.option("--add-bos/--no-add-bos", default=None, help="prepend the BOS token")
@click.option("--trust-remote-code", is_flag=True, default=None, help="allow the model's own tokenizer code")
@click.option("--config", "config_path", default=None, help="YAML config (flags win)")
@cli_errors
def score(model, prompts, memory_budget, out, add_bos, trust_remote_code, config_path):
    """What does the teacher say: last-position log-probs of each prompt, streamed under the budget."""
    cfg = merge_config(load_yaml_config(config_path),
                       {"prompts": prompts, "memory_budget": memory_budget, "out": out, "add_bos": add_bos,
                        "trust_remote_code": trust_remote_code}, SCORE_DEFAULTS)
    if not cfg["prompts"] or not cfg["out"]:
        raise KDError("score needs --prompts FILE.jsonl and --out FILE.safetensors")
    if not str(cfg["out"]).endswith(".safetensors"):
        raise KDError(f"--out {cfg['out']} must end in .safetensors")
    if (advice := linux_blas_advice()):
        click.echo(advice, err=True)
    texts = read_prompts(cfg["prompts"])
    res = score_prompts(model, texts, _budget(cfg["memory_budget"]), cfg["out"], bool(cfg["add_bos"]),
                        bool(cfg["trust_remote_code"]))
    write_json_atomic(Path(str(cfg["out"])[: -len(".safetensors")] + ".config.json"),
                      {"model": str(model), **cfg, "result": {k: v for k, v in res.items() if k != "argmax_tokens"}})
    click.echo(f"scored {res['prompts']} prompts -> {cfg['out']} (logprobs {res['prompts']}x{res['vocab']}); "
               f"read {format_bytes(res['bytes_read'])}, peak MLX {format_bytes(res['peak_mlx_bytes'])}, "
               f"peak RSS {format_bytes(res['peak_rss_bytes'])}, {res['wall_s']:.1f} s")
    for i, tok in enumerate(res["argmax_tokens"][:10]):
        click.echo(f"  prompt {i}: most likely next token {tok!r}")


CONVERT_DEFAULTS = {"bits": 4, "group_size": 64, "shard_size": "5GiB", "dtype": None}


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--bits", type=int, default=None, help="bits per weight (4; 16 = keep the dtype, no quantization)")
@click.option("--keep-dtype", is_flag=True, default=False, help="write the MLX layout without quantizing (= --bits 16)")
@click.option("--group-size", type=int, default=None, help="quantization group size (64)")
@click.option("--shard-size", default=None, help="maximum shard size (5GiB)")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="cast unquantized tensors (default: keep)")
@click.option("--config", "config_path", default=None, help="YAML config (flags win)")
@cli_errors
def convert(src, dst, bits, keep_dtype, group_size, shard_size, dtype, config_path):
    """bf16 or block-FP8 Hugging Face checkpoint SRC -> MLX shards in DST (quantized, or --keep-dtype), one layer or
    one expert at a time."""
    cfg = merge_config(load_yaml_config(config_path),
                       {"bits": KEEP_DTYPE if keep_dtype else bits, "group_size": group_size,
                        "shard_size": shard_size, "dtype": dtype}, CONVERT_DEFAULTS)
    out = convert_checkpoint(resolve_model_path(src), Path(dst), bits=int(cfg["bits"]),
                             group_size=int(cfg["group_size"]), shard_bytes=parse_bytes(cfg["shard_size"]),
                             dtype=cfg["dtype"])
    write_json_atomic(out / "kd_mlx_convert.json", {"src": str(src), "dst": str(dst), **cfg})
    click.echo(f"converted {describe_conversion(out)}; peak RSS {format_bytes(peak_rss_bytes())}")


# --- further commands: the logits dump lives in kd_mlx/teacher/dump.py (store engineer); register it below ---
from .dump import dump as _dump  # noqa: E402

cli.add_command(_dump)


def main() -> None:
    cli()
