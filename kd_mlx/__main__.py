"""`python -m kd_mlx <command>` (also the `kd-mlx` console script).

    python -m kd_mlx demo [--out demo_out] [--quick]      the whole pipeline on a controlled task, no downloads

    python -m kd_mlx ask MODEL "题目：…\nA. …\nB. …\nC. …\nD. …" [--subject SUBJ]
    python -m kd_mlx export --student DIR --adapters RUN/best --out MODEL    (= python -m kd_mlx.export ...)

To add a command: write it as a click command in its module, keep that module's top-level imports light (import
mlx and friends inside functions, so `--help` and unrelated commands stay fast), and register it below with
`main.add_command(...)`.
"""

from __future__ import annotations

import click

main = click.Group(name="kd_mlx", help="kd_mlx: distil a teacher larger than memory into a small student (MLX).")


def _register() -> None:
    # Each import below is cheap: the command modules import mlx only when a command runs.
    from .demo import demo_cmd
    from .export import ask_cmd, cli as export_cli

    main.add_command(demo_cmd, "demo")
    main.add_command(ask_cmd, "ask")
    main.add_command(export_cli, "export")


_register()

if __name__ == "__main__":
    main(prog_name="python -m kd_mlx")
