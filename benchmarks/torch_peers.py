"""PyTorch peers of the metajax benchmark workloads, for `benchmarks/bench.py`.

Three idiomatic PyTorch MAML implementations of the same workloads, on CPU
(`torch.set_num_threads(2)`) or, with `--device=cuda`, on the GPU metajax runs on (each step
timed to `torch.cuda.synchronize`):

  higher  `higher.innerloop_ctx` with a Python loop over the tasks of the meta-batch (the usual
          research code): per task, the inner SGD steps through the differentiable optimiser, the
          query loss / meta-batch is back-propagated, then one Adam step. First order: the inner
          loop runs with `track_higher_grads=False` and the query gradient at the adapted weights
          is added to the meta-gradient (FOMAML as usually written with higher).
  l2l     learn2learn's `MAML` wrapper: per task `maml.clone()`, `learner.adapt(support loss)`
          for each inner step, the query loss back-propagated, a loop over tasks (learn2learn's
          own MAML examples). First order: `MAML(..., first_order=True)`. ANIL as learn2learn's
          ANIL example writes it: the encoder outside the wrapper, only the head wrapped.
  func    `torch.func`: `functional_call` + `grad` for the inner loop, `vmap` over tasks, `grad`
          of the mean query loss for the meta-gradient, then `torch.optim.Adam`. First order:
          the inner gradients are `detach()`-ed.

The network is the same Conv-4 as `metajax.conv4` (3x3 conv SAME -> `nn.BatchNorm2d` with batch
statistics, no running averages -> ReLU -> 2x2 max-pool, x4, then a linear head) and the same
inputs (synthetic, NCHW), so both sides do the same arithmetic. Workloads W1, W5, WFO, WANIL,
W20 (Conv-4), WP, WPFO (Kao et al.'s network), M1, M1FO, M5, M5FO (mini-ImageNet: Conv-4 with
32 filters on 84x84x3) and WR, MR1 (ResNet-12 as `metajax.resnet12`: bias-free convs, LeakyReLU
0.1, a 1x1-conv shortcut, global average pooling); see bench.py for their shapes.

Usage (torch is not a metajax dependency; use a separate venv; learn2learn is optional, see
benchmarks/README.md for installing it on Python 3.11):
  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 higher
  /tmp/torchvenv/bin/python benchmarks/torch_peers.py --workloads=W1,WFO --reps=10 --json=out.json
Writes `{"workloads": {name: {impl: {"median_s", "min_s", "times", "peak_rss_mb", ...}}},
"meta": {...}}`; `peak_rss_mb` is the process's resident high-water mark during that run (reset
before it through /proc/self/clear_refs on Linux).

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
  "M1": (5, 1, 15, 4, 5, 0.01, "second"),
  "M1FO": (5, 1, 15, 4, 5, 0.01, "first"),
  "M5": (5, 5, 15, 2, 5, 0.01, "second"),
  "M5FO": (5, 5, 15, 2, 5, 0.01, "first"),
  "WR": (5, 1, 15, 32, 1, 0.4, "second"),
  "MR1": (5, 1, 15, 4, 5, 0.01, "second"),
}
KAO_NET = ("WP", "WPFO")  # Kao et al.'s network instead of Conv-4
# ResNet-12's four widths instead of Conv-4 (bench.py's WR and MR1).
RESNET12_WIDTHS = {"WR": (16, 32, 64, 128), "MR1": (64, 160, 320, 640)}
# (channels, side, filters) of the images and the network; Omniglot's 28x28x1 and 64 filters
# unless listed (the mini-ImageNet workloads: 84x84x3, Conv-4 with 32 filters).
SHAPES = {"M1": (3, 84, 32), "M1FO": (3, 84, 32), "M5": (3, 84, 32), "M5FO": (3, 84, 32),
          "MR1": (3, 84, 32)}
OMNIGLOT_SHAPE = (1, 28, 64)
TINY = dict(filters=8, meta_batch=4, queries=2)


def batch_norm(features: int) -> nn.BatchNorm2d:
  """BatchNorm with the current batch's statistics only, as MAML (and metajax) normalise: what a
  PyTorch user writes, `nn.BatchNorm2d` without running averages (higher's own Omniglot example)."""
  return nn.BatchNorm2d(features, track_running_stats=False)


class Conv4(nn.Module):
  def __init__(self, num_classes: int, filters: int = 64, in_channels: int = 1, side: int = 28):
    super().__init__()
    layers = []
    for i in range(4):
      layers += [nn.Conv2d(in_channels if i == 0 else filters, filters, 3, padding=1),
                 batch_norm(filters), nn.ReLU(), nn.MaxPool2d(2)]
      side //= 2  # 28 -> 1, 84 -> 5
    self.encoder = nn.Sequential(*layers)
    self.head = nn.Linear(filters * side * side, num_classes)

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
                 nn.ReLU(), batch_norm(filters)]
    self.encoder = nn.Sequential(*layers)
    self.head = nn.Linear(filters, num_classes)

  def forward(self, x):
    return self.head(self.encoder(x).flatten(1))


class ResidualBlock(nn.Module):
  """As metajax.nn.resnet.ResidualBlock: [3x3 conv -> BatchNorm -> LeakyReLU(0.1)] x 2 -> 3x3
  conv -> BatchNorm, plus a 1x1 conv -> BatchNorm shortcut, LeakyReLU, 2x2 max-pool; the convs
  have no bias (BatchNorm follows each)."""

  def __init__(self, in_channels: int, features: int):
    super().__init__()
    self.convs = nn.ModuleList(nn.Conv2d(in_channels if i == 0 else features, features, 3,
                                         padding=1, bias=False) for i in range(3))
    self.norms = nn.ModuleList(batch_norm(features) for _ in range(3))
    self.shortcut = nn.Sequential(nn.Conv2d(in_channels, features, 1, bias=False),
                                  batch_norm(features))
    self.pool = nn.MaxPool2d(2)

  def forward(self, x):
    y = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      y = norm(conv(y))
      if i < 2:  # the third conv's output is added to the shortcut before the nonlinearity
        y = F.leaky_relu(y, 0.1)
    return self.pool(F.leaky_relu(y + self.shortcut(x), 0.1))


class ResNet12(nn.Module):
  """As metajax.resnet12: four `ResidualBlock`s, a global average pool, a linear head."""

  def __init__(self, num_classes: int, widths: tuple[int, ...], in_channels: int = 1):
    super().__init__()
    chans = (in_channels, *widths)
    self.encoder = nn.Sequential(*(ResidualBlock(chans[i], chans[i + 1]) for i in range(4)),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
    self.head = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    return self.head(self.encoder(x))


def make_model(name: str, ways: int, filters: int | None = None) -> nn.Module:
  """The workload's network (`filters` overrides its width, e.g. for the tiny checks; for
  ResNet-12, every block's)."""
  channels, side, default_filters = SHAPES.get(name, OMNIGLOT_SHAPE)
  if name in RESNET12_WIDTHS:
    widths = (filters,) * 4 if filters else RESNET12_WIDTHS[name]
    return ResNet12(ways, widths, channels)
  filters = filters or default_filters
  if name in KAO_NET:
    return KaoConv(ways, filters, channels)
  return Conv4(ways, filters, channels, side)


def synthetic_tasks(ways, shots, queries, meta_batch, seed=0, dtype=torch.float32, name="W1"):
  channels, side, _ = SHAPES.get(name, OMNIGLOT_SHAPE)
  g = torch.Generator().manual_seed(seed)
  labels = torch.arange(ways)
  return (torch.rand(meta_batch, ways * shots, channels, side, side, generator=g, dtype=dtype),
          labels.repeat_interleave(shots).repeat(meta_batch, 1),
          torch.rand(meta_batch, ways * queries, channels, side, side, generator=g, dtype=dtype),
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
        total += qloss.detach().item()
    meta_opt.step()
    return total

  return step


def l2l_maml():
  """learn2learn's `algorithms.MAML` class, its code as installed.

  `import learn2learn` also imports its vision and gym packages, hence torchvision, and PyPI's
  torchvision wheels are CUDA builds that do not load beside the CPU torch. When that import
  fails, the MAML module is loaded alone: its package's `__init__` files are skipped, nothing of
  the algorithm is replaced.
  """
  if "learn2learn.algorithms.maml" in sys.modules:
    return sys.modules["learn2learn.algorithms.maml"].MAML
  try:
    import learn2learn

    return learn2learn.algorithms.MAML
  except (ImportError, RuntimeError):
    import importlib
    import importlib.util
    import types

    for name in [m for m in sys.modules if m == "learn2learn" or m.startswith("learn2learn.")]:
      del sys.modules[name]  # the half-imported package
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
      raise
    for name, sub in (("learn2learn", ""), ("learn2learn.algorithms", "algorithms")):
      pkg = types.ModuleType(name)
      pkg.__path__ = [os.path.join(spec.submodule_search_locations[0], sub)]
      sys.modules[name] = pkg
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def make_l2l_step(model, meta_opt, steps, lr, mode):
  maml = l2l_maml()
  if mode == "anil":  # learn2learn's ANIL example: only the head goes through the MAML wrapper
    features, head = model.encoder, maml(model.head, lr=lr)
  else:
    features, head = None, maml(model, lr=lr, first_order=(mode == "first"))

  def step(sx, sy, qx, qy):
    meta_opt.zero_grad()
    num_tasks = sx.shape[0]
    total = 0.0
    for t in range(num_tasks):
      learner = head.clone()
      if features is None:
        s_in, q_in = sx[t], qx[t]
      else:
        s_in, q_in = features(sx[t]).flatten(1), features(qx[t]).flatten(1)
      for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(s_in), sy[t]))
      qloss = F.cross_entropy(learner(q_in), qy[t]) / num_tasks
      qloss.backward()
      total += qloss.detach().item()
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


def make_autograd_step(model, meta_opt, steps, lr, mode):
  """Plain `torch.autograd.grad` (`create_graph` unless first order), a loop over tasks: the
  reference of `--check`, not a timed peer."""
  from torch.func import functional_call

  names = [n for n, _ in model.named_parameters()]
  adapted = [n for n in names if n.startswith("head.")] if mode == "anil" else names

  def step(sx, sy, qx, qy):
    meta_opt.zero_grad()
    leaves = dict(model.named_parameters())
    total = 0.0
    for t in range(sx.shape[0]):
      fast = dict(leaves)
      for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (sx[t],)), sy[t])
        g = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=(mode != "first"))
        fast.update({n: fast[n] - lr * gn for n, gn in zip(adapted, g)})
      qloss = F.cross_entropy(functional_call(model, fast, (qx[t],)), qy[t]) / sx.shape[0]
      qloss.backward()
      total += qloss.detach().item()
    meta_opt.step()
    return total

  return step


def check_peers(names: list[str]) -> dict:
  """Each peer's first meta-update against plain autograd's, float64, at tiny shapes.

  Returns `{workload: {impl: max |update - reference| / max |reference|}}`: ~1e-15 when a peer
  computes MAML's meta-gradient exactly.
  """
  torch.set_default_dtype(torch.float64)
  out = {}
  for name in names:
    ways, shots, _, _, steps, lr, mode = WORKLOADS[name]
    updates = {}
    for impl, make in {"autograd": make_autograd_step, **IMPLS}.items():
      torch.manual_seed(0)
      model = make_model(name, ways, TINY["filters"])
      before = [p.detach().clone() for p in model.parameters()]
      make(model, torch.optim.SGD(model.parameters(), lr=1.0), steps, lr, mode)(
        *synthetic_tasks(ways, shots, TINY["queries"], TINY["meta_batch"], dtype=torch.float64,
                         name=name))
      updates[impl] = torch.cat([(b - p.detach()).flatten()
                                 for b, p in zip(before, model.parameters())])
    ref = updates.pop("autograd")
    out[name] = {impl: float((u - ref).abs().max() / ref.abs().max()) for impl, u in updates.items()}
  torch.set_default_dtype(torch.float32)
  return out


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


IMPLS = {"higher": make_higher_step, "l2l": make_l2l_step, "func": make_func_step}


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM, the resident high-water mark
    return True
  except OSError:
    return False


def _peak_rss_mb() -> float | None:
  try:
    with open("/proc/self/status") as f:
      kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024
  except (OSError, StopIteration):
    return None


def bench_one(name, impl, reps, warmup, tiny=False, seed=0, device="cpu"):
  ways, shots, queries, meta_batch, steps, lr, mode = WORKLOADS[name]
  filters = None
  if tiny:
    filters, meta_batch, queries = TINY["filters"], TINY["meta_batch"], TINY["queries"]
  torch.manual_seed(seed)
  device = torch.device(device)
  model = make_model(name, ways, filters).to(device)
  meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  step = IMPLS[impl](model, meta_opt, steps, lr, mode)
  batch = [t.to(device) for t in synthetic_tasks(ways, shots, queries, meta_batch, seed,
                                                  name=name)]
  cuda = device.type == "cuda"

  def run():  # a GPU step is timed to its end, not to its launch
    step(*batch)
    if cuda:
      torch.cuda.synchronize(device)

  reset = _reset_peak_rss()
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)
  load_before = os.getloadavg()
  t = time.perf_counter()
  for _ in range(warmup):
    run()
  warm_s = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return {"median_s": statistics.median(times), "min_s": min(times), "times": times,
          "warmup_s": warm_s, "load_before": load_before, "load_after": os.getloadavg(),
          "peak_rss_mb": _peak_rss_mb() if reset else None, "device": str(device),
          "device_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workloads", default="W1,W5,WFO")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU build of torch)")
  p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--json", default=None)
  p.add_argument("--check", action="store_true",
                 help="check each peer's meta-update against plain autograd (float64, tiny)")
  p.add_argument("--meta_grad", default=None, metavar="IN.npz,OUT.npz",
                 help="compute one float64 meta-gradient instead (torch_crosscheck.py)")
  args = p.parse_args(argv)
  if args.meta_grad:
    meta_gradient(*args.meta_grad.split(","))
    return 0
  torch.set_num_threads(args.threads)
  names = [n for n in args.workloads.split(",") if n]
  if args.check:
    for name, diffs in check_peers(names).items():
      print(f"{name}: " + ", ".join(f"{impl} {d:.1e}" for impl, d in diffs.items()), flush=True)
    return 0
  out = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "device": args.device,
                  "reps": args.reps, "warmup": args.warmup, "tiny": args.tiny,
                  "load_start": os.getloadavg()},
         "workloads": {}}
  from importlib import metadata

  for dist in ("higher", "learn2learn"):
    try:
      out["meta"][dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out["meta"][dist] = None
  for name in names:
    out["workloads"][name] = {}
    for impl in [i for i in args.impls.split(",") if i]:
      try:
        r = bench_one(name, impl, args.reps, args.warmup, args.tiny, device=args.device)
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
