"""Tests for metajax.platform.xla: the jit that keeps XLA:CPU's meta-gradients of Conv-4 correct."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

import metajax as mj
from metajax.platform import xla

# Relative to the gradient's largest entry, float64: the wrong XLA:CPU results were 4e-2 off.
F64_RTOL = 1e-10
# A compiled float64 gradient this far from op by op is a wrong program, not rounding.
WRONG = 1e-6
MINIMAL = Path(__file__).resolve().parents[2] / "benchmarks" / "xla_cpu" / "minimal.py"


def _f64_problem(model, num_tasks, ways, queries, shape):
  """float64 params of `model` and `num_tasks` random 1-shot tasks of `queries` queries per class
  (call under `jax.enable_x64`)."""
  params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0)))
  k1, k2 = jax.random.split(jax.random.key(1))
  tasks = mj.Task(jax.random.normal(k1, (num_tasks, ways, *shape), jnp.float64),
                  jnp.tile(jnp.arange(ways), (num_tasks, 1)),
                  jax.random.normal(k2, (num_tasks, ways * queries, *shape), jnp.float64),
                  jnp.tile(jnp.arange(ways).repeat(queries), (num_tasks, 1)))
  return params, tasks


def _conv4_meta_grad(unroll: bool, activation=jax.nn.relu, num_tasks=8, steps=2):
  """The second-order meta-gradient of `benchmarks/xla_cpu/miscompile.py`'s Conv-4 cases."""
  model = mj.conv4(3, filters=4, input_shape=(16, 16, 1), activation=activation)
  params, tasks = _f64_problem(model, num_tasks, 3, 2, (16, 16, 1))
  loss_fn = mj.make_loss_fn(model.apply, mj.cross_entropy)

  def task_loss(p, task):
    def step(q, _):
      g = jax.grad(loss_fn)(q, task.support_x, task.support_y)
      return jax.tree.map(lambda w, gw: w - 0.1 * gw, q, g), None

    q, _ = jax.lax.scan(step, p, None, length=steps, unroll=unroll)
    return loss_fn(q, task.query_x, task.query_y)

  meta_loss = lambda p: jnp.mean(jax.vmap(task_loss, (None, 0))(p, tasks))  # noqa: E731
  return meta_loss, params


def _max_rel_diff(a, b):
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(b))
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b))) / scale


class CompilerOptionsTest(absltest.TestCase):

  def test_per_backend(self):
    self.assertEqual(xla.compiler_options("cpu", tuning="off"),
                     {"xla_disable_hlo_passes": "algsimp"})
    self.assertEqual(xla.compiler_options("gpu"), {})
    self.assertEqual(xla.compiler_options("tpu"), {})
    opts = xla.compiler_options("cpu")
    opts["x"] = 1  # a copy: the module's options stay as they are
    self.assertNotIn("x", xla.CPU_COMPILER_OPTIONS)

  def test_jit_passes_arguments_and_caller_options_win(self):
    f = xla.jit(lambda n, x: x * n, static_argnums=(0,))
    np.testing.assert_array_equal(f(3, jnp.arange(4.0)), jnp.arange(4.0) * 3)
    g = xla.jit(lambda x: jnp.sin(x) + 1, compiler_options={"xla_disable_hlo_passes": ""})
    np.testing.assert_allclose(g(jnp.arange(3.0)), jnp.sin(jnp.arange(3.0)) + 1, rtol=1e-6)


class TuningTest(parameterized.TestCase):
  """The speed options per CPU family: the choice, its override, and exactness under each row."""

  def test_choices_and_their_errors(self):
    for value, expected in (("auto", "auto"), ("OFF", "off"), (" AVX512-Intel ", "avx512-intel")):
      self.assertEqual(xla.parse_tuning(value), expected)
    with self.assertRaisesRegex(ValueError, r"tuning='avx9' is not an XLA:CPU tuning choice; "
                                            r"allowed: 'auto', 'off', 'avx512-intel', "
                                            r"'avx512-amd', 'avx2', 'baseline'"):
      xla.parse_tuning("avx9")
    with mock.patch.dict("os.environ", {xla.TUNING_ENV: "fast"}), \
         self.assertRaisesRegex(ValueError, "METAJAX_XLA_CPU_TUNING='fast' is not"):
      xla.parse_tuning(None)

  def test_environment_then_auto(self):
    with mock.patch.dict("os.environ", {xla.TUNING_ENV: "off"}):
      self.assertEqual(xla.tuning_options(), {})
      self.assertEqual(xla.tuning_options("avx512-intel"),  # the argument wins
                       {"xla_cpu_prefer_vector_width": 512})
    with mock.patch.dict("os.environ", {xla.TUNING_ENV: ""}), \
         mock.patch.object(xla, "_host_family", lambda: "avx512-intel"):
      self.assertEqual(xla.tuning_options(), xla.CPU_TUNING["avx512-intel"])
    with mock.patch.object(xla, "_host_family", lambda: "baseline"):
      self.assertEqual(xla.tuning_options("auto"), {})

  def test_correctness_option_always_applies(self):
    for family in (*xla.CPU_TUNING, "auto", "off"):
      options = xla.compiler_options("cpu", tuning=family)
      self.assertEqual(options["xla_disable_hlo_passes"], "algsimp", family)
      self.assertEqual(xla.compiler_options("gpu", tuning=family), {})
    self.assertLessEqual(xla.CPU_TUNING["avx512-intel"].items(),
                         xla.compiler_options("cpu", tuning="avx512-intel").items())

  def test_options_reach_the_compiled_program(self):
    f = lambda x: jnp.sin(x) * 2  # noqa: E731
    x = jnp.ones(8)
    for family in xla.CPU_TUNING:
      lowering = xla.jit(f, tuning=family).lower(x)._lowering  # noqa: SLF001
      options = getattr(lowering, "_compiler_options_kvs", None)
      if options is None:
        self.skipTest("this jax does not expose a lowering's compiler options")
      self.assertEqual(dict(options), xla.compiler_options(tuning=family))
      np.testing.assert_allclose(xla.jit(f, tuning=family)(x), f(x), rtol=1e-6)

  @parameterized.parameters(*[(f,) for f, options in xla.CPU_TUNING.items() if options])
  @pytest.mark.slow  # 30 s, most of it op by op; the host's own row runs every test of this file
  def test_each_tuned_row_keeps_second_order_exact(self, family):
    # A case plain jax.jit got wrong (Conv4LibraryPathTest's unrolled two steps), under the row.
    with jax.enable_x64(True):
      encoder = mj.nn.models.Conv4Encoder(filters=4, num_blocks=2, activation=jax.nn.softplus)
      model = mj.model_from_encoder(encoder, 3, (8, 8, 1))
      params, tasks = _f64_problem(model, 2, 3, 1, (8, 8, 1))
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1,
                        unroll=True)
      grad = jax.grad(lambda p: mj.meta_loss(p, tasks, learner))
      mismatch = xla.eager_mismatch(grad, params, jit=lambda fun: xla.jit(fun, tuning=family))
    self.assertLess(mismatch, F64_RTOL, family)


class VersionTableTest(absltest.TestCase):

  def test_verified_versions(self):
    self.assertTrue(xla.verified("0.10.2"))
    self.assertFalse(xla.verified("99.0.0"))
    self.assertEqual(xla.verified(), jaxlib.__version__ in xla.VERIFIED_JAXLIB)

  def test_unverified_jaxlib_still_gets_the_option_and_one_warning(self):
    with mock.patch.object(xla.jaxlib, "__version__", "99.0.0"), \
         mock.patch.object(xla, "_warned", False):
      with self.assertWarnsRegex(xla.UnverifiedJaxlibWarning,
                                 "jaxlib 99.0.0 is not verified: the option is still applied"):
        self.assertEqual(xla.compiler_options("cpu"), xla.CPU_COMPILER_OPTIONS)
      with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        self.assertEqual(xla.compiler_options("cpu"), xla.CPU_COMPILER_OPTIONS)
        self.assertEqual(xla.compiler_options("gpu"), {})

  def test_verified_jaxlib_does_not_warn(self):
    with mock.patch.object(xla.jaxlib, "__version__", "0.10.2"), \
         mock.patch.object(xla, "_warned", False), warnings.catch_warnings():
      warnings.simplefilter("error")
      xla.compiler_options("cpu")


@pytest.mark.slow  # about 20 s: op-by-op gradients and six compilations
def test_minimal_reproducer_under_the_installed_jaxlib(tmp_path):
  """Runs `benchmarks/xla_cpu/minimal.py --size=8` (standalone JAX) in its own process: the op-by-op
  gradient agrees with central differences, the option makes both formulations right, and plain
  `jax.jit` is still wrong, which is why metajax needs the option. When a jaxlib compiles it right,
  this fails: then check every reproducer on that version and retire the workaround there."""
  out = tmp_path / "minimal.json"
  subprocess.run([sys.executable, str(MINIMAL), "--size=8", f"--json={out}"], check=True,
                 capture_output=True, text=True, timeout=600)
  result = json.loads(out.read_text())
  assert result["jaxlib"] == jaxlib.__version__
  np.testing.assert_allclose(result["eager"], result["central_differences"], rtol=1e-6)
  for formulation, cells in result["cells"].items():
    assert cells["no algsimp"] < F64_RTOL, (formulation, cells)
  plain = result["cells"]["loop-free"]["emitters on"]
  assert plain > WRONG, (
    f"jaxlib {jaxlib.__version__} compiles benchmarks/xla_cpu/minimal.py --size=8 right under "
    f"plain jax.jit ({plain:.1e}): XLA:CPU may have fixed the miscompile. Run every reproducer "
    f"of benchmarks/xla_cpu/ on this jaxlib; if all are right without the option, compile "
    f"without CPU_COMPILER_OPTIONS there (metajax/platform/xla.py)")


class ConvMetaGradientTest(chex.TestCase):
  """Float64 Conv-4 meta-gradients that XLA:CPU with its fusion emitters got wrong under jit
  (jax/jaxlib 0.10.2): the unrolled one with the plain-formula BatchNorm (still wrong, see
  `xla_cpu/miscompile.py --norm=plain`); the one-step one with the old max-pool derivative. Each
  must equal the op-by-op gradient and central finite differences."""

  def _check(self, unroll, jit=xla.jit, **kw):
    with jax.enable_x64(True):
      meta_loss, params = _conv4_meta_grad(unroll, **kw)
      got = jit(jax.grad(meta_loss))(params)
      want = jax.grad(_conv4_meta_grad(False, **kw)[0])(params)  # rolled, not jitted
      self.assertLess(_max_rel_diff(got, want), F64_RTOL)
      direction = jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), a.shape, a.dtype),
                               params)
      eps = 1e-6
      shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa
      fd = (meta_loss(shift(1.0)) - meta_loss(shift(-1.0))) / (2 * eps)
      dd = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(got), jax.tree.leaves(direction)))
      np.testing.assert_allclose(float(dd), float(fd), rtol=1e-6, atol=1e-9)

  @pytest.mark.slow  # 45 s; the library's own unrolled path is checked fast below
  def test_unrolled_inner_loop(self):
    self._check(True)

  @pytest.mark.slow  # 85 s; the library's rolled and unrolled paths are checked fast below
  def test_one_smooth_inner_step(self):
    self._check(False, activation=jax.nn.softplus, num_tasks=2, steps=1)

  @pytest.mark.slow  # 45 s: a plain-jit guard; the library's path is checked above
  def test_one_smooth_inner_step_plain_jit(self):
    """metajax's max-pool derivative (one argmax) keeps this right under plain `jax.jit` too;
    with `jnp.max`'s rule it was 2e-1 off (`xla_cpu/miscompile.py --case=max_pool`)."""
    self._check(False, jit=jax.jit, activation=jax.nn.softplus, num_tasks=2, steps=1)


def _minimal_meta_loss(num_tasks: int, size: int, conv_fn):
  """`benchmarks/xla_cpu/minimal.py`'s network (conv -> BatchNorm -> 2x2 max-pool -> linear)
  built from metajax's pieces, its inner step through `metajax.adapt`."""
  c = 2
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"kernel": jax.random.normal(keys[0], (3, 3, 1, c), jnp.float64) / 3,
            "scale": jnp.ones(c, jnp.float64), "bias": jnp.zeros(c, jnp.float64),
            "head": jax.random.normal(keys[1], ((size // 2) ** 2 * c, 3), jnp.float64) / size}
  labels = jnp.tile(jnp.arange(3), (num_tasks, 1))
  tasks = mj.Task(jax.random.normal(keys[2], (num_tasks, 3, size, size, 1), jnp.float64), labels,
                  jax.random.normal(keys[3], (num_tasks, 3, size, size, 1), jnp.float64), labels)

  def apply(p, x):
    x = conv_fn(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = mj.nn.conv.max_pool_2x2(mj.nn.norm.batch_stat_norm(x, p["scale"], p["bias"]))
    return x.reshape(x.shape[0], -1) @ p["head"]

  loss_fn = mj.make_loss_fn(apply, mj.cross_entropy)

  def task_loss(p, task):
    adapted = mj.adapt(p, task.support_x, task.support_y, loss_fn=loss_fn, inner_lr=0.1)
    return loss_fn(adapted, task.query_x, task.query_y)

  return lambda p: jnp.mean(jax.vmap(task_loss, (None, 0))(p, tasks)), params


class MinimalMetaGradientTest(parameterized.TestCase):
  """The configurations of `benchmarks/xla_cpu/minimal.py`, where XLA:CPU's one-step
  meta-gradient is 1e-2 to 1e-1 off under plain `jax.jit`: metajax's path (`adapt`,
  `metajax.platform.xla.jit`) must equal the op-by-op gradient."""

  @parameterized.product(shape=[(2, 4), (2, 8), (8, 4)], conv=["lax", "im2col"])
  def test_library_path_matches_eager(self, shape, conv):
    conv_fn = (jax.lax.conv_general_dilated if conv == "lax"
               else mj.nn.conv.conv_general_dilated_im2col)
    with jax.enable_x64(True):
      meta_loss, params = _minimal_meta_loss(*shape, conv_fn)
      self.assertLess(xla.eager_mismatch(jax.grad(meta_loss), params), F64_RTOL)


class Conv4LibraryPathTest(parameterized.TestCase):
  """The library's Conv-4 path (`MAML`, `metajax.platform.xla.jit`), rolled, unrolled (what
  `make_meta_step` compiles for up to 5 steps) and rematerialised, with the default and with
  XLA's convolution, against op by op, on two of its blocks (8x8 inputs, 4 filters). Under plain
  `jax.jit` the unrolled cases and XLA's convolution were 7e-2 to 3e-1 off on XLA:CPU (jaxlib
  0.10.2)."""

  @parameterized.parameters(
    (1, False, 1, "default"), (2, False, True, "default"), (2, True, 1, "default"),
    (2, jax.checkpoint_policies.dots_saveable, 1, "default"), (2, False, True, "lax"))
  def test_matches_eager(self, steps, remat, unroll, conv):
    with jax.enable_x64(True):
      encoder = mj.nn.models.Conv4Encoder(
        filters=4, num_blocks=2, activation=jax.nn.softplus,
        conv_fn=jax.lax.conv_general_dilated if conv == "lax" else None)
      model = mj.model_from_encoder(encoder, 3, (8, 8, 1))
      params, tasks = _f64_problem(model, 2, 3, 1, (8, 8, 1))
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=steps, inner_lr=0.1,
                        remat=remat, unroll=unroll)
      grad = jax.grad(lambda p: mj.meta_loss(p, tasks, learner))
      self.assertLess(xla.eager_mismatch(grad, params), F64_RTOL)

  def test_default_convolution(self):
    x = jnp.ones((2, 16, 16, 1))
    encoder = mj.nn.models.Conv4Encoder(filters=2, num_blocks=1)  # conv_fn=None: the backend's
    params = encoder.init(jax.random.key(0), x)
    primitives = {e.primitive.name for e in jax.make_jaxpr(encoder.apply)(params, x).eqns}
    self.assertEqual("conv_general_dilated" in primitives, jax.default_backend() != "cpu")

  @pytest.mark.slow  # 50 s: 64 channels in float64, compiled and op by op
  def test_float64_full_width_second_order(self):
    """At 48 channels and more XLA:CPU's float64 second-order products through BatchNorm ->
    max-pool were NaN or 1e-1 off under plain `jax.jit` (`xla_cpu/f64_width.py`)."""
    with jax.enable_x64(True):
      encoder = mj.nn.models.Conv4Encoder(filters=64, num_blocks=1)
      model = mj.model_from_encoder(encoder, 3, (8, 8, 1))
      params, tasks = _f64_problem(model, 2, 3, 2, (8, 8, 1))
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=1, inner_lr=0.4)
      grad = jax.grad(lambda p: mj.meta_loss(p, tasks, learner))
      self.assertLess(xla.eager_mismatch(grad, params), F64_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("activation", [jax.nn.relu, jax.nn.softplus])
@pytest.mark.parametrize("zeroing", [False, True])
def test_kao_net_second_order_matches_eager(activation, zeroing):
  """The path of the reproduction runs in docs/RESULTS.md (Kao et al.'s net, 2 inner steps, second
  order, random head or zeroing trick), at 4 filters and 2 tasks, against op by op."""
  with jax.enable_x64(True):
    model = mj.kao_conv(5, filters=4, activation=activation)
    params, tasks = _f64_problem(model, 2, 5, 2, (28, 28, 1))
    learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.4)
    learner = mj.with_zeroing(learner) if zeroing else learner
    grad = jax.grad(lambda p: mj.meta_loss(p, tasks, learner))
    assert xla.eager_mismatch(grad, params) < F64_RTOL


@pytest.mark.slow  # 50 s, most of it the float64 op-by-op reference
def test_full_width_second_order_matches_float64_op_by_op():
  """The training path at 64 filters (2 inner steps, unrolled by default, 16x16 images): the
  float64 program exactly, the float32 one to its rounding (~1e-6; the miscompiles were 1e-2+)."""
  model = mj.conv4(5, filters=64, input_shape=(16, 16, 1))
  with jax.enable_x64(True):
    params, tasks = _f64_problem(model, 2, 5, 2, (16, 16, 1))
    learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.4)
    grad = jax.grad(lambda p, t: mj.meta_loss(p, t, learner))
    with jax.disable_jit():
      want = grad(params, tasks)

  def to32(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float32 if a.dtype.kind == "f" else a.dtype),
                        tree)

  with jax.enable_x64(True):
    assert _max_rel_diff(xla.jit(grad)(params, tasks), want) < F64_RTOL
  got = xla.jit(grad)(to32(params), to32(tasks))
  assert _max_rel_diff(jax.tree.map(lambda a: np.asarray(a, np.float64), got), want) < 1e-4


class EagerMismatchTest(absltest.TestCase):

  def test_right_compilation_is_at_rounding_level(self):
    with jax.enable_x64(True):
      f = lambda x: {"a": jnp.sin(x) * x, "b": jnp.cumsum(x) ** 2}  # noqa: E731
      self.assertLess(xla.eager_mismatch(f, jnp.linspace(-3.0, 3.0, 50)), 1e-14)

  def test_reports_a_wrong_compilation_relative_to_the_largest_entry(self):
    with jax.enable_x64(True):
      x = jnp.array([1.0, -4.0, 2.0])
      off = lambda fun: lambda *a: fun(*a).at[0].add(0.02)  # noqa: E731  a "compiler" 0.02 off
      self.assertAlmostEqual(xla.eager_mismatch(lambda v: v * 2.0, x, jit=off), 0.02 / 8.0,
                             places=12)

  def test_zero_output_and_bad_structure(self):
    self.assertEqual(xla.eager_mismatch(jnp.zeros_like, jnp.ones(3)), 0.0)
    two_leaves = lambda fun: lambda *a: (fun(*a), fun(*a))  # noqa: E731
    with self.assertRaisesRegex(ValueError, "differ in structure: 2 vs 1 leaves"):
      xla.eager_mismatch(jnp.sin, jnp.ones(3), jit=two_leaves)


class LibraryStepsUseItTest(absltest.TestCase):

  def test_meta_step_is_compiled_with_the_options(self):
    model = mj.mlp(2, hidden=(4,), input_shape=(3,))
    learner = mj.MAML(model.apply, mj.mse, num_inner_steps=1, inner_lr=0.1)
    step = mj.make_meta_step(learner, optax.sgd(0.1))
    tasks = mj.Task(jnp.ones((2, 4, 3)), jnp.ones((2, 4, 2)), jnp.ones((2, 5, 3)),
                    jnp.ones((2, 5, 2)))
    state = step.init(model.init(jax.random.key(0)))
    lowering = step.lower(state, tasks)._lowering  # noqa: SLF001
    options = getattr(lowering, "_compiler_options_kvs", None)
    if options is None:
      self.skipTest("this jax does not expose a lowering's compiler options")
    self.assertEqual(dict(options), xla.compiler_options())

  def test_meta_step_unrolls_short_inner_loops(self):
    model = mj.mlp(2, hidden=(4,), input_shape=(3,))
    tasks = mj.Task(jnp.ones((2, 4, 3)), jnp.ones((2, 4, 2)), jnp.ones((2, 5, 3)),
                    jnp.ones((2, 5, 2)))
    for steps, unroll, loops in ((2, None, False), (6, None, True), (2, 1, True)):
      learner = mj.MAML(model.apply, mj.mse, num_inner_steps=steps, inner_lr=0.1, unroll=unroll)
      # vmapped tasks: the only loop left to find is the inner loop's.
      step = mj.make_meta_step(learner, optax.sgd(0.1), task_map="vmap")
      hlo = step.lower(step.init(model.init(jax.random.key(0))), tasks).as_text()
      self.assertEqual("while" in hlo, loops, (steps, unroll))


if __name__ == "__main__":
  absltest.main()
