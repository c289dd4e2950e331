"""Datasets as numpy class pools, and tasks as pure functions of a PRNG key.

Files -> `ClassPool` (host numpy, cached on disk): `load_omniglot`, `omniglot_split`,
`load_tfds_omniglot`, `load_miniimagenet`. Pool -> episodes on device: `make_episode_sampler`,
`sample_meta_batch`. Synthetic tasks: `make_sinusoid_sampler`, `sample_sinusoid`. Submodules
`augment` (random affine transforms of image batches) and `umtra` (unsupervised tasks from
unlabelled images, Hsu et al.'s UMTRA) work on those pools.
"""

from metajax.data import omniglot as _omniglot
from metajax.data.cache import CACHE_DIR_ENV
from metajax.data.download import DownloadError, default_omniglot_dir, download_omniglot
from metajax.data.miniimagenet import (
  MINIIMAGENET_DIR_ENV,
  find_miniimagenet_dir,
  load_miniimagenet,
)
from metajax.data.omniglot import (
  OMNIGLOT_DIR_ENV,
  CorruptDataError,
  add_rotations,
  find_omniglot_dir,
  finn_character_order,
  load_omniglot,
  omniglot_split,
)
from metajax.data.samplers import (
  ClassPool,
  EpisodeSampler,
  concatenate_pools,
  make_episode_sampler,
  random_subset,
  sample_episode,
  sample_meta_batch,
  validate_episode_spec,
)
from metajax.data.sinusoid import (
  SinusoidParams,
  make_sinusoid_sampler,
  sample_sinusoid,
  sample_sinusoid_params,
  sinusoid,
  sinusoid_task,
)
from metajax.data.tfds_omniglot import load_tfds_omniglot, prepare_tfds_omniglot

from metajax.data import augment, umtra  # noqa: E402 - they build on the pools above

OMNIGLOT_ARCHIVES = _omniglot.ARCHIVES
OMNIGLOT_PUBLISHED_COUNTS = _omniglot.PUBLISHED_COUNTS
OMNIGLOT_SPLITS = _omniglot.SPLITS

__all__ = [
  "CACHE_DIR_ENV",
  "MINIIMAGENET_DIR_ENV",
  "OMNIGLOT_ARCHIVES",
  "OMNIGLOT_DIR_ENV",
  "OMNIGLOT_PUBLISHED_COUNTS",
  "OMNIGLOT_SPLITS",
  "ClassPool",
  "CorruptDataError",
  "DownloadError",
  "EpisodeSampler",
  "SinusoidParams",
  "add_rotations",
  "augment",
  "concatenate_pools",
  "default_omniglot_dir",
  "download_omniglot",
  "find_miniimagenet_dir",
  "find_omniglot_dir",
  "finn_character_order",
  "load_miniimagenet",
  "load_omniglot",
  "load_tfds_omniglot",
  "make_episode_sampler",
  "make_sinusoid_sampler",
  "omniglot_split",
  "prepare_tfds_omniglot",
  "random_subset",
  "sample_episode",
  "sample_meta_batch",
  "sample_sinusoid",
  "sample_sinusoid_params",
  "sinusoid",
  "sinusoid_task",
  "umtra",
  "validate_episode_spec",
]
