"""The official CMMLU prompt, byte-exact, and the official rule for fitting few-shot prompts into a context.

Direct-answer prompt (the CMMLU paper's protocol, what evaluation and the teacher dump use):

    以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\\n\\n          <- header
    题目：{Q}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案是：{answer}\\n\\n      <- each shot (dev/, file order)
    题目：{Q}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案是：                 <- the question

`Prompt.prefix` is header + shots (the same for every question of a subject, so a teacher can reuse its KV
cache); `Prompt.suffix` is the question block. The text is not stripped or normalised: options keep any spaces
the CSV has.

Chain-of-thought variant (`cot=True`, our wording after the CMMLU repository's CoT setting): header
`以下是关于{subject_zh}的单项选择题，请分析并选出正确答案。\\n\\n`; the question ends with
`\\n逐步分析并给出答案选项。` instead of `\\n答案是：`. Shots keep `\\n答案是：{answer}\\n\\n` (dev/ has no rationales).

Fitting (`fit_prompt`): take the first k dev examples; while the whole prompt has more than `max_tokens` tokens
under `count_tokens`, drop the longest remaining shot (ties: the later one), keeping the others in order. We
count the exact full text rather than the official script's per-piece sum, and drop one shot at a time rather
than every shot tied for longest. If even the 0-shot prompt is too long, the header is dropped too (as the
official script does) and the bare question block is returned; truncation is then the caller's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..utils import KDError
from .loader import LETTERS, Question, subject_table

HEADER = "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"
COT_HEADER = "以下是关于{}的单项选择题，请分析并选出正确答案。\n\n"
ANSWER_CUE = "\n答案是："
COT_CUE = "\n逐步分析并给出答案选项。"


@dataclass(frozen=True)
class Prompt:
    """`prefix` (header + shots) + `suffix` (the question up to the answer cue). `shots`: shots kept."""

    prefix: str
    suffix: str
    shots: int = 0

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


def subject_zh(subject: str) -> str:
    table = subject_table()
    if subject not in table:
        raise KDError(f"unknown subject {subject!r} (not one of the {len(table)} CMMLU subjects)")
    return table[subject]["zh"]


def header(subject: str, cot: bool = False, zh: str = "") -> str:
    """The header line; `zh` (a data directory's own subjects.json name) wins over the packaged table."""
    return (COT_HEADER if cot else HEADER).format(zh or subject_zh(subject))


def format_question(q: Question, cot: bool = False) -> str:
    """`题目：{Q}\\nA. …\\nD. {D}\\n答案是：` (or the CoT cue), without the answer."""
    body = "题目：" + q.question + "".join(f"\n{letter}. {opt}" for letter, opt in zip(LETTERS, q.choices))
    return body + (COT_CUE if cot else ANSWER_CUE)


def format_shot(q: Question) -> str:
    """A worked example: the question block, its answer letter and a blank line."""
    return format_question(q) + q.answer + "\n\n"


def build_prompt(q: Question, shots: Sequence[Question] = (), cot: bool = False) -> Prompt:
    """The official prompt for `q` with the given shots (in the given order)."""
    for s in shots:
        if s.subject != q.subject:
            raise KDError(f"shot {s.id} is from subject {s.subject}, question {q.id} from {q.subject}")
    prefix = header(q.subject, cot, q.subject_zh) + "".join(format_shot(s) for s in shots)
    return Prompt(prefix, format_question(q, cot), len(shots))


def fit_prompt(q: Question, dev_examples: Sequence[Question], k: int,
               count_tokens: Callable[[str], int] | None, max_tokens: int | None, cot: bool = False) -> Prompt:
    """k-shot prompt from the first k `dev_examples`, dropping the longest shot until it fits `max_tokens`."""
    if k < 0:
        raise KDError(f"number of shots must be >= 0, got {k}")
    if k > len(dev_examples):
        raise KDError(f"subject {q.subject} has {len(dev_examples)} dev examples, cannot take {k} shots")
    shots = list(dev_examples[:k])
    prompt = build_prompt(q, shots, cot)
    if count_tokens is None or max_tokens is None:
        return prompt
    shot_len = {id(s): count_tokens(format_shot(s)) for s in shots}
    while count_tokens(prompt.text) > max_tokens:
        if not shots:
            return Prompt("", prompt.suffix, 0)  # official: without room for the header, the bare question
        longest = max(shot_len[id(s)] for s in shots)
        drop = max(i for i, s in enumerate(shots) if shot_len[id(s)] == longest)
        del shots[drop]
        prompt = build_prompt(q, shots, cot)
    return prompt


def count_tokens_batch(tokenizer, texts: Sequence[str], extra_tokens: int = 0) -> list[int]:
    """Token counts of many texts (+ `extra_tokens` each, e.g. 1 for a BOS) in one call.

    Fast path: `tokenizer.encode_batch` (the native batch encoders of `tokenizers` / `tiktoken`); reference:
    `tokenizer.encode` per text. Tests check that they agree on real prompts."""
    return [len(ids) + extra_tokens for ids in tokenizer.encode_batch(list(texts))]


def count_tokens_reference(tokenizer, texts: Sequence[str], extra_tokens: int = 0) -> list[int]:
    return [len(tokenizer.encode(t)) + extra_tokens for t in texts]


def fit_prompts(questions: Sequence[Question], dev: dict[str, list[Question]], k: int, tokenizer=None,
                max_tokens: int | None = None, cot: bool = False, extra_tokens: int = 0) -> list[Prompt]:
    """`fit_prompt` for many questions: the k-shot prompts are counted in one batch and only those over
    `max_tokens` go through the one-by-one fitting loop. Same result as calling `fit_prompt` per question with
    `count_tokens = len(tokenizer.encode(text)) + extra_tokens`."""
    full = [fit_prompt(q, dev.get(q.subject, []), k, None, None, cot) for q in questions]
    if tokenizer is None or max_tokens is None:
        return full
    counts = count_tokens_batch(tokenizer, [p.text for p in full], extra_tokens)

    def count(text: str) -> int:
        return len(tokenizer.encode(text)) + extra_tokens

    return [p if n <= max_tokens else fit_prompt(q, dev.get(q.subject, []), k, count, max_tokens, cot)
            for q, p, n in zip(questions, full, counts)]


# ------------------------------------------------------------------------------------------------ answer facts
def answer_token_ids(tokenizer) -> list[int]:
    """The single token id of each of "A".."D" as it follows the answer cue in a prompt.

    The official score reads the logits of these four ids at the last prompt position, which is only meaningful if
    each letter is one token that does not merge with the cue; raise otherwise."""
    cue = tokenizer.encode(ANSWER_CUE)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(ANSWER_CUE + letter)
        if full[: len(cue)] != cue or len(full) != len(cue) + 1:
            raise KDError(f"answer letter {letter!r} is not a single token after {ANSWER_CUE.strip()!r} with "
                          f"tokenizer {getattr(tokenizer, 'name', '?')} ({len(full) - len(cue)} tokens or merged "
                          f"with the cue)")
        ids.append(full[-1])
    if len(set(ids)) != 4:
        raise KDError(f"answer letters map to repeated token ids {ids}")
    return ids


def read_add_bos(model_dir: str | Path, tokenizer=None) -> bool:
    """The BOS rule: a prompt starts with BOS exactly when the model's tokenizer adds one by its own rules
    (`tokenizer.adds_bos()`: its post-processor, as mlx-lm encodes a prompt), or, for a tokenizer without such
    rules (Kimi's tiktoken), when the model's tokenizer_config.json says `add_bos_token: true`; absent or
    unreadable means no BOS."""
    if tokenizer is not None and (adds := tokenizer.adds_bos()) is not None:
        return adds
    cfg = Path(model_dir) / "tokenizer_config.json"
    if not cfg.exists():
        return False
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("add_bos_token", False))
    except json.JSONDecodeError:
        return False


@dataclass(frozen=True)
class PromptTokens:
    """A question's model input: `ids` (BOS included), char `offsets` into `prompt.text` (BOS: (0, 0)) when asked
    for, the fitted `prompt`, and whether even the bare question was too long and was cut from the left."""

    ids: list[int]
    offsets: list[tuple[int, int]] | None
    prompt: Prompt
    truncated: bool


def prompt_ids(q: Question, dev_examples: Sequence[Question], tokenizer, shots: int, max_tokens: int | None,
               add_bos: bool = False, offsets: bool = False) -> PromptTokens:
    """The one rule for turning a question into token ids, used by eval, the teacher dump and training:
    the official k-shot prompt fitted to `max_tokens` (BOS counted), BOS prepended when `add_bos`, and when even the
    bare question does not fit, its end is kept (the options and the answer cue, which the score reads)."""
    if add_bos and tokenizer.bos_id is None:
        raise KDError(f"a BOS token was requested but tokenizer {getattr(tokenizer, 'name', '?')} has none")
    bos = [tokenizer.bos_id] if add_bos else []

    def count(text: str) -> int:
        return len(tokenizer.encode(text)) + len(bos)

    prompt = fit_prompt(q, dev_examples, shots, count if max_tokens else None, max_tokens)
    if offsets:
        body, offs = tokenizer.encode_with_offsets(prompt.text)
        offs = [(0, 0)] * len(bos) + [tuple(o) for o in offs]
    else:
        body, offs = tokenizer.encode(prompt.text), None
    ids = bos + list(body)
    truncated = bool(max_tokens) and len(ids) > max_tokens
    if truncated:
        ids = ids[len(ids) - max_tokens:]
        offs = offs[len(offs) - max_tokens:] if offs is not None else None
    return PromptTokens(ids, offs, prompt, truncated)
