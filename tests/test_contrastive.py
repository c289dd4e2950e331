"""Tests of metajax.contrastive against loops, optax and closed forms."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from jax.test_util import check_grads

from metajax import contrastive

F64_RTOL = 1e-12  # float64: two exact computations of the same value
FD_RTOL = 1e-5  # float64 central finite differences (check_grads' default eps)
# Reverse mode only, to second order (what training uses): forward mode would triple the compiles.
GRAD_MODES = ("rev",)
TEMPERATURES = (0.1, 0.5, 2.0)


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _unit_np(x):
  x = np.asarray(x)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _supcon_loop(z, labels, temperature):
  """Khosla et al.'s L_out, one anchor and one positive at a time."""
  z, labels = _unit_np(z), np.asarray(labels)
  losses = []
  for i in range(len(z)):
    others = [a for a in range(len(z)) if a != i]
    positives = [p for p in others if labels[p] == labels[i]]
    if not positives:
      continue
    log_denom = np.log(sum(np.exp(z[i] @ z[a] / temperature) for a in others))
    losses.append(-np.mean([z[i] @ z[p] / temperature - log_denom for p in positives]))
  return np.mean(losses) if losses else 0.0


def _batch_hard_loop(x, labels, margin):
  x, labels = np.asarray(x), np.asarray(labels)
  losses = []
  for i in range(len(x)):
    pos = [np.linalg.norm(x[i] - x[p]) for p in range(len(x)) if p != i and labels[p] == labels[i]]
    neg = [np.linalg.norm(x[i] - x[n]) for n in range(len(x)) if labels[n] != labels[i]]
    if pos and neg:
      losses.append(max(max(pos) - min(neg) + margin, 0.0))
  return np.mean(losses) if losses else 0.0


class InfoNCETest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*TEMPERATURES)
  def test_matches_optax_ntxent(self, temperature):
    """With two views, optax's ntxent (labels = example ids) is exactly SimCLR's NT-Xent."""
    with jax.enable_x64(True):
      v1, v2 = _normal(0, 5, 3), _normal(1, 5, 3)
      ours = self.variant(lambda a, b: contrastive.info_nce(a, b, temperature=temperature))(v1, v2)
      ids = jnp.arange(5)
      ref = optax.losses.ntxent(jnp.concatenate([v1, v2]), jnp.concatenate([ids, ids]),
                                temperature=temperature)
      np.testing.assert_allclose(ours, ref, rtol=F64_RTOL)

  def test_closed_form_orthonormal_views(self):
    """Identical orthonormal views: the positive has similarity 1, the 2B - 2 others 0."""
    with jax.enable_x64(True):
      b, temperature = 4, 0.3
      v = jnp.eye(b)
      expected = -np.log(np.exp(1 / temperature) / (np.exp(1 / temperature) + 2 * b - 2))
      np.testing.assert_allclose(contrastive.info_nce(v, 3.0 * v, temperature=temperature),
                                 expected, rtol=F64_RTOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_symmetries(self):
    with jax.enable_x64(True):
      v1, v2 = _normal(2, 6, 4), _normal(3, 6, 4)
      loss = self.variant(contrastive.info_nce)
      perm = np.random.default_rng(4).permutation(6)
      base = loss(v1, v2)
      np.testing.assert_allclose(loss(v2, v1), base, rtol=F64_RTOL)  # swap the views
      np.testing.assert_allclose(loss(v1[perm], v2[perm]), base, rtol=F64_RTOL)  # same order
      np.testing.assert_allclose(loss(2.5 * v1, 0.1 * v2), base, rtol=F64_RTOL)  # cosine
      self.assertFalse(np.isclose(loss(v1, v2[perm]), base))  # pairs matter

  def test_gradients(self):
    with jax.enable_x64(True):
      v1, v2 = _normal(5, 4, 3), _normal(6, 4, 3)
      check_grads(jax.jit(lambda a, b: contrastive.info_nce(a, b, temperature=0.5)), (v1, v2),
                  order=2, modes=GRAD_MODES, rtol=FD_RTOL)

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      contrastive.info_nce(jnp.ones((3, 2)), jnp.ones((4, 2)))
    with self.assertRaisesRegex(ValueError, "batch, dim"):
      contrastive.info_nce(jnp.ones((3,)), jnp.ones((3,)))


class SupConTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*TEMPERATURES)
  def test_against_loop(self, temperature):
    with jax.enable_x64(True):
      z = _normal(7, 7, 3)
      labels = jnp.array([0, 1, 0, 2, 1, 0, 3])  # several positives, and an anchor with none
      ours = self.variant(lambda x, y: contrastive.supcon(x, y, temperature=temperature))(z, labels)
      np.testing.assert_allclose(ours, _supcon_loop(z, labels, temperature), rtol=F64_RTOL)

  @parameterized.parameters(*TEMPERATURES)
  def test_one_positive_per_anchor_is_info_nce(self, temperature):
    with jax.enable_x64(True):
      v1, v2 = _normal(8, 5, 3), _normal(9, 5, 3)
      ids = jnp.arange(5)
      np.testing.assert_allclose(
        contrastive.supcon(jnp.concatenate([v1, v2]), jnp.concatenate([ids, ids]),
                           temperature=temperature),
        contrastive.info_nce(v1, v2, temperature=temperature), rtol=F64_RTOL)

  def test_differs_from_optax_with_several_positives(self):
    """Documented: optax's ntxent drops the other positives from each denominator."""
    with jax.enable_x64(True):
      z, labels = _normal(10, 6, 3), jnp.array([0, 0, 0, 1, 1, 1])
      self.assertFalse(np.isclose(contrastive.supcon(z, labels, temperature=0.5),
                                  optax.losses.ntxent(z, labels, temperature=0.5)))

  def test_permutation_invariance_and_relabelling(self):
    with jax.enable_x64(True):
      z, labels = _normal(11, 6, 4), jnp.array([0, 1, 0, 1, 2, 2])
      perm = np.random.default_rng(12).permutation(6)
      base = contrastive.supcon(z, labels)
      np.testing.assert_allclose(contrastive.supcon(z[perm], labels[perm]), base, rtol=F64_RTOL)
      np.testing.assert_allclose(contrastive.supcon(z, 7 - labels), base, rtol=F64_RTOL)

  def test_no_positive_is_zero(self):
    np.testing.assert_array_equal(contrastive.supcon(jnp.eye(3), jnp.arange(3)), 0.0)

  def test_gradients(self):
    with jax.enable_x64(True):
      z, labels = _normal(13, 5, 3), jnp.array([0, 1, 0, 1, 1])
      check_grads(jax.jit(lambda x: contrastive.supcon(x, labels, temperature=0.7)), (z,),
                  order=2, modes=GRAD_MODES, rtol=FD_RTOL)


class TripletTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.5, 1.0, 3.0)
  def test_matches_optax(self, margin):
    with jax.enable_x64(True):
      a, p, n = _normal(14, 6, 3), _normal(15, 6, 3), _normal(16, 6, 3)
      ours = self.variant(lambda *x: contrastive.triplet(*x, margin=margin))(a, p, n)
      ref = optax.losses.triplet_margin_loss(a, p, n, margin=margin, eps=0.0)
      np.testing.assert_allclose(ours, jnp.mean(ref), rtol=F64_RTOL)

  def test_zero_when_margin_satisfied(self):
    with jax.enable_x64(True):
      a = _normal(17, 4, 3)
      p = a + 0.01
      n = a + 10.0
      for squared in (False, True):
        self.assertEqual(float(contrastive.triplet(a, p, n, margin=1.0, squared=squared)), 0.0)
      grads = jax.grad(lambda x: contrastive.triplet(x, p, n))(a)
      np.testing.assert_array_equal(grads, 0.0)

  def test_squared_closed_form(self):
    with jax.enable_x64(True):
      a = jnp.zeros((1, 2))
      p, n = jnp.array([[3.0, 4.0]]), jnp.array([[1.0, 0.0]])
      np.testing.assert_allclose(contrastive.triplet(a, p, n, margin=0.5), 5 - 1 + 0.5)
      np.testing.assert_allclose(contrastive.triplet(a, p, n, margin=0.5, squared=True),
                                 25 - 1 + 0.5)

  def test_coincident_points_have_finite_gradient(self):
    a = jnp.ones((2, 3))
    grads = jax.grad(lambda x: contrastive.triplet(x, a, a + 1.0))(a)
    self.assertTrue(np.all(np.isfinite(grads)))

  def test_gradients(self):
    with jax.enable_x64(True):
      a, p, n = _normal(18, 4, 3), _normal(19, 4, 3), _normal(20, 4, 3)
      check_grads(jax.jit(lambda *x: contrastive.triplet(*x, margin=2.0)), (a, p, n), order=2,
                  modes=GRAD_MODES, rtol=FD_RTOL)


class BatchHardTripletTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.2, 1.0, 4.0)
  def test_against_loop(self, margin):
    with jax.enable_x64(True):
      x = _normal(21, 7, 3)
      labels = jnp.array([0, 1, 0, 2, 1, 0, 3])  # label 2 and 3 anchors have no positive
      ours = self.variant(lambda e, y: contrastive.batch_hard_triplet(e, y, margin=margin))(
        x, labels)
      np.testing.assert_allclose(ours, _batch_hard_loop(x, labels, margin), rtol=F64_RTOL)

  def test_pairwise_distances(self):
    with jax.enable_x64(True):
      x = _normal(22, 5, 3)
      d = contrastive.pairwise_distances(x)
      ref = np.linalg.norm(np.asarray(x)[:, None] - np.asarray(x)[None], axis=-1)
      np.testing.assert_allclose(d, ref, rtol=1e-10, atol=1e-12)
      np.testing.assert_array_equal(np.diag(d), 0.0)
      np.testing.assert_allclose(contrastive.pairwise_distances(x, squared=True), ref**2,
                                 rtol=1e-10, atol=1e-12)

  def test_well_separated_classes_give_zero(self):
    with jax.enable_x64(True):
      x = jnp.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]])
      self.assertEqual(float(contrastive.batch_hard_triplet(x, jnp.array([0, 0, 1, 1]))), 0.0)
      self.assertEqual(float(contrastive.batch_hard_triplet(x, jnp.arange(4))), 0.0)  # no pos

  def test_gradients(self):
    with jax.enable_x64(True):
      x, labels = _normal(23, 6, 3), jnp.array([0, 1, 0, 1, 2, 2])
      check_grads(jax.jit(lambda e: contrastive.batch_hard_triplet(e, labels, margin=3.0)), (x,),
                  order=2, modes=GRAD_MODES, rtol=FD_RTOL)


class ClipLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*TEMPERATURES)
  def test_matches_two_optax_cross_entropies(self, temperature):
    """The mean of optax's cross-entropy over the rows and over the columns of the logits."""
    with jax.enable_x64(True):
      images, texts = _normal(24, 5, 3), _normal(25, 5, 3)
      ours = self.variant(lambda a, b: contrastive.clip_loss(a, b, temperature))(images, texts)
      logits = jnp.asarray(_unit_np(images) @ _unit_np(texts).T / temperature)
      labels = jnp.arange(5)
      ref = (jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
             + jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.T, labels))) / 2
      np.testing.assert_allclose(ours, ref, rtol=F64_RTOL)

  def test_against_loop(self):
    with jax.enable_x64(True):
      images, texts, temperature = _normal(26, 4, 3), _normal(27, 4, 3), 0.3
      s = _unit_np(images) @ _unit_np(texts).T / temperature
      rows = [-(s[i, i] - np.log(np.sum(np.exp(s[i])))) for i in range(4)]
      cols = [-(s[i, i] - np.log(np.sum(np.exp(s[:, i])))) for i in range(4)]
      np.testing.assert_allclose(contrastive.clip_loss(images, texts, temperature),
                                 (np.mean(rows) + np.mean(cols)) / 2, rtol=F64_RTOL)

  def test_vanishes_as_temperature_goes_to_zero_for_matching_pairs(self):
    with jax.enable_x64(True):
      emb = _normal(28, 4, 8)
      self.assertLess(np.max(np.abs(_unit_np(emb) @ _unit_np(emb).T - np.eye(4))), 1.0)
      losses = [float(contrastive.clip_loss(emb, 2.0 * emb, t)) for t in (1.0, 0.1, 0.01, 1e-3)]
      self.assertTrue(np.all(np.diff(losses) < 0), losses)
      self.assertLess(losses[-1], 1e-12)
      # Mismatched pairs are the opposite limit: the loss grows without bound.
      self.assertGreater(float(contrastive.clip_loss(emb, emb[::-1], 1e-3)), 100.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_symmetries(self):
    with jax.enable_x64(True):
      images, texts = _normal(29, 6, 4), _normal(30, 6, 4)
      loss = self.variant(contrastive.clip_loss)
      perm = np.random.default_rng(31).permutation(6)
      base = loss(images, texts)
      np.testing.assert_allclose(loss(texts, images), base, rtol=F64_RTOL)  # swap the towers
      np.testing.assert_allclose(loss(images[perm], texts[perm]), base, rtol=F64_RTOL)
      np.testing.assert_allclose(loss(3.0 * images, 0.2 * texts), base, rtol=F64_RTOL)  # cosine
      self.assertFalse(np.isclose(loss(images, texts[perm]), base))  # pairs matter

  def test_differs_from_info_nce(self):
    """Documented: info_nce also contrasts each view with the other examples of its own view."""
    with jax.enable_x64(True):
      v1, v2 = _normal(32, 5, 3), _normal(33, 5, 3)
      self.assertFalse(np.isclose(contrastive.clip_loss(v1, v2, 0.5),
                                  contrastive.info_nce(v1, v2, temperature=0.5)))

  def test_gradients_including_a_learned_temperature(self):
    with jax.enable_x64(True):
      images, texts = _normal(34, 4, 3), _normal(35, 4, 3)
      check_grads(jax.jit(lambda a, b, log_scale: contrastive.clip_loss(a, b,
                                                                         jnp.exp(-log_scale))),
                  (images, texts, jnp.log(1 / 0.07)), order=2, modes=GRAD_MODES, rtol=FD_RTOL)

  @parameterized.parameters(0.0, -0.5, "0.1")
  def test_invalid_temperature(self, temperature):
    with self.assertRaisesRegex(ValueError, f"temperature must be a number > 0, got "
                                            f"{re.escape(repr(temperature))}"):
      contrastive.clip_loss(jnp.ones((3, 2)), jnp.ones((3, 2)), temperature)

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      contrastive.clip_loss(jnp.ones((3, 2)), jnp.ones((4, 2)))
    with self.assertRaisesRegex(ValueError, "batch, dim"):
      contrastive.clip_loss(jnp.ones((3,)), jnp.ones((3,)))
