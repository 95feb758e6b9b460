"""The teacher: load any mlx-lm model lazily, run it streamed under a memory budget, convert checkpoints to MLX.

- `StreamingTeacher(model_dir, memory_budget)` with `.logprobs_at(sequences, positions, prefix=None, reduce=None)`
- `reference_logprobs_at(...)`: the plain in-memory mlx-lm path it must agree with
- `convert_checkpoint(src, dst, bits, group_size)`: bf16 / block-FP8 HF checkpoint -> MLX quantized shards
- CLI: `python -m kd_mlx.teacher inspect|score|convert` (+ `dump`, from kd_mlx.teacher.dump)
"""

from .loading import build_skeleton, load_in_memory  # noqa: F401
from .reference import reference_logprobs_at  # noqa: F401
from ..safetensors_io import WeightFiles, read_header  # noqa: F401
from .streaming import StreamingTeacher  # noqa: F401
