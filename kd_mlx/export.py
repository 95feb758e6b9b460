"""Export the distilled student: fuse LoRA adapters, optionally quantize, write an mlx-lm model dir; serve; ask.

    python -m kd_mlx.export --student DIR|HUB_ID --adapters RUN/best [--quantize 4|8] [--group-size 64] \
        [--dtype float16|bfloat16|float32] [--eval-summary RESULTS/summary.json] --out MODEL [--overwrite]
    python -m kd_mlx.export serve MODEL [--port 8080] [--host 127.0.0.1]
    python -m kd_mlx ask MODEL "题目：…\nA. …\nB. …\nC. …\nD. …" [--subject SUBJ]

Everything heavy is reused from mlx-lm: model classes and loading (`mlx_lm.utils.load_model`), adapters
(`mlx_lm.tuner.utils.load_adapters`), the LoRA layers' own `fuse`, `quantize_model`, `save_model`/`save_config`,
and `mlx_lm.server` (OpenAI-compatible HTTP). This module adds the model card (evaluation numbers + the exact
training configuration), atomic output, a chat template for base models, and the CMMLU `ask` command.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import click
import mlx.core as mx
from click.core import ParameterSource
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm import load as mlx_lm_load
from mlx_lm.utils import dequantize_model, get_total_parameters, quantize_model, save_config, save_model

from .data import Question, answer_token_ids, build_prompt, subject_table
from .eval import letter_logits_reference, letter_logits_streaming, load_eval_model, softmax4
from .model_dir import load_model, read_adapter_config, read_raw_config
from .utils import (KDError, cli_errors, config_int, is_hub_id, load_yaml_config, merge_config, path_identity,
                    prepare_output_dir, resolve_model_path, sha256_file, staged_output_dir, write_json_atomic)

LETTERS = ("A", "B", "C", "D")

# Files of a model directory that are not weights and that a loader may need (tokenizer, generation defaults,
# remote code). Copied verbatim from the student so the exported tokenizer is byte-identical to the trained one.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "tiktoken.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
TOKENIZER_GLOBS = ("*.tiktoken", "*.py")
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")  # one is needed

# Base students (Phi-1.5) have no chat template. This one makes chat-completions a plain continuation of the
# messages' text (joined by blank lines, no role markers), so sending a CMMLU prompt ending in "答案是：" as the
# user message gets the model's answer exactly as in evaluation.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

EXPORT_DEFAULTS: dict[str, Any] = {
    "student": None, "adapters": None, "out": None, "quantize": None, "group_size": 64, "dtype": None,
    "eval_summary": None, "overwrite": False,
}
SERVE_DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 8080, "max_tokens": 512, "log_level": "INFO"}
ASK_DEFAULTS: dict[str, Any] = {"subject": None, "json": False}
EXPORT_KIND = "export"  # the output-directory kind (kd_mlx.utils.prepare_output_dir)
EXPORT_RECORD = "kd_mlx_export.json"  # the final export config + provenance, inside the model directory


# --------------------------------------------------------------------------------------------------------------
# Export: fuse, quantize, write
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    path: Path
    fused_layers: int
    quantization: dict | None
    num_parameters: int
    weight_bytes: int
    eval_summary_path: Path | None
    record: dict = field(default_factory=dict)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KDError(f"{what} {path} is not valid JSON: {e.msg} (line {e.lineno})") from None


def find_training_config(adapters_dir: Path) -> tuple[Path | None, dict | None]:
    """RUN/config.json (the trainer's final configuration) for adapters at RUN/best, or beside the adapters."""
    for p in (adapters_dir / "config.json", adapters_dir.parent / "config.json"):
        if p.is_file():
            cfg = _read_json(p, "training config")
            # a model's config.json (model_type, hidden sizes) is not a training configuration
            if isinstance(cfg, dict) and "model_type" not in cfg:
                return p, cfg
    return None, None


def is_eval_summary(summary: Any) -> bool:
    """A summary.json written by `python -m kd_mlx eval` (a training run's summary.json is not one)."""
    return isinstance(summary, dict) and all(k in summary for k in ("overall", "subjects", "categories"))


def _same_path(a: Any, b: Path) -> bool:
    return isinstance(a, str) and Path(a).expanduser().exists() and Path(a).expanduser().resolve() == b.resolve()


def find_eval_summary(adapters_dir: Path) -> Path | None:
    """An evaluation of exactly these adapters near them (RUN/best, RUN/<results>/), if the user gave none: a
    kd_mlx eval summary whose "adapters" is this directory (RUN/summary.json is the training summary)."""
    run = adapters_dir.parent
    for p in [adapters_dir / "summary.json", *sorted(run.glob("*/summary.json"))]:
        if p.is_file():
            try:
                s = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if is_eval_summary(s) and _same_path(s.get("adapters"), adapters_dir):
                return p
    return None


def check_eval_summary(path: Path, adapters_dir: Path) -> dict:
    """The --eval-summary the user gave: a kd_mlx eval summary, of these adapters when it names any."""
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise KDError(f"evaluation summary not found: {path}")
    s = _read_json(path, "evaluation summary")
    if not is_eval_summary(s):
        raise KDError(f"{path} is not a kd_mlx eval summary (no overall/subjects/categories): give the "
                      f"summary.json that `python -m kd_mlx eval --adapters {adapters_dir} --out RESULTS` wrote")
    named = s.get("adapters", adapters_dir.as_posix())
    if named is None or not _same_path(named, adapters_dir):
        what = "the base model without adapters" if named is None else f"adapters {named}"
        raise KDError(f"{path} evaluates {what}, not {adapters_dir}: give the evaluation of the exported adapters")
    return s


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for pattern in TOKENIZER_GLOBS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def ensure_chat_template(model_dir: Path) -> bool:
    """Give a model directory without a chat template the plain-continuation one. True if one was added."""
    if (model_dir / "chat_template.jinja").exists() or (model_dir / "chat_template.json").exists():
        return False
    tc_path = model_dir / "tokenizer_config.json"
    if tc_path.is_file():
        tc = _read_json(tc_path, "tokenizer config")
        if tc.get("chat_template"):
            return False
        tc["chat_template"] = PLAIN_CHAT_TEMPLATE
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        (model_dir / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE, encoding="utf-8")
    return True


def fuse_adapters(model, dequantize: bool = False) -> int:
    """Replace every adapter layer by its fused linear (the tuner's own `fuse`, as `mlx_lm.fuse` does)."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def cast_floating(model, dtype_name: str) -> None:
    """Cast the floating-point parameters (not quantized integer weights) to `dtype_name`."""
    dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}[dtype_name]
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))


def export_model(student: str, adapters: str | os.PathLike, out: str | os.PathLike, *, quantize: int | None = None,
                 group_size: int = 64, dtype: str | None = None, eval_summary: str | os.PathLike | None = None,
                 overwrite: bool = False, final_config: dict | None = None) -> ExportResult:
    """Fuse `adapters` into `student`, optionally quantize, and write an mlx-lm model directory at `out`.

    The directory is built under a temporary name beside `out`, checked by opening it with mlx-lm (lazily), and
    only then renamed onto `out`: an interrupted export leaves nothing half-written."""
    if quantize not in (None, 4, 8):
        raise KDError(f"--quantize must be 4 or 8 bits, got {quantize}")
    if quantize and (group_size not in (32, 64, 128)):
        raise KDError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if dtype not in (None, "float16", "bfloat16", "float32"):
        raise KDError(f"--dtype must be float16, bfloat16 or float32, got {dtype}")
    out = Path(out).expanduser()
    student_dir = resolve_model_path(student)
    read_raw_config(student_dir)
    if not any((student_dir / n).is_file() for n in TOKENIZER_MAIN_FILES):
        raise KDError(f"student {student_dir} has no tokenizer ({', '.join(TOKENIZER_MAIN_FILES)}): give the model "
                      "directory the adapters were trained on, with its tokenizer")
    adapters_dir, adapter_cfg = read_adapter_config(adapters)
    summary_path = Path(eval_summary).expanduser() if eval_summary else find_eval_summary(adapters_dir)
    summary = check_eval_summary(summary_path, adapters_dir) if summary_path else None
    if summary_path is not None and summary_path.is_dir():
        summary_path = summary_path / "summary.json"
    train_cfg_path, train_cfg = find_training_config(adapters_dir)
    best_path = adapters_dir / "best.json"  # the trainer's validation figures at the kept step
    best = _read_json(best_path, "best-step record") if best_path.is_file() else None
    identity = {"student": path_identity(student), "adapters": path_identity(adapters_dir), "quantize": quantize,
                "group_size": group_size if quantize else None, "dtype": dtype,
                "eval_summary": path_identity(summary_path)}
    prepare_output_dir(out, EXPORT_KIND, identity, [student_dir, adapters_dir, summary_path, train_cfg_path],
                       overwrite=overwrite)
    model, config = load_model(student_dir, adapters=adapters_dir, lazy=True)
    model.eval()

    was_quantized = "quantization" in config
    n_fused = fuse_adapters(model, dequantize=bool(quantize))
    if adapter_cfg.get("fine_tune_type", "lora") != "full" and n_fused == 0:
        raise KDError(f"no adapter layers were created from {adapters_dir / 'adapter_config.json'}")
    if quantize and was_quantized:
        # re-quantizing at other settings: start from full precision everywhere
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if dtype:
        cast_floating(model, dtype)
        config["torch_dtype"] = dtype
    if quantize:
        model, config = quantize_model(model, config, group_size=group_size, bits=quantize)

    with staged_output_dir(out, EXPORT_KIND, identity) as tmp:
        save_model(tmp, model, donate_model=False)
        save_config(dict(config), tmp / "config.json")
        weights = dict(tree_flatten(model.parameters()))
        weight_bytes = sum(v.nbytes for v in weights.values())
        n_params = int(get_total_parameters(model))
        del weights
        copy_tokenizer_files(student_dir, tmp)
        added_template = ensure_chat_template(tmp)
        quant = config.get("quantization")
        record = {
            "config": final_config or {"student": student, "adapters": str(adapters), "out": str(out),
                                       "quantize": quantize, "group_size": group_size, "dtype": dtype,
                                       "eval_summary": str(summary_path) if summary_path else None},
            "student": student if is_hub_id(student) else Path(student).name,
            "adapters_sha256": sha256_file(adapters_dir / "adapters.safetensors"),
            "adapter_config": adapter_cfg,
            "training_config": train_cfg,
            "best_step": best,
            "eval_summary": summary,
            "fused_layers": n_fused,
            "quantization": quant,
            "num_parameters": n_params,
            "weight_bytes": weight_bytes,
            "added_chat_template": added_template,
            "versions": _versions(),
            "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (tmp / "README.md").write_text(model_card(out.name, record), encoding="utf-8")
        write_json_atomic(tmp / EXPORT_RECORD, record)
        _check_loads(tmp)
    del model
    mx.clear_cache()
    return ExportResult(out, n_fused, quant, n_params, weight_bytes, summary_path, record)


def _check_loads(model_dir: Path) -> None:
    """Open the written directory exactly as users will (mlx_lm.load, lazily: no weights are read)."""
    try:
        mlx_lm_load(str(model_dir), lazy=True)
    except Exception as e:  # anything here is a bug in the export, reported in one line
        raise KDError(f"the exported model does not load with mlx_lm.load: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _versions() -> dict:
    out = {}
    for pkg in ("kd_mlx", "mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------

def _accuracy_value(v: Any) -> float | None:
    if isinstance(v, dict):
        for k in ("accuracy", "acc", "overall", "mean", "value"):
            if k in v:
                return _accuracy_value(v[k])
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _metric(v: Any, scale: float) -> str:
    """An accuracy as a percentage (`scale` 100 for fractions, 1 for percentages, as evaluate writes them)."""
    x = _accuracy_value(v)
    if x is None:
        return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)
    return "n/a" if math.isnan(x) else f"{scale * x:.2f}%"


def _eval_section(summary: Any) -> list[str]:
    if summary is None:
        return ["No evaluation summary was found (pass `--eval-summary RESULTS/summary.json`)."]
    if not isinstance(summary, dict):
        return ["```json", json.dumps(summary, indent=1, ensure_ascii=False), "```"]
    cats = summary.get("categories") if isinstance(summary.get("categories"), dict) else {}
    subs = summary.get("subjects") if isinstance(summary.get("subjects"), dict) else {}
    values = [_accuracy_value(v) for v in [summary.get("overall"), *cats.values(), *subs.values()]]
    values = [v for v in values if v is not None and not math.isnan(v)]
    scale = 100.0 if values and max(values) <= 1.0 else 1.0  # fractions vs percentages
    counts = summary.get("n") if isinstance(summary.get("n"), dict) else {}
    lines = ["CMMLU, official protocol (accuracy = argmax over the logits of A/B/C/D at the answer position; overall "
             "= unweighted mean of subject accuracies)."]
    meta = {k: v for k, v in summary.items() if k not in ("overall", "categories", "subjects", "n") and
            not isinstance(v, (dict, list))}
    if meta:
        lines += ["", " · ".join(f"{k}: {v}" for k, v in meta.items())]
    if "overall" in summary:
        lines += ["", f"**Overall: {_metric(summary['overall'], scale)}**"]
    if counts:
        lines += ["", f"{sum(int(c) for c in counts.values())} questions in {len(counts)} subjects."]
    if cats:
        lines += ["", "| category | accuracy |", "|---|---|"]
        lines += [f"| {k} | {_metric(v, scale)} |" for k, v in cats.items()]
    if subs:
        lines += ["", f"<details><summary>{len(subs)} subjects</summary>", "", "| subject | accuracy | questions |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_metric(v, scale)} | {counts.get(k, '')} |" for k, v in subs.items()]
        lines += ["", "</details>"]
    return lines


def model_card(name: str, record: dict) -> str:
    q = record.get("quantization")
    qtext = f"{q['bits']}-bit (group size {q['group_size']}, {q.get('mode', 'affine')})" if q else "none (full precision)"
    lines = [
        "---", "library_name: mlx", "pipeline_tag: text-generation",
        "tags: [mlx, kd_mlx, knowledge-distillation, cmmlu, lora]",
    ]
    if "/" in str(record.get("student", "")):
        lines.append(f"base_model: {record['student']}")
    lines += [
        "---", "", f"# {name}", "",
        f"Student `{record.get('student')}` distilled with kd_mlx, LoRA adapters fused into the weights "
        f"({record.get('fused_layers')} layers fused), quantization: {qtext}. "
        f"{record.get('num_parameters', 0) / 1e6:.1f}M parameters, {record.get('weight_bytes', 0) / 2**20:.1f} MiB "
        "of weights. An mlx-lm model directory.",
        "", "## Evaluation", "",
    ]
    lines += _eval_section(record.get("eval_summary"))
    lines += ["", "## Training configuration", "",
              f"Adapters: `adapters.safetensors` sha256 `{record.get('adapters_sha256')}`.", "",
              "Adapter configuration (`adapter_config.json`, exactly as trained):", "", "```json",
              json.dumps(record.get("adapter_config"), indent=1, ensure_ascii=False), "```", ""]
    if record.get("best_step") is not None:
        lines += ["Validation at the kept step (`best.json`):", "", "```json",
                  json.dumps(record["best_step"], indent=1, ensure_ascii=False), "```", ""]
    if record.get("training_config") is not None:
        lines += ["Training run configuration (`config.json` of the run, exactly as trained):", "", "```json",
                  json.dumps(record["training_config"], indent=1, ensure_ascii=False), "```", ""]
    else:
        lines += ["The training run's `config.json` was not found beside the adapters.", ""]
    lines += ["Export configuration:", "", "```json", json.dumps(record.get("config"), indent=1, ensure_ascii=False),
              "```", "", "## Use", "", "```bash",
              f'python -m kd_mlx ask {name} "题目：…\\nA. …\\nB. …\\nC. …\\nD. …" --subject SUBJECT',
              f"python -m kd_mlx.export serve {name} --port 8080   # OpenAI-compatible, 127.0.0.1", "```", "",
              "```python", "from mlx_lm import load, generate", f'model, tokenizer = load("{name}")', "```", ""]
    if record.get("added_chat_template"):
        lines += ["The base model has no chat template; export added a plain one (message texts joined by blank "
                  "lines, no role markers), so a chat request carrying a CMMLU prompt ending in `答案是：` is "
                  "answered as in evaluation.", ""]
    v = record.get("versions", {})
    lines += ["## Provenance", "", f"Exported {record.get('created_utc')} with "
              + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Serve
# --------------------------------------------------------------------------------------------------------------

def check_model_dir(model: str | os.PathLike) -> Path:
    d = Path(model).expanduser()
    if not d.is_dir():
        raise KDError(f"model directory not found: {d}")
    if not (d / "config.json").is_file():
        raise KDError(f"{d} is not a model directory: config.json missing")
    if not list(d.glob("model*.safetensors")):
        raise KDError(f"{d} is not a model directory: no model*.safetensors weights")
    return d


def server_argv(model_dir: Path, host: str, port: int, max_tokens: int, log_level: str) -> list[str]:
    return ["mlx_lm.server", "--model", str(model_dir), "--host", host, "--port", str(port),
            "--max-tokens", str(max_tokens), "--log-level", log_level]


def serve_model(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, max_tokens: int = 512,
                log_level: str = "INFO") -> None:
    """Run mlx-lm's OpenAI-compatible server on `model` (blocks until interrupted)."""
    d = check_model_dir(model)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host}, reachable from other machines; mlx_lm.server has only basic "
                   "security checks", err=True)
    from mlx_lm import server  # the HTTP server stack, imported only when serving

    sys.argv = server_argv(d, host, port, max_tokens, log_level)
    server.main()


# --------------------------------------------------------------------------------------------------------------
# Ask: one CMMLU question, 0-shot official prompt, probabilities of A-D
# --------------------------------------------------------------------------------------------------------------

_OPT = r"[\.．、:：)）]"


def parse_question(text: str) -> tuple[str, tuple[str, str, str, str]]:
    """'题目：Q\\nA. a\\nB. b\\nC. c\\nD. d' -> (Q, (a, b, c, d)). Literal backslash-n counts as a newline (shells)."""
    t = text.replace("\r\n", "\n").replace("\\n", "\n").strip()
    t = re.sub(r"\s*答案(是)?[:：]?\s*$", "", t)
    t = re.sub(r"^\s*题目\s*[:：]\s*", "", t)
    lines = t.split("\n")
    starts = {}
    for i, line in enumerate(lines):
        m = re.match(rf"^\s*([A-D]){_OPT}\s*(.*)$", line)
        if m and m.group(1) not in starts:
            starts[m.group(1)] = i
    if len(starts) == 4 and [starts[k] for k in LETTERS] == sorted(starts.values()):
        idx = [starts[k] for k in LETTERS] + [len(lines)]
        opts = []
        for k in range(4):
            first = re.match(rf"^\s*[A-D]{_OPT}\s*(.*)$", lines[idx[k]]).group(1)
            opts.append("\n".join([first] + lines[idx[k] + 1: idx[k + 1]]).strip())
        question = "\n".join(lines[: idx[0]]).strip()
    else:  # options on one line: "Q A. a B. b C. c D. d"
        m = re.match(rf"^(.*?)\s*A{_OPT}\s*(.+?)\s+B{_OPT}\s*(.+?)\s+C{_OPT}\s*(.+?)\s+D{_OPT}\s*(.+)$", t, re.S)
        if not m:
            raise KDError("question text must contain four options A., B., C., D. (e.g. '题目：…\\nA. …\\nB. …\\nC. …\\nD. …')")
        question, opts = m.group(1).strip(), [m.group(k).strip() for k in range(2, 6)]
    if not question:
        raise KDError("question text is empty: give the question before the options A.–D.")
    if any(not o for o in opts):
        raise KDError(f"option {LETTERS[[bool(o) for o in opts].index(False)]} is empty")
    return question, (opts[0], opts[1], opts[2], opts[3])


def resolve_subject(subject: str | None) -> tuple[str | None, str | None]:
    """English key or Chinese name -> (key, Chinese name); None -> (None, None). Unknown -> KDError."""
    if subject is None:
        return None, None
    table = subject_table()
    s = subject.strip()
    if s in table:
        return s, table[s]["zh"]
    for key, row in table.items():
        if row["zh"] == s:
            return key, s
    close = [k for k in table if s.lower().replace(" ", "_") in k][:3]
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see kd_mlx/data/subjects.json)"
    raise KDError(f"unknown CMMLU subject {subject!r}{hint}")


def official_prompt(question: str, choices: Sequence[str], subject_zh: str | None) -> str:
    """The official 0-shot CMMLU prompt (plain reference for kd_mlx.data.build_prompt). Without a subject the
    header leaves out the subject name."""
    header = (f"以下是关于{subject_zh}的单项选择题，请直接给出正确答案的选项。\n\n" if subject_zh
              else "以下是单项选择题，请直接给出正确答案的选项。\n\n")
    body = f"题目：{question}\n" + "".join(f"{k}. {c}\n" for k, c in zip(LETTERS, choices)) + "答案是："
    return header + body


def build_ask_prompt(question: str, choices: Sequence[str], subject: str | None) -> str:
    key, zh = resolve_subject(subject)
    if key is not None:
        q = Question(id=f"{key}/ask/0", subject=key, split="ask", index=0, question=question,
                     choices=tuple(choices), answer="A")  # answer unused by a 0-shot prompt
        return build_prompt(q, []).text
    return official_prompt(question, choices, None)


@dataclass
class AskResult:
    letter: str
    probs: dict[str, float]
    prompt: str
    num_tokens: int


class Asker:
    """A loaded model that answers CMMLU questions (load once, ask many) with the evaluation module's protocol:
    its model loading (fp32 on CPU, BOS as the tokenizer config says), its answer-token rule and its plain
    one-forward-per-question scoring, then a softmax over the four letter logits."""

    def __init__(self, model: str | os.PathLike):
        self.model_dir = check_model_dir(model)
        self.em = load_eval_model(str(self.model_dir))
        self.letter_ids = answer_token_ids(self.em.tokenizer)

    def prompt_ids(self, prompt: str) -> list[int]:
        tok = self.em.tokenizer
        return ([tok.bos_id] if self.em.add_bos else []) + tok.encode(prompt)

    def ask(self, question_text: str, subject: str | None = None) -> AskResult:
        question, choices = parse_question(question_text)
        prompt = build_ask_prompt(question, choices, subject)
        ids = self.prompt_ids(prompt)
        ctx = self.em.context_length
        if ctx and len(ids) > ctx:
            raise KDError(f"the prompt is {len(ids)} tokens, longer than the model's context ({ctx})")
        score = letter_logits_reference if self.em.kind == "mlx" else letter_logits_streaming
        probs = [float(p) for p in softmax4(score(self.em.model, [ids], self.letter_ids))[0]]
        best = max(range(4), key=lambda i: probs[i])
        return AskResult(LETTERS[best], dict(zip(LETTERS, probs)), prompt, len(ids))


def ask(model: str | os.PathLike, question_text: str, subject: str | None = None) -> AskResult:
    # parse first: a malformed question fails before the (slow) model load
    parse_question(question_text)
    resolve_subject(subject)
    return Asker(model).ask(question_text, subject)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------

class _DefaultCommandGroup(click.Group):
    """`python -m kd_mlx.export --student ...` runs `build`; `python -m kd_mlx.export serve MODEL` runs serve."""

    default_command = "build"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        elif not args:
            args = [self.default_command]
        return super().parse_args(ctx, args)


def _explicit(ctx: click.Context, names: Sequence[str]) -> dict:
    """Only the flags the user actually gave (so --config values are not overridden by click defaults)."""
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}


@click.group(cls=_DefaultCommandGroup, help=__doc__.split("\n\n")[0])
def cli() -> None:
    pass


@cli.command("build", help="Fuse adapters into the student, optionally quantize, write an mlx-lm model dir.")
@click.option("--student", help="Student model: directory or hub id (default: the \"model\" in adapter_config.json).")
@click.option("--adapters", type=click.Path(), help="Adapters dir in mlx-lm's format (e.g. RUN/best).")
@click.option("--out", type=click.Path(), help="Output model directory.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the fused weights to 4 or 8 bits.")
@click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast floating weights (default: keep the student's).")
@click.option("--eval-summary", type=click.Path(), default=None,
              help="Evaluation summary.json for the model card (default: looked for near the adapters).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing output directory.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config, merged under the flags.")
@click.pass_context
@cli_errors
def build_cmd(ctx: click.Context, config_file: str | None, **_: Any) -> None:
    cfg = merge_config(load_yaml_config(config_file), _explicit(ctx, list(EXPORT_DEFAULTS)), EXPORT_DEFAULTS)
    for key in ("adapters", "out"):
        if not cfg[key]:
            raise KDError(f"--{key} is required")
    if not cfg["student"]:
        # kd_mlx.train records the student it trained in adapter_config.json ("model")
        cfg["student"] = read_adapter_config(cfg["adapters"])[1].get("model")
        if not cfg["student"] or cfg["student"] == "None":
            raise KDError("--student is required (the adapters' adapter_config.json does not name their model)")
    quantize = config_int(cfg, "quantize", 1)
    cfg["quantize"] = quantize
    res = export_model(cfg["student"], cfg["adapters"], cfg["out"], quantize=quantize,
                       group_size=config_int(cfg, "group_size", 1), dtype=cfg["dtype"], eval_summary=cfg["eval_summary"],
                       overwrite=bool(cfg["overwrite"]), final_config=cfg)
    q = res.quantization
    click.echo(f"wrote {res.path}: {res.fused_layers} adapter layers fused, "
               f"{'%d-bit' % q['bits'] if q else 'not quantized'}, {res.num_parameters / 1e6:.1f}M parameters, "
               f"{res.weight_bytes / 2**20:.1f} MiB; eval summary: {res.eval_summary_path or 'none'}")


@cli.command("serve", help="Serve MODEL with mlx_lm.server (OpenAI-compatible: /v1/chat/completions, /v1/completions).")
@click.argument("model", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True, help="Default max tokens per reply.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), default="INFO", show_default=True)
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config, merged under the flags.")
@click.pass_context
@cli_errors
def serve_cmd(ctx: click.Context, model: str, config_file: str | None, **_: Any) -> None:
    cfg = merge_config(load_yaml_config(config_file), _explicit(ctx, list(SERVE_DEFAULTS)), SERVE_DEFAULTS)
    serve_model(model, host=cfg["host"], port=int(cfg["port"]), max_tokens=int(cfg["max_tokens"]),
                log_level=cfg["log_level"])


@click.command("ask", help="Answer one CMMLU-style question: the letter and the probabilities of A-D.")
@click.argument("model", type=click.Path())
@click.argument("question")
@click.option("--subject", default=None, help="CMMLU subject (key like 'anatomy' or its Chinese name) for the header.")
@click.option("--json", "json_", is_flag=True, default=False, help="Print one JSON object instead of text.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="YAML config, merged under the flags.")
@click.pass_context
@cli_errors
def ask_cmd(ctx: click.Context, model: str, question: str, config_file: str | None, **_: Any) -> None:
    given = _explicit(ctx, ["subject"])
    if ctx.get_parameter_source("json_").name == "COMMANDLINE":
        given["json"] = ctx.params["json_"]
    cfg = merge_config(load_yaml_config(config_file), given, ASK_DEFAULTS)
    res = ask(model, question, cfg["subject"])
    if cfg["json"]:
        click.echo(json.dumps({"answer": res.letter, "probs": res.probs, "prompt_tokens": res.num_tokens},
                              ensure_ascii=False))
        return
    click.echo(res.letter)
    for k in LETTERS:
        click.echo(f"{k} {res.probs[k]:.4f}")


cli.add_command(ask_cmd)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
