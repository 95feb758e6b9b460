"""The shared tokenizer interface on the real tokenizers (GPT-2 BPE as Phi-1.5's; cl100k in Kimi's format), and
tokenization equal to mlx-lm's own loader (`mlx_lm.utils.load_tokenizer`) for a model directory."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer
from tokenizers import processors

from kd_mlx.data.loader import Question, load_cmmlu
from kd_mlx.data.prompt import build_prompt, read_add_bos
from kd_mlx.store import save_tokenizer_files, store_tokenizer
from kd_mlx.testing.models import smollm2_dir, tiny_family_configs
from kd_mlx.testing.tokenizers import build_phi_tokenizer, gpt2_bpe_files, phi_tokenizer_dir, qwen_tokenizer_dir
from kd_mlx.tokenizer import HFTokenizer, TiktokenTokenizer, load_tokenizer
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


# ------------------------------------------------------------------ equal to mlx-lm's loader for a model directory

# words with combining marks that have whole-word tokens in `qwen_tokenizer_dir`'s vocabulary
MARK_TEXTS = ["नमस्ते दुनिया, हिन्दी में", "ที่นี่ ที่นี่", "她说：नमस्ते！"]


def _question(i: int, question: str, choices: tuple[str, str, str, str], answer: str) -> Question:
    return Question(id=f"agronomy/dev/{i}", subject="agronomy", split="dev", index=i, question=question,
                    choices=choices, answer=answer)


def chinese_prompts() -> list[str]:
    """CMMLU direct-answer prompts (0-shot and 2-shot) of hand-written agronomy questions."""
    shots = [_question(0, "水稻的原产地是？", ("中国", "印度", "埃及", "巴西"), "A"),
             _question(1, "下列作物中，属于豆科植物的是（  ）。", ("小麦", "大豆", "玉米", "高粱"), "B")]
    q = _question(2, "土壤pH值为5.5时，土壤呈（ ）性。", ("强碱", "中性", "酸", "弱碱"), "C")
    return [build_prompt(q).text, build_prompt(q, shots).text]


def mlx_lm_ids(path, texts: list[str]) -> list[list[int]]:
    """What mlx-lm's loader gives for `path`, without specials (kd_mlx adds BOS by its own rule)."""
    tok = mlx_lm_load_tokenizer(path)
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def test_qwen3_5_tokenizes_as_mlx_lm_where_tokenizer_json_alone_differs(tmp_path):
    # transformers builds Qwen3_5Tokenizer for a qwen3_5* model type (whatever tokenizer_config.json names) and
    # keeps only the vocabulary and merges of tokenizer.json: here a GPT-2 byte-level one, as the tiny test models
    # of the families carry
    d = qwen_tokenizer_dir(tmp_path / "qwen3_5_moe", "qwen3_5_moe", tokenizer=build_phi_tokenizer())
    texts = chinese_prompts() + SAMPLES
    ours = load_tokenizer(d)
    assert [ours.encode(t) for t in texts] == mlx_lm_ids(d, texts)
    alone = HFTokenizer.from_file(d / "tokenizer.json")
    for prompt in chinese_prompts():
        assert alone.encode(prompt) != ours.encode(prompt)
    assert alone.fingerprint() != ours.fingerprint()
    ids, offsets = ours.encode_with_offsets(texts[1])
    assert ours.decode(ids) == texts[1] and len(offsets) == len(ids)


def test_qwen3_5_split_keeps_combining_marks_in_words_as_mlx_lm(tmp_path):
    # Qwen2's split pattern in tokenizer.json cuts a word at its combining marks; Qwen3.5's class keeps them in the
    # letter run, so the whole-word tokens of the vocabulary are reached
    texts = chinese_prompts() + MARK_TEXTS
    q35 = qwen_tokenizer_dir(tmp_path / "qwen3_5", "qwen3_5")
    ours = load_tokenizer(q35)
    assert [ours.encode(t) for t in texts] == mlx_lm_ids(q35, texts)
    assert len(ours.encode("ที่นี่")) == 1
    alone = HFTokenizer.from_file(q35 / "tokenizer.json")
    for t in MARK_TEXTS:
        assert len(alone.encode(t)) > len(ours.encode(t))
        assert ours.decode(ours.encode(t)) == t
    assert [alone.encode(t) for t in chinese_prompts()] == [ours.encode(t) for t in chinese_prompts()]
    assert ours.bos_id is None and ours.token_bytes(ours.eos_id) == b"<|im_end|>"
    # a qwen3 directory (Qwen2Tokenizer, the same split as its tokenizer.json) tokenizes as tokenizer.json alone
    q3 = qwen_tokenizer_dir(tmp_path / "qwen3", "qwen3")
    assert [load_tokenizer(q3).encode(t) for t in texts] == mlx_lm_ids(q3, texts) == [alone.encode(t) for t in texts]


def test_real_cmmlu_prompts_tokenize_as_mlx_lm(real_cmmlu, tmp_path):
    cm = load_cmmlu(real_cmmlu)
    prompts = [build_prompt(cm.dev[s][-1], cm.dev[s][:4]).text for s in sorted(cm.dev)[:6]]
    d = qwen_tokenizer_dir(tmp_path / "qwen3_5_moe", "qwen3_5_moe", tokenizer=build_phi_tokenizer())
    ours = load_tokenizer(d)
    assert [ours.encode(p) for p in prompts] == mlx_lm_ids(d, prompts)
    alone = HFTokenizer.from_file(d / "tokenizer.json")
    assert sum(alone.encode(p) != ours.encode(p) for p in prompts) == len(prompts)


def test_truncation_and_padding_in_tokenizer_json_do_not_cut_prompts(tmp_path):
    # mlx-lm's encode turns off the truncation and padding a tokenizer.json may carry; so does kd_mlx, batched too
    tok = build_phi_tokenizer()
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=400)
    d = qwen_tokenizer_dir(tmp_path / "qwen3_5", "qwen3_5", tokenizer=tok)
    texts = chinese_prompts()
    ours = load_tokenizer(d)
    expected = mlx_lm_ids(d, texts)
    assert min(map(len, expected)) > 16 and max(map(len, expected)) < 400
    assert [ours.encode(t) for t in texts] == ours.encode_batch(texts) == expected


def test_the_store_keeps_the_model_type_tokenizer(tmp_path):
    # STORE/tokenizer/ must load as the teacher directory does (config.json names the model type); another
    # tokenizer, even with the same tokenizer.json, is refused
    teacher = qwen_tokenizer_dir(tmp_path / "teacher", "qwen3_5_moe", tokenizer=build_phi_tokenizer())
    tok = load_tokenizer(teacher)
    store = tmp_path / "store"
    store.mkdir()
    save_tokenizer_files(store, teacher, tok.fingerprint())
    copy = store_tokenizer(store, {"tokenizer": tok.fingerprint()})
    assert copy.fingerprint() == tok.fingerprint()
    assert copy.encode(chinese_prompts()[1]) == tok.encode(chinese_prompts()[1])
    with pytest.raises(KDError, match="fingerprint"):
        store_tokenizer(store, {"tokenizer": tok.fingerprint()}, override=teacher / "tokenizer.json")


def test_existing_families_tokenize_as_before_and_as_mlx_lm(phi_tok_dir, kimi_tok_dir):
    texts = chinese_prompts() + SAMPLES
    for d in (phi_tok_dir, smollm2_dir()):
        ours = load_tokenizer(d)
        alone = HFTokenizer.from_file(d / "tokenizer.json")
        assert [ours.encode(t) for t in texts] == [alone.encode(t) for t in texts] == mlx_lm_ids(d, texts)
        assert (ours.bos_id, ours.eos_id) == (alone.bos_id, alone.eos_id)
        assert ours.vocab_size == alone.vocab_size
    # Kimi's tiktoken.model stays native (its own tokenizer class is remote code)
    assert isinstance(load_tokenizer(kimi_tok_dir), TiktokenTokenizer)


def test_a_directory_without_tokenizer_json_loads_as_mlx_lm(tmp_path):
    # GPT-2's own vocab.json + merges.txt (no tokenizer.json): transformers builds the tokenizer, so does kd_mlx
    d = tmp_path / "gpt2"
    d.mkdir()
    enc, bpe = gpt2_bpe_files()
    shutil.copyfile(enc, d / "vocab.json")
    shutil.copyfile(bpe, d / "merges.txt")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tok = load_tokenizer(d)
    texts = chinese_prompts() + SAMPLES
    assert [tok.encode(t) for t in texts] == mlx_lm_ids(d, texts)
    assert tok.encode("Hello world") == [15496, 995] and tok.vocab_size == 50257 and tok.bos_id == 50256
    assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_a_directory_transformers_cannot_load_uses_tokenizer_json_with_a_warning(phi_tok_dir, tmp_path):
    # a kimi_k2 config with yarn rope scaling: transformers does not know the model type and fails on the config, so
    # mlx-lm cannot load the tokenizer; kd_mlx reads tokenizer.json alone
    d = tmp_path / "kimi_k2"
    phi_tokenizer_dir(d)
    (d / "config.json").write_text(json.dumps(tiny_family_configs()["kimi_k2"]))
    with pytest.raises(AttributeError):
        mlx_lm_load_tokenizer(d)
    with pytest.warns(UserWarning, match="tokenizer.json alone"):
        tok = load_tokenizer(d)
    assert tok.fingerprint() == HFTokenizer.from_file(d / "tokenizer.json").fingerprint()
    assert tok.encode(chinese_prompts()[1]) == load_tokenizer(phi_tok_dir).encode(chinese_prompts()[1])


def test_bos_rule_follows_the_tokenizer_as_mlx_lm_encodes(phi_tok_dir, kimi_tok_dir, tmp_path):
    """A Llama-3-style tokenizer.json adds BOS in its post-processor without `add_bos_token` in tokenizer_config:
    mlx-lm's encode starts with BOS, so the prompt rule does too; GPT-2 (Phi) adds none; Kimi follows its config."""
    tok = build_phi_tokenizer()
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos)])
    d = tmp_path / "llama3_style"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    mlx_ids = mlx_lm_load_tokenizer(d).encode("hi")
    assert mlx_ids[0] == bos
    kd_tok = load_tokenizer(d)
    assert read_add_bos(d, kd_tok) is True
    assert [bos] + kd_tok.encode("hi") == mlx_ids
    assert read_add_bos(phi_tok_dir, load_tokenizer(phi_tok_dir)) is False
    assert load_tokenizer(kimi_tok_dir).adds_bos() is None
