"""Matching Networks (Vinyals et al. 2016) as a learner with MAML's interface.

A query's prediction is an attention-weighted sum of the one-hot labels of the support set,
`P(y = c | x, S) = sum_i a(x, x_i) 1{y_i = c}`, the attention a softmax over the cosine
similarities of the query embedding to the support embeddings (divided by a temperature; the
paper's is 1). "Adapting" to a task means embedding its support set. `apply_fn` returns the
log-probabilities `log P(y | x, S)`, so the paper's loss is the usual cross-entropy and evaluation
works unchanged:

    model = metajax.conv4(num_classes=5)                   # its head is unused
    learner = MatchingNet(model.features, num_classes=5)
    meta_step = metajax.make_meta_step(learner, optax.adam(1e-3))

Full-context embeddings (the paper's FCE, `fce=FullContextEmbeddings(feature_dim)`) embed each
support example in the context of the whole support set with a bidirectional LSTM (g) and each
query by an LSTM that attends over the support embeddings for K processing steps (f); their
weights are meta-learned with the embedding. Without them, f = g = the embedding network.

As in `ProtoNet`, a learner built for N classes serves tasks with fewer ways: a class with no
support example has log-probability -inf (never predicted, zero gradient).

Reference: O. Vinyals, C. Blundell, T. Lillicrap, K. Kavukcuoglu, D. Wierstra, Matching Networks
for One Shot Learning, NeurIPS 2016, arXiv 1606.04080 (FCE: its Appendix A).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from metajax import losses as losses_lib
from metajax.algorithms.protonet import episode_task_loss
from metajax.types import ApplyFn, Array, ArrayLike, Params, PRNGKey, Task

MatchingParams = dict[str, Any]  # {"params": model params[, "fce": FCE params]}

# The initial FCE weights come from `fold_in(key(seed), INIT_STREAM)`: a stream of their own,
# never the root key itself (which the training loop splits into its init and train keys).
INIT_STREAM = 2

# Squared norms below this count as this: the cosine of a zero vector is 0, with finite gradients.
_MIN_SQUARED_NORM = 1e-16


def cosine_similarity(queries: ArrayLike, keys: ArrayLike) -> Array:
  """`[Q, D], [S, D] -> [Q, S]`: `<q, k> / (|q| |k|)` (0 where either vector is 0)."""
  def unit(v):
    v = jnp.asarray(v)
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True),
                                         _MIN_SQUARED_NORM))
  return unit(queries) @ unit(keys).T  # QD,DS->QS


def attention_log_probs(similarities: ArrayLike, labels: ArrayLike, num_classes: int, *,
                        temperature: float = 1.0) -> Array:
  """`log sum_i softmax_i(s / temperature) 1{labels_i = c}`: the log of the attention mass on
  each class, the Matching Network's `log P(y = c | x, S)`.

  Computed per class as a masked log-sum-exp, so it stays finite for a present class however
  sharp the temperature (a softmax followed by a log would underflow to log 0).

  Args:
    similarities: `[Q, S]` query-support similarities.
    labels: `[S]` integer support labels in `[0, num_classes)`.
    num_classes: N.
    temperature: the softmax's temperature (> 0; small is sharp).

  Returns:
    `[Q, N]` log-probabilities; -inf (with zero gradient) for a class without support examples.
  """
  s = jnp.asarray(similarities) / temperature
  member = jax.nn.one_hot(labels, num_classes, dtype=bool)  # SN
  masked = jnp.where(member[None], s[:, :, None], -jnp.inf)  # QSN
  peak = jax.lax.stop_gradient(jnp.max(masked, axis=1))  # QN
  present = jnp.any(member, axis=0)  # N
  safe_peak = jnp.where(present, peak, 0.0)
  mass = jnp.sum(jnp.where(member[None], jnp.exp(masked - safe_peak[:, None, :]), 0.0), axis=1)
  class_lse = jnp.where(present, jnp.log(jnp.where(present, mass, 1.0)) + safe_peak, -jnp.inf)
  return class_lse - jax.nn.logsumexp(class_lse, axis=-1, keepdims=True)


# ----------------------------------------------------------------------- full-context embeddings

def _lstm_init(key: PRNGKey, input_dim: int, recurrent_dim: int, hidden_dim: int,
               dtype: Any) -> Params:
  """An LSTM cell's weights: Glorot-uniform matrices, zero biases but 1 on the forget gate
  (so that the cell starts by keeping its state)."""
  kx, kh = jax.random.split(key)
  glorot = jax.nn.initializers.glorot_uniform()
  b = jnp.zeros((4, hidden_dim), dtype).at[1].set(1.0).reshape(-1)
  return {"w_x": glorot(kx, (input_dim, 4 * hidden_dim), dtype),
          "w_h": glorot(kh, (recurrent_dim, 4 * hidden_dim), dtype), "b": b}


def _lstm_cell(params: Params, x: Array, h: Array, c: Array) -> tuple[Array, Array]:
  """One LSTM step: `(x [..., Din], h [..., Dh], c [..., H]) -> (h' [..., H], c' [..., H])`,
  gates in the order input, forget, cell, output."""
  z = x @ params["w_x"] + h @ params["w_h"] + params["b"]
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


@dataclasses.dataclass(frozen=True)
class FullContextEmbeddings:
  """The full-context embeddings of Matching Networks (Vinyals et al., Appendix A).

  Support: `g(x_i, S) = g'(x_i) + h_fw_i + h_bw_i`, a bidirectional LSTM (hidden size D) run over
  the support embeddings in the order they come (the episode samplers order them by class), plus
  the skip connection. Queries, for k = 1..K, starting from `h_0 = c_0 = 0`:

      r_{k-1} = sum_i softmax_i(<h_{k-1}, g(x_i)>) g(x_i)
      h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
      h_k = h^_k + f'(x)

  and `f(x, S) = h_K`.

  Attributes:
    feature_dim: D, the width of the embedding network's output.
    num_processing_steps: K, the attention LSTM's steps (>= 1).
  """

  feature_dim: int
  num_processing_steps: int = 1

  def __post_init__(self):
    for name in ("feature_dim", "num_processing_steps"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")

  def init(self, key: PRNGKey, dtype: Any = jnp.float32) -> Params:
    """`{"support_fw", "support_bw", "query"}`: the three LSTM cells' weights."""
    d = self.feature_dim
    k_fw, k_bw, k_q = jax.random.split(key, 3)
    return {"support_fw": _lstm_init(k_fw, d, d, d, dtype),
            "support_bw": _lstm_init(k_bw, d, d, d, dtype),
            "query": _lstm_init(k_q, d, 2 * d, d, dtype)}

  def embed_support(self, params: Params, support: Array) -> Array:
    """`[S, D] -> [S, D]`: g, each support embedding in the context of the support sequence."""
    zeros = jnp.zeros(support.shape[-1:], support.dtype)

    def run(cell, reverse):
      def body(carry, x):
        h, c = _lstm_cell(cell, x, *carry)
        return (h, c), h
      return jax.lax.scan(body, (zeros, zeros), support, reverse=reverse)[1]

    return support + run(params["support_fw"], False) + run(params["support_bw"], True)

  def embed_queries(self, params: Params, queries: Array, support: Array) -> Array:
    """`[Q, D], [S, D] (g) -> [Q, D]`: f, each query after K steps of attention over g."""
    def body(carry, _):
      h, c = carry
      readout = jax.nn.softmax(h @ support.T, axis=-1) @ support  # QD,DS->QS; QS,SD->QD
      h_hat, c = _lstm_cell(params["query"], queries, jnp.concatenate([h, readout], -1), c)
      return (h_hat + queries, c), None

    zeros = jnp.zeros_like(queries)
    (h, _), _ = jax.lax.scan(body, (zeros, zeros), None, length=self.num_processing_steps)
    return h


# ----------------------------------------------------------------------------------- the learner

@dataclasses.dataclass(frozen=True)
class MatchingNet:
  """Matching Networks: attention over the support set's embeddings, trained episodically.

  The meta-params are `{"params": model params}`, plus `"fce"` (the LSTMs' weights) with
  full-context embeddings. The adapted params add the support embeddings `g(S)` `[S, D]` and
  labels `[S]`.

  Attributes:
    features: the embedding `(params, x) -> [B, D]`, e.g. `model.features` of `metajax.conv4`.
    num_classes: N, the most ways of any task it sees (outputs are `[Q, N]`).
    temperature: of the softmax over cosine similarities (> 0; the paper's is 1).
    fce: full-context embeddings, or None for the plain embedding (f = g = `features`).
    seed: seeds the initial FCE weights (see `INIT_STREAM`; the embedding's come with the
      model params).
    loss: `(log_probs, labels) -> scalar` on the query set (cross-entropy, as in the paper).
    params_transforms: functions applied, in order, to the model params before embedding (as in
      `MAML`, so that `metajax.with_zeroing` composes; zeroing the unused head changes nothing).
  """

  features: ApplyFn
  num_classes: int
  temperature: float = 1.0
  fce: FullContextEmbeddings | None = None
  seed: int = 0
  loss: Callable[[Array, Array], Array] = losses_lib.cross_entropy
  params_transforms: tuple[Callable[[Params], Params], ...] = ()

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

  def init(self, params: Params) -> MatchingParams:
    """Model params -> meta-params: `{"params": params}`, with FCE also `"fce"`."""
    if self.fce is None:
      return {"params": params}
    dtype = jnp.result_type(*jax.tree.leaves(params))
    key = jax.random.fold_in(jax.random.key(self.seed), INIT_STREAM)
    # Jitted: run eagerly, the initialisers compile one small XLA program per op.
    fce = jax.jit(self.fce.init, static_argnums=1)(key, dtype)
    return {"params": params, "fce": fce}

  def model_params(self, meta_params: MatchingParams) -> MatchingParams:
    """The "unadapted" predictor: no support set, so every class equally likely (chance).

    `evaluate_tasks`' "before adaptation" is then loss log(N) and the accuracy of always
    predicting class 0.
    """
    params = meta_params["params"]
    for transform in self.params_transforms:
      params = transform(params)
    return {**meta_params, "params": params}

  def embed_support(self, meta_params: MatchingParams, x: Array) -> Array:
    """`[S, ...] -> [S, D]`: g(x_i, S), the support embeddings the queries attend to."""
    start = self.model_params(meta_params)
    g = self.features(start["params"], x)
    return g if self.fce is None else self.fce.embed_support(start["fce"], g)

  def adapt(self, meta_params: MatchingParams, x: Array, y: Array, *,
            return_losses: bool = False) -> MatchingParams | tuple[MatchingParams, Array]:
    """Embeds one task's support set `(x, y)` (differentiably).

    With `return_losses`, also the support set's loss, `[1]`: each support example classified
    by attention over the support embeddings, itself included (no second forward pass).
    """
    g = self.embed_support(meta_params, x)
    adapted = {**self.model_params(meta_params), "support_embeddings": g, "support_labels": y}
    if not return_losses:
      return adapted
    support_log_probs = attention_log_probs(cosine_similarity(g, g), y, self.num_classes,
                                            temperature=self.temperature)
    return adapted, self.loss(support_log_probs, y)[None]

  def apply_fn(self, adapted: MatchingParams, x: Array) -> Array:
    """`[Q, N]` log-probabilities `log P(y | x, S)` of the queries `x` (all 0 - log N, i.e.
    uniform, for params without a support set, as from `model_params`)."""
    if "support_embeddings" not in adapted:
      dtype = jnp.result_type(*jax.tree.leaves(adapted["params"]))
      return jnp.full((x.shape[0], self.num_classes), -jnp.log(self.num_classes), dtype)
    g = adapted["support_embeddings"]
    f = self.features(adapted["params"], x)
    if self.fce is not None:
      f = self.fce.embed_queries(adapted["fce"], f, g)
    return attention_log_probs(cosine_similarity(f, g), adapted["support_labels"],
                               self.num_classes, temperature=self.temperature)

  def task_loss(self, meta_params: MatchingParams, task: Task) -> tuple[Array, dict[str, Array]]:
    """Query loss of one episode given its support set, and per-task metrics."""
    return episode_task_loss(self, meta_params, task)


__all__ = ["FullContextEmbeddings", "MatchingNet", "attention_log_probs", "cosine_similarity"]
