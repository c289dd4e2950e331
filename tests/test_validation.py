"""Bad inputs at the public entry points: each is refused before tracing, with a clear message."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    with self.assertRaisesRegex(ValueError, rf"temperature must be a number > 0, got {t!r}"):
      mj.clip_loss(z[:2], z[2:], temperature=t)


class ClassLossTest(parameterized.TestCase):
  """The losses of integer labels, called directly (outside any learner)."""

  @parameterized.parameters("cross_entropy", "mse_onehot")
  def test_float_labels(self, name):
    with self.assertRaisesRegex(TypeError, rf"^{name} takes integer class labels in \[0, C\), "
                                r"got labels of dtype float32 \(cast them with "
                                r"\.astype\(jnp\.int32\)\)$"):
      getattr(mj, name)(jnp.zeros((4, 3)), jnp.zeros(4, jnp.float32))

  @parameterized.parameters("cross_entropy", "mse_onehot")
  def test_labels_not_one_per_row(self, name):
    with self.assertRaisesRegex(ValueError, rf"^{name} takes outputs \[\.\.\., C\] and labels "
                                r"\[\.\.\.\] of the same leading shape, got outputs \(4, 3\) "
                                r"and labels \(4, 1\)$"):
      getattr(mj, name)(jnp.zeros((4, 3)), jnp.zeros((4, 1), jnp.int32))

  @parameterized.parameters("cross_entropy", "mse_onehot")
  def test_checked_under_jit_too(self, name):
    loss = jax.jit(getattr(mj, name))
    with self.assertRaisesRegex(TypeError, "takes integer class labels"):
      loss(jnp.zeros((4, 3)), jnp.zeros(4, jnp.float32))
    self.assertTrue(np.isfinite(float(loss(jnp.zeros((4, 3)), jnp.arange(4) % 3))))


# ------------------------------------------------------------------ tasks at every entry point

WAYS = 3


def _problem():
  """A linear 3-way classifier, its MAML learner, two tasks of 6 support and 9 query examples,
  and the list of calls of its `apply` (empty while nothing has been traced)."""
  calls = []

  def apply(p, x):
    calls.append(x.shape)
    return x @ p["w"] + p["b"]

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, WAYS)), jnp.float32),
            "b": jnp.zeros(WAYS, jnp.float32)}
  tasks = mj.Task(jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32),
                  jnp.tile(jnp.arange(WAYS).repeat(2), (2, 1)),
                  jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32),
                  jnp.tile(jnp.arange(WAYS).repeat(3), (2, 1)))
  return mj.MAML(apply, mj.cross_entropy, inner_lr=0.1), params, tasks, calls


def _meta_step(learner, params, tasks):
  meta_step = mj.make_meta_step(learner, optax.sgd(0.1))
  return meta_step.step(meta_step.init(params), tasks)


# The public functions that take a batch of tasks.
BATCH_ENTRY_POINTS = {
  "meta_loss": lambda learner, params, tasks: mj.meta_loss(params, tasks, learner),
  "make_meta_step": _meta_step,
  "evaluate": lambda learner, params, tasks: mj.evaluate(learner, params, tasks),
  "evaluate_without_jit": lambda learner, params, tasks: mj.evaluate(learner, params, tasks,
                                                                     jit=False),
  "evaluate_tasks": lambda learner, params, tasks: mj.evaluate_tasks(learner, params, tasks),
}

# (how the tasks are spoilt, the error, its message): shapes and dtypes, refused before the
# model is ever called.
BAD_SHAPES_AND_DTYPES = {
  "examples": (lambda t: t._replace(support_y=t.support_y[:, :5]), ValueError,
               r"inputs and targets disagree on the number of examples: support_x \(2, 6, 4\) "
               r"vs support_y \(2, 5\)"),
  "example_shape": (lambda t: t._replace(query_x=jnp.zeros((2, 9, 5))), ValueError,
                    r"support and query inputs must have the same example shape, got support_x "
                    r"\(2, 6, 4\) and query_x \(2, 9, 5\)"),
  "task_axis": (lambda t: t._replace(query_y=t.query_y[:1]), ValueError,
                r"every field of a batch of tasks needs the same leading task axis, got "
                r"\{'support_x': 2, 'support_y': 2, 'query_x': 2, 'query_y': 1\}"),
  "float_labels": (lambda t: t._replace(support_y=t.support_y.astype(jnp.float32),
                                        query_y=t.query_y.astype(jnp.float32)), TypeError,
                   r"the loss cross_entropy takes integer class labels in \[0, ways\), got "
                   r"support_y float32, query_y float32 \(cast them with \.astype\(jnp\.int32\)\)"),
  "mixed_targets": (lambda t: t._replace(query_y=t.query_y.astype(jnp.float32)), TypeError,
                    r"targets must all be integer class labels \(classification\) or all float "
                    r"targets \(regression\), got support_y int32, query_y float32"),
}

# Label values, checked while they are concrete.
BAD_LABELS = {
  "label_too_large": (lambda t: t._replace(support_y=t.support_y.at[0, 0].set(WAYS)),
                      r"support_y has labels in \[0, 3\], outside \[0, 3\) for a model with 3 "
                      r"outputs"),
  "negative_label": (lambda t: t._replace(query_y=t.query_y.at[1, 2].set(-1)),
                     r"query_y has labels in \[-1, 2\], outside \[0, 3\)"),
}


class BadTasksTest(parameterized.TestCase):

  @parameterized.product(entry=sorted(BATCH_ENTRY_POINTS), case=sorted(BAD_SHAPES_AND_DTYPES))
  def test_bad_shapes_and_dtypes_are_refused_before_tracing(self, entry, case):
    learner, params, tasks, calls = _problem()
    spoil, error, message = BAD_SHAPES_AND_DTYPES[case]
    with self.assertRaisesRegex(error, message):
      BATCH_ENTRY_POINTS[entry](learner, params, spoil(tasks))
    self.assertEqual(calls, [])  # the model was never called nor traced

  @parameterized.product(entry=sorted(BATCH_ENTRY_POINTS), case=sorted(BAD_LABELS))
  def test_labels_out_of_range_are_refused(self, entry, case):
    learner, params, tasks, _ = _problem()
    spoil, message = BAD_LABELS[case]
    with self.assertRaisesRegex(ValueError, message):
      BATCH_ENTRY_POINTS[entry](learner, params, spoil(tasks))

  @parameterized.parameters(sorted(BATCH_ENTRY_POINTS))
  def test_good_tasks_pass(self, entry):
    learner, params, tasks, _ = _problem()
    BATCH_ENTRY_POINTS[entry](learner, params, tasks)

  def test_regression_targets_pass(self):
    _, params, tasks, _ = _problem()
    learner = mj.MAML(lambda p, x: x @ p["w"][:, :1], mj.mse, inner_lr=0.1)
    targets = tasks._replace(support_y=jnp.zeros((2, 6, 1)), query_y=jnp.ones((2, 9, 1)))
    self.assertGreater(float(mj.meta_loss(params, targets, learner)), 0.0)

  def test_traced_labels_are_not_value_checked(self):
    """Under a caller's jit the labels have no values: shapes and dtypes are still checked, and
    the values are left alone (no host sync inside a compiled program)."""
    learner, params, tasks, _ = _problem()
    loss = jax.jit(lambda p, t: mj.meta_loss(p, t, learner))
    loss(params, BAD_LABELS["label_too_large"][0](tasks))
    with self.assertRaisesRegex(TypeError, "takes integer class labels"):
      loss(params, BAD_SHAPES_AND_DTYPES["float_labels"][0](tasks))

  def test_not_a_task(self):
    learner, params, tasks, _ = _problem()
    for entry in BATCH_ENTRY_POINTS.values():
      with self.assertRaisesRegex(TypeError, "expected a metajax.Task, got tuple"):
        entry(learner, params, tuple(tasks))


class BadSupportTest(parameterized.TestCase):
  """One task's support set, through `MAML.adapt` and `metajax.adapt`."""

  def test_examples_and_targets_disagree(self):
    learner, params, tasks, calls = _problem()
    x, y = tasks.support_x[0], tasks.support_y[0, :5]
    message = (r"inputs and targets disagree on the number of examples \(the size of their "
               r"leading axis\): x \(6, 4\), y \(5,\)")
    with self.assertRaisesRegex(ValueError, message):
      learner.adapt(params, x, y)
    with self.assertRaisesRegex(ValueError, message):
      mj.adapt(params, x, y, loss_fn=mj.make_loss_fn(learner.apply_fn, mj.cross_entropy),
               inner_lr=0.1)
    self.assertEqual(calls, [])

  def test_float_labels(self):
    learner, params, tasks, calls = _problem()
    with self.assertRaisesRegex(TypeError, r"the loss cross_entropy takes integer class labels "
                                r"in \[0, ways\), got y float32"):
      learner.adapt(params, tasks.support_x[0], tasks.support_y[0].astype(jnp.float32))
    self.assertEqual(calls, [])

  @parameterized.parameters(-1, WAYS)
  def test_labels_out_of_range(self, label):
    learner, params, tasks, _ = _problem()
    y = tasks.support_y[0].at[3].set(label)
    lo, hi = min(label, 0), max(label, WAYS - 1)
    with self.assertRaisesRegex(ValueError, rf"y has labels in \[{lo}, {hi}\], outside \[0, 3\) "
                                "for a model with 3 outputs"):
      learner.adapt(params, tasks.support_x[0], y)

  def test_good_support_set(self):
    learner, params, tasks, _ = _problem()
    adapted = learner.adapt(params, tasks.support_x[0], tasks.support_y[0])
    self.assertEqual(jax.tree.structure(adapted), jax.tree.structure(params))


class LabelsOfEveryBatchTest(parameterized.TestCase):
  """`inputs/bad_labels`: every meta-batch's labels counted on the device (the host checks and
  raises on the first batch only)."""

  @parameterized.parameters("make_meta_step", "make_reptile_step")
  def test_a_bad_later_batch_is_counted_at_its_step(self, builder):
    learner, params, tasks, _ = _problem()
    if builder == "make_reptile_step":
      learner = mj.Reptile(learner.apply_fn, mj.cross_entropy, num_inner_steps=1, inner_lr=0.1)
    meta_step = getattr(mj, builder)(learner, optax.sgd(0.1))
    bad = tasks._replace(support_y=tasks.support_y.at[0, 0].set(WAYS),
                         query_y=tasks.query_y.at[1, 2].set(-1).at[1, 3].set(WAYS + 4))
    state = meta_step.init(params)
    counts = []
    for batch in (tasks, tasks, bad, tasks):
      state, metrics = meta_step.step(state, batch)
      self.assertEqual(metrics[mj.meta.BAD_LABELS].dtype, jnp.int32)
      counts.append(int(metrics[mj.meta.BAD_LABELS]))
    self.assertEqual(counts, [0, 0, 3, 0])
    _, metrics = meta_step.steps(state, jax.tree.map(lambda *xs: jnp.stack(xs), tasks, bad))
    np.testing.assert_array_equal(metrics[mj.meta.BAD_LABELS], [0, 3])

  def test_later_batches_are_not_read_on_the_host(self):
    learner, params, tasks, _ = _problem()
    meta_step = mj.make_meta_step(learner, optax.sgd(0.1))
    reads = []
    host_values = mj.meta._local_values

    def recorded(y):
      reads.append(np.shape(y))
      return host_values(y)

    with mock.patch.object(mj.meta, "_local_values", recorded):
      state, _ = meta_step.step(meta_step.init(params), tasks)  # the first batch: on the host
      self.assertEqual(reads, [(2, 6), (2, 9)])
      bad = tasks._replace(support_y=tasks.support_y.at[0, 0].set(WAYS))
      state, metrics = meta_step.step(state, bad)
    self.assertEqual(reads, [(2, 6), (2, 9)])  # no sync: counted on the device
    self.assertEqual(int(metrics[mj.meta.BAD_LABELS]), 1)

  def test_the_count_is_jit_safe_and_exact(self):
    learner, params, tasks, _ = _problem()
    count = jax.jit(lambda p, t: mj.meta.count_bad_labels(learner, p, t))
    self.assertEqual(int(count(params, tasks)), 0)
    labels = np.random.default_rng(1).integers(-2, WAYS + 2, size=tasks.query_y.shape)
    expected = int(np.sum((labels < 0) | (labels >= WAYS)))
    self.assertGreater(expected, 0)
    self.assertEqual(int(count(params, tasks._replace(query_y=jnp.asarray(labels)))), expected)

  def test_regression_has_no_count(self):
    _, params, tasks, _ = _problem()
    learner = mj.MAML(lambda p, x: x @ p["w"][:, :1], mj.mse, inner_lr=0.1)
    targets = tasks._replace(support_y=jnp.zeros((2, 6, 1)), query_y=jnp.ones((2, 9, 1)))
    _, metrics = _meta_step(learner, params, targets)
    self.assertNotIn(mj.meta.BAD_LABELS, metrics)
