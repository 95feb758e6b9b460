"""The shared tokenizer interface on the real tokenizers (GPT-2 BPE as Phi-1.5's; cl100k in Kimi's format)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_mlx.tokenizer import load_tokenizer
from kd_mlx.utils import KDError

SAMPLES = [
    "Hello world",
    "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目：水稻的原产地是？\nA. 中国\n答案是：",
    "1234567 + 89 = ？😀 naïve café",
    "    indented\tcode\t\tline",
]


def test_phi_tokenizer_matches_gpt2_and_phi_extras(phi_tok):
    assert len(phi_tok) == 50295
    assert phi_tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert phi_tok.eos_id == phi_tok.bos_id == 50256
    # Phi's extra whitespace tokens: 31..2 spaces at 50257..50286, 9..2 tabs at 50287..50294
    assert phi_tok.token_bytes(50257) == b" " * 31
    assert phi_tok.token_bytes(50286) == b"  "
    assert phi_tok.token_bytes(50287) == b"\t" * 9
    assert phi_tok.token_bytes(50294) == b"\t\t"
    # Chinese characters are split into byte-level pieces (~2 tokens per character)
    ids = phi_tok.encode("农学")
    assert len(ids) >= 3 and b"".join(phi_tok.token_bytes(i) for i in ids) == "农学".encode()


def test_kimi_format_tokenizer(kimi_tok, kimi_tok_dir):
    # cl100k has 100,256 ranks; Kimi's layout appends 256 reserved specials: [BOS] = n_ranks, [EOS] = n_ranks + 1
    assert kimi_tok.vocab_size == 100256 + 256
    assert (kimi_tok.bos_id, kimi_tok.eos_id) == (100256, 100257)
    assert kimi_tok.token_bytes(kimi_tok.bos_id) == b"[BOS]"
    # Kimi's pattern keeps Han runs together: whole words are single tokens where the vocab has them
    assert len(kimi_tok.encode("以下是")) < len("以下是".encode())
    # special-token text in user data is encoded as plain text, never as a control token
    assert kimi_tok.bos_id not in kimi_tok.encode("[BOS] hi")
    assert (kimi_tok_dir / "tiktoken.model").exists()


@pytest.mark.parametrize("which", ["phi_tok", "kimi_tok"])
@pytest.mark.parametrize("text", SAMPLES)
def test_offsets_cover_text_and_round_trip(which, text, request):
    tok = request.getfixturevalue(which)
    ids, offsets = tok.encode_with_offsets(text)
    assert tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert len(offsets) == len(ids)
    assert offsets[0][0] == 0 and max(e for _, e in offsets) == len(text)
    starts = [s for s, _ in offsets]
    assert starts == sorted(starts)
    for (s, e), i in zip(offsets, ids):
        assert s <= e
        piece = tok.token_bytes(i)
        # a token's bytes lie inside the UTF-8 bytes of its character span
        assert piece in text[s:e].encode("utf-8")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 答案是：题目\n\t1,。😀é")), min_size=1, max_size=40))
def test_offsets_property(phi_tok, kimi_tok, text):
    for tok in (phi_tok, kimi_tok):
        ids, offsets = tok.encode_with_offsets(text)
        assert tok.decode(ids) == text
        # token starts are non-decreasing and every character is covered by some token
        covered = set()
        for s, e in offsets:
            covered.update(range(s, e))
        assert covered == set(range(len(text)))


def test_fingerprints_differ_and_are_stable(phi_tok, kimi_tok, phi_tok_dir):
    assert phi_tok.fingerprint() != kimi_tok.fingerprint()
    assert load_tokenizer(phi_tok_dir).fingerprint() == phi_tok.fingerprint()


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(KDError, match="no tokenizer"):
        load_tokenizer(tmp_path)
