"""What metajax does about the machine it runs on; the math does not depend on it.

- `xla`: `jit` with the compiler options metajax's steps compile with (on XLA:CPU, the guard
  against the miscompiles of second-order meta-gradients in `docs/xla_cpu.md`, and the speed
  options measured fastest on the host's CPU family), and `eager_mismatch` to check a compiled
  function against op-by-op execution.
- `cpu`: the host CPU's model, vector ISA features and family.
- `runtime`: start-up of a binary's process (`prepare_process`): glibc's huge-page malloc for
  XLA:CPU's large step buffers, announced and switchable, and no note about a missing libtpu.
- `sharding`: the meta-batch's tasks over a device mesh, parameters replicated.
"""

from metajax.platform import cpu, runtime, sharding, xla

__all__ = ["cpu", "runtime", "sharding", "xla"]
