"""The `Learner` protocol: the library's learners implement it, and a learner of one's own works
with `make_meta_step`, `evaluate` and `with_zeroing` unchanged. Also `MetaStep.update` / `lower`."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metajax as mj
from metajax.algorithms import contrastive_pretrain, pretrain
from metajax.types import Learner

RTOL = 1e-12  # float64: the same arithmetic in another order


def _model_and_tasks(num_tasks: int = 3):
  model = mj.mlp(3, hidden=(8,), input_shape=(4,))
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  tasks = mj.Task(jax.random.normal(k1, (num_tasks, 6, 4), jnp.float64),
                  jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1)),
                  jax.random.normal(k2, (num_tasks, 9, 4), jnp.float64),
                  jnp.tile(jnp.arange(3).repeat(3), (num_tasks, 1)))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(k3))
  return model, tasks, params


@dataclasses.dataclass(frozen=True)
class OneStepLearner:
  """A user's learner written without metajax.adapt: one hand-written gradient step."""

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  inner_lr: float
  params_transforms: tuple = ()

  def init(self, params):
    return params

  def model_params(self, meta_params):
    for transform in self.params_transforms:
      meta_params = transform(meta_params)
    return meta_params

  def adapt(self, meta_params, x, y, *, return_losses=False):
    params = self.model_params(meta_params)
    support_loss, grads = jax.value_and_grad(lambda p: self.loss(self.apply_fn(p, x), y))(params)
    adapted = jax.tree.map(lambda p, g: p - self.inner_lr * g, params, grads)
    return (adapted, support_loss[None]) if return_losses else adapted

  def task_loss(self, meta_params, task):
    adapted, support_loss = self.adapt(meta_params, task.support_x, task.support_y,
                                       return_losses=True)
    loss = self.loss(self.apply_fn(adapted, task.query_x), task.query_y)
    return loss, {"inner/support_loss_before": support_loss[0], "outer/query_loss": loss}


def test_library_learners_implement_the_protocol():
  model = mj.conv4(5, filters=4)
  learners = [
    mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.1),
    mj.with_zeroing(mj.MAML(model.apply, mj.cross_entropy, inner_lr=0.1)),
    mj.Reptile(model.apply, mj.cross_entropy, inner_lr=0.1),
    mj.ProtoNet(model.features, num_classes=5),
    pretrain.finetune_learner(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1),
    contrastive_pretrain.prototype_learner(model, 5),
  ]
  for learner in learners:
    assert isinstance(learner, Learner), type(learner).__name__
  assert not isinstance(object(), Learner)


@pytest.mark.parametrize("jit", [True, False])
def test_own_learner_matches_maml_in_the_meta_step(jit):
  with jax.enable_x64(True):
    model, tasks, params = _model_and_tasks()
    own = OneStepLearner(model.apply, mj.cross_entropy, inner_lr=0.3)
    maml = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=0.3)
    results = []
    for learner in (own, maml):
      meta_step = mj.make_meta_step(learner, optax.sgd(0.1), jit=jit)
      state, metrics = meta_step.step(meta_step.init(params), tasks)
      results.append((state.params, metrics["outer/loss"], metrics["outer/grad_norm"]))
    chex.assert_trees_all_close(results[0], results[1], rtol=RTOL)
    # evaluate and with_zeroing compose with it too
    zeroed = mj.with_zeroing(own)
    assert isinstance(zeroed, OneStepLearner) and len(zeroed.params_transforms) == 1
    got = mj.evaluate(zeroed, params, tasks, jit=jit)
    want = mj.evaluate(mj.with_zeroing(maml), params, tasks, jit=jit)
    for name in ("loss_before", "loss_after"):
      np.testing.assert_allclose(got[name]["mean"], want[name]["mean"], rtol=RTOL)
    np.testing.assert_allclose(got["loss_before"]["mean"], np.log(3), rtol=RTOL)  # zero head


def test_meta_step_update_lower_and_steps():
  with jax.enable_x64(True):
    model, tasks, params = _model_and_tasks()
    learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.3)
    meta_step = mj.make_meta_step(learner, optax.adam(1e-2), donate=False)
    state = meta_step.init(params)
    by_step, _ = meta_step.step(state, tasks)
    by_update, _ = jax.jit(meta_step.update)(state, tasks)
    chex.assert_trees_all_close(by_step.params, by_update.params, rtol=RTOL)
    lowered = meta_step.lower(state, tasks)
    assert lowered.compile().cost_analysis() is not None
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), tasks)
    assert "while" in meta_step.lower(state, stacked, stacked=True).as_text()
    with pytest.raises(TypeError):
      tuple(meta_step)  # it does not unpack (it would drop `steps`)
    with pytest.raises(ValueError, match="jit=False"):
      mj.make_meta_step(learner, optax.adam(1e-2), jit=False).lower(state, tasks)
