"""Small shared helpers: user errors, byte sizes, atomic writes, output directories, config merging, model paths.

Every CLI in kd_mlx turns a `KDError` into one line on stderr and exit code 1 (see `cli_errors`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import click
import yaml


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


# ----------------------------------------------------------------------------------------------- output directories
OUTPUT_MARKER = ".kd_mlx_output.json"  # {"kind", "identity", "argv"}: what wrote a directory, with which settings

# How a directory without a marker is recognised, to name what is there (first match wins): kind, files that must
# all exist, description.
_KNOWN_LAYOUTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("train", ("metrics.jsonl",), "a training run"),
    ("train", ("checkpoints",), "a training run"),
    ("dump", ("manifest.json",), "a logits store"),
    ("export", ("kd_mlx_export.json",), "an exported model"),
    ("eval", ("summary.json", "subjects"), "evaluation results"),
    ("report", ("report.md",), "a report"),
    ("adapters", ("adapter_config.json",), "trained adapters"),
    ("model", ("config.json", "*.safetensors"), "a model directory"),
    ("data", ("dev", "test"), "a CMMLU data directory"),
)


def read_output_marker(path: str | os.PathLike) -> dict | None:
    """The marker kd_mlx leaves in each output directory, or None (absent or unreadable)."""
    try:
        marker = json.loads((Path(path) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def describe_dir(path: str | os.PathLike) -> tuple[str | None, str]:
    """(kind, words) for what a directory holds: its marker's kind, else a guess from the files in it."""
    p = Path(path)
    marker = read_output_marker(p)
    names = sorted(x.name for x in p.iterdir() if x.name != OUTPUT_MARKER)
    listing = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
    if marker is not None:
        words = next((w for k, _, w in _KNOWN_LAYOUTS if k == marker["kind"]), f"kd_mlx {marker['kind']} output")
        return marker["kind"], f"{words} ({listing})"
    for kind, needs, words in _KNOWN_LAYOUTS:
        if all(any(p.glob(n)) for n in needs):
            return kind, f"{words} ({listing})"
    return None, f"{len(names)} {'entry' if len(names) == 1 else 'entries'} ({listing})"


def _json_identity(identity: Any) -> Any:
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _input_relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def prepare_output_dir(out: str | os.PathLike, kind: str, identity: dict, inputs: Iterable[Any] = (),
                       overwrite: bool = False, resume: bool = False) -> str:
    """Check an output directory against the one rule for every kd_mlx output, before any compute.

    `out` may be written when it is absent or an empty directory ("new"); when it holds the output of the same
    `kind` (its `.kd_mlx_output.json` marker) with the same `identity` (a JSON-able dict of the settings that
    determine the result), a stage that continues its work passes `resume=True` and gets "resume"; with
    `overwrite=True` an earlier output of the same kind (any identity, or a marker-less directory of that kind's
    layout) may be replaced ("replace"). Everything else is refused with a one-line KDError naming what is there:
    another kind of output, a directory kd_mlx did not write, a file. `out` is refused whatever the flags when it
    is, contains or lies inside one of `inputs` (local paths, symlinks resolved; None and hub ids are skipped), so
    `--overwrite` can never delete an input. Returns "new", "resume" or "replace". The caller writes the marker
    with `write_output_marker` (or builds the directory with `staged_output_dir`)."""
    out_p = Path(out).expanduser()
    real = out_p.resolve()
    for inp in inputs:
        if inp is None or not Path(inp).expanduser().exists():
            continue
        rel = _input_relation(real, Path(inp).expanduser().resolve())
        if rel:
            raise KDError(f"output {out_p} {rel} the input {inp}: choose an --out outside every input")
    if not out_p.exists():
        return "new"
    if not out_p.is_dir():
        raise KDError(f"output {out_p} is a file, not a directory: choose another --out")
    if not any(out_p.iterdir()):
        return "new"
    there, words = describe_dir(out_p)
    marker = read_output_marker(out_p)
    if there != kind:
        raise KDError(f"output {out_p} holds {words}, not kd_mlx {kind} output: choose another --out "
                      f"(--overwrite never replaces another kind of directory)")
    same = marker is not None and _json_identity(marker.get("identity")) == _json_identity(identity)
    if same and resume:
        return "resume"
    if overwrite:
        return "replace"
    if same:
        raise KDError(f"output {out_p} already holds this {kind} output (same settings): pass --overwrite to "
                      f"replace it, or choose another --out")
    if marker is None:
        raise KDError(f"output {out_p} holds {words} of unknown settings: pass --overwrite to replace it, or "
                      f"choose another --out")
    old = marker.get("identity") if isinstance(marker.get("identity"), dict) else {}
    diff = sorted(k for k in set(old) | set(identity)
                  if _json_identity(old.get(k)) != _json_identity(identity.get(k)))
    raise KDError(f"output {out_p} holds {kind} output made with other settings (differs in: "
                  f"{', '.join(diff) or 'identity'}): pass --overwrite to replace it, or choose another --out")


def write_output_marker(directory: str | os.PathLike, kind: str, identity: dict) -> None:
    """Record in `directory` which command wrote it, with which identity (read by `prepare_output_dir`)."""
    write_json_atomic(Path(directory) / OUTPUT_MARKER,
                      {"kind": kind, "identity": _json_identity(identity), "argv": list(sys.argv)})


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished directory `tmp` onto `out`; an existing `out` is removed only after the swap."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    if old.is_symlink():  # `out` was a link: the link goes, the directory it pointed to is left as it was
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_output_dir(out: str | os.PathLike, kind: str, identity: dict) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; when the block succeeds, write the marker into it and
    rename it onto `out` (replacing what `prepare_output_dir` allowed). On failure nothing at `out` changes."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        write_output_marker(tmp, kind, identity)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def path_identity(path: str | os.PathLike | None) -> str | None:
    """A path as it goes into an output identity: absolute, symlinks resolved (hub ids and None unchanged)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


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


def config_int(cfg: dict, key: str, minimum: int | None = None) -> int | None:
    """cfg[key] as an int (None stays None), KDError naming the setting when it is not a whole number >= minimum.
    YAML gives strings and floats where a user mistypes: they are refused here, before any compute."""
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v))):
        raise KDError(f"{key} must be a whole number, got {v!r}")
    n = int(v)
    if minimum is not None and n < minimum:
        raise KDError(f"{key} must be >= {minimum}, got {n}")
    return n


def is_hub_id(s: str) -> bool:
    """`owner/name` and not a local path: a mistyped local path (its first part exists here) is no hub id."""
    return (not Path(s).expanduser().exists() and not s.startswith((".", "/", "~")) and s.count("/") == 1
            and all(s.split("/")) and not Path(s.split("/")[0]).exists())


def cache_dir() -> Path:
    """kd_mlx's cache: $KD_MLX_CACHE, else $XDG_CACHE_HOME/kd_mlx, else ~/.cache/kd_mlx."""
    base = os.environ.get("KD_MLX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                          or os.path.expanduser("~/.cache"), "kd_mlx")
    return Path(base)


def use_one_malloc_arena() -> None:
    """glibc only: threads that start allocating from now on share one malloc arena. By default glibc gives each
    allocating thread an arena of its own (up to 8 per core) and each keeps the blocks freed in it, so a process
    whose threads take turns with large buffers (the streaming executor's reader, task and MLX threads) holds every
    arena's peak at once. Measured on bench_teacher (b), 64 prompts, deepseek_v3, budget 1.08 GiB: peak RSS
    1.44 GiB with the default, 1.09 GiB with one arena, same speed (28.2-28.6 s vs 28.4-29.8 s); a fixed 128 KiB
    mmap threshold instead kept 0.94 GiB but took 36 s (fresh pages for every large buffer). No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(ctypes.c_int(-8), ctypes.c_int(1))  # M_ARENA_MAX
    except (OSError, AttributeError):  # another C library (musl): nothing to set
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes. Linux: VmHWM of its own address space (ru_maxrss survives
    exec, so a process started by a large parent would report the parent's RSS); macOS: ru_maxrss (bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def resolve_model_path(path_or_repo: str, allow_patterns: list[str] | None = None,
                       revision: str | None = None) -> Path:
    """A local directory is used as is; anything else is a hub repo id fetched with huggingface_hub."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise KDError(f"model path {p} is not a directory")
        return p
    if not is_hub_id(path_or_repo):
        raise KDError(f"model directory not found: {path_or_repo}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:  # network errors, missing repos: one line for the user
        raise KDError(f"cannot fetch {path_or_repo} from the hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _openblas_loaded() -> bool:
    """Whether an OpenBLAS library is mapped into this process (however it was preloaded; a preload variable that
    names a missing file loads nothing)."""
    try:
        with open("/proc/self/maps") as f:
            return any("openblas" in line.lower() for line in f)
    except OSError:
        return "openblas" in os.environ.get("LD_PRELOAD", "").lower()


def linux_blas_advice() -> str | None:
    """On Linux, MLX's CPU wheel ships a slow reference BLAS; preloading OpenBLAS is ~100x faster for fp32."""
    if sys.platform != "linux" or _openblas_loaded():
        return None
    lib = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    hint = f"LD_PRELOAD={lib}" if os.path.exists(lib) else "apt-get install libopenblas0-pthread, then LD_PRELOAD=<its libblas.so.3>"
    return f"note: MLX on Linux CPU uses a slow reference BLAS; for ~100x faster fp32 matmuls run with {hint}"
