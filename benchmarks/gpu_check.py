"""The accelerator check: metajax's exactness on the device, then its speed against PyTorch there.

One command does the whole check, sized to fit a few minutes of a lent GPU machine:

  1. the machine: jax's backend and devices, torch's CUDA device, the versions;
  2. exactness on the default device, float64: the second-order MAML meta-gradient of a small
     Conv-4 (the backend's default convolution and metajax's batch-statistics BatchNorm) against
     central differences along random directions and against the same function run op by op
     (`metajax.platform.xla.eager_mismatch`), first-order MAML likewise, and BatchNorm's
     derivatives to second order (`jax.test_util.check_grads`); float32's compiled/op-by-op gap
     is reported beside them (on GPUs XLA may use TF32 for float32 convolutions);
  3. the benchmark workloads (W1, W5, WFO, W20, M1 by default) through `benchmarks/bench.py`, with
     the PyTorch peers (`higher`, `torch.func`; learn2learn where installed) on the same device
     (`--torch_device=cuda`);
  4. one table on stdout and one JSON (`--json`) with everything.

`--dry` runs the same code on CPU with tiny shapes (the benchmark's `--tiny`, the peers on CPU),
so CI keeps it from rotting. Exit status 1 when an exactness check fails or a workload errs.

  python benchmarks/gpu_check.py --json=$OUT/gpu_check.json      # on the GPU machine
  python benchmarks/gpu_check.py --dry --json=/tmp/gpu_check.json  # anywhere, in a minute or two

`benchmarks/gpu_check.sh` wraps it for a machine without network (carried wheels, a timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

F64_RTOL = 1e-8  # compiled against op by op, float64 (right programs: ~1e-15)
FD_RTOL = 1e-5  # directional derivative against central differences, float64, eps 1e-5


def environment() -> dict[str, Any]:
  """What runs here: jax's backend and devices, torch's CUDA device if torch imports."""
  import jax
  import jaxlib

  env: dict[str, Any] = {
    "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
    "backend": jax.default_backend(),
    "devices": [getattr(d, "device_kind", str(d)) for d in jax.devices()],
  }
  try:
    import torch

    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  except ImportError:
    env["torch"] = None
  return env


def _problem(dry: bool, dtype):
  """A small Conv-4 (the backend's default convolution), its params and 2 random tasks."""
  import jax
  import jax.numpy as jnp

  import metajax as mj

  side, blocks, filters = (8, 2, 4) if dry else (16, 4, 8)
  encoder = mj.nn.models.Conv4Encoder(filters=filters, num_blocks=blocks,
                                      activation=jax.nn.softplus, dtype=dtype)
  model = mj.model_from_encoder(encoder, 3, (side, side, 1), dtype=dtype)
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0)))
  k1, k2 = jax.random.split(jax.random.key(1))
  tasks = mj.Task(jax.random.normal(k1, (2, 3, side, side, 1), dtype),
                  jnp.tile(jnp.arange(3), (2, 1)),
                  jax.random.normal(k2, (2, 6, side, side, 1), dtype),
                  jnp.tile(jnp.arange(3).repeat(2), (2, 1)))
  return model, params, tasks


def _directional_error(loss: Callable, grad, params, key, eps: float = 1e-5) -> float:
  """|<g, v> - (L(p + eps v) - L(p - eps v)) / 2 eps| / |<g, v>| for a random unit v."""
  import jax
  import jax.numpy as jnp

  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  v = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(a * a) for a in v))
  v = jax.tree.unflatten(tree, [a / norm for a in v])
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * d, params, v)  # noqa: E731
  fd = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
  exact = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
  return float(jnp.abs(exact - fd) / jnp.maximum(jnp.abs(exact), 1e-30))


def exactness(dry: bool) -> list[dict[str, Any]]:
  """The checks of step 2, each `{"check", "value", "tolerance", "ok"}` (`ok` None: reported)."""
  import jax
  import jax.numpy as jnp
  from jax.test_util import check_grads

  import metajax as mj
  from metajax.platform import xla

  rows = []

  def row(check: str, value: float, tolerance: float | None) -> None:
    rows.append({"check": check, "value": value, "tolerance": tolerance,
                 "ok": None if tolerance is None else bool(value < tolerance)})

  with jax.enable_x64(True):
    model, params, tasks = _problem(dry, jnp.float64)
    for order, first_order in (("second order", False), ("first order", True)):
      learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1,
                        first_order=first_order)
      loss = lambda p, learner=learner: mj.meta_loss(p, tasks, learner)  # noqa: E731
      grad_fn = jax.grad(loss)
      if not first_order:  # FOMAML's gradient is not the loss's: only op by op applies to it
        grad = xla.jit(grad_fn)(params)
        errors = [_directional_error(xla.jit(loss), grad, params, jax.random.key(i))
                  for i in range(3)]
        row(f"float64 {order} meta-gradient vs central differences (3 directions)",
            max(errors), FD_RTOL)
      row(f"float64 {order} meta-gradient, compiled vs op by op",
          xla.eager_mismatch(grad_fn, params), F64_RTOL)
    kx, ks = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (6, 4, 4, 3), jnp.float64)
    scale, bias = 1 + 0.1 * jax.random.normal(ks, (3,), jnp.float64), jnp.full((3,), 0.2)
    norm = lambda x, s, b: jnp.sum(jnp.sin(mj.nn.norm.batch_stat_norm(x, s, b)) * x)  # noqa: E731
    try:
      check_grads(norm, (x, scale, bias), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)
      error = None
    except AssertionError as e:
      error = str(e)[:500]
    rows.append({"check": "float64 BatchNorm (batch statistics) derivatives to second order, "
                          "check_grads", "value": None, "tolerance": 1e-6, "ok": error is None,
                 **({"error": error} if error else {})})
  model, params, tasks = _problem(dry, jnp.float32)
  learner = mj.MAML(model.apply, mj.cross_entropy, num_inner_steps=2, inner_lr=0.1)
  row("float32 second-order meta-gradient, compiled vs op by op (reported: TF32 on GPUs)",
      xla.eager_mismatch(jax.grad(lambda p: mj.meta_loss(p, tasks, learner)), params), None)
  return rows


def benchmark(dry: bool, workloads: str, reps: int, timeout: float) -> dict[str, Any]:
  """`bench.py` on `workloads` with the peers on this device; its JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), f"--workloads={workloads}",
           f"--torch_workloads={workloads}", f"--reps={reps}", "--warmup=1", "--nodata",
           f"--json={out}", f"--timeout={timeout}",
           f"--torch_device={'cpu' if dry else 'cuda'}"] + (["--tiny"] if dry else [])
    if dry:
      cmd.append("--nobaseline")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * 4)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["returncode"] = proc.returncode
    result["table"] = proc.stdout.strip()
    if proc.returncode:
      result["stderr"] = proc.stderr[-3000:]
    return result


def format_exactness(rows: list[dict[str, Any]]) -> str:
  lines = ["check | value | tolerance | result", "---|---|---|---"]
  for r in rows:
    value = "-" if r["value"] is None else f"{r['value']:.1e}"
    tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.0e}"
    ok = {True: "ok", False: "FAIL", None: "reported"}[r["ok"]]
    lines.append(f"{r['check']} | {value} | {tol} | {ok}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dry", action="store_true", help="CPU, tiny shapes: the same code path")
  p.add_argument("--workloads", default=None,
                 help="default W1,W5,WFO,W20,M1 (with --dry: W1, to stay short)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--timeout", type=float, default=300, help="per benchmark subprocess, seconds")
  p.add_argument("--json", default=None, help="write everything there (atomically)")
  p.add_argument("--skip_benchmark", action="store_true", help="exactness only")
  args = p.parse_args(argv)
  if args.dry:
    os.environ["JAX_PLATFORMS"] = "cpu"
  start = time.time()
  result: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "dry": args.dry, "environment": environment()}
  env = result["environment"]
  print(f"gpu_check{' (dry: CPU, tiny shapes)' if args.dry else ''}: jax {env['jax']} on "
        f"{env['backend']} {env['devices']}; torch {env.get('torch')} "
        f"(CUDA device: {env.get('torch_cuda')})", flush=True)
  if not args.dry and env["backend"] == "cpu":
    print("gpu_check: jax sees no accelerator here; run with --dry for the CPU check",
          file=sys.stderr)
    return 1
  result["exactness"] = exactness(args.dry)
  print(format_exactness(result["exactness"]), flush=True)
  failed = [r["check"] for r in result["exactness"] if r["ok"] is False]
  if not args.skip_benchmark:
    workloads = args.workloads or ("W1" if args.dry else "W1,W5,WFO,W20,M1")
    result["benchmark"] = benchmark(args.dry, workloads, args.reps, args.timeout)
    print(result["benchmark"]["table"], flush=True)
    errors = [n for n, r in result["benchmark"].get("workloads", {}).items() if "error" in r]
    if result["benchmark"]["returncode"] or errors:
      failed.append(f"benchmark (exit {result['benchmark']['returncode']}; errors in {errors})")
  result["seconds"] = time.time() - start
  result["failed"] = failed
  if args.json:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
  print(f"gpu_check: {len(failed)} failed in {result['seconds']:.0f} s" +
        (f": {'; '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
