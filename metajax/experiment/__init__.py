"""The machinery behind the experiment binaries: everything that reads a config or touches files.

- `build`: from a config to the model, learner, optimiser, meta-step and task sources, through
  registries of datasets, models and algorithms; the config's fields, validation and loading
  (the default values live in `experiments/configs/default.py`).
- `train`: the training loop (setup, restore, train, evaluate, finish), `restore_learner` and
  `evaluate_checkpoint`.
- `checkpoint`: orbax-checkpoint checkpoints (keep-N plus the best) verified by a digest on
  restore, with a fall-back past a broken newest one; atomic writes of a run's small files.
- `metrics`: metric writers (JSON lines, TensorBoard), progress lines, reading and plotting runs.
- `lock`: one writer per workdir, an flock the kernel releases when its holder dies.
- `classify`: few-shot classification of a folder of your own images with a trained model.

Library code outside this package never reads flags, files or clocks.
"""

from metajax.experiment import build, checkpoint, classify, lock, metrics, train

__all__ = ["build", "checkpoint", "classify", "lock", "metrics", "train"]
