"""Small shared helpers: user errors, byte sizes, atomic writes, config merging, model paths.

Every CLI in kd_mlx turns a `KDError` into one line on stderr and exit code 1 (see `cli_errors`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click


class KDError(Exception):
    """A user-facing error: printed as one line, exit status 1, no traceback."""


def cli_errors(fn: Callable) -> Callable:
    """Decorator for click commands: KDError (and missing files) become one-line errors."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KDError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except FileNotFoundError as e:
            click.echo(f"error: file not found: {e.filename or e}", err=True)
            sys.exit(1)

    return wrapper


_SIZE_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12,
               "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'16GB' -> 16e9, '4GiB' -> 4*2**30, 1024 -> 1024. Raises KDError on nonsense."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise KDError(f"cannot read size {text!r} (examples: 16GB, 4GiB, 512MB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str | bytes) -> str:
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def load_yaml_config(path: str | os.PathLike | None) -> dict:
    """Read a YAML config (flat or nested dict). Missing/invalid file -> KDError."""
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KDError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KDError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KDError(f"config {p} must be a mapping of keys to values")
    return data


def merge_config(file_config: dict, cli_values: dict, defaults: dict) -> dict:
    """Command-line flags the user actually set win over the YAML file, which wins over defaults.

    `cli_values` holds only the flags given explicitly (None for not given)."""
    unknown = set(file_config) - set(defaults)
    if unknown:
        raise KDError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    out = dict(defaults)
    out.update(file_config)
    out.update({k: v for k, v in cli_values.items() if v is not None})
    return out


def resolve_model_path(path_or_repo: str, allow_patterns: list[str] | None = None,
                       revision: str | None = None) -> Path:
    """A local directory is used as is; anything else is a hub repo id fetched with huggingface_hub."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise KDError(f"model path {p} is not a directory")
        return p
    if path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise KDError(f"model directory not found: {path_or_repo}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:  # network errors, missing repos: one line for the user
        raise KDError(f"cannot fetch {path_or_repo} from the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def linux_blas_advice() -> str | None:
    """On Linux, MLX's CPU wheel ships a slow reference BLAS; preloading OpenBLAS is ~100x faster for fp32."""
    if sys.platform != "linux" or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None
    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    hint = f"LD_PRELOAD={lib}" if os.path.exists(lib) else "apt-get install libopenblas0-pthread, then LD_PRELOAD=<its libblas.so.3>"
    return f"note: MLX on Linux CPU uses a slow reference BLAS; for ~100x faster fp32 matmuls run with {hint}"
