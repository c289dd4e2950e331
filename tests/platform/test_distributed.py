"""Several processes through `jax.distributed` on 127.0.0.1 (CPU, gloo collectives): two
processes, each feeding its own rows of the meta-batch, give the parameters of one process."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from distributed_launch import cpu_env, free_port, run_processes

import metajax as mj
from metajax.platform import sharding

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(commands: list[list[str]]) -> list[str]:
  return run_processes(commands, [cpu_env()] * len(commands))  # one device per process


@pytest.mark.slow  # two processes' start-up and compilation, then the one-process reference
def test_two_processes_equal_one(tmp_path):
  port = free_port()
  two, one = tmp_path / "two.npz", tmp_path / "one.npz"
  outputs = _run([[sys.executable, str(WORKER), f"--process_id={i}", "--num_processes=2",
                   f"--port={port}", f"--out={two}"] for i in range(2)])
  assert "rows 0..1" in outputs[0] and "rows 2..3" in outputs[1], outputs
  assert all("broadcast equal" in out for out in outputs), outputs
  _run([[sys.executable, str(WORKER), "--num_processes=1", f"--out={one}"]])
  two, one = np.load(two), np.load(one)
  assert int(two["processes"]) == 2 and int(two["devices"]) == 2
  assert int(one["processes"]) == 1 and int(one["devices"]) == 1
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-12)
  leaves = [k for k in one.files if k.startswith("arr_")]
  assert leaves and sorted(leaves) == sorted(k for k in two.files if k.startswith("arr_"))
  for k in leaves:
    np.testing.assert_allclose(two[k], one[k], rtol=1e-10, atol=1e-12, err_msg=k)
  assert not np.allclose(one["arr_0"], 0)  # the run moved its params


def test_local_rows_on_one_process():
  mesh = sharding.task_mesh(jax.devices()[:1])
  assert sharding.local_task_slice(6, mesh) == slice(0, 6)
  tasks = mj.Task(jnp.zeros((6, 3, 2)), jnp.zeros((6, 3), jnp.int32), jnp.zeros((6, 4, 2)),
                  jnp.zeros((6, 4), jnp.int32))
  placed = sharding.shard_local_tasks(tasks, 6, mesh)
  assert placed.query_x.shape == (6, 4, 2)
  with pytest.raises(ValueError, match="gave 5 tasks; its devices hold rows 0..5 of the 6-task"):
    sharding.shard_local_tasks(jax.tree.map(lambda x: x[:5], tasks), 6, mesh)
  assert sharding.is_primary()


def test_broadcast_and_devices_on_one_process():
  assert sharding.broadcast_bytes(b"\x00\xff") == b"\x00\xff"
  assert sharding.process_devices(1) == jax.local_devices()[:1]
  too_many = jax.local_device_count() + 1
  with pytest.raises(ValueError, match=rf"process 0 has {too_many - 1} local device\(s\), fewer "
                                       rf"than the {too_many} asked for"):
    sharding.process_devices(too_many)


def test_initialize_from_the_environment_needs_every_variable(monkeypatch):
  monkeypatch.setenv("METAJAX_COORDINATOR", "127.0.0.1:1234")
  monkeypatch.delenv("METAJAX_NUM_PROCESSES", raising=False)
  monkeypatch.delenv("METAJAX_PROCESS_ID", raising=False)
  with pytest.raises(ValueError, match="METAJAX_NUM_PROCESSES, METAJAX_PROCESS_ID not set"):
    sharding.initialize_distributed()
  monkeypatch.setenv("METAJAX_NUM_PROCESSES", "two")
  monkeypatch.setenv("METAJAX_PROCESS_ID", "0")
  with pytest.raises(ValueError, match="METAJAX_NUM_PROCESSES='two' and METAJAX_PROCESS_ID='0' "
                                       "must be integers"):
    sharding.initialize_distributed()
  monkeypatch.setenv("METAJAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("METAJAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"METAJAX_PROCESS_ID=2 is outside 0..1"):
    sharding.initialize_distributed()
