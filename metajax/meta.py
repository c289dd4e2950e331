"""The outer loop: MAML learners, the meta-loss over a batch of tasks, and the jitted meta-step.

A learner (`MAML`) is an immutable description of *how* to adapt; it holds no parameters and no
state. Everything that changes during training lives in `MetaState` and is threaded explicitly:

    model = metajax.conv4(num_classes=5)
    learner = metajax.MAML(model.apply, metajax.cross_entropy, num_inner_steps=1, inner_lr=0.4)
    learner = metajax.with_zeroing(learner)              # optional: Kao et al.'s zeroing trick
    meta_step = metajax.make_meta_step(learner, optax.adam(1e-3))
    state = meta_step.init(model.init(key))
    state, metrics = meta_step.step(state, tasks)        # tasks: a Task with a leading task axis
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metajax import inner as inner_lib
from metajax import losses as losses_lib
from metajax.platform import xla
from metajax.types import ApplyFn, Array, Learner, MetaParams, Params, Task

TaskMap = Literal["auto", "vmap", "map"] | int

# What `task_map="auto"` means, per backend (`jax.default_backend()`; any other: "vmap"). On CPU,
# one task at a time with its meta-gradient taken inside the loop (`meta_value_and_grad`) was
# faster than vmap on 10 of the benchmark's 11 meta-step workloads (equal on the 11th) with a
# fraction of its memory (docs/BENCHMARKS.md); an accelerator runs the whole meta-batch at once.
AUTO_TASK_MAP: dict[str, TaskMap] = {"cpu": "map"}
L = TypeVar("L", bound=Learner)


@dataclasses.dataclass(frozen=True)
class MAML:
  """Model-agnostic meta-learning (Finn et al. 2017) and its inner-loop variants.

  The meta-parameters are the model params, or, with `learn_inner_lr`, the dict
  `{"params": model_params, "inner_lr": lrs}` (Li et al. 2017's Meta-SGD for `"element"`), or,
  with `learned_optimizer`, `{"params": model_params, "optimizer": its params}`.

  Attributes:
    apply_fn: `(params, x) -> outputs`.
    loss: `(outputs, targets) -> scalar`, used in the inner and the outer loop.
    num_inner_steps: inner gradient steps per task (>= 1).
    inner_lr: inner step size (scalar or pytree, see `metajax.adapt`); exclusive with optimizer.
    optimizer: an optax transformation for the inner loop instead of gradient descent.
    learned_optimizer: an inner optimizer whose own parameters the outer loop learns
      (`metajax.algorithms.learned_optimizers`: `lstm_optimizer`, `meta_lstm`); exclusive with
      inner_lr and optimizer. `init` draws its parameters from `jax.random.key(seed)`.
    first_order: FOMAML: no gradient through the inner gradients.
    adapt_mask: which params adapt in the inner loop (e.g. `metajax.head_mask` for ANIL).
    remat: rematerialise each inner step in the backward pass (memory flat in inner steps); True,
      or a `jax.checkpoint_policies` policy (see `metajax.adapt`).
    unroll: inner steps per iteration of the inner loop's `lax.scan` (True: all); see
      `metajax.adapt`. None (the default): rolled, except in `make_meta_step`'s step, which
      compiles with `metajax.platform.xla.jit` and unrolls up to `MAX_AUTO_UNROLL` steps (fastest
      measured; plain `jax.jit` miscompiles unrolled Conv-4 meta-gradients on CPU).
    learn_inner_lr: None (fixed), "tensor" (one learned lr per param tensor), "element" (one per
      parameter entry, Meta-SGD) or "step" (one per param tensor and inner step: MAML++'s
      per-layer per-step lrs); the learned lrs start at `inner_lr`.
    params_transforms: functions applied, in order, to the model params before the inner loop and
      before any prediction (e.g. `zero_head`; see `with_zeroing`).
    allow_nonpositive_inner_lr: accept an `inner_lr` <= 0 (refused by default).
    per_step_params: which params get one copy per inner step (a mask as `adapt_mask`, e.g.
      `metajax.norm_mask`: MAML++'s per-step BatchNorm weights and biases). `init` stacks them
      along a leading step axis; inner step k and the query after it use copy k; they do not
      adapt in the inner loop (the outer loop learns them). Predictions before adaptation use
      copy 0, after it the copy of the last step (of the last learned one, for more steps).
    step_loss_weights: MAML++'s multi-step loss: the outer loss is the sum over inner steps k of
      weight k times the query loss after step k. A `[num_inner_steps]` array, or a function of
      the outer step (`multi_step_loss_weights` gives the paper's annealing). None: the query
      loss after the last step only. A function applies in `make_meta_step` (which passes the
      outer step through `at_step`); elsewhere the loss is the last step's.
    first_order_steps: MAML++'s derivative-order annealing: in `make_meta_step`, the first this
      many outer steps are first-order, the rest second-order (0: never first-order).
    outer_step: the outer step that `at_step` set (traced); None outside the meta-step.
    learn_init: False: the initialisation is not meta-learned (no outer gradient reaches the
      model params), only what else the meta-params hold (learned lrs, a learned optimizer).
    seed: of a `learned_optimizer`'s initial parameters.
  """

  apply_fn: ApplyFn
  loss: Callable[[Array, Array], Array]
  num_inner_steps: int = 1
  inner_lr: Any = None
  optimizer: optax.GradientTransformation | None = None
  first_order: bool = False
  adapt_mask: Any = None
  remat: bool | Callable[..., Any] = False
  unroll: int | bool | None = None
  learn_inner_lr: Literal["tensor", "element", "step"] | None = None
  params_transforms: tuple[Callable[[Params], Params], ...] = ()
  allow_nonpositive_inner_lr: bool = False
  per_step_params: Any = None
  step_loss_weights: Any = None
  first_order_steps: int = 0
  outer_step: Any = None
  learned_optimizer: Any = None
  learn_init: bool = True
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.num_inner_steps, int) or self.num_inner_steps < 1:
      raise ValueError(f"num_inner_steps must be an int >= 1, got {self.num_inner_steps!r}")
    given = [x is not None for x in (self.inner_lr, self.optimizer, self.learned_optimizer)]
    if sum(given) != 1:
      raise ValueError("give exactly one of inner_lr, optimizer or learned_optimizer, got "
                       f"inner_lr={self.inner_lr!r}, optimizer={self.optimizer!r}, "
                       f"learned_optimizer={self.learned_optimizer!r}")
    if self.learned_optimizer is not None and not (
        hasattr(self.learned_optimizer, "init") and hasattr(self.learned_optimizer, "bind")):
      raise TypeError("learned_optimizer must have init(key) and bind(opt_params) (a "
                      "metajax.algorithms.learned_optimizers.LearnedOptimizer), got "
                      f"{type(self.learned_optimizer).__name__}")
    if self.inner_lr is not None:
      inner_lib.check_inner_lr(self.inner_lr, allow_nonpositive=self.allow_nonpositive_inner_lr)
    if self.learn_inner_lr not in (None, "tensor", "element", "step"):
      raise ValueError(f"learn_inner_lr must be None, 'tensor', 'element' or 'step', got "
                       f"{self.learn_inner_lr!r}")
    if self.learn_inner_lr is not None and self.inner_lr is None:
      raise ValueError("learn_inner_lr needs an initial scalar inner_lr")
    if (not isinstance(self.first_order_steps, int) or isinstance(self.first_order_steps, bool)
        or self.first_order_steps < 0):
      raise ValueError(f"first_order_steps must be an int >= 0, got {self.first_order_steps!r}")
    if self.first_order_steps and self.first_order:
      raise ValueError("first_order_steps anneals first-order into second-order MAML: it needs "
                       f"first_order=False, got first_order=True and first_order_steps="
                       f"{self.first_order_steps}")
    weights = self.step_loss_weights
    if weights is not None and not callable(weights):
      if jnp.shape(weights) != (self.num_inner_steps,):
        raise ValueError(f"step_loss_weights must have one weight per inner step, shape "
                         f"({self.num_inner_steps},), got shape {jnp.shape(weights)}")

  def at_step(self, step: Array) -> MAML:
    """This learner at outer step `step` (for the annealed `step_loss_weights` and
    `first_order_steps`; `make_meta_step` calls it). Without them, the learner itself."""
    if self.first_order_steps or callable(self.step_loss_weights):
      return dataclasses.replace(self, outer_step=step)
    return self

  def init(self, params: Params) -> MetaParams:
    """Model params -> meta-params (per-step copies and learned inner lrs, if any)."""
    if self.per_step_params is not None:
      flags = self._per_step_flags(params)
      leaves, treedef = jax.tree.flatten(params)
      params = treedef.unflatten([
        jnp.broadcast_to(w, (self.num_inner_steps, *jnp.shape(w))) if f else w
        for w, f in zip(leaves, flags)])
    if self.learned_optimizer is not None:
      return {"params": params,
              "optimizer": self.learned_optimizer.init(jax.random.key(self.seed))}
    if self.learn_inner_lr is None:
      return params
    lr = jnp.asarray(self.inner_lr, jnp.result_type(*jax.tree.leaves(params)))
    shapes = {"element": jnp.shape, "tensor": lambda p: (), "step": lambda p: (self.num_inner_steps,)}
    shape = shapes[self.learn_inner_lr]
    return {"params": params, "inner_lr": jax.tree.map(lambda p: jnp.full(shape(p), lr), params)}

  def _per_step_flags(self, params: Params) -> list[bool]:
    flags = inner_lib.per_step_flags(self.per_step_params, params)
    if not any(flags):
      raise ValueError("per_step_params selects no leaf of params: a mask such as "
                       "metajax.norm_mask needs the model's norm layers under their names")
    return flags

  def _start_params(self, meta_params: MetaParams) -> Params:
    """The params the inner loop starts from: per-step leaves still stacked, transforms applied."""
    if self._meta_keys():
      self._check_meta_params(meta_params)
    params = meta_params["params"] if self._meta_keys() else meta_params
    if not self.learn_init:
      params = jax.lax.stop_gradient(params)
    for transform in self.params_transforms:
      params = transform(params)
    return params

  def model_params(self, meta_params: MetaParams) -> Params:
    """The model params predictions start from before adaptation (transforms such as zeroing
    applied; per-step leaves at their first step)."""
    params = self._start_params(meta_params)
    if self.per_step_params is None:
      return params
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([w[0] if f else w
                              for w, f in zip(leaves, self._per_step_flags(params))])

  def _meta_keys(self) -> tuple[str, ...]:
    """The keys of the meta-params dict; () when the meta-params are the model params."""
    if self.learned_optimizer is not None:
      return ("optimizer", "params")
    return ("inner_lr", "params") if self.learn_inner_lr else ()

  def _check_meta_params(self, meta_params: MetaParams) -> None:
    keys = self._meta_keys()
    if not (isinstance(meta_params, dict) and tuple(sorted(meta_params)) == keys):
      got = sorted(meta_params) if isinstance(meta_params, dict) else type(meta_params).__name__
      which = (f"learned_optimizer={getattr(self.learned_optimizer, 'name', '?')!r}"
               if self.learned_optimizer is not None
               else f"learn_inner_lr={self.learn_inner_lr!r} (Meta-SGD)")
      raise ValueError(f"a learner with {which} takes meta-params {{{', '.join(map(repr, keys))}}}"
                       f" from learner.init(params), got {got}: pass "
                       f"learner.init(model_params), not the model params")

  def adapt(self, meta_params: MetaParams, x: Array, y: Array, *,
            return_losses: bool = False) -> Params | tuple[Params, Array]:
    """Adapts to one task's support set `(x, y)`; see `metajax.adapt`.

    Raises:
      ValueError, TypeError: as `check_support`, before anything is traced.
    """
    return self._adapt(meta_params, x, y, return_losses=return_losses)

  def _adapt(self, meta_params: MetaParams, x: Array, y: Array, *, return_losses: bool = False,
             observe: Callable[[Params], Any] | None = None) -> Any:
    if self._meta_keys():
      self._check_meta_params(meta_params)
    check_support(self, meta_params, x, y)
    inner_lr = meta_params["inner_lr"] if self.learn_inner_lr else self.inner_lr
    optimizer = self.optimizer
    if self.learned_optimizer is not None:
      optimizer = self.learned_optimizer.bind(meta_params["optimizer"])
    by_step = {}
    if self.per_step_params is not None or self.learn_inner_lr == "step" or observe is not None:
      by_step = {"per_step_lr": self.learn_inner_lr == "step", "per_step": self.per_step_params,
                 "observe": observe}
    return inner_lib.adapt(
      self._start_params(meta_params), x, y,
      loss_fn=losses_lib.make_loss_fn(self.apply_fn, self.loss),
      num_inner_steps=self.num_inner_steps, inner_lr=inner_lr, optimizer=optimizer,
      first_order=self.first_order, adapt_mask=self.adapt_mask, remat=self.remat,
      unroll=1 if self.unroll is None else self.unroll, return_losses=return_losses,
      allow_nonpositive_inner_lr=self.allow_nonpositive_inner_lr, **by_step)

  def task_loss(self, meta_params: MetaParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """Query loss of one task at the adapted params, and per-task metrics.

    `inner/support_loss_before` is the support loss before the first inner step.
    """
    if self.first_order_steps and self.outer_step is not None:
      # Derivative-order annealing: both programs are compiled, one runs (the predicate is the
      # outer step, the same for every task, so `vmap` keeps it a branch).
      first = dataclasses.replace(self, first_order=True, first_order_steps=0)
      second = dataclasses.replace(self, first_order_steps=0)
      return jax.lax.cond(self.outer_step < self.first_order_steps, first.task_loss,
                          second.task_loss, meta_params, task)
    weights = self.step_loss_weights
    if callable(weights):
      weights = None if self.outer_step is None else weights(self.outer_step)
    if weights is not None:
      return self._multi_step_loss(meta_params, task, weights)
    adapted, inner_losses = self.adapt(meta_params, task.support_x, task.support_y,
                                       return_losses=True)
    outputs = self.apply_fn(adapted, task.query_x)
    loss = self.loss(outputs, task.query_y)
    metrics = {"inner/support_loss_before": inner_losses[0], "outer/query_loss": loss}
    if is_classification(task.query_y):
      metrics["outer/query_accuracy"] = losses_lib.accuracy(outputs, task.query_y)
    return loss, metrics

  def _multi_step_loss(self, meta_params: MetaParams, task: Task,
                       weights: Array) -> tuple[Array, dict[str, Array]]:
    """MAML++'s outer loss: the query losses after every inner step, weighted."""
    classification = is_classification(task.query_y)

    def query(params: Params) -> dict[str, Array]:
      outputs = self.apply_fn(params, task.query_x)
      out = {"loss": self.loss(outputs, task.query_y)}
      if classification:
        out["accuracy"] = losses_lib.accuracy(outputs, task.query_y)
      return out

    _, inner_losses, queried = self._adapt(meta_params, task.support_x, task.support_y,
                                           return_losses=True, observe=query)
    loss = jnp.sum(jnp.asarray(weights, queried["loss"].dtype) * queried["loss"])
    metrics = {"inner/support_loss_before": inner_losses[0],
               "outer/query_loss": queried["loss"][-1]}
    if classification:
      metrics["outer/query_accuracy"] = queried["accuracy"][-1]
    return loss, metrics


def with_zeroing(learner: L, head: Any = None) -> L:
  """Kao et al.'s zeroing trick: the head is 0 at the start of every inner loop and at test time.

  Because the head is zeroed inside the differentiated function, its outer gradient is 0 and the
  stored head never matters; the encoder gradient is that of MAML evaluated at w = 0.

  Args:
    learner: any learner with a `params_transforms` field (`MAML`, ...).
    head: which leaves are the head (`metajax.variants.HeadSpec`); None: those below a key
      named "head" (metajax's models, Flax's `{"params": ...}` tree, NNX states).
  """
  from metajax.variants import zero_head, zero_head_for  # local: variants is a leaf module

  zero = zero_head if head is None else zero_head_for(head)
  return dataclasses.replace(learner, params_transforms=(*learner.params_transforms, zero))


def multi_step_loss_weights(num_inner_steps: int, num_epochs: int, *, steps_per_epoch: int = 500,
                            min_weight: float = 0.03) -> Callable[[Array], Array]:
  """MAML++'s annealed weights of the query loss after each inner step (Antoniou et al. 2019).

  At epoch e = outer_step // steps_per_epoch, with N = num_inner_steps and d = 1 / (N num_epochs):
  every step but the last weighs max(1/N - e d, min_weight / N), the last min(1/N + e (N-1) d,
  1 - (N-1) min_weight / N); from epoch `num_epochs` on, the last step alone weighs 1 (the paper's
  code drops the other steps' losses then). The weights sum to 1 throughout.

  Returns:
    `outer_step -> [N]` weights, for `MAML(step_loss_weights=...)`.
  """
  for name, value in (("num_inner_steps", num_inner_steps), ("num_epochs", num_epochs),
                      ("steps_per_epoch", steps_per_epoch)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if not 0 <= min_weight <= 1:
    raise ValueError(f"min_weight must be in [0, 1], got {min_weight!r}")
  n = num_inner_steps
  decay, floor = 1.0 / n / num_epochs, min_weight / n
  last = jnp.arange(n) == n - 1

  def weights(outer_step: Array) -> Array:
    epoch = jnp.asarray(outer_step) // steps_per_epoch
    early = jnp.maximum(1.0 / n - epoch * decay, floor)
    final = jnp.minimum(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    annealed = jnp.where(last, final, early)
    return jnp.where(epoch < num_epochs, annealed, last.astype(annealed.dtype))

  return weights


def is_classification(y: Array) -> bool:
  """True for integer labels (classification), False for float targets (regression)."""
  return jnp.issubdtype(jnp.result_type(y), jnp.integer)


def _check_task_map(task_map: Any) -> None:
  if not (task_map in ("auto", "vmap", "map") if isinstance(task_map, str)
          else isinstance(task_map, int) and not isinstance(task_map, bool) and task_map >= 1):
    raise ValueError(f"task_map must be 'auto', 'vmap', 'map' or a positive int, got "
                     f"{task_map!r}")


def resolve_task_map(task_map: TaskMap, backend: str | None = None, *,
                     sharded: bool = False) -> TaskMap:
  """`task_map` itself, or for "auto" the backend's choice (`AUTO_TASK_MAP`, else "vmap").

  Args:
    task_map: "auto", "vmap", "map" or a positive int.
    backend: a JAX backend name ("cpu", "gpu", "tpu"); default `jax.default_backend()`.
    sharded: the tasks are split over devices; "auto" is then "vmap" on every backend (a loop
      over a sharded task axis would run every task on every device).

  Raises:
    ValueError: any other `task_map`, naming it.
  """
  _check_task_map(task_map)
  if task_map != "auto":
    return task_map
  if sharded:
    return "vmap"
  return AUTO_TASK_MAP.get(backend or jax.default_backend(), "vmap")


def map_tasks(fn: Callable[[Task], Any], tasks: Task, task_map: TaskMap = "vmap") -> Any:
  """Applies a one-task function to every task of a batch (leading axis).

  Args:
    fn: `task -> pytree`.
    tasks: a `Task` whose arrays have a leading task axis.
    task_map: "vmap" (all tasks at once), "map" (`lax.map`, one task at a time), an int k
      (`lax.map` over chunks of k vmapped tasks), or "auto" (the backend's choice,
      `resolve_task_map`). Under an outer `jax.grad` a `lax.map` still keeps every task's
      residuals; `meta_value_and_grad` takes the gradient inside the loop instead.
  """
  task_map = resolve_task_map(task_map)
  if task_map == "vmap":
    return jax.vmap(fn)(tasks)
  if task_map == "map":
    return jax.lax.map(fn, tasks)
  return jax.lax.map(fn, tasks, batch_size=task_map)


def meta_value_and_grad(meta_params: MetaParams, tasks: Task, learner: Learner, *,
                        task_map: TaskMap = "vmap",
                        ) -> tuple[tuple[Array, dict[str, Array]], MetaParams]:
  """`jax.value_and_grad(meta_loss, has_aux=True)`, with the gradient taken per task if mapped.

  With `task_map="vmap"` this is exactly `value_and_grad` of `meta_loss`. With "map" or an int k
  every task's (or chunk of k tasks') query loss is differentiated inside a `lax.scan` over the
  tasks and the gradients are summed in its carry, as a PyTorch loop calls `backward` per task:
  only one task's (one chunk's) residuals are alive at a time, so memory does not grow with the
  meta-batch. The mean loss, metrics and gradient are the same sums divided by the number of
  tasks (equal to the vmapped ones up to the order of float additions). "auto": the backend's
  choice (`resolve_task_map`).

  Returns:
    `((loss, metrics), grads)`: the mean query loss, the per-task metrics averaged over tasks,
    and the meta-gradient.
  """
  task_map = resolve_task_map(task_map)
  if task_map == "vmap":
    return jax.value_and_grad(meta_loss, has_aux=True)(meta_params, tasks, learner,
                                                         task_map="vmap", has_aux=True)
  check_inputs(learner, meta_params, tasks, batched=True)
  num_tasks = jax.tree.leaves(tasks)[0].shape[0]
  if num_tasks == 0:
    raise ValueError("meta_value_and_grad needs at least one task, got a meta-batch of 0")
  size = 1 if task_map == "map" else min(task_map, num_tasks)

  def one(p: MetaParams, task: Task) -> tuple[Array, dict[str, Array]]:
    loss, metrics = learner.task_loss(p, task)
    # A task's metric as `meta_loss` averages it (`jnp.mean`: a float scalar, bools counted).
    return loss, jax.tree.map(jnp.mean, metrics)

  def sums(batched: bool, chunk: Task) -> tuple[tuple[Array, dict[str, Array]], MetaParams]:
    def total(p):
      if not batched:
        return one(p, chunk)
      losses, metrics = jax.vmap(functools.partial(one, p))(chunk)
      return jnp.sum(losses), jax.tree.map(functools.partial(jnp.sum, axis=0), metrics)
    return jax.value_and_grad(total, has_aux=True)(meta_params)

  full, rest = divmod(num_tasks, size)
  head = jax.tree.map(lambda x: x[:full * size].reshape(full, *((size,) if size > 1 else ()),
                                                         *x.shape[1:]), tasks)
  shapes = jax.eval_shape(functools.partial(sums, size > 1), jax.tree.map(lambda x: x[0], head))
  carry = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, chunk):
    return jax.tree.map(jnp.add, carry, sums(size > 1, chunk)), None

  total, _ = jax.lax.scan(body, carry, head)
  if rest:  # the last, smaller chunk
    tail = jax.tree.map(lambda x: x[full * size:], tasks)
    total = jax.tree.map(jnp.add, total, sums(True, tail))
  return jax.tree.map(lambda x: x / num_tasks, total)


def meta_loss(meta_params: MetaParams, tasks: Task, learner: MAML, *, task_map: TaskMap = "vmap",
              has_aux: bool = False) -> Array | tuple[Array, dict[str, Array]]:
  """Mean over tasks of the query loss at the adapted params: MAML's outer objective.

  `jax.grad(meta_loss)` is the exact second-order meta-gradient unless the learner is first-order.
  With `has_aux=True` also returns the per-task metrics averaged over tasks.

  Raises:
    ValueError, TypeError: `tasks` that `check_inputs` refuses (shapes, target dtypes, and label
      values when they are concrete), before anything is mapped over tasks.
  """
  check_inputs(learner, meta_params, tasks, batched=True)
  losses, metrics = map_tasks(lambda task: learner.task_loss(meta_params, task), tasks, task_map)
  loss = jnp.mean(losses)
  if not has_aux:
    return loss
  return loss, jax.tree.map(jnp.mean, metrics)


class MetaState(NamedTuple):
  """Everything the outer loop updates: meta-params, optimiser state and the step counter."""

  params: MetaParams
  opt_state: optax.OptState
  step: Array


@dataclasses.dataclass(frozen=True)
class MetaStep:
  """The outer update as functions, built by `make_meta_step` or `compile_step`.

  Attributes:
    init: `init(params) -> MetaState`.
    step: `step(state, tasks) -> (state, metrics)`, one outer step (inputs checked, compiled).
    steps: `steps(state, tasks) -> (state, metrics)` for tasks stacked along a new leading axis
      of K meta-batches: K outer steps, in order, in one compiled call (`lax.scan` of `step`);
      metrics get the same leading axis.
    update: the pure outer update `(state, tasks) -> (state, metrics)` that `step` compiles, with
      no input checks: to compose into a program of your own (`jax.jit`, `lax.scan`, ...).
  """

  init: Callable[[MetaParams], MetaState]
  step: Callable[[MetaState, Task], tuple[MetaState, dict[str, Array]]]
  steps: Callable[[MetaState, Task], tuple[MetaState, dict[str, Array]]]
  update: Callable[[MetaState, Any], tuple[MetaState, dict[str, Array]]]
  # The jitted programs behind `step` and `steps` (None without jit), for `lower`.
  _jitted: tuple[Any, Any] = dataclasses.field(default=(None, None), repr=False, compare=False)

  def lower(self, state: MetaState, tasks: Any, *, stacked: bool = False) -> Any:
    """Ahead-of-time lowering of the compiled program of `step` (or, `stacked`, of `steps`).

    Returns a `jax.stages.Lowered` (`.compile()`, `.cost_analysis()`, `.as_text()`), for
    compile times, FLOP counts and memory analysis of exactly the program `step` runs.
    """
    jitted = self._jitted[1 if stacked else 0]
    if jitted is None:
      raise ValueError("this MetaStep was built with jit=False: there is no compiled program to "
                       "lower")
    return jitted.lower(state, tasks)


# `make_meta_step` unrolls inner loops of up to this many steps when the learner leaves `unroll`
# to it: the measured workloads (1, 2 and 5 steps) were fastest unrolled; longer loops stay
# rolled so that compile time stays bounded.
MAX_AUTO_UNROLL = 5


def make_meta_step(learner: Learner, optimizer: optax.GradientTransformation, *,
                   task_map: TaskMap = "auto", jit: bool = True, donate: bool = True,
                   shardings: tuple[Any, Any] | None = None) -> MetaStep:
  """Builds the outer update: `meta_value_and_grad` (of `meta_loss`), then an optax update.

  Args:
    learner: how to adapt (e.g. `MAML(...)`, possibly `with_zeroing`). A `MAML` with
      `unroll=None` gets its inner loop unrolled up to `MAX_AUTO_UNROLL` steps when `jit`.
    optimizer: the outer (meta) optimiser, e.g. `optax.adam(1e-3)`.
    task_map: how tasks are mapped: "vmap" (all at once), or "map" / an int k, with each task's
      (chunk's) meta-gradient taken inside the loop and summed, so that memory does not grow
      with the meta-batch (see `meta_value_and_grad`); "auto" (the default): the backend's
      choice (`AUTO_TASK_MAP`: "map" on CPU), "vmap" with `shardings` (tasks split over
      devices).
    jit: compile the step once (it is guarded to never retrace for same-shaped inputs).
    donate: let XLA reuse the old state's buffers for the new state (the old state must not be
      used after the call).
    shardings: optional `(state_sharding, tasks_sharding)` for `jax.jit`'s `in_shardings`, e.g.
      tasks sharded over a device mesh along the task axis (see `metajax.platform.sharding`).

  Returns:
    A `MetaStep(init, step, steps, update)`. `step` returns metrics averaged over tasks, plus
    `outer/grad_norm` and, for integer labels, `BAD_LABELS` (`inputs/bad_labels`: the number of
    that meta-batch's labels outside `[0, num_outputs)`, counted on the device, so that every
    batch is checked without a host sync; the first batch is also checked on the host, which
    raises); `steps` runs K steps over K stacked meta-batches in one call (faster on CPU, see
    `compile_step`).

  A batch of new shapes (or dtypes) compiles the step again, once, with a `RecompileWarning`
  that names the old and the new shapes; each shape seen compiles once.
  """

  task_map = resolve_task_map(task_map, sharded=shardings is not None)
  if jit and isinstance(learner, MAML) and learner.unroll is None:
    learner = dataclasses.replace(
      learner, unroll=True if learner.num_inner_steps <= MAX_AUTO_UNROLL else 1)

  def init(params: Params) -> MetaState:
    # A copy: the donated step must never delete the caller's arrays.
    meta_params = jax.tree.map(jnp.array, learner.init(params))
    return MetaState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32))

  def step(state: MetaState, tasks: Task) -> tuple[MetaState, dict[str, Array]]:
    # A learner annealed by outer step (MAML++) sees this step; any other is itself.
    at_step = learner.at_step(state.step) if hasattr(learner, "at_step") else learner
    (loss, metrics), grads = meta_value_and_grad(state.params, tasks, at_step,
                                                 task_map=task_map)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "outer/loss": loss, "outer/grad_norm": optax.tree.norm(grads),
               **bad_label_metrics(learner, state.params, tasks)}
    return MetaState(params, opt_state, state.step + 1), metrics

  check = functools.partial(check_first_batch, learner, [])
  return compile_step(init, step, check, jit=jit, donate=donate, shardings=shardings)


def check_first_batch(learner: Learner, checked: list, state: MetaState, tasks: Task) -> None:
  """`check_inputs` on a meta-batch; label values once (`checked` remembers it)."""
  # values need a host sync: check them once, on the first batch
  check_inputs(learner, state.params, tasks, batched=True, values=not checked)
  if not checked:
    checked.append(True)


def compile_step(init: Callable[[MetaParams], MetaState],
                 step: Callable[[MetaState, Any], tuple[MetaState, dict[str, Array]]],
                 check: Callable[[MetaState, Any], None] | None = None, *, jit: bool = True,
                 donate: bool = True, shardings: tuple[Any, Any] | None = None) -> MetaStep:
  """A `MetaStep` from a pure outer step: compiled once (guarded) and, as `steps`, scanned.

  Why `steps`: XLA:CPU takes a step's temporaries (up to gigabytes for a Conv-4 meta-batch) from
  `malloc` and frees them after the call; K steps in one call reuse one set of temporaries, so
  the page faults of fresh memory (and, on VMs whose kernel reports freed pages to the host,
  the re-faults of memory the host took back) are paid once per K steps. The result is the
  same K steps, in the same order, as K calls of `step`.

  Args:
    init: `init(params) -> MetaState`.
    step: the pure update `(state, batch) -> (state, metrics)`.
    check: validates a batch on the host before the call (`steps` passes its first meta-batch).
    jit: compile with `metajax.platform.xla.jit`; False returns `step` as is (and `steps` as a Python
      loop), for debugging and op-by-op reference results.
    donate: let XLA reuse the old state's buffers for the new state.
    shardings: optional `(state_sharding, batch_sharding)`; `steps` shards its stacked batches
      the same way along their second axis.

  Retracing: with `jit`, each set of input shapes and dtypes compiles once. A batch of other
  shapes than the last compiled one (e.g. a smaller final meta-batch) compiles again, with one
  `RecompileWarning` naming the arrays whose shapes changed, old and new; shapes seen before reuse
  their program. A second trace for shapes already compiled (the state's weak types or
  shardings changed: a recompile on every call) raises an AssertionError.
  """
  def scanned(state: MetaState, batches: Any) -> tuple[MetaState, dict[str, Array]]:
    return jax.lax.scan(step, state, batches)

  if jit:
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    stacked_kwargs = dict(kwargs)
    if shardings is not None:
      kwargs["in_shardings"] = shardings
      kwargs["out_shardings"] = (shardings[0], None)
      stacked_kwargs["in_shardings"] = (shardings[0], _stacked_sharding(shardings[1]))
      stacked_kwargs["out_shardings"] = (shardings[0], None)
    compiled = xla.jit(_trace_guard(step), **kwargs)
    compiled_steps = xla.jit(_trace_guard(scanned, stacked=True), **stacked_kwargs)
  else:
    compiled = step

    def compiled_steps(state, batches):
      n = _stack_length(batches)
      metrics = []
      for i in range(n):
        state, m = step(state, jax.tree.map(lambda x, i=i: x[i], batches))
        metrics.append(m)
      return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)

  @functools.wraps(step)  # keeps the step's name and module (which builder made it)
  def checked_step(state: MetaState, batch: Any) -> tuple[MetaState, dict[str, Array]]:
    if check is not None:
      check(state, batch)
    return compiled(state, batch)

  def checked_steps(state: MetaState, batches: Any) -> tuple[MetaState, dict[str, Array]]:
    if _stack_length(batches) == 0:
      raise ValueError("steps needs at least one stacked meta-batch (a leading axis of size >= 1)")
    if check is not None:
      # Shapes are what vary; the first meta-batch stands for the stack (labels are value-checked
      # on it once, as `step` does).
      check(state, jax.tree.map(lambda x: x[0], batches))
    return compiled_steps(state, batches)

  return MetaStep(init=init, step=checked_step, steps=checked_steps, update=step,
                  _jitted=(compiled, compiled_steps) if jit else (None, None))


def _stack_length(batches: Any) -> int:
  lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batches)}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(f"steps needs every array stacked along one leading axis of K meta-batches, "
                     f"got leading sizes {sorted(lengths, key=str)}")
  return lengths.pop()


def _stacked_sharding(sharding: Any) -> Any:
  """The sharding of K stacked batches: `sharding` shifted one axis right (K is not sharded)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
  raise TypeError(f"steps can stack only NamedSharding batch shardings, got {sharding!r}")


class RecompileWarning(UserWarning):
  """A compiled meta-step was given inputs of new shapes or dtypes and compiles again."""


def _signature(args: tuple[Any, ...]) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
  """The tree structure and each leaf's `(shape, dtype)` by name (`state...`, `batch...`), of
  the args `(state, batch)` of a traced step."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
  names = ("state", "batch")
  return treedef, {
    (names[path[0].idx] if path[0].idx < 2 else f"arg{path[0].idx}")
    + jax.tree_util.keystr(path[1:]): (tuple(jnp.shape(x)), str(jnp.result_type(x)))
    for path, x in leaves}


def _describe_change(old: Any, new: Any) -> str:
  """The leaves whose shape or dtype differ, as `name (old) -> (new)`."""
  (old_tree, old_leaves), (new_tree, new_leaves) = old, new
  if old_tree != new_tree:
    return f"the inputs' structure changed from {old_tree} to {new_tree}"
  changed = [f"{name} {_shape_text(old_leaves[name])} -> {_shape_text(leaf)}"
             for name, leaf in new_leaves.items() if leaf != old_leaves[name]]
  return ", ".join(changed)


def _shape_text(leaf: tuple[tuple[int, ...], str]) -> str:
  shape, dtype = leaf
  return f"{shape} {dtype}"


def _trace_guard(fn: Callable, *, stacked: bool = False) -> Callable:
  """Traces `fn` once per input signature (shapes, dtypes): a new one warns
  (`RecompileWarning`, naming both shapes), a repeated one raises an AssertionError (a retrace
  per call would mean a recompile per step). `stacked`: K stacked meta-batches, for which a new K
  alone (the same meta-batch shapes) compiles without a warning. (chex.assert_max_traces counts
  per code object, i.e. across every meta-step ever built.)"""
  seen: list = []

  @functools.wraps(fn)
  def wrapped(*args):
    signature = _signature(args)
    if signature in seen:
      raise AssertionError(f"{fn.__name__} was traced twice for the same input shapes and dtypes "
                           f"(traced {len(seen) + 1} times): the state's weak types or shardings "
                           "changed between calls")
    if seen:
      last = seen[-1]
      per_batch = (lambda sig: (sig[0], {k: (v[0][1:], v[1]) for k, v in sig[1].items()}))
      if not (stacked and per_batch(last) == per_batch(signature)):
        warnings.warn(f"{fn.__name__} compiles again for inputs of new shapes: "
                      f"{_describe_change(last, signature)} (each shape compiles once; keep "
                      "the batch shapes fixed to compile only once)", RecompileWarning,
                      stacklevel=2)
    seen.append(signature)
    return fn(*args)

  wrapped.num_traces = lambda: len(seen)
  return wrapped


# ---------------------------------------------------------------------------------------- checks
# One set of checks for every public entry point (`meta_loss`, the meta-steps, `evaluate`,
# `MAML.adapt`): they run on shapes and dtypes, which are known before (and while) anything is
# traced, and on label values only when those are concrete (never a tracer, so never a sync
# inside a compiled program).

# Losses of integer class labels: float targets given to them are a mistake, not a regression.
INTEGER_LABEL_LOSSES: tuple[Callable[..., Any], ...] = (losses_lib.cross_entropy,
                                                        losses_lib.mse_onehot)


def check_inputs(learner: Learner, meta_params: MetaParams, tasks: Task, *, batched: bool = True,
                 values: bool = True) -> None:
  """The checks of every entry point: `check_tasks`, `check_targets`, then `check_labels`.

  Args:
    learner: the learner the tasks are for (its loss and, for the label range, its model).
    meta_params: what the learner is given (the label range is the model's number of outputs).
    tasks: a `Task`, with a leading task axis when `batched`.
    batched: whether `tasks` is a meta-batch.
    values: also check label values (skipped for traced labels, whose values are unknown).

  Raises:
    TypeError: not a `Task`; targets of mixed kinds; float targets for an integer-label loss.
    ValueError: inconsistent shapes; labels outside `[0, num_outputs)`.
  """
  check_tasks(tasks, batched=batched)
  check_targets(learner, {"support_y": tasks.support_y, "query_y": tasks.query_y})
  if values:
    check_labels(learner, meta_params, tasks, batched=batched)


def check_support(learner: Learner, meta_params: MetaParams, x: Any, y: Any) -> None:
  """`check_inputs` for one task's support set `(x, y)`, as `learner.adapt` takes it."""
  inner_lib.check_examples({"x": x, "y": y})
  check_targets(learner, {"y": y})
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # an array (the model's inputs need not be)
    _check_label_values(learner, meta_params, tuple(x.shape[1:]), x.dtype, {"y": y})


def check_tasks(tasks: Task, *, batched: bool) -> None:
  """Raises a ValueError if the arrays of a task (or a batch of tasks) are inconsistent."""
  if not isinstance(tasks, Task):
    raise TypeError(f"expected a metajax.Task, got {type(tasks).__name__}")
  sx, sy, qx, qy = (jnp.shape(a) for a in tasks)
  lead = 1 if batched else 0
  if batched:
    sizes = {name: s[0] if s else None for name, s in zip(Task._fields, (sx, sy, qx, qy))}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"every field of a batch of tasks needs the same leading task axis, got "
                       f"{sizes}")
  if sx[lead + 1:] != qx[lead + 1:]:
    raise ValueError(f"support and query inputs must have the same example shape, got support_x "
                     f"{sx} and query_x {qx}")
  if sx[:lead + 1] != sy[:lead + 1] or qx[:lead + 1] != qy[:lead + 1]:
    raise ValueError(f"inputs and targets disagree on the number of examples: support_x {sx} vs "
                     f"support_y {sy}, query_x {qx} vs query_y {qy}")
  if sy[lead + 1:] != qy[lead + 1:]:
    raise ValueError(f"support and query targets must have the same per-example shape, got "
                     f"support_y {sy} and query_y {qy}")


def check_targets(learner: Learner, targets: dict[str, Any]) -> None:
  """Raises a TypeError for targets of mixed kinds (integer labels and float targets), or float
  targets given to a loss of integer labels (`INTEGER_LABEL_LOSSES`)."""
  dtypes = {name: jnp.result_type(y) for name, y in targets.items()}
  kinds = {name: bool(jnp.issubdtype(d, jnp.integer)) for name, d in dtypes.items()}
  if len(set(kinds.values())) > 1:
    listed = ", ".join(f"{name} {d}" for name, d in dtypes.items())
    raise TypeError(f"targets must all be integer class labels (classification) or all float "
                    f"targets (regression), got {listed}")
  loss = getattr(learner, "loss", None)
  if any(loss is known for known in INTEGER_LABEL_LOSSES) and not any(kinds.values()):
    listed = ", ".join(f"{name} {d}" for name, d in dtypes.items())
    raise TypeError(f"the loss {loss.__name__} takes integer class labels in [0, ways), got "
                    f"{listed} (cast them with .astype(jnp.int32))")


def check_labels(learner: Learner, meta_params: MetaParams, tasks: Task, *,
                 batched: bool = True) -> None:
  """For integer labels, checks they lie in `[0, num_outputs)` of the model (a host sync;
  labels being traced are not checked)."""
  x_shape = jnp.shape(tasks.query_x)[1 + int(batched):]
  _check_label_values(learner, meta_params, x_shape, jnp.result_type(tasks.query_x),
                      {"support_y": tasks.support_y, "query_y": tasks.query_y})


def _local_values(y: Any) -> np.ndarray:
  """`y` on the host; of an array spread over several processes, this process's shards (each
  process checks the rows it fed)."""
  if isinstance(y, jax.Array) and not y.is_fully_addressable:
    return np.concatenate([np.asarray(s.data).ravel() for s in y.addressable_shards])
  return np.asarray(y)


def num_outputs(learner: Learner, meta_params: MetaParams, x_shape: tuple[int, ...],
                x_dtype: Any) -> int:
  """The width of the learner's outputs (the number of classes, `ways`) for examples of shape
  `x_shape`, from shapes alone: nothing is computed and the meta-params may be tracers."""
  # On two dummy examples: BatchNorm with batch statistics needs a batch.
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "dtype") else a, meta_params)
  x2 = jax.ShapeDtypeStruct((2, *x_shape), x_dtype)
  outputs = jax.eval_shape(lambda p, x: learner.apply_fn(learner.model_params(p), x),
                           abstract, x2)
  return int(outputs.shape[-1])


BAD_LABELS = "inputs/bad_labels"


def count_bad_labels(learner: Learner, meta_params: MetaParams, tasks: Task, *,
                     batched: bool = True) -> Array:
  """The number of support and query labels outside `[0, num_outputs)`, on the device.

  The value check of every batch that costs no host sync: jit-safe (the labels may be traced),
  a scalar the caller fetches with the other metrics (`make_meta_step` reports it as
  `BAD_LABELS`); `check_labels` is the host-side check that raises.

  Args:
    learner: the learner, whose model's output width (`num_outputs`) is the number of classes.
    meta_params: what the learner is given.
    tasks: a `Task` of integer labels, with a leading task axis when `batched`.

  Returns:
    An int32 scalar, 0 for a valid batch.
  """
  x_shape = jnp.shape(tasks.query_x)[1 + int(batched):]
  ways = num_outputs(learner, meta_params, x_shape, jnp.result_type(tasks.query_x))
  return sum(jnp.sum((y < 0) | (y >= ways), dtype=jnp.int32)
             for y in (tasks.support_y, tasks.query_y))


def bad_label_metrics(learner: Learner, meta_params: MetaParams, tasks: Any) -> dict[str, Array]:
  """`{BAD_LABELS: count_bad_labels(...)}` for a meta-batch of integer labels; `{}` otherwise
  (regression targets, or a batch that is not a `Task`)."""
  if not (isinstance(tasks, Task) and is_classification(tasks.support_y)):
    return {}
  return {BAD_LABELS: count_bad_labels(learner, meta_params, tasks, batched=True)}


def _check_label_values(learner: Learner, meta_params: MetaParams, x_shape: tuple[int, ...],
                        x_dtype: Any, labels: dict[str, Any]) -> None:
  labels = {name: y for name, y in labels.items()
            if is_classification(y) and not isinstance(y, jax.core.Tracer)}
  if not labels:
    return
  num_classes = num_outputs(learner, meta_params, x_shape, x_dtype)
  for name, y in labels.items():
    y = _local_values(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f"{name} has labels in [{y.min()}, {y.max()}], outside [0, "
                       f"{num_classes}) for a model with {num_classes} outputs")
