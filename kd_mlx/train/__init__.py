"""Student training: the student (mlx-lm model + mlx-lm LoRA/DoRA/full tuner) learns from the teacher's store.

Public API:
- `run_training(cfg, resume=False)`, `run_sweep(cfg, grid)`, `DEFAULTS` (kd_mlx/train/run.py)
- `prepare(cfg)` -> examples; `train_loop(model, adapter_cfg, train, val, letter_ids, cfg, run)` (loop.py)
- `load_student`, `setup_trainable`, `save_adapters`, `trainable_parameter_count` (model.py)
- `objective`, `objective_reference` (objective.py); `Example`, `collate`, `BatchStream` (batches.py)

CLI: `python -m kd_mlx.train --student ... --store ... --data ... --splits ... --out RUN` and `... sweep`.
"""

from .batches import BatchStream, Example, collate  # noqa: F401
from .model import load_student, save_adapters, setup_trainable, trainable_parameter_count  # noqa: F401
from .run import DEFAULTS, prepare, run_sweep, run_training  # noqa: F401
