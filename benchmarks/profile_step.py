r"""Where the time of one meta-step goes: XLA ops grouped by kind, from a JAX profiler trace.

Builds a workload's step exactly as `bench.py` does (synthetic inputs of its shapes), runs it
twice to compile and warm up, then traces one step with `jax.profiler.trace` (XLA:CPU emits one
trace event per executed op when `--xla_cpu_enable_xprof_traceme=true`, which this script adds to
XLA_FLAGS) and sums the events' durations by op name with its numeric suffix removed
(`ynn_fusion.24` -> `ynn_fusion`). Independent ops may run concurrently on different threads, so
the sum can exceed the step's wall time.

  python benchmarks/profile_step.py --workload=WFO            # table of the top op kinds
  python benchmarks/profile_step.py --workload=W1 --top=40 --conv=lax

How to read the op kinds on CPU: `ynn_fusion` / `dot` are matrix multiplications (YNNPACK /
Eigen), `pad_slice_fusion` + `concatenate` build im2col patches, `add_slice_fusion` sums them back
(their transpose), `copy_*` are layout changes (often fused with BatchNorm's backward),
`broadcast_*` / `multiply_*` BatchNorm, `compare_*` / `*select*` the max-pool's derivative.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()


def op_kind_times(trace_dir: str | os.PathLike[str]) -> tuple[dict[str, float], dict[str, int]]:
  """`(kind -> total ms, kind -> count)` of the XLA op events in a perfetto trace directory."""
  files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {str(trace_dir)!r}")
  events = json.load(gzip.open(files[-1]))["traceEvents"]
  total: dict[str, float] = collections.Counter()
  count: dict[str, int] = collections.Counter()
  for e in events:
    name = e.get("name", "")
    # complete events of XLA ops only: not Python frames ($...), not the executor's spans
    if e.get("ph") != "X" or name.startswith("$") or "::" in name or "(" in name:
      continue
    kind = re.sub(r"\.\d+$", "", name)
    total[kind] += e["dur"] / 1e3
    count[kind] += 1
  return dict(total), dict(count)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workload", default="WFO")
  p.add_argument("--conv", default="default", choices=["default", "lax", "im2col"])
  p.add_argument("--top", type=int, default=20)
  args = p.parse_args(argv)

  import jax

  import bench

  if args.workload not in bench.WORKLOADS:
    p.error(f"--workload={args.workload!r}: choose from {', '.join(bench.WORKLOADS)}")
  meta_step, state, tasks, _, _ = bench.build_workload(bench.WORKLOADS[args.workload],
                                                       {"conv": args.conv})
  for _ in range(2):
    state, metrics = meta_step.step(state, tasks)
    jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      state, metrics = meta_step.step(state, tasks)
      jax.block_until_ready(metrics)
    wall = time.perf_counter() - start
    total, count = op_kind_times(trace_dir)
  ops = sum(total.values())
  print(f"{args.workload} (conv {args.conv}): traced step {wall:.2f} s wall (tracing included), "
        f"{ops / 1e3:.2f} s summed over ops, load {os.getloadavg()[0]:.1f}")
  print(f"{'op kind':32s} {'ms':>9s} {'share':>6s} {'count':>5s}")
  for kind, ms in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"{kind:32s} {ms:9.1f} {100 * ms / ops:5.1f}% {count[kind]:5d}")
  return 0


if __name__ == "__main__":
  from metajax.platform import runtime

  runtime.reexec_with_hugepages()  # profile the malloc the binaries use
  sys.exit(main())
