"""Benchmark the CMMLU data layer on the full test set (11,582 questions) under both real tokenizers.

    source scripts/setup_env.sh && python benchmarks/bench_data.py [--data ../shared/cmmlu] [--max-tokens 2048]

Prints: load time; prompts built per second (0- and 5-shot text only; 5-shot fitted to --max-tokens with the
batched `fit_prompts` against the one-by-one `fit_prompt` reference, ratio measured in the same run); tokens per
Chinese character (Han characters only, and over whole 0-shot prompts); mean/max prompt tokens for 0-shot and
5-shot (raw and fitted) under Phi-1.5's tokenizer (GPT-2 BPE) and the Kimi stand-in (cl100k in Kimi's tiktoken
format); peak MLX memory and process peak RSS. `KD_MLX_CMMLU` also sets the data directory.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import regex

from kd_mlx.data import build_prompt, count_tokens_batch, fit_prompt, fit_prompts, load_cmmlu
from kd_mlx.testing import kimi_tokenizer_dir, phi_tokenizer_dir
from kd_mlx.tokenizer import load_tokenizer

HAN = regex.compile(r"\p{Han}")
REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s ({n} in {seconds:.2f} s)"


@click.command()
@click.option("--data", default=None, help="CMMLU directory [default: $KD_MLX_CMMLU or ../shared/cmmlu]")
@click.option("--max-tokens", type=int, default=2048, help="Context to fit 5-shot prompts into (Phi-1.5: 2048).")
@click.option("--reference-stride", type=int, default=1, help="Run the one-by-one reference on every N-th question.")
def main(data: str | None, max_tokens: int, reference_stride: int) -> None:
    data = data or os.environ.get("KD_MLX_CMMLU") or str(REPO.parent / "shared" / "cmmlu")
    print(f"bench_data: data={data} max_tokens={max_tokens} reference_stride={reference_stride}")
    t = time.perf_counter()
    cm = load_cmmlu(data, progress=True)
    print(f"load: {len(cm)} test + {sum(map(len, cm.dev.values()))} dev questions, {len(cm.subjects)} subjects "
          f"in {time.perf_counter() - t:.2f} s")
    qs = cm.test_questions()

    t = time.perf_counter()
    p0 = [build_prompt(q) for q in qs]
    t0 = time.perf_counter() - t
    t = time.perf_counter()
    p5 = [build_prompt(q, cm.dev[q.subject]) for q in qs]
    t5 = time.perf_counter() - t
    print(f"build_prompt (text only): 0-shot {rate(len(qs), t0)}, 5-shot {rate(len(qs), t5)}")

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    toks = {"phi-1.5 (GPT-2 BPE)": load_tokenizer(phi_tokenizer_dir(tmp / "phi")),
            "kimi stand-in (cl100k)": load_tokenizer(kimi_tokenizer_dir(tmp / "kimi"))}
    han_only = ["".join(HAN.findall(q.question + "".join(q.choices))) for q in qs]
    n_han = sum(map(len, han_only))
    n_han_prompts = sum(len(HAN.findall(p.text)) for p in p0)
    results = {}
    for name, tok in toks.items():
        print(f"\n[{name}] vocab {tok.vocab_size}")
        c_han = count_tokens_batch(tok, han_only)
        c0 = count_tokens_batch(tok, [p.text for p in p0])
        c5 = count_tokens_batch(tok, [p.text for p in p5])
        print(f"  tokens per Chinese character: {sum(c_han) / n_han:.3f} (Han characters only, {n_han:,} chars); "
              f"{sum(c0) / n_han_prompts:.3f} (whole 0-shot prompts per Han character in them)")
        print(f"  0-shot prompt tokens: mean {statistics.mean(c0):.1f}, max {max(c0)}")
        print(f"  5-shot prompt tokens (no fitting): mean {statistics.mean(c5):.1f}, max {max(c5)}, "
              f"over {max_tokens}: {sum(c > max_tokens for c in c5)}")

        t = time.perf_counter()
        fitted = fit_prompts(qs, cm.dev, 5, tok, max_tokens)
        tf = time.perf_counter() - t
        sub = qs[::reference_stride]
        count = lambda s: len(tok.encode(s))  # noqa: E731
        t = time.perf_counter()
        ref = [fit_prompt(q, cm.dev[q.subject], 5, count, max_tokens) for q in sub]
        tr = time.perf_counter() - t
        assert ref == fitted[::reference_stride], "fit_prompts disagrees with fit_prompt"
        cf = count_tokens_batch(tok, [p.text for p in fitted])
        print(f"  5-shot fitted to {max_tokens}: mean {statistics.mean(cf):.1f}, max {max(cf)}, "
              f"prompts with shots dropped: {sum(p.shots < 5 for p in fitted)}")
        speed_f, speed_r = len(qs) / tf, len(sub) / tr
        print(f"  fitted prompts built: fit_prompts (batched) {rate(len(qs), tf)}; fit_prompt (reference) "
              f"{rate(len(sub), tr)}; ratio {speed_f / speed_r:.2f}x")
        results[name] = statistics.mean(c5)
    names = list(results)
    print(f"\nKimi stand-in / Phi 5-shot mean tokens: {results[names[1]] / results[names[0]]:.3f}")
    try:
        import mlx.core as mx

        mlx_peak = f"{mx.get_peak_memory() / 2**20:.1f} MiB (no MLX arrays in this benchmark)"
    except Exception as e:  # mlx missing or no device: the data layer itself does not need it
        mlx_peak = f"unavailable ({type(e).__name__})"
    print(f"peak memory: MLX {mlx_peak}; process peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
