"""Bad inputs at the public entry points: each is refused before tracing, with a clear message."""

from __future__ import annotations

import jax.numpy as jnp
from absl.testing import parameterized

import metajax as mj


def _apply(p, x):
  return x @ p["w"]


class InnerLrTest(parameterized.TestCase):

  @parameterized.parameters(0, 0.0, -0.1)
  def test_nonpositive_inner_lr_is_refused(self, lr):
    with self.assertRaisesRegex(ValueError, rf"inner_lr must be > 0, got {lr!r}"):
      mj.MAML(_apply, mj.mse, inner_lr=lr)
    with self.assertRaisesRegex(ValueError, rf"inner_lr must be > 0, got {lr!r}"):
      mj.adapt({"w": jnp.zeros(2)}, None, None, loss_fn=lambda p, x, y: p["w"].sum(),
               inner_lr=lr)

  def test_nonpositive_inner_lr_allowed_on_purpose(self):
    mj.MAML(_apply, mj.mse, inner_lr=-0.1, allow_nonpositive_inner_lr=True)

  def test_string_inner_lr_is_refused(self):
    with self.assertRaisesRegex(TypeError, "inner_lr must be a number .* the string '0.1'"):
      mj.MAML(_apply, mj.mse, inner_lr="0.1")

  def test_metasgd_given_raw_params(self):
    learner = mj.MAML(_apply, mj.mse, inner_lr=0.1, learn_inner_lr="element")
    with self.assertRaisesRegex(ValueError, r"learn_inner_lr='element' \(Meta-SGD\) takes "
                                r"meta-params .*learner.init\(params\), got \['w'\]"):
      learner.model_params({"w": jnp.zeros(2)})


class TemperatureTest(parameterized.TestCase):

  @parameterized.parameters(0.0, -0.1)
  def test_nonpositive_temperature_is_refused(self, t):
    z = jnp.ones((4, 3))
    with self.assertRaisesRegex(ValueError, rf"temperature must be a number > 0, got {t!r}"):
      mj.info_nce(z[:2], z[2:], temperature=t)
    with self.assertRaisesRegex(ValueError, rf"temperature must be a number > 0, got {t!r}"):
      mj.supcon(z, jnp.arange(4), temperature=t)
