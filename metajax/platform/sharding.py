"""Data parallelism over tasks: the meta-batch's task axis sharded over a device mesh.

MAML's meta-batch is embarrassingly parallel over tasks, so the natural layout is the task axis of
every `Task` field split over devices and the meta-state replicated. `jax.jit` with these
shardings partitions the `vmap` over tasks (GSPMD) and turns the mean over tasks into an
all-reduce; no `pmap`, no code change in the learner:

    mesh = metajax.platform.sharding.task_mesh()                     # all devices, one axis "tasks"
    meta_step = metajax.make_meta_step(learner, opt, shardings=metajax.platform.sharding.meta_step_shardings(mesh))
    state = metajax.platform.sharding.replicate(meta_step.init(params), mesh)
    state, metrics = meta_step.step(state, metajax.platform.sharding.shard_tasks(tasks, mesh))

Multi-host: call `jax.distributed.initialize()` first on every host (see `initialize_distributed`);
`task_mesh()` then spans the devices of all hosts and each host feeds the tasks of its own
devices (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metajax.types import PyTree, Task

TASK_AXIS = "tasks"


def task_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = TASK_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("task_mesh needs at least one device")
  return Mesh(np.asarray(devices), (axis_name,))


def tasks_sharding(mesh: Mesh, axis_name: str = TASK_AXIS) -> NamedSharding:
  """Sharding of a batch of tasks: the leading (task) axis split over the mesh."""
  return NamedSharding(mesh, PartitionSpec(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of the meta-state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def meta_step_shardings(mesh: Mesh, axis_name: str = TASK_AXIS) -> tuple[NamedSharding,
                                                                         NamedSharding]:
  """`(state_sharding, tasks_sharding)` for `make_meta_step(..., shardings=...)`."""
  return replicated(mesh), tasks_sharding(mesh, axis_name)


def _check_divisible(tasks: Task, mesh: Mesh, axis_name: str) -> None:
  num_tasks = np.shape(tasks.support_x)[0]
  num_shards = mesh.shape[axis_name]
  if num_tasks % num_shards:
    raise ValueError(f"the meta-batch has {num_tasks} tasks, which {num_shards} devices cannot "
                     f"share evenly; use a multiple of {num_shards}")


def shard_tasks(tasks: Task, mesh: Mesh, axis_name: str = TASK_AXIS) -> Task:
  """Places a (globally known) batch of tasks with its task axis split over the mesh."""
  _check_divisible(tasks, mesh, axis_name)
  return jax.device_put(tasks, tasks_sharding(mesh, axis_name))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree (e.g. the `MetaState`) fully on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def initialize_distributed(**kwargs: Any) -> bool:
  """Multi-host setup: calls `jax.distributed.initialize(**kwargs)` when asked to.

  Asked means: keyword arguments are given (coordinator_address, num_processes, process_id, ...),
  or the environment variable `METAJAX_DISTRIBUTED=1` is set, in which case JAX detects the
  cluster (SLURM, Cloud TPU, ...) from the environment. Otherwise nothing happens, so binaries
  can call it unconditionally before touching any device. Returns whether it initialised.
  """
  if not kwargs and os.environ.get("METAJAX_DISTRIBUTED") != "1":
    return False
  jax.distributed.initialize(**kwargs)
  return True
