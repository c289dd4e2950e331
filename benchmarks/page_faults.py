r"""Page faults and system time of one big jitted step: why metajax.platform.runtime exists.

By default, one fwd+bwd of a 3x3 convolution (metajax's im2col path) over a [2560, 14, 14, 64]
batch, the second Conv-4 layer of a W1 meta-batch (32 tasks x 80 images): its patch matrix alone
is 1.2 GB. With `--workload=W1` (any name of bench.py), that workload's whole meta-step, built as
bench.py builds it. Each timed call reports wall time, minor page faults and user/system CPU time
of this process (`getrusage`). Run it under different malloc settings to compare, e.g.

  python benchmarks/page_faults.py                                        # glibc defaults
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/page_faults.py  # what the binaries use
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/page_faults.py --workload=W1

This script does not re-execute itself: the environment it is started with is what it measures.
Where the kernel reports free pages to a hypervisor (`page_reporting`, e.g. a Firecracker or
cloud VM), the last column is how much memory it reported during the call: memory this process
freed and the host took back, which the next call must fault in from the host again.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time


_REPORTED = "/sys/module/page_reporting/parameters/reported_kib"


def _reported_mib() -> float | None:
  """Free memory the guest kernel has reported to the host so far (MiB), None without it."""
  try:
    with open(_REPORTED) as f:
      return int(f.read()) / 1024
  except (OSError, ValueError):
    return None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--batch", type=int, default=2560, help="images in the convolution's batch")
  p.add_argument("--workload", default=None, help="a bench.py workload instead of the convolution")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from metajax.nn import conv
  from metajax.platform import runtime

  if args.workload:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench

    if args.workload not in bench.WORKLOADS:
      p.error(f"--workload={args.workload!r}: choose from {', '.join(bench.WORKLOADS)}")
    meta_step, state, tasks, _, _ = bench.build_workload(bench.WORKLOADS[args.workload],
                                                         {"conv": "default"})
    carry = [state]

    def call():  # the state is threaded through, as in training (the step may donate it)
      carry[0], metrics = meta_step.step(carry[0], tasks)
      return metrics
  else:
    x = jax.random.normal(jax.random.key(0), (args.batch, 14, 14, 64))
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, 64, 64))

    def loss(x, w):
      y = conv.conv_general_dilated_im2col(x, w, (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.sum(jnp.tanh(y))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def call():
      return grad(x, w)

  jax.block_until_ready(call())  # compile and first touch
  print(f"{args.workload or 'conv fwd+bwd'}: GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', '')!r} THP mode {runtime.thp_mode()!r} "
        f"load {os.getloadavg()[0]:.1f}")
  print(f"{'call':>4s} {'wall s':>7s} {'minor faults':>12s} {'sys s':>6s} {'user s':>6s} "
        f"{'reported MiB':>12s}")
  for i in range(args.reps):
    m0, r0, t0 = _reported_mib(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(call())
    wall = time.perf_counter() - t0
    r1, m1 = resource.getrusage(resource.RUSAGE_SELF), _reported_mib()
    reported = f"{m1 - m0:12.0f}" if m0 is not None and m1 is not None else f"{'-':>12s}"
    print(f"{i:4d} {wall:7.3f} {r1.ru_minflt - r0.ru_minflt:12d} {r1.ru_stime - r0.ru_stime:6.2f} "
          f"{r1.ru_utime - r0.ru_utime:6.2f} {reported}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
