"""Bad inputs around the logits store: each case asserts the exit status, the one-line message, and that every
input and earlier output is byte-identical afterwards (or, where the dump repairs its own output, identical to an
uninterrupted dump). Covers: corrupted shards on resume (recomputed, never laundered), header dtype flips in store
and teacher shards, manifest paths outside the store, truncated and old-version manifests, a renamed teacher
directory, training on a corrupted store, NaN answer rows.

Run: pytest tests/test_bad_inputs_store.py
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kd_mlx.data import load_cmmlu, make_splits
from kd_mlx.store import StoreWriter, TopKStore
from kd_mlx.store import cli as store_cli
from kd_mlx.teacher.cli import cli as teacher_cli
from kd_mlx.testing.models import tiny_kimi_k2_dir, tiny_phi_dir
from kd_mlx.train.cli import main as train_main
from kd_mlx.train.run import DEFAULTS, prepare
from kd_mlx.utils import KDError, write_json_atomic

SUBJECTS = ("computer_science", "high_school_biology")


def write_cmmlu(root: Path) -> Path:
    for s_i, subject in enumerate(SUBJECTS):
        for split, n in (("dev", 1), ("test", 5)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i in range(n):
                    a = 10 * s_i + i + (0 if split == "dev" else 3)
                    w.writerow([i, f"{a}加{a}等于多少？", str(2 * a), str(2 * a + 1), str(a), str(a + 2), "A"])
    return root


def files_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dump_args(w: dict, out: Path, teacher: Path | str | None = None) -> list[str]:
    return ["dump", "--teacher", str(teacher or w["teacher"]), "--data", str(w["data"]), "--shots", "1",
            "--top-k", "4", "--positions", "question", "--shard-size", "3", "--encoding", "q8rice",
            "--temperatures", "1,2", "--out", str(out), "--no-progress"]


def one_line_error(result) -> str:
    """The single line a refused command printed (asserting there is exactly one and no traceback)."""
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") or lines[0].startswith("problem: ")
    return lines[0]


def flip_header(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first `old` (inside the JSON header) by `new`, same length: a one-byte header corruption."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    i = raw.index(old, 8, 8 + n)
    raw[i:i + len(old)] = new
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_store")
    data = write_cmmlu(root / "cmmlu")
    teacher = tiny_kimi_k2_dir(root / "teacher", seed=5, n_layers=2)
    w = {"root": root, "data": data, "teacher": teacher}
    r = CliRunner().invoke(teacher_cli, dump_args(w, root / "store"))
    assert r.exit_code == 0, r.output
    cmmlu = load_cmmlu(data)
    write_json_atomic(root / "splits.json", make_splits(cmmlu, seed=0, val=0.2, test=0.2))
    w.update(store=root / "store", splits=root / "splits.json", student=tiny_phi_dir(root / "student", seed=1))
    return w


def copy_store(w, tmp_path: Path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(w["store"], out)
    return out


def train_args(w, store: Path, out: Path) -> list[str]:
    return ["--student", str(w["student"]), "--store", str(store), "--data", str(w["data"]), "--splits",
            str(w["splits"]), "--out", str(out), "--steps", "1", "--no-progress"]


# ----------------------------------------------------------------------------------------------- resume integrity
@pytest.mark.parametrize("manifest", ["kept", "gone"])
def test_resumed_dump_recomputes_a_corrupted_shard(world, tmp_path, manifest):
    """A shard with one flipped data byte (whether or not manifest.json survived) fails its own hash: the rerun
    recomputes it instead of listing it as done, and the store equals the uninterrupted dump byte for byte."""
    out = copy_store(world, tmp_path)
    shard = out / "shard-000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x04
    shard.write_bytes(bytes(raw))
    if manifest == "gone":
        (out / "manifest.json").unlink()
    bad = CliRunner().invoke(store_cli, ["verify", str(out)])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    r = CliRunner().invoke(teacher_cli, dump_args(world, out))
    assert r.exit_code == 0, r.output
    assert "1 failed their hash and are recomputed" in r.output
    assert files_bytes(out) == files_bytes(world["store"])


def test_store_header_dtype_flip(world, tmp_path):
    """answer_logprobs F32 -> I32 in a store shard's header: verify and show name it in one line; a rerun of the
    dump recomputes the shard."""
    out = copy_store(world, tmp_path)
    shard = out / "shard-000000.safetensors"
    flip_header(shard, b'"answer_logprobs":{"data_offsets":[0,48],"dtype":"F32"',
                b'"answer_logprobs":{"data_offsets":[0,48],"dtype":"I32"')
    before = files_bytes(out)
    r = CliRunner().invoke(store_cli, ["verify", str(out)])
    assert r.exit_code == 1 and "answer_logprobs has dtype I32" in r.output and "Traceback" not in r.output
    qid = TopKStore(world["store"]).ids[0]
    line = one_line_error(CliRunner().invoke(store_cli, ["show", str(out), "--id", qid]))
    assert "answer_logprobs has dtype I32" in line and "rerun the dump" in line
    assert files_bytes(out) == before  # looking changed nothing
    r = CliRunner().invoke(teacher_cli, dump_args(world, out))
    assert r.exit_code == 0, r.output
    assert files_bytes(out) == files_bytes(world["store"])


@pytest.mark.parametrize("path", ["../x.safetensors", "/etc/passwd", "shard-000000.safetensors/../shard-000001"])
def test_manifest_paths_must_be_plain_names_inside_the_store(world, tmp_path, path):
    out = copy_store(world, tmp_path)
    (tmp_path / "x.safetensors").write_bytes((out / "shard-000000.safetensors").read_bytes())
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["file"] = path
    (out / "manifest.json").write_text(json.dumps(m))
    before = files_bytes(tmp_path)
    qid = m["ids"][0]
    for cmd in (["verify", str(out)], ["show", str(out), "--id", qid]):
        line = one_line_error(CliRunner().invoke(store_cli, cmd))
        assert "plain file names inside the store" in line
    line = one_line_error(CliRunner().invoke(train_main, train_args(world, out, tmp_path / "run")))
    assert "plain file names inside the store" in line
    assert files_bytes(tmp_path) == before and not (tmp_path / "run").exists()


def test_truncated_manifest_says_what_to_do_and_the_dump_repairs_it(world, tmp_path):
    out = copy_store(world, tmp_path)
    man = out / "manifest.json"
    man.write_bytes(man.read_bytes()[: len(man.read_bytes()) // 2])
    before = files_bytes(out)
    for cmd in (["verify", str(out)], ["show", str(out), "--id", "x"]):
        line = one_line_error(CliRunner().invoke(store_cli, cmd))
        assert "truncated or not valid JSON" in line and "rerun the dump command" in line
    line = one_line_error(CliRunner().invoke(train_main, train_args(world, out, tmp_path / "run")))
    assert "truncated or not valid JSON" in line
    assert files_bytes(out) == before
    r = CliRunner().invoke(teacher_cli, dump_args(world, out))
    assert r.exit_code == 0, r.output
    assert files_bytes(out) == files_bytes(world["store"])


def test_old_version_store_is_refused_with_a_re_dump_message(world, tmp_path):
    out = copy_store(world, tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    m["version"] = 1
    (out / "manifest.json").write_text(json.dumps(m))
    before = files_bytes(out)
    line = one_line_error(CliRunner().invoke(store_cli, ["show", str(out), "--id", m["ids"][0]]))
    assert "format version 1" in line and "re-dump" in line
    line = one_line_error(CliRunner().invoke(train_main, train_args(world, out, tmp_path / "run")))
    assert "format version 1" in line
    line = one_line_error(CliRunner().invoke(teacher_cli, dump_args(world, out)))
    assert "format version 1" in line
    assert files_bytes(out) == before


# ------------------------------------------------------------------------------------------------- teacher inputs
@pytest.mark.parametrize("bits,old,new", [(None, b'"F32"', b'"I32"'), (4, b'"U32"', b'"I32"')])
def test_teacher_header_dtype_flip_is_refused_before_compute(world, tmp_path, bits, old, new):
    teacher = tiny_kimi_k2_dir(tmp_path / "teacher", seed=5, n_layers=2, bits=bits)
    shard = sorted(teacher.glob("*.safetensors"))[0]
    flip_header(shard, old, new)
    before = files_bytes(teacher)
    line = one_line_error(CliRunner().invoke(teacher_cli, dump_args(world, tmp_path / "out", teacher)))
    assert "has dtype I32" in line and shard.name in line and "re-download or re-convert" in line
    assert files_bytes(teacher) == before and not (tmp_path / "out").exists()


def test_renamed_teacher_directory_resumes_identical_bytes(world, tmp_path):
    """The teacher is known by its content: a copy under another name, spelt DIR/., resumes the same store."""
    spelling = "renamed/."
    shutil.copytree(world["teacher"], tmp_path / "renamed")
    out = copy_store(world, tmp_path)
    for s in ("shard-000002.safetensors", "shard-000003.safetensors", "manifest.json"):
        (out / s).unlink()  # an interrupted dump
    r = CliRunner().invoke(teacher_cli, dump_args(world, out, f"{tmp_path}/{spelling}"))
    assert r.exit_code == 0, r.output
    got, want = files_bytes(out), files_bytes(world["store"])
    assert json.loads(got.pop("dump_config.json"))["teacher"] == f"{tmp_path}/{spelling}"  # the command, as run
    want.pop("dump_config.json")
    assert got == want


# ---------------------------------------------------------------------------------------------------- training
def test_train_verifies_the_store_hashes_once_per_run(world, tmp_path):
    out = copy_store(world, tmp_path)
    shard = out / "shard-000002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0x20
    shard.write_bytes(bytes(raw))
    before = files_bytes(tmp_path)
    line = one_line_error(CliRunner().invoke(train_main, train_args(world, out, tmp_path / "run")))
    assert "shard-000002.safetensors" in line and "sha256" in line and "--no-verify" in line
    assert files_bytes(tmp_path) == before and not (tmp_path / "run").exists()
    # verify_store: false (--no-verify) skips the check: preparation goes on (it stops later only if the bytes
    # that changed are read)
    cfg = {**DEFAULTS, "student": str(world["student"]), "store": str(out), "data": str(world["data"]),
           "splits": str(world["splits"]), "out": str(tmp_path / "run"), "verify_store": False, "kd_weight": 0.0}
    prep = prepare(cfg, progress=False)
    assert prep.train


def test_nan_answer_rows_are_refused_with_a_count(world, tmp_path):
    """A store whose hashes are right but two answer rows are NaN / all -inf: refused before training, counted."""
    src = TopKStore(world["store"])
    recs = list(src)
    recs[1].answer_logprobs[2] = np.nan
    recs[4].answer_logprobs[:] = -np.inf
    out = tmp_path / "store"
    with StoreWriter(out, src.identity, shard_size=3) as w:
        for r in recs:
            w.add(r)
    shutil.copytree(world["store"] / "tokenizer", out / "tokenizer")
    before = files_bytes(tmp_path)
    line = one_line_error(CliRunner().invoke(train_main, train_args(world, out, tmp_path / "run")))
    assert "2 question(s) have answer log-probs that are not a distribution" in line and recs[1].id in line
    assert files_bytes(tmp_path) == before
    with pytest.raises(KDError, match="2 question"):
        TopKStore(out).check_answers()


def test_teacher_tokenizer_override_must_match_the_store(world, tmp_path):
    """The store carries its tokenizer: train needs no --teacher-tokenizer, and a given one must be the same."""
    from kd_mlx.testing import phi_tokenizer_dir

    other = phi_tokenizer_dir(tmp_path / "phi_tok")
    args = train_args(world, world["store"], tmp_path / "run") + ["--teacher-tokenizer", str(other)]
    before = files_bytes(world["store"])
    line = one_line_error(CliRunner().invoke(train_main, args))
    assert "fingerprint" in line and "the store carries it" in line
    assert files_bytes(world["store"]) == before and not (tmp_path / "run").exists()


def test_dump_refuses_shots_beyond_the_dev_rows_before_compute(world, tmp_path):
    """Every subject's dev rows are counted before the teacher is run: the fixture has 1 dev row per subject."""
    args = dump_args(world, tmp_path / "out")
    args[args.index("--shots") + 1] = "2"
    before = files_bytes(world["data"])
    line = one_line_error(CliRunner().invoke(teacher_cli, args))
    assert "has 1 dev row(s)" in line and "fewer than the 2 shots" in line, line
    assert files_bytes(world["data"]) == before and not (tmp_path / "out").exists()
