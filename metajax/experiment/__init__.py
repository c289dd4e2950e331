"""The machinery behind the experiment binaries: everything that reads a config or touches files.

- `build`: from a config to the model, learner, optimiser, meta-step and task sources, through
  registries of datasets, models and algorithms, and the config's validation.
- `train`: the training loop (setup, restore, train, evaluate, finish) and `restore_learner`.
- `checkpoint`: checksummed, atomically written checkpoints; resume.
- `metrics`: metric writers (JSON lines, TensorBoard), progress lines, reading and plotting runs.
- `classify`: few-shot classification of a folder of your own images with a trained model.

Library code outside this package never reads flags, files or clocks.
"""

from metajax.experiment import build, checkpoint, classify, metrics, train

__all__ = ["build", "checkpoint", "classify", "metrics", "train"]
