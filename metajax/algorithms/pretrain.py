"""The joint-training baseline: pre-train one network on everything, then fine-tune per task.

Instead of meta-learning an initialisation, train one network on the pooled meta-training data
(Omniglot: a head over all C meta-training classes and ordinary cross-entropy on minibatches of
the pool; sinusoid: regression on points pooled from many tasks), then fine-tune it on each test
task's support set with a few SGD steps. Fine-tuning *is* the inner loop of `metajax.MAML`, so
evaluation goes through `metajax.evaluate_tasks` unchanged:

    # classification: C-way pre-training, then a fresh (zero) 5-way head fitted per task
    big = metajax.conv4(num_classes=C)
    sample = make_class_batch_sampler(pool, classes_per_batch=64, images_per_class=2)
    pretrain_step = make_pretrain_step(supervised_objective(big.apply, metajax.cross_entropy),
                                       optax.adam(1e-3))
    state = pretrain_step.init(big.init(key))
    state, metrics = pretrain_step.step(state, sample(batch_key, images))
    small = metajax.conv4(num_classes=5)
    learner = finetune_learner(small.apply, metajax.cross_entropy, num_inner_steps=10,
                               inner_lr=0.1, fresh_head=True)     # zeroing trick: head = 0
    metajax.evaluate_tasks(learner, with_head(state.params, small.init(key)["head"]), tasks)

The pre-training step has `metajax.make_meta_step`'s interface (`MetaStep`, `MetaState`), with
a minibatch `(x, y)` in place of a batch of tasks; its randomness (augmentations, for
`metajax.algorithms.contrastive_pretrain`) comes from `fold_in(key, state.step)`.

On sinusoids this shows the picture of Finn et al. (2017, figure 2): the pre-trained network
regresses to the mean function (about 0) and a few fine-tuning steps barely move it, while MAML
fits the task in one step; `sinusoid_comparison` and `adaptation_mse` produce the data of that
plot.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from metajax import losses as losses_lib
from metajax import meta as meta_lib
from metajax.data.sinusoid import INPUT_RANGE, sample_sinusoid, sinusoid
from metajax.data.samplers import (ClassPool, check_count, pool_shape, to_unit_float,
                                   random_subset)
from metajax.meta import MAML, MetaState, MetaStep, with_zeroing
from metajax.types import ApplyFn, Array, ArrayLike, Params, PRNGKey, Task
from metajax.variants import head_mask

Batch = tuple[Array, Array]  # (inputs [B, ...], targets [B] or [B, ...])
# objective(params, batch, key) -> (loss, metrics)
Objective = Callable[[Params, Batch, PRNGKey], tuple[Array, dict[str, Array]]]


# ------------------------------------------------------------------------------------------ data

def sample_class_batch(key: PRNGKey, images: ArrayLike, *, classes_per_batch: int,
                       images_per_class: int, dtype: jnp.dtype = jnp.float32) -> Batch:
  """A minibatch of the pool with its *global* class labels (no per-episode relabelling).

  `classes_per_batch` distinct classes, `images_per_class` distinct images of each, all
  uniformly at random (`random_subset`). With one image per class this is a uniform minibatch
  without repeated classes; with two or more, every example has a positive for SupCon.

  Args:
    key: a PRNG key.
    images: the pool `[C, M, H, W, D]` (float in [0, 1] or uint8).
    classes_per_batch: distinct classes in the batch, <= C.
    images_per_class: images per class, <= M.
    dtype: dtype of the images.

  Returns:
    `(x [B, H, W, D], y int32 [B])` with B = classes_per_batch * images_per_class, class-major,
    y the class index in the pool.
  """
  images = jnp.asarray(images)
  num_classes, per_class = images.shape[:2]
  class_key, image_key = jax.random.split(key)
  classes = random_subset(class_key, num_classes, classes_per_batch)  # [N]
  chosen = jax.vmap(random_subset, in_axes=(0, None, None))(
    jax.random.split(image_key, classes_per_batch), per_class, images_per_class)  # [N, K]
  x = to_unit_float(images[classes[:, None], chosen], dtype)
  x = x.reshape((classes_per_batch * images_per_class,) + images.shape[2:])
  y = jnp.repeat(classes.astype(jnp.int32), images_per_class,
                 total_repeat_length=classes_per_batch * images_per_class)
  return x, y


def make_class_batch_sampler(pool: ClassPool | ArrayLike | Sequence[int], *,
                             classes_per_batch: int, images_per_class: int = 1,
                             dtype: jnp.dtype = jnp.float32) -> Callable[[PRNGKey, ArrayLike],
                                                                         Batch]:
  """Returns `sample(key, images) -> (x, y)` (see `sample_class_batch`), sizes checked now."""
  shape = pool_shape(pool)
  classes_per_batch = check_count("classes_per_batch", classes_per_batch, 1)
  images_per_class = check_count("images_per_class", images_per_class, 1)
  if len(shape) < 3 or classes_per_batch > shape[0] or images_per_class > shape[1]:
    raise ValueError(f"classes_per_batch={classes_per_batch}, images_per_class="
                     f"{images_per_class} do not fit a pool of shape {tuple(shape)}")

  def sample(key: PRNGKey, images: ArrayLike) -> Batch:
    return sample_class_batch(key, images, classes_per_batch=classes_per_batch,
                              images_per_class=images_per_class, dtype=dtype)

  return sample


def tasks_to_batch(tasks: Task) -> Batch:
  """Pools the support and query points of a batch of *regression* tasks into one minibatch
  `(x [T*(K+Q), ...], y [T*(K+Q), ...])`: the joint-training data for sinusoids.

  (Not for classification episodes: their labels are relabelled per episode.)
  """
  def flat(a: Array) -> Array:
    return a.reshape((-1,) + a.shape[2:])

  x = jnp.concatenate([flat(tasks.support_x), flat(tasks.query_x)])
  y = jnp.concatenate([flat(tasks.support_y), flat(tasks.query_y)])
  return x, y


# ------------------------------------------------------------------------------------- training

def supervised_objective(apply_fn: ApplyFn, loss: Callable[[Array, Array], Array]) -> Objective:
  """`(params, (x, y), key) -> (loss(apply_fn(params, x), y), metrics)`; the key is unused.

  Metrics: `outer/accuracy` for integer labels.
  """

  def objective(params: Params, batch: Batch, key: PRNGKey) -> tuple[Array, dict[str, Array]]:
    del key
    x, y = batch
    outputs = apply_fn(params, x)
    value = loss(outputs, y)
    metrics = {}
    if meta_lib.is_classification(y):
      metrics["outer/accuracy"] = losses_lib.accuracy(outputs, y)
    return value, metrics

  return objective


def make_pretrain_step(objective: Objective, optimizer: optax.GradientTransformation, *,
                       key: PRNGKey | None = None, jit: bool = True,
                       donate: bool = True) -> MetaStep:
  """Builds `step(state, batch) -> (state, metrics)`: one optax step on `objective`.

  Args:
    objective: `(params, batch, key) -> (loss, metrics)`, e.g. `supervised_objective` or
      `metajax.algorithms.contrastive_pretrain.simclr_objective`.
    optimizer: e.g. `optax.adam(1e-3)`.
    key: the root of the step's randomness; step s uses `fold_in(key, s)`, so a resumed run
      repeats the same augmentations. Default `jax.random.key(0)`.
    jit: compile the step once (guarded against retracing).
    donate: let XLA reuse the old state's buffers.

  Returns:
    `MetaStep` (`init`, `step`, `steps`) with the `MetaState` of `metajax.make_meta_step`; metrics
    `outer/loss`, `outer/grad_norm` and the objective's own.
  """
  root = jax.random.key(0) if key is None else key

  def init(params: Params) -> MetaState:
    params = jax.tree.map(jnp.array, params)  # a copy: the donated step never deletes the caller's
    return MetaState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

  def step(state: MetaState, batch: Any) -> tuple[MetaState, dict[str, Array]]:
    step_key = jax.random.fold_in(root, state.step)
    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
      state.params, batch, step_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "outer/loss": value, "outer/grad_norm": optax.tree.norm(grads)}
    return MetaState(params, opt_state, state.step + 1), metrics

  return meta_lib.compile_step(init, step, jit=jit, donate=donate)


# ----------------------------------------------------------------------------------- fine-tuning

def with_head(params: Params, head: Params) -> Params:
  """The pre-trained params with another head, e.g. a 5-way head for a C-way pre-trained net."""
  return {**params, "head": head}


def finetune_learner(apply_fn: ApplyFn, loss: Callable[[Array, Array], Array], *,
                     num_inner_steps: int, inner_lr: Any = None,
                     optimizer: optax.GradientTransformation | None = None,
                     head_only: bool = False, fresh_head: bool = False) -> MAML:
  """Fine-tuning on a task's support set, as a learner for `metajax.evaluate_tasks`.

  It is a first-order `MAML` (nothing is meta-learned): `num_inner_steps` steps of SGD (or
  `optimizer`) on the support set. Composed from existing pieces: `head_only` adapts only the
  head (`metajax.head_mask`, a linear probe on frozen features); `fresh_head` starts every task
  from a zero head (`metajax.with_zeroing`), the natural "new head" for classes never seen, and
  makes "before adaptation" chance.

  Args:
    apply_fn: the model of the test tasks (e.g. a 5-way `conv4(...).apply`).
    loss: its loss.
    num_inner_steps: fine-tuning steps per task.
    inner_lr: SGD step size (or give `optimizer`).
    optimizer: an optax optimiser for fine-tuning instead.
    head_only: adapt the head only.
    fresh_head: zero the head before fine-tuning each task.
  """
  learner = MAML(apply_fn, loss, num_inner_steps=num_inner_steps, inner_lr=inner_lr,
                 optimizer=optimizer, first_order=True,
                 adapt_mask=head_mask if head_only else None)
  return with_zeroing(learner) if fresh_head else learner


# ------------------------------------------------------------------- the sinusoid comparison

def adaptation_trajectory(apply_fn: ApplyFn, loss: Callable[[Array, Array], Array],
                          params: Params, x: Array, y: Array, x_eval: Array, *,
                          inner_lr: float, num_steps: int) -> Array:
  """Predictions on `x_eval` after 0, 1, ..., `num_steps` SGD steps on `(x, y)`.

  One `lax.scan` over the steps: `[num_steps + 1, E, ...]`, row s after s steps.
  """
  num_steps = check_count("num_steps", num_steps, 0)
  loss_fn = losses_lib.make_loss_fn(apply_fn, loss)

  def sgd_step(p: Params, _) -> tuple[Params, Array]:
    grads = jax.grad(loss_fn)(p, x, y)
    p = jax.tree.map(lambda w, g: w - inner_lr * g, p, grads)
    return p, apply_fn(p, x_eval)

  _, after = jax.lax.scan(sgd_step, params, None, length=num_steps)
  return jnp.concatenate([apply_fn(params, x_eval)[None], after])


def adaptation_mse(apply_fn: ApplyFn, params: Params, tasks: Task, *, inner_lr: float,
                   num_steps: int) -> Array:
  """Mean query MSE over a batch of regression tasks after 0..`num_steps` SGD steps on each
  support set (MSE loss): `[num_steps + 1]`."""

  def one(task: Task) -> Array:
    preds = adaptation_trajectory(apply_fn, losses_lib.mse, params, task.support_x,
                                  task.support_y, task.query_x, inner_lr=inner_lr,
                                  num_steps=num_steps)
    return jnp.mean(jnp.square(preds - task.query_y[None]), axis=tuple(range(1, preds.ndim)))

  return jnp.mean(jax.vmap(one)(tasks), axis=0)


@dataclasses.dataclass(frozen=True)
class SinusoidComparison:
  """The data of the MAML-vs-pre-training sinusoid plot (Finn et al. 2017, figure 2).

  Attributes:
    x: `[E]` evaluation inputs, a grid over the input range.
    y_true: `[E]` the true function of the task.
    support_x, support_y: `[K]` the K points both methods fine-tune on.
    steps: the step counts shown, e.g. (0, 1, 10).
    predictions: name -> `[len(steps), E]` the predictions after each step count.
    mse: name -> `[len(steps)]` MSE against the true function on the grid.
  """

  x: Array
  y_true: Array
  support_x: Array
  support_y: Array
  steps: tuple[int, ...]
  predictions: Mapping[str, Array]
  mse: Mapping[str, Array]


def sinusoid_comparison(key: PRNGKey, apply_fn: ApplyFn, params_by_name: Mapping[str, Params], *,
                        shots: int = 10, inner_lr: float = 0.01,
                        steps: Sequence[int] = (0, 1, 10), num_points: int = 100,
                        input_range: tuple[float, float] = INPUT_RANGE
                        ) -> SinusoidComparison:
  """Fine-tunes each named initialisation (e.g. `{"MAML": ..., "pretrained": ...}`) on the same
  K-shot sinusoid task and returns the curves after each of `steps` SGD steps.

  Args:
    key: picks the task (amplitude, phase and the K support points).
    apply_fn: the regression model (e.g. `metajax.mlp(1).apply`).
    params_by_name: the initialisations to compare.
    shots: K support points.
    inner_lr: fine-tuning step size (Finn et al.: 0.01).
    steps: step counts to report (0 = the initialisation itself).
    num_points: E, grid points for the curves.
    input_range: the grid's range.
  """
  steps = tuple(check_count("steps", s, 0) for s in steps)
  task, true = sample_sinusoid(key, shots=shots, queries=1, input_range=input_range)
  grid = jnp.linspace(*input_range, num_points, dtype=task.support_x.dtype)[:, None]
  y_true = sinusoid(grid, true)
  predictions, mse = {}, {}
  for name, params in params_by_name.items():  # a handful of initialisations, not tasks
    traj = adaptation_trajectory(apply_fn, losses_lib.mse, params, task.support_x,
                                 task.support_y, grid, inner_lr=inner_lr,
                                 num_steps=max(steps))
    picked = traj[jnp.asarray(steps)][..., 0]  # [S, E]
    predictions[name] = picked
    mse[name] = jnp.mean(jnp.square(picked - y_true[:, 0]), axis=-1)
  return SinusoidComparison(x=grid[:, 0], y_true=y_true[:, 0], support_x=task.support_x[:, 0],
                            support_y=task.support_y[:, 0], steps=steps,
                            predictions=predictions, mse=mse)


__all__ = [
  "Batch",
  "Objective",
  "SinusoidComparison",
  "adaptation_mse",
  "adaptation_trajectory",
  "finetune_learner",
  "make_class_batch_sampler",
  "make_pretrain_step",
  "sample_class_batch",
  "sinusoid_comparison",
  "supervised_objective",
  "tasks_to_batch",
  "with_head",
]
