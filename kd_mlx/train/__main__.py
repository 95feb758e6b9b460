"""`python -m kd_mlx.train ...` (see kd_mlx/train/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="python -m kd_mlx.train")
