"""MAML++'s options of `MAML` (Antoniou et al. 2019), each alone and against hand-written loops.

multi-step loss (`step_loss_weights`, `multi_step_loss_weights`), per-layer per-step learned
inner lrs (`learn_inner_lr="step"`), per-step normalisation params (`per_step_params`), and
derivative-order annealing (`first_order_steps`). Every exactness check runs in float64, with
and without `jit`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import metajax as mj

F64_TOL = 1e-10  # float64 agreement of two exact computations of the same quantity
FD_TOL = 1e-6  # float64 central differences
FD_EPS = 1e-5
STEPS = 3
INNER_LR = 0.3


def _apply(params, x):
  """A tiny classifier with a normalisation layer: scale-and-shift, tanh features, linear head."""
  h = x * params["norm"]["scale"] + params["norm"]["bias"]
  h = jnp.tanh(h @ params["body"]["w"])
  return h @ params["head"]["w"] + params["head"]["b"]


def _params(key, dtype=jnp.float64):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {"norm": {"scale": 1.0 + 0.1 * jax.random.normal(k1, (3,), dtype),
                   "bias": 0.1 * jax.random.normal(k2, (3,), dtype)},
          "body": {"w": jax.random.normal(k3, (3, 4), dtype)},
          "head": {"w": 0.5 * jax.random.normal(k4, (4, 3), dtype), "b": jnp.zeros(3, dtype)}}


def _tasks(key, num_tasks=2, dtype=jnp.float64):
  ks, kq = jax.random.split(key)
  sy = jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1))
  qy = jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1))
  centres = jnp.array([[1.0, 0.0, 0.5], [-0.5, 0.9, 0.0], [-0.5, -0.9, -0.5]], dtype)
  return mj.Task(centres[sy] + 0.5 * jax.random.normal(ks, (num_tasks, 6, 3), dtype), sy,
                 centres[qy] + 0.5 * jax.random.normal(kq, (num_tasks, 6, 3), dtype), qy)


def _maml(**kwargs):
  return mj.MAML(_apply, mj.cross_entropy, num_inner_steps=kwargs.pop("steps", STEPS),
                 inner_lr=INNER_LR, **kwargs)


def _one_task(tasks):
  return jax.tree.map(lambda a: a[0], tasks)


def _loss(params, x, y):
  return mj.cross_entropy(_apply(params, x), y)


def _gd(params, x, y, lrs, step_params=lambda p, k: p, adapt=lambda path: True):
  """Hand-written inner loop: step k takes lr `lrs(k, path)` on the params of `step_params`."""
  trajectory = []
  for k in range(STEPS):
    grads = jax.grad(_loss)(step_params(params, k), x, y)
    params = jax.tree_util.tree_map_with_path(
      lambda path, w, g: w - lrs(k, path) * g if adapt(path) else w, params, grads)
    trajectory.append(params)
  return trajectory


class MultiStepLossWeightsTest(parameterized.TestCase):

  @parameterized.parameters((5, 10, 500), (5, 15, 500), (3, 2, 7), (1, 4, 10))
  def test_they_follow_the_papers_annealing(self, steps, epochs, per_epoch):
    weights = mj.multi_step_loss_weights(steps, epochs, steps_per_epoch=per_epoch)
    for outer_step in (0, per_epoch - 1, per_epoch, 3 * per_epoch + 1, epochs * per_epoch - 1,
                       epochs * per_epoch, 10 * epochs * per_epoch):
      epoch = outer_step // per_epoch
      # The reference code's loop (Antoniou et al.'s get_per_step_loss_importance_vector), and
      # the last step alone once the multi-step epochs are over.
      expected = np.full(steps, 1.0 / steps)
      if epoch < epochs:
        decay, floor = 1.0 / steps / epochs, 0.03 / steps
        for i in range(steps - 1):
          expected[i] = max(expected[i] - epoch * decay, floor)
        expected[-1] = min(expected[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
      else:
        expected = np.eye(steps)[-1]
      got = np.asarray(weights(jnp.asarray(outer_step)))
      np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=f"step {outer_step}")
      np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-6)

  def test_bad_arguments_are_named(self):
    with self.assertRaisesRegex(ValueError, "num_epochs must be an int >= 1, got 0"):
      mj.multi_step_loss_weights(5, 0)
    with self.assertRaisesRegex(ValueError, r"min_weight must be in \[0, 1\], got 2"):
      mj.multi_step_loss_weights(5, 3, min_weight=2)


class MultiStepLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_last_step_weights_equal_the_plain_loss(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(0)), _tasks(jax.random.key(1))
      plain, last = _maml(), _maml(step_loss_weights=jnp.eye(STEPS)[-1])
      plain_loss, plain_grads = jax.value_and_grad(mj.meta_loss)(params, tasks, plain)
      last_loss, last_grads = self.variant(jax.value_and_grad(
        lambda p: mj.meta_loss(p, tasks, last)))(params)
      np.testing.assert_allclose(last_loss, plain_loss, rtol=F64_TOL)
      chex.assert_trees_all_close(last_grads, plain_grads, rtol=F64_TOL, atol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_it_is_the_weighted_query_loss_after_each_step(self):
    with jax.enable_x64(True):
      params, task = _params(jax.random.key(2)), _one_task(_tasks(jax.random.key(3)))
      weights = jnp.array([0.2, 0.3, 0.5])
      learner = _maml(step_loss_weights=weights)

      def by_hand(p):
        trajectory = _gd(p, task.support_x, task.support_y, lambda k, path: INNER_LR)
        return sum(w * _loss(q, task.query_x, task.query_y) for w, q in zip(weights, trajectory))

      def loss(p):
        return learner.task_loss(p, task)[0]

      got, grads = self.variant(jax.value_and_grad(loss))(params)
      want, want_grads = jax.value_and_grad(by_hand)(params)
      np.testing.assert_allclose(got, want, rtol=F64_TOL)
      chex.assert_trees_all_close(grads, want_grads, rtol=F64_TOL, atol=F64_TOL)
      _, metrics = learner.task_loss(params, task)
      np.testing.assert_allclose(metrics["outer/query_loss"], _loss(
        _gd(params, task.support_x, task.support_y, lambda k, path: INNER_LR)[-1], task.query_x,
        task.query_y), rtol=F64_TOL)

  def test_an_annealed_loss_needs_the_outer_step_and_is_plain_without_it(self):
    with jax.enable_x64(True):
      params, task = _params(jax.random.key(4)), _one_task(_tasks(jax.random.key(5)))
      annealed = _maml(step_loss_weights=mj.multi_step_loss_weights(STEPS, 2, steps_per_epoch=3))
      plain = _maml()
      np.testing.assert_allclose(annealed.task_loss(params, task)[0],
                                 plain.task_loss(params, task)[0], rtol=F64_TOL)
      uniform = _maml(step_loss_weights=jnp.full(STEPS, 1.0 / STEPS))
      np.testing.assert_allclose(annealed.at_step(jnp.asarray(2)).task_loss(params, task)[0],
                                 uniform.task_loss(params, task)[0], rtol=F64_TOL)

  def test_weights_of_the_wrong_length_are_refused(self):
    with self.assertRaisesRegex(ValueError, r"one weight per inner step, shape \(3,\), got "
                                r"shape \(2,\)"):
      _maml(step_loss_weights=jnp.ones(2))


class PerStepLearningRatesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_step_k_takes_its_own_learned_lr_per_tensor(self):
    with jax.enable_x64(True):
      params, task = _params(jax.random.key(6)), _one_task(_tasks(jax.random.key(7)))
      learner = _maml(learn_inner_lr="step")
      meta = learner.init(params)
      chex.assert_trees_all_equal_shapes(meta["inner_lr"], jax.tree.map(
        lambda p: jnp.zeros(STEPS), params))
      # Distinct lrs for every (tensor, step).
      meta["inner_lr"] = jax.tree.map(
        lambda lr, i: lr * (1.0 + 0.1 * i + 0.03 * jnp.arange(STEPS)), meta["inner_lr"],
        jax.tree.unflatten(jax.tree.structure(params), range(len(jax.tree.leaves(params)))))
      paths = {jax.tree_util.keystr(p): lr for p, lr in
               jax.tree_util.tree_flatten_with_path(meta["inner_lr"])[0]}
      adapted = self.variant(lambda m: learner.adapt(m, task.support_x, task.support_y))(meta)
      want = _gd(params, task.support_x, task.support_y,
                 lambda k, path: paths[jax.tree_util.keystr(path)][k])[-1]
      chex.assert_trees_all_close(adapted, want, rtol=F64_TOL, atol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_the_meta_gradient_of_the_lrs_matches_central_differences(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(8)), _tasks(jax.random.key(9))
      learner = _maml(learn_inner_lr="step")
      meta = learner.init(params)

      def loss(lrs):
        return mj.meta_loss({"params": meta["params"], "inner_lr": lrs}, tasks, learner)

      check_grads(self.variant(loss), (meta["inner_lr"],), order=1, modes=["rev"], eps=FD_EPS, atol=FD_TOL,
                  rtol=FD_TOL)

  def test_more_evaluation_steps_reuse_the_last_learned_lr(self):
    with jax.enable_x64(True):
      params, task = _params(jax.random.key(10)), _one_task(_tasks(jax.random.key(11)))
      meta = _maml(learn_inner_lr="step").init(params)
      meta["inner_lr"] = jax.tree.map(lambda lr: lr * jnp.array([1.0, 0.5, 0.25]),
                                      meta["inner_lr"])
      longer = _maml(learn_inner_lr="step", steps=STEPS + 1)
      adapted = longer.adapt(meta, task.support_x, task.support_y)
      lrs = [INNER_LR, INNER_LR * 0.5, INNER_LR * 0.25, INNER_LR * 0.25]
      p = params
      for lr in lrs:
        p = jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(_loss)(p, task.support_x,
                                                                     task.support_y))
      chex.assert_trees_all_close(adapted, p, rtol=F64_TOL, atol=F64_TOL)


class PerStepParamsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_step_k_uses_copy_k_and_the_copies_stay_fixed(self):
    with jax.enable_x64(True):
      params, task = _params(jax.random.key(12)), _one_task(_tasks(jax.random.key(13)))
      learner = _maml(per_step_params=mj.norm_mask)
      meta = learner.init(params)
      chex.assert_shape(meta["norm"]["scale"], (STEPS, 3))
      meta["norm"] = jax.tree.map(lambda w: w + 0.1 * jnp.arange(STEPS)[:, None], meta["norm"])

      def at(p, k):
        return {**p, "norm": jax.tree.map(lambda w: w[k], meta["norm"])}

      adapted = self.variant(lambda m: learner.adapt(m, task.support_x, task.support_y))(meta)
      trajectory = _gd(params, task.support_x, task.support_y, lambda k, path: INNER_LR,
                       step_params=at, adapt=lambda path: path[0].key != "norm")
      want = at(trajectory[-1], STEPS - 1)
      chex.assert_trees_all_close(adapted, want, rtol=F64_TOL, atol=F64_TOL)
      chex.assert_trees_all_close(learner.model_params(meta), at(params, 0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_the_meta_gradient_matches_central_differences(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(14)), _tasks(jax.random.key(15))
      learner = _maml(per_step_params=mj.norm_mask,
                      step_loss_weights=jnp.array([0.2, 0.3, 0.5]), learn_inner_lr="step")
      meta = learner.init(params)
      meta["params"]["norm"] = jax.tree.map(lambda w: w + 0.1 * jnp.arange(STEPS)[:, None],
                                            meta["params"]["norm"])
      check_grads(self.variant(lambda m: mj.meta_loss(m, tasks, learner)), (meta,), order=1, modes=["rev"],
                  eps=FD_EPS, atol=FD_TOL, rtol=FD_TOL)

  def test_a_mask_that_selects_nothing_is_refused(self):
    learner = mj.MAML(_apply, mj.cross_entropy, inner_lr=0.1, per_step_params=mj.norm_mask)
    with self.assertRaisesRegex(ValueError, "per_step_params selects no leaf"):
      learner.init({"body": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.ones((4, 3))}})


class DerivativeOrderAnnealingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_order_before_the_switch_and_second_order_after(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(16)), _tasks(jax.random.key(17))
      annealed = _maml(first_order_steps=4)

      @self.variant
      def grads(step):
        return jax.grad(mj.meta_loss)(params, tasks, annealed.at_step(step))

      first = jax.grad(mj.meta_loss)(params, tasks, _maml(first_order=True))
      second = jax.grad(mj.meta_loss)(params, tasks, _maml())
      chex.assert_trees_all_close(grads(jnp.asarray(3)), first, rtol=F64_TOL, atol=F64_TOL)
      chex.assert_trees_all_close(grads(jnp.asarray(4)), second, rtol=F64_TOL, atol=F64_TOL)
      # The two differ here, so the comparison above could fail.
      self.assertGreater(optax.tree.norm(jax.tree.map(jnp.subtract, first, second)), 1e-3)

  def test_the_meta_step_anneals_by_its_own_step_counter(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(18)), _tasks(jax.random.key(19))
      annealed = mj.make_meta_step(_maml(first_order_steps=1), optax.sgd(0.1))
      first = mj.make_meta_step(_maml(first_order=True), optax.sgd(0.1))
      second = mj.make_meta_step(_maml(), optax.sgd(0.1))
      state = annealed.step(annealed.init(params), tasks)[0]
      want = first.step(first.init(params), tasks)[0]
      chex.assert_trees_all_close(state.params, want.params, rtol=F64_TOL, atol=F64_TOL)
      state = annealed.step(state, tasks)[0]
      want = second.step(want, tasks)[0]
      chex.assert_trees_all_close(state.params, want.params, rtol=F64_TOL, atol=F64_TOL)

  def test_it_needs_second_order_maml(self):
    with self.assertRaisesRegex(ValueError, "first_order_steps anneals first-order into "
                                "second-order MAML: it needs first_order=False"):
      _maml(first_order=True, first_order_steps=3)
    with self.assertRaisesRegex(ValueError, "first_order_steps must be an int >= 0, got -1"):
      _maml(first_order_steps=-1)


class OptionsOffTest(chex.TestCase):

  def test_without_options_the_learner_is_unchanged_at_every_step(self):
    learner = _maml()
    self.assertIs(learner.at_step(jnp.asarray(7)), learner)

  def test_the_step_path_with_trivial_options_is_the_plain_path(self):
    with jax.enable_x64(True):
      params, tasks = _params(jax.random.key(20)), _tasks(jax.random.key(21))
      tensor = _maml(learn_inner_lr="tensor")
      plain = jax.grad(mj.meta_loss)(tensor.init(params), tasks, tensor)
      meta = _maml(learn_inner_lr="step").init(params)
      stepped = jax.grad(mj.meta_loss)(meta, tasks, _maml(learn_inner_lr="step"))
      chex.assert_trees_all_close(stepped["params"], plain["params"], rtol=F64_TOL,
                                  atol=F64_TOL)
      chex.assert_trees_all_close(jax.tree.map(jnp.sum, stepped["inner_lr"]), plain["inner_lr"],
                                  rtol=F64_TOL, atol=F64_TOL)


if __name__ == "__main__":
  pytest.main([__file__])
