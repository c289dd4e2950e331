"""Meta-SGD (`MAML(learn_inner_lr="element")`): the learned inner learning rates are trained."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj


def _tasks(key, num_tasks=4):
  """3-way tasks in 2-D: class j is a blob around a corner of a triangle, plus unit noise."""
  ks, kq = jax.random.split(key)
  sy = jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1))
  qy = jnp.tile(jnp.arange(3).repeat(3), (num_tasks, 1))
  centres = 2.0 * jnp.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
  return mj.Task(centres[sy] + jax.random.normal(ks, (num_tasks, 6, 2)), sy,
                 centres[qy] + jax.random.normal(kq, (num_tasks, 9, 2)), qy)


class MetaSGDTest(chex.TestCase):

  def test_steps_change_the_learned_lrs_and_reduce_the_meta_loss(self):
    model = mj.mlp(3, hidden=(8,), input_shape=(2,))
    tasks = _tasks(jax.random.key(0))
    # (Not with zeroing: at a zero head the encoder's inner gradient, hence its lrs' meta-gradient
    # after one step, is exactly 0.)
    learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=0.1,
                      learn_inner_lr="element")
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2))
    state = meta_step.init(model.init(jax.random.key(1)))
    initial_lrs = jax.tree.map(np.asarray, state.params["inner_lr"])
    losses = []
    for _ in range(6):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
    self.assertLess(losses[-1], losses[0])
    lrs = state.params["inner_lr"]
    chex.assert_trees_all_equal_shapes(lrs, state.params["params"])  # one lr per entry
    # Every tensor's lrs moved away from 0.1, and not all by the same amount: one per entry.
    for before, after in zip(jax.tree.leaves(initial_lrs), jax.tree.leaves(lrs)):
      self.assertGreater(float(jnp.max(jnp.abs(after - before))), 1e-4)
    head_lrs = np.asarray(lrs["head"]["kernel"]).ravel()
    self.assertGreater(float(head_lrs.std()), 1e-5)


if __name__ == "__main__":
  pytest.main([__file__])
