"""python -m kd_mlx.teacher inspect|score|convert|dump"""

from .cli import main

if __name__ == "__main__":
    main()
