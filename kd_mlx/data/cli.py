"""`python -m kd_mlx.data show|split`: see the exact prompt a model gets; write leak-free splits.

    python -m kd_mlx.data show --data ../shared/cmmlu --subject agronomy --index 0 --shots 5 \
        --tokenizer MODEL_DIR --max-tokens 2048
    python -m kd_mlx.data split --data ../shared/cmmlu --out splits.json --seed 0 --val 0.1 --test 0.2

`--data` is a directory in the official layout (dev/ test/, optionally transfer/ and subjects.json), a zip of it,
or a hub dataset id (haonan-li/cmmlu). `show` writes the prompt, byte for byte, on stdout and nothing else; token
counts and notes go to stderr. `--tokenizer` is a model or tokenizer directory (`kd_mlx.tokenizer.load_tokenizer`),
e.g. the student's. `split` never replaces an existing splits.json with different content unless `--overwrite`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..tokenizer import load_tokenizer
from ..utils import KDError, cli_errors, config_int, load_yaml_config, merge_config, write_json_atomic
from .loader import CMMLU, SPLITS, TRANSFER, load_cmmlu
from .prompt import Prompt, fit_prompt
from .splits import SPLIT_NAMES, make_splits

SHOW_DEFAULTS = {"data": None, "subject": None, "index": 0, "shots": 5, "tokenizer": None, "max_tokens": None,
                 "cot": False, "skip_bad": False}
SPLIT_DEFAULTS = {"data": None, "out": None, "seed": 0, "val": 0.1, "test": 0.2, "skip_bad": False,
                  "overwrite": False}


def load_named_tokenizer(name: str):
    """A model or tokenizer directory's tokenizer."""
    p = Path(name).expanduser()
    if not p.is_dir():
        raise KDError(f"tokenizer directory not found: {name} (give a model or tokenizer directory, e.g. the "
                      f"student's)")
    return load_tokenizer(p)


def _report_skipped(cmmlu: CMMLU) -> None:
    if cmmlu.skipped:
        click.echo(f"skipped {len(cmmlu.skipped)} bad row(s):", err=True)
        for s in cmmlu.skipped:
            click.echo(f"  {s}", err=True)


def show_prompt(cfg: dict) -> tuple[Prompt, int | None]:
    """The prompt `show` prints, and its token count when a tokenizer is configured."""
    if not cfg["data"]:
        raise KDError("--data is required (a CMMLU directory, zip or hub id)")
    if not cfg["subject"]:
        raise KDError("--subject is required")
    if cfg["max_tokens"] is not None and not cfg["tokenizer"]:
        raise KDError("--max-tokens needs --tokenizer (tokens are counted with it)")
    cmmlu = load_cmmlu(cfg["data"], skip_bad=cfg["skip_bad"], progress=sys.stderr.isatty())
    _report_skipped(cmmlu)
    tok = load_named_tokenizer(cfg["tokenizer"]) if cfg["tokenizer"] else None
    return question_prompt(cmmlu, cfg["subject"], int(cfg["index"]), int(cfg["shots"]), tok, cfg["max_tokens"],
                           bool(cfg["cot"]))


def question_prompt(cmmlu: CMMLU, subject: str, index: int, shots: int, tokenizer=None,
                    max_tokens: int | None = None, cot: bool = False) -> tuple[Prompt, int | None]:
    """The (fitted) prompt of test row `index` of `subject`, and its token count under `tokenizer` if given."""
    if subject not in cmmlu.test:
        raise KDError(f"subject {subject!r} has no test file in {cmmlu.source}")
    rows = cmmlu.test[subject]
    if not 0 <= index < len(rows):
        raise KDError(f"--index {index} out of range: {subject} has {len(rows)} test questions (0..{len(rows) - 1})")
    count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else None
    prompt = fit_prompt(rows[index], cmmlu.dev.get(subject, []), shots, count, max_tokens, cot=cot)
    return prompt, (count(prompt.text) if count else None)


def write_splits(cfg: dict) -> dict:
    """Make the splits and write them (and the final config beside them). Returns the splits."""
    if not cfg["data"]:
        raise KDError("--data is required (a CMMLU directory, zip or hub id)")
    if not cfg["out"]:
        raise KDError("--out is required (where to write splits.json)")
    out = Path(cfg["out"])
    if out.is_dir():
        raise KDError(f"--out {out} is a directory: give the file to write, e.g. {out / 'splits.json'}")
    data = Path(cfg["data"]).expanduser()
    if data.is_dir() and (any(out.resolve().parent == (data / s).resolve() for s in SPLITS)
                          or out.resolve() == (data / "subjects.json").resolve()):
        raise KDError(f"--out {out} is inside the data's own files: write splits.json elsewhere")
    seed = config_int(cfg, "seed")
    fractions = {}
    for key in ("val", "test"):
        try:
            fractions[key] = float(cfg[key])
        except (TypeError, ValueError):
            raise KDError(f"{key} must be a fraction such as 0.1, got {cfg[key]!r}") from None
    previous = _read_previous(out)
    cmmlu = load_cmmlu(cfg["data"], skip_bad=cfg["skip_bad"], progress=sys.stderr.isatty())
    _report_skipped(cmmlu)
    splits = make_splits(cmmlu, seed=seed, val=fractions["val"], test=fractions["test"])
    splits["source"] = cmmlu.source
    if previous is not None and previous != splits and not cfg["overwrite"]:
        moved = _moved_to_evaluation(previous, splits)
        raise KDError(f"{out} exists with other splits ({moved} earlier training question(s) would become val/test "
                      f"questions): keep it, write elsewhere, or pass --overwrite (then retrain: old runs saw them)")
    write_json_atomic(out, splits)
    write_json_atomic(out.with_name(out.stem + ".config.json"), {**cfg, "out": str(out)})
    return splits


def _read_previous(out: Path) -> dict | None:
    if not out.exists():
        return None
    try:
        return json.loads(out.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}  # not a splits file: differs from any new one


def _moved_to_evaluation(previous: dict, new: dict) -> int:
    old_train = set(previous.get("train", [])) | set(previous.get(TRANSFER, []))
    return sum(1 for s in ("val", "test") for i in new.get(s, []) if i in old_train)


@click.group()
def main() -> None:
    """CMMLU data: show prompts, make leak-free splits."""


@main.command()
@click.option("--config", "config_path", type=click.Path(), default=None, help="YAML config (flags win).")
@click.option("--data", default=None, help="CMMLU directory (dev/ test/), zip, or hub dataset id.")
@click.option("--subject", default=None, help="Subject, e.g. agronomy.")
@click.option("--index", type=int, default=None, help="0-based row of the subject's test file. [default: 0]")
@click.option("--shots", type=int, default=None, help="Few-shot examples from dev/. [default: 5]")
@click.option("--tokenizer", default=None, help="A model or tokenizer directory (e.g. the student's).")
@click.option("--max-tokens", type=int, default=None, help="Drop the longest shots until the prompt fits.")
@click.option("--cot/--no-cot", default=None, help="Chain-of-thought variant of the prompt.")
@click.option("--skip-bad/--no-skip-bad", default=None, help="Skip bad rows (listed on stderr) instead of failing.")
@cli_errors
def show(config_path, **flags) -> None:
    """Print the exact prompt for one test question on stdout (token count on stderr)."""
    cfg = merge_config(load_yaml_config(config_path), flags, SHOW_DEFAULTS)
    prompt, n_tokens = show_prompt(cfg)
    sys.stdout.buffer.write(prompt.text.encode("utf-8"))
    sys.stdout.flush()
    if n_tokens is not None:
        note = f"tokens: {n_tokens}; shots: {prompt.shots}/{cfg['shots']}"
        if cfg["max_tokens"] is not None:
            note += f"; max_tokens: {cfg['max_tokens']}"
        click.echo(note, err=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(), default=None, help="YAML config (flags win).")
@click.option("--data", default=None, help="CMMLU directory (dev/ test/), zip, or hub dataset id.")
@click.option("--out", default=None, help="Output splits.json (its config goes to <stem>.config.json).")
@click.option("--seed", type=int, default=None, help="Seed of the content hash ordering. [default: 0]")
@click.option("--val", type=float, default=None, help="Validation fraction per subject. [default: 0.1]")
@click.option("--test", type=float, default=None, help="Test fraction per subject. [default: 0.2]")
@click.option("--skip-bad/--no-skip-bad", default=None, help="Skip bad rows (listed on stderr) instead of failing.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing --out holding other splits.")
@cli_errors
def split(config_path, **flags) -> None:
    """Stratified, content-deterministic train/val/test split of the CMMLU test set."""
    cfg = merge_config(load_yaml_config(config_path), flags, SPLIT_DEFAULTS)
    splits = write_splits(cfg)
    sizes = ", ".join(f"{s} {len(splits[s])}" for s in SPLIT_NAMES)
    click.echo(f"wrote {cfg['out']}: {sizes} ({len(splits['counts'])} subjects)")


if __name__ == "__main__":
    main()
