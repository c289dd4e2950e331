"""UMTRA: unsupervised meta-learning with tasks made by random sampling and augmentation.

Khodadadeh et al. (2019) build N-way tasks with no labels at all: draw N images from an
unlabelled pool, give each its own class, and make the query example of class j an augmentation
of image j (the support example being the image itself, or another augmentation of it). MAML,
with or without the zeroing trick, then meta-trains on these tasks unchanged:

    sample = make_umtra_sampler(pool, ways=5, queries=1, augment=make_affine_augment())
    tasks = sample_meta_batch(sample, key, images, num_tasks=32)   # like any episode sampler
    state, metrics = make_meta_step(learner, optax.adam(1e-3)).step(state, tasks)

The labels of the pool are ignored (the `[C, M]` leading axes are flattened into C * M
unlabelled images), so two of the N images can come from the same true class; with N much
smaller than the number of classes this is rare, which is the paper's argument.

Reference: S. Khodadadeh, L. Boloni, M. Shah, Unsupervised Meta-Learning for Few-Shot Image
Classification, NeurIPS 2019, arXiv 1811.11819.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from metajax.data.augment import Augment, identity_augment
from metajax.data.samplers import (ClassPool, EpisodeSampler, check_count, pool_shape,
                                   to_unit_float, random_subset)
from metajax.types import Array, ArrayLike, PRNGKey, Task


def _views(augment: Augment, key: PRNGKey, images: Array, count: int) -> Array:
  """`count` augmentations of each of N images: `[N, ...] -> [N * count, ...]`, image-major."""
  n = images.shape[0]
  keys = jax.random.split(key, n * count).reshape(n, count)
  per_image = jax.vmap(lambda ks, x: jax.vmap(augment, in_axes=(0, None))(ks, x))(keys, images)
  return per_image.reshape((n * count,) + images.shape[1:])


def sample_umtra_task(
  key: PRNGKey,
  images: ArrayLike,
  *,
  ways: int,
  shots: int = 1,
  queries: int = 1,
  augment: Augment,
  support_augment: Augment = identity_augment,
  dtype: jnp.dtype = jnp.float32,
) -> Task:
  """One UMTRA task, a pure function of `key`.

  `ways` distinct images are drawn uniformly from the `C * M` images of the pool (labels
  ignored); image j is class j. The support set holds `shots` images `support_augment(k, x_j)`,
  the query set `queries` images `augment(k, x_j)`, each with its own key. Layout as
  `metajax.data.sample_episode`: label-major, `support_y = [0]*shots + [1]*shots + ...`.

  Args:
    key: a PRNG key.
    images: the pool `[C, M, H, W, D]` (float in [0, 1], or uint8 scaled to [0, 1] first).
    ways: N, images (= classes) per task; 1 <= N <= C * M.
    shots: support examples per class (the paper: 1, the image itself).
    queries: query examples per class, each a fresh augmentation.
    augment: `(key, image [H, W, D]) -> image`, for the query set (e.g.
      `metajax.data.augment.make_affine_augment()`).
    support_augment: the same for the support set; the default keeps the original image.
    dtype: dtype of the returned images.

  Returns:
    `Task(support_x [N*shots, H, W, D], support_y int32 [N*shots], query_x [N*queries, H, W, D],
    query_y int32 [N*queries])`.
  """
  images = jnp.asarray(images)
  ways, shots, queries = _validate(jnp.shape(images), ways, shots, queries)
  flat = images.reshape((-1,) + images.shape[2:])  # [C*M, H, W, D]: labels ignored
  pick_key, support_key, query_key = jax.random.split(key, 3)
  sources = to_unit_float(flat[random_subset(pick_key, flat.shape[0], ways)], dtype)  # [N, ...]
  support_x = _views(support_augment, support_key, sources, shots)
  query_x = _views(augment, query_key, sources, queries)
  labels = jnp.arange(ways, dtype=jnp.int32)
  support_y = jnp.repeat(labels, shots, total_repeat_length=ways * shots)
  query_y = jnp.repeat(labels, queries, total_repeat_length=ways * queries)
  return Task(support_x.astype(dtype), support_y, query_x.astype(dtype), query_y)


def _validate(pool_shape: Sequence[int], ways: int, shots: int,
              queries: int) -> tuple[int, int, int]:
  ways = check_count("ways", ways, 1)
  shots = check_count("shots", shots, 1)
  queries = check_count("queries", queries, 1)
  if len(pool_shape) < 3:
    raise ValueError(f"the pool must be [classes, images_per_class, ...], got shape "
                     f"{tuple(pool_shape)}")
  total = int(pool_shape[0]) * int(pool_shape[1])
  if ways > total:
    raise ValueError(f"ways={ways} is more than the {total} images in this pool")
  return ways, shots, queries


def make_umtra_sampler(
  pool: ClassPool | ArrayLike | Sequence[int],
  ways: int,
  *,
  shots: int = 1,
  queries: int = 1,
  augment: Augment,
  support_augment: Augment = identity_augment,
  dtype: jnp.dtype = jnp.float32,
) -> EpisodeSampler:
  """Returns `sample(key, images) -> Task` for UMTRA tasks (see `sample_umtra_task`).

  A drop-in replacement for `metajax.data.make_episode_sampler`: same call signature, same
  `Task` layout, jittable and vmappable over keys (`sample_meta_batch`). The sizes are checked
  now against `pool` (a `ClassPool`, its image array, or its shape).
  """
  ways, shots, queries = _validate(pool_shape(pool), ways, shots, queries)

  def sample(key: PRNGKey, images: ArrayLike) -> Task:
    return sample_umtra_task(key, images, ways=ways, shots=shots, queries=queries,
                             augment=augment, support_augment=support_augment, dtype=dtype)

  return sample


__all__ = ["make_umtra_sampler", "sample_umtra_task"]
