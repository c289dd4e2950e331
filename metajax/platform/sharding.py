"""Data parallelism over tasks: the meta-batch's task axis sharded over a device mesh.

MAML's meta-batch is embarrassingly parallel over tasks, so the natural layout is the task axis of
every `Task` field split over devices and the meta-state replicated. `jax.jit` with these
shardings partitions the `vmap` over tasks (GSPMD) and turns the mean over tasks into an
all-reduce; no `pmap`, no code change in the learner:

    mesh = metajax.platform.sharding.task_mesh()                     # all devices, one axis "tasks"
    meta_step = metajax.make_meta_step(learner, opt, shardings=metajax.platform.sharding.meta_step_shardings(mesh))
    state = metajax.platform.sharding.replicate(meta_step.init(params), mesh)
    state, metrics = meta_step.step(state, metajax.platform.sharding.shard_tasks(tasks, mesh))

Several processes (hosts): call `initialize_distributed(...)` first in every process; `task_mesh()`
then spans the devices of all processes, and each process samples and feeds only the tasks of its
own devices: `local_task_slice` says which rows of the global meta-batch those are (sample them
from the same per-task PRNG keys a single process would use, so the streams are the same), and
`shard_local_tasks` assembles the global array from every process's rows
(`jax.make_array_from_process_local_data`). Every process runs the same step on the global
arrays; the meta-state comes out replicated, and only `is_primary()` should write files (and
read them: `broadcast_bytes` carries process 0's bytes, e.g. a restored checkpoint, to the rest).

    initialize_distributed(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=i)
    mesh = task_mesh()
    keys = jax.random.split(key, num_tasks)[local_task_slice(num_tasks, mesh)]
    state, metrics = meta_step.step(state, shard_local_tasks(sample(keys), num_tasks, mesh))
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metajax.types import PyTree, Task

__all__ = [
  "DISTRIBUTED_ENV",
  "TASK_AXIS",
  "broadcast_bytes",
  "initialize_distributed",
  "is_primary",
  "local_task_slice",
  "meta_step_shardings",
  "process_devices",
  "replicate",
  "replicated",
  "shard_local_tasks",
  "shard_tasks",
  "task_mesh",
  "tasks_sharding",
]

TASK_AXIS = "tasks"
# METAJAX_COORDINATOR=host:port, METAJAX_NUM_PROCESSES=N, METAJAX_PROCESS_ID=i, or
# METAJAX_DISTRIBUTED=1 to let JAX detect the cluster (SLURM, Cloud TPU, ...).
DISTRIBUTED_ENV = ("METAJAX_COORDINATOR", "METAJAX_NUM_PROCESSES", "METAJAX_PROCESS_ID")


def task_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = TASK_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("task_mesh needs at least one device")
  return Mesh(np.asarray(devices), (axis_name,))


def process_devices(per_process: int) -> list[jax.Device]:
  """The first `per_process` local devices of every process, process by process: the devices of
  a `task_mesh` in which each process's devices are contiguous (`local_task_slice`)."""
  devices = []
  for p in range(jax.process_count()):
    local = jax.local_devices(process_index=p)
    if per_process > len(local):
      raise ValueError(f"process {p} has {len(local)} local device(s), fewer than the "
                       f"{per_process} asked for on each process")
    devices.extend(local[:per_process])
  return devices


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


def _check_divisible(num_tasks: int, mesh: Mesh, axis_name: str) -> None:
  num_shards = mesh.shape[axis_name]
  if num_tasks % num_shards:
    raise ValueError(f"the meta-batch has {num_tasks} tasks, which {num_shards} devices cannot "
                     f"share evenly; use a multiple of {num_shards}")


def shard_tasks(tasks: Task, mesh: Mesh, axis_name: str = TASK_AXIS) -> Task:
  """Places a (globally known) batch of tasks with its task axis split over the mesh."""
  _check_divisible(np.shape(tasks.support_x)[0], mesh, axis_name)
  return jax.device_put(tasks, tasks_sharding(mesh, axis_name))


def local_task_slice(num_tasks: int, mesh: Mesh, axis_name: str = TASK_AXIS) -> slice:
  """The rows of a `num_tasks` meta-batch that this process's devices of `mesh` hold.

  The rows are contiguous when the mesh lists each process's devices together, as `task_mesh()`
  over `jax.devices()` does; a mesh that interleaves processes is refused.
  """
  _check_divisible(num_tasks, mesh, axis_name)
  per_device = num_tasks // mesh.shape[axis_name]
  mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  if not mine:
    raise ValueError(f"process {jax.process_index()} has no device in the mesh")
  if mine != list(range(mine[0], mine[0] + len(mine))):
    raise ValueError(f"process {jax.process_index()}'s devices are not contiguous in the mesh "
                     f"(positions {mine}); build it with task_mesh() over jax.devices()")
  return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def shard_local_tasks(local_tasks: Task, num_tasks: int, mesh: Mesh,
                      axis_name: str = TASK_AXIS, *, stacked: bool = False) -> Task:
  """The global `num_tasks` meta-batch, sharded over `mesh`, from this process's rows of it.

  Args:
    local_tasks: the rows `local_task_slice(num_tasks, mesh)` of the meta-batch, as host or
      device arrays (every process passes its own).
    num_tasks: the global meta-batch size.
    mesh: the mesh over every process's devices.
    axis_name: the mesh axis the task axis is split over.
    stacked: the leaves are the meta-batches of several steps, `[steps, rows, ...]` (as
      `MetaStep.steps` takes them): the task axis is the second one.

  Returns:
    A `Task` of global arrays with the task axis split over the mesh (`tasks_sharding`, or
    `PartitionSpec(None, axis_name)` when `stacked`).
  """
  rows = local_task_slice(num_tasks, mesh, axis_name)
  axis = 1 if stacked else 0
  got = np.shape(local_tasks.support_x)[axis]
  if got != rows.stop - rows.start:
    raise ValueError(f"process {jax.process_index()} gave {got} tasks; its devices hold rows "
                     f"{rows.start}..{rows.stop - 1} of the {num_tasks}-task meta-batch")
  sharding = NamedSharding(mesh, PartitionSpec(*(None,) * axis, axis_name))

  def assemble(x):
    shape = np.shape(x)
    return jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (*shape[:axis], num_tasks, *shape[axis + 1:]))

  return jax.tree.map(assemble, local_tasks)


def is_primary() -> bool:
  """Whether this is the process that writes checkpoints, metrics and results (process 0)."""
  return jax.process_index() == 0


def broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's `data` on every process (a collective: every process calls it; the others pass
  None). With one process, `data` itself.

  The bytes travel as uint8 summed with zeros (`multihost_utils.broadcast_one_to_all`), which is
  exact; so a pytree serialised to bytes (e.g. a restored checkpoint) arrives bit for bit.
  """
  if jax.process_count() == 1:
    return data if data is not None else b""
  from jax.experimental import multihost_utils  # noqa: PLC0415 - only for several processes

  source = is_primary()
  if source and data is None:
    raise ValueError("broadcast_bytes: process 0 must pass the bytes to send")
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if source else 0)))
  buffer = np.frombuffer(data, np.uint8) if source else np.zeros(size, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8).tobytes()


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree (e.g. the `MetaState`) fully on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def initialize_distributed(**kwargs: Any) -> bool:
  """Several processes: calls `jax.distributed.initialize(...)` when asked to; call it before
  touching any device.

  Asked means: keyword arguments are given (coordinator_address, num_processes, process_id, ...,
  as `jax.distributed.initialize` takes them); or the environment variables
  `METAJAX_COORDINATOR` (host:port of process 0), `METAJAX_NUM_PROCESSES` and
  `METAJAX_PROCESS_ID` are all set; or `METAJAX_DISTRIBUTED=1`, in which case JAX detects the
  cluster (SLURM, Cloud TPU, ...). Otherwise nothing happens, so binaries can call it
  unconditionally. Returns whether it initialised.
  """
  if not kwargs:
    given = {name: os.environ.get(name) for name in DISTRIBUTED_ENV}
    if any(given.values()):
      missing = [name for name, value in given.items() if not value]
      if missing:
        raise ValueError(f"{', '.join(missing)} not set: a run over several processes needs all "
                         f"of {', '.join(DISTRIBUTED_ENV)}")
      try:
        kwargs = {"coordinator_address": given["METAJAX_COORDINATOR"],
                  "num_processes": int(given["METAJAX_NUM_PROCESSES"]),
                  "process_id": int(given["METAJAX_PROCESS_ID"])}
      except ValueError:
        raise ValueError(f"METAJAX_NUM_PROCESSES={given['METAJAX_NUM_PROCESSES']!r} and "
                         f"METAJAX_PROCESS_ID={given['METAJAX_PROCESS_ID']!r} must be integers"
                         ) from None
      if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
        raise ValueError(f"METAJAX_PROCESS_ID={kwargs['process_id']} is outside 0.."
                         f"{kwargs['num_processes'] - 1} (METAJAX_NUM_PROCESSES="
                         f"{kwargs['num_processes']})")
    elif os.environ.get("METAJAX_DISTRIBUTED") != "1":
      return False
  jax.distributed.initialize(**kwargs)
  return True
