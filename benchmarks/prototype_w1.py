"""Self-contained plain-JAX prototype of the MAML meta-step, to choose the fast CPU formulation.

Workloads (synthetic inputs, shapes as the performance issue):
  w1     Conv-4, 5-way 1-shot, 15 queries, meta-batch 32, 1 inner step lr 0.4, second order
  w5     as w1 with 5 inner steps
  wfo    as w1, first order (stop_gradient on the inner gradients)
  wanil  as w1, head-only inner loop
  w20    20-way 1-shot, 5 queries, meta-batch 16, 5 inner steps lr 0.1, second order
  wp     Kao et al. net (3x conv3x3/2 VALID + conv2x2 VALID, ReLU then BN), 2 steps, second order
  wpfo   as wp, first order
  fwdbwd plain forward+backward of the Conv-4 over the same images (meta-batch x (support+query))
  wpfwdbwd the same for the Kao net

Variants:
  --conv    lax | im2col | patches (lax.conv_general_dilated_patches) | shiftsum (sum of K dots)
  --pool    window (nn.max_pool / reduce_window) | reshape (metajax.nn.conv.max_pool_2x2)
  --tasks   vmap | map | map:k (lax.map with batch_size=k)
  --peel    compute the first inner step with the shared initial params (one big batch)
  --precision default | highest
  --donate  donate the state to the jitted step

Usage:
  python benchmarks/prototype_w1.py --workload w1 --conv im2col --pool reshape --reps 5
  XLA_FLAGS=... python benchmarks/prototype_w1.py ...   # XLA flag experiments
Prints one JSON line per run: median seconds per outer step (after compile), all times, the
FLOPs from cost_analysis of the compiled step, and GFLOP/s.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metajax.nn.conv import conv_general_dilated_im2col, max_pool_2x2

DN = ("NHWC", "HWIO", "NHWC")

WORKLOADS = {
  # name: (net, ways, shots, queries, meta_batch, inner_steps, inner_lr, mode)
  "w1": ("conv4", 5, 1, 15, 32, 1, 0.4, "second"),
  "w5": ("conv4", 5, 1, 15, 32, 5, 0.4, "second"),
  "wfo": ("conv4", 5, 1, 15, 32, 1, 0.4, "first"),
  "wanil": ("conv4", 5, 1, 15, 32, 1, 0.4, "anil"),
  "w20": ("conv4", 20, 1, 5, 16, 5, 0.1, "second"),
  "wp": ("kao", 5, 1, 15, 32, 2, 0.4, "second"),
  "wpfo": ("kao", 5, 1, 15, 32, 2, 0.4, "first"),
  "fwdbwd": ("conv4", 5, 1, 15, 32, 0, 0.0, "fwdbwd"),
  "wpfwdbwd": ("kao", 5, 1, 15, 32, 0, 0.0, "fwdbwd"),
}


# ----------------------------------------------------------------------------- convolutions
def conv_patches(x, w, strides, padding, precision=None):
  """lax.conv_general_dilated_patches + dot; patch features are ordered (C, KH, KW)."""
  kh, kw, c, f = w.shape
  p = lax.conv_general_dilated_patches(x, (kh, kw), strides, padding, dimension_numbers=DN,
                                       precision=precision)
  w2 = jnp.transpose(w, (2, 0, 1, 3)).reshape(c * kh * kw, f)
  return jnp.einsum("nhwk,kf->nhwf", p, w2, precision=precision)


def conv_shiftsum(x, w, strides, padding, precision=None):
  """Sum over kernel offsets of (strided slice) @ w[i, j]: no patch tensor is materialised."""
  if w.shape[2] < 8:  # tiny C (first layer): a concatenated patch matrix is better
    return conv_general_dilated_im2col(x, w, strides, padding, dimension_numbers=DN,
                                       precision=precision)
  kh, kw, c, f = w.shape
  n, h, wd, _ = x.shape
  pads = lax.padtype_to_pads((h, wd), (kh, kw), strides, padding) if isinstance(padding, str) \
    else padding
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  oh = (x.shape[1] - kh) // strides[0] + 1
  ow = (x.shape[2] - kw) // strides[1] + 1
  y = 0.0
  for i, j in itertools.product(range(kh), range(kw)):
    s = lax.slice(x, (0, i, j, 0), (n, i + (oh - 1) * strides[0] + 1,
                                     j + (ow - 1) * strides[1] + 1, c), (1, *strides, 1))
    y = y + jnp.einsum("nhwc,cf->nhwf", s, w[i, j], precision=precision)
  return y


def make_conv(kind, precision):
  if kind == "lax":
    return lambda x, w, s, p: lax.conv_general_dilated(x, w, s, p, dimension_numbers=DN,
                                                       precision=precision)
  if kind == "im2col":
    return lambda x, w, s, p: conv_general_dilated_im2col(x, w, s, p, dimension_numbers=DN,
                                                          precision=precision)
  if kind == "patches":
    return lambda x, w, s, p: conv_patches(x, w, s, p, precision)
  if kind == "shiftsum":
    return lambda x, w, s, p: conv_shiftsum(x, w, s, p, precision)
  raise ValueError(kind)


def make_pool(kind):
  if kind == "window":
    return lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  if kind == "reshape":
    return max_pool_2x2
  raise ValueError(kind)


# ----------------------------------------------------------------------------- networks
def batch_norm(x, scale, bias, eps=1e-5):
  """BatchNorm with the statistics of the batch passed in (over N, H, W)."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * lax.rsqrt(var + eps) * scale + bias


def init_params(key, net, ways, filters=64):
  ksizes = {"conv4": [3, 3, 3, 3], "kao": [3, 3, 3, 2]}[net]
  params = {"encoder": [], "head": {}}
  cin = 1
  keys = jax.random.split(key, len(ksizes) + 1)
  for k, ks in zip(keys, ksizes):
    fan_in = ks * ks * cin
    params["encoder"].append({
      "w": jax.random.normal(k, (ks, ks, cin, filters)) * math.sqrt(2.0 / fan_in),
      "b": jnp.zeros((filters,)),
      "scale": jnp.ones((filters,)),
      "bias": jnp.zeros((filters,)),
    })
    cin = filters
  params["head"] = {"w": jax.random.normal(keys[-1], (filters, ways)) / math.sqrt(filters),
                    "b": jnp.zeros((ways,))}
  return params


def make_encoder(net, conv, pool):
  def conv4(enc, x):
    for layer in enc:
      x = conv(x, layer["w"], (1, 1), "SAME") + layer["b"]
      x = jax.nn.relu(batch_norm(x, layer["scale"], layer["bias"]))
      x = pool(x)
    return x.reshape(x.shape[0], -1)

  def kao(enc, x):
    specs = [(2, 2), (2, 2), (2, 2), (1, 1)]
    for layer, s in zip(enc, specs):
      x = conv(x, layer["w"], s, "VALID") + layer["b"]
      x = batch_norm(jax.nn.relu(x), layer["scale"], layer["bias"])
    return x.reshape(x.shape[0], -1)

  return {"conv4": conv4, "kao": kao}[net]


def head_apply(head, feats, precision):
  return jnp.dot(feats, head["w"], precision=precision) + head["b"]


def xent(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ----------------------------------------------------------------------------- MAML
def build_meta_loss(encoder, precision, mode, inner_steps, inner_lr, tasks, peel):
  def loss(params, x, y):
    return xent(head_apply(params["head"], encoder(params["encoder"], x), precision), y)

  def sgd(params, grads):
    if mode == "first":
      grads = lax.stop_gradient(grads)
    return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)

  def adapt(params, sx, sy, steps):
    def body(p, _):
      return sgd(p, jax.grad(loss)(p, sx, sy)), None
    if steps == 0:
      return params
    if steps == 1:
      return body(params, None)[0]
    return lax.scan(body, params, None, length=steps)[0]

  def task_loss_full(params, sx, sy, qx, qy):
    return loss(adapt(params, sx, sy, inner_steps), qx, qy)

  def task_loss_rest(params, params1, sx, sy, qx, qy):
    del params
    return loss(adapt(params1, sx, sy, inner_steps - 1), qx, qy)

  def anil_task_loss(params, sx, sy, qx, qy):
    fs = encoder(params["encoder"], sx)
    fq = encoder(params["encoder"], qx)
    hloss = lambda h, f, y: xent(head_apply(h, f, precision), y)
    h = params["head"]
    for _ in range(inner_steps):
      h = jax.tree.map(lambda p, g: p - inner_lr * g, h, jax.grad(hloss)(h, fs, sy))
    return hloss(h, fq, qy)

  def over_tasks(fn, params, batch):
    if tasks == "vmap":
      return jax.vmap(fn, in_axes=(None, 0, 0, 0, 0))(params, *batch)
    bs = None if tasks == "map" else int(tasks.split(":")[1])
    return lax.map(lambda b: fn(params, *b), batch, batch_size=bs)

  def meta_loss(params, batch):
    sx, sy, qx, qy = batch
    if mode == "anil":
      return jnp.mean(over_tasks(anil_task_loss, params, batch))
    if peel and inner_steps >= 1 and tasks == "vmap":
      # First inner step at the shared initial params: the support forward is one big batch
      # (unbatched weights under vmap), BN statistics stay per task.
      g1 = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, sx, sy)
      p1 = jax.vmap(sgd, in_axes=(None, 0))(params, g1)
      return jnp.mean(jax.vmap(task_loss_rest, in_axes=(None, 0, 0, 0, 0, 0))(
        params, p1, sx, sy, qx, qy))
    return jnp.mean(over_tasks(task_loss_full, params, batch))

  return meta_loss, loss


def build_step(args):
  net, ways, shots, queries, mb, steps, lr, mode = WORKLOADS[args.workload]
  precision = None if args.precision == "default" else lax.Precision.HIGHEST
  dtype = jnp.float64 if args.x64 else jnp.float32
  conv = make_conv(args.conv, precision)
  pool = make_pool(args.pool)
  encoder = make_encoder(net, conv, pool)
  key = jax.random.PRNGKey(0)
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  params = jax.tree.map(lambda a: a.astype(dtype), init_params(k1, net, ways))
  ns, nq = ways * shots, ways * queries
  mb = args.meta_batch or mb
  sx = jax.random.normal(k2, (mb, ns, 28, 28, 1), dtype)
  qx = jax.random.normal(k3, (mb, nq, 28, 28, 1), dtype)
  sy = jnp.tile(jnp.arange(ways).repeat(shots), (mb, 1))
  qy = jnp.tile(jnp.arange(ways).repeat(queries), (mb, 1))
  batch = (sx, sy, qx, qy)
  opt = optax.adam(1e-3)
  state = (params, opt.init(params))

  if mode == "fwdbwd":
    def loss(params, batch):
      sx, sy, qx, qy = batch
      x = jnp.concatenate([sx.reshape(-1, 28, 28, 1), qx.reshape(-1, 28, 28, 1)])
      y = jnp.concatenate([sy.reshape(-1), qy.reshape(-1)])
      if args.tasks == "vmap":
        return xent(head_apply(params["head"], encoder(params["encoder"], x), precision), y)
      # lax.map over chunks of the same images (BN statistics per chunk; same FLOPs).
      k = int(args.tasks.split(":")[1]) if ":" in args.tasks else sx.shape[0]
      xs = x.reshape(k, -1, 28, 28, 1)
      ys = y.reshape(k, -1)
      chunk = lambda b: xent(head_apply(params["head"], encoder(params["encoder"], b[0]),
                                        precision), b[1])
      return jnp.mean(lax.map(chunk, (xs, ys)))
  else:
    loss, _ = build_meta_loss(encoder, precision, mode, steps, lr, args.tasks, args.peel)

  def step(state, batch):
    params, opt_state = state
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (value, grads)

  jstep = jax.jit(step, donate_argnums=(0,) if args.donate else ())
  return jstep, state, batch, loss


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workload", default="w1", choices=sorted(WORKLOADS))
  ap.add_argument("--conv", default="im2col", choices=["lax", "im2col", "patches", "shiftsum"])
  ap.add_argument("--pool", default="reshape", choices=["window", "reshape"])
  ap.add_argument("--tasks", default="vmap")
  ap.add_argument("--peel", action="store_true")
  ap.add_argument("--precision", default="default", choices=["default", "highest"])
  ap.add_argument("--donate", action="store_true")
  ap.add_argument("--x64", action="store_true")
  ap.add_argument("--meta_batch", type=int, default=0)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--hlo", default="", help="write the optimised HLO text here")
  ap.add_argument("--variant", action="append", default=[],
                  help="'key=value ...' overrides of the flags above; several --variant are "
                       "compiled in one process and timed round-robin (fairer on a busy machine)")
  args = ap.parse_args()
  if args.x64:
    jax.config.update("jax_enable_x64", True)

  variants = []
  for spec in args.variant or [""]:
    v = argparse.Namespace(**vars(args))
    for kv in spec.split():
      k, val = kv.split("=")
      cur = getattr(v, k)
      setattr(v, k, (val in ("1", "true", "True")) if isinstance(cur, bool) else type(cur)(val))
    variants.append(v)

  runs = []
  for v in variants:
    jstep, state, batch, _ = build_step(v)
    t0 = time.perf_counter()
    compiled = jstep.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    if v.hlo:
      with open(v.hlo, "w") as f:
        f.write(compiled.as_text())
    state, out = compiled(state, batch)  # warm-up
    jax.block_until_ready(out)
    runs.append({"v": v, "compiled": compiled, "state": state, "batch": batch, "times": [],
                 "flops": flops, "compile_s": t_compile, "out": out})
  for _ in range(args.reps):
    for r in runs:
      t0 = time.perf_counter()
      r["state"], r["out"] = r["compiled"](r["state"], r["batch"])
      jax.block_until_ready((r["state"], r["out"]))
      r["times"].append(time.perf_counter() - t0)
  for r in runs:
    v, times, flops = r["v"], r["times"], r["flops"]
    med = statistics.median(times)
    print(json.dumps({
      "workload": v.workload, "conv": v.conv, "pool": v.pool, "tasks": v.tasks,
      "peel": v.peel, "precision": v.precision, "donate": v.donate, "x64": v.x64,
      "meta_batch": v.meta_batch or WORKLOADS[v.workload][4],
      "median_s": round(med, 4), "min_s": round(min(times), 4),
      "times": [round(t, 3) for t in times],
      "compile_s": round(r["compile_s"], 1), "gflops": round(flops / 1e9, 2),
      "gflop_per_s": round(flops / 1e9 / med, 2), "loss": float(r["out"][0]),
    }), flush=True)


if __name__ == "__main__":
  main()
