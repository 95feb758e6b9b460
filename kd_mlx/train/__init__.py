"""Student training: the student (mlx-lm model + mlx-lm LoRA/DoRA/full tuner) learns from the teacher's store.

Public API:
- `TrainConfig` (config.py): every setting, typed, with its default and help (= configs/train_phi15.yaml)
- `run_training(cfg, resume=False)`, `run_sweep(cfg, grid)`, `prepare(cfg)` -> examples (run.py)
- `train_loop(model, adapter_config, cfg, run, loss, train_batches, val_batches)`, `Trainer`,
  `TrainingCallback` (loop.py): the loop, with the loss and the batches injected
- `load_student`, `setup_trainable`, `save_adapters`, `trainable_parameter_count`, `base_model_fingerprint`,
  `check_adapter_base` (model.py)
- `objective`, `objective_reference` (objective.py); `Example`, `Batch`, `BatchArrays`, `collate`, `BatchStream`
  (batches.py)

CLI: `python -m kd_mlx.train --student ... --store ... --data ... --splits ... --out RUN` and `... sweep`.
"""

from .batches import Batch, BatchArrays, BatchStream, Example, collate  # noqa: F401
from .config import TrainConfig  # noqa: F401
from .loop import Trainer, TrainingCallback, train_loop  # noqa: F401
from .model import (  # noqa: F401
    base_model_fingerprint,
    check_adapter_base,
    load_student,
    save_adapters,
    setup_trainable,
    trainable_parameter_count,
)
from .run import DEFAULTS, prepare, run_sweep, run_training  # noqa: F401
