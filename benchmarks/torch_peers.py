"""PyTorch peers of the metajax benchmark workloads (issue 9), for `benchmarks/bench.py`.

Two idiomatic PyTorch MAML implementations of the same workloads, CPU, `torch.set_num_threads(2)`:

  higher  `higher.innerloop_ctx` with a Python loop over the tasks of the meta-batch (the usual
          research code): per task, the inner SGD steps through the differentiable optimiser, the
          query loss / meta-batch is back-propagated, then one Adam step. First order: the inner
          loop runs with `track_higher_grads=False` and the query gradient at the adapted weights
          is added to the meta-gradient (FOMAML as usually written with higher).
  func    `torch.func`: `functional_call` + `grad` for the inner loop, `vmap` over tasks, `grad`
          of the mean query loss for the meta-gradient, then `torch.optim.Adam`. First order:
          the inner gradients are `detach()`-ed.

The network is the same Conv-4 as `metajax.conv4` (3x3 conv SAME -> BatchNorm with batch
statistics, no running averages -> ReLU -> 2x2 max-pool, x4, then a linear head) and the same
inputs (synthetic, NCHW), so both sides do the same arithmetic. Workloads W1, W5, WFO, WANIL,
W20 (Conv-4) and WP, WPFO (Kao et al.'s network); see bench.py for their shapes.

Usage (torch is not a metajax dependency; use a separate venv):
  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 higher
  /tmp/torchvenv/bin/python benchmarks/torch_peers.py --workloads=W1,WFO --reps=10 --json=out.json
Writes `{"workloads": {name: {impl: {"median_s", "min_s", "times", ...}}}, "meta": {...}}`.

`--meta_grad=IN.npz,OUT.npz` instead computes one float64 MAML meta-gradient with plain
`torch.autograd` for `benchmarks/torch_crosscheck.py` (the exactness check, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (ways, shots, queries, meta_batch, inner_steps, inner_lr, mode), as bench.WORKLOADS
WORKLOADS = {
  "W1": (5, 1, 15, 32, 1, 0.4, "second"),
  "W5": (5, 1, 15, 32, 5, 0.4, "second"),
  "WFO": (5, 1, 15, 32, 1, 0.4, "first"),
  "WANIL": (5, 1, 15, 32, 1, 0.4, "anil"),
  "W20": (20, 1, 5, 16, 5, 0.1, "second"),
  "WP": (5, 1, 15, 32, 2, 0.4, "second"),
  "WPFO": (5, 1, 15, 32, 2, 0.4, "first"),
}
KAO_NET = ("WP", "WPFO")  # Kao et al.'s network instead of Conv-4
TINY = dict(filters=8, meta_batch=4, queries=2)


class BatchStatNorm(nn.Module):
  """BatchNorm over (N, H, W) with the current batch's statistics only (as metajax's)."""

  def __init__(self, features: int, eps: float = 1e-5):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(features))
    self.bias = nn.Parameter(torch.zeros(features))
    self.eps = eps

  def forward(self, x):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).square().mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) * torch.rsqrt(var + self.eps) * self.scale[:, None, None] + \
      self.bias[:, None, None]


class Conv4(nn.Module):
  def __init__(self, num_classes: int, filters: int = 64, in_channels: int = 1):
    super().__init__()
    layers = []
    for i in range(4):
      layers += [nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1),
                 BatchStatNorm(filters), nn.ReLU(), nn.MaxPool2d(2)]
    self.encoder = nn.Sequential(*layers)
    self.head = nn.Linear(filters, num_classes)

  def forward(self, x):
    return self.head(self.encoder(x).flatten(1))


class KaoConv(nn.Module):
  """Kao et al.'s Omniglot network, as metajax.kao_conv: three 3x3 stride-2 convs without padding
  and a 2x2 conv, each followed by ReLU then BatchNorm (batch statistics), no pooling."""

  def __init__(self, num_classes: int, filters: int = 64, in_channels: int = 1):
    super().__init__()
    layers = []
    for i, (k, s) in enumerate([(3, 2)] * 3 + [(2, 1)]):
      layers += [nn.Conv2d(in_channels if i == 0 else filters, filters, k, stride=s),
                 nn.ReLU(), BatchStatNorm(filters)]
    self.encoder = nn.Sequential(*layers)
    self.head = nn.Linear(filters, num_classes)

  def forward(self, x):
    return self.head(self.encoder(x).flatten(1))


def synthetic_tasks(ways, shots, queries, meta_batch, seed=0):
  g = torch.Generator().manual_seed(seed)
  labels = torch.arange(ways)
  return (torch.rand(meta_batch, ways * shots, 1, 28, 28, generator=g),
          labels.repeat_interleave(shots).repeat(meta_batch, 1),
          torch.rand(meta_batch, ways * queries, 1, 28, 28, generator=g),
          labels.repeat_interleave(queries).repeat(meta_batch, 1))


def make_higher_step(model, meta_opt, steps, lr, mode):
  import higher

  inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
  head = set(n for n, _ in model.named_parameters() if n.startswith("head."))
  if mode == "anil":  # only the head adapts in the inner loop
    inner_opt = torch.optim.SGD([p for n, p in model.named_parameters() if n in head], lr=lr)

  def step(sx, sy, qx, qy):
    meta_opt.zero_grad()
    num_tasks = sx.shape[0]
    total = 0.0
    for t in range(num_tasks):
      with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                track_higher_grads=(mode != "first")) as (fmodel, diffopt):
        for _ in range(steps):
          diffopt.step(F.cross_entropy(fmodel(sx[t]), sy[t]))
        qloss = F.cross_entropy(fmodel(qx[t]), qy[t]) / num_tasks
        if mode == "first":
          grads = torch.autograd.grad(qloss, list(fmodel.parameters()))
          for p, g in zip(model.parameters(), grads):
            p.grad = g if p.grad is None else p.grad + g
        else:
          qloss.backward()
        total += float(qloss)
    meta_opt.step()
    return total

  return step


def make_func_step(model, meta_opt, steps, lr, mode):
  from torch.func import functional_call, grad, vmap

  names = [n for n, _ in model.named_parameters()]
  adapted_names = [n for n in names if n.startswith("head.")] if mode == "anil" else names

  def loss(params, x, y):
    return F.cross_entropy(functional_call(model, params, (x,)), y)

  def task_loss(params, sx, sy, qx, qy):
    fast = dict(params)
    for _ in range(steps):
      sub = {n: fast[n] for n in adapted_names}
      g = grad(lambda s: loss({**fast, **s}, sx, sy))(sub)
      if mode == "first":
        g = {n: v.detach() for n, v in g.items()}
      fast = {**fast, **{n: fast[n] - lr * g[n] for n in adapted_names}}
    return loss(fast, qx, qy)

  def meta_loss(params, sx, sy, qx, qy):
    return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).mean()

  meta_grad = grad(meta_loss, has_aux=False)

  def step(sx, sy, qx, qy):
    params = {n: p.detach() for n, p in model.named_parameters()}
    grads = meta_grad(params, sx, sy, qx, qy)
    for n, p in model.named_parameters():
      p.grad = grads[n]
    meta_opt.step()
    return None

  return step


def meta_gradient(npz_in: str, npz_out: str) -> None:
  """The float64 MAML meta-gradient of a problem written by `benchmarks/torch_crosscheck.py`.

  `npz_in` holds `net` ("conv4" | "kao"), `ways`, `steps`, `inner_lr`, `first_order`, the
  parameters as `param/<state_dict name>` (torch layouts) and the tasks as NCHW `support_x`,
  `support_y`, `query_x`, `query_y` with a leading task axis. Writes the mean query loss over
  the tasks as `loss` and its gradient as `grad/<name>`: per task, `steps` plain SGD steps on all
  parameters with `torch.autograd.grad` (`create_graph` unless first order), a loop over tasks.
  """
  import numpy as np

  torch.set_default_dtype(torch.float64)
  z = np.load(npz_in)
  params = {k[len("param/"):]: torch.tensor(z[k]) for k in z.files if k.startswith("param/")}
  filters = params["head.weight"].shape[1]
  model = (KaoConv if str(z["net"]) == "kao" else Conv4)(int(z["ways"]), filters).double()
  model.load_state_dict(params)
  names = [n for n, _ in model.named_parameters()]
  data = {k: torch.tensor(z[k]) for k in ("support_x", "support_y", "query_x", "query_y")}
  lr, first = float(z["inner_lr"]), bool(z["first_order"])

  def task_loss(p, t):
    for _ in range(int(z["steps"])):
      loss = F.cross_entropy(torch.func.functional_call(model, p, (data["support_x"][t],)),
                             data["support_y"][t].long())
      g = torch.autograd.grad(loss, [p[n] for n in names], create_graph=not first)
      p = {n: p[n] - lr * gn for n, gn in zip(names, g)}
    return F.cross_entropy(torch.func.functional_call(model, p, (data["query_x"][t],)),
                           data["query_y"][t].long())

  leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
  num_tasks = data["support_x"].shape[0]
  loss = sum(task_loss(leaves, t) for t in range(num_tasks)) / num_tasks
  grads = torch.autograd.grad(loss, [leaves[n] for n in names])
  np.savez(npz_out, loss=loss.item(), **{f"grad/{n}": g.numpy() for n, g in zip(names, grads)})


def bench_one(name, impl, reps, warmup, tiny=False, seed=0):
  ways, shots, queries, meta_batch, steps, lr, mode = WORKLOADS[name]
  filters = 64
  if tiny:
    filters, meta_batch, queries = TINY["filters"], TINY["meta_batch"], TINY["queries"]
  torch.manual_seed(seed)
  model = (KaoConv if name in KAO_NET else Conv4)(ways, filters)
  meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  make = make_higher_step if impl == "higher" else make_func_step
  step = make(model, meta_opt, steps, lr, mode)
  batch = synthetic_tasks(ways, shots, queries, meta_batch, seed)
  load_before = os.getloadavg()
  t = time.perf_counter()
  for _ in range(warmup):
    step(*batch)
  warm_s = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    step(*batch)
    times.append(time.perf_counter() - t)
  return {"median_s": statistics.median(times), "min_s": min(times), "times": times,
          "warmup_s": warm_s, "load_before": load_before, "load_after": os.getloadavg()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workloads", default="W1,W5,WFO")
  p.add_argument("--impls", default="higher,func")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--json", default=None)
  p.add_argument("--meta_grad", default=None, metavar="IN.npz,OUT.npz",
                 help="compute one float64 meta-gradient instead (torch_crosscheck.py)")
  args = p.parse_args(argv)
  if args.meta_grad:
    meta_gradient(*args.meta_grad.split(","))
    return 0
  torch.set_num_threads(args.threads)
  out = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "reps": args.reps, "warmup": args.warmup, "tiny": args.tiny,
                  "load_start": os.getloadavg()},
         "workloads": {}}
  try:
    import higher

    out["meta"]["higher"] = getattr(higher, "__version__", "?")
  except ImportError:
    out["meta"]["higher"] = None
  for name in [n for n in args.workloads.split(",") if n]:
    out["workloads"][name] = {}
    for impl in [i for i in args.impls.split(",") if i]:
      try:
        r = bench_one(name, impl, args.reps, args.warmup, args.tiny)
      except Exception as e:  # noqa: BLE001 - report and go on with the others
        r = {"error": f"{type(e).__name__}: {e}"}
      out["workloads"][name][impl] = r
      msg = r.get("error") or f"{r['median_s']:.3f} s/step (min {r['min_s']:.3f})"
      print(f"[torch {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {name} {impl}: "
            f"{msg}", flush=True)
  out["meta"]["load_end"] = os.getloadavg()
  if args.json:
    d = os.path.dirname(os.path.abspath(args.json))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(out, f, indent=1)
    os.replace(tmp, args.json)
  else:
    json.dump(out, sys.stdout, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
