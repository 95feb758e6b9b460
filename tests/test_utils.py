"""Shared helpers: sizes, atomic writes, config merging, model path resolution."""

from __future__ import annotations

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
