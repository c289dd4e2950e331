"""Tests of metajax.algorithms.selfsup against loops, optax and closed forms."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized
from jax.test_util import check_grads

from metajax.algorithms import selfsup

F64_RTOL = 1e-12  # float64: two exact computations of the same value
F64_ATOL = 1e-12  # float64: a value that is 0 in exact arithmetic
FD_RTOL = 1e-5  # float64 central finite differences (check_grads' default eps)
MARGINAL_ATOL = 1e-9  # float64: Sinkhorn-Knopp run to convergence
GRAD_MODES = ("rev",)


def _normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _unit_np(x):
  x = np.asarray(x)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _trees_close(a, b, rtol=F64_RTOL):
  chex.assert_trees_all_close(a, b, rtol=rtol, atol=0.0)


# --------------------------------------------------------------------------- momentum targets

class EmaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.5, 0.99, 1.0)
  def test_matches_optax_incremental_update(self, momentum):
    with jax.enable_x64(True):
      target = {"w": _normal(0, 3, 2), "b": _normal(1, 2)}
      online = {"w": _normal(2, 3, 2), "b": _normal(3, 2)}
      ours = self.variant(lambda t, o: selfsup.ema_update(t, o, momentum))(target, online)
      _trees_close(ours, optax.incremental_update(online, target, 1.0 - momentum))
    if momentum == 1.0:
      chex.assert_trees_all_equal(ours, target)
    if momentum == 0.0:
      chex.assert_trees_all_equal(ours, online)

  def test_no_gradient_into_the_target_from_the_online_params(self):
    with jax.enable_x64(True):
      target, online = _normal(4, 3), _normal(5, 3)
      g_online = jax.grad(lambda o: jnp.sum(selfsup.ema_update(target, o, 0.9)))(online)
      g_target = jax.grad(lambda t: jnp.sum(selfsup.ema_update(t, online, 0.9)))(target)
      np.testing.assert_array_equal(g_online, 0.0)
      np.testing.assert_allclose(g_target, 0.9, rtol=F64_RTOL)

  def test_keeps_the_target_dtype(self):
    target = jnp.ones(3, jnp.bfloat16)
    self.assertEqual(selfsup.ema_update(target, jnp.zeros(3), 0.5).dtype, jnp.bfloat16)

  @parameterized.parameters(-0.1, 1.5)
  def test_invalid_momentum(self, momentum):
    with self.assertRaisesRegex(ValueError, f"momentum must be in \\[0, 1\\], got {momentum}"):
      selfsup.ema_update(jnp.ones(2), jnp.ones(2), momentum)


class ByolMomentumTest(chex.TestCase):

  def test_endpoints(self):
    base, total = 0.99, 100
    self.assertAlmostEqual(float(selfsup.byol_momentum(0, total, base=base)), base, places=6)
    self.assertEqual(float(selfsup.byol_momentum(total, total, base=base)), 1.0)
    self.assertEqual(float(selfsup.byol_momentum(3 * total, total, base=base)), 1.0)  # stays 1
    self.assertAlmostEqual(float(selfsup.byol_momentum(total // 2, total, base=base)),
                           (1 + base) / 2, places=6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_is_one_minus_optax_cosine_decay(self):
    base, total = 0.996, 40
    steps = jnp.arange(total + 5)
    ours = self.variant(jax.vmap(lambda k: selfsup.byol_momentum(k, total, base=base)))(steps)
    ref = 1.0 - jax.vmap(optax.cosine_decay_schedule(1.0 - base, total))(steps)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    self.assertTrue(np.all(np.diff(np.asarray(ours)) >= 0))  # the target slows down

  def test_default_base_is_the_papers(self):
    self.assertAlmostEqual(float(selfsup.byol_momentum(0, 10)), 0.996, places=6)

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "total_steps must be an int >= 1, got 0"):
      selfsup.byol_momentum(0, 0)
    with self.assertRaisesRegex(ValueError, "base must be in \\[0, 1\\], got 1.5"):
      selfsup.byol_momentum(0, 10, base=1.5)


# --------------------------------------------------------------------------------------- BYOL

class ByolLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_regression_matches_optax_cosine_similarity(self):
    with jax.enable_x64(True):
      p, z = _normal(6, 5, 4), _normal(7, 5, 4)
      eps = float(jnp.finfo(jnp.float64).eps)
      ours = self.variant(selfsup.byol_regression)(p, z)
      ref = jnp.mean(2.0 - 2.0 * optax.losses.cosine_similarity(p, z, epsilon=eps))
      np.testing.assert_allclose(ours, ref, rtol=F64_RTOL)
      # It is the squared distance of the unit vectors.
      np.testing.assert_allclose(
        ours, np.mean(np.sum(np.square(_unit_np(p) - _unit_np(z)), -1)), rtol=1e-10)

  def test_zero_when_predictions_point_at_the_targets(self):
    with jax.enable_x64(True):
      z1, z2 = _normal(8, 4, 3), _normal(9, 4, 3)
      scale = jnp.array([[0.5], [2.0], [3.0], [0.1]])  # per-row positive scales
      np.testing.assert_allclose(selfsup.byol_loss(scale * z2, 7.0 * z1, z1, z2), 0.0,
                                 atol=F64_ATOL)
      np.testing.assert_allclose(selfsup.byol_loss(-z2, -z1, z1, z2), 8.0, rtol=F64_RTOL)

  def test_symmetrised(self):
    with jax.enable_x64(True):
      p1, p2, z1, z2 = (_normal(s, 5, 3) for s in (10, 11, 12, 13))
      base = selfsup.byol_loss(p1, p2, z1, z2)
      np.testing.assert_allclose(
        base, selfsup.byol_regression(p1, z2) + selfsup.byol_regression(p2, z1), rtol=F64_RTOL)
      np.testing.assert_allclose(selfsup.byol_loss(p2, p1, z2, z1), base, rtol=F64_RTOL)
      perm = np.random.default_rng(14).permutation(5)
      np.testing.assert_allclose(selfsup.byol_loss(p1[perm], p2[perm], z1[perm], z2[perm]), base,
                                 rtol=F64_RTOL)
      self.assertFalse(np.isclose(selfsup.byol_loss(p1, p2, z1[perm], z2), base))

  def test_the_target_receives_no_gradient(self):
    with jax.enable_x64(True):
      p1, p2, z1, z2 = (_normal(s, 4, 3) for s in (15, 16, 17, 18))
      g = jax.jit(jax.grad(selfsup.byol_loss, argnums=(0, 1, 2, 3)))(p1, p2, z1, z2)
      np.testing.assert_array_equal(g[2], 0.0)
      np.testing.assert_array_equal(g[3], 0.0)
      self.assertGreater(float(jnp.abs(g[0]).sum()), 0.0)
      self.assertGreater(float(jnp.abs(g[1]).sum()), 0.0)

  def test_gradients(self):
    with jax.enable_x64(True):
      p1, p2, z1, z2 = (_normal(s, 4, 3) for s in (19, 20, 21, 22))
      check_grads(jax.jit(lambda a, b: selfsup.byol_loss(a, b, z1, z2)), (p1, p2), order=2,
                  modes=GRAD_MODES, rtol=FD_RTOL)

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      selfsup.byol_regression(jnp.ones((3, 2)), jnp.ones((3, 4)))


# ------------------------------------------------------------------------------------ MoCo v2

def _moco_loop(q, k, queue, temperature):
  """-log softmax of the positive among [positive, negatives], one query at a time."""
  q, k, queue = _unit_np(q), _unit_np(k), _unit_np(queue)
  losses = []
  for i in range(len(q)):
    logits = np.array([q[i] @ k[i]] + [q[i] @ n for n in queue]) / temperature
    losses.append(-(logits[0] - np.log(np.sum(np.exp(logits)))))
  return np.mean(losses)


class QueueTest(chex.TestCase):

  def test_init(self):
    queue = selfsup.init_queue(jax.random.key(0), 6, 3)
    chex.assert_shape(queue.keys, (6, 3))
    np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=-1), 1.0, rtol=1e-6)
    self.assertEqual(int(queue.ptr), 0)
    chex.assert_trees_all_equal(queue, selfsup.init_queue(jax.random.key(0), 6, 3))
    self.assertFalse(np.allclose(queue.keys, selfsup.init_queue(jax.random.key(1), 6, 3).keys))

  @chex.variants(with_jit=True, without_jit=True)
  def test_fifo_order_and_wrap_around(self):
    push = self.variant(selfsup.enqueue)
    queue = selfsup.Queue(jnp.zeros((5, 1)), jnp.zeros((), jnp.int32))
    queue = push(queue, jnp.array([[1.0], [2.0]]))
    np.testing.assert_array_equal(queue.keys[:, 0], [1, 2, 0, 0, 0])
    self.assertEqual(int(queue.ptr), 2)
    queue = push(queue, jnp.array([[3.0], [4.0]]))
    np.testing.assert_array_equal(queue.keys[:, 0], [1, 2, 3, 4, 0])
    self.assertEqual(int(queue.ptr), 4)
    queue = push(queue, jnp.array([[5.0], [6.0]]))  # wraps: 5 at the end, 6 over the oldest
    np.testing.assert_array_equal(queue.keys[:, 0], [6, 2, 3, 4, 5])
    self.assertEqual(int(queue.ptr), 1)
    # From the pointer on, the queue holds the last K keys pushed, oldest first.
    np.testing.assert_array_equal(np.roll(queue.keys[:, 0], -int(queue.ptr)), [2, 3, 4, 5, 6])
    queue = push(queue, jnp.array([[7.0], [8.0]]))
    np.testing.assert_array_equal(queue.keys[:, 0], [6, 7, 8, 4, 5])
    self.assertEqual(int(queue.ptr), 3)

  def test_a_full_batch_replaces_everything(self):
    queue = selfsup.init_queue(jax.random.key(2), 4, 2)._replace(ptr=jnp.asarray(3, jnp.int32))
    keys = jnp.arange(8.0).reshape(4, 2)
    new = selfsup.enqueue(queue, keys)
    self.assertEqual(int(new.ptr), 3)
    np.testing.assert_array_equal(np.roll(new.keys, -3, axis=0), keys)

  def test_keys_enter_without_gradient(self):
    queue = selfsup.Queue(jnp.zeros((3, 2)), jnp.zeros((), jnp.int32))
    g = jax.grad(lambda k: jnp.sum(selfsup.enqueue(queue, k).keys))(jnp.ones((2, 2)))
    np.testing.assert_array_equal(g, 0.0)

  def test_errors(self):
    queue = selfsup.Queue(jnp.zeros((3, 2)), jnp.zeros((), jnp.int32))
    with self.assertRaisesRegex(ValueError, "cannot enqueue 4 keys into a queue of 3"):
      selfsup.enqueue(queue, jnp.zeros((4, 2)))
    with self.assertRaisesRegex(ValueError, "shape \\[batch, 2\\]"):
      selfsup.enqueue(queue, jnp.zeros((2, 3)))
    with self.assertRaisesRegex(ValueError, "size must be an int >= 1, got 0"):
      selfsup.init_queue(jax.random.key(0), 0, 2)


class MocoLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.07, 0.2, 1.0)
  def test_against_log_softmax_loop(self, temperature):
    with jax.enable_x64(True):
      q, k, queue = _normal(23, 4, 3), _normal(24, 4, 3), _normal(25, 6, 3)
      ours = self.variant(lambda *a: selfsup.moco_loss(*a, temperature=temperature))(q, k, queue)
      np.testing.assert_allclose(ours, _moco_loop(q, k, queue, temperature), rtol=F64_RTOL)

  def test_matches_optax_cross_entropy_with_label_zero(self):
    with jax.enable_x64(True):
      q, k, queue = _normal(26, 5, 4), _normal(27, 5, 4), _normal(28, 7, 4)
      qn, kn, nn = (jnp.asarray(_unit_np(x)) for x in (q, k, queue))
      logits = jnp.concatenate([jnp.sum(qn * kn, -1, keepdims=True), qn @ nn.T], -1) / 0.2
      ref = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.zeros(5, jnp.int32)))
      np.testing.assert_allclose(selfsup.moco_loss(q, k, queue), ref, rtol=F64_RTOL)

  def test_invariances(self):
    with jax.enable_x64(True):
      q, k, queue = _normal(29, 5, 3), _normal(30, 5, 3), _normal(31, 6, 3)
      loss = jax.jit(selfsup.moco_loss)
      base = loss(q, k, queue)
      perm, queue_perm = (np.random.default_rng(32).permutation(n) for n in (5, 6))
      np.testing.assert_allclose(loss(q[perm], k[perm], queue), base, rtol=F64_RTOL)
      np.testing.assert_allclose(loss(q, k, queue[queue_perm]), base, rtol=F64_RTOL)
      np.testing.assert_allclose(loss(2.0 * q, 0.3 * k, 5.0 * queue), base, rtol=F64_RTOL)
      self.assertFalse(np.isclose(loss(q, k[perm], queue), base))

  def test_keys_and_queue_receive_no_gradient(self):
    with jax.enable_x64(True):
      q, k, queue = _normal(33, 3, 2), _normal(34, 3, 2), _normal(35, 4, 2)
      g = jax.jit(jax.grad(selfsup.moco_loss, argnums=(0, 1, 2)))(q, k, queue)
      self.assertGreater(float(jnp.abs(g[0]).sum()), 0.0)
      np.testing.assert_array_equal(g[1], 0.0)
      np.testing.assert_array_equal(g[2], 0.0)

  def test_gradients(self):
    with jax.enable_x64(True):
      q, k, queue = _normal(36, 3, 2), _normal(37, 3, 2), _normal(38, 4, 2)
      check_grads(jax.jit(lambda x: selfsup.moco_loss(x, k, queue, temperature=0.5)), (q,),
                  order=2, modes=GRAD_MODES, rtol=FD_RTOL)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "temperature must be a number > 0, got 0"):
      selfsup.moco_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((4, 3)), temperature=0)
    with self.assertRaisesRegex(ValueError, "queue_keys must have shape \\[K, 3\\]"):
      selfsup.moco_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((4, 2)))


# ------------------------------------------------------------------------------- Barlow Twins

def _barlow_twins_loop(z1, z2, lam, eps):
  z1, z2 = np.asarray(z1), np.asarray(z2)
  b, d = z1.shape
  n1 = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
  n2 = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
  loss = 0.0
  for i in range(d):
    for j in range(d):
      c_ij = sum(n1[s, i] * n2[s, j] for s in range(b)) / b
      loss += (1.0 - c_ij) ** 2 if i == j else lam * c_ij**2
  return loss


class BarlowTwinsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((5e-3, 1e-5), (0.5, 0.0), (0.0, 1e-3))
  def test_against_loop(self, lam, eps):
    with jax.enable_x64(True):
      z1, z2 = _normal(39, 5, 3), _normal(40, 5, 3)
      ours = self.variant(lambda a, b: selfsup.barlow_twins_loss(
        a, b, off_diagonal_weight=lam, epsilon=eps))(z1, z2)
      np.testing.assert_allclose(ours, _barlow_twins_loop(z1, z2, lam, eps), rtol=1e-10)

  def test_cross_correlation_is_the_pearson_correlation(self):
    with jax.enable_x64(True):
      z1, z2 = _normal(41, 6, 3), _normal(42, 6, 3)
      c = selfsup.cross_correlation(z1, z2, epsilon=0.0)
      np.testing.assert_allclose(c, np.corrcoef(np.asarray(z1).T, np.asarray(z2).T)[:3, 3:],
                                 rtol=1e-10)

  def test_invariances(self):
    with jax.enable_x64(True):
      z1, z2 = _normal(43, 6, 4), _normal(44, 6, 4)
      loss = lambda a, b: selfsup.barlow_twins_loss(a, b, epsilon=0.0)  # noqa: E731
      base = loss(z1, z2)
      perm = np.random.default_rng(45).permutation(6)
      np.testing.assert_allclose(loss(z1[perm], z2[perm]), base, rtol=1e-10)  # joint permutation
      np.testing.assert_allclose(loss(z2, z1), base, rtol=1e-10)  # swap the views
      scale, shift = jnp.array([0.5, 2.0, 3.0, 7.0]), jnp.array([1.0, -2.0, 0.0, 4.0])
      np.testing.assert_allclose(loss(scale * z1 + shift, z2), base, rtol=1e-10)  # per dimension
      self.assertFalse(np.isclose(loss(z1, z2[perm]), base))  # pairs matter

  def test_zero_at_a_perfect_identity_correlation(self):
    with jax.enable_x64(True):
      # Columns of a Hadamard matrix: zero mean, unit (biased) variance, mutually orthogonal.
      z = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
      np.testing.assert_allclose(selfsup.cross_correlation(z, z, epsilon=0.0), np.eye(2),
                                 atol=F64_ATOL)
      self.assertEqual(float(selfsup.barlow_twins_loss(z, 3.0 * z + 1.0, epsilon=0.0)), 0.0)
      self.assertGreater(float(selfsup.barlow_twins_loss(z, -z, epsilon=0.0)), 0.0)

  def test_default_lambda_is_the_papers(self):
    with jax.enable_x64(True):
      z1, z2 = _normal(46, 5, 3), _normal(47, 5, 3)
      np.testing.assert_allclose(
        selfsup.barlow_twins_loss(z1, z2),
        _barlow_twins_loop(z1, z2, 5e-3, selfsup.BARLOW_TWINS_EPSILON), rtol=1e-10)

  def test_constant_dimension_is_finite(self):
    z = jnp.concatenate([jnp.ones((4, 1)), jnp.arange(4.0)[:, None]], axis=1)
    loss, g = jax.jit(jax.value_and_grad(selfsup.barlow_twins_loss))(z, z)
    self.assertTrue(np.isfinite(loss))
    self.assertTrue(np.all(np.isfinite(g)))

  def test_gradients(self):
    with jax.enable_x64(True):
      z1, z2 = _normal(48, 5, 3), _normal(49, 5, 3)
      check_grads(jax.jit(lambda a, b: selfsup.barlow_twins_loss(a, b, off_diagonal_weight=0.1)),
                  (z1, z2), order=2, modes=GRAD_MODES, rtol=FD_RTOL)


# --------------------------------------------------------------------------------------- SwAV

def _sinkhorn_loop(scores, epsilon, num_iters):
  """The paper's code (Caron et al., algorithm 1), in NumPy: Q is K x B."""
  q = np.exp(np.asarray(scores) / epsilon).T
  k, b = q.shape
  q /= q.sum()
  for _ in range(num_iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def _cosine_scores(seed, b, k, d=3):
  return jnp.asarray(_unit_np(_normal(seed, b, d)) @ _unit_np(_normal(seed + 1, k, d)).T)


class SinkhornTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.05, 3), (0.5, 1), (0.1, 10))
  def test_against_the_papers_code(self, epsilon, num_iters):
    with jax.enable_x64(True):
      scores = _cosine_scores(50, 6, 4)
      ours = self.variant(lambda s: selfsup.sinkhorn(s, epsilon=epsilon, num_iters=num_iters))(
        scores)
      np.testing.assert_allclose(ours, _sinkhorn_loop(scores, epsilon, num_iters), rtol=1e-10)

  @parameterized.parameters((6, 4), (8, 8), (3, 5))
  def test_marginals(self, b, k):
    with jax.enable_x64(True):
      scores = _cosine_scores(52, b, k)
      codes = selfsup.sinkhorn(scores)  # the defaults: a sample's code sums to 1 exactly
      self.assertTrue(np.all(codes >= 0))
      np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=F64_RTOL)
      # Run to convergence, the prototypes are used equally: each column sums to B / K.
      converged = selfsup.sinkhorn(scores, epsilon=0.5, num_iters=500)
      np.testing.assert_allclose(converged.sum(axis=1), 1.0, rtol=F64_RTOL)
      np.testing.assert_allclose(converged.sum(axis=0), b / k, atol=MARGINAL_ATOL)
      # Each iteration moves the prototypes' marginal towards uniform.
      errors = [np.abs(selfsup.sinkhorn(scores, epsilon=0.5, num_iters=n).sum(axis=0) - b / k
                       ).max() for n in (1, 3, 10)]
      self.assertTrue(errors[0] >= errors[1] >= errors[2], errors)

  def test_uniform_scores_give_uniform_codes(self):
    with jax.enable_x64(True):
      np.testing.assert_allclose(selfsup.sinkhorn(jnp.full((4, 5), 0.3)), 0.2, rtol=F64_RTOL)

  def test_equivariant_to_permutations(self):
    with jax.enable_x64(True):
      scores = _cosine_scores(54, 6, 4)
      codes = selfsup.sinkhorn(scores)
      rows = np.random.default_rng(55).permutation(6)
      cols = np.random.default_rng(56).permutation(4)
      np.testing.assert_allclose(selfsup.sinkhorn(scores[rows][:, cols]), codes[rows][:, cols],
                                 rtol=1e-10)

  def test_no_gradient_and_no_overflow_at_small_epsilon(self):
    scores = _cosine_scores(57, 6, 4).astype(jnp.float32)
    codes = selfsup.sinkhorn(scores, epsilon=1e-3)  # exp(1 / 1e-3) overflows float32
    self.assertTrue(np.all(np.isfinite(codes)))
    np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)
    g = jax.grad(lambda s: jnp.sum(selfsup.sinkhorn(s) * jnp.arange(4.0)))(scores)
    np.testing.assert_array_equal(g, 0.0)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "epsilon must be a number > 0, got 0"):
      selfsup.sinkhorn(jnp.ones((2, 3)), epsilon=0)
    with self.assertRaisesRegex(ValueError, "num_iters must be an int >= 0, got -1"):
      selfsup.sinkhorn(jnp.ones((2, 3)), num_iters=-1)


class SwavLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.1, 0.5)
  def test_matches_optax_cross_entropy_with_swapped_codes(self, temperature):
    with jax.enable_x64(True):
      z1, z2, c = _normal(58, 6, 3), _normal(59, 6, 3), _normal(60, 4, 3)
      ours = self.variant(lambda *a: selfsup.swav_loss(*a, temperature=temperature))(z1, z2, c)
      cn = jnp.asarray(_unit_np(c))
      s1, s2 = jnp.asarray(_unit_np(z1)) @ cn.T, jnp.asarray(_unit_np(z2)) @ cn.T
      q1, q2 = _sinkhorn_loop(s1, 0.05, 3), _sinkhorn_loop(s2, 0.05, 3)
      ref = (jnp.mean(optax.softmax_cross_entropy(s1 / temperature, q2))
             + jnp.mean(optax.softmax_cross_entropy(s2 / temperature, q1))) / 2
      np.testing.assert_allclose(ours, ref, rtol=1e-10)

  def test_invariances(self):
    with jax.enable_x64(True):
      z1, z2, c = _normal(61, 6, 3), _normal(62, 6, 3), _normal(63, 4, 3)
      loss = jax.jit(selfsup.swav_loss)
      base = loss(z1, z2, c)
      perm = np.random.default_rng(64).permutation(6)
      np.testing.assert_allclose(loss(z2, z1, c), base, rtol=1e-10)
      np.testing.assert_allclose(loss(z1[perm], z2[perm], c), base, rtol=1e-10)
      np.testing.assert_allclose(loss(z1, z2, c[::-1]), base, rtol=1e-10)
      np.testing.assert_allclose(loss(2.0 * z1, 0.5 * z2, 3.0 * c), base, rtol=1e-10)
      self.assertFalse(np.isclose(loss(z1, z2[perm], c), base))

  def test_gradient_holds_the_codes_fixed(self):
    """The codes are targets: the gradient is that of the cross-entropy with constant codes."""
    with jax.enable_x64(True):
      z1, z2, c = _normal(65, 5, 3), _normal(66, 5, 3), _normal(67, 4, 3)

      def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

      q1 = selfsup.sinkhorn(unit(z1) @ unit(c).T)
      q2 = selfsup.sinkhorn(unit(z2) @ unit(c).T)

      def fixed_codes(a, b, p):
        ce = lambda q, s: -jnp.mean(jnp.sum(q * jax.nn.log_softmax(s / 0.1), -1))  # noqa: E731
        return (ce(q2, unit(a) @ unit(p).T) + ce(q1, unit(b) @ unit(p).T)) / 2

      ours = jax.jit(jax.grad(selfsup.swav_loss, argnums=(0, 1, 2)))(z1, z2, c)
      ref = jax.jit(jax.grad(fixed_codes, argnums=(0, 1, 2)))(z1, z2, c)
      _trees_close(ours, ref, rtol=1e-10)
      self.assertGreater(float(jnp.abs(ours[2]).sum()), 0.0)  # the prototypes are trained

  def test_normalize_prototypes(self):
    with jax.enable_x64(True):
      c = _normal(68, 4, 3)
      unit = selfsup.normalize_prototypes(c)
      np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=F64_RTOL)
      np.testing.assert_allclose(unit, _unit_np(c), rtol=F64_RTOL)
      np.testing.assert_allclose(selfsup.swav_loss(_normal(69, 5, 3), _normal(70, 5, 3), unit),
                                 selfsup.swav_loss(_normal(69, 5, 3), _normal(70, 5, 3), c),
                                 rtol=1e-10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_freeze_prototypes(self):
    grads = {"prototypes": jnp.ones((4, 3)), "bias": jnp.full((4,), 2.0)}
    freeze = self.variant(lambda g, k: selfsup.freeze_prototypes(g, k, freeze_steps=3))
    for step in (0, 1, 2):
      chex.assert_trees_all_equal(freeze(grads, jnp.asarray(step)),
                                  jax.tree.map(jnp.zeros_like, grads))
    for step in (3, 4, 100):
      chex.assert_trees_all_equal(freeze(grads, jnp.asarray(step)), grads)
    never = selfsup.freeze_prototypes(grads, jnp.asarray(0), freeze_steps=0)
    chex.assert_trees_all_equal(never, grads)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "prototypes must have shape \\[K, 3\\]"):
      selfsup.swav_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((4, 2)))
    with self.assertRaisesRegex(ValueError, "temperature must be a number > 0, got -1.0"):
      selfsup.swav_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((4, 3)), temperature=-1.0)
    with self.assertRaisesRegex(ValueError, "freeze_steps must be an int >= 0"):
      selfsup.freeze_prototypes(jnp.ones(2), 0, freeze_steps=-1)
