"""Leak-free train/val/test splits of the CMMLU test set, and the guard later stages call before training.

`make_splits` is stratified per subject and deterministic from content: inside a subject, questions are ordered
by sha256(seed, content key) and the first round(n*test) go to "test", the next round(n*val) to "val", the rest to
"train". The content key is the hash of question and options (`content_key(id)`), so verbatim copies of a question
(CMMLU has two pairs inside a subject and three across subjects) always land in the same split, and file order
plays no part. The 335 dev questions are
few-shot exemplars only and belong to no split. A transfer set (the data's `transfer/` files, answers optional) is
the split "transfer", whole; a transfer question equal by content to a val or test question is refused.

splits.json: {"train": [ids], "val": [ids], "test": [ids], ("transfer": [ids],) "counts": {subject: {split: n}},
"seed": int, "fractions": {"train", "val", "test"}, "n_questions": int, "format": "kd_mlx.splits/1"}; id lists are
sorted; `n_questions` counts train + val + test.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from ..utils import KDError
from .loader import CMMLU, TRANSFER, Question, content_key

SPLIT_NAMES = ("train", "val", "test")
FORMAT = "kd_mlx.splits/1"


def _rank_key(seed: int, content_key: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{content_key}".encode("utf-8")).hexdigest()


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up, not Python's half-to-even


def make_splits(cmmlu: CMMLU, seed: int = 0, val: float = 0.1, test: float = 0.2) -> dict:
    """Stratified, content-deterministic split of the CMMLU test questions (see module doc)."""
    for name, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac <= 1.0:
            raise KDError(f"--{name} must be a fraction in [0, 1], got {frac}")
    if val + test > 1.0 + 1e-12:
        raise KDError(f"val + test fractions must be at most 1, got {val} + {test}")
    out: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    counts: dict[str, dict[str, int]] = {}
    for subject in cmmlu.subjects:
        groups: dict[str, list[Question]] = defaultdict(list)
        for q in cmmlu.test[subject]:
            groups[q.content_key].append(q)
        order = sorted(groups, key=lambda k: _rank_key(seed, k))
        n = len(cmmlu.test[subject])
        targets = {"test": _round(n * test), "val": _round(n * val)}
        c = {s: 0 for s in SPLIT_NAMES}
        for key in order:
            # fill test, then val, then train; a duplicate group stays whole (may overshoot by its extra copies)
            name = next((s for s in ("test", "val") if c[s] < targets[s]), "train")
            for q in groups[key]:
                out[name].append(q.id)
            c[name] += len(groups[key])
        counts[subject] = c
    # A few questions appear verbatim in two subjects (3 in CMMLU): put every copy in the most guarded split any
    # copy drew (test > val > train) so no copy trains while another is evaluated.
    split_of = {i: s for s in SPLIT_NAMES for i in out[s]}
    strictest: dict[str, str] = {}
    for i, s in split_of.items():
        k = content_key(i)
        if SPLIT_NAMES.index(s) > SPLIT_NAMES.index(strictest.get(k, "train")):
            strictest[k] = s
    for i, s in split_of.items():
        target = strictest.get(content_key(i), "train")
        if target != s:
            out[s].remove(i)
            out[target].append(i)
            subject = cmmlu.by_id(i).subject
            counts[subject][s] -= 1
            counts[subject][target] += 1
    transfer = cmmlu.transfer_questions()
    if transfer:
        evaluated = {content_key(i): i for s in ("val", "test") for i in out[s]}
        copies = [q.id for q in transfer if q.content_key in evaluated]
        if copies:
            raise KDError(f"{len(copies)} transfer question(s) repeat a val/test question, e.g. {copies[0]} = "
                          f"{evaluated[content_key(copies[0])]}: remove them from the transfer set")
        for q in transfer:
            counts.setdefault(q.subject, {s: 0 for s in SPLIT_NAMES})
            counts[q.subject][TRANSFER] = counts[q.subject].get(TRANSFER, 0) + 1
    return {
        "format": FORMAT,
        **{s: sorted(out[s]) for s in SPLIT_NAMES},
        **({TRANSFER: sorted(q.id for q in transfer)} if transfer else {}),
        "counts": counts,
        "seed": seed,
        "fractions": {"train": round(1.0 - val - test, 10), "val": val, "test": test},
        "n_questions": sum(len(v) for v in out.values()),
    }


def load_splits(path: str | Path) -> dict:
    """Read and check a splits.json (three disjoint lists of ids). Errors are one-line KDErrors."""
    p = Path(path)
    if not p.is_file():
        raise KDError(f"splits file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"splits file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise KDError(f"splits file {p} must hold a JSON object")
    names = [*SPLIT_NAMES, *([TRANSFER] if TRANSFER in data else [])]
    for s in names:
        ids = data.get(s)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise KDError(f"splits file {p}: {s!r} must be a list of question ids")
    seen: dict[str, str] = {}
    for s in names:
        for i in data[s]:
            if i in seen:
                raise KDError(f"splits file {p}: question {i} is in both {seen[i]!r} and {s!r}")
            seen[i] = s
    return data


def split_questions(cmmlu: CMMLU, splits: dict, names: str | Sequence[str]) -> list[Question]:
    """The questions of one or more splits, in the splits' id order. Ids missing from `cmmlu` -> KDError."""
    names = [names] if isinstance(names, str) else list(names)
    out: list[Question] = []
    for name in names:
        if name not in splits or not isinstance(splits[name], list):
            have = [s for s in (*SPLIT_NAMES, TRANSFER) if s in splits]
            raise KDError(f"no split named {name!r} (have: {', '.join(have)})")
        missing = [i for i in splits[name] if not cmmlu.has_id(i)]
        if missing:
            raise KDError(f"split {name!r} names {len(missing)} question(s) not in the data at {cmmlu.source}, "
                          f"e.g. {missing[0]} (splits made from other data?)")
        out.extend(cmmlu.by_id(i) for i in splits[name])
    return out


def check_no_leak(train_ids: Iterable[str], splits: dict, eval_splits: Sequence[str] = ("val", "test")) -> None:
    """Refuse to train on any question of an evaluation split: raises KDError naming a leaked id and the count.

    A training id also leaks when it is a verbatim copy (same content key) of an evaluation question."""
    by_key: dict[str, str] = {}  # content key -> evaluation split holding it
    for name in eval_splits:
        if name not in splits:
            raise KDError(f"splits have no {name!r} split to guard")
        for i in splits[name]:
            by_key.setdefault(content_key(i), name)
    leaked = [(i, by_key[content_key(i)]) for i in dict.fromkeys(train_ids) if content_key(i) in by_key]
    if leaked:
        i, name = leaked[0]
        raise KDError(f"{len(leaked)} training question(s) belong to evaluation split(s) "
                      f"{'/'.join(eval_splits)}, e.g. {i} (in {name!r}); refusing to train on them")
