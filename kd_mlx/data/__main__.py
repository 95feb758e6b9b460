"""`python -m kd_mlx.data show|split` (see kd_mlx/data/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
