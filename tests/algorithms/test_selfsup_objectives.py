"""Tests of the MoCo v2, Barlow Twins and SwAV objectives and pre-training steps: the losses on
tiny inputs worked by hand, and the steps of `metajax.algorithms.selfsup_pretrain` (their state,
the order of their updates, with and without jit, resumed bit-exactly)."""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.algorithms import contrastive_pretrain, selfsup, selfsup_pretrain
# BYOL's tests' tiny encoder, parameters, augmentation and batches
from tests.algorithms.test_selfsup_pretrain import (FEATURE_DIM, _augment, _batch, _features,
                                                    _model_params)

RTOL = 1e-6  # float32: the same arithmetic in two programs
F64_RTOL = 1e-10  # float64: the same arithmetic, rounded differently
F64_ATOL = 1e-12
BATCH = 6  # the size of `_batch`'s default batch
HEAD = {"hidden_dim": 8, "projection_dim": 4}


# ------------------------------------------------------------------------ losses worked by hand

class MocoByHandTest(chex.TestCase):

  def test_one_query_its_key_and_two_negatives(self):
    # cosines: 1 with the key, 0 and -1 with the queue; logits / 0.2 = [5, 0, -5].
    q, k = np.array([[2.0, 0.0]]), np.array([[3.0, 0.0]])
    queue = np.array([[0.0, 1.0], [-1.0, 0.0]])
    expected = math.log(1.0 + math.exp(-5.0) + math.exp(-10.0))
    with jax.enable_x64(True):
      ours = selfsup.moco_loss(q, k, queue, temperature=0.2)
    np.testing.assert_allclose(ours, expected, rtol=F64_RTOL)

  def test_is_optax_cross_entropy_of_the_scaled_cosines(self):
    rng = np.random.default_rng(0)
    q, k, n = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(7, 3))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cosines = np.concatenate([np.sum(unit(q) * unit(k), -1, keepdims=True), unit(q) @ unit(n).T],
                             axis=-1)
    with jax.enable_x64(True):
      for temperature in (0.07, 0.2, 1.0):
        ref = optax.softmax_cross_entropy_with_integer_labels(cosines / temperature,
                                                              np.zeros(4, int)).mean()
        np.testing.assert_allclose(selfsup.moco_loss(q, k, n, temperature=temperature), ref,
                                   rtol=F64_RTOL)

  def test_a_lower_temperature_sharpens_a_positive_that_wins(self):
    # Each query is closest to its own key: the loss falls towards 0 as T falls; scaling the
    # embeddings (norms) changes nothing.
    q = np.array([[1.0, 0.1], [0.1, 1.0]])
    k = np.array([[1.0, 0.0], [0.0, 1.0]])
    n = np.array([[-1.0, 0.5], [0.3, -1.0], [-0.7, -0.7]])
    with jax.enable_x64(True):
      losses = [float(selfsup.moco_loss(q, k, n, temperature=t)) for t in (1.0, 0.5, 0.2, 0.05)]
      self.assertTrue(all(a > b for a, b in zip(losses, losses[1:])), losses)
      # The smallest margin (query 2: 0.995 to its key, 0.356 to a negative) / 0.05 is 12.8, so
      # the loss is about exp(-12.8) / 2.
      self.assertLess(losses[-1], 1e-5)
      np.testing.assert_allclose(selfsup.moco_loss(3.0 * q, 0.5 * k, 7.0 * n, temperature=0.2),
                                 losses[2], rtol=F64_RTOL)

  def test_batch_permutation(self):
    rng = np.random.default_rng(1)
    q, k, n = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.normal(size=(6, 3))
    perm = rng.permutation(5)
    with jax.enable_x64(True):
      np.testing.assert_allclose(selfsup.moco_loss(q[perm], k[perm], n[::-1]),
                                 selfsup.moco_loss(q, k, n), rtol=F64_RTOL)
      self.assertFalse(np.isclose(selfsup.moco_loss(q[perm], k, n), selfsup.moco_loss(q, k, n)))


class BarlowTwinsByHandTest(chex.TestCase):

  def test_two_samples_two_dimensions(self):
    # Standardised columns are +-1; C = [[1, -1], [1, -1]]: on-diagonal (1-1)^2 + (1+1)^2 = 4,
    # off-diagonal (-1)^2 + 1^2 = 2.
    z1 = np.array([[1.0, 1.0], [-1.0, -1.0]])
    z2 = np.array([[1.0, -1.0], [-1.0, 1.0]])
    with jax.enable_x64(True):
      np.testing.assert_allclose(selfsup.cross_correlation(z1, z2, epsilon=0.0),
                                 [[1.0, -1.0], [1.0, -1.0]], rtol=F64_RTOL)
      for lam in (0.0, 5e-3, 1.0):
        np.testing.assert_allclose(
          selfsup.barlow_twins_loss(z1, z2, off_diagonal_weight=lam, epsilon=0.0), 4.0 + 2.0 * lam,
          rtol=F64_RTOL)

  def test_zero_at_identity_correlation_and_batch_permutation(self):
    # Two uncorrelated +-1 columns, the same in both views (up to a positive affine change).
    z = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    with jax.enable_x64(True):
      np.testing.assert_allclose(selfsup.barlow_twins_loss(z, 3.0 * z + 2.0, epsilon=0.0), 0.0,
                                 atol=F64_ATOL)
      rng = np.random.default_rng(2)
      z1, z2 = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
      perm = rng.permutation(7)
      np.testing.assert_allclose(selfsup.barlow_twins_loss(z1[perm], z2[perm]),
                                 selfsup.barlow_twins_loss(z1, z2), rtol=F64_RTOL)
      self.assertGreater(float(selfsup.barlow_twins_loss(z1, z2)), 0.0)


class SinkhornSwavByHandTest(chex.TestCase):

  def test_a_doubly_balanced_plan_is_its_softmax(self):
    # exp(S / eps) = [[e, 1], [1, e]] already has equal rows and columns: every iteration keeps
    # it, and the codes are the rows' softmax.
    e = math.e
    with jax.enable_x64(True):
      for num_iters in (0, 1, 3):
        codes = selfsup.sinkhorn(np.eye(2), epsilon=1.0, num_iters=num_iters)
        np.testing.assert_allclose(codes, [[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]],
                                   rtol=F64_RTOL)

  def test_one_iteration_by_hand_and_the_marginals(self):
    # S / eps = log [[4, 1], [2, 1]] (B = K = 2): columns to 1/2 give [[4/6, 1/2], [2/6, 1/2]] / 2
    # (up to the common factor), then rows to 1/2; times B, rows sum to 1.
    s = np.log(np.array([[4.0, 1.0], [2.0, 1.0]]))
    cols = np.array([[4 / 6, 1 / 2], [2 / 6, 1 / 2]])
    expected = cols / cols.sum(axis=1, keepdims=True)
    with jax.enable_x64(True):
      np.testing.assert_allclose(selfsup.sinkhorn(s, epsilon=1.0, num_iters=1), expected,
                                 rtol=F64_RTOL)
      rng = np.random.default_rng(3)
      codes = selfsup.sinkhorn(rng.normal(size=(12, 4)), epsilon=0.05, num_iters=3)
      np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=F64_RTOL)  # rows exactly
      # Columns reach B / K only as the iterations go on (3 at eps 0.05 are far from it).
      many = selfsup.sinkhorn(rng.normal(size=(12, 4)), epsilon=0.5, num_iters=200)
      np.testing.assert_allclose(many.sum(axis=0), 3.0, rtol=1e-8)

  def test_swav_loss_by_hand(self):
    # Prototypes e1, e2; z1 = z2 = e1, e2 (two samples): scores the identity, codes as above
    # with eps = 0.05 (nearly one-hot), predictions softmax(I / T).
    z = np.eye(2)
    with jax.enable_x64(True):
      codes = np.asarray(selfsup.sinkhorn(z, epsilon=0.05, num_iters=3))
      for temperature in (0.1, 1.0):
        log_p = np.log(np.exp(z / temperature) / np.exp(z / temperature).sum(-1, keepdims=True))
        expected = -np.mean(np.sum(codes * log_p, axis=-1))
        np.testing.assert_allclose(selfsup.swav_loss(z, z, z, temperature=temperature), expected,
                                   rtol=F64_RTOL)
        perm = np.array([1, 0])
        np.testing.assert_allclose(
          selfsup.swav_loss(z[perm], z[perm], z, temperature=temperature), expected,
          rtol=F64_RTOL)


class SwavMulticropTest(chex.TestCase):

  def test_two_crops_are_swav_loss(self):
    rng = np.random.default_rng(5)
    z1, z2, c = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    with jax.enable_x64(True):
      np.testing.assert_allclose(selfsup.swav_multicrop_loss(np.stack([z1, z2]), c),
                                 selfsup.swav_loss(z1, z2, c), rtol=F64_RTOL)

  def test_three_crops_by_hand(self):
    # Crops 0 and 1 assigned: (CE(q0, p1) + CE(q0, p2)) / 2 and (CE(q1, p0) + CE(q1, p2)) / 2,
    # averaged.
    rng = np.random.default_rng(6)
    z, c = rng.normal(size=(3, 5, 3)), rng.normal(size=(4, 3))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    scores = unit(z) @ unit(c).T
    with jax.enable_x64(True):
      for temperature in (0.1, 0.5):
        log_p = scores / temperature
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        q = [np.asarray(selfsup.sinkhorn(scores[a])) for a in (0, 1)]
        ce = lambda a, v: -np.mean(np.sum(q[a] * log_p[v], -1))  # noqa: E731
        expected = ((ce(0, 1) + ce(0, 2)) / 2 + (ce(1, 0) + ce(1, 2)) / 2) / 2
        ours = selfsup.swav_multicrop_loss(z, c, temperature=temperature)
        np.testing.assert_allclose(ours, expected, rtol=F64_RTOL)
        perm = rng.permutation(5)
        np.testing.assert_allclose(selfsup.swav_multicrop_loss(z[:, perm], c,
                                                               temperature=temperature),
                                   expected, rtol=F64_RTOL)
      one = np.mean([ce(0, 1), ce(0, 2)])  # the last temperature's
      np.testing.assert_allclose(selfsup.swav_multicrop_loss(z, c, num_assigned=1,
                                                             temperature=0.5), one, rtol=F64_RTOL)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, r"crops must have shape \[views >= 2"):
      selfsup.swav_multicrop_loss(np.ones((1, 4, 3)), np.ones((2, 3)))
    with self.assertRaisesRegex(ValueError, "num_assigned=3 is more than the 2 crops"):
      selfsup.swav_multicrop_loss(np.ones((2, 4, 3)), np.ones((2, 3)), num_assigned=3)


# ----------------------------------------------------------------------------------- the steps

def _make(name, optimizer=None, **kwargs):
  optimizer = optimizer or optax.adam(1e-2)
  kwargs = {**HEAD, "key": jax.random.key(7), **kwargs}
  if name == "moco":
    kwargs.setdefault("queue_size", 10)
    return selfsup_pretrain.make_moco_step(_features, FEATURE_DIM, _augment, optimizer, **kwargs)
  if name == "barlow_twins":
    return selfsup_pretrain.make_barlow_twins_step(_features, FEATURE_DIM, _augment, optimizer,
                                                   **kwargs)
  kwargs.setdefault("num_prototypes", 3)
  kwargs.setdefault("freeze_steps", 2)
  return selfsup_pretrain.make_swav_step(_features, FEATURE_DIM, _augment, optimizer, **kwargs)


@functools.cache
def _shared(name):
  return _make(name)


def _init(step, seed):
  return jax.jit(step.init)(_model_params(seed))


NAMES = ("moco", "barlow_twins", "swav")


class InitTest(chex.TestCase):

  def test_moco_state(self):
    params = _model_params(0)
    state = _init(_shared("moco"), 0)
    online, target, queue = (state.params[k] for k in ("online", "target", "queue"))
    chex.assert_trees_all_equal(online["encoder"], params)
    chex.assert_trees_all_equal(target, online)  # the key network starts as a copy
    chex.assert_shape(queue["keys"], (10, 4))
    np.testing.assert_allclose(jnp.linalg.norm(queue["keys"], axis=-1), 1.0, rtol=RTOL)
    self.assertEqual(int(queue["ptr"]), 0)
    chex.assert_trees_all_equal_structs(state.opt_state, optax.adam(1e-2).init(online))

  def test_barlow_twins_and_swav_state(self):
    state = _init(_shared("barlow_twins"), 0)
    self.assertEqual(set(state.params), {"online"})
    self.assertEqual(set(state.params["online"]), {"encoder", "projector"})
    projector = state.params["online"]["projector"]
    self.assertEqual(set(projector), {"hidden", "norm", "hidden_2", "norm_2", "out"})
    chex.assert_shape(projector["hidden_2"]["w"], (8, 8))
    chex.assert_shape(projector["out"]["w"], (8, 4))
    state = _init(_shared("swav"), 0)
    prototypes = state.params["online"]["prototypes"]
    chex.assert_shape(prototypes, (3, 4))
    np.testing.assert_allclose(jnp.linalg.norm(prototypes, axis=-1), 1.0, rtol=RTOL)


class MlpHeadTest(chex.TestCase):

  def test_two_hidden_layers_by_hand(self):
    def numpy_head(p, x):
      def hidden(h, w, norm):
        h = h @ w
        h = (h - h.mean(0)) / np.sqrt(h.var(0) + selfsup_pretrain.HEAD_NORM_EPSILON)
        return np.maximum(h * norm["scale"] + norm["bias"], 0.0)
      h = hidden(hidden(x, p["hidden"]["w"], p["norm"]), p["hidden_2"]["w"], p["norm_2"])
      return h @ p["out"]["w"] + p["out"]["b"]

    with jax.enable_x64(True):
      params = selfsup_pretrain.mlp_head_init(jax.random.key(1), 3, hidden_dim=6, out_dim=2,
                                              num_hidden=2, dtype=jnp.float64)
      params = jax.tree.map(lambda a: a + 0.1, params)  # norms away from the identity too
      x = np.random.default_rng(4).normal(size=(5, 3))
      np.testing.assert_allclose(selfsup_pretrain.mlp_head_apply(params, x),
                                 numpy_head(jax.device_get(params), x), rtol=1e-9, atol=1e-12)

  def test_one_hidden_layer_is_byols_head(self):
    one = selfsup_pretrain.mlp_head_init(jax.random.key(2), 3, hidden_dim=6, out_dim=2)
    two = selfsup_pretrain.mlp_head_init(jax.random.key(2), 3, hidden_dim=6, out_dim=2,
                                         num_hidden=2)
    self.assertEqual(set(one), {"hidden", "norm", "out"})
    chex.assert_trees_all_equal(one, {k: two[k] for k in one})
    with self.assertRaisesRegex(ValueError, "num_hidden must be an int >= 1, got 0"):
      selfsup_pretrain.mlp_head_init(jax.random.key(2), 3, num_hidden=0)


class MocoStepTest(chex.TestCase):

  def test_target_and_queue_receive_no_gradient(self):
    state = _init(_shared("moco"), 3)
    objective = selfsup_pretrain.moco_objective(_features, _augment)
    online, target, queue = (state.params[k] for k in ("online", "target", "queue"))
    grads = jax.jit(jax.grad(lambda t, n: objective(online, t, n, _batch(4), jax.random.key(5))[0],
                             argnums=(0, 1)))(target, queue["keys"])
    for g in jax.tree.leaves(grads):
      np.testing.assert_array_equal(g, 0.0)
    online_grads = jax.jit(jax.grad(lambda o: objective(o, target, queue["keys"], _batch(4),
                                                        jax.random.key(5))[0]))(online)
    self.assertGreater(float(optax.tree.norm(online_grads)), 0.0)

  @pytest.mark.slow  # float64, jit and op by op: about 20 s on 2 busy cores
  def test_one_step_by_hand_with_and_without_jit(self):
    """Loss against the queue as it was, optax step of the online network, EMA of the key
    network towards the *updated* online one, then the keys (from the key network before its
    update) enqueued at the pointer."""
    with jax.enable_x64(True):
      optimizer = optax.sgd(0.1)
      momentum = 0.9
      steps = [_make("moco", optimizer, momentum=momentum, jit=jit) for jit in (True, False)]
      batch = _batch(2)
      state = _init(steps[0], 1)
      online, target, queue = (state.params[k] for k in ("online", "target", "queue"))

      objective = selfsup_pretrain.moco_objective(_features, _augment)
      _, augment_root = jax.random.split(jax.random.key(7))
      (loss, (_, keys)), grads = jax.value_and_grad(objective, has_aux=True)(
        online, target, queue["keys"], batch, jax.random.fold_in(augment_root, 0))
      new_online = optax.apply_updates(online, optimizer.update(grads, state.opt_state)[0])
      new_target = jax.tree.map(lambda t, o: momentum * t + (1 - momentum) * o, target,
                                new_online)
      new_keys = np.asarray(queue["keys"]).copy()
      new_keys[:BATCH] = keys
      before = jax.device_get(state)
      for step in steps:
        new, metrics = step.step(jax.tree.map(jnp.asarray, before), batch)
        chex.assert_trees_all_close(new.params["online"], new_online, rtol=F64_RTOL,
                                    atol=F64_ATOL)
        chex.assert_trees_all_close(new.params["target"], new_target, rtol=F64_RTOL,
                                    atol=F64_ATOL)
        np.testing.assert_allclose(new.params["queue"]["keys"], new_keys, rtol=F64_RTOL,
                                   atol=F64_ATOL)
        self.assertEqual(int(new.params["queue"]["ptr"]), BATCH)
        np.testing.assert_allclose(metrics["outer/loss"], loss, rtol=F64_RTOL)
        self.assertEqual(int(new.step), 1)

  def test_the_queue_is_first_in_first_out_across_steps(self):
    """Queue of 10, batches of 6: step 1 fills rows 0-5, step 2 rows 6-9 and 0-1 (wrapping),
    so rows 2-5 still hold step 1's keys and the pointer is at 2."""
    step = _shared("moco")
    state = _init(step, 4)
    initial = np.asarray(state.params["queue"]["keys"])
    state, _ = step.step(state, _batch(5))
    first = np.asarray(state.params["queue"]["keys"])
    np.testing.assert_array_equal(first[BATCH:], initial[BATCH:])
    self.assertFalse(np.allclose(first[:BATCH], initial[:BATCH]))
    np.testing.assert_allclose(np.linalg.norm(first[:BATCH], axis=-1), 1.0, rtol=1e-5)
    state, _ = step.step(state, _batch(6))
    second = np.asarray(state.params["queue"]["keys"])
    self.assertEqual(int(state.params["queue"]["ptr"]), 2)
    np.testing.assert_array_equal(second[2:BATCH], first[2:BATCH])
    self.assertFalse(np.allclose(second[:2], first[:2]))
    self.assertFalse(np.allclose(second[BATCH:], first[BATCH:]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_shuffled_batch_norm_by_hand(self):
    """shuffle_groups=2 on a batch of 6: the queries projected in the groups 0-2 and 3-5 (each
    normalised by its own statistics), the keys' views permuted by the key's `fold_in(., 1)`,
    projected in groups of 3, put back in batch order; one normalisation batch gives another
    loss (the projector's batch norm sees other images)."""
    with jax.enable_x64(True):
      state = _init(_make("moco", queue_size=10), 2)
      online, target, queue = (state.params[k] for k in ("online", "target", "queue"))
      batch, key = _batch(3), jax.random.key(11)
      objective = self.variant(selfsup_pretrain.moco_objective(_features, _augment,
                                                               shuffle_groups=2))
      loss, (_, keys) = objective(online, target, queue["keys"], batch, key)

      def project(network, images):
        return selfsup_pretrain.mlp_head_apply(network["projector"],
                                               _features(network["encoder"], images))

      view_1, view_2 = contrastive_pretrain.two_views(_augment, key, batch[0])
      queries = np.concatenate([project(online, view_1[:3]), project(online, view_1[3:])])
      order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), BATCH))
      self.assertFalse(np.array_equal(order, np.arange(BATCH)))  # a shuffle that moves images
      shuffled = np.concatenate([project(target, view_2[order[:3]]),
                                 project(target, view_2[order[3:]])])
      expected_keys = np.empty_like(shuffled)
      expected_keys[order] = shuffled
      np.testing.assert_allclose(loss, selfsup.moco_loss(queries, expected_keys, queue["keys"]),
                                 rtol=F64_RTOL)
      np.testing.assert_allclose(keys, expected_keys / np.linalg.norm(expected_keys, axis=-1,
                                                                      keepdims=True),
                                 rtol=F64_RTOL, atol=F64_ATOL)
      one_batch = selfsup_pretrain.moco_objective(_features, _augment)
      self.assertFalse(np.isclose(loss, one_batch(online, target, queue["keys"], batch, key)[0],
                                  rtol=1e-6))

  def test_a_shuffled_step_trains_and_resumes_its_order(self):
    """The step with shuffle_groups=3 runs jitted, changes the online network and repeats
    itself from the same state (the order comes from the step's key, not a hidden stream)."""
    step = _make("moco", shuffle_groups=3)
    state = _init(step, 5)
    before = jax.device_get(state)
    new, metrics = step.step(state, _batch(7))
    again, _ = step.step(jax.tree.map(jnp.asarray, before), _batch(7))
    chex.assert_trees_all_equal(jax.device_get(new), jax.device_get(again))
    self.assertTrue(np.isfinite(metrics["outer/loss"]))
    self.assertFalse(np.allclose(new.params["online"]["projector"]["out"]["w"],
                                 before.params["online"]["projector"]["out"]["w"]))

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, r"momentum must be in \[0, 1\], got 1.5"):
      _make("moco", momentum=1.5)
    with self.assertRaisesRegex(ValueError, "queue_size must be an int >= 1, got 0"):
      _make("moco", queue_size=0)
    with self.assertRaisesRegex(ValueError, "cannot enqueue 6 keys into a queue of 4"):
      step = _make("moco", queue_size=4)
      step.step(_init(step, 0), _batch(0))
    with self.assertRaisesRegex(ValueError, "shuffle_groups must be an int >= 1, got 0"):
      _make("moco", shuffle_groups=0)
    with self.assertRaisesRegex(ValueError, "shuffle_groups=4 must divide the batch of 6 images"):
      step = _make("moco", shuffle_groups=4)
      step.step(_init(step, 0), _batch(0))


class BarlowTwinsStepTest(chex.TestCase):

  def test_loss_is_barlow_twins_of_the_projections(self):
    step = _shared("barlow_twins")
    state = _init(step, 2)
    online = state.params["online"]
    batch = _batch(3)
    _, augment_root = jax.random.split(jax.random.key(7))

    @jax.jit
    def by_hand(online):
      from metajax.algorithms.contrastive_pretrain import two_views
      v1, v2 = two_views(_augment, jax.random.fold_in(augment_root, 0), batch[0])
      z = selfsup_pretrain.mlp_head_apply(online["projector"],
                                          _features(online["encoder"], jnp.concatenate([v1, v2])))
      return selfsup.barlow_twins_loss(z[:BATCH], z[BATCH:])

    loss = by_hand(online)
    _, metrics = step.step(state, batch)
    np.testing.assert_allclose(metrics["outer/loss"], loss, rtol=1e-5)

  def test_invalid_lambda(self):
    with self.assertRaisesRegex(ValueError, "off_diagonal_weight must be a number >= 0, got -1"):
      _make("barlow_twins", off_diagonal_weight=-1.0)


class SwavStepTest(chex.TestCase):

  def test_prototypes_frozen_for_the_first_steps_then_trained_and_unit(self):
    step = _shared("swav")  # freeze_steps=2
    state = _init(step, 5)
    initial = np.asarray(state.params["online"]["prototypes"])
    encoder = np.asarray(state.params["online"]["encoder"]["encoder"]["w"])
    for i in range(2):
      state, _ = step.step(state, _batch(10 + i))
      np.testing.assert_array_equal(state.params["online"]["prototypes"], initial)
    self.assertFalse(np.allclose(state.params["online"]["encoder"]["encoder"]["w"], encoder))
    state, _ = step.step(state, _batch(12))
    prototypes = np.asarray(state.params["online"]["prototypes"])
    self.assertFalse(np.allclose(prototypes, initial))
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=-1), 1.0, rtol=1e-5)

  @pytest.mark.slow  # float64, jit and op by op: about 15 s on 2 busy cores
  def test_with_and_without_jit(self):
    with jax.enable_x64(True):
      steps = [_make("swav", optax.sgd(0.1), freeze_steps=1, jit=jit) for jit in (True, False)]
      before = jax.device_get(_init(steps[0], 6))
      results = []
      for step in steps:
        state = jax.tree.map(jnp.asarray, before)
        for i in range(2):
          state, metrics = step.step(state, _batch(20 + i))
        results.append((jax.device_get(state.params), metrics))
      chex.assert_trees_all_close(results[0][0], results[1][0], rtol=F64_RTOL, atol=F64_ATOL)
      np.testing.assert_allclose(results[0][1]["outer/loss"], results[1][1]["outer/loss"],
                                 rtol=F64_RTOL)

  def test_multicrop(self):
    """Small crops change the loss (they predict the two views' codes); none is the default."""
    plain = _shared("swav")
    crops = _make("swav", num_small_crops=2, small_crop_augment=_augment)
    state = _init(plain, 7)
    _, plain_metrics = plain.step(jax.tree.map(jnp.array, state), _batch(40))
    new, metrics = crops.step(state, _batch(40))
    assert np.isfinite(metrics["outer/loss"]) and int(new.step) == 1
    self.assertFalse(np.isclose(metrics["outer/loss"], plain_metrics["outer/loss"]))
    with self.assertRaisesRegex(ValueError, "num_small_crops > 0 needs a small_crop_augment"):
      _make("swav", num_small_crops=2)

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "num_prototypes must be an int >= 1, got 0"):
      _make("swav", num_prototypes=0)
    with self.assertRaisesRegex(ValueError, "freeze_steps must be an int >= 0, got -1"):
      _make("swav", freeze_steps=-1)


@pytest.mark.parametrize("name", NAMES)
def test_resumes_bit_exactly(name):
  """Four steps in one go equal two, a round trip of the state through the host (what a
  checkpoint stores: params with the queue or prototypes, optimiser state, step), and two more."""
  step = _shared(name)
  batches = [_batch(30 + i) for i in range(4)]
  straight = _init(step, 8)
  for batch in batches:
    straight, _ = step.step(straight, batch)
  state = _init(step, 8)
  for batch in batches[:2]:
    state, _ = step.step(state, batch)
  restored = jax.tree.map(jnp.asarray, jax.device_get(state))
  for batch in batches[2:]:
    restored, metrics = step.step(restored, batch)
  chex.assert_trees_all_equal(restored, straight)
  assert int(restored.step) == 4 and np.isfinite(metrics["outer/loss"])


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_reads_the_online_encoder(name):
  state = _init(_shared(name), 9)
  chex.assert_trees_all_equal(selfsup_pretrain.online_encoder(state.params), _model_params(9))
