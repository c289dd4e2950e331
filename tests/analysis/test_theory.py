"""Tests of metajax.analysis.theory: the explicit contrastive form equals ANIL MAML's encoder gradient."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import metajax as mj
from metajax.analysis import theory

EXACT_RTOL = 1e-10  # float64: two exact computations of the same gradient
ZERO_ATOL = 1e-14  # float64: a term that is 0 up to round-off (softmax sums to 1)
INNER_LR = 0.7
WAYS = 3


def _random_params(model, rng):
  """float64 params of `model`'s structure, drawn with numpy (no compilation), head included.

  Kernels are N(0, 1/fan_in); vectors (biases, norm scales) lie in [0.1, 0.5], so that no ReLU
  is dead and the head is far from 0.
  """

  def draw(s):
    if len(s.shape) == 1:
      return jnp.asarray(rng.uniform(0.1, 0.5, size=s.shape))
    return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])))

  return jax.tree.map(draw, jax.eval_shape(model.init, jax.random.key(0)))


def _random_tasks(rng, *, num_tasks, shots, queries, input_shape):
  return mj.Task(
    jnp.asarray(rng.normal(size=(num_tasks, shots, *input_shape))),
    jnp.asarray(rng.integers(0, WAYS, size=(num_tasks, shots))),
    jnp.asarray(rng.normal(size=(num_tasks, queries, *input_shape))),
    jnp.asarray(rng.integers(0, WAYS, size=(num_tasks, queries))))


_MLP = mj.mlp(WAYS, hidden=(5, 4), input_shape=(2,))


def _bias_free_apply(params, x):
  return _MLP.features(params, x) @ params["head"]["kernel"]


def _mlp_problem(seed, *, bias=True):
  """A tiny MLP encoder (2 -> 5 -> 4) with a random (non-zero) linear head and two tasks.

  Call inside `jax.enable_x64(True)`: everything is float64.
  """
  rng = np.random.default_rng(seed)
  params = _random_params(_MLP, rng)
  tasks = _random_tasks(rng, num_tasks=2, shots=6, queries=5, input_shape=(2,))
  if not bias:
    params["head"] = {"kernel": params["head"]["kernel"]}
  return _MLP, (_MLP.apply if bias else _bias_free_apply), params, tasks


@functools.lru_cache(maxsize=None)
def _cached_maml_grad(seed, bias, loss, num_inner_steps, first_order, zeroing):
  """ANIL MAML's encoder meta-gradient on `_mlp_problem(seed)`, computed once per setting."""
  _, apply_fn, params, tasks = _mlp_problem(seed, bias=bias)
  grads = _maml_encoder_grad(apply_fn, params, tasks, loss=mj.losses.get_loss(loss),
                             num_inner_steps=num_inner_steps, first_order=first_order,
                             zeroing=zeroing)
  return jax.tree.map(np.asarray, grads)


def _maml_encoder_grad(apply_fn, params, tasks, *, loss, num_inner_steps, first_order, zeroing):
  learner = mj.MAML(apply_fn, loss, num_inner_steps=num_inner_steps, inner_lr=INNER_LR,
                    first_order=first_order, adapt_mask=mj.head_mask)
  if zeroing:
    learner = mj.with_zeroing(learner)
  grads = jax.jit(jax.grad(mj.meta_loss), static_argnums=2)(params, tasks, learner)
  return {k: v for k, v in grads.items() if k != "head"}


def _assert_trees_close(actual, expected, rtol=EXACT_RTOL):
  """Each leaf within rtol of the largest entry of the expected tree (a relative, global check)."""
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(expected))
  assert scale > 0
  chex.assert_trees_all_close(actual, expected, rtol=0.0, atol=rtol * scale)


def _encoder_part(grads):
  return {k: v for k, v in grads.items() if k != "head"}


class ExplicitFormTest(chex.TestCase):

  @parameterized.product(
    first_order=(True, False), zeroing=(False, True), loss=("mse_onehot", "cross_entropy"))
  def test_gradient_equals_maml(self, first_order, zeroing, loss):
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(0)
      expected = _cached_maml_grad(0, True, loss, 1, first_order, zeroing)
      actual = jax.jit(jax.grad(
        lambda p: theory.contrastive_encoder_loss(
          model.features, p, tasks, inner_lr=INNER_LR, loss=loss, first_order=first_order,
          zeroing=zeroing)))(params)
      # the surrogate does not train the head
      for leaf in jax.tree.leaves(actual["head"]):
        np.testing.assert_array_equal(leaf, 0.0)
      _assert_trees_close(_encoder_part(actual), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_equals_maml_variants(self):
    """Second order, random head: the form with every term, jitted or not."""
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(0)
      expected = _cached_maml_grad(0, True, "mse_onehot", 1, False, False)
      actual = self.variant(jax.grad(
        lambda p: theory.contrastive_encoder_loss(
          model.features, p, tasks, inner_lr=INNER_LR, first_order=False)))(params)
      _assert_trees_close(_encoder_part(actual), expected)

  @parameterized.parameters(("mse_onehot", False), ("cross_entropy", True))
  def test_bias_free_head(self, loss, first_order):
    """The paper's head, w^T phi(q) without bias."""
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(1, bias=False)
      expected = _cached_maml_grad(1, False, loss, 1, first_order, False)
      actual = jax.jit(jax.grad(
        lambda p: theory.contrastive_encoder_loss(
          model.features, p, tasks, inner_lr=INNER_LR, loss=loss, first_order=first_order)))(
            params)
      _assert_trees_close(_encoder_part(actual), expected)

  @parameterized.parameters(("mse_onehot", True), ("cross_entropy", False))
  def test_first_order_several_steps_is_exact(self, loss, zeroing):
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(2)
      expected = _cached_maml_grad(2, True, loss, 3, True, zeroing)
      actual = jax.jit(jax.grad(
        lambda p: theory.contrastive_encoder_loss(
          model.features, p, tasks, inner_lr=INNER_LR, loss=loss, num_inner_steps=3,
          first_order=True, zeroing=zeroing)))(params)
      _assert_trees_close(_encoder_part(actual), expected)

  def test_second_order_several_steps_is_refused(self):
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(3)
      with self.assertRaisesRegex(ValueError, "one inner step"):
        theory.contrastive_encoder_loss(model.features, params, tasks, inner_lr=INNER_LR,
                                        num_inner_steps=2, first_order=False)

  def test_unknown_loss_is_refused(self):
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(3)
      with self.assertRaisesRegex(ValueError, "mse_onehot"):
        theory.contrastive_encoder_loss(model.features, params, tasks, inner_lr=INNER_LR,
                                        loss="mse")

  def test_conv_encoder_gradient_equals_maml(self):
    """A Conv-4 block (conv, batch-statistics norm, relu, max-pool) on 4x4 inputs: the batch
    norm couples the examples of a batch, which the identity handles (phi is any function of the
    batch)."""
    with jax.enable_x64(True):
      model = mj.model_from_encoder(mj.nn.models.Conv4Encoder(filters=3, num_blocks=1), WAYS,
                                    (4, 4, 1))
      rng = np.random.default_rng(4)
      params = _random_params(model, rng)
      tasks = _random_tasks(rng, num_tasks=1, shots=3, queries=4, input_shape=(4, 4, 1))
      expected = _maml_encoder_grad(model.apply, params, tasks, loss=mj.mse_onehot,
                                    num_inner_steps=1, first_order=False, zeroing=False)
      actual = jax.jit(jax.grad(lambda p: theory.contrastive_encoder_loss(
        model.features, p, tasks, inner_lr=INNER_LR, first_order=False)))(params)
      _assert_trees_close(_encoder_part(actual), expected)


class DecompositionTest(chex.TestCase):

  @parameterized.parameters(("mse_onehot", True), ("cross_entropy", False))
  def test_noise_vanishes_with_zeroing(self, loss, first_order):
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(5)
      out = jax.jit(lambda p: theory.decompose_encoder_gradient(
        model.features, p, tasks, inner_lr=INNER_LR, loss=loss, first_order=first_order,
        zeroing=True))(params)
      terms = theory.encoder_loss_decomposition(
        model.features, params, tasks, inner_lr=INNER_LR, loss=loss, first_order=first_order,
        zeroing=True)
      if loss == "mse_onehot":  # s = 0 and w = 0: every noise coefficient is exactly 0
        for leaf in jax.tree.leaves(out["noise"]):
          np.testing.assert_array_equal(leaf, 0.0)
        for name in theory.NOISE_TERMS:
          self.assertEqual(float(terms[name]), 0.0, msg=name)
      else:  # the CE coefficient noise is (1 - sum_i q_i) / C: round-off only
        self.assertLess(float(out["noise_norm"]), ZERO_ATOL * float(out["total_norm"]))
        for name in theory.NOISE_TERMS:
          self.assertLess(abs(float(terms[name])), ZERO_ATOL, msg=name)
      self.assertGreater(float(out["contrastive_norm"]), 0.0)
      np.testing.assert_allclose(out["cosine"], 1.0, rtol=EXACT_RTOL)

  @parameterized.parameters(True, False)
  def test_parts_sum_to_maml_gradient(self, first_order):
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(0)
      out = jax.jit(lambda p: theory.decompose_encoder_gradient(
        model.features, p, tasks, inner_lr=INNER_LR, first_order=first_order))(params)
      expected = _cached_maml_grad(0, True, "mse_onehot", 1, first_order, False)
      _assert_trees_close(out["total"], expected)
      _assert_trees_close(jax.tree.map(jnp.add, out["contrastive"], out["noise"]), expected)
      self.assertGreater(float(out["noise_norm"]), 0.0)  # a random head adds noise
      self.assertLess(float(out["cosine"]), 1.0)
      flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
      g, c = flat(out["total"]), flat(out["contrastive"])
      np.testing.assert_allclose(out["cosine"], g @ c / jnp.linalg.norm(g) / jnp.linalg.norm(c),
                                 rtol=EXACT_RTOL)
      np.testing.assert_allclose(out["noise_norm"], jnp.linalg.norm(flat(out["noise"])),
                                 rtol=EXACT_RTOL)

  def test_zeroing_several_steps_leaves_coefficient_noise(self):
    """Documented limit: with zeroing, the noise vanishes only for one inner step."""
    with jax.enable_x64(True):
      model, _, params, tasks = _mlp_problem(7)
      terms = theory.encoder_loss_decomposition(
        model.features, params, tasks, inner_lr=INNER_LR, num_inner_steps=2, first_order=True,
        zeroing=True)
      self.assertEqual(float(terms["head"]), 0.0)
      self.assertGreater(abs(float(terms["coefficient_noise"])), 1e-6)

  def test_zeroing_form_is_the_paper_closed_form(self):
    """With w = 0, MSE and one step: L = eta/(NM) sum (q'_t - 1{t=u}) <phi(s), phi(q)>, with
    q' = eta/N sum_n' (<phi(s_n'), phi(q)> + 1) onehot(t_n') the adapted predictions."""
    with jax.enable_x64(True):
      rng = np.random.default_rng(8)
      fs, fq = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(5, 3)))
      t, u = jnp.array([0, 1, 2, 1]), jnp.array([2, 1, 0, 0, 1])
      head = {"kernel": jnp.zeros((3, WAYS)), "bias": jnp.zeros((WAYS,))}
      terms = theory.encoder_loss_terms(fs, t, fq, u, head, inner_lr=INNER_LR)
      ys, yq = jax.nn.one_hot(t, WAYS), jax.nn.one_hot(u, WAYS)
      q_adapted = INNER_LR / 4 * (fq @ fs.T + 1.0) @ ys
      coef = (q_adapted - yq) @ ys.T  # [M, N]: q'_{t_n} - 1{t_n = u_m}
      expected = INNER_LR / 20 * jnp.sum(coef * (fq @ fs.T))
      np.testing.assert_allclose(terms["contrastive"], expected, rtol=EXACT_RTOL)
      for name in theory.NOISE_TERMS:
        self.assertEqual(float(terms[name]), 0.0)


class FeatureSimilarityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_against_loop(self):
    with jax.enable_x64(True):
      feats = jnp.asarray(np.random.default_rng(10).normal(size=(6, 4)))
      labels = jnp.array([0, 1, 0, 2, 1, 0])
      out = self.variant(theory.feature_similarity)(feats, labels)
      f, y = np.asarray(feats), np.asarray(labels)
      same, diff = [], []
      for i in range(6):
        for j in range(i + 1, 6):
          c = f[i] @ f[j] / np.linalg.norm(f[i]) / np.linalg.norm(f[j])
          (same if y[i] == y[j] else diff).append(c)
      np.testing.assert_allclose(out["same_class"], np.mean(same), rtol=EXACT_RTOL)
      np.testing.assert_allclose(out["different_class"], np.mean(diff), rtol=EXACT_RTOL)
      np.testing.assert_allclose(out["gap"], np.mean(same) - np.mean(diff), rtol=EXACT_RTOL)

  def test_no_same_class_pair_is_nan(self):
    out = theory.feature_similarity(jnp.eye(3), jnp.arange(3))
    self.assertTrue(np.isnan(out["same_class"]))
    np.testing.assert_allclose(out["different_class"], 0.0)
