"""Benchmark: the exported (fused) student against the streamed teacher, on the same CMMLU prompts.

    python benchmarks/bench_export.py                      # defaults below, ~2-4 min on 2 CPU cores
    python benchmarks/bench_export.py --prompts 2 --teacher-gen 1 --student-gen 16   # quicker

What runs: a Phi-shaped student (tiny_phi_dir, LoRA adapters made with mlx-lm's tuner, fused by
`kd_mlx.export.export_model`, fp32 and 4-bit exports) and a Kimi-K2-shaped teacher (tiny_kimi_k2_dir, 4-bit, many
more parameters than the student) run by `kd_mlx.teacher.StreamingTeacher` under a memory budget smaller than its
weights. Both read the same prompt texts (official 0-shot CMMLU prompts from KD_MLX_CMMLU, default ../shared/cmmlu,
else built-in questions), each through its own tokenizer. Each side runs in its own process, so peak RSS is its own.

Measured per side: prompt processing tokens/s (student: mlx_lm.stream_generate's prompt phase, one prompt at a
time; teacher: one `logprobs_at` pass over all prompts), generation tokens/s (student: stream_generate with its KV
cache, greedy; teacher: greedy, one streamed pass over all weights per new token, as the teacher has no resident
KV cache), `mx.get_peak_memory()` and the process's peak RSS. Printed: the figures and the student/teacher ratios.
No thresholds: the seed expects 50-100x at real sizes (1.3B student in memory vs a 577 GB teacher streamed from
disk); at these toy sizes the ratio mostly reflects the teacher's per-pass streaming overhead and its larger width.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kd_mlx.utils import peak_rss_bytes  # noqa: E402  (this checkout's kd_mlx, inserted above)

FALLBACK_QUESTIONS = [
    ("中国的首都是哪座城市？", ("上海", "北京", "广州", "深圳"), "elementary_mathematics"),
    ("水在标准大气压下的沸点是多少摄氏度？", ("100", "90", "80", "120"), "high_school_physics"),
    ("《红楼梦》的作者是谁？", ("曹雪芹", "罗贯中", "施耐庵", "吴承恩"), "chinese_literature"),
    ("光合作用主要吸收哪种气体？", ("氧气", "氮气", "氢气", "二氧化碳"), "high_school_biology"),
    ("三角形的内角和是多少度？", ("90度", "360度", "180度", "270度"), "elementary_mathematics"),
    ("熊猫主要吃什么？", ("鱼", "竹子", "苹果", "米饭"), "college_education"),
    ("地球绕太阳一周大约需要多久？", ("一天", "一个月", "一年", "十年"), "astronomy"),
    ("人体最大的器官是什么？", ("心脏", "皮肤", "肝脏", "大脑"), "anatomy"),
]


def prompt_texts(n: int) -> tuple[list[str], str]:
    """n official 0-shot prompts: the first question of the first n subjects of the real CMMLU test split."""
    from kd_mlx.data import Question, build_prompt, load_cmmlu

    cm = Path(os.environ.get("KD_MLX_CMMLU", REPO.parent / "shared" / "cmmlu"))
    if (cm / "test").is_dir():
        data = load_cmmlu(cm)
        subjects = sorted(data.test)[:n]
        return [build_prompt(data.test[s][0], []).text for s in subjects], f"CMMLU test ({cm.name}), first question of {subjects}"
    out = []
    for i, (q, ch, subj) in enumerate(FALLBACK_QUESTIONS[:n]):
        out.append(build_prompt(Question(f"{subj}/x/{i}", subj, "test", i, q, ch, "A"), []).text)
    return out, "built-in questions (CMMLU not found)"


# ------------------------------------------------------------------------------------------------ building

def build_models(work: Path, args) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    from kd_mlx.export import export_model
    from kd_mlx.testing import tiny_kimi_k2_dir, tiny_phi_dir

    student = tiny_phi_dir(work / "student", hidden=args.student_hidden, n_layers=args.student_layers,
                           heads=args.student_hidden // 32)
    # adapters in mlx-lm's format, with non-zero B so the fuse is not a no-op
    lora = {"rank": 8, "scale": 2.0, "dropout": 0.0}
    model, _ = load_model(student)
    model.freeze()
    linear_to_lora_layers(model, args.student_layers, lora)
    mx.random.seed(1)
    model.load_weights([(k, mx.random.normal(v.shape) * 0.02) for k, v in tree_flatten(model.trainable_parameters())
                        if k.endswith("lora_b")], strict=False)
    best = work / "run" / "best"
    best.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(best / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (best / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": args.student_layers,
                                                          "lora_parameters": lora}))
    del model
    fp32 = export_model(str(student), best, work / "student-fused", overwrite=True)
    q4 = export_model(str(student), best, work / "student-fused-q4", quantize=4, group_size=64, overwrite=True)
    teacher = tiny_kimi_k2_dir(work / "teacher", bits=4, n_layers=args.teacher_layers, hidden=args.teacher_hidden,
                               n_routed_experts=args.teacher_experts, experts_per_tok=8, group_size=64, n_shards=4)
    return {"student-fp32": fp32.path, "student-q4": q4.path, "teacher": teacher}


def model_size(d: Path) -> dict:
    nbytes = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    bits = (cfg.get("quantization") or {}).get("bits")
    return {"file_bytes": nbytes, "bits": bits or 32, "config": {k: cfg[k] for k in (
        "model_type", "hidden_size", "num_hidden_layers", "vocab_size", "n_routed_experts", "num_experts_per_tok")
        if k in cfg}}


# ------------------------------------------------------------------------------------------------ sides

def run_student(model_dir: Path, texts: list[str], gen: int) -> dict:
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    from kd_mlx.tokenizer import load_tokenizer

    model, tok = load(str(model_dir))
    model.set_dtype(mx.float32)  # CPU: fp32 activations (bf16/fp16 are slow there)
    kd_tok = load_tokenizer(model_dir)
    seqs = [kd_tok.encode(t) for t in texts]
    # warm-up (first-call compilation / allocation)
    for _ in stream_generate(model, tok, prompt=seqs[0][:16], max_tokens=2):
        pass
    mx.reset_peak_memory()
    p_tok = p_s = g_tok = g_s = 0.0
    for s in seqs:
        last = None
        for last in stream_generate(model, tok, prompt=s, max_tokens=gen):
            pass
        p_tok += last.prompt_tokens
        p_s += last.prompt_tokens / last.prompt_tps
        if last.generation_tokens > 1:  # the first generated token comes with the prompt pass
            g_tok += last.generation_tokens - 1
            g_s += (last.generation_tokens - 1) / last.generation_tps
    return {"prompt_tokens": int(p_tok), "prompt_s": p_s, "prompt_tps": p_tok / p_s,
            "gen_tokens": int(g_tok), "gen_s": g_s, "gen_tps": g_tok / g_s if g_s else None,
            "mx_peak_bytes": mx.get_peak_memory(), "peak_rss_bytes": peak_rss_bytes()}


def run_teacher(model_dir: Path, texts: list[str], gen: int, gen_prompts: int, budget: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from kd_mlx.teacher import StreamingTeacher

    t = StreamingTeacher(model_dir, budget)
    seqs = [t.tokenizer.encode(x) for x in texts]
    t.logprobs_at([seqs[0][:8]], [[7]])  # warm-up
    mx.reset_peak_memory()
    read0 = t.stats.bytes_read
    t0 = time.perf_counter()
    t.logprobs_at(seqs, [[len(s) - 1] for s in seqs], reduce=lambda lp, _: int(np.argmax(lp[-1])))
    p_s = time.perf_counter() - t0
    p_read = t.stats.bytes_read - read0
    g_tok, t0 = 0, time.perf_counter()
    for s in seqs[:gen_prompts]:
        s = list(s)
        for _ in range(gen):  # greedy: every new token is one more streamed pass over all the weights
            nxt = t.logprobs_at([s], [[len(s) - 1]], reduce=lambda lp, _: int(np.argmax(lp[-1])))[0]
            s.append(nxt)
            g_tok += 1
    g_s = time.perf_counter() - t0
    p_tok = sum(len(s) for s in seqs)
    return {"prompt_tokens": p_tok, "prompt_s": p_s, "prompt_tps": p_tok / p_s, "prompt_bytes_read": p_read,
            "gen_tokens": g_tok, "gen_s": g_s, "gen_tps": g_tok / g_s if g_s else None,
            "budget_bytes": budget, "mx_peak_bytes": mx.get_peak_memory(), "peak_rss_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------------------------------------ driver

def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--student-gen", type=int, default=32, help="tokens generated per prompt by the student")
    ap.add_argument("--teacher-gen", type=int, default=2, help="tokens generated per prompt by the teacher")
    ap.add_argument("--teacher-gen-prompts", type=int, default=1, help="prompts the teacher generates for")
    ap.add_argument("--budget", default="48MB", help="teacher memory budget")
    ap.add_argument("--student-hidden", type=int, default=256)
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--teacher-experts", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="keep the built models here (default: a temp dir)")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from kd_mlx.utils import linux_blas_advice, parse_bytes

    if args.side:
        spec = json.loads(Path(args.spec).read_text())
        if args.side == "teacher":
            res = run_teacher(Path(spec["model"]), spec["texts"], args.teacher_gen, args.teacher_gen_prompts,
                              parse_bytes(args.budget))
        else:
            res = run_student(Path(spec["model"]), spec["texts"], args.student_gen)
        print("RESULT " + json.dumps(res))
        return

    if advice := linux_blas_advice():
        print(advice)
    import mlx.core as mx

    work_ctx = tempfile.TemporaryDirectory(prefix="bench_export_") if args.workdir is None else None
    work = Path(args.workdir or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = build_models(work, args)
    texts, source = prompt_texts(args.prompts)
    print(f"built models in {time.perf_counter() - t0:.1f} s; prompts: {len(texts)} from {source}; "
          f"device {mx.default_device()}")
    results, sizes = {}, {}
    passthrough = ["--student-gen", str(args.student_gen), "--teacher-gen", str(args.teacher_gen),
                   "--teacher-gen-prompts", str(args.teacher_gen_prompts), "--budget", args.budget]
    for name, d in dirs.items():
        sizes[name] = model_size(d)
        spec = work / f"{name}.json"
        spec.write_text(json.dumps({"model": str(d), "texts": texts}, ensure_ascii=False))
        side = "teacher" if name == "teacher" else "student"
        cmd = [sys.executable, __file__, *passthrough, "--side", side, "--spec", str(spec)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[-1][7:])

    print("\nsizes:")
    for name, s in sizes.items():
        print(f"  {name:14s} {mib(s['file_bytes']):>11s} on disk, {s['bits']}-bit, {s['config']}")
    print(f"  teacher memory budget: {args.budget}\n")
    print(f"{'model':14s} {'prompt tok/s':>13s} {'gen tok/s':>10s} {'mx peak':>11s} {'peak RSS':>11s}  details")
    for name, r in results.items():
        gen = f"{r['gen_tps']:.1f}" if r["gen_tps"] else "-"
        extra = (f"{r['prompt_tokens']} prompt tokens, {r['gen_tokens']} generated"
                 + (f", {mib(r['prompt_bytes_read'])} read per prompt pass" if "prompt_bytes_read" in r else ""))
        print(f"{name:14s} {r['prompt_tps']:13.1f} {gen:>10s} {mib(r['mx_peak_bytes']):>11s} "
              f"{mib(r['peak_rss_bytes']):>11s}  {extra}")
    t = results["teacher"]
    print("\nratios (student / streamed teacher, same prompt texts):")
    for name in ("student-fp32", "student-q4"):
        r = results[name]
        gen = f"{r['gen_tps'] / t['gen_tps']:.1f}x" if r["gen_tps"] and t["gen_tps"] else "-"
        print(f"  {name:14s} prompt processing {r['prompt_tps'] / t['prompt_tps']:.1f}x in tokens/s "
              f"({t['prompt_s'] / r['prompt_s']:.1f}x in time for the same {len(texts)} texts), generation {gen}, "
              f"mx peak memory {r['mx_peak_bytes'] / t['mx_peak_bytes']:.2f}x, peak RSS "
              f"{r['peak_rss_bytes'] / t['peak_rss_bytes']:.2f}x")
    if work_ctx is not None:
        work_ctx.cleanup()


if __name__ == "__main__":
    main()
