"""Shared helpers: sizes, atomic writes, config merging, model path resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_mlx.utils import KDError, atomic_path, merge_config, parse_bytes, resolve_model_path, load_yaml_config


def test_parse_bytes():
    assert parse_bytes("16GB") == 16_000_000_000
    assert parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    assert parse_bytes(1024) == 1024
    with pytest.raises(KDError, match="cannot read size"):
        parse_bytes("lots")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_merge_config_precedence_and_unknown_keys(tmp_path):
    defaults = {"lr": 1e-4, "steps": 10, "rank": 8}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# comment\nlr: 0.001\nsteps: 20\n")
    merged = merge_config(load_yaml_config(cfg), {"steps": 5, "rank": None}, defaults)
    assert merged == {"lr": 0.001, "steps": 5, "rank": 8}
    with pytest.raises(KDError, match="unknown config key"):
        merge_config({"lrr": 1}, {}, defaults)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(KDError, match="not valid YAML"):
        load_yaml_config(bad)


def test_resolve_model_path(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(KDError, match="not found"):
        resolve_model_path(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------- output directories
def _marked(d, kind, identity):
    from kd_mlx.utils import write_output_marker

    d.mkdir(parents=True)
    (d / "result.txt").write_text("earlier work")
    write_output_marker(d, kind, identity)
    return d


def test_output_dir_new_resume_replace(tmp_path):
    from kd_mlx.utils import prepare_output_dir

    ident = {"model": "/m", "shots": 5}
    assert prepare_output_dir(tmp_path / "absent", "eval", ident) == "new"
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty", "eval", ident) == "new"
    out = _marked(tmp_path / "res", "eval", ident)
    assert prepare_output_dir(out, "eval", dict(ident), resume=True) == "resume"
    with pytest.raises(KDError, match="already holds this eval output .same settings.: pass --overwrite"):
        prepare_output_dir(out, "eval", ident)
    assert prepare_output_dir(out, "eval", ident, overwrite=True) == "replace"
    with pytest.raises(KDError, match=r"made with other settings \(differs in: shots\)"):
        prepare_output_dir(out, "eval", {"model": "/m", "shots": 0}, resume=True)
    assert prepare_output_dir(out, "eval", {"model": "/m", "shots": 0}, overwrite=True) == "replace"
    assert (out / "result.txt").read_text() == "earlier work"  # the check itself never writes


def test_output_dir_refuses_other_kinds_and_files_even_with_overwrite(tmp_path):
    from kd_mlx.utils import prepare_output_dir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(KDError, match=r"holds a training run \(checkpoints, metrics.jsonl\), not kd_mlx eval"):
            prepare_output_dir(run, "eval", {}, **kw)
    other = _marked(tmp_path / "exp", "export", {})
    with pytest.raises(KDError, match=r"holds an exported model \(result.txt\), not kd_mlx report output"):
        prepare_output_dir(other, "report", {}, overwrite=True)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(KDError, match="is a file"):
        prepare_output_dir(tmp_path / "f.txt", "eval", {}, overwrite=True)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.md").write_text("mine")
    with pytest.raises(KDError, match=r"holds 1 entry \(notes.md\)"):
        prepare_output_dir(stray, "eval", {}, overwrite=True)
    # a directory of the same kind's layout written before markers existed: replaceable with --overwrite only
    old = tmp_path / "old_results"
    (old / "subjects").mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    with pytest.raises(KDError, match="unknown settings: pass --overwrite"):
        prepare_output_dir(old, "eval", {})
    assert prepare_output_dir(old, "eval", {}, overwrite=True) == "replace"


@pytest.mark.parametrize("where,relation", [(".", "is"), ("..", "contains"), ("sub", "lies inside")])
def test_output_dir_never_an_input(tmp_path, where, relation):
    from kd_mlx.utils import prepare_output_dir

    inp = _marked(tmp_path / "run" / "best", "eval", {})
    link = tmp_path / "link"
    link.symlink_to(inp)  # symlinks are resolved: the input reached through a link is still the input
    out = link / where
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(KDError, match=f"{relation} the input"):
            prepare_output_dir(out, "eval", {}, inputs=[None, "org/hub-id", str(inp)], **kw)


def test_staged_output_dir_is_all_or_nothing(tmp_path):
    from kd_mlx.utils import OUTPUT_MARKER, read_output_marker, staged_output_dir

    out = _marked(tmp_path / "res", "eval", {"a": 1})
    (out / "stale.csv").write_text("old subject")
    with pytest.raises(RuntimeError):
        with staged_output_dir(out, "eval", {"a": 2}) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]
    assert (out / "stale.csv").exists() and read_output_marker(out)["identity"] == {"a": 1}
    with staged_output_dir(out, "eval", {"a": 2}) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "new.txt"])  # nothing stale left
    assert read_output_marker(out)["identity"] == {"a": 2} and sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_config_int():
    from kd_mlx.utils import config_int

    assert config_int({"n": "12"}, "n", 1) == 12 and config_int({"n": None}, "n") is None
    for bad, needle in (("four", "whole number"), (2.5, "whole number"), (True, "whole number"), (0, ">= 1")):
        with pytest.raises(KDError, match=needle):
            config_int({"n": bad}, "n", 1)


def test_staged_output_dir_over_a_symlink_replaces_the_link_only(tmp_path):
    from kd_mlx.utils import staged_output_dir

    target = _marked(tmp_path / "elsewhere" / "res", "eval", {"a": 1})
    link = tmp_path / "res"
    link.symlink_to(target)
    with staged_output_dir(link, "eval", {"a": 2}) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not link.is_symlink() and (link / "new.txt").read_text() == "new"
    assert (target / "result.txt").read_text() == "earlier work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "res"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the advice is about MLX's Linux CPU wheel")
def test_blas_advice_follows_what_is_loaded_not_the_variable(tmp_path):
    """The note is printed when no OpenBLAS is mapped into the process, whatever LD_PRELOAD says, and not when one
    is (under any file name)."""
    code = "import mlx.core; from kd_mlx.utils import linux_blas_advice; print(linux_blas_advice() is None)"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    missing = str(tmp_path / "openblas-missing" / "libblas.so.3")
    ran = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": missing}, capture_output=True,
                         text=True, check=True)
    assert ran.stdout.strip() == "False"
    lib = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
    if lib.exists():
        ran = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": str(lib)}, capture_output=True,
                             text=True, check=True)
        assert ran.stdout.strip() == "True"
