"""CMMLU loading: a local directory in the official layout, a zip of it, or the hub (`haonan-li/cmmlu`).

Layouts accepted (all hold one CSV per subject and split, columns `,Question,A,B,C,D,Answer`):
- a directory with `dev/*.csv` and `test/*.csv` (the official GitHub `data/` folder, `../shared/cmmlu`), optionally
  `transfer/*.csv` (a transfer set: extra questions whose Answer may be empty or the column absent; the teacher
  labels them) and `subjects.json` (subject -> {"zh": Chinese name for the prompt header, "categories": [...]},
  merged over the packaged CMMLU table, so subjects of one's own load);
- a zip with those two folders (optionally under one top folder), e.g. the hub's `cmmlu_v1_0_1.zip`;
- a hub dataset repo id: the snapshot is fetched with `huggingface_hub.snapshot_download(repo_type="dataset")`
  (cache/offline rules of huggingface_hub apply: `HF_HUB_CACHE`, `HF_HUB_OFFLINE=1`) and then read as a directory
  or, as `haonan-li/cmmlu` ships it (README.md, cmmlu.py, cmmlu_v1_0_1.zip), through the zip inside it.

Every row is validated (question and four options non-empty, answer in A-D (transfer: A-D or empty), valid UTF-8,
as many columns as the header); a bad row is a `KDError` naming file and line, or, with `skip_bad=True`, is left out
and listed in `CMMLU.skipped`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

from huggingface_hub import snapshot_download
from tqdm import tqdm

from ..utils import KDError, is_hub_id

SPLITS = ("dev", "test", "transfer")
TRANSFER = "transfer"  # the folder of a transfer set, its questions' `split` and its name in splits.json
LETTERS = ("A", "B", "C", "D")
HUB_REPO = "haonan-li/cmmlu"
_REQUIRED_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")
_MEMBER_RE = re.compile(r"^(?P<prefix>(?:[^/]+/)*)(?P<split>dev|test|transfer)/(?P<subject>[^/]+)\.csv$")
# surrogateescape turns each undecodable byte into one lone surrogate U+DC80..U+DCFF: found per row below.
_BAD_BYTE_RE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class Question:
    """One CMMLU question. `index` is the 0-based data row of its subject's CSV (header not counted)."""

    id: str
    subject: str
    split: str  # "dev", "test" or "transfer": the file it came from (not a train/val/test split of ours)
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # "A".."D"; None: a transfer question without an answer
    subject_zh: str = field(default="", compare=False)  # the prompt header's name ("" = the packaged table's)

    @property
    def answer_index(self) -> int:
        """0..3, or -1 without an answer."""
        return LETTERS.index(self.answer) if self.answer else -1

    @property
    def content_key(self) -> str:
        """The content hash of the id (no subject, split or duplicate suffix): verbatim copies share it."""
        return content_key(self.id)


def content_hash(question: str, choices: Iterable[str]) -> str:
    """First 12 hex digits of sha1 over question and options joined by U+001F (a separator no text contains)."""
    return hashlib.sha1("\x1f".join([question, *choices]).encode("utf-8")).hexdigest()[:12]


def content_key(qid: str) -> str:
    """`subject/split/hash[-n]` -> `hash`: the same for every verbatim copy of a question, in any subject."""
    return qid.rpartition("/")[2].split("-", 1)[0]


@lru_cache(maxsize=1)
def _packaged_subject_table() -> dict:
    text = resources.files("kd_mlx.data").joinpath("subjects.json").read_text(encoding="utf-8")
    return json.loads(text)


def subject_table() -> dict[str, dict]:
    """The 67 CMMLU subjects: subject -> {"zh": Chinese name, "categories": [...], "subcategories": [...]}."""
    return {k: dict(v) for k, v in _packaged_subject_table().items()}


def read_subject_table(path: Path) -> dict[str, dict]:
    """A data directory's own subjects.json: {subject: {"zh": name, "categories": [...], ...}}; one-line errors."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise KDError(f"{path} must map subject -> {{\"zh\": Chinese name, \"categories\": [...]}}")
    for subject, entry in data.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("zh"), str) and entry["zh"].strip()):
            raise KDError(f"{path}: subject {subject!r} needs {{\"zh\": its Chinese name}} (the prompt header's)")
        cats = entry.get("categories", [])
        if not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
            raise KDError(f"{path}: categories of {subject!r} must be a list of names")
    return {k: {"categories": [], "subcategories": [], **v} for k, v in data.items()}


@dataclass
class SkippedRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class CMMLU:
    """Loaded CMMLU: `dev[subject]` (few-shot exemplars, file order), `test[subject]` (file order), `transfer[subject]`
    (a transfer set, answers optional; empty without one), `subjects_table` (the packaged table + the data's own)."""

    dev: dict[str, list[Question]]
    test: dict[str, list[Question]]
    source: str = ""
    skipped: list[SkippedRow] = field(default_factory=list)
    transfer: dict[str, list[Question]] = field(default_factory=dict)
    subjects_table: dict[str, dict] = field(default_factory=subject_table)

    def __post_init__(self) -> None:
        self._by_id = {q.id: q for part in (self.dev, self.test, self.transfer) for qs in part.values() for q in qs}

    @property
    def subjects(self) -> list[str]:
        """Subjects with a test file, sorted."""
        return sorted(self.test)

    def by_id(self, qid: str) -> Question:
        try:
            return self._by_id[qid]
        except KeyError:
            raise KDError(f"question id {qid!r} is not in the CMMLU data at {self.source}") from None

    def has_id(self, qid: str) -> bool:
        return qid in self._by_id

    def check_shots(self, subjects, shots: int) -> None:
        """Every subject in `subjects` has at least `shots` dev rows (checked before any compute)."""
        short = sorted(s for s in set(subjects) if len(self.dev.get(s, [])) < shots)
        if short:
            s = short[0]
            raise KDError(f"subject {s} has {len(self.dev.get(s, []))} dev row(s) in {self.source}, fewer than the "
                          f"{shots} shots asked ({len(short)} subject(s) short: {', '.join(short[:5])}"
                          f"{', ...' if len(short) > 5 else ''}): add dev rows or ask for fewer shots")

    def test_questions(self) -> list[Question]:
        """All test questions, subjects sorted, each in file order."""
        return [q for s in self.subjects for q in self.test[s]]

    def transfer_questions(self) -> list[Question]:
        """All transfer-set questions, subjects sorted, each in file order."""
        return [q for s in sorted(self.transfer) for q in self.transfer[s]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.test.values())


# --------------------------------------------------------------------------------------------------------------
# Reading and validating one CSV


def parse_csv(data: bytes, name: str, subject: str, split: str, skip_bad: bool = False,
              skipped: list[SkippedRow] | None = None, subject_zh: str = "") -> list[Question]:
    """Validate and parse one subject file (`name` is used in error messages). Raises KDError on a bad row.

    A transfer file (`split` "transfer") may leave the Answer empty or have no Answer column."""
    transfer = split == TRANSFER
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark from spreadsheet exports
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise KDError(f"{name}: empty file (expected a header ,Question,A,B,C,D,Answer)") from None
    except csv.Error as e:
        raise KDError(f"{name}:1: malformed CSV header: {e}") from None
    required = _REQUIRED_COLUMNS[:-1] if transfer else _REQUIRED_COLUMNS
    missing = [c for c in required if c not in header]
    if missing:
        raise KDError(f"{name}:1: missing column(s) {', '.join(missing)} (header must be ,Question,A,B,C,D,Answer)")
    cols = [header.index(c) if c in header else None for c in _REQUIRED_COLUMNS]
    n_cols = len(header)

    out: list[Question] = []
    seen: dict[str, int] = {}
    line = reader.line_num + 1  # physical line where the next record starts
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            # an unterminated quote swallows the rest of the file: nothing after it can be trusted
            raise KDError(f"{name}:{line}: malformed CSV: {e}") from None
        start, line = line, reader.line_num + 1
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        reason = _row_problem(row, n_cols, cols, transfer)
        if reason is not None:
            if not skip_bad:
                raise KDError(f"{name}:{start}: {reason}")
            if skipped is not None:
                skipped.append(SkippedRow(name, start, reason))
            continue
        q, a, b, c, d, ans = ("" if i is None else row[i] for i in cols)
        h = content_hash(q, (a, b, c, d))
        # CMMLU repeats a few questions verbatim inside a subject (2 in test): keep every row, number the copies
        seen[h] = seen.get(h, 0) + 1
        qid = f"{subject}/{split}/{h}" + (f"-{seen[h]}" if seen[h] > 1 else "")
        out.append(Question(qid, subject, split, len(out), q, (a, b, c, d), ans.strip() or None, subject_zh))
    return out


def _row_problem(row: list[str], n_cols: int, cols: list[int | None], transfer: bool) -> str | None:
    if len(row) != n_cols:
        return f"expected {n_cols} columns, found {len(row)}"
    bad = next((i for i, v in enumerate(row) if _BAD_BYTE_RE.search(v)), None)
    if bad is not None:
        return "invalid UTF-8"
    q, a, b, c, d, ans = ("" if i is None else row[i] for i in cols)
    if not q.strip():
        return "empty question"
    for letter, opt in zip(LETTERS, (a, b, c, d)):
        if not opt.strip():
            return f"empty option {letter}"
    if ans.strip() not in LETTERS and not (transfer and not ans.strip()):
        return f"answer {ans!r} is not one of A, B, C, D" + (" (or empty, in a transfer set)" if transfer else "")
    return None


# --------------------------------------------------------------------------------------------------------------
# Sources: directory, zip, hub


def _dir_files(root: Path) -> list[tuple[str, str, str, Callable[[], bytes]]]:
    out = []
    for split in SPLITS:
        for p in sorted((root / split).glob("*.csv")):
            out.append((split, p.stem, str(p), p.read_bytes))
    return out


def _zip_files(zpath: Path) -> list[tuple[str, str, str, Callable[[], bytes]]]:
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise KDError(f"cannot open {zpath} as a zip: {e}") from None
    matches = [(m, _MEMBER_RE.match(m)) for m in zf.namelist()]
    matches = [(m, r) for m, r in matches if r and not m.startswith("__MACOSX/")]
    prefixes = {r["prefix"] for _, r in matches}
    if len(prefixes) > 1:
        raise KDError(f"{zpath} holds several CMMLU trees ({', '.join(sorted(p or '/' for p in prefixes))})")
    data = {m: zf.read(m) for m, _ in matches}  # small (~2 MB): read now, close the file
    zf.close()
    return [(r["split"], r["subject"], f"{zpath}:{m}", (lambda m=m: data[m]))
            for m, r in sorted(matches, key=lambda x: x[0])]


def fetch_hub_dataset(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download of a dataset repo; errors (no network, no such repo) become one-line KDErrors."""
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      allow_patterns=["*.zip", "*.csv", "*.json", "*.md"]))
    except Exception as e:  # network errors, missing repos, offline with an empty cache
        msg = str(e).splitlines()[0] if str(e) else ""
        raise KDError(f"cannot fetch dataset {repo_id} from the hub: {type(e).__name__}: {msg}") from None


def find_files(path_or_repo: str | Path) -> tuple[str, list[tuple[str, str, str, Callable[[], bytes]]]]:
    """(description, [(split, subject, name, read_bytes)]) for a directory, a zip or a hub repo id."""
    p = Path(path_or_repo).expanduser()
    if not p.exists():
        s = str(path_or_repo)
        if not is_hub_id(s):
            raise KDError(f"CMMLU data not found: {s} (a directory with dev/ and test/, a zip, or a hub id)")
        p = fetch_hub_dataset(s)
    if p.is_file():
        return str(p), _zip_files(p)
    if (p / "test").is_dir():
        return str(p), _dir_files(p)
    if (p / "data" / "test").is_dir():  # the official GitHub repo keeps the CSVs under data/
        return str(p / "data"), _dir_files(p / "data")
    zips = sorted(p.glob("*.zip"))
    if len(zips) == 1:
        return str(zips[0]), _zip_files(zips[0])
    if len(zips) > 1:
        raise KDError(f"{p} holds several zips ({', '.join(z.name for z in zips)}); point at one of them")
    raise KDError(f"{p} has no test/ folder and no zip: not a CMMLU directory")


def load_cmmlu(path_or_repo: str | Path, skip_bad: bool = False, progress: bool = False) -> CMMLU:
    """Load CMMLU dev, test (and a transfer set) from a directory, a zip or a hub dataset id (see module doc)."""
    source, files = find_files(path_or_repo)
    if not any(split == "test" for split, *_ in files):
        raise KDError(f"no test/*.csv found in {source}")
    table = subject_table()
    own = Path(source) / "subjects.json"
    if own.is_file():
        table.update(read_subject_table(own))
    parts: dict[str, dict[str, list[Question]]] = {s: {} for s in SPLITS}
    skipped: list[SkippedRow] = []
    for split, subject, name, read in tqdm(files, desc="loading CMMLU", unit="file", disable=not progress):
        if subject not in table:
            raise KDError(f"{name}: unknown subject {subject!r} (not a CMMLU subject): name it in "
                          f"{own} as {{\"{subject}\": {{\"zh\": \"<Chinese name>\", \"categories\": []}}}}")
        parts[split][subject] = parse_csv(read(), name, subject, split, skip_bad=skip_bad, skipped=skipped,
                                          subject_zh=table[subject]["zh"])
    return CMMLU(dev=parts["dev"], test=parts["test"], source=source, skipped=skipped, transfer=parts[TRANSFER],
                 subjects_table=table)
