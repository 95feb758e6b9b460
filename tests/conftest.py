"""Shared fixtures: the real tokenizers (built once per session) and the real CMMLU directory when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cmmlu_dir() -> Path | None:
    p = Path(os.environ.get("KD_MLX_CMMLU", REPO.parent / "shared" / "cmmlu"))
    return p if (p / "test").is_dir() and (p / "dev").is_dir() else None


@pytest.fixture(scope="session")
def real_cmmlu() -> Path:
    p = cmmlu_dir()
    if p is None:
        pytest.skip("real CMMLU not present (set KD_MLX_CMMLU)")
    return p


@pytest.fixture(scope="session")
def phi_tok_dir(tmp_path_factory) -> Path:
    from kd_mlx.testing import phi_tokenizer_dir

    return phi_tokenizer_dir(tmp_path_factory.mktemp("phi_tok"))


@pytest.fixture(scope="session")
def kimi_tok_dir(tmp_path_factory) -> Path:
    from kd_mlx.testing import kimi_tokenizer_dir

    return kimi_tokenizer_dir(tmp_path_factory.mktemp("kimi_tok"))


@pytest.fixture(scope="session")
def phi_tok(phi_tok_dir):
    from kd_mlx.tokenizer import load_tokenizer

    return load_tokenizer(phi_tok_dir)


@pytest.fixture(scope="session")
def kimi_tok(kimi_tok_dir):
    from kd_mlx.tokenizer import load_tokenizer

    return load_tokenizer(kimi_tok_dir)
