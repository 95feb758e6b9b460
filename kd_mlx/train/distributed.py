"""Data-parallel training over `mx.distributed` (launched by `mlx.launch`), the transport MLX ships.

    mlx.launch -n 2 --backend ring -- python -m kd_mlx.train --config configs/train_phi15.yaml --out RUN

Every rank loads the same student, builds the same examples and draws the same global batches; rank r computes rows
[r·B/n, (r+1)·B/n) of each batch and the gradients are averaged inside the compiled step (kd_mlx.train.loop). Before
training the ranks compare hashes of what they are about to train on, so a rank started with another config, store
or data fails with one line instead of silently averaging gradients of different problems.
"""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import numpy as np

from ..utils import KDError

_CHUNK_BITS = 20  # hash chunks small enough that n_ranks x chunk stays exact in float32


def world():
    """The `mx.distributed` group when launched with more than one rank, else None."""
    if not mx.distributed.is_available():
        return None
    g = mx.distributed.init()
    return g if g.size() > 1 else None


def rank_of(group) -> int:
    return group.rank() if group is not None else 0


def digest(obj) -> str:
    """Stable content hash of a JSON-able object (or bytes)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def examples_digest(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.qid.encode())
        h.update(np.ascontiguousarray(e.tokens, np.int32).tobytes())
        h.update(np.ascontiguousarray(e.teacher_answer_probs, np.float32).tobytes())
        h.update(np.ascontiguousarray(e.kd_ids, np.int32).tobytes())
        h.update(np.ascontiguousarray(e.kd_probs, np.float32).tobytes())
    return h.hexdigest()[:16]


def _chunks(hex16: str) -> list[float]:
    v = int(hex16, 16)
    return [float((v >> (i * _CHUNK_BITS)) & ((1 << _CHUNK_BITS) - 1)) for i in range(64 // _CHUNK_BITS + 1)]


def check_ranks_agree(group, **digests: str) -> None:
    """Raise KDError on every rank unless all ranks hold the same value for each named digest.

    One all_sum: a rank's chunks times n equals the sum only if every rank has the same chunks."""
    if group is None:
        return
    names = sorted(digests)
    mine = mx.array([c for k in names for c in _chunks(digests[k])], dtype=mx.float32)
    total = mx.distributed.all_sum(mine, group=group, stream=mx.cpu)
    per = len(mine.tolist()) // len(names)
    diff = np.array(total.tolist()) != np.array(mine.tolist()) * group.size()
    bad = [names[i] for i in range(len(names)) if diff[i * per:(i + 1) * per].any()]
    if bad:
        raise KDError(f"ranks disagree on {', '.join(bad)} (rank {group.rank()} of {group.size()} has "
                      f"{', '.join(f'{k}={digests[k]}' for k in bad)}): start every rank with the same "
                      f"config, store and data")
