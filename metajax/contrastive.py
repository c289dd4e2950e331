"""Contrastive and metric-learning losses on embeddings, as pure functions.

Every loss returns a scalar mean over its anchors. Shapes: B is the batch size, D the embedding
width. Cosine similarities clip squared norms below at `epsilon` (default: the dtype's machine
epsilon), exactly like `optax.losses.cosine_similarity`, so that a zero embedding gives similarity
0 instead of NaN.

- `info_nce`: NT-Xent of SimCLR on two views (each example's other view is its only positive).
- `supcon`: the supervised contrastive loss of Khosla et al. (several positives per anchor).
- `clip_loss`: CLIP's symmetric cross-entropy between two towers (image i's positive is text i).
- `triplet`, `batch_hard_triplet`: margin losses on Euclidean distances.

How they relate: `info_nce(v1, v2) == supcon(concat(v1, v2), concat(arange(B), arange(B)))`, and
both equal `optax.losses.ntxent(concat(v1, v2), labels)` for those labels. With several positives
per anchor supcon and optax's ntxent differ: optax averages over (anchor, positive) pairs and
leaves the other positives out of each denominator, while supcon (L_out of Khosla et al.) averages
the positives of each anchor, keeps every other example in the denominator, then averages anchors.
`clip_loss` differs from `info_nce` in its candidates: only the other tower's B embeddings, never
the same tower's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metajax.types import Array, ArrayLike


def _unit(x: Array, epsilon: float | None) -> Array:
  eps = jnp.finfo(x.dtype).eps if epsilon is None else epsilon
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _check_2d(name: str, x: Array) -> None:
  if x.ndim != 2:
    raise ValueError(f"{name} must have shape [batch, dim], got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _check_temperature(temperature: ArrayLike) -> None:
  # Only concrete Python numbers can be checked before tracing; arrays may be traced.
  if isinstance(temperature, str) or (isinstance(temperature, (int, float))
                                      and not temperature > 0):
    raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _anchor_log_softmax(logits: Array) -> Array:
  """Row-wise log-softmax over every column but the diagonal (an anchor is not its own
  candidate). The diagonal of the result is meaningless: mask it out. `[B, B] -> [B, B]`."""
  b = logits.shape[0]
  self_mask = jnp.eye(b, dtype=bool)
  masked = jnp.where(self_mask, -jnp.inf, logits)
  lse = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
  return logits - lse


def supcon(
  embeddings: ArrayLike,
  labels: ArrayLike,
  *,
  temperature: ArrayLike = 0.1,
  epsilon: float | None = None,
) -> Array:
  """Supervised contrastive loss (Khosla et al. 2020, L_out), on cosine similarities.

  For anchor i with positives P(i) = {p != i : y_p = y_i} and candidates A(i) = {a != i}:

      loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T) )

  with z the L2-normalised embeddings; the loss is the mean of loss_i over the anchors that have
  at least one positive (0 if none has). Several views of an example go in as separate rows with
  the same label. Khosla et al.'s code also multiplies by T / base_T; we do not.

  Args:
    embeddings: `[B, D]` floating point.
    labels: `[B]` integer class (or example) ids.
    temperature: T > 0.
    epsilon: norm clipping, see the module docstring.

  Returns:
    Scalar.

  References:
    P. Khosla et al., Supervised Contrastive Learning, NeurIPS 2020, arXiv 2004.11362.
  """
  z = jnp.asarray(embeddings)
  labels = jnp.asarray(labels)
  _check_2d("embeddings", z)
  if labels.shape != z.shape[:1]:
    raise ValueError(f"labels must have shape [{z.shape[0]}], got {labels.shape}")
  z = _unit(z, epsilon)
  _check_temperature(temperature)
  logits = z @ z.T / temperature  # BD,DB->BB
  log_prob = _anchor_log_softmax(logits)  # BB
  positives = (labels[:, None] == labels[None, :]) & ~jnp.eye(z.shape[0], dtype=bool)  # BB
  num_pos = jnp.sum(positives, axis=-1)  # B
  per_anchor = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1) / jnp.maximum(num_pos, 1)
  has_pos = num_pos > 0
  return jnp.sum(jnp.where(has_pos, per_anchor, 0.0)) / jnp.maximum(jnp.sum(has_pos), 1)


def info_nce(
  view1: ArrayLike,
  view2: ArrayLike,
  *,
  temperature: ArrayLike = 0.1,
  epsilon: float | None = None,
) -> Array:
  """NT-Xent / InfoNCE of SimCLR on two views of a batch.

  The 2B embeddings z = concat(view1, view2) are L2-normalised; the anchor z_k's positive is the
  other view of the same example, its candidates are the 2B - 1 other embeddings:

      loss = 1/(2B) sum_k -log( exp(z_k.z_pos(k) / T) / sum_{a != k} exp(z_k.z_a / T) ).

  Symmetric in the two views and invariant to permuting the batch (both views alike).

  Args:
    view1: `[B, D]` embeddings of the first view.
    view2: `[B, D]` embeddings of the second view (row i is the same example as view1's row i).
    temperature: T > 0.
    epsilon: norm clipping, see the module docstring.

  Returns:
    Scalar.

  References:
    T. Chen et al., A Simple Framework for Contrastive Learning of Visual Representations (SimCLR),
    ICML 2020, arXiv 2002.05709; A. van den Oord et al., Representation Learning with Contrastive
    Predictive Coding (InfoNCE), arXiv 1807.03748.
  """
  v1, v2 = jnp.asarray(view1), jnp.asarray(view2)
  _check_2d("view1", v1)
  _check_2d("view2", v2)
  if v1.shape != v2.shape:
    raise ValueError(f"the two views must have the same shape, got {v1.shape} and {v2.shape}")
  b = v1.shape[0]
  z = _unit(jnp.concatenate([v1, v2]), epsilon)  # (2B)D
  _check_temperature(temperature)
  logits = z @ z.T / temperature  # (2B)D,D(2B)->(2B)(2B)
  log_prob = _anchor_log_softmax(logits)
  partner = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])  # the other view of row k
  return -jnp.mean(jnp.take_along_axis(log_prob, partner[:, None], axis=-1))


def clip_loss(
  image_emb: ArrayLike,
  text_emb: ArrayLike,
  temperature: ArrayLike = 0.07,
  *,
  epsilon: float | None = None,
) -> Array:
  """CLIP's symmetric contrastive loss between two towers (Radford et al. 2021, figure 3).

  With I and T the L2-normalised image and text embeddings, the logits are the scaled cosine
  similarities `L = I T^T / temperature` (`[B, B]`, row i an image, column j a text), and the
  pairs on the diagonal are the positives:

      loss = ( CE(L, arange(B)) + CE(L^T, arange(B)) ) / 2

  with CE the mean cross-entropy of each row against its label: image-to-text over the rows,
  text-to-image over the columns. Symmetric in the two towers and invariant to permuting the
  pairs.

  The temperature may be a traced array, so that it is learned: CLIP learns `log(1 /
  temperature)` (initialised at `log(1 / 0.07)`, clipped so that `1 / temperature <= 100`); pass
  `temperature=jnp.exp(-log_scale)`.

  Args:
    image_emb: `[B, D]` embeddings of the first tower (the images).
    text_emb: `[B, D]` embeddings of the second tower (row i pairs with image_emb's row i).
    temperature: T > 0 (a Python number is checked; an array is taken as given).
    epsilon: norm clipping, see the module docstring.

  Returns:
    Scalar.

  References:
    A. Radford et al., Learning Transferable Visual Models From Natural Language Supervision,
    ICML 2021, arXiv 2103.00020.
  """
  images, texts = jnp.asarray(image_emb), jnp.asarray(text_emb)
  _check_2d("image_emb", images)
  _check_2d("text_emb", texts)
  if images.shape != texts.shape:
    raise ValueError(f"image_emb and text_emb must have the same shape, got {images.shape} and "
                     f"{texts.shape}")
  _check_temperature(temperature)
  logits = _unit(images, epsilon) @ _unit(texts, epsilon).T / temperature  # BD,DB->BB
  image_to_text = jnp.diagonal(jax.nn.log_softmax(logits, axis=1))  # B: row i, column i
  text_to_image = jnp.diagonal(jax.nn.log_softmax(logits, axis=0))  # B: column i, row i
  return -(jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def _safe_sqrt(x: Array) -> Array:
  """sqrt with a zero (sub)gradient at 0 instead of an infinite one."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def triplet(
  anchors: ArrayLike,
  positives: ArrayLike,
  negatives: ArrayLike,
  *,
  margin: ArrayLike = 1.0,
  squared: bool = False,
) -> Array:
  """Triplet margin loss: `mean_i max(d(a_i, p_i) - d(a_i, n_i) + margin, 0)`.

  d is the Euclidean distance (its square with `squared=True`). Unlike
  `optax.losses.triplet_margin_loss` there is no epsilon inside the root (the gradient of the
  distance at 0 is taken to be 0) and the result is the batch mean, not per example.

  Args:
    anchors: `[B, D]`.
    positives: `[B, D]`, same class as the anchors.
    negatives: `[B, D]`, another class.
    margin: how much closer than the negative the positive must be for a zero loss.
    squared: use squared distances.

  Returns:
    Scalar.

  References:
    F. Schroff et al., FaceNet, CVPR 2015, arXiv 1503.03832.
  """
  a, p, n = (jnp.asarray(x) for x in (anchors, positives, negatives))
  for name, x in (("anchors", a), ("positives", p), ("negatives", n)):
    _check_2d(name, x)
  if not a.shape == p.shape == n.shape:
    raise ValueError(f"anchors, positives and negatives must have the same shape, got {a.shape}, "
                     f"{p.shape} and {n.shape}")
  d_pos = jnp.sum(jnp.square(a - p), axis=-1)  # B
  d_neg = jnp.sum(jnp.square(a - n), axis=-1)  # B
  if not squared:
    d_pos, d_neg = _safe_sqrt(d_pos), _safe_sqrt(d_neg)
  return jnp.mean(jax.nn.relu(d_pos - d_neg + margin))


def pairwise_distances(embeddings: ArrayLike, *, squared: bool = False) -> Array:
  """Euclidean distance matrix `[B, D] -> [B, B]`, with an exact 0 diagonal.

  Computed as |x|^2 + |y|^2 - 2 x.y (one matmul), clipped at 0 against round-off.
  """
  x = jnp.asarray(embeddings)
  sq = jnp.sum(x * x, axis=-1)  # B
  d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)  # BD,DB->BB
  d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, jnp.maximum(d2, 0.0))
  return d2 if squared else _safe_sqrt(d2)


def batch_hard_triplet(
  embeddings: ArrayLike,
  labels: ArrayLike,
  *,
  margin: ArrayLike = 1.0,
  squared: bool = False,
) -> Array:
  """Batch-hard triplet loss (Hermans et al. 2017): the hardest positive and negative per anchor.

      loss = mean_i max( max_{p != i, y_p = y_i} d(i, p) - min_{n : y_n != y_i} d(i, n) + margin, 0)

  over the anchors that have at least one positive and one negative (0 if there is none).

  Args:
    embeddings: `[B, D]`.
    labels: `[B]` integer class ids.
    margin: the margin.
    squared: use squared Euclidean distances.

  Returns:
    Scalar.

  References:
    A. Hermans, L. Beyer, B. Leibe, In Defense of the Triplet Loss for Person Re-Identification,
    arXiv 1703.07737.
  """
  x = jnp.asarray(embeddings)
  labels = jnp.asarray(labels)
  _check_2d("embeddings", x)
  if labels.shape != x.shape[:1]:
    raise ValueError(f"labels must have shape [{x.shape[0]}], got {labels.shape}")
  d = pairwise_distances(x, squared=squared)  # BB
  same = labels[:, None] == labels[None, :]
  pos_mask = same & ~jnp.eye(x.shape[0], dtype=bool)
  neg_mask = ~same
  hardest_pos = jnp.max(jnp.where(pos_mask, d, -jnp.inf), axis=-1)  # B
  hardest_neg = jnp.min(jnp.where(neg_mask, d, jnp.inf), axis=-1)  # B
  valid = jnp.any(pos_mask, axis=-1) & jnp.any(neg_mask, axis=-1)
  per_anchor = jax.nn.relu(jnp.where(valid, hardest_pos - hardest_neg, 0.0) + margin)
  return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
