"""Tests for metajax.nn.conv: im2col convolution and reshape max-pooling against lax / flax."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import pytest
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax import lax
from jax.test_util import check_grads

from metajax.nn import conv as mconv

# float32 comparisons of a few hundred multiply-adds at HIGHEST precision.
F32_ATOL = 1e-4
F32_RTOL = 1e-4
# check_grads in float64 (finite differences).
F64_TOL = 1e-5

NHWC = ("NHWC", "HWIO", "NHWC")

# (input shape NHWC, kernel (kh, kw), features, strides, padding, rhs_dilation)
CONV_CASES = (
  ("same_3x3", (2, 7, 7, 3), (3, 3), 4, (1, 1), "SAME", None),
  ("valid_stride2", (2, 9, 9, 2), (3, 3), 3, (2, 2), "VALID", None),
  ("same_stride2_odd", (1, 7, 6, 2), (3, 3), 2, (2, 2), "SAME", None),
  ("same_lower", (1, 6, 6, 2), (2, 2), 3, (1, 1), "SAME_LOWER", None),
  ("explicit_asym", (2, 6, 5, 2), (2, 3), 3, (2, 1), ((1, 2), (0, 1)), None),
  ("negative_pad", (1, 8, 8, 2), (3, 3), 2, (1, 1), ((-1, 0), (1, -1)), None),
  ("dilated", (1, 9, 9, 2), (3, 2), 2, (1, 2), "SAME", (2, 3)),
  ("one_by_one", (2, 5, 5, 3), (1, 1), 4, (1, 1), "VALID", None),
  ("one_by_one_stride", (2, 5, 5, 3), (1, 1), 4, (2, 2), "VALID", None),
  ("kao_2x2", (3, 2, 2, 4), (2, 2), 5, (1, 1), "VALID", None),
  ("first_layer_c1", (2, 8, 8, 1), (3, 3), 4, (1, 1), "SAME", None),
)

# The default suite checks derivatives on the layer shapes of Conv-4 and Kao et al.'s net; the
# other cases run in CI's slow step.
FAST = ("same_3x3", "valid_stride2", "kao_2x2", "first_layer_c1")
FAST_CASES = tuple(c for c in CONV_CASES if c[0] in FAST)
SLOW_CASES = tuple(c for c in CONV_CASES if c[0] not in FAST)


def _inputs(shape, kernel, features, dtype=jnp.float32, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, shape, dtype)
  w = jax.random.normal(kw, (*kernel, shape[-1], features), dtype)
  return x, w


def _lax_conv(x, w, strides, padding, dil):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil,
                                  dimension_numbers=NHWC, precision=lax.Precision.HIGHEST)


def _im2col_conv(x, w, strides, padding, dil):
  return mconv.conv_general_dilated_im2col(x, w, strides, padding, rhs_dilation=dil,
                                           dimension_numbers=NHWC,
                                           precision=lax.Precision.HIGHEST)


class _ConvChecks:
  """Derivative checks shared by the fast and the slow test classes."""

  def _check_derivatives(self, shape, kernel, features, strides, padding, dil):
    x, w = _inputs(shape, kernel, features)
    ct = jax.random.normal(jax.random.PRNGKey(1), _lax_conv(x, w, strides, padding, dil).shape)

    def make(conv):
      def f(x, w):  # a nonlinear scalar, so second derivatives are non-trivial
        return jnp.sum(jnp.tanh(conv(x, w, strides, padding, dil)) * ct)

      def g(x, w):  # |grad|^2, whose gradient needs the second derivative of the conv
        gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
        return jnp.sum(gx**2) + jnp.sum(gw**2)

      return f, g

    f_ref, g_ref = make(_lax_conv)
    f_new, g_new = make(_im2col_conv)
    chex.assert_trees_all_close(self.variant(jax.grad(f_new, argnums=(0, 1)))(x, w),
                                jax.grad(f_ref, argnums=(0, 1))(x, w),
                                atol=F32_ATOL, rtol=F32_RTOL)
    chex.assert_trees_all_close(self.variant(jax.grad(g_new, argnums=(0, 1)))(x, w),
                                jax.grad(g_ref, argnums=(0, 1))(x, w),
                                atol=1e-3, rtol=1e-3)
    # Forward-over-reverse (Hessian-vector product) as well.
    tx, tw = _inputs(shape, kernel, features, seed=2)
    hvp = lambda f: jax.jvp(jax.grad(f, argnums=(0, 1)), (x, w), (tx, tw))[1]
    chex.assert_trees_all_close(self.variant(lambda: hvp(f_new))(), hvp(f_ref),
                                atol=1e-3, rtol=1e-3)

  def _check_grads64(self, shape, kernel, features, strides, padding, dil):
    with jax.enable_x64(True):
      x, w = _inputs(shape, kernel, features, dtype=jnp.float64)
      f = lambda x, w: jnp.tanh(mconv.conv_general_dilated_im2col(
        x, w, strides, padding, rhs_dilation=dil, dimension_numbers=NHWC))
      check_grads(f, (x, w), order=2, modes=("fwd", "rev"), atol=F64_TOL, rtol=F64_TOL)


class ConvTest(_ConvChecks, chex.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*FAST_CASES)
  def test_check_grads_order2_float64(self, *case):
    self._check_grads64(*case)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*CONV_CASES)
  def test_forward_matches_lax(self, shape, kernel, features, strides, padding, dil):
    x, w = _inputs(shape, kernel, features)
    got = self.variant(functools.partial(_im2col_conv, strides=strides, padding=padding,
                                         dil=dil))(x, w)
    want = _lax_conv(x, w, strides, padding, dil)
    chex.assert_trees_all_close(got, want, atol=F32_ATOL, rtol=F32_RTOL)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*FAST_CASES)
  def test_first_and_second_derivatives_match_lax(self, *case):
    self._check_derivatives(*case)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_per_example_kernels(self):
    num = 3
    x, _ = _inputs((num, 2, 7, 7, 3), (3, 3), 4)
    w = jax.random.normal(jax.random.PRNGKey(5), (num, 3, 3, 3, 4))
    conv = lambda x, w: _im2col_conv(x, w, (1, 1), "SAME", None)
    got = self.variant(jax.vmap(conv))(x, w)
    want = jnp.stack([_lax_conv(x[i], w[i], (1, 1), "SAME", None) for i in range(num)])
    chex.assert_trees_all_close(got, want, atol=F32_ATOL, rtol=F32_RTOL)

    # Per-example second-order derivative (as in MAML): grad of a loss after one inner step.
    def inner_outer(conv_fn, x, w):
      inner = lambda w: jnp.mean(jnp.tanh(conv_fn(x, w, (1, 1), "SAME", None)) ** 2)
      w1 = w - 0.5 * jax.grad(inner)(w)
      return jnp.mean(jnp.sin(conv_fn(x, w1, (1, 1), "SAME", None)))

    got = self.variant(jax.vmap(jax.grad(functools.partial(inner_outer, _im2col_conv))))(x, w)
    want = jnp.stack([jax.grad(functools.partial(inner_outer, _lax_conv))(x[i], w[i])
                      for i in range(num)])
    chex.assert_trees_all_close(got, want, atol=F32_ATOL, rtol=1e-3)

  def test_dimension_numbers_nchw_default(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8, 7))  # NCHW
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 2))  # OIHW
    for dn in (None, ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")):
      lhs = x if dn is None or dn[0] == "NCHW" else jnp.transpose(x, (0, 2, 3, 1))
      want = lax.conv_general_dilated(lhs, w, (1, 2), "SAME", dimension_numbers=dn,
                                      precision=lax.Precision.HIGHEST)
      got = mconv.conv_general_dilated_im2col(lhs, w, (1, 2), "SAME", dimension_numbers=dn,
                                              precision=lax.Precision.HIGHEST)
      chex.assert_trees_all_close(got, want, atol=F32_ATOL, rtol=F32_RTOL)

  def test_1d_and_3d(self):
    x1 = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 3))
    w1 = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4))
    dn1 = ("NWC", "WIO", "NWC")
    chex.assert_trees_all_close(
      mconv.conv_general_dilated_im2col(x1, w1, (2,), "SAME", dimension_numbers=dn1),
      lax.conv_general_dilated(x1, w1, (2,), "SAME", dimension_numbers=dn1,
                               precision=lax.Precision.HIGHEST), atol=F32_ATOL, rtol=F32_RTOL)
    x3 = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 5, 6, 2))
    w3 = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 2, 2, 3))
    dn3 = ("NDHWC", "DHWIO", "NDHWC")
    chex.assert_trees_all_close(
      mconv.conv_general_dilated_im2col(x3, w3, (1, 2, 1), "VALID", dimension_numbers=dn3),
      lax.conv_general_dilated(x3, w3, (1, 2, 1), "VALID", dimension_numbers=dn3,
                               precision=lax.Precision.HIGHEST), atol=F32_ATOL, rtol=F32_RTOL)

  def test_flax_conv_drop_in(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    ref = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME", precision="highest")
    new = nn.Conv(5, (3, 3), strides=(2, 2), padding="SAME", precision="highest",
                  conv_general_dilated=mconv.conv_general_dilated_im2col)
    params = ref.init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_close(new.apply(params, x), ref.apply(params, x),
                                atol=F32_ATOL, rtol=F32_RTOL)

  def test_unsupported_raise(self):
    x, w = _inputs((1, 6, 6, 4), (3, 3), 4)
    with self.assertRaisesRegex(NotImplementedError, "feature_group_count"):
      mconv.conv_general_dilated_im2col(x, w[:, :, :2], (1, 1), "SAME", dimension_numbers=NHWC,
                                        feature_group_count=2)
    with self.assertRaisesRegex(NotImplementedError, "lhs_dilation"):
      mconv.conv_general_dilated_im2col(x, w, (1, 1), "SAME", lhs_dilation=(2, 2),
                                        dimension_numbers=NHWC)

  def test_default_conv_impl(self):
    self.assertIs(mconv.default_conv_impl("cpu"), mconv.conv_general_dilated_im2col)
    self.assertIs(mconv.default_conv_impl("gpu"), lax.conv_general_dilated)
    self.assertIs(mconv.default_conv_impl("tpu"), lax.conv_general_dilated)
    self.assertTrue(callable(mconv.default_conv_impl()))

@pytest.mark.slow
class ConvMoreShapesTest(_ConvChecks, chex.TestCase, parameterized.TestCase):
  """The derivative checks on the remaining shapes (CI's slow step)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*SLOW_CASES)
  def test_first_and_second_derivatives_more_shapes(self, *case):
    self._check_derivatives(*case)

  @parameterized.named_parameters(*SLOW_CASES)
  def test_check_grads_order2_float64_more_shapes(self, *case):
    self._check_grads64(*case)


class MaxPoolTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((2, 8, 8, 3), (1, 7, 9, 2), (3, 3, 3, 1), (2, 2, 2, 4), (1, 5, 4, 2))
  def test_matches_flax_max_pool(self, *shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    chex.assert_trees_all_close(self.variant(mconv.max_pool_2x2)(x), ref(x))
    ct = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
    f = lambda pool: (lambda x: jnp.sum(jnp.sin(pool(x)) * ct))
    chex.assert_trees_all_close(self.variant(jax.grad(f(mconv.max_pool_2x2)))(x),
                                jax.grad(f(ref))(x))
    g = lambda pool: (lambda x: jnp.sum(jax.grad(f(pool))(x) ** 2 * x))
    chex.assert_trees_all_close(self.variant(jax.grad(g(mconv.max_pool_2x2)))(x),
                                jax.grad(g(ref))(x), atol=1e-5, rtol=1e-5)

  def test_leading_dims_and_vmap(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 6, 5, 4))
    want = jnp.stack([nn.max_pool(x[i], (2, 2), strides=(2, 2)) for i in range(3)])
    chex.assert_trees_all_close(mconv.max_pool_2x2(x), want)
    chex.assert_trees_all_close(jax.vmap(mconv.max_pool_2x2)(x), want)

  def test_check_grads_order2_float64(self):
    with jax.enable_x64(True):
      x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 3), jnp.float64)
      check_grads(lambda x: jnp.sin(mconv.max_pool_2x2(x)), (x,), order=2, atol=F64_TOL,
                  rtol=F64_TOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_route_to_the_first_maximum(self):
    # One 2x2 window, two exact ties: the gradient goes to the first in row-major order (as
    # reduce_window's select_and_scatter), never split and never lost.
    x = jnp.array([[[[1.0], [3.0]], [[3.0], [2.0]]]])  # [1, 2, 2, 1]
    g = self.variant(jax.grad(lambda x: jnp.sum(mconv.max_pool_2x2(x))))(x)
    np.testing.assert_array_equal(g[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])
    zeros = jnp.zeros((1, 4, 4, 2))  # every window tied: each routes one unit
    g = self.variant(jax.grad(lambda x: jnp.sum(mconv.max_pool_2x2(x))))(zeros)
    np.testing.assert_array_equal(g[0, ::2, ::2], 1.0)
    self.assertEqual(float(jnp.sum(g)), 8.0)

  def test_forward_mode(self):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 6, 3))
    t = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    _, got = jax.jvp(mconv.max_pool_2x2, (x,), (t,))
    _, want = jax.jvp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), (x,), (t,))
    chex.assert_trees_all_close(got, want)

  def test_too_small_raises(self):
    with self.assertRaises(ValueError):
      mconv.max_pool_2x2(jnp.zeros((1, 1, 4, 2)))


if __name__ == "__main__":
  absltest.main()
