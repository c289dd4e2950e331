"""Tests of the joint-training baseline: batches with global labels, the pre-training step,
fine-tuning learners, adaptation trajectories, and MAML beating pre-training on sinusoids."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.algorithms import pretrain
from metajax.data import make_sinusoid_sampler, sample_meta_batch

F64_TOL = 1e-10
F32_TOL = 1e-5
C, M, SIZE = 7, 4, 6


def _labelled_pool() -> np.ndarray:
  """Image (c, m) is the constant c + (m + 1) / 10: its value names its class and index."""
  ids = np.arange(C)[:, None] + (np.arange(M)[None, :] + 1) / 10.0
  return np.broadcast_to(ids[:, :, None, None, None], (C, M, SIZE, SIZE, 1)).astype(np.float32)


class DataTest(chex.TestCase):

  def test_class_batch_has_global_labels(self):
    pool = _labelled_pool()
    sample = pretrain.make_class_batch_sampler(pool, classes_per_batch=3, images_per_class=2)
    x, y = jax.jit(sample)(jax.random.key(0), pool)
    chex.assert_shape([x, y], [(6, SIZE, SIZE, 1), (6,)])
    value = np.asarray(x)[:, 0, 0, 0]
    np.testing.assert_array_equal(np.floor(value + 1e-4).astype(int), y)  # label = class index
    self.assertLen(np.unique(np.asarray(y)), 3)
    np.testing.assert_array_equal(np.asarray(y)[::2], np.asarray(y)[1::2])  # class-major
    self.assertTrue(np.all(value[::2] != value[1::2]))  # distinct images of a class
    with self.assertRaisesRegex(ValueError, "do not fit"):
      pretrain.make_class_batch_sampler(pool, classes_per_batch=C + 1)

  def test_tasks_to_batch_pools_support_and_query(self):
    tasks = sample_meta_batch(make_sinusoid_sampler(3, 2), jax.random.key(1), num_tasks=4)
    x, y = pretrain.tasks_to_batch(tasks)
    chex.assert_shape([x, y], [(20, 1), (20, 1)])
    np.testing.assert_array_equal(x[:3], tasks.support_x[0])
    np.testing.assert_array_equal(y[12:14], tasks.query_y[0])


def _blobs(key, n=24, ways=3, dim=4, dtype=jnp.float32):
  kx, ky = jax.random.split(key)
  y = jax.random.randint(ky, (n,), 0, ways)
  x = 2.0 * jnp.eye(ways, dim, dtype=dtype)[y] + jax.random.normal(kx, (n, dim), dtype)
  return x, y


class PretrainStepTest(chex.TestCase):

  def test_step_is_the_optax_update_and_reduces_the_loss(self):
    with jax.enable_x64(True):
      model = mj.mlp(3, hidden=(8,), input_shape=(4,))
      params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(2)))
      batch = _blobs(jax.random.key(3), dtype=jnp.float64)
      objective = pretrain.supervised_objective(model.apply, mj.cross_entropy)
      meta_step = pretrain.make_pretrain_step(objective, optax.sgd(0.5))
      state, metrics = meta_step.step(meta_step.init(params), batch)
      grads = jax.jit(jax.grad(lambda p: mj.cross_entropy(model.apply(p, batch[0]), batch[1])))(
        params)
      chex.assert_trees_all_close(state.params,
                                  jax.tree.map(lambda p, g: p - 0.5 * g, params, grads),
                                  rtol=F64_TOL, atol=1e-13)
      self.assertEqual(set(metrics), {"outer/loss", "outer/grad_norm", "outer/accuracy"})
      losses = [float(metrics["outer/loss"])]
      for _ in range(5):
        state, metrics = meta_step.step(state, batch)
        losses.append(float(metrics["outer/loss"]))
      self.assertLess(losses[-1], 0.5 * losses[0])
      self.assertEqual(int(state.step), 6)


class FinetuneTest(chex.TestCase):

  @parameterized.parameters(True, False)
  def test_fresh_head_finetuning_of_a_wider_pretrained_net(self, head_only):
    big = mj.mlp(10, hidden=(8,), input_shape=(4,))  # "pre-trained" on 10 classes
    small = mj.mlp(3, hidden=(8,), input_shape=(4,))  # 3-way test tasks
    pretrained = big.init(jax.random.key(6))
    params = pretrain.with_head(pretrained, small.init(jax.random.key(7))["head"])
    x, y = _blobs(jax.random.key(8), n=12)
    tasks = jax.tree.map(lambda a: a[None], mj.Task(x[:6], y[:6], x[6:], y[6:]))
    learner = pretrain.finetune_learner(small.apply, mj.cross_entropy, num_inner_steps=5,
                                        inner_lr=0.5, head_only=head_only, fresh_head=True)
    per_task = jax.jit(lambda p: mj.evaluate_tasks(learner, p, tasks))(params)
    np.testing.assert_allclose(per_task["loss_before"], np.log(3.0), rtol=1e-6)
    adapted = learner.adapt(params, x[:6], y[:6])
    encoder_moved = not np.allclose(adapted["encoder"]["dense0"]["kernel"],
                                    pretrained["encoder"]["dense0"]["kernel"])
    self.assertEqual(encoder_moved, not head_only)
    self.assertFalse(np.allclose(adapted["head"]["kernel"], 0.0))


class SinusoidTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_trajectory_closed_form(self):
    with jax.enable_x64(True):
      x = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)[:, None]
      y = 3.0 * x + 1.0
      params = {"w": jnp.zeros((1, 1), jnp.float64), "b": jnp.zeros((1,), jnp.float64)}
      apply_fn = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
      traj = self.variant(lambda p: pretrain.adaptation_trajectory(
        apply_fn, mj.mse, p, x, y, x, inner_lr=0.1, num_steps=2))(params)
      chex.assert_shape(traj, (3, 5, 1))
      np.testing.assert_array_equal(traj[0], 0.0)
      # From 0: grad_w = -2 mean(x y) = -2 * 3 * mean(x^2), grad_b = -2 mean(y) = -2.
      w1, b1 = 0.1 * 2 * 3 * float(jnp.mean(x ** 2)), 0.1 * 2
      np.testing.assert_allclose(traj[1], w1 * x + b1, rtol=F64_TOL)

  def test_maml_adapts_where_pretraining_regresses_to_the_mean(self):
    # Finn et al. 2017 figure 2 on a small budget: 200 outer steps for each method.
    model = mj.mlp(1, hidden=(40, 40))
    params = model.init(jax.random.key(9))
    sample = make_sinusoid_sampler(10, 10)
    maml = mj.make_meta_step(mj.MAML(model.apply, mj.mse, inner_lr=0.01), optax.adam(1e-2))
    joint = pretrain.make_pretrain_step(pretrain.supervised_objective(model.apply, mj.mse),
                                        optax.adam(1e-3))
    batches = jax.jit(jax.vmap(lambda k: sample_meta_batch(sample, k, num_tasks=25)))(
      jax.random.split(jax.random.key(10), 200))
    maml_state, joint_state = maml.init(params), joint.init(params)
    for i in range(200):
      tasks = jax.tree.map(lambda a, i=i: a[i], batches)
      maml_state, _ = maml.step(maml_state, tasks)
      joint_state, _ = joint.step(joint_state, pretrain.tasks_to_batch(tasks))
    test = sample_meta_batch(sample, jax.random.key(11), num_tasks=100)
    mse = jax.jit(lambda p: pretrain.adaptation_mse(model.apply, p, test, inner_lr=0.01,
                                                    num_steps=10))
    maml_mse, joint_mse = mse(maml_state.params), mse(joint_state.params)
    self.assertLess(float(maml_mse[1]), float(jnp.min(joint_mse)))
    self.assertLess(float(maml_mse[10]), float(jnp.min(joint_mse)))
    self.assertLess(float(maml_mse[10]), float(maml_mse[0]))  # MAML's steps help
    comparison = pretrain.sinusoid_comparison(
      jax.random.key(12), model.apply, {"maml": maml_state.params, "joint": joint_state.params},
      steps=(0, 1, 10), num_points=50)
    chex.assert_shape([comparison.predictions["maml"], comparison.mse["joint"], comparison.x,
                       comparison.support_x], [(3, 50), (3,), (50,), (10,)])
    np.testing.assert_allclose(comparison.predictions["joint"][0],
                               model.apply(joint_state.params, comparison.x[:, None])[:, 0],
                               rtol=F32_TOL, atol=1e-6)


if __name__ == "__main__":
  pytest.main([__file__])
