"""`python -m kd_mlx <stage> [ARGS]` (also the `kd-mlx` console script): runs one stage's CLI.

    python -m kd_mlx demo [--out demo_out] [--quick]      the whole pipeline on a controlled task, no downloads
    python -m kd_mlx data split --data CMMLU_DIR --out splits.json
    python -m kd_mlx teacher dump --teacher DIR --data CMMLU_DIR --splits splits.json --out store/
    python -m kd_mlx train --student DIR --store store/ --data CMMLU_DIR --splits splits.json --out run/
    python -m kd_mlx eval --model DIR --adapters run/best --data CMMLU_DIR --splits splits.json --out res/

`python -m kd_mlx <stage>` and `python -m kd_mlx.<stage>` are the same command. Only the chosen stage's module is
imported, so each stage imports what it needs at module level. A new stage is a module (or package with `cli.py`)
with a `main()` and one line in `STAGES`.
"""

from __future__ import annotations

import importlib
import sys

# stage -> (module whose main() runs it, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "data": ("kd_mlx.data.cli", "CMMLU: show a prompt, make leak-free train/val/test splits"),
    "teacher": ("kd_mlx.teacher.cli", "the streamed teacher: inspect, convert, score, dump the logits store"),
    "store": ("kd_mlx.store", "check (verify) or show a logits store"),
    "train": ("kd_mlx.train.cli", "distil the store into the student (LoRA or full), resume, sweep"),
    "eval": ("kd_mlx.eval", "CMMLU accuracy under the official protocol"),
    "report": ("kd_mlx.report", "Markdown report and plots from eval results"),
    "export": ("kd_mlx.export", "fuse adapters, quantize, serve, ask one question"),
    "prune": ("kd_mlx.prune", "structured pruning of the student (layers, MLP channels, heads) by importance"),
    "demo": ("kd_mlx.demo", "the whole pipeline on a controlled task, no downloads"),
}
# shortcuts: `python -m kd_mlx ask ...` = `python -m kd_mlx export ask ...`
ALIASES: dict[str, list[str]] = {"ask": ["export", "ask"]}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: python -m kd_mlx <stage> [ARGS]   (python -m kd_mlx <stage> --help for its options)", "",
             "kd_mlx: distil a teacher larger than memory into a small student (MLX).", "", "stages:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
    lines += [f"  {name:<{width}}  = {' '.join(target)}" for name, target in ALIASES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    args = ALIASES.get(args[0], args[:1]) + args[1:]
    stage = args[0]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; one of: {', '.join(list(STAGES) + list(ALIASES))}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(STAGES[stage][0])
    sys.argv = [stage, *args[1:]]  # click then names the program "python -m kd_mlx.<stage>"
    module.main()


if __name__ == "__main__":
    main()
