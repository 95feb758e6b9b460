"""Download the real models for the full run: Kimi-K2-Base as MLX 4-bit shards (+ its tokenizer) and Phi-1.5
converted to MLX with mlx-lm.

    python scripts/download_models.py --out models/                 # both (teacher ~577 GB, student ~2.8 GB)
    python scripts/download_models.py --out models/ --only student  # Phi-1.5 only
    python scripts/download_models.py --out models/ --teacher-source fp8   # FP8 original + kd_mlx convert

Teacher, `--teacher-source mlx` (default): `snapshot_download` of an MLX 4-bit repo (`--teacher-repo`, default
mlx-community/Kimi-K2-Base-4bit; any mlx-lm 4-bit Kimi-K2 repo works), only the safetensors shards, the
configs and the tiktoken tokenizer. `fp8`: the block-FP8 original (moonshotai/Kimi-K2-Base, ~1 TB) is downloaded
and converted to 4-bit with `python -m kd_mlx.teacher convert` one tensor at a time (needs both on disk).
Student: `mlx_lm.convert` of microsoft/phi-1_5 (float16 weights; LoRA trains on top of them).
Files land in OUT/kimi-k2-base-4bit and OUT/phi-1_5; re-running resumes (huggingface_hub skips finished files).
No `trust_remote_code` anywhere: kd_mlx reads Kimi's tiktoken.model natively. Offline or a missing repo -> one
line on stderr and exit 1.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_mlx.utils import KDError, cli_errors, format_bytes  # noqa: E402

TEACHER_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                    "tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"]
# bytes on disk, for the free-space check (4-bit MLX: ~577 GB; FP8 original: ~1.03 TB + the converted copy)
SIZES = {"mlx": 577e9, "fp8": 1.03e12 + 577e9, "student": 2.9e9}


def _hub_error(repo: str, e: Exception) -> KDError:
    name = type(e).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return KDError(f"{repo}: not found on the hub or not accessible ({name}); pass another --teacher-repo, or "
                       f"--teacher-source fp8")
    if name in ("LocalEntryNotFoundError", "ConnectionError", "OfflineModeIsEnabled", "ConnectTimeout"):
        return KDError(f"cannot reach the Hugging Face hub for {repo} (offline?): {name}")
    return KDError(f"download of {repo} failed: {name}: {str(e).splitlines()[0] if str(e) else ''}")


def check_free_space(path: Path, need: float, force: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need and not force:
        raise KDError(f"{path} has {format_bytes(free)} free, this download needs ~{format_bytes(need)} "
                      f"(--force to try anyway)")


def download(repo: str, dest: Path, patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_dir=str(dest)))
    except Exception as e:  # every hub/network failure -> one line
        raise _hub_error(repo, e) from None


def get_teacher(out: Path, source: str, repo: str, fp8_repo: str, force: bool) -> Path:
    dest = out / "kimi-k2-base-4bit"
    check_free_space(out, SIZES[source], force)
    if source == "mlx":
        click.echo(f"teacher: {repo} (MLX 4-bit shards + tokenizer) -> {dest}")
        return download(repo, dest, TEACHER_PATTERNS)
    from kd_mlx.teacher.convert import convert_checkpoint

    raw = out / "kimi-k2-base-fp8"
    click.echo(f"teacher: {fp8_repo} (block-FP8 original) -> {raw}, then 4-bit -> {dest}")
    download(fp8_repo, raw, TEACHER_PATTERNS)
    convert_checkpoint(raw, dest, bits=4, group_size=64)
    for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (raw / name).is_file():
            shutil.copyfile(raw / name, dest / name)
    return dest


def get_student(out: Path, repo: str, force: bool) -> Path:
    dest = out / "phi-1_5"
    if (dest / "config.json").is_file():
        click.echo(f"student: {dest} exists, kept")
        return dest
    check_free_space(out, SIZES["student"], force)
    click.echo(f"student: {repo} -> mlx_lm convert -> {dest}")
    hf = download(repo, out / ".hf" / repo.replace("/", "--"),
                  ["*.json", "*.safetensors", "*.txt", "tokenizer*", "vocab.json", "merges.txt"])
    from mlx_lm import convert

    convert(hf_path=str(hf), mlx_path=str(dest))  # trust_remote_code stays off: Phi is in transformers and mlx-lm
    return dest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="models", show_default=True, help="Directory for both models.")
@click.option("--only", type=click.Choice(["teacher", "student"]), default=None, help="Download only one.")
@click.option("--teacher-source", type=click.Choice(["mlx", "fp8"]), default="mlx", show_default=True)
@click.option("--teacher-repo", default="mlx-community/Kimi-K2-Base-4bit", show_default=True,
              help="An MLX 4-bit Kimi-K2 repo (mlx-lm format).")
@click.option("--fp8-repo", default="moonshotai/Kimi-K2-Base", show_default=True, help="The FP8 original.")
@click.option("--student-repo", default="microsoft/phi-1_5", show_default=True)
@click.option("--force", is_flag=True, help="Skip the free-space check.")
@cli_errors
def main(out, only, teacher_source, teacher_repo, fp8_repo, student_repo, force):
    """Fetch Kimi-K2-Base (4-bit MLX) and Phi-1.5 (converted with mlx-lm) for the full run."""
    out_dir = Path(out)
    done = []
    if only in (None, "teacher"):
        done.append(get_teacher(out_dir, teacher_source, teacher_repo, fp8_repo, force))
    if only in (None, "student"):
        done.append(get_student(out_dir, student_repo, force))
    for d in done:
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        click.echo(f"ready: {d} ({format_bytes(size)})")


if __name__ == "__main__":
    main()
