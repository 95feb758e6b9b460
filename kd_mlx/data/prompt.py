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

from dataclasses import dataclass
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

    Fast path: the batch encoders of `tokenizers` / `tiktoken` (native threads) behind kd_mlx's tokenizer classes;
    reference: `tokenizer.encode` per text. Tests check that they agree on real prompts."""
    texts = list(texts)
    raw = getattr(tokenizer, "_tok", None)  # HFTokenizer's tokenizers.Tokenizer
    if raw is not None and hasattr(raw, "encode_batch"):
        return [len(e.ids) + extra_tokens for e in raw.encode_batch(texts, add_special_tokens=False)]
    enc = getattr(tokenizer, "_enc", None)  # TiktokenTokenizer's tiktoken.Encoding (specials read as plain text)
    if enc is not None and hasattr(enc, "encode_ordinary_batch"):
        return [len(ids) + extra_tokens for ids in enc.encode_ordinary_batch(texts)]
    return count_tokens_reference(tokenizer, texts, extra_tokens)


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
