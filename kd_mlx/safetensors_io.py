"""Byte-exact reads from safetensors shards: whole tensors or row ranges, with a bytes-read counter.

The header (8-byte little-endian length + JSON) gives each tensor's dtype, shape and byte offsets, so one row of a
tensor whose first axis is "experts" (stacked MoE weights), "vocab" (embedding, LM head) or anything else can be
read with one `pread` without touching the rest of the file. `read_mx` reads straight into an MLX buffer; the
plain path reads into numpy (`read_np`, `read_rows_np`) and `to_mx` copies that into an MLX array.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from .utils import KDError

_BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the page size covers every block size)

# safetensors dtype -> (numpy storage dtype, MLX dtype name to view it as, bytes per element)
_DTYPES: dict[str, tuple[type, str, int]] = {
    "F64": (np.float64, "float64", 8), "F32": (np.float32, "float32", 4), "F16": (np.float16, "float16", 2),
    "BF16": (np.uint16, "bfloat16", 2), "I64": (np.int64, "int64", 8), "I32": (np.int32, "int32", 4),
    "I16": (np.int16, "int16", 2), "I8": (np.int8, "int8", 1), "U64": (np.uint64, "uint64", 8),
    "U32": (np.uint32, "uint32", 4), "U16": (np.uint16, "uint16", 2), "U8": (np.uint8, "uint8", 1),
    "BOOL": (np.bool_, "bool_", 1), "F8_E4M3": (np.uint8, "uint8", 1), "F8_E5M2": (np.uint8, "uint8", 1),
}
_MAX_HEADER = 100 * 2**20


def tensor_nbytes(st_dtype_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of safetensors dtype `st_dtype_name` ("F32", "U32", ...) and `shape`."""
    return int(np.prod(shape, dtype=np.int64)) * _DTYPES[st_dtype_name][2]


def mlx_dtype(st_dtype_name: str):
    """The MLX dtype of a safetensors dtype (fp8 as uint8)."""
    return getattr(mx, _DTYPES[st_dtype_name][1])


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: str  # safetensors name, e.g. "F32", "U32"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis (one expert / one vocab row)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one shard's header; any inconsistency is a KDError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise KDError(f"corrupt shard {path}: file too short ({size} bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen <= 0 or hlen > min(_MAX_HEADER, size - 8):
                raise KDError(f"corrupt shard {path}: bad header length {hlen}")
            header = json.loads(f.read(hlen).decode("utf-8"))
    except FileNotFoundError:
        raise KDError(f"missing shard {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KDError(f"corrupt shard {path}: header is not valid JSON") from None
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = v["dtype"], tuple(int(s) for s in v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise KDError(f"corrupt shard {path}: bad entry for tensor {key!r}") from None
        if dt not in _DTYPES:
            raise KDError(f"shard {path}: tensor {key!r} has unsupported dtype {dt}")
        if b - a != tensor_nbytes(dt, shape) or a < 0 or base + b > size:
            raise KDError(f"corrupt shard {path}: tensor {key!r} extends past the end of the file "
                          f"(truncated download?)" if base + b > size else
                          f"corrupt shard {path}: tensor {key!r} has inconsistent size")
        out[key] = TensorInfo(key, path, dt, shape, base + a, base + b)
    return out


class WeightFiles:
    """All tensors of a model directory (index.json or every model*.safetensors), read by byte range."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                wmap = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise KDError(f"corrupt index {index}") from None
            files = sorted(set(wmap.values()))
            for f in files:
                if not (self.dir / f).exists():
                    raise KDError(f"missing shard {self.dir / f} (listed in {index.name})")
        else:
            files = sorted(p.name for p in self.dir.glob("model*.safetensors"))
            wmap = None
        if not files:
            raise KDError(f"no safetensors weights in {self.dir}")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            self.tensors.update(read_header(self.dir / f))
        if wmap is not None:
            missing = [k for k, f in wmap.items() if k not in self.tensors]
            if missing:
                raise KDError(f"shard {self.dir / wmap[missing[0]]} lacks tensor {missing[0]!r} listed in the index")
        self.files = [self.dir / f for f in files]
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        # read_mx past the page cache (O_DIRECT: the disk writes into the MLX buffer, no copy on the CPU) where the
        # platform and the file system allow it; for weights read once per call from a model larger than memory
        self.uncached = False
        self._direct_fds: dict[Path, int | None] = {}
        self.uncached_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def _pread(self, info: TensorInfo, start: int, n: int, out: memoryview) -> None:
        fd = self._fd(info.file)
        got = 0
        while got < n:
            # straight into `out` (os.pread would return a new bytes object, then copy it: a second pass over every
            # weight byte, ~15% of a streamed forward)
            k = os.preadv(fd, [out[got:min(n, got + (1 << 30))]], start + got)
            if not k:
                raise KDError(f"corrupt shard {info.file}: unexpected end of file reading {info.key!r}")
            got += k
        with self._lock:
            self.bytes_read += n

    def read_np(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        buf = np.empty(info.nbytes, dtype=np.uint8)
        self._pread(info, info.start, info.nbytes, memoryview(buf))
        return buf.view(_DTYPES[info.dtype][0]).reshape(info.shape)

    def read_rows_np(self, key: str, rows: Sequence[int]) -> np.ndarray:
        """Rows (first-axis slices) `rows` of a tensor, stacked in the given order; contiguous runs = one read."""
        info = self.tensors[key]
        rb = info.row_bytes
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        buf = np.empty(len(rows) * rb, dtype=np.uint8)
        self._read_runs(info, rows, memoryview(buf))
        return buf.view(_DTYPES[info.dtype][0]).reshape((len(rows),) + info.shape[1:])

    def _read_runs(self, info: TensorInfo, rows: np.ndarray, out: memoryview | None) -> None:
        """Rows `rows` of a tensor into `out` in the given order: each run of consecutive rows is one read."""
        rb = info.row_bytes
        # run boundaries found in numpy: the LM head is read as ranges of ~10^5 rows, a Python scan cost more
        # than the read itself
        cuts = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        for i, j in zip([0, *cuts], [*cuts, len(rows)]):
            if j > i and rb:
                self._pread(info, info.start + int(rows[i]) * rb, (j - i) * rb, out[i * rb:j * rb])

    def _direct_fd(self, path: Path) -> int | None:
        with self._lock:
            if path not in self._direct_fds:
                try:
                    self._direct_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
                except (AttributeError, OSError):  # no O_DIRECT here (macOS) or on this file system (tmpfs)
                    self._direct_fds[path] = None
            return self._direct_fds[path]

    def _read_mx_uncached(self, info: TensorInfo, rows: np.ndarray | None):
        """`read_mx` through O_DIRECT, or None where it cannot be used. O_DIRECT needs file offset, length and
        buffer address aligned to the block; a tensor starts anywhere in its file, so the buffer is over-allocated
        and the tensor placed in it at its file offset's remainder mod 4096, the array a zero-copy view of that
        span. Rows: each run of consecutive rows is one read (row bytes a multiple of 4096, so every run has the
        same remainder); the < 4 KiB a run's aligned read writes before it are the previous run's, saved and put
        back."""
        fd = self._direct_fd(info.file)
        rb = info.row_bytes
        if fd is None or (rows is not None and rb % _BLOCK):
            return None
        n = info.nbytes if rows is None else len(rows) * rb
        if not n:
            return None
        buf = mx.zeros((n + 3 * _BLOCK,), dtype=mx.uint8)
        mx.eval(buf)
        mv = memoryview(buf).cast("B")
        lead = info.start % _BLOCK
        base = (-np.frombuffer(mv, np.uint8, count=1).ctypes.data) % _BLOCK + lead  # the tensor's first byte
        if rows is None:
            runs = [(info.start, base, n)]
        else:
            cuts = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
            runs = [(info.start + int(rows[i]) * rb, base + i * rb, (j - i) * rb)
                    for i, j in zip([0, *cuts], [*cuts, len(rows)])]
        try:
            for start, dest, length in runs:
                saved = bytes(mv[dest - lead:dest]) if dest > base else b""
                got, want = 0, lead + length
                while got < want:
                    step = min(want - got, 1 << 30)
                    k = os.preadv(fd, [mv[dest - lead + got:dest - lead + got + -(-step // _BLOCK) * _BLOCK]],
                                  start - lead + got)
                    if not k:
                        raise KDError(f"corrupt shard {info.file}: unexpected end of file reading {info.key!r}")
                    got += k
                if saved:
                    mv[dest - lead:dest] = saved
        except OSError:  # a file system that opens O_DIRECT but refuses the read
            with self._lock:
                self._direct_fds[info.file] = None
            return None
        with self._lock:
            self.bytes_read += n
            self.uncached_bytes += n
        return buf[base:base + n]

    def read_mx(self, key: str, rows: Sequence[int] | None = None):
        """`read_np(key)` (rows None) or `read_rows_np(key, rows)` read straight into a new MLX buffer: one pass over
        the bytes, where reading into numpy and `to_mx` copy them twice (and hold both copies meanwhile). Allocates
        and evaluates on the calling thread."""
        info = self.tensors[key]
        storage, name, _ = _DTYPES[info.dtype]
        shape = info.shape if rows is None else (len(rows),) + info.shape[1:]
        dtype = getattr(mx, np.dtype(storage).name if name == "bfloat16" else name)
        raw = self._read_mx_uncached(info, None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)) \
            if self.uncached and info.nbytes else None
        if raw is not None:
            a = raw.view(mx.bfloat16 if name == "bfloat16" else dtype).reshape(shape)
            mx.eval(a)  # a view of the read buffer, evaluated on the thread that made it
            return a
        a = mx.zeros(shape, dtype=dtype)
        mx.eval(a)
        mv = memoryview(a).cast("B") if a.size else None
        if rows is None:
            if mv is not None:
                self._pread(info, info.start, info.nbytes, mv)
        else:
            self._read_runs(info, np.asarray(rows, dtype=np.int64).reshape(-1), mv)
        if name == "bfloat16":
            a = a.view(mx.bfloat16)
            mx.eval(a)  # shares the buffer; evaluated here, where it was made (MLX streams are per thread)
        return a

    def to_mx(self, key: str, arr: np.ndarray):
        a = mx.array(arr)
        name = _DTYPES[self.tensors[key].dtype][1]
        if name == "bfloat16":
            a = a.view(mx.bfloat16)
        return a

    def read(self, key: str):
        return self.to_mx(key, self.read_np(key))

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._direct_fds.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


_MX_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32", "int32": "I32",
             "uint8": "U8", "int8": "I8", "int64": "I64", "uint16": "U16", "int16": "I16", "bool": "BOOL",
             "float64": "F64", "uint64": "U64"}


def st_dtype(mx_dtype, override: str | None = None) -> str:
    """safetensors dtype name of an MLX dtype (`override` e.g. "F8_E4M3" for fp8 bytes held as uint8)."""
    return override or _MX_TO_ST[str(mx_dtype).rsplit(".", 1)[-1]]


class StreamingShardWriter:
    """Write a safetensors file whose layout is fixed up front, filling tensors (or rows of them) in any order.

    Memory stays bounded by what the caller holds: the header (names, dtypes, shapes) is written first, data goes
    in with `pwrite` at the computed offsets. The file is written under a temporary name and renamed by
    `close()` only when every byte has been written (nothing half-written survives a crash)."""

    def __init__(self, path: str | Path, layout: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        off = 0
        self.entries: dict[str, tuple[int, int, int]] = {}  # key -> (start, nbytes, row_bytes)
        for key, dt, shape in layout:
            n = tensor_nbytes(dt, shape)
            header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            self.entries[key] = (off, n, n // shape[0] if shape and shape[0] else n)
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((-len(raw)) % 8)  # data aligned to 8 bytes
        self.base = 8 + len(raw)
        self.size = self.base + off
        self.written = 0
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.size)

    def write(self, key: str, data: bytes | memoryview | np.ndarray, row: int | None = None) -> None:
        start, n, rb = self.entries[key]
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        expect = n if row is None else rb
        if buf.nbytes != expect:
            raise ValueError(f"{key}: got {buf.nbytes} bytes, expected {expect}")
        pos = self.base + start + (0 if row is None else row * rb)
        done = 0
        while done < expect:
            done += os.pwrite(self.fd, buf[done:], pos + done)
        self.written += expect

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        expected = self.size - self.base
        if self.written != expected:
            os.unlink(self.tmp)
            raise KDError(f"{self.path}: only {self.written} of {expected} data bytes were written")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self.tmp.exists():
            self.tmp.unlink()


def mx_to_bytes(a) -> np.ndarray:
    """The raw bytes of an MLX array (bfloat16 via a uint16 view, numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


# ---------------------------------------------------------------------------------------------------------------
# numpy files written and read whole (the logits store's shards), on the same header parser and dtype table

# numpy dtype -> safetensors name, for the dtypes numpy holds natively (bf16/fp8 have no numpy type)
NUMPY_TO_ST: dict[np.dtype, str] = {np.dtype(v[0]): k for k, v in _DTYPES.items()
                                    if k not in ("BF16", "F8_E4M3", "F8_E5M2")}


def numpy_dtype(st_dtype: str) -> np.dtype:
    """The little-endian numpy dtype a safetensors dtype name is read as."""
    return np.dtype(_DTYPES[st_dtype][0]).newbyteorder("<")


def write_numpy(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (in name order) with a sorted-key header and fsync: the same input gives the same bytes."""
    header: dict = {}
    blobs = []
    pos = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NUMPY_TO_ST:
            raise TypeError(f"unsupported dtype {a.dtype} for {name}")
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": NUMPY_TO_ST[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when absent); KDError if the header is unreadable."""
    path = Path(path)
    read_header(path)  # validates the length, the JSON and every tensor entry
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(hlen).decode("utf-8")).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise KDError(f"corrupt shard {path}: __metadata__ must map names to strings")
    return meta


def check_weight_dtypes(tensors: dict[str, TensorInfo]) -> None:
    """Refuse a model checkpoint whose header gives a tensor a type no model weight has: signed integers anywhere,
    or an unsigned integer tensor without the `.scales` of a quantized weight. A one-byte header flip (F32->I32,
    U32->I32) otherwise loads as garbage numbers or fails deep inside a matmul."""
    for key, t in tensors.items():
        base = key.rsplit(".", 1)[0]
        packed = t.dtype in ("U32", "U8") and f"{base}.scales" in tensors
        if t.dtype in ("I8", "I16", "I32", "I64", "U16", "U64") or (t.dtype in ("U32", "U8") and not packed):
            raise KDError(f"{t.file}: tensor {key!r} has dtype {t.dtype}, which no model weight has (a corrupted "
                          f"header?): re-download or re-convert this file")
