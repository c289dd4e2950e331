"""Your own Flax model through metajax.nn.adapters: exact float64 second-order meta-gradients.

Each adapter's meta-gradient (ANIL + zeroing + second-order MAML, and full second-order MAML) is
checked against central finite differences, and against the same inner loop written by hand on
the framework's own API; no mask or wrapper is written for either model.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx
from jax.test_util import check_grads

import metajax as mj

FD_TOL = 1e-5  # float64 central finite differences (check_grads' step)
F64_TOL = 1e-12  # float64 agreement of two exact computations of the same gradient
INNER_LR = 0.3
WAYS = 3


class LinenCNN(nn.Module):
  """A user's Linen CNN: conv -> nn.BatchNorm -> softplus, twice, then a Dense head."""

  dtype: Any = jnp.float64

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i in range(2):
      x = nn.Conv(3, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                       param_dtype=self.dtype)(x)
      x = nn.softplus(x)  # smooth, so that finite differences apply
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(WAYS, dtype=self.dtype, param_dtype=self.dtype, name="head")(x)


class NNXNet(nnx.Module):
  """A user's NNX model: Linear -> nnx.BatchNorm -> tanh -> Linear head."""

  def __init__(self, rngs: nnx.Rngs):
    self.body = nnx.Linear(4, 5, param_dtype=jnp.float64, rngs=rngs)
    self.norm = nnx.BatchNorm(5, param_dtype=jnp.float64, rngs=rngs)
    self.head = nnx.Linear(5, WAYS, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.norm(self.body(x))))


def _tasks(seed, input_shape, num_tasks=2, shots=2, queries=2):
  rng = np.random.default_rng(seed)
  n, m = WAYS * shots, WAYS * queries
  return mj.Task(jnp.asarray(rng.normal(size=(num_tasks, n, *input_shape))),
                 jnp.tile(jnp.arange(WAYS).repeat(shots), (num_tasks, 1)),
                 jnp.asarray(rng.normal(size=(num_tasks, m, *input_shape))),
                 jnp.tile(jnp.arange(WAYS).repeat(queries), (num_tasks, 1)))


def _perturbed(params, seed):
  """Params away from init (non-zero head, non-trivial norm scales), same structure."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([w + 0.3 * jnp.asarray(rng.normal(size=jnp.shape(w)), w.dtype)
                            for w in leaves])


def _linen_problem():
  model = mj.linen_model(LinenCNN(), (5, 5, 1), dtype=jnp.float64,
                         call_kwargs={"train": True})
  return model, _perturbed(model.init(jax.random.key(0)), 1), _tasks(2, (5, 5, 1))


def _nnx_problem():
  model = mj.nnx_model(lambda rngs: NNXNet(rngs), (4,))
  return model, _perturbed(model.init(jax.random.key(0)), 1), _tasks(2, (4,))


PROBLEMS = {"linen": _linen_problem, "nnx": _nnx_problem}


def _anil_zeroing(model, num_inner_steps=1):
  return mj.with_zeroing(mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=num_inner_steps,
                                 inner_lr=INNER_LR, adapt_mask=mj.head_mask))


class AdapterExactnessTest(chex.TestCase):

  def _check_anil_zeroing(self, name, jit):
    with jax.enable_x64(True):
      model, params, tasks = PROBLEMS[name]()
      learner = _anil_zeroing(model)
      loss = lambda p: mj.meta_loss(p, tasks, learner)  # noqa: E731
      loss = jax.jit(loss) if jit else loss
      check_grads(loss, (params,), order=1, modes=["rev"], atol=FD_TOL, rtol=FD_TOL)
      grads = jax.grad(loss)(params)
      # The zeroed head gets no outer gradient; the encoder does.
      flags = mj.variants.head_flags(params)
      leaves = jax.tree.leaves(grads)
      self.assertTrue(all(float(jnp.max(jnp.abs(g))) == 0 for g, f in zip(leaves, flags) if f))
      self.assertTrue(any(float(jnp.max(jnp.abs(g))) > 0 for g, f in zip(leaves, flags) if not f))

  @parameterized.named_parameters(("linen", "linen"), ("nnx", "nnx"))
  def test_anil_zeroing_second_order_matches_finite_differences(self, name):
    self._check_anil_zeroing(name, jit=True)

  @parameterized.named_parameters(("linen", "linen"), ("nnx", "nnx"))
  @pytest.mark.slow  # op by op: the same check, eagerly
  def test_anil_zeroing_second_order_matches_finite_differences_without_jit(self, name):
    self._check_anil_zeroing(name, jit=False)

  @parameterized.named_parameters(("linen", "linen"), ("nnx", "nnx"))
  @pytest.mark.slow  # (the mark goes under the parameterization, which keeps it per case)
  def test_full_second_order_two_steps_matches_finite_differences(self, name):
    with jax.enable_x64(True):
      model, params, tasks = PROBLEMS[name]()
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=INNER_LR)
      check_grads(jax.jit(lambda p: mj.meta_loss(p, tasks, learner)), (params,), order=1,
                  modes=["rev"], atol=FD_TOL, rtol=FD_TOL)

  def test_linen_equals_a_hand_written_inner_loop(self):
    with jax.enable_x64(True):
      model, params, tasks = _linen_problem()
      module = LinenCNN()

      def forward(p, x):  # Flax's own API: batch statistics, running averages dropped
        return module.apply({"params": p}, x, train=True, mutable=["batch_stats"])[0]

      def hand_loss(p):
        losses = []
        for t in range(tasks.support_x.shape[0]):
          head = jax.tree.map(lambda w: w * 0, p["head"])  # zeroing
          def support_loss(h):
            return mj.cross_entropy(forward({**p, "head": h}, tasks.support_x[t]),
                                    tasks.support_y[t])
          head = jax.tree.map(lambda w, g: w - INNER_LR * g, head, jax.grad(support_loss)(head))
          losses.append(mj.cross_entropy(forward({**p, "head": head}, tasks.query_x[t]),
                                         tasks.query_y[t]))
        return sum(losses) / len(losses)

      want = jax.jit(jax.grad(hand_loss))(params["params"])
      got = jax.jit(jax.grad(lambda p: mj.meta_loss(p, tasks, _anil_zeroing(model))))(params)[
        "params"]
      chex.assert_trees_all_close(got, want, rtol=F64_TOL, atol=F64_TOL)

  def test_nnx_equals_a_hand_written_inner_loop(self):
    with jax.enable_x64(True):
      model, params, tasks = _nnx_problem()
      net = NNXNet(nnx.Rngs(0))
      graphdef, _, rest = nnx.split(net, nnx.Param, ...)

      def forward(p, x):
        m = nnx.merge(graphdef, p, rest, copy=True)
        m.train()
        return m(x)

      def hand_loss(p):
        losses = []
        for t in range(tasks.support_x.shape[0]):
          def support_loss(q):
            return mj.cross_entropy(forward(q, tasks.support_x[t]), tasks.support_y[t])
          adapted = jax.tree.map(lambda w, g: w - INNER_LR * g, p, jax.grad(support_loss)(p))
          losses.append(mj.cross_entropy(forward(adapted, tasks.query_x[t]), tasks.query_y[t]))
        return sum(losses) / len(losses)

      learner = mj.MAML(model.apply, mj.cross_entropy, inner_lr=INNER_LR)
      want = jax.jit(jax.grad(hand_loss))(params)
      got = jax.jit(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)))(params)
      chex.assert_trees_all_close(got, want, rtol=F64_TOL, atol=F64_TOL)


class AdapterBatchNormTest(chex.TestCase):

  def test_linen_batch_mode_uses_each_batch_and_stored_mode_the_stored_statistics(self):
    with jax.enable_x64(True):
      model, params, tasks = _linen_problem()
      x = tasks.query_x[0]
      # Batch statistics: one example's output depends on the rest of its batch.
      self.assertFalse(np.allclose(model.apply(params, x)[:1], model.apply(params, x[:2])[:1]))
      stats = mj.nn.adapters.linen_batch_stats(
        LinenCNN(), params, x, call_kwargs={"train": True})
      stored = mj.linen_model(LinenCNN(), (5, 5, 1), batch_norm="stored", batch_stats=stats,
                              dtype=jnp.float64, call_kwargs={"train": False})
      # Stored statistics: inductive, each example on its own.
      np.testing.assert_allclose(stored.apply(params, x)[:1], stored.apply(params, x[:1]),
                                 rtol=F64_TOL)
      want = LinenCNN().apply({"params": params["params"], "batch_stats": stats}, x, train=False)
      np.testing.assert_array_equal(stored.apply(params, x), want)

  def test_nnx_stored_mode_is_inductive(self):
    with jax.enable_x64(True):
      model = mj.nnx_model(NNXNet(nnx.Rngs(0)), (4,), batch_norm="stored")
      params = model.init(jax.random.key(0))
      x = _tasks(0, (4,)).query_x[0]
      np.testing.assert_allclose(model.apply(params, x)[:1], model.apply(params, x[:1]),
                                 rtol=F64_TOL)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "batch_norm must be one of .*got 'running'"):
      mj.linen_model(LinenCNN(), (5, 5, 1), batch_norm="running")
    with self.assertRaisesRegex(ValueError, "batch_norm='stored' needs batch_stats="):
      mj.linen_model(LinenCNN(), (5, 5, 1), batch_norm="stored")
    with self.assertRaisesRegex(TypeError, "module must be a flax.linen Module, got int"):
      mj.linen_model(3, (5, 5, 1))
    with self.assertRaisesRegex(TypeError, "module must be an nnx.Module or a factory"):
      mj.nnx_model(3, (4,))


class ModelDtypeTest(parameterized.TestCase):

  @parameterized.named_parameters(
    ("conv4", lambda d: mj.conv4(2, filters=2, input_shape=(16, 16, 1), dtype=d)),
    ("kao_conv", lambda d: mj.kao_conv(2, filters=2, dtype=d)),
    ("mlp", lambda d: mj.mlp(2, hidden=(3,), input_shape=(2,), dtype=d)))
  def test_float64_params_and_outputs(self, build):
    with jax.enable_x64(True):
      model = build(jnp.float64)
      params = jax.eval_shape(model.init, jax.random.key(0))  # shapes and dtypes, no compile
      self.assertEqual({w.dtype for w in jax.tree.leaves(params)}, {jnp.dtype(jnp.float64)})
      x = jax.ShapeDtypeStruct((2, *model.input_shape), jnp.float64)
      self.assertEqual(jax.eval_shape(model.apply, params, x).dtype, jnp.float64)
