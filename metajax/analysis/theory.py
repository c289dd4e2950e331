"""MAML's encoder gradient as an explicit (noisy) supervised contrastive loss.

Kao, Chiu and Chen, "MAML is a Noisy Contrastive Learner in Classification" (ICLR 2022,
arXiv 2106.15367) show that, under ANIL (only the linear head adapts in the inner loop), the
meta-gradient that MAML sends to the encoder phi is the gradient of a loss that is linear in inner
products of features, with stop-gradient coefficients. This module computes that loss exactly, for
this library's conventions, so that

    jax.grad(contrastive_encoder_loss(model.features, params, tasks, ...))  (encoder part)
      == jax.grad(metajax.meta_loss(params, tasks, MAML(model.apply, loss, adapt_mask=head_mask,
                                                        num_inner_steps=..., inner_lr=...)))

to float64 round-off (tests/analysis/test_theory.py checks 1e-10 relative). The surrogates are functions of
the encoder only: the head is wrapped in `stop_gradient`, so their gradient wrt the head is 0.

Derivation (one task; rows are examples)
----------------------------------------
Support features `Fs = phi(S)` `[N, D]`, labels t, one-hot `Ys` `[N, C]`; query `Fq` `[M, D]`,
labels u, `Yq`. Head: kernel `W` `[D, C]` and bias `b` `[C]` (the bias is optional: a head dict
without "bias" is the paper's bias-free head). Outputs `Fs W + b`; predictions `p(.)` are the
outputs themselves for `mse_onehot` and their softmax for `cross_entropy`. For both losses, the
gradient of the *mean* loss wrt the outputs is `(p - onehot) / N`; that is all the derivation needs.

Inner loop (ANIL, K steps of size eta on the mean support loss), step k = 0..K-1:

    Rs_k = p(Fs W_k + b_k) - Ys                      # support residuals s_i - 1{i=t}   [N, C]
    W_{k+1} = W_k - eta/N Fs^T Rs_k,   b_{k+1} = b_k - eta mean_n Rs_k
    => W' = W - eta/N Fs^T A,  b' = b - eta mean_n A,  A = sum_k Rs_k.

Query loss `Lq = mean_m loss(Fq W' + b', u_m)`; query residuals `R' = p(Fq W' + b') - Yq`
(the paper's q_i - 1{i=u}, q = the prediction *after* adaptation). Then

    dLq = 1/M sum_m R'_m . (W'^T dphi(q_m))                                     [through phi(q)]
        + 1/M sum_m R'_m . (dW'^T phi(q_m) + db')                                 [through phi(s)]

and `W'^T phi(q_m) = W^T phi(q_m) - eta/N sum_n A_n phi(s_n)^T phi(q_m)`. Hence the loss seen by
the encoder, with c_mn = -R'_m . A_n and every `[.]` a stop-gradient:

    L = 1/M sum_m [R'_m W^T] phi(q_m)                                                 ("head")
      + eta/(N M) sum_{m,n} [c_mn] <phi(s_n), phi(q_m)>                     (contrastive + noise)
      - eta/N sum_n [J_n^T v_n]^T (W^T phi(s_n))          (second order only, K = 1: "support")

* First order (FOMAML): the inner gradients are constants, so W' is a constant of phi(s): the
  inner product is `<[phi(s_n)], phi(q_m)>` and there is no "support" term. This holds exactly for
  any number K of inner steps, with A = sum_k Rs_k (the residuals along the inner trajectory).
* Second order (K = 1): gradients also flow through phi(s). Through the explicit phi(s) factor of
  W' they give the symmetric `<phi(s_n), phi(q_m)>` (both sides differentiable); through the
  support predictions s = p(Fs W + b) they give the "support" term, with J_n the Jacobian of p at
  support output n (identity for MSE, softmax Jacobian for CE) and
  v_n = 1/M sum_m k_mn R'_m, k_mn = <phi(s_n), phi(q_m)> + 1 (the "+ 1" only with a bias: the
  bias acts as a constant feature of value 1 in the inner update). For K > 1 the adapted head is a
  polynomial of degree K in phi(s) and no expression of this shape is exact: not implemented.

The contrastive coefficient splits as (the paper's Theorem 1 for K = 1):

    c_mn = -sum_i (q_i - 1{i=u})(s_i - 1{i=t})   = (q_t - 1{t=u})  +  (s_u - sum_i q_i s_i)
           [paper: -sum_i q_i s_i + s_u + q_t - 1{t=u}]   "contrastive"   "coefficient noise"

and for K steps `c_mn = K (q_t - 1{t=u}) + sum_k (s^(k)_u - sum_i q_i s^(k)_i)`. We call

    contrastive = eta/(N M) sum [K (q'_{m,t_n} - 1{t_n=u_m})] <phi(s_n), phi(q_m)>
    noise       = head + coefficient noise + support        (total = contrastive + noise, exactly)

With the zeroing trick (W = 0 and b = 0 before the inner loop) and K = 1: the head and support
terms are proportional to W, so exactly 0; the coefficient noise is s_u - sum_i q_i s_i with
s = p(0): exactly 0 for MSE (s = 0) and (1 - sum_i q_i)/C = 0 up to round-off for CE (softmax
sums to 1). So L = eta E_{(s,t)~S} [q_t - 1{t=u}] <phi(s), phi(q)> (Corollary 1), for both the
first-order (phi(s) stopped) and the second-order (phi(s) differentiable) learner. With zeroing and
K > 1 the coefficient noise of the later steps is *not* 0 (s^(k) != 0 for k >= 1).

What differs from the paper's statement (the slides of Kao et al., NeurIPS 2021 workshop)
* Scale: our losses are means over examples (mse_onehot is mean_n 1/2 ||out - onehot||^2) and
  meta_loss is a mean over tasks, so the query sum becomes 1/M sum_m and E_S is 1/N sum_n; the
  paper writes one query. With these factors the gradients are *equal*, not just proportional.
* q_i is the prediction of the *adapted* head on the query (softmax for CE, raw output for MSE);
  s_i that of the initial head on the support.
* The bias: the paper's head has none. With a bias, phi(s)^T phi(q) becomes phi(s)^T phi(q) + 1
  inside the adapted predictions; the "+1" is a constant, so it only enters the coefficients
  (q', and k_mn of the support term). Both bias-free and biased heads are handled exactly.
* Second order: the slides give the first-order expression with gradients also through phi(s).
  The exact second-order gradient has one more term, through the support predictions s(phi(s))
  ("support" above); it is proportional to W, so it vanishes with zeroing (Corollary 1 is exact),
  and otherwise it is part of what we call noise.
* The FO formula holds for CE as well as MSE (both have residual p - onehot); CE only changes p and
  the Jacobian J of the second-order support term.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from metajax import losses as losses_lib
from metajax.types import ApplyFn, Array, ArrayLike, Params, Task
from metajax.variants import HEAD, HeadSpec, head_flags, head_subtree, zero_head

LossName = Literal["mse_onehot", "cross_entropy"]
LossSpec = LossName | Callable[[Array, Array], Array]

TERMS = ("head", "contrastive", "coefficient_noise", "support")
NOISE_TERMS = ("head", "coefficient_noise", "support")


def _predict_fn(loss: LossSpec) -> Callable[[Array], Array]:
  """The prediction map p(outputs) whose residual p - onehot is d(loss)/d(outputs) * N."""
  if loss in ("mse_onehot", losses_lib.mse_onehot):
    return lambda outputs: outputs
  if loss in ("cross_entropy", losses_lib.cross_entropy):
    return lambda outputs: jax.nn.softmax(outputs, axis=-1)
  raise ValueError(f"loss must be 'mse_onehot' or 'cross_entropy' (or metajax.mse_onehot / "
                   f"metajax.cross_entropy), got {loss!r}")


def _split_head(head: Params) -> tuple[Array, Array | None]:
  if not isinstance(head, dict) or "kernel" not in head or set(head) - {"kernel", "bias"}:
    shapes = jax.tree.map(jnp.shape, head)
    raise ValueError("the head must be a dict {'kernel': [D, C]} or {'kernel': [D, C], 'bias': "
                     f"[C]}} (a linear layer), got {shapes}")
  return head["kernel"], head.get("bias")


def encoder_loss_terms(
  support_features: ArrayLike,
  support_y: ArrayLike,
  query_features: ArrayLike,
  query_y: ArrayLike,
  head: Params,
  *,
  inner_lr: ArrayLike,
  loss: LossSpec = "mse_onehot",
  num_inner_steps: int = 1,
  first_order: bool = False,
) -> dict[str, Array]:
  """The explicit encoder loss of one task, term by term (see the module docstring).

  Differentiate the sum of the terms wrt whatever produced the features: its gradient equals that
  of the ANIL MAML query loss (one linear head adapted by `num_inner_steps` steps of size
  `inner_lr` on `loss`). Every coefficient is a `stop_gradient`, and so is the head.

  Args:
    support_features: `[N, D]` phi of the support inputs.
    support_y: `[N]` integer labels in `[0, C)`.
    query_features: `[M, D]` phi of the query inputs.
    query_y: `[M]` integer labels.
    head: `{"kernel": [D, C]}` or `{"kernel": [D, C], "bias": [C]}`, the head *before* the inner
      loop (pass zeros for the zeroing trick).
    inner_lr: eta, a scalar.
    loss: "mse_onehot" or "cross_entropy" (or the metajax functions of those names).
    num_inner_steps: K >= 1; K > 1 only with `first_order=True` (no exact form otherwise).
    first_order: FOMAML (phi(s) enters only through stopped coefficients) or second order.

  Returns:
    Scalars `{"head", "contrastive", "coefficient_noise", "support"}` ("support" is 0 for first
    order). Their sum is the full encoder loss; all but "contrastive" make up the noise.
  """
  if not isinstance(num_inner_steps, int) or num_inner_steps < 1:
    raise ValueError(f"num_inner_steps must be an int >= 1, got {num_inner_steps!r}")
  if not first_order and num_inner_steps != 1:
    raise ValueError("the explicit second-order form holds for one inner step only (after K > 1 "
                     "steps the adapted head is a degree-K polynomial in phi(s)); use "
                     "first_order=True or num_inner_steps=1")
  predict = _predict_fn(loss)
  sg = jax.lax.stop_gradient
  fs, fq = jnp.asarray(support_features), jnp.asarray(query_features)
  kernel, bias = _split_head(head)
  kernel = sg(kernel)
  bias = None if bias is None else sg(bias)
  num_classes = kernel.shape[-1]
  n, m = fs.shape[0], fq.shape[0]
  ys = jax.nn.one_hot(support_y, num_classes, dtype=fs.dtype)  # NC
  yq = jax.nn.one_hot(query_y, num_classes, dtype=fq.dtype)  # MC
  fs0, fq0 = sg(fs), sg(fq)

  def outputs(features, w, b):
    out = features @ w  # ND,DC->NC
    return out if b is None else out + b

  # The inner trajectory, on stopped features: only coefficients come out of it.
  def inner_step(carry, _):
    w, b, acc, s_acc = carry
    s = predict(outputs(fs0, w, b))  # NC, s^(k)
    rs = s - ys  # NC, residuals s_i - 1{i=t}
    w = w - inner_lr / n * fs0.T @ rs  # DN,NC->DC
    b = None if b is None else b - inner_lr * jnp.mean(rs, axis=0)
    return (w, b, acc + rs, s_acc + s), None

  zeros = jnp.zeros((n, num_classes), fs.dtype)
  (w_adapted, b_adapted, acc, s_acc), _ = jax.lax.scan(
    inner_step, (kernel, bias, zeros, zeros), None, length=num_inner_steps)
  r_query = sg(predict(outputs(fq0, w_adapted, b_adapted)) - yq)  # MC, q'_i - 1{i=u}
  acc, s_acc = sg(acc), sg(s_acc)

  # c_mn = -R'_m . A_n = K (q'_{t_n} - 1{t_n=u_m}) + sum_k (s^(k)_{u_m} - q'_m . s^(k)_n)
  pure = num_inner_steps * (r_query @ ys.T)  # MC,CN->MN: q'_{m,t_n} - 1{t_n = u_m}
  q_pred = r_query + yq  # MC, q'
  coef_noise = yq @ s_acc.T - q_pred @ s_acc.T  # MC,CN->MN: sum_k s_u - sum_i q_i s_i
  inner = (fs0 if first_order else fs) @ fq.T  # ND,DM->NM: <phi(s_n), phi(q_m)>
  scale = inner_lr / (n * m)
  terms = {
    "head": jnp.sum(r_query * (fq @ kernel)) / m,  # MD,DC->MC
    "contrastive": scale * jnp.sum(pure.T * inner),
    "coefficient_noise": scale * jnp.sum(coef_noise.T * inner),
  }
  if first_order:
    terms["support"] = jnp.zeros((), fs.dtype)
  else:
    # Through s = p(Fs W + b): v_n = 1/M sum_m k_mn R'_m, k_mn = <phi(s_n), phi(q_m)> (+ 1).
    k = fs0 @ fq0.T  # ND,DM->NM
    if bias is not None:
      k = k + 1.0
    v = k @ r_query / m  # NM,MC->NC
    _, vjp = jax.vjp(predict, outputs(fs0, kernel, bias))
    (u,) = vjp(v)  # NC: J_n^T v_n per row (J is row-wise)
    terms["support"] = -inner_lr / n * jnp.sum(sg(u) * (fs @ kernel))  # ND,DC->NC
  return terms




def encoder_loss_decomposition(
  features_fn: ApplyFn,
  params: Params,
  tasks: Task,
  *,
  inner_lr: ArrayLike,
  loss: LossSpec = "mse_onehot",
  num_inner_steps: int = 1,
  first_order: bool = False,
  zeroing: bool = False,
  head: HeadSpec = None,
) -> dict[str, Array]:
  """The explicit encoder loss for a batch of tasks, averaged over tasks, term by term.

  Args:
    features_fn: `(params, x) -> phi(x)` `[N, D]`, e.g. `model.features`.
    params: `{"encoder": ..., "head": {"kernel", "bias"?}}` (any dict with a linear "head").
    tasks: a `Task` with a leading task axis and integer labels.
    inner_lr, loss, num_inner_steps, first_order: as in `encoder_loss_terms` (and `metajax.MAML`).
    zeroing: the zeroing trick (`metajax.with_zeroing`): the head is 0 before the inner loop.
    head: which subtree of params is the linear head (`metajax.variants.HeadSpec`); None: the
      one below a key named "head", e.g. `{"params": {..., "head": ...}}` or an NNX `State`.

  Returns:
    Scalars: the terms of `encoder_loss_terms`, plus "noise" (their sum but "contrastive") and
    "total" (all of them). `jax.grad` of "total" wrt the encoder params equals that of
    `metajax.meta_loss` for the matching ANIL learner.
  """
  if zeroing:
    params = zero_head(params, head)
  head_params = head_subtree(params, head)

  def one_task(task: Task) -> dict[str, Array]:
    return encoder_loss_terms(
      features_fn(params, task.support_x), task.support_y,
      features_fn(params, task.query_x), task.query_y, head_params,
      inner_lr=inner_lr, loss=loss, num_inner_steps=num_inner_steps, first_order=first_order)

  terms = jax.tree.map(jnp.mean, jax.vmap(one_task)(tasks))
  terms["noise"] = sum(terms[name] for name in NOISE_TERMS)
  terms["total"] = terms["contrastive"] + terms["noise"]
  return terms


def contrastive_encoder_loss(
  features_fn: ApplyFn,
  params: Params,
  tasks: Task,
  *,
  inner_lr: ArrayLike,
  loss: LossSpec = "mse_onehot",
  num_inner_steps: int = 1,
  first_order: bool = False,
  zeroing: bool = False,
  head: HeadSpec = None,
) -> Array:
  """The paper's explicit (noisy) contrastive loss of the encoder, averaged over tasks.

  Its gradient wrt the encoder params is exactly ANIL MAML's meta-gradient (`metajax.meta_loss`
  with `adapt_mask=metajax.head_mask`, the same loss, inner_lr, steps, first_order, and
  `with_zeroing` iff `zeroing`). With `zeroing=True` and one step it is the pure supervised
  contrastive loss eta E_{(s,t)~S} [q_t - 1{t=u}] <phi(s), phi(q)>. Arguments as in
  `encoder_loss_decomposition`.
  """
  return encoder_loss_decomposition(
    features_fn, params, tasks, inner_lr=inner_lr, loss=loss, num_inner_steps=num_inner_steps,
    first_order=first_order, zeroing=zeroing, head=head)["total"]


def _tree_dot(a: Any, b: Any) -> Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _without_head(tree: Params, head: HeadSpec) -> Params:
  """The encoder part of a gradient: metajax's layout drops its "head" entry; any other
  layout keeps its structure, with the head's leaves set to 0."""
  if head is None and isinstance(tree, dict) and HEAD in tree:
    return {k: v for k, v in tree.items() if k != HEAD}
  flags = head_flags(tree, head)
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([w * 0 if f else w for w, f in zip(leaves, flags)])


def decompose_encoder_gradient(
  features_fn: ApplyFn,
  params: Params,
  tasks: Task,
  *,
  inner_lr: ArrayLike,
  loss: LossSpec = "mse_onehot",
  num_inner_steps: int = 1,
  first_order: bool = False,
  zeroing: bool = False,
  head: HeadSpec = None,
) -> dict[str, Any]:
  """The MAML encoder gradient split into its contrastive part and its noise.

  Arguments as in `encoder_loss_decomposition`.

  Returns:
    A dict with
    - "total", "contrastive", "noise": gradients wrt the non-head params (the dict `params`
      without its "head" entry; for any other layout, params' structure with the head's leaves
      0); total = contrastive + noise, and "total" equals ANIL MAML's
      encoder meta-gradient.
    - "cosine": cosine similarity of total and contrastive (1 when the noise vanishes; 0 if
      either is 0).
    - "total_norm", "contrastive_norm", "noise_norm": their global L2 norms.
  """

  def parts(p: Params) -> Array:
    terms = encoder_loss_decomposition(
      features_fn, p, tasks, inner_lr=inner_lr, loss=loss, num_inner_steps=num_inner_steps,
      first_order=first_order, zeroing=zeroing, head=head)
    return jnp.stack([terms["contrastive"], terms["noise"]])

  jac = _without_head(jax.jacrev(parts)(params), head)  # one forward pass, two backward passes
  contrastive = jax.tree.map(lambda j: j[0], jac)
  noise = jax.tree.map(lambda j: j[1], jac)
  total = jax.tree.map(jnp.add, contrastive, noise)
  norms = {name: jnp.sqrt(_tree_dot(g, g)) for name, g in
           (("total", total), ("contrastive", contrastive), ("noise", noise))}
  denom = norms["total"] * norms["contrastive"]
  cosine = jnp.where(denom > 0, _tree_dot(total, contrastive) / jnp.where(denom > 0, denom, 1.0),
                     0.0)
  return {"total": total, "contrastive": contrastive, "noise": noise, "cosine": cosine,
          **{f"{name}_norm": value for name, value in norms.items()}}


def feature_similarity(features: ArrayLike, labels: ArrayLike, *,
                       epsilon: float | None = None) -> dict[str, Array]:
  """Mean cosine similarity of feature pairs of the same class and of different classes.

  Over the unordered pairs {i, j}, i != j, of one batch (e.g. the support and query of a task
  concatenated). The paper's feature-space check: MAML should pull same-class features together.

  Args:
    features: `[B, D]`.
    labels: `[B]` integer labels.
    epsilon: squared norms are clipped below at epsilon (default: the dtype's machine epsilon),
      as in `optax.losses.cosine_similarity`.

  Returns:
    `{"same_class", "different_class", "gap"}` (gap = same - different); a mean over no pair is NaN.
  """
  features = jnp.asarray(features)
  labels = jnp.asarray(labels)
  eps = jnp.finfo(features.dtype).eps if epsilon is None else epsilon
  unit = features / jnp.sqrt(jnp.maximum(jnp.sum(features**2, -1, keepdims=True), eps))
  cos = unit @ unit.T  # BD,DB->BB
  b = features.shape[0]
  distinct = ~jnp.eye(b, dtype=bool)
  same = (labels[:, None] == labels[None, :]) & distinct
  diff = (labels[:, None] != labels[None, :])

  def masked_mean(mask):
    return jnp.sum(jnp.where(mask, cos, 0.0)) / jnp.sum(mask)

  same_mean, diff_mean = masked_mean(same), masked_mean(diff)
  return {"same_class": same_mean, "different_class": diff_mean, "gap": same_mean - diff_mean}
