"""One process of the multi-process test (`test_distributed.py`): N outer steps of second-order
MAML on synthetic tasks, the meta-batch's rows sampled and fed per process, params saved by the
primary process. Also runs as a single process (`--num_processes=1`), the reference."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metajax as mj
from metajax.platform import sharding

WAYS, SHOTS, QUERIES, DIM = 3, 2, 4, 5


def sample_task(key: jax.Array) -> mj.Task:
  """A task of `WAYS` Gaussian classes around random means, from its own key."""
  k_mean, k_s, k_q = jax.random.split(key, 3)
  means = 2.0 * jax.random.normal(k_mean, (WAYS, DIM), jnp.float64)
  sy, qy = jnp.arange(WAYS).repeat(SHOTS), jnp.arange(WAYS).repeat(QUERIES)
  sx = means[sy] + 0.5 * jax.random.normal(k_s, (WAYS * SHOTS, DIM), jnp.float64)
  qx = means[qy] + 0.5 * jax.random.normal(k_q, (WAYS * QUERIES, DIM), jnp.float64)
  return mj.Task(sx, sy, qx, qy)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--num_tasks", type=int, default=4)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", required=True)
  args = p.parse_args()
  jax.config.update("jax_enable_x64", True)
  if args.num_processes > 1:
    sharding.initialize_distributed(coordinator_address=f"127.0.0.1:{args.port}",
                                    num_processes=args.num_processes, process_id=args.process_id,
                                    initialization_timeout=60)
  mesh = sharding.task_mesh()
  model = mj.mlp(WAYS, hidden=(8,), input_shape=(DIM,))
  params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0)))
  learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1)
  meta_step = mj.make_meta_step(learner, optax.adam(1e-2),
                                shardings=sharding.meta_step_shardings(mesh))
  state = sharding.replicate(meta_step.init(params), mesh)
  rows = sharding.local_task_slice(args.num_tasks, mesh)
  losses = []
  for t in range(args.steps):
    # Every process splits the same key as one process would, and samples only its own rows.
    keys = jax.random.split(jax.random.fold_in(jax.random.key(1), t), args.num_tasks)[rows]
    local = jax.vmap(sample_task)(keys)
    state, metrics = meta_step.step(
      state, sharding.shard_local_tasks(local, args.num_tasks, mesh))
    losses.append(float(np.asarray(metrics["outer/loss"].addressable_data(0))))
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  # process 0's bytes reach every process unchanged: a negative zero and a NaN's payload too
  mine = np.asarray([-0.0, np.nan, 1.5]).tobytes() + b"".join(x.tobytes() for x in leaves)
  sent = sharding.broadcast_bytes(mine if sharding.is_primary() else None)
  print(f"process {jax.process_index()}: broadcast {'equal' if sent == mine else 'differs'}")
  if sharding.is_primary():
    np.savez(args.out, *leaves, losses=np.asarray(losses),
             processes=jax.process_count(), devices=len(mesh.devices.flat))
  print(f"process {jax.process_index()}: rows {rows.start}..{rows.stop - 1}, losses {losses}")


if __name__ == "__main__":
  main()
