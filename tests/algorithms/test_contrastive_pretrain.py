"""Tests of SimCLR / SupCon pre-training and of few-shot evaluation on the frozen encoder."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.data import augment as aug
from metajax.algorithms import contrastive_pretrain as cp
from metajax.algorithms import pretrain

F32_TOL = 1e-5
SIZE, WAYS = 8, 3


def _pool(key, classes=6, per_class=4):
  """Class c: a fixed sparse random 8x8 pattern of 1s on 0 (like Omniglot's strokes), plus
  per-image noise, in [0, 1]."""
  kc, kn = jax.random.split(key)
  patterns = (jax.random.uniform(kc, (classes, 1, SIZE, SIZE, 1)) > 0.7).astype(jnp.float32)
  noise = 0.2 * jax.random.uniform(kn, (classes, per_class, SIZE, SIZE, 1))
  return jnp.clip(patterns + noise, 0.0, 1.0)


# Milder than the Omniglot defaults: a 2-pixel shift of an 8x8 pattern of independent pixels
# leaves nothing in common between two views.
MILD = dict(max_rotation=0.1, max_translation=0.5, scale_range=(0.95, 1.05))


@functools.partial(jax.jit, static_argnums=2)
def _class_batch(key, images, classes):
  return pretrain.sample_class_batch(key, images, classes_per_batch=classes, images_per_class=2)


def _model():
  return mj.mlp(WAYS, hidden=(16,), input_shape=(SIZE, SIZE, 1))


class ObjectiveTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_identity_views_give_the_closed_form_losses(self):
    model = _model()
    params = model.init(jax.random.key(0))
    x, y = _class_batch(jax.random.key(1), _pool(jax.random.key(2)), 3)
    z = model.features(params, jnp.concatenate([x, x]))
    z1, z2 = z[:6], z[6:]
    simclr = cp.simclr_objective(model.features, aug.identity_augment, temperature=0.5)
    loss, metrics = self.variant(simclr)(params, (x, y), jax.random.key(3))
    np.testing.assert_allclose(loss, mj.info_nce(z1, z2, temperature=0.5), rtol=F32_TOL)
    np.testing.assert_allclose(metrics["outer/positive_cosine"], 1.0, rtol=F32_TOL)
    sup = cp.supcon_objective(model.features, aug.identity_augment, temperature=0.1)
    loss, _ = self.variant(sup)(params, (x, y), jax.random.key(3))
    np.testing.assert_allclose(loss, mj.supcon(z, jnp.concatenate([y, y]), temperature=0.1),
                               rtol=F32_TOL)

  @parameterized.parameters("simclr", "supcon")
  def test_pretraining_reduces_the_loss(self, name):
    model = _model()
    images = _pool(jax.random.key(4))
    batch = _class_batch(jax.random.key(5), images, 6)
    make = {"simclr": cp.simclr_objective, "supcon": cp.supcon_objective}[name]
    objective = make(model.features, aug.make_affine_augment(**MILD))
    meta_step = pretrain.make_pretrain_step(objective, optax.adam(1e-2), key=jax.random.key(6))
    state = meta_step.init(model.init(jax.random.key(7)))
    losses = []
    for _ in range(15):  # a new pair of augmentations every step (fold_in(key, step))
      state, metrics = meta_step.step(state, batch)
      losses.append(float(metrics["outer/loss"]))
    self.assertLess(np.mean(losses[-3:]), 0.85 * np.mean(losses[:3]))


class FewShotTest(chex.TestCase):

  def test_prototypes_and_linear_probe_on_the_frozen_encoder(self):
    model = _model()
    params = model.init(jax.random.key(8))
    images = _pool(jax.random.key(9))
    sample = mj.data.make_episode_sampler(images, ways=WAYS, shots=1, queries=2)
    tasks = jax.jit(lambda k: mj.data.sample_meta_batch(sample, k, images, num_tasks=4))(
      jax.random.key(10))
    probe = cp.linear_probe_learner(model, mj.cross_entropy, num_inner_steps=10, inner_lr=0.5)
    protos = cp.prototype_learner(model, WAYS)
    for learner in (probe, protos):
      per_task = jax.jit(lambda p, lr=learner: mj.evaluate_tasks(lr, p, tasks))(params)
      np.testing.assert_allclose(per_task["loss_before"], np.log(WAYS), rtol=1e-6)
      self.assertGreater(float(per_task["accuracy_after"].mean()), 1.0 / WAYS)
    task = jax.tree.map(lambda a: a[0], tasks)
    adapted = jax.jit(probe.adapt)(params, task.support_x, task.support_y)
    chex.assert_trees_all_equal(adapted["encoder"], params["encoder"])  # frozen encoder


if __name__ == "__main__":
  pytest.main([__file__])
