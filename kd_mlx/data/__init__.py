"""CMMLU data layer: loading (directory, zip, hub), the official prompt, leak-free splits.

CLI: `python -m kd_mlx.data show|split` (see `kd_mlx/data/cli.py`).
"""

from .loader import (  # noqa: F401
    CMMLU,
    HUB_REPO,
    LETTERS,
    Question,
    SkippedRow,
    content_hash,
    content_key,
    load_cmmlu,
    parse_csv,
    subject_table,
)
from .prompt import (  # noqa: F401
    ANSWER_CUE,
    Prompt,
    PromptTokens,
    answer_token_ids,
    build_prompt,
    count_tokens_batch,
    count_tokens_reference,
    fit_prompt,
    fit_prompts,
    format_question,
    format_shot,
    header,
    prompt_ids,
    read_add_bos,
    subject_zh,
)
from .splits import SPLIT_NAMES, check_no_leak, load_splits, make_splits, split_questions  # noqa: F401

__all__ = [
    "CMMLU", "HUB_REPO", "LETTERS", "Question", "SkippedRow", "content_hash", "content_key", "load_cmmlu",
    "parse_csv", "subject_table", "Prompt", "build_prompt", "count_tokens_batch", "count_tokens_reference",
    "fit_prompt", "fit_prompts", "format_question", "format_shot", "header", "subject_zh", "ANSWER_CUE",
    "PromptTokens", "answer_token_ids", "prompt_ids", "read_add_bos", "SPLIT_NAMES",
    "check_no_leak", "load_splits", "make_splits", "split_questions",
]
