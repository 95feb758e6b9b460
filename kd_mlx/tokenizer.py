"""One tokenizer interface for both sides of the distillation.

- `HFTokenizer`: a `tokenizers.Tokenizer` (Phi-1.5's GPT-2 byte-level BPE, SmolLM2, Qwen, ...). For a model
  directory it is the backend that mlx-lm's own loader builds (`transformers.AutoTokenizer`, no remote code): for
  some model types transformers replaces the normalizer and pre-tokenizer of `tokenizer.json` with its class's own
  (e.g. `Qwen3_5Tokenizer` for `qwen3_5*`), and the teacher must see the prompts `mlx_lm.generate` would give it.
- `TiktokenTokenizer`: Kimi-K2's `tiktoken.model` (base64 token + rank per line) with Kimi's split pattern and its
  256 reserved special tokens, loaded natively: Kimi's own `tokenization_kimi.py` needs `trust_remote_code`, we
  do not.

Both give ids, character offsets (the character where each token starts/ends; a token that starts inside a
multi-byte character gets that character's index), per-token bytes and a content fingerprint used by the store
and the alignment cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from functools import cached_property
from pathlib import Path
from typing import Sequence

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer as NativeTokenizer

from .utils import KDError

# Kimi-K2's pre-tokenizer pattern (Han runs are split from other letters; numbers in groups of 1-3).
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
KIMI_NUM_RESERVED_SPECIAL = 256
# Kimi-K2's named special tokens, as offsets from the number of BPE ranks (163,584 in the real model).
KIMI_SPECIAL_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|im_middle|>": 17, "[UNK]": 254, "[PAD]": 255,
}

# the files transformers can build a `tokenizers` tokenizer from (one is needed; tokenizer.json first)
HF_TOKENIZER_MAIN_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _char_offsets_from_token_bytes(token_bytes: Sequence[bytes], text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each token from the byte lengths of the tokens of `text`."""
    # byte position -> index of the character containing it
    byte_to_char: list[int] = []
    for ci, ch in enumerate(text):
        byte_to_char.extend([ci] * len(ch.encode("utf-8")))
    n_bytes = len(byte_to_char)
    byte_to_char.append(len(text))
    out = []
    pos = 0
    for tb in token_bytes:
        start = byte_to_char[min(pos, n_bytes)]
        pos += len(tb)
        # end: one past the character holding the token's last byte
        end = byte_to_char[pos - 1] + 1 if len(tb) and pos - 1 < n_bytes else start
        out.append((start, end))
    return out


class Tokenizer:
    """Common interface. Subclasses implement `encode`, `decode`, `token_bytes`, `vocab_size`, `fingerprint`."""

    name: str = "tokenizer"
    bos_id: int | None = None
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text)
        return ids, _char_offsets_from_token_bytes([self.token_bytes(i) for i in ids], text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts; subclasses use their library's native batch encoder."""
        return [self.encode(t) for t in texts]

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def adds_bos(self) -> bool | None:
        """Whether encoding with the tokenizer's own special-token rules starts with BOS (what mlx-lm's generate
        gets); None when the tokenizer has no such rules of its own (the model's tokenizer_config.json decides)."""
        return None

    def __len__(self) -> int:
        return self.vocab_size


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` from a tokenizer.json (byte-level BPE or other)."""

    def __init__(self, tok, name: str = "hf", bos_id: int | None = None, eos_id: int | None = None):
        self._tok = tok
        self.name = name
        self.bos_id = bos_id
        self.eos_id = eos_id

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> "HFTokenizer":

        path = Path(path)
        try:
            tok = NativeTokenizer.from_file(str(path))
        except Exception as e:
            raise KDError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        bos = eos = None
        cfg = path.parent / "tokenizer_config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text(encoding="utf-8"))

            def _tok_str(v):
                return v.get("content") if isinstance(v, dict) else v

            if _tok_str(c.get("bos_token")):
                bos = tok.token_to_id(_tok_str(c["bos_token"]))
            if _tok_str(c.get("eos_token")):
                eos = tok.token_to_id(_tok_str(c["eos_token"]))
        return cls(tok, name=name or path.parent.name, bos_id=bos, eos_id=eos)

    @classmethod
    def from_dir(cls, path: str | Path, trust_remote_code: bool = False) -> "HFTokenizer":
        """The backend of `AutoTokenizer.from_pretrained(path)`, as mlx-lm loads it; `tokenizer.json` alone (with a
        warning) when transformers cannot load the directory or gives no `tokenizers` backend."""
        path = Path(path)
        # transformers costs ~1 s to import: only directories read through it pay (`data`/`store` CLIs stay fast)
        from transformers import AutoTokenizer

        try:
            # trust_remote_code=False (not None): transformers would otherwise prompt on stdin for remote code
            hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code))
            backend = getattr(hf, "backend_tokenizer", None)
            failure = "" if backend is not None else f"{type(hf).__name__} has no `tokenizers` backend"
        except Exception as e:  # whatever transformers raises, mlx-lm's loader fails on this directory too
            backend, failure = None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if backend is None:
            if not (path / "tokenizer.json").is_file():
                raise KDError(f"cannot load the tokenizer of {path} ({failure}): give a directory with tokenizer.json")
            warnings.warn(f"transformers cannot load the tokenizer of {path} ({failure}); using its tokenizer.json "
                          f"alone, which may tokenize differently from mlx-lm's loader", stacklevel=2)
            return cls.from_file(path / "tokenizer.json", name=path.name)
        # kd_mlx encodes whole texts one by one: no truncation or padding that a tokenizer.json may carry
        backend.no_truncation()
        backend.no_padding()
        return cls(backend, name=path.name, bos_id=hf.bos_token_id, eos_id=hf.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def adds_bos(self) -> bool:
        # the post-processor decides (transformers builds it from add_bos_token; a Llama-3 tokenizer.json has it)
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return self.bos_id is not None and bool(ids) and ids[0] == self.bos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        # tokenizers' offsets for byte-level BPE are already character offsets (pieces of one character share
        # its span); we recompute from bytes so both tokenizer kinds follow exactly the same convention.
        return ids, _char_offsets_from_token_bytes([self.token_bytes(i) for i in ids], text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        # byte-level BPE: map each token string back through GPT-2's byte<->unicode table
        byte_decoder = {v: k for k, v in _gpt2_bytes_to_unicode().items()}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values()) + 1)
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()} if hasattr(
            self._tok, "get_added_tokens_decoder") else set()
        for tok, i in vocab.items():
            if tok in added or not all(ch in byte_decoder for ch in tok):
                table[i] = tok.encode("utf-8") if not tok.startswith("<0x") else bytes([int(tok[3:5], 16)])
            else:
                table[i] = bytes(byte_decoder[ch] for ch in tok)
        return table

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes_table[token_id]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()[:16]


class TiktokenTokenizer(Tokenizer):
    """Kimi-K2-style tokenizer: `tiktoken.model` ranks + 256 reserved specials, Kimi's split pattern."""

    def __init__(self, model_file: str | Path, name: str | None = None, pat_str: str = KIMI_PAT_STR):

        model_file = Path(model_file)
        if not model_file.is_file():
            raise KDError(f"tiktoken model not found: {model_file}")
        try:
            ranks = load_tiktoken_bpe(str(model_file))
        except Exception as e:
            raise KDError(f"cannot read tiktoken model {model_file}: {str(e).splitlines()[0]}") from None
        n = len(ranks)
        specials = {f"<|reserved_token_{i}|>": n + i for i in range(KIMI_NUM_RESERVED_SPECIAL)}
        for tok, off in KIMI_SPECIAL_OFFSETS.items():
            specials.pop(f"<|reserved_token_{off}|>", None)
            specials[tok] = n + off
        cfg = model_file.parent / "tokenizer_config.json"
        if cfg.exists():  # the real Kimi config names its specials in added_tokens_decoder
            dec = json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            for i, v in dec.items():
                content = v["content"] if isinstance(v, dict) else v
                specials = {k: t for k, t in specials.items() if t != int(i)}
                specials[content] = int(i)
        self._enc = tiktoken.Encoding(name=name or model_file.parent.name, pat_str=pat_str,
                                      mergeable_ranks=ranks, special_tokens=specials)
        self._n_ranks = n
        self._specials = specials
        self._id_to_special = {v: k.encode("utf-8") for k, v in specials.items()}
        self.name = name or model_file.parent.name
        self.bos_id = specials.get("[BOS]")
        self.eos_id = specials.get("[EOS]")
        self._model_file = model_file

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_batch(list(texts), disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id >= self._n_ranks:
            return self._id_to_special.get(token_id, b"")
        return self._enc.decode_single_token_bytes(token_id)

    @property
    def vocab_size(self) -> int:
        return self._n_ranks + KIMI_NUM_RESERVED_SPECIAL

    def fingerprint(self) -> str:
        h = hashlib.sha256(self._model_file.read_bytes())
        h.update(json.dumps(sorted(self._specials.items())).encode())
        return h.hexdigest()[:16]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Tokenizer:
    """Load the tokenizer of a model directory as mlx-lm does: `tiktoken.model` (Kimi) natively, else the
    `tokenizers` backend of `transformers.AutoTokenizer` (the call `mlx_lm.utils.load_tokenizer` makes).

    A single file is read as it is (`tiktoken.model`/`*.tiktoken`, or a `tokenizer.json` alone). When transformers
    cannot load the directory without remote code (e.g. a config it cannot parse, an `auto_map` tokenizer) or gives
    no `tokenizers` backend, `tokenizer.json` alone is used, with a warning. `trust_remote_code=True` lets
    transformers run the directory's own tokenizer code (never by default)."""
    p = Path(path)
    if p.is_file():
        return TiktokenTokenizer(p) if p.name.endswith((".model", ".tiktoken")) else HFTokenizer.from_file(p)
    if (p / "tiktoken.model").exists():
        return TiktokenTokenizer(p / "tiktoken.model", name=p.name)
    if not trust_remote_code and not any((p / n).is_file() for n in HF_TOKENIZER_MAIN_FILES):
        raise KDError(f"no tokenizer in {p}: expected tiktoken.model or tokenizer.json "
                      f"(or {', '.join(HF_TOKENIZER_MAIN_FILES[1:])})")
    return HFTokenizer.from_dir(p, trust_remote_code=trust_remote_code)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (public algorithm)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
