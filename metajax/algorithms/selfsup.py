"""Self-supervised objectives beside SimCLR and SupCon: MoCo v2, BYOL, Barlow Twins and SwAV.

Pure functions on embeddings and on the small pieces of state these methods carry (a momentum
target, a queue of negatives, prototypes); training state is always passed in and returned, never
held. Shapes: B is the batch size, D the embedding width, K the queue length or the number of
prototypes. `*_1` / `*_2` are the two augmented views of the same B images (row i of one view is
the same image as row i of the other).

- Momentum targets (BYOL, MoCo): `ema_update` (target <- m target + (1 - m) online) and BYOL's
  cosine schedule of m, `byol_momentum`.
- BYOL: `byol_regression` (2 - 2 cos(p, z'), the target without gradient) and its symmetrised
  `byol_loss`.
- MoCo v2: `Queue`, `init_queue`, `enqueue` (a FIFO ring buffer of the momentum encoder's keys)
  and `moco_loss` (InfoNCE of each query against its key and the queue).
- Barlow Twins: `cross_correlation` of the batch-normalised views and `barlow_twins_loss`.
- SwAV: `sinkhorn` (equipartitioned codes, a fixed number of Sinkhorn-Knopp iterations),
  `swav_loss` (swapped prediction; `swav_multicrop_loss` with small crops), `normalize_prototypes`
  and `freeze_prototypes`.

Cosine similarities clip squared norms below at `epsilon` (default: the dtype's machine epsilon),
as `metajax.contrastive` does, so that a zero embedding gives similarity 0 instead of NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metajax.contrastive import _check_2d, _check_temperature, _unit
from metajax.types import Array, ArrayLike, PRNGKey, PyTree

BYOL_BASE_MOMENTUM = 0.996  # Grill et al. 2020, section 3.2
MOCO_MOMENTUM = 0.999  # He et al. 2020, section 3.2
MOCO_TEMPERATURE = 0.2  # Chen et al. 2020 (MoCo v2)
BARLOW_TWINS_LAMBDA = 5e-3  # Zbontar et al. 2021, section 2 (lambda)
BARLOW_TWINS_EPSILON = 1e-5  # the batch norm (without affine) of the official code
SWAV_TEMPERATURE = 0.1  # Caron et al. 2020, section 4 (tau)
SWAV_EPSILON = 0.05  # Caron et al. 2020, section 3.1 (the entropy weight of the codes)
SWAV_SINKHORN_ITERATIONS = 3  # Caron et al. 2020, section 3.1


def _check_same_2d(name1: str, x1: Array, name2: str, x2: Array) -> None:
  _check_2d(name1, x1)
  _check_2d(name2, x2)
  if x1.shape != x2.shape:
    raise ValueError(f"{name1} and {name2} must have the same shape, got {x1.shape} and "
                     f"{x2.shape}")


def _check_fraction(name: str, value: ArrayLike) -> None:
  # Only concrete Python numbers can be checked before tracing, as for temperatures.
  if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return value


# ------------------------------------------------------------------------ momentum targets

def ema_update(target: PyTree, online: PyTree, momentum: ArrayLike) -> PyTree:
  """The momentum (EMA) update of a target network: `m * target + (1 - m) * online`, per leaf.

  BYOL's target and MoCo's key encoder follow the online network this way after each optimiser
  step (m = `byol_momentum(step, ...)` for BYOL, `MOCO_MOMENTUM` for MoCo). The same as
  `optax.incremental_update(online, target, 1 - m)`. Gradients never flow into the result from
  `online` (the target is not trained by backpropagation).

  Args:
    target: the target params.
    online: the online params, a pytree of the same structure.
    momentum: m in [0, 1]; 1 keeps the target, 0 copies the online params.

  Returns:
    The new target params (the target's dtypes).
  """
  _check_fraction("momentum", momentum)
  online = jax.lax.stop_gradient(online)
  return jax.tree.map(
    lambda t, o: (momentum * t + (1 - momentum) * o).astype(jnp.result_type(t)), target, online)


def byol_momentum(step: ArrayLike, total_steps: int, *,
                  base: float = BYOL_BASE_MOMENTUM) -> Array:
  """BYOL's target momentum at `step`: `1 - (1 - base) (cos(pi k / K) + 1) / 2`.

  It rises from `base` at k = 0 to 1 at k = K = `total_steps` (and stays 1 after), so the target
  moves less and less as training ends. A pure function of the step: jit-safe with a traced step.

  Args:
    step: k, the number of optimiser steps taken so far (int, maybe traced).
    total_steps: K > 0, the length of training.
    base: tau_base in [0, 1].

  Returns:
    Scalar float32.

  References:
    J.-B. Grill et al., Bootstrap Your Own Latent, NeurIPS 2020, arXiv 2006.07733, section 3.2.
  """
  total_steps = _check_positive_int("total_steps", total_steps)
  _check_fraction("base", base)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / total_steps
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


# ------------------------------------------------------------------------------------- BYOL

def byol_regression(prediction: ArrayLike, target: ArrayLike, *,
                    epsilon: float | None = None) -> Array:
  """BYOL's regression loss `mean_i |p_i/|p_i| - z_i/|z_i||^2 = mean_i (2 - 2 cos(p_i, z_i))`.

  The target is wrapped in `stop_gradient`: only the prediction (the online branch) is trained.

  Args:
    prediction: `[B, D]` the online predictor's outputs q(z) for one view.
    target: `[B, D]` the target projections z' of the other view.
    epsilon: norm clipping, see the module docstring.

  Returns:
    Scalar in [0, 4]; 0 when every prediction points the way of its target.
  """
  p, z = jnp.asarray(prediction), jnp.asarray(target)
  _check_same_2d("prediction", p, "target", z)
  z = jax.lax.stop_gradient(z)
  cosine = jnp.sum(_unit(p, epsilon) * _unit(z, epsilon), axis=-1)  # B
  return jnp.mean(2.0 - 2.0 * cosine)


def byol_loss(prediction_1: ArrayLike, prediction_2: ArrayLike, target_1: ArrayLike,
              target_2: ArrayLike, *, epsilon: float | None = None) -> Array:
  """BYOL's symmetrised loss: each view's prediction regresses the other view's target.

      loss = byol_regression(prediction_1, target_2) + byol_regression(prediction_2, target_1)

  Args:
    prediction_1, prediction_2: `[B, D]` online predictions q(g(f(v))) of views 1 and 2.
    target_1, target_2: `[B, D]` target projections g'(f'(v)) of views 1 and 2 (no gradient).
    epsilon: norm clipping, see the module docstring.

  Returns:
    Scalar in [0, 8].

  References:
    J.-B. Grill et al., Bootstrap Your Own Latent, NeurIPS 2020, arXiv 2006.07733, equation 2
    and the symmetrisation after it.
  """
  return (byol_regression(prediction_1, target_2, epsilon=epsilon)
          + byol_regression(prediction_2, target_1, epsilon=epsilon))


# ---------------------------------------------------------------------------------- MoCo v2

class Queue(NamedTuple):
  """MoCo's dictionary: a ring buffer of the last K keys (a fixed-size array and a pointer).

  Attributes:
    keys: `[K, D]` the stored keys; row `ptr` is the oldest, the next to be overwritten.
    ptr: int32 scalar in [0, K), where the next key goes.
  """

  keys: Array
  ptr: Array


def init_queue(key: PRNGKey, size: int, dim: int, *, dtype: jnp.dtype = jnp.float32) -> Queue:
  """A queue of `size` random unit keys (as MoCo's code starts it), the pointer at 0.

  Args:
    key: a PRNG key for the initial keys.
    size: K >= 1, the number of negatives.
    dim: D, the key width.
    dtype: of the keys.
  """
  size = _check_positive_int("size", size)
  dim = _check_positive_int("dim", dim)
  keys = _unit(jax.random.normal(key, (size, dim), dtype), None)
  return Queue(keys, jnp.zeros((), jnp.int32))


def enqueue(queue: Queue, keys: ArrayLike) -> Queue:
  """Pushes a batch of keys, first in first out: they overwrite the B oldest entries.

  Key j goes to row `(ptr + j) mod K`, wrapping around the end; the pointer moves to
  `(ptr + B) mod K`. Keys are stored as given (MoCo stores the normalised keys) and without
  gradient.

  Args:
    queue: the queue.
    keys: `[B, D]` with B <= K.

  Returns:
    The new queue.
  """
  keys = jax.lax.stop_gradient(jnp.asarray(keys))
  size, dim = queue.keys.shape
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f"keys must have shape [batch, {dim}], got {keys.shape}")
  if keys.shape[0] > size:
    raise ValueError(f"cannot enqueue {keys.shape[0]} keys into a queue of {size}")
  rows = (queue.ptr + jnp.arange(keys.shape[0], dtype=queue.ptr.dtype)) % size
  return Queue(queue.keys.at[rows].set(keys.astype(queue.keys.dtype)),
               (queue.ptr + keys.shape[0]) % size)


def moco_loss(queries: ArrayLike, keys: ArrayLike, queue_keys: ArrayLike, *,
              temperature: ArrayLike = MOCO_TEMPERATURE, epsilon: float | None = None) -> Array:
  """MoCo's InfoNCE: each query's positive is its own key, its negatives the queue.

  With q, k and the queue entries n_j L2-normalised:

      loss = mean_i -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.n_j / T)) )

  i.e. cross-entropy with label 0 over the logits `[q_i.k_i, q_i.n_1, ..., q_i.n_K] / T`. Keys
  and queue come from the momentum encoder and get no gradient.

  Args:
    queries: `[B, D]` the online encoder's embeddings of one view.
    keys: `[B, D]` the momentum encoder's embeddings of the other view.
    queue_keys: `[K, D]` the negatives (`Queue.keys`).
    temperature: T > 0 (MoCo v2: 0.2).
    epsilon: norm clipping, see the module docstring.

  Returns:
    Scalar.

  References:
    K. He et al., Momentum Contrast for Unsupervised Visual Representation Learning, CVPR 2020,
    arXiv 1911.05722, equation 1 and algorithm 1; X. Chen et al., Improved Baselines with
    Momentum Contrastive Learning (MoCo v2), arXiv 2003.04297.
  """
  q, k, n = jnp.asarray(queries), jnp.asarray(keys), jnp.asarray(queue_keys)
  _check_same_2d("queries", q, "keys", k)
  _check_2d("queue_keys", n)
  if n.shape[1] != q.shape[1]:
    raise ValueError(f"queue_keys must have shape [K, {q.shape[1]}], got {n.shape}")
  _check_temperature(temperature)
  q = _unit(q, epsilon)
  k, n = jax.lax.stop_gradient(_unit(k, epsilon)), jax.lax.stop_gradient(_unit(n, epsilon))
  positive = jnp.sum(q * k, axis=-1, keepdims=True)  # B1
  negatives = q @ n.T  # BD,DK->BK
  logits = jnp.concatenate([positive, negatives], axis=-1) / temperature  # B(1+K)
  return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


# ----------------------------------------------------------------------------- Barlow Twins

def cross_correlation(view_1: ArrayLike, view_2: ArrayLike, *,
                      epsilon: float = BARLOW_TWINS_EPSILON) -> Array:
  """Barlow Twins' cross-correlation matrix of two views, each normalised along the batch.

  Each dimension of each view is centred and divided by its batch standard deviation (the biased
  one, `sqrt(var + epsilon)`, as the batch norm without affine of the official code), then
  `C = z1^T z2 / B`: `C_ij` is the correlation of dimension i of view 1 with dimension j of view 2.

  Args:
    view_1, view_2: `[B, D]` embeddings of the two views.
    epsilon: added to the variance.

  Returns:
    `[D, D]`.
  """
  z1, z2 = jnp.asarray(view_1), jnp.asarray(view_2)
  _check_same_2d("view_1", z1, "view_2", z2)

  def standardise(z: Array) -> Array:
    centred = z - jnp.mean(z, axis=0)
    return centred / jnp.sqrt(jnp.mean(jnp.square(centred), axis=0) + epsilon)

  return standardise(z1).T @ standardise(z2) / z1.shape[0]  # DB,BD->DD


def barlow_twins_loss(view_1: ArrayLike, view_2: ArrayLike, *,
                      off_diagonal_weight: ArrayLike = BARLOW_TWINS_LAMBDA,
                      epsilon: float = BARLOW_TWINS_EPSILON) -> Array:
  """Barlow Twins: drive the cross-correlation of the two views to the identity.

      loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2

  with C = `cross_correlation(view_1, view_2)`: the on-diagonal (invariance) term makes each
  dimension agree across views, the off-diagonal (redundancy reduction) term decorrelates the
  dimensions. Symmetric in the two views, invariant to permuting the batch (both views alike) and
  to a positive affine change of any dimension; 0 at a perfect identity correlation (with
  epsilon = 0).

  Args:
    view_1, view_2: `[B, D]` projector outputs of the two views (B >= 2).
    off_diagonal_weight: lambda >= 0 (the paper's 5e-3).
    epsilon: added to the variance in the batch normalisation.

  Returns:
    Scalar.

  References:
    J. Zbontar et al., Barlow Twins: Self-Supervised Learning via Redundancy Reduction, ICML 2021,
    arXiv 2103.03230, equations 1-2 and algorithm 1.
  """
  c = cross_correlation(view_1, view_2, epsilon=epsilon)  # DD
  diagonal = jnp.eye(c.shape[0], dtype=bool)
  on_diagonal = jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
  off_diagonal = jnp.sum(jnp.where(diagonal, 0.0, jnp.square(c)))
  return on_diagonal + off_diagonal_weight * off_diagonal


# ------------------------------------------------------------------------------------- SwAV

def sinkhorn(scores: ArrayLike, *, epsilon: float = SWAV_EPSILON,
             num_iters: int = SWAV_SINKHORN_ITERATIONS) -> Array:
  """SwAV's codes: soft assignments of B samples to K prototypes that use every prototype equally.

  Solves max_Q Tr(Q^T S) + epsilon H(Q) over the transportation polytope (rows of the `[B, K]`
  plan summing to 1/B, columns to 1/K) approximately, by `num_iters` Sinkhorn-Knopp iterations
  from exp(S / epsilon): each iteration rescales the columns to 1/K, then the rows to 1/B. The
  plan is returned times B, so each row (a sample's code) sums to 1 exactly and each column to
  about B/K (exactly in the limit of many iterations). Computed in the log domain (the same
  result as the paper's code without overflow at small epsilon), and without gradient.

  Args:
    scores: `[B, K]` similarities of the samples to the prototypes (cosines in SwAV).
    epsilon: > 0, the entropic regularisation (smaller: harder codes).
    num_iters: >= 0 Sinkhorn-Knopp iterations (the paper: 3).

  Returns:
    `[B, K]` codes, non-negative, rows summing to 1.

  References:
    M. Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster Assignments,
    NeurIPS 2020, arXiv 2006.09882, section 3.1 and algorithm 1; M. Cuturi, Sinkhorn Distances,
    NeurIPS 2013.
  """
  s = jax.lax.stop_gradient(jnp.asarray(scores))
  _check_2d("scores", s)
  if isinstance(epsilon, (int, float)) and not epsilon > 0:
    raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}")
  num_iters = _check_positive_int("num_iters", num_iters, 0)
  b, k = s.shape
  log_q = s / epsilon
  log_q = log_q - jax.nn.logsumexp(log_q)  # a distribution over all (sample, prototype) pairs

  def iteration(_, log_q: Array) -> Array:
    log_q = log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True) - math.log(k)  # columns: 1/K
    return log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - math.log(b)  # rows: 1/B

  log_q = jax.lax.fori_loop(0, num_iters, iteration, log_q)
  return jnp.exp(log_q + math.log(b))


def normalize_prototypes(prototypes: ArrayLike) -> Array:
  """The prototypes `[K, D]` projected back onto the unit sphere (each row L2-normalised).

  SwAV normalises its prototypes after every update, so that the scores are cosines; with
  `swav_loss` (which normalises them itself) this only keeps their norms from drifting.
  """
  c = jnp.asarray(prototypes)
  _check_2d("prototypes", c)
  return _unit(c, None)


def freeze_prototypes(prototype_grads: PyTree, step: ArrayLike, *, freeze_steps: int) -> PyTree:
  """Zeroes the prototypes' gradient during the first `freeze_steps` steps (SwAV's
  `freeze_prototypes_niters`: the prototypes stay fixed while the encoder learns to fit them).

  A pure function of the step, jit-safe with a traced step: the gradient of step k is zero for
  k < `freeze_steps`, unchanged from then on.

  Args:
    prototype_grads: the gradient of the prototypes (any pytree).
    step: k, the optimiser step (int, maybe traced).
    freeze_steps: >= 0 (the paper: the first epoch).

  Returns:
    The same structure.
  """
  freeze_steps = _check_positive_int("freeze_steps", freeze_steps, 0)
  frozen = jnp.asarray(step) < freeze_steps
  return jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g), prototype_grads)


def swav_loss(embeddings_1: ArrayLike, embeddings_2: ArrayLike, prototypes: ArrayLike, *,
              temperature: ArrayLike = SWAV_TEMPERATURE, epsilon: float = SWAV_EPSILON,
              num_iters: int = SWAV_SINKHORN_ITERATIONS,
              normalize_epsilon: float | None = None) -> Array:
  """SwAV's swapped prediction: each view predicts the other view's code from its own scores.

  With z the L2-normalised embeddings and c the L2-normalised prototypes, the scores are
  `S_t = z_t c^T` (`[B, K]`), the codes `q_t = sinkhorn(S_t)` (no gradient) and the predictions
  `p_t = softmax(S_t / T)`; then

      loss = ( CE(q_2, p_1) + CE(q_1, p_2) ) / 2,   CE(q, p) = -mean_i sum_k q_ik log p_ik.

  Args:
    embeddings_1, embeddings_2: `[B, D]` projector outputs of the two views.
    prototypes: `[K, D]` the prototype vectors (trainable; see `normalize_prototypes`,
      `freeze_prototypes`).
    temperature: T > 0 of the predictions (the paper: 0.1).
    epsilon: the codes' entropic regularisation (`sinkhorn`; the paper: 0.05).
    num_iters: Sinkhorn-Knopp iterations (the paper: 3).
    normalize_epsilon: norm clipping of embeddings and prototypes, see the module docstring.

  Returns:
    Scalar.

  References:
    M. Caron et al., Unsupervised Learning of Visual Features by Contrasting Cluster Assignments,
    NeurIPS 2020, arXiv 2006.09882, equations 1-2.
  """
  z1, z2, c = (jnp.asarray(x) for x in (embeddings_1, embeddings_2, prototypes))
  _check_same_2d("embeddings_1", z1, "embeddings_2", z2)
  _check_2d("prototypes", c)
  if c.shape[1] != z1.shape[1]:
    raise ValueError(f"prototypes must have shape [K, {z1.shape[1]}], got {c.shape}")
  _check_temperature(temperature)
  c = _unit(c, normalize_epsilon)
  s1 = _unit(z1, normalize_epsilon) @ c.T  # BD,DK->BK
  s2 = _unit(z2, normalize_epsilon) @ c.T  # BD,DK->BK
  q1 = sinkhorn(s1, epsilon=epsilon, num_iters=num_iters)
  q2 = sinkhorn(s2, epsilon=epsilon, num_iters=num_iters)

  def cross_entropy(q: Array, s: Array) -> Array:
    return -jnp.mean(jnp.sum(q * jax.nn.log_softmax(s / temperature, axis=-1), axis=-1))

  return (cross_entropy(q2, s1) + cross_entropy(q1, s2)) / 2


def swav_multicrop_loss(crops: ArrayLike, prototypes: ArrayLike, *, num_assigned: int = 2,
                        temperature: ArrayLike = SWAV_TEMPERATURE, epsilon: float = SWAV_EPSILON,
                        num_iters: int = SWAV_SINKHORN_ITERATIONS,
                        normalize_epsilon: float | None = None) -> Array:
  """SwAV's swapped prediction with multi-crop: the codes of the first `num_assigned` crops (the
  large ones) are predicted from every other crop.

      loss = 1/A sum_{a < A} 1/(V - 1) sum_{v != a} CE(q_a, p_v)

  with V crops, A = `num_assigned`, `q_a = sinkhorn(z_a c^T)` (no gradient) and
  `p_v = softmax(z_v c^T / T)` on L2-normalised z and c, as the paper's code. With two crops
  (A = V = 2) it is `swav_loss`.

  Args:
    crops: `[V, B, D]` projector outputs of V views of the same B images, the large crops first.
    prototypes: `[K, D]`.
    num_assigned: A in [1, V], the crops whose codes are targets (the paper: the 2 large ones).
    temperature, epsilon, num_iters, normalize_epsilon: as `swav_loss`.

  Returns:
    Scalar.

  References:
    M. Caron et al., arXiv 2006.09882, section 3.2 (multi-crop) and the official code's loss.
  """
  z, c = jnp.asarray(crops), jnp.asarray(prototypes)
  if z.ndim != 3 or z.shape[0] < 2:
    raise ValueError(f"crops must have shape [views >= 2, batch, dim], got {z.shape}")
  _check_2d("prototypes", c)
  if c.shape[1] != z.shape[2]:
    raise ValueError(f"prototypes must have shape [K, {z.shape[2]}], got {c.shape}")
  num_assigned = _check_positive_int("num_assigned", num_assigned)
  if num_assigned > z.shape[0]:
    raise ValueError(f"num_assigned={num_assigned} is more than the {z.shape[0]} crops")
  _check_temperature(temperature)
  c = _unit(c, normalize_epsilon)
  scores = _unit(z, normalize_epsilon) @ c.T  # VBD,DK->VBK
  log_p = jax.nn.log_softmax(scores / temperature, axis=-1)  # VBK
  views = z.shape[0]
  total = jnp.zeros((), log_p.dtype)
  for a in range(num_assigned):
    q = sinkhorn(scores[a], epsilon=epsilon, num_iters=num_iters)  # BK
    others = [v for v in range(views) if v != a]
    ce = -jnp.mean(jnp.sum(q[None] * log_p[jnp.array(others)], axis=-1), axis=-1)  # (V-1)
    total = total + jnp.mean(ce)
  return total / num_assigned


__all__ = [
  "BARLOW_TWINS_EPSILON",
  "BARLOW_TWINS_LAMBDA",
  "BYOL_BASE_MOMENTUM",
  "MOCO_MOMENTUM",
  "MOCO_TEMPERATURE",
  "Queue",
  "SWAV_EPSILON",
  "SWAV_SINKHORN_ITERATIONS",
  "SWAV_TEMPERATURE",
  "barlow_twins_loss",
  "byol_loss",
  "byol_momentum",
  "byol_regression",
  "cross_correlation",
  "ema_update",
  "enqueue",
  "freeze_prototypes",
  "init_queue",
  "moco_loss",
  "normalize_prototypes",
  "sinkhorn",
  "swav_loss",
  "swav_multicrop_loss",
]
