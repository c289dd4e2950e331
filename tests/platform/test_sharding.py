"""Multi-device meta-batches: tasks sharded over 4 forced host devices equal one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import metajax as mj
from metajax.platform import sharding

SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np, optax
  import metajax as mj
  from metajax.platform import sharding
  assert jax.device_count() == 4, jax.devices()
  jax.config.update("jax_enable_x64", True)
  model = mj.conv4(3, filters=4, input_shape=(16, 16, 1))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(0)))
  k1, k2 = jax.random.split(jax.random.key(1))
  tasks = mj.Task(jax.random.normal(k1, (8, 3, 16, 16, 1), jnp.float64),
                  jnp.tile(jnp.arange(3), (8, 1)),
                  jax.random.normal(k2, (8, 6, 16, 16, 1), jnp.float64),
                  jnp.tile(jnp.arange(3).repeat(2), (8, 1)))
  learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1)
  mesh = sharding.task_mesh()
  # The meta-gradient itself, on one device and sharded over four.
  grad = jax.jit(jax.grad(lambda p, t: mj.meta_loss(p, t, learner)))
  g1 = grad(params, tasks)
  sharded_tasks = sharding.shard_tasks(tasks, mesh)
  assert len(sharded_tasks.support_x.sharding.device_set) == 4
  g4 = grad(sharding.replicate(params, mesh), sharded_tasks)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
  # Two full meta-steps with the sharded step builder. SGD, not Adam: the conv biases have an
  # exactly-zero gradient (BatchNorm cancels them), and Adam would scale their round-off up.
  single = mj.make_meta_step(learner, optax.sgd(0.1))
  multi = mj.make_meta_step(learner, optax.sgd(0.1),
                            shardings=sharding.meta_step_shardings(mesh))
  s1, s4 = single.init(params), sharding.replicate(multi.init(params), mesh)
  for _ in range(2):
    s1, _ = single.step(s1, tasks)
    s4, m4 = multi.step(s4, sharded_tasks)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
  # Two more as one sharded `steps` call (the stacked batches sharded along their task axis).
  stack = jax.tree.map(lambda x: np.stack([np.asarray(x)] * 2), tasks)
  for _ in range(2):
    s1, _ = single.step(s1, tasks)
  s4, m4 = multi.steps(s4, stack)
  assert m4["outer/loss"].shape == (2,)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
  try:
    sharding.shard_tasks(jax.tree.map(lambda x: x[:6], tasks), mesh)
  except ValueError as e:
    assert "6 tasks" in str(e) and "4 devices" in str(e), e
  else:
    raise AssertionError("6 tasks over 4 devices must be refused")
  print("OK")
""")


@pytest.mark.slow  # about 2 min: four forced devices in a subprocess, float64 MAML twice
def test_sharded_meta_gradient_equals_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_single_device_mesh_and_errors():
  mesh = sharding.task_mesh(jax.devices()[:1])
  tasks = mj.Task(jnp.zeros((2, 3, 2)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4, 2)),
                  jnp.zeros((2, 4), jnp.int32))
  placed = sharding.shard_tasks(tasks, mesh)
  assert placed.support_x.shape == (2, 3, 2)
  with pytest.raises(ValueError, match="at least one device"):
    sharding.task_mesh([])
  assert sharding.initialize_distributed() is False
