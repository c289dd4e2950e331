"""ResNet-12 (metajax.nn.resnet): shapes, parameter count, exact float64 second-order
meta-gradients, the variants and the theory module unchanged, and its selection by the configs."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import metajax as mj
from metajax.analysis import theory
from metajax.experiment import build
from metajax.nn import resnet
from metajax.platform import xla

FD_RTOL = 1e-6  # float64 central differences (step FD_STEP) against the directional derivative
FD_STEP = 1e-6
F64_RTOL = 1e-10  # float64: two exact computations of the same gradient
TINY_WIDTHS = (2, 3, 4, 5)
TINY_SHAPE = (16, 16, 3)
WAYS = 3
INNER_LR = 0.3
CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _param_count(widths, in_channels, ways):
  """ResNet-12's parameters counted from the architecture: per block three 3x3 convs and the
  1x1 shortcut conv, none with a bias, and four BatchNorms (a scale and a bias per channel);
  then the linear head on the last block's channels."""
  total, c_in = 0, in_channels
  for c in widths:
    total += 3 * 3 * c_in * c + 2 * (3 * 3 * c * c) + c_in * c + 4 * 2 * c
    c_in = c
  return total + widths[-1] * ways + ways


def _size(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _random_params(shapes, rng):
  """Params of the structure, shapes and dtypes of `shapes` (from `jax.eval_shape` of an init),
  drawn with numpy, so that no init is compiled: kernels N(0, 2 / fan_in), norm scales in
  [0.5, 1.5], biases in [-0.2, 0.2]."""

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) > 1:
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1])), s.dtype)
    low, high = (0.5, 1.5) if "scale" in name else (-0.2, 0.2)
    return jnp.asarray(rng.uniform(low, high, size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny_problem(seed):
  """A float64 ResNet-12 at widths (2, 3, 4, 5) on 16x16x3 images, two 3-way tasks (1 shot, 2
  queries) and random params. Call inside `jax.enable_x64(True)`."""
  model = resnet.resnet12(WAYS, widths=TINY_WIDTHS, input_shape=TINY_SHAPE, dtype=jnp.float64)
  rng = np.random.default_rng(seed)
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0)), rng)
  tasks = mj.Task(jnp.asarray(rng.normal(size=(2, WAYS, *TINY_SHAPE))),
                  jnp.tile(jnp.arange(WAYS), (2, 1)),
                  jnp.asarray(rng.normal(size=(2, 2 * WAYS, *TINY_SHAPE))),
                  jnp.tile(jnp.arange(WAYS).repeat(2), (2, 1)))
  return model, params, tasks


def _directional_fd(f, params, direction, step=FD_STEP):
  """Central difference of the scalar `f(params)[0]` along `direction`."""
  plus = f(jax.tree.map(lambda p, v: p + step * v, params, direction))[0]
  minus = f(jax.tree.map(lambda p, v: p - step * v, params, direction))[0]
  return (float(plus) - float(minus)) / (2 * step)


def _random_direction(params, seed):
  rng = np.random.default_rng(seed)
  direction = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  norm = np.sqrt(sum(float(jnp.vdot(v, v)) for v in jax.tree.leaves(direction)))
  return jax.tree.map(lambda v: v / norm, direction)


def _tree_dot(a, b):
  return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class ResNet12Test(chex.TestCase):

  def test_output_shapes_84x84x3(self):
    model = resnet.resnet12(5)  # the default: 64-160-320-640 channels on mini-ImageNet images
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((4, 84, 84, 3), jnp.float32)
    self.assertEqual(jax.eval_shape(model.apply, params, x).shape, (4, 5))
    self.assertEqual(jax.eval_shape(model.features, params, x).shape, (4, 640))
    self.assertEqual((model.feature_dim, model.input_shape), (640, (84, 84, 3)))

  def test_output_shapes_28x28x1(self):
    model = resnet.resnet12(5, widths=resnet.NARROW_WIDTHS, input_shape=(28, 28, 1))
    params = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
    self.assertEqual(jax.eval_shape(model.apply, params, x).shape, (4, 5))
    self.assertEqual(jax.eval_shape(model.features, params, x).shape, (4, 128))
    self.assertEqual((model.feature_dim, model.input_shape), (128, (28, 28, 1)))

  def test_outputs_are_finite(self):
    model = resnet.resnet12(5, widths=(4, 4, 8, 8), input_shape=(28, 28, 1))
    params = _random_params(jax.eval_shape(model.init, jax.random.key(0)),
                            np.random.default_rng(0))
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    logits = jax.jit(model.apply)(params, x)
    self.assertEqual(logits.shape, (3, 5))
    self.assertTrue(bool(jnp.all(jnp.isfinite(logits))))

  def test_parameter_count_and_layout(self):
    model = resnet.resnet12(5)
    params = jax.eval_shape(model.init, jax.random.key(0))
    self.assertEqual(_size(params), _param_count(resnet.DEFAULT_WIDTHS, 3, 5))
    self.assertTrue(12.4e6 < _size(params) < 12.5e6)  # MetaOptNet's "12.4M"
    self.assertEqual(set(params), {"encoder", "head"})
    self.assertEqual(set(params["encoder"]), {f"block{i}" for i in range(4)})
    block = params["encoder"]["block3"]
    self.assertEqual(block["conv0"]["kernel"].shape, (3, 3, 320, 640))
    self.assertEqual(block["shortcut_conv"]["kernel"].shape, (1, 1, 320, 640))
    self.assertNotIn("bias", block["conv0"])  # BatchNorm follows every conv
    self.assertEqual(params["head"]["kernel"].shape, (640, 5))
    narrow = jax.eval_shape(resnet.resnet12(5, widths=resnet.NARROW_WIDTHS,
                                            input_shape=(28, 28, 1)).init, jax.random.key(0))
    self.assertEqual(_size(narrow), _param_count(resnet.NARROW_WIDTHS, 1, 5))

  def test_block_is_the_residual_formula(self):
    """One block against the formula written out with the library's layers."""
    block = resnet.ResidualBlock(3)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    shapes = jax.eval_shape(block.init, jax.random.key(1), x)["params"]
    p = _random_params(shapes, np.random.default_rng(1))

    @jax.jit
    def formula(p, x):
      def conv(y, name):
        return jax.lax.conv_general_dilated(y, p[name]["kernel"], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision="highest")

      def norm(y, name):
        return mj.nn.norm.batch_stat_norm(y, p[name]["scale"], p[name]["bias"])

      y = resnet.leaky_relu(norm(conv(x, "conv0"), "norm0"))
      y = resnet.leaky_relu(norm(conv(y, "conv1"), "norm1"))
      y = norm(conv(y, "conv2"), "norm2") + norm(conv(x, "shortcut_conv"), "shortcut_norm")
      return mj.nn.conv.max_pool_2x2(resnet.leaky_relu(y))

    with jax.default_matmul_precision("highest"):
      got = jax.jit(block.apply)({"params": p}, x)
    self.assertEqual(got.shape, (2, 3, 3, 3))
    chex.assert_trees_all_close(got, formula(p, x), rtol=1e-5, atol=1e-5)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"channels of ResNet-12's 4 blocks, got \(8, 8\)"):
      resnet.resnet12(5, widths=(8, 8))
    with self.assertRaisesRegex(ValueError, r"widths\[2\] must be a positive int, got 0"):
      resnet.resnet12(5, widths=(8, 8, 0, 8))
    with self.assertRaisesRegex(ValueError, r"H, W >= 16.*got \(8, 8, 1\)"):
      resnet.resnet12(5, widths=(4, 4, 4, 4), input_shape=(8, 8, 1))


class ResNet12MetaGradientTest(chex.TestCase):
  """Second-order MAML through ResNet-12 (LeakyReLU, batch-statistics BatchNorm, max-pools) in
  float64: the meta-gradient along a random direction equals central differences (the seed's
  activations keep clear of LeakyReLU's kink and of max-pool ties within the step). Compiling the
  second-order program of all four blocks takes a minute on 2 CPU cores: those tests are slow;
  one block (the same layers, the residual sum and the global pool) is checked in every run."""

  def test_one_block_second_order_meta_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      encoder = resnet.ResNet12Encoder(widths=(3,), dtype=jnp.float64)
      model = mj.model_from_encoder(encoder, WAYS, (6, 6, 2), dtype=jnp.float64)
      rng = np.random.default_rng(4)
      params = _random_params(jax.eval_shape(model.init, jax.random.key(0)), rng)
      tasks = mj.Task(jnp.asarray(rng.normal(size=(2, WAYS, 6, 6, 2))),
                      jnp.tile(jnp.arange(WAYS), (2, 1)),
                      jnp.asarray(rng.normal(size=(2, 2 * WAYS, 6, 6, 2))),
                      jnp.tile(jnp.arange(WAYS).repeat(2), (2, 1)))
      self._check_problem(model, params, tasks, jit=True)

  def _check_problem(self, model, params, tasks, *, jit):
    with jax.enable_x64(True):
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=INNER_LR)
      # One function (one compilation) gives the loss for the differences and the gradient.
      value_and_grad = jax.value_and_grad(lambda p: mj.meta_loss(p, tasks, learner))
      if jit:
        value_and_grad = xla.jit(value_and_grad)
      direction = _random_direction(params, 1)
      want = _directional_fd(value_and_grad, params, direction)
      got = _tree_dot(value_and_grad(params)[1], direction)
      self.assertNotEqual(want, 0.0)
      self.assertLess(abs(got - want), FD_RTOL * abs(want))

  @pytest.mark.slow  # compiles the second-order program of four blocks
  def test_second_order_meta_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      self._check_problem(*_tiny_problem(0), jit=True)

  @pytest.mark.slow  # op by op: the run without jit, against the compiled gradient
  def test_compiled_meta_gradient_equals_op_by_op(self):
    with jax.enable_x64(True):
      model, params, tasks = _tiny_problem(2)
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=INNER_LR)
      grad = jax.grad(lambda p: mj.meta_loss(p, tasks, learner))
      self.assertLess(xla.eager_mismatch(grad, params), F64_RTOL)

  @pytest.mark.slow
  def test_anil_zeroing_encoder_gradient_equals_the_theory(self):
    """ANIL + zeroing through ResNet-12, unchanged: the head gets no outer gradient, and the
    encoder's equals the explicit contrastive form of metajax.analysis.theory."""
    with jax.enable_x64(True):
      model, params, tasks = _tiny_problem(3)
      learner = mj.with_zeroing(mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1,
                                        inner_lr=INNER_LR, adapt_mask=mj.head_mask))
      grads = xla.jit(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)))(params)
      for leaf in jax.tree.leaves(grads["head"]):
        np.testing.assert_array_equal(leaf, 0.0)
      want = xla.jit(jax.grad(lambda p: theory.contrastive_encoder_loss(
        model.features, p, tasks, inner_lr=INNER_LR, loss="cross_entropy", zeroing=True)))(params)
      scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want["encoder"]))
      self.assertGreater(scale, 0)
      chex.assert_trees_all_close(grads["encoder"], want["encoder"], rtol=0.0,
                                  atol=F64_RTOL * scale)


class ResNet12ConfigTest(parameterized.TestCase):

  def test_selected_by_the_configs(self):
    config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:resnet12_smoke")
    build.validate_config(config)
    model = build.build_model(config)
    self.assertEqual((model.feature_dim, model.input_shape), (config.widths[-1], (28, 28, 1)))
    params = jax.eval_shape(model.init, jax.random.key(0))
    self.assertEqual(_size(params), _param_count(config.widths, 1, config.ways))
    mini = build.load_config_file(f"{CONFIGS / 'miniimagenet.py'}:resnet12_5way1shot")
    build.validate_config(mini)
    self.assertEqual((mini.model, tuple(mini.widths)), ("resnet12", resnet.DEFAULT_WIDTHS))

  @parameterized.parameters(((8, 8),), ((8, 8, 0, 8),), ("wide",))
  def test_bad_widths_are_a_config_error(self, widths):
    values = build.config_to_dict(build.load_config_file(CONFIGS / "default.py"))
    values.update(model="resnet12", widths=widths)
    with self.assertRaisesRegex(build.ConfigError, r"widths=.* must be 4 positive ints"):
      build.validate_config(build.config_from_dict(values))

  def test_stored_configs_without_widths_still_load(self):
    values = build.config_to_dict(build.load_config_file(CONFIGS / "default.py"))
    del values["widths"]
    self.assertEqual(build.config_from_dict(values).widths, resnet.DEFAULT_WIDTHS)
    values["widths"] = [4, 4, 8, 8]  # as JSON stores it
    self.assertEqual(build.config_from_dict(values).widths, (4, 4, 8, 8))


@pytest.mark.slow  # preprocesses Omniglot, then compiles a ResNet-12 meta-step
def test_resnet12_smoke_config_trains_on_omniglot(omniglot_dir, omniglot_cache_dir, omniglot_pool,
                                                  tmp_path):
  """One outer step of `omniglot.py:resnet12_smoke` on real Omniglot, then the test evaluation."""
  from metajax.experiment import train

  del omniglot_pool  # only requested so that the cache is warm
  config = build.load_config_file(f"{CONFIGS / 'omniglot.py'}:resnet12_smoke")
  config.update(data_dir=str(omniglot_dir), cache_dir=str(omniglot_cache_dir), eval_every=0,
                num_steps=1)
  result = train.train_and_evaluate(config, tmp_path, print_fn=lambda _: None)
  assert result["step"] == 1 and np.isfinite(result["outer/loss"])
  assert 0.0 <= result["test/accuracy_after"] <= 1.0
