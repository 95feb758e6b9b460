"""Rewrite README.md's list of streamed teacher families from the families tests/test_teacher_families.py runs.

    python scripts/readme_families.py
"""

import re
from pathlib import Path

from kd_mlx.testing.models import families_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text(encoding="utf-8")
    new = re.sub(r"(<!-- families:start -->\n).*?(<!-- families:end -->)",
                 lambda m: m.group(1) + families_markdown() + m.group(2), text, flags=re.S)
    README.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
