"""The tiny problem the metric learners' tests share: a hand-written `tanh(x W + b)` embedding
(nothing to compile beyond the learner) and NumPy-drawn tasks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import metajax as mj


def features(params, x):
  """`tanh(x W + b)`; the params have an unused head, laid out as `metajax.nn.models`'."""
  return jnp.tanh(x @ params["encoder"]["w"] + params["encoder"]["b"])


def np_features(params, x):
  return np.tanh(x @ params["encoder"]["w"] + params["encoder"]["b"])


def problem(seed, *, ways, shots, queries, dim, width, num_tasks=2, dtype=np.float32,
            separation=0.0):
  """Params, and tasks whose class-j inputs are centred at `separation * e_j` (0: pure noise),
  drawn with NumPy (no per-op compiles)."""
  rng = np.random.default_rng(seed)
  params = {"encoder": {"w": rng.normal(size=(dim, width)) / np.sqrt(dim), "b": np.zeros(width)},
            "head": {"kernel": rng.normal(size=(width, ways)), "bias": np.zeros(ways)}}
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  centres = separation * np.eye(ways, dim)
  sy = np.tile(np.arange(ways).repeat(shots), (num_tasks, 1))
  qy = np.tile(np.arange(ways).repeat(queries), (num_tasks, 1))
  sx = centres[sy] + rng.normal(size=sy.shape + (dim,))
  qx = centres[qy] + rng.normal(size=qy.shape + (dim,))
  return params, mj.Task(sx.astype(dtype), sy.astype(np.int32), qx.astype(dtype),
                         qy.astype(np.int32))


def first(tasks):
  return jax.tree.map(lambda x: x[0], tasks)
