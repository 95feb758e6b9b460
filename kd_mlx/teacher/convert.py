"""Convert a Hugging Face checkpoint (bf16/fp16/fp32, or block-FP8 with `weight_scale_inv`) to MLX shards, quantized
or (`bits=16`, `--keep-dtype`) in the checkpoint's dtype.

Bounded memory: one layer's non-expert tensors, or one routed expert, at a time. The output layout (every tensor's
name, dtype, shape) is computed first on lazy stand-ins that are never evaluated, the shard headers are written,
then each unit is read, dequantized (FP8 blocks), passed through mlx-lm's own `sanitize` (e.g. deepseek_v3's MLA
`kv_b_proj` -> `embed_q`/`unembed_out`), quantized with `mx.quantize` exactly where mlx-lm's `quantize_model` would,
and written in place; per-expert tensors are written as rows of mlx-lm's stacked `switch_mlp` tensors.
The result loads with `mlx_lm.load` / `mlx_lm.utils.load_model`. A family whose `sanitize` needs tensors of several
layers at once is refused with the `mlx_lm convert` command that converts it in memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx_lm.utils import _get_classes
from tqdm import tqdm

from ..model_dir import normalise_config, read_raw_config
from ..safetensors_io import StreamingShardWriter, WeightFiles, mlx_dtype, mx_to_bytes, st_dtype, tensor_nbytes
from ..utils import KDError, format_bytes, write_json_atomic

KEEP_DTYPE = 16  # `bits` value that converts to the MLX layout without quantizing
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def dequant_fp8_blocks(w, scale_inv, block: tuple[int, int] = (128, 128), dtype=None):
    """Block-FP8 weight (uint8 bytes of float8_e4m3) times its per-block inverse scale -> `dtype` (bf16)."""
    dtype = dtype or mx.bfloat16
    bm, bn = block
    x = mx.from_fp8(w, dtype=dtype)
    m, n = x.shape
    pm, pn = (-m) % bm, (-n) % bn
    x = mx.pad(x, ((0, pm), (0, pn))).reshape((m + pm) // bm, bm, (n + pn) // bn, bn)
    x = (x * scale_inv[:, None, :, None]).reshape(m + pm, n + pn)  # fp32 scales, as mlx-lm does
    return x[:m, :n].astype(dtype)


class _Converter:
    def __init__(self, src: Path, bits: int, group_size: int, dtype: str | None):
        self.src = src
        raw = read_raw_config(src)
        self.config = normalise_config(raw, src, check_required=False)
        if self.config.get("quantization"):
            raise KDError(f"{src} is already an MLX quantized model")
        qc = self.config.get("quantization_config") or {}
        self.fp8_block = tuple(qc.get("weight_block_size", (128, 128))) if qc.get("quant_method") == "fp8" else None
        if qc and self.fp8_block is None:
            raise KDError(f"{src}: cannot convert quantization_config quant_method={qc.get('quant_method')!r} "
                          f"(bf16/fp16/fp32 or block-FP8 checkpoints only)")
        self.files = WeightFiles(src)
        self.bits, self.gs = bits, group_size
        self.dtype = getattr(mx, dtype) if dtype else None
        try:
            model_cls, args_cls = _get_classes(self.config)
        except ValueError as e:
            raise KDError(f"{src}: {e}") from None
        self.model = model_cls(args_cls.from_dict(self.config))  # lazy: used for names and module types only
        self.modules = dict(self.model.named_modules())
        self.quant_predicate = getattr(self.model, "quant_predicate", None)

    # which tensors go together
    def units(self) -> list[tuple[str, list[str]]]:
        groups: dict[str, list[str]] = {}
        experts: list[tuple[str, list[str]]] = []
        by_expert: dict[tuple[str, int], list[str]] = {}
        for k in sorted(self.files.tensors):
            if k.endswith("weight_scale_inv"):
                continue
            m = _EXPERT.match(k)
            if m:
                if f"{m.group(1)}.switch_mlp" not in self.modules:  # e.g. Kimi's multi-token-prediction layer
                    continue
                by_expert.setdefault((m.group(1), int(m.group(3))), []).append(k)
                continue
            parts = k.split(".")
            g = ".".join(parts[:3]) if k.startswith("model.layers.") else parts[0] + "." + parts[1]
            groups.setdefault(g, []).append(k)
        for (prefix, e), ks in sorted(by_expert.items(), key=lambda kv: (int(kv[0][0].split(".")[2]), kv[0][1])):
            experts.append((f"expert:{prefix}:{e}", ks))
        return list(groups.items()) + experts

    def _get_fn(self, dry: bool) -> Callable[[str], object]:
        def get(k: str):
            t = self.files.info(k)
            if dry:
                return mx.zeros(t.shape, dtype=mlx_dtype(t.dtype))
            return self.files.read(k)

        return get

    def _load(self, k: str, get):
        a = get(k)
        s = k[: -len("weight")] + "weight_scale_inv" if k.endswith("weight") else None
        if s and s in self.files.tensors:
            if self.fp8_block is None:
                raise KDError(f"{self.files.info(s).file}: {s} present but config has no fp8 quantization_config")
            a = dequant_fp8_blocks(a, get(s), self.fp8_block)
        if self.dtype is not None and a.dtype in _FLOATS:
            a = a.astype(self.dtype)
        return a

    def _quantize_params(self, path: str, w) -> dict | None:
        m = self.modules.get(path)
        if self.bits == KEEP_DTYPE or m is None or not hasattr(m, "to_quantized") or w.shape[-1] % self.gs != 0:
            return None
        params = {"group_size": self.gs, "bits": self.bits}
        if self.quant_predicate is not None:
            r = self.quant_predicate(path, m)
            if r is False:
                return None
            if isinstance(r, dict):
                params = {"group_size": r.get("group_size", self.gs), "bits": r.get("bits", self.bits)}
        return params

    def _quantize(self, name: str, w) -> dict:
        if not name.endswith(".weight"):
            return {name: w}
        base = name[: -len(".weight")]
        p = self._quantize_params(base, w)
        if p is None:
            return {name: w}
        q, s, b = mx.quantize(w, p["group_size"], p["bits"])
        return {base + ".weight": q, base + ".scales": s, base + ".biases": b}

    def run_unit(self, uid: str, keys: list[str], dry: bool) -> tuple[dict, dict]:
        """-> (whole tensors {name: array}, expert rows {stacked name: (row, array)})."""
        get = self._get_fn(dry)
        if uid.startswith("expert:"):
            _, prefix, e = uid.split(":")
            rows = {}
            for k in keys:
                proj = _EXPERT.match(k).group(4)
                for name, a in self._quantize(f"{prefix}.switch_mlp.{proj}.weight", self._load(k, get)).items():
                    rows[name] = (int(e), a)
            return {}, rows
        w = {k: self._load(k, get) for k in keys}
        if hasattr(self.model, "sanitize"):
            try:
                w = self.model.sanitize(w)
            except Exception as e:  # this family's sanitize needs tensors of other layers at once
                raise KDError(f"{self.src}: mlx-lm's sanitize cannot convert {uid} on its own ({type(e).__name__}: "
                              f"{e}); convert in memory with `python -m mlx_lm convert --hf-path {self.src} "
                              f"--mlx-path {self.src}-mlx`") from None
        out = {}
        for k, a in w.items():
            out.update(self._quantize(k, a))
        return out, {}


def _nbytes(entry: tuple[str, str, tuple[int, ...]]) -> int:
    return tensor_nbytes(entry[1], entry[2])


def _layout(conv: _Converter, units) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every output tensor's name, dtype and shape, from lazy stand-ins (nothing evaluated, nothing read)."""
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    stacked: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for uid, keys in units:
        whole, rows = conv.run_unit(uid, keys, dry=True)
        for name, a in whole.items():
            layout.append((name, st_dtype(a.dtype), tuple(a.shape)))
        for name, (e, a) in rows.items():
            dt, shape, n = stacked.get(name, (st_dtype(a.dtype), tuple(a.shape), 0))
            stacked[name] = (dt, shape, max(n, e + 1))
    for name, (dt, shape, n) in stacked.items():
        layout.append((name, dt, (n,) + shape))
    names = [n for n, _, _ in layout]
    if len(set(names)) != len(names):
        raise KDError(f"{conv.src}: duplicate output tensors after conversion")
    return layout


def _shards(layout, shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        b = _nbytes(entry)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += b
    return shards


def _write_units(conv: _Converter, units, writers: dict[str, StreamingShardWriter], progress: bool) -> None:
    for uid, keys in tqdm(units, desc="convert", unit="unit", disable=not progress):
        whole, rows = conv.run_unit(uid, keys, dry=False)
        for name, a in whole.items():
            mx.eval(a)
            writers[name].write(name, mx_to_bytes(a))
        for name, (e, a) in rows.items():
            mx.eval(a)
            writers[name].write(name, mx_to_bytes(a), row=e)
        del whole, rows
        mx.clear_cache()


def _output_config(conv: _Converter, bits: int, group_size: int) -> dict:
    cfg = dict(conv.config)
    cfg.pop("quantization_config", None)
    if bits != KEEP_DTYPE:
        cfg["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        cfg["quantization_config"] = dict(cfg["quantization"])
    return cfg


def convert_checkpoint(src: str | Path, dst: str | Path, bits: int = 4, group_size: int = 64,
                       shard_bytes: int = 5 * 2**30, dtype: str | None = None, progress: bool = True) -> Path:
    """Convert `src` (HF layout) into an MLX model directory `dst` (created atomically), quantized to `bits`, or
    with its dtype kept when `bits` is 16 (`KEEP_DTYPE`). Returns `dst`."""
    src, dst = Path(src), Path(dst)
    if bits not in (2, 3, 4, 5, 6, 8, KEEP_DTYPE):
        raise KDError(f"--bits {bits} not supported (2, 3, 4, 5, 6, 8, or 16 to keep the dtype)")
    if group_size not in (32, 64, 128):
        raise KDError(f"--group-size {group_size} not supported (32, 64 or 128)")
    if dst.exists() and any(dst.iterdir()):
        raise KDError(f"output directory {dst} exists and is not empty")
    conv = _Converter(src, bits, group_size, dtype)
    units = conv.units()
    layout = _layout(conv, units)
    shards = _shards(layout, shard_bytes)
    tmp = dst.with_name(f".{dst.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(shards)
    writers: dict[str, StreamingShardWriter] = {}
    wmap = {}
    try:
        opened = []
        for i, entries in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            w = StreamingShardWriter(tmp / fname, entries)
            opened.append(w)
            for name, _, _ in entries:
                writers[name] = w
                wmap[name] = fname
        _write_units(conv, units, writers, progress)
        for w in opened:
            w.close()
        write_json_atomic(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": sum(_nbytes(e) for e in layout)},
                           "weight_map": dict(sorted(wmap.items()))})
        write_json_atomic(tmp / "config.json", _output_config(conv, bits, group_size))
        for f in src.iterdir():  # tokenizer files, generation config, custom code: copied as they are
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                    "config.json", "model.safetensors.index.json") and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def describe_conversion(dst: Path) -> str:
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    return f"{dst}: {len(idx['weight_map'])} tensors, {format_bytes(idx['metadata']['total_size'])}"
