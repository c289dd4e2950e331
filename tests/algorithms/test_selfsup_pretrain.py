"""Tests of metajax.algorithms.selfsup_pretrain: BYOL's step, its target and resuming."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.algorithms import selfsup, selfsup_pretrain
from metajax.algorithms.protonet import ProtoNet

RTOL = 1e-6  # float32: the same arithmetic in two compiled programs
F64_RTOL = 1e-10  # float64: the same
F64_ATOL = 1e-12  # float64: entries near 0
IMAGE_SHAPE = (4, 4, 1)
FEATURE_DIM = 5
TOTAL_STEPS = 10


def _features(params, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params["encoder"]["w"])


# Inputs from NumPy and a compiled init: op-by-op jax.random would compile dozens of tiny programs.
def _model_params(seed):
  rng = np.random.default_rng(seed)
  return {"encoder": {"w": jnp.asarray(rng.normal(size=(16, FEATURE_DIM)) / 4.0)},
          "head": {"w": jnp.asarray(rng.normal(size=(FEATURE_DIM, 3))), "b": jnp.zeros(3)}}


def _augment(key, image):
  return image + 0.1 * jax.random.normal(key, image.shape, image.dtype)


def _batch(seed, b=6):
  x = np.random.default_rng(seed).uniform(size=(b, *IMAGE_SHAPE))
  return jnp.asarray(x), jnp.zeros((b,), jnp.int32)


def _init(byol, seed):
  return jax.jit(byol.init)(_model_params(seed))


def _step(optimizer=optax.adam(1e-2), **kwargs):
  kwargs = {"total_steps": TOTAL_STEPS, "hidden_dim": 8, "projection_dim": 4,
            "key": jax.random.key(7), **kwargs}
  return selfsup_pretrain.make_byol_step(_features, FEATURE_DIM, _augment, optimizer, **kwargs)


@functools.cache
def _shared_step():
  """One compiled step for the tests that need no other (compiling it is most of their time)."""
  return _step()


class ByolStepTest(chex.TestCase):

  def test_init(self):
    params = _model_params(0)
    state = jax.jit(_shared_step().init)(params)
    online, target = state.params["online"], state.params["target"]
    chex.assert_trees_all_equal(online["encoder"], params)
    chex.assert_trees_all_equal(target, {"encoder": online["encoder"],
                                         "projector": online["projector"]})
    chex.assert_shape(online["projector"]["hidden"]["w"], (FEATURE_DIM, 8))
    chex.assert_shape(online["predictor"]["out"]["w"], (8, 4))
    chex.assert_trees_all_equal_structs(state.opt_state, optax.adam(1e-2).init(online))
    self.assertEqual(int(state.step), 0)

  @pytest.mark.slow  # two float64 programs to compile: about 8 s on 2 cores
  def test_one_step_is_an_optax_step_then_the_ema(self):
    # float64, so that the two programs' rounding is far below what the test resolves; SGD, an
    # update linear in the gradient (Adam would amplify the rounding of gradients that are 0).
    with jax.enable_x64(True):
      optimizer = optax.sgd(0.1)
      byol = _step(optimizer)
      state = _init(byol, 1)
      online, target, opt_state = state.params["online"], state.params["target"], state.opt_state
      batch = _batch(2)

      @jax.jit
      def by_hand(online, target, opt_state):  # the same objective and key
        objective = selfsup_pretrain.byol_objective(_features, _augment)
        _, augment_root = jax.random.split(jax.random.key(7))
        loss, grads = jax.value_and_grad(lambda o: objective(
          o, target, batch, jax.random.fold_in(augment_root, 0))[0])(online)
        updates, _ = optimizer.update(grads, opt_state, online)
        new_online = optax.apply_updates(online, updates)
        new_target = selfsup.ema_update(
          target, {"encoder": new_online["encoder"], "projector": new_online["projector"]},
          selfsup.byol_momentum(0, TOTAL_STEPS))
        return loss, new_online, new_target

      loss, online_ref, target_ref = by_hand(online, target, opt_state)
      before = jax.device_get(state.params)  # the step donates the state's buffers
      new, metrics = byol.step(state, batch)
      chex.assert_trees_all_close(new.params["online"], online_ref, rtol=F64_RTOL, atol=F64_ATOL)
      chex.assert_trees_all_close(new.params["target"], target_ref, rtol=F64_RTOL, atol=F64_ATOL)
      np.testing.assert_allclose(metrics["outer/loss"], loss, rtol=F64_RTOL)
      np.testing.assert_allclose(metrics["outer/momentum"], 0.996, rtol=RTOL)
      self.assertEqual(int(new.step), 1)
      # The target moved, but less than the online network.
      moved = lambda a, b: sum(float(jnp.abs(x - y).sum()) for x, y in  # noqa: E731
                               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      target_moved = moved(new.params["target"]["encoder"], before["target"]["encoder"])
      online_moved = moved(new.params["online"]["encoder"], before["online"]["encoder"])
      self.assertGreater(target_moved, 0.0)
      self.assertLess(target_moved, online_moved)

  def test_the_target_receives_no_gradient(self):
    state = _init(_shared_step(), 3)
    objective = selfsup_pretrain.byol_objective(_features, _augment)
    grads = jax.jit(jax.grad(lambda t: objective(state.params["online"], t, _batch(4),
                                                 jax.random.key(5))[0]))(state.params["target"])
    for g in jax.tree.leaves(grads):
      np.testing.assert_array_equal(g, 0.0)

  def test_resumes_bit_exactly(self):
    """Four steps in one go equal two, a round trip of the state through the host (what a
    checkpoint stores: online and target params, optimiser state, step), and two more."""
    batches = [_batch(10 + i) for i in range(4)]
    byol = _shared_step()
    straight = _init(byol, 6)
    for batch in batches:
      straight, _ = byol.step(straight, batch)

    state = _init(byol, 6)
    for batch in batches[:2]:
      state, _ = byol.step(state, batch)
    restored = jax.tree.map(jnp.asarray, jax.device_get(state))
    for batch in batches[2:]:
      restored, metrics = byol.step(restored, batch)
    chex.assert_trees_all_equal(restored, straight)
    self.assertEqual(int(restored.step), 4)
    np.testing.assert_allclose(metrics["outer/momentum"], selfsup.byol_momentum(3, TOTAL_STEPS),
                               rtol=RTOL)

  def test_evaluation_reads_the_online_encoder(self):
    state = _init(_shared_step(), 9)
    x = jax.random.uniform(jax.random.key(10), (6, *IMAGE_SHAPE))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    plain = ProtoNet(_features, 3)
    on_state = selfsup_pretrain.on_online_encoder(plain)
    ours = jax.jit(lambda p: on_state.apply_fn(on_state.adapt(p, x, y), x))(state.params)
    ref = jax.jit(lambda p: plain.apply_fn(plain.adapt(p, x, y), x))(
      selfsup_pretrain.online_encoder(state.params))
    np.testing.assert_allclose(ours, ref, rtol=RTOL)

  def test_invalid_arguments(self):
    with self.assertRaisesRegex(ValueError, "total_steps must be an int >= 1, got 0"):
      _step(total_steps=0)
    with self.assertRaisesRegex(ValueError, "hidden_dim must be an int >= 1, got 0"):
      _step(hidden_dim=0).init(_model_params(0))

  def test_mlp_head(self):
    params = selfsup_pretrain.mlp_head_init(jax.random.key(11), 3, hidden_dim=6, out_dim=2)
    x = jax.random.normal(jax.random.key(12), (5, 3))
    head = jax.jit(selfsup_pretrain.mlp_head_apply)
    out = head(params, x)
    chex.assert_shape(out, (5, 2))
    # The batch norm: a shift of the whole batch changes nothing.
    np.testing.assert_allclose(head(params, x + 3.0), out, rtol=1e-4, atol=1e-5)
