"""Sinusoid regression tasks (Finn et al. 2017, section 5.1), as pure functions of a PRNG key.

A task is `y = amplitude * sin(x - phase)` with amplitude ~ U[0.1, 5], phase ~ U[0, pi] and inputs
x ~ U[-5, 5]; K support and Q query points are drawn independently. The split of keys is fixed, so
the task that `make_sinusoid_sampler(...)(key)` returns is exactly `sample_sinusoid(key, ...)[0]`,
and `sample_sinusoid` also returns the amplitude and phase (to plot the true curve with
`sinusoid`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax.data.samplers import check_count
from metajax.types import Array, ArrayLike, PRNGKey, Task

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidParams(NamedTuple):
  """The parameters of one sinusoid task (scalars, or `[num_tasks]` when batched)."""

  amplitude: Array
  phase: Array


def _check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
  low, high = (float(b) for b in bounds)
  if not low <= high:
    raise ValueError(f"{name}={bounds} must be (low, high) with low <= high")
  return low, high


def sinusoid(x: ArrayLike, params: SinusoidParams) -> Array:
  """Returns `amplitude * sin(x - phase)` (broadcasting)."""
  return params.amplitude * jnp.sin(jnp.asarray(x) - params.phase)


def sample_sinusoid_params(
  key: PRNGKey,
  *,
  amplitude_range: tuple[float, float] = AMPLITUDE_RANGE,
  phase_range: tuple[float, float] = PHASE_RANGE,
  dtype: jnp.dtype = jnp.float32,
) -> SinusoidParams:
  """Draws amplitude ~ U[amplitude_range] and phase ~ U[phase_range] (scalars)."""
  amp_low, amp_high = _check_range("amplitude_range", amplitude_range)
  phase_low, phase_high = _check_range("phase_range", phase_range)
  amp_key, phase_key = jax.random.split(key)
  amplitude = jax.random.uniform(amp_key, (), dtype, amp_low, amp_high)
  phase = jax.random.uniform(phase_key, (), dtype, phase_low, phase_high)
  return SinusoidParams(amplitude, phase)


def sinusoid_task(
  key: PRNGKey,
  params: SinusoidParams,
  *,
  shots: int,
  queries: int,
  input_range: tuple[float, float] = INPUT_RANGE,
  dtype: jnp.dtype = jnp.float32,
) -> Task:
  """Draws the points of a sinusoid task with given parameters.

  Args:
    key: a PRNG key.
    params: amplitude and phase (scalars).
    shots: K, the number of support points (>= 1).
    queries: Q, the number of query points (>= 1).
    input_range: x ~ U[input_range].
    dtype: dtype of x and y.

  Returns:
    `Task(support_x [K, 1], support_y [K, 1], query_x [Q, 1], query_y [Q, 1])`, with
    `y = amplitude * sin(x - phase)`.
  """
  shots = check_count("shots", shots, 1)
  queries = check_count("queries", queries, 1)
  low, high = _check_range("input_range", input_range)
  x = jax.random.uniform(key, (shots + queries, 1), dtype, low, high)
  y = sinusoid(x, params).astype(dtype)
  return Task(x[:shots], y[:shots], x[shots:], y[shots:])


def sample_sinusoid(
  key: PRNGKey,
  *,
  shots: int,
  queries: int,
  amplitude_range: tuple[float, float] = AMPLITUDE_RANGE,
  phase_range: tuple[float, float] = PHASE_RANGE,
  input_range: tuple[float, float] = INPUT_RANGE,
  dtype: jnp.dtype = jnp.float32,
) -> tuple[Task, SinusoidParams]:
  """Samples a sinusoid task and returns it with its parameters (see module docstring)."""
  params_key, points_key = jax.random.split(key)
  params = sample_sinusoid_params(
    params_key, amplitude_range=amplitude_range, phase_range=phase_range, dtype=dtype
  )
  task = sinusoid_task(
    points_key, params, shots=shots, queries=queries, input_range=input_range, dtype=dtype
  )
  return task, params


def make_sinusoid_sampler(
  shots: int,
  queries: int,
  *,
  amplitude_range: tuple[float, float] = AMPLITUDE_RANGE,
  phase_range: tuple[float, float] = PHASE_RANGE,
  input_range: tuple[float, float] = INPUT_RANGE,
  dtype: jnp.dtype = jnp.float32,
) -> Callable[[PRNGKey], Task]:
  """Returns `sample(key) -> Task` for sinusoid regression (jittable, vmappable over keys).

  `sample(key)` equals `sample_sinusoid(key, ...)[0]` with the same arguments, so the true
  amplitude and phase of any sampled task can be recovered from its key. Use
  `sample_meta_batch(sample, key, num_tasks=...)` for a batch of tasks.

  Raises:
    ValueError / TypeError: shots or queries not an int >= 1, or a range with low > high.
  """
  shots = check_count("shots", shots, 1)
  queries = check_count("queries", queries, 1)
  for name, bounds in (
    ("amplitude_range", amplitude_range),
    ("phase_range", phase_range),
    ("input_range", input_range),
  ):
    _check_range(name, bounds)

  def sample(key: PRNGKey) -> Task:
    task, _ = sample_sinusoid(
      key,
      shots=shots,
      queries=queries,
      amplitude_range=amplitude_range,
      phase_range=phase_range,
      input_range=input_range,
      dtype=dtype,
    )
    return task

  return sample
