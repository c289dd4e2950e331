"""Tests for metajax.nn.norm: the batch-statistics BatchNorm's JVP rule against the plain formula."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

import metajax as mj
from metajax.nn.norm import batch_stat_norm

F32_TOL = 1e-5
F64_TOL = 1e-10  # fused vs plain in float64: the same maths, different rounding
FD_TOL = 1e-5  # check_grads (central finite differences) in float64


def _inputs(shape, dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  c = shape[-1]
  return (2.0 * jax.random.normal(k[0], shape, dtype) + 1.0, jax.random.normal(k[1], (c,), dtype),
          jax.random.normal(k[2], (c,), dtype), jax.random.normal(k[3], shape, dtype))


def _loss(fused, w):
  """A nonlinear scalar of the normalised output, so every derivative order is non-trivial."""
  return lambda x, s, b: jnp.sum(jnp.tanh(batch_stat_norm(x, s, b, fused=fused)) * w)


def _grad_of_grad(fused, w):
  """A scalar of the gradient wrt x (second order, as MAML's meta-gradient)."""
  return lambda x, s, b: jnp.sum(jax.grad(_loss(fused, w))(x, s, b) ** 2)


class BatchStatNormTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((6, 3), (4, 5, 5, 3), (2, 3, 4, 4, 2))
  def test_value_and_reverse_mode_match_plain(self, *shape):
    x, s, b, w = _inputs(shape)
    chex.assert_trees_all_close(self.variant(lambda *a: batch_stat_norm(*a))(x, s, b),
                                batch_stat_norm(x, s, b, fused=False), atol=F32_TOL, rtol=F32_TOL)
    for f in (_loss, _grad_of_grad):
      got = self.variant(jax.grad(f(True, w), argnums=(0, 1, 2)))(x, s, b)
      want = jax.grad(f(False, w), argnums=(0, 1, 2))(x, s, b)
      chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_third_order_and_forward_modes_float64(self):
    with jax.enable_x64(True):
      x, s, b, w = _inputs((4, 3, 3, 2), jnp.float64)
      t = tuple(jax.random.normal(jax.random.PRNGKey(i), a.shape, jnp.float64)
                for i, a in enumerate((x, s, b)))
      third = lambda fused: jax.grad(lambda *a: jnp.sum(jax.grad(_grad_of_grad(fused, w))(*a)))
      for name, make in {
          "third order": lambda fused: third(fused),
          "jvp": lambda fused: lambda *a: jax.jvp(_loss(fused, w), a, t)[1],
          "jacfwd": lambda fused: jax.jacfwd(lambda x: batch_stat_norm(x[:, 0, 0], s, b,
                                                                       fused=fused)),
          "forward-over-reverse hvp": lambda fused: lambda *a: jax.jvp(
            jax.grad(_loss(fused, w), argnums=(0, 1, 2)), a, t)[1],
      }.items():
        args = (x,) if name == "jacfwd" else (x, s, b)
        with self.subTest(name):
          chex.assert_trees_all_close(self.variant(make(True))(*args), make(False)(*args),
                                      atol=F64_TOL, rtol=F64_TOL)

  def test_check_grads_order2_both_modes_float64(self):
    with jax.enable_x64(True):
      x, s, b, w = _inputs((3, 2, 2, 2), jnp.float64)
      check_grads(_loss(True, w), (x, s, b), order=2, modes=("fwd", "rev"), atol=FD_TOL,
                  rtol=FD_TOL)

  def test_model_meta_gradient_matches_plain_norm(self):
    # Second-order MAML through two Conv-4 blocks: the fused and plain BatchNorms agree.
    with jax.enable_x64(True):
      k1, k2 = jax.random.split(jax.random.PRNGKey(1))
      tasks = mj.Task(jax.random.normal(k1, (2, 3, 8, 8, 1), jnp.float64),
                      jnp.tile(jnp.arange(3), (2, 1)),
                      jax.random.normal(k2, (2, 6, 8, 8, 1), jnp.float64),
                      jnp.tile(jnp.arange(3).repeat(2), (2, 1)))
      grads = []
      for fused in (True, False):
        encoder = mj.nn.models.Conv4Encoder(filters=4, num_blocks=2, activation=jax.nn.softplus,
                                            fused_norm=fused)
        model = mj.model_from_encoder(encoder, 3, (8, 8, 1))
        params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0)))
        learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1)
        grads.append(mj.platform.xla.jit(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)))(params))
      chex.assert_trees_all_close(grads[0], grads[1], atol=F64_TOL, rtol=F64_TOL)
      self.assertGreater(max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[0])), 0)

  def test_bad_shapes_raise(self):
    with self.assertRaisesRegex(ValueError, r"rank >= 2.*\(3,\)"):
      batch_stat_norm(jnp.zeros(3), jnp.ones(3), jnp.zeros(3))
    with self.assertRaisesRegex(ValueError, r"scale \(4,\) and bias \(3,\).*\(3,\)"):
      batch_stat_norm(jnp.zeros((2, 3)), jnp.ones(4), jnp.zeros(3))

  def test_statistics(self):
    x, _, _, _ = _inputs((50, 4))
    y = np.asarray(batch_stat_norm(x, jnp.ones(4), jnp.zeros(4), 0.0))
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
