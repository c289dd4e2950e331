"""Tests of the outer loop: meta_loss, task mapping, the jitted meta-step, evaluation."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import metajax as mj

F32_TOL = 1e-5
F64_TOL = 1e-10


def _problem(key, num_tasks=4, dtype=jnp.float32, conv=False):
  if conv:
    model = mj.conv4(3, filters=4, input_shape=(16, 16, 1))
    shape = (16, 16, 1)
  else:
    model = mj.mlp(3, hidden=(8,), input_shape=(2,))
    shape = (2,)
  kp, kx, kq = jax.random.split(key, 3)
  params = jax.tree.map(lambda p: p.astype(dtype), model.init(kp))
  tasks = mj.Task(jax.random.normal(kx, (num_tasks, 6, *shape), dtype),
                  jnp.tile(jnp.arange(3).repeat(2), (num_tasks, 1)),
                  jax.random.normal(kq, (num_tasks, 9, *shape), dtype),
                  jnp.tile(jnp.arange(3).repeat(3), (num_tasks, 1)))
  return model, params, tasks


def _learners(model):
  base = dict(num_inner_steps=2, inner_lr=0.3)
  maml = mj.MAML(model.apply, mj.cross_entropy, **base)
  return {
    "maml": maml,
    "fomaml": mj.MAML(model.apply, mj.cross_entropy, first_order=True, **base),
    "anil": mj.MAML(model.apply, mj.cross_entropy, adapt_mask=mj.head_mask, **base),
    "maml_zero": mj.with_zeroing(maml),
    "metasgd": mj.MAML(model.apply, mj.cross_entropy, learn_inner_lr="element", **base),
  }


class MetaLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("maml", "fomaml", "anil", "maml_zero", "metasgd")
  def test_vmap_equals_python_loop_over_tasks(self, name):
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(0), dtype=jnp.float64)
      learner = _learners(model)[name]
      meta_params = learner.init(params)
      grad_fn = self.variant(jax.grad(lambda p, t: mj.meta_loss(p, t, learner)))
      vmapped = grad_fn(meta_params, tasks)
      per_task = [jax.grad(lambda p, t: learner.task_loss(p, t)[0])(
        meta_params, jax.tree.map(lambda x, i=i: x[i], tasks)) for i in range(4)]
      looped = jax.tree.map(lambda *g: sum(g) / 4, *per_task)
      chex.assert_trees_all_close(vmapped, looped, rtol=F64_TOL, atol=1e-13)

  @parameterized.parameters("map", 2)
  def test_task_map_variants_agree(self, task_map):
    model, params, tasks = _problem(jax.random.key(1))
    learner = _learners(model)["maml"]
    f = jax.jit(jax.value_and_grad(
      lambda p, tm: mj.meta_loss(p, tasks, learner, task_map=tm)), static_argnums=1)
    chex.assert_trees_all_close(f(params, "vmap"), f(params, task_map), rtol=F32_TOL,
                                atol=F32_TOL)

  def test_bad_task_map(self):
    model, params, tasks = _problem(jax.random.key(1))
    for bad in ("pmap", 0, True):
      with self.assertRaisesRegex(ValueError, "task_map must be"):
        mj.meta_loss(params, tasks, _learners(model)["maml"], task_map=bad)

  def test_metasgd_with_fixed_lrs_equals_maml(self):
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(2), dtype=jnp.float64)
      learners = _learners(model)
      msgd = learners["metasgd"]
      vg = lambda learner: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: mj.meta_loss(p, tasks, learner)))
      loss_msgd, g_msgd = vg(msgd)(msgd.init(params))
      loss_maml, g_maml = vg(learners["maml"])(params)
      np.testing.assert_allclose(loss_msgd, loss_maml, rtol=F64_TOL)
      chex.assert_trees_all_close(g_msgd["params"], g_maml, rtol=F64_TOL, atol=1e-13)
      self.assertGreater(float(optax.tree.norm(g_msgd["inner_lr"])), 0.0)


class MetaValueAndGradTest(chex.TestCase):
  """`meta_value_and_grad`: the meta-gradient taken per task (or chunk) inside a loop."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("maml", "map"), ("fomaml", 2), ("anil", "map"), ("maml_zero", "map"),
                            ("metasgd", 3), ("maml", 8))
  def test_per_task_gradients_equal_the_vmapped_ones(self, name, task_map):
    # 5 tasks: chunks of 2 and 3 leave a smaller last chunk; 8 is more than there are tasks.
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(11), num_tasks=5, dtype=jnp.float64)
      learner = _learners(model)[name]
      meta_params = learner.init(params)
      fn = self.variant(lambda p, t, tm: mj.meta_value_and_grad(p, t, learner, task_map=tm),
                        static_argnums=2)
      (loss, metrics), grads = fn(meta_params, tasks, task_map)
      (ref_loss, ref_metrics), ref_grads = jax.value_and_grad(
        lambda p: mj.meta_loss(p, tasks, learner, has_aux=True), has_aux=True)(meta_params)
      np.testing.assert_allclose(loss, ref_loss, rtol=F64_TOL)
      chex.assert_trees_all_close(grads, ref_grads, rtol=F64_TOL, atol=1e-13)
      # Accuracy is float32 whatever the inputs: its sums differ in the last bit.
      chex.assert_trees_all_close(metrics, ref_metrics, rtol=F32_TOL)
      self.assertGreater(float(optax.tree.norm(grads)), 0.0)

  @pytest.mark.slow  # op by op, ~30 s
  def test_conv4_step_compiled_equals_op_by_op(self):
    """The compiled Conv-4 step (unrolled inner loop inside the loop over tasks) against the
    same step run op by op, in float64: the case plain `jax.jit` miscompiles on CPU."""
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(12), num_tasks=3, dtype=jnp.float64,
                                      conv=True)
      learner = _learners(model)["maml"]
      states = []
      for jit in (True, False):
        meta_step = mj.make_meta_step(learner, optax.sgd(0.1), task_map="map", jit=jit)
        states.append(meta_step.step(meta_step.init(params), tasks)[0].params)
      chex.assert_trees_all_close(states[0], states[1], rtol=F64_TOL, atol=1e-13)
      self.assertGreater(float(optax.tree.norm(jax.tree.map(jnp.subtract, states[0], params))),
                         0.0)

  def test_temporaries_do_not_grow_with_the_meta_batch(self):
    """XLA's temporary buffers of the compiled step: the same for 4 and 32 tasks one at a time,
    several times larger for 32 tasks vmapped."""
    def temp_bytes(num_tasks, task_map):
      model, params, tasks = _problem(jax.random.key(13), num_tasks=num_tasks)
      meta_step = mj.make_meta_step(_learners(model)["maml"], optax.sgd(0.1), task_map=task_map)
      lowered = meta_step.lower(meta_step.init(params), tasks)
      return lowered.compile().memory_analysis().temp_size_in_bytes

    mapped = [temp_bytes(n, "map") for n in (4, 32)]
    vmapped = [temp_bytes(n, "vmap") for n in (4, 32)]
    self.assertLess(mapped[1], 1.25 * mapped[0])
    self.assertGreater(vmapped[1], 4 * vmapped[0])
    self.assertLess(mapped[1], vmapped[1] / 4)

  def test_auto_is_per_backend(self):
    self.assertEqual(mj.resolve_task_map("auto", "cpu"), "map")
    for backend in ("gpu", "tpu"):
      self.assertEqual(mj.resolve_task_map("auto", backend), "vmap")
    for explicit in ("vmap", "map", 4):
      self.assertEqual(mj.resolve_task_map(explicit, "gpu"), explicit)
    self.assertEqual(mj.resolve_task_map("auto"), mj.resolve_task_map("auto",
                                                                       jax.default_backend()))
    # Tasks split over devices stay one vmapped batch; an explicit choice is kept.
    self.assertEqual(mj.resolve_task_map("auto", "cpu", sharded=True), "vmap")
    self.assertEqual(mj.resolve_task_map("map", "cpu", sharded=True), "map")
    with self.assertRaisesRegex(ValueError, "positive int, got 0"):
      mj.resolve_task_map(0, sharded=True)

  def test_bool_metrics_and_an_empty_batch(self):
    """A bool metric is averaged as `meta_loss` averages it (a fraction, not a logical or), and
    a meta-batch of no tasks is refused by name."""
    model, params, tasks = _problem(jax.random.key(14), num_tasks=5)
    base = _learners(model)["maml"]

    class WithFlag:
      def __getattr__(self, name):
        return getattr(base, name)

      def task_loss(self, p, task):
        loss, metrics = base.task_loss(p, task)
        return loss, {**metrics, "flag": task.support_x[0, 0] > 0}

    learner = WithFlag()
    expected = float(jnp.mean(tasks.support_x[:, 0, 0] > 0))
    self.assertTrue(0.0 < expected < 1.0)
    for task_map in ("map", 2, "vmap"):
      (_, metrics), _ = mj.meta_value_and_grad(params, tasks, learner, task_map=task_map)
      np.testing.assert_allclose(metrics["flag"], expected, rtol=1e-6)
    with self.assertRaisesRegex(ValueError, "at least one task, got a meta-batch of 0"):
      mj.meta_value_and_grad(params, jax.tree.map(lambda x: x[:0], tasks), base, task_map="map")

  @parameterized.parameters("pmap", 0, -2, True, 1.5)
  def test_bad_task_map(self, bad):
    model, params, tasks = _problem(jax.random.key(1))
    with self.assertRaisesRegex(ValueError, f"task_map must be .*got {bad!r}"):
      mj.meta_value_and_grad(params, tasks, _learners(model)["maml"], task_map=bad)
    with self.assertRaisesRegex(ValueError, f"task_map must be .*got {bad!r}"):
      mj.make_meta_step(_learners(model)["maml"], optax.sgd(0.1), task_map=bad)


class MetaStepTest(chex.TestCase):

  def test_traces_once_over_many_steps_and_learns(self):
    model, params, tasks = _problem(jax.random.key(3))
    meta_step = mj.make_meta_step(_learners(model)["maml"], optax.adam(1e-2))
    state = meta_step.init(params)
    losses = []
    for _ in range(8):
      state, metrics = meta_step.step(state, tasks)
      losses.append(float(metrics["outer/loss"]))
    self.assertEqual(int(state.step), 8)
    self.assertLess(losses[-1], losses[0])  # same batch every step: the meta-loss must fall

  def test_a_new_batch_shape_compiles_once_with_a_warning_naming_both_shapes(self):
    model, params, tasks = _problem(jax.random.key(3))
    meta_step = mj.make_meta_step(_learners(model)["maml"], optax.adam(1e-2))
    state, _ = meta_step.step(meta_step.init(params), tasks)
    small = jax.tree.map(lambda x: x[:2], tasks)
    with self.assertWarnsRegex(mj.meta.RecompileWarning,
                               r"^step compiles again for inputs of new shapes: batch.support_x "
                               r"\(4, 6, 2\) float32 -> \(2, 6, 2\) float32, batch.support_y "
                               r"\(4, 6\) int32 -> \(2, 6\) int32, batch.query_x \(4, 9, 2\) "
                               r"float32 -> \(2, 9, 2\) float32, batch.query_y \(4, 9\) int32 -> "
                               r"\(2, 9\) int32 \(each shape compiles once"):
      state, metrics = meta_step.step(state, small)
    self.assertTrue(np.isfinite(float(metrics["outer/loss"])))
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # shapes seen before: their program, no warning
      state, _ = meta_step.step(state, small)
      state, _ = meta_step.step(state, tasks)
    self.assertEqual(int(state.step), 4)
    # A second trace for shapes already compiled (here a weakly typed step counter) would
    # recompile on every call: refused.
    with self.assertRaisesRegex(AssertionError, "step was traced twice for the same input shapes "
                                r"and dtypes \(traced 3 times\)"):
      meta_step.step(state._replace(step=int(state.step)), tasks)

  def test_steps_warn_for_new_batch_shapes_not_for_a_new_length(self):
    model, params, tasks = _problem(jax.random.key(3))
    meta_step = mj.make_meta_step(_learners(model)["maml"], optax.adam(1e-2))
    stack = lambda t, k: jax.tree.map(lambda x: jnp.stack([x] * k), t)  # noqa: E731
    state, _ = meta_step.steps(meta_step.init(params), stack(tasks, 2))
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      state, _ = meta_step.steps(state, stack(tasks, 3))  # K steps of the same batches
    with self.assertWarnsRegex(mj.meta.RecompileWarning, r"scanned compiles again for inputs of "
                               r"new shapes: batch.support_x \(3, 4, 6, 2\) float32 -> "
                               r"\(3, 2, 6, 2\) float32"):
      state, _ = meta_step.steps(state, stack(jax.tree.map(lambda x: x[:2], tasks), 3))
    self.assertEqual(int(state.step), 8)

  @parameterized.parameters("maml", "anil", "maml_zero", "metasgd")
  def test_jit_equals_no_jit(self, name):
    model, params, tasks = _problem(jax.random.key(4))
    learner = _learners(model)[name]
    out = []
    for jit in (True, False):
      meta_step = mj.make_meta_step(learner, optax.adam(1e-2), jit=jit)
      state = meta_step.init(params)
      for _ in range(2):
        state, metrics = meta_step.step(state, tasks)
      out.append((state.params, metrics))
    chex.assert_trees_all_close(out[0], out[1], rtol=F32_TOL, atol=F32_TOL)

  def test_step_matches_manual_optax_update(self):
    model, params, tasks = _problem(jax.random.key(5))
    learner = _learners(model)["fomaml"]
    opt = optax.sgd(0.1)
    state, _ = mj.make_meta_step(learner, opt).step(mj.make_meta_step(learner, opt).init(params),
                                                    tasks)
    grads = jax.grad(mj.meta_loss)(params, tasks, learner)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    chex.assert_trees_all_close(state.params, expected, rtol=F32_TOL, atol=1e-6)

  def test_zeroing_keeps_head_and_starts_from_zero(self):
    model, params, tasks = _problem(jax.random.key(6))
    meta_step = mj.make_meta_step(_learners(model)["maml_zero"], optax.adam(1e-2))
    state, _ = meta_step.step(meta_step.init(params), tasks)
    # The head's outer gradient is exactly 0, so Adam leaves the stored head untouched.
    chex.assert_trees_all_equal(state.params["head"], params["head"])
    self.assertFalse(np.array_equal(state.params["encoder"]["dense0"]["kernel"],
                                    params["encoder"]["dense0"]["kernel"]))

  def test_init_does_not_alias_caller_params(self):
    model, params, tasks = _problem(jax.random.key(7))
    meta_step = mj.make_meta_step(_learners(model)["maml"], optax.adam(1e-2), donate=True)
    meta_step.step(meta_step.init(params), tasks)
    # The donated state was a copy: the caller's params are still alive and usable.
    self.assertTrue(np.isfinite(np.asarray(params["head"]["kernel"])).all())


class MetaStepsTest(chex.TestCase):
  """`MetaStep.steps`: K outer steps over K stacked meta-batches in one compiled call."""

  def _batches(self, tasks, k):
    # K different meta-batches: each a permutation of the tasks' examples, scaled.
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[
      tasks._replace(support_x=tasks.support_x * (1.0 + 0.1 * i),
                     query_x=jnp.roll(tasks.query_x, i, axis=1),
                     query_y=jnp.roll(tasks.query_y, i, axis=1)) for i in range(k)])

  @parameterized.parameters(("maml", False, True), ("maml", False, False), ("fomaml", False, True),
                            ("anil", False, True), ("metasgd", False, True))
  def test_steps_equal_one_step_at_a_time(self, name, conv, jit):
    self._check_steps(name, conv, jit)

  # Conv-4 with its unrolled inner loop inside the scan: the compiled path of the binaries.
  @pytest.mark.slow
  def test_conv4_steps_equal_one_step_at_a_time(self):
    self._check_steps("maml", True, True)

  @pytest.mark.slow
  def test_conv4_zeroing_steps_equal_one_step_at_a_time(self):
    self._check_steps("maml_zero", True, True)

  def _check_steps(self, name, conv, jit):
    with jax.enable_x64(True):
      model, params, tasks = _problem(jax.random.key(8), dtype=jnp.float64, conv=conv)
      learner = _learners(model)[name]
      batches = self._batches(tasks, 3)
      # Reference: `step` three times (itself checked against op by op in test_xla). SGD, not
      # Adam: the conv biases before BatchNorm get roundoff-level gradients, which Adam's
      # normalisation would blow up to 1e-10.
      reference = mj.make_meta_step(learner, optax.sgd(0.1), jit=jit)
      state = reference.init(params)
      per_step = []
      for i in range(3):
        state, m = reference.step(state, jax.tree.map(lambda x, i=i: x[i], batches))
        per_step.append(m)
      meta_step = mj.make_meta_step(learner, optax.sgd(0.1), jit=jit)
      out, metrics = meta_step.steps(meta_step.init(params), batches)
      self.assertEqual(int(out.step), 3)
      chex.assert_trees_all_close(out.params, state.params, rtol=F64_TOL, atol=F64_TOL)
      chex.assert_trees_all_close(metrics, jax.tree.map(lambda *xs: jnp.stack(xs), *per_step),
                                  rtol=F64_TOL, atol=F64_TOL)

  def test_steps_compile_once_per_length_and_check_inputs(self):
    model, params, tasks = _problem(jax.random.key(9))
    meta_step = mj.make_meta_step(_learners(model)["maml"], optax.adam(1e-2))
    state = meta_step.init(params)
    for k in (2, 1, 2):
      state, metrics = meta_step.steps(state, self._batches(tasks, k))
      self.assertEqual(metrics["outer/loss"].shape, (k,))
    self.assertEqual(int(state.step), 5)
    bad = self._batches(tasks, 2)
    with self.assertRaisesRegex(ValueError, "leading sizes"):
      meta_step.steps(state, bad._replace(query_y=bad.query_y[:1]))
    with self.assertRaisesRegex(ValueError, "at least one stacked meta-batch"):
      meta_step.steps(state, jax.tree.map(lambda x: x[:0], bad))
    with self.assertRaisesRegex(ValueError, "labels in"):
      fresh = mj.make_meta_step(_learners(model)["maml"], optax.adam(1e-2))
      fresh.steps(fresh.init(params), bad._replace(support_y=bad.support_y + 3))
    with self.assertRaises(TypeError):  # no unpacking: a pair would silently drop `steps`
      init, step = meta_step

  def test_reptile_steps(self):
    model, params, tasks = _problem(jax.random.key(10))
    batches = self._batches(tasks, 2)
    meta_step = mj.make_reptile_step(
      mj.Reptile(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1), optax.sgd(0.5))
    state = meta_step.init(params)
    for i in range(2):
      state, _ = meta_step.step(state, jax.tree.map(lambda x, i=i: x[i], batches))
    out, metrics = meta_step.steps(meta_step.init(params), batches)
    chex.assert_trees_all_close(out.params, state.params, rtol=F32_TOL, atol=F32_TOL)
    self.assertEqual(metrics["outer/loss"].shape, (2,))


class BadInputTest(parameterized.TestCase):

  def _step(self):
    model, params, tasks = _problem(jax.random.key(8))
    meta_step = mj.make_meta_step(_learners(model)["maml"], optax.sgd(0.1))
    return meta_step, meta_step.init(params), tasks

  def test_mismatched_support_query_shapes(self):
    meta_step, state, tasks = self._step()
    bad = tasks._replace(query_x=jnp.zeros((4, 9, 3)))
    with self.assertRaisesRegex(ValueError, "same example shape"):
      meta_step.step(state, bad)

  def test_inputs_and_labels_disagree(self):
    meta_step, state, tasks = self._step()
    with self.assertRaisesRegex(ValueError, "disagree on the number of examples"):
      meta_step.step(state, tasks._replace(support_y=tasks.support_y[:, :5]))
    with self.assertRaisesRegex(ValueError, "same leading task axis"):
      meta_step.step(state, tasks._replace(query_y=tasks.query_y[:3]))

  def test_labels_out_of_range(self):
    meta_step, state, tasks = self._step()
    with self.assertRaisesRegex(ValueError, r"support_y has labels in \[0, 3\], outside \[0, 3\)"):
      meta_step.step(state, tasks._replace(support_y=tasks.support_y.at[0, 0].set(3)))
    with self.assertRaisesRegex(ValueError, r"query_y has labels in \[-1, 2\]"):
      meta_step.step(state, tasks._replace(query_y=tasks.query_y.at[1, 2].set(-1)))

  def test_not_a_task(self):
    meta_step, state, tasks = self._step()
    with self.assertRaisesRegex(TypeError, "expected a metajax.Task"):
      meta_step.step(state, tuple(tasks))

  def test_bad_learn_inner_lr(self):
    with self.assertRaisesRegex(ValueError, "learn_inner_lr must be"):
      mj.MAML(lambda p, x: x, mj.mse, inner_lr=0.1, learn_inner_lr="layer")


class EvaluateTest(chex.TestCase):

  def test_confidence_interval_closed_form(self):
    values = np.array([0.2, 0.4, 0.6, 0.8])
    mean, half = mj.mean_confidence_interval(values)
    self.assertAlmostEqual(mean, 0.5)
    self.assertAlmostEqual(half, 1.959963984540054 * np.std(values, ddof=1) / 2.0)
    with self.assertRaisesRegex(ValueError, "at least one value"):
      mj.mean_confidence_interval([])

  def test_evaluate_before_after(self):
    model, params, tasks = _problem(jax.random.key(9), num_tasks=5)
    learner = _learners(model)["maml"]
    per_task = mj.evaluate_tasks(learner, params, tasks)
    for name in ("loss_before", "loss_after", "accuracy_before", "accuracy_after"):
      self.assertEqual(per_task[name].shape, (5,))
    # Before adaptation is the unadapted model on the query set.
    before = jax.vmap(lambda t: mj.accuracy(model.apply(params, t.query_x), t.query_y))(tasks)
    np.testing.assert_allclose(per_task["accuracy_before"], before)
    summary = mj.evaluate(learner, params, tasks)
    self.assertAlmostEqual(summary["accuracy_after"]["mean"],
                           float(np.mean(per_task["accuracy_after"])), places=6)
    self.assertEqual(summary["accuracy_after"]["num_tasks"], 5)

  def test_zeroing_evaluates_from_a_zero_head(self):
    model, params, tasks = _problem(jax.random.key(10), num_tasks=3)
    learner = _learners(model)["maml_zero"]
    per_task = mj.evaluate_tasks(learner, params, tasks)
    # A zero head outputs equal logits: the loss before adaptation is exactly log(3).
    np.testing.assert_allclose(per_task["loss_before"], np.log(3.0), rtol=1e-6)


if __name__ == "__main__":
  pytest.main([__file__])


class ZeroHeadRegressionTest(parameterized.TestCase):
  """XLA:CPU (jaxlib 0.10.2) returns garbage for a large vmapped forward pass through a
  constant-zero head (`zeros_like`); `zero_head` must not produce such a constant."""

  def test_large_batch_forward_through_zero_head(self):
    model = mj.kao_conv(5)
    params = model.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (100, 75, 28, 28, 1))
    y = jnp.tile(jnp.arange(5).repeat(15), (100, 1))
    loss = jax.jit(jax.vmap(
      lambda x, y: mj.cross_entropy(model.apply(mj.zero_head(params), x), y)))(x, y)
    # Zero logits: the cross-entropy of every task is exactly log(5).
    np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)
