"""`jax.jit` with the XLA compiler options metajax compiles its steps with, per backend.

Why: on jax/jaxlib 0.10.2, XLA:CPU's fusion emitters have miscompiled second-order meta-gradients
of a small Conv-4 (`benchmarks/xla_cpu_miscompile.py` reproduces each case; eager op-by-op runs
and central finite differences agree with each other, `tests/test_xla.py`):

  * with 2 inner steps and the inner loop unrolled (`lax.scan(..., unroll=True)`), the gradient
    was 11% off in float32 and 4% in float64 with BatchNorm differentiated through its formula;
    with `metajax.norm`'s JVP rule that case is right, but a 2-task one is wrong with the
    emitters *off* (`xla_cpu_miscompile.py --tasks=2 --activation=softplus --dtype=float64`).
    The cause is not known. metajax's inner loop is rolled by default, which compiled right in
    every case tried, under either setting;
  * with 1 inner step, rolled, when max-pooling was differentiated by `jnp.max`'s rule (20% off):
    XLA recomputed a fused input with different rounding for the max and for the comparison with
    it. `metajax.conv.max_pool_2x2` now routes the tangent through one argmax, which compiles
    right either way.

With `xla_cpu_use_fusion_emitters=False` XLA:CPU uses its older loop emitters, and every case
above is right, including the two that are wrong under plain `jax.jit`. The measured Conv-4
meta-steps are as fast, but for W20 (20-way, 5 inner steps), which may be 10-15% slower
(`docs/BENCHMARKS.md`, one A/B run). metajax keeps it as a guard for the miscompile it cannot
explain. The option is given per compiled function
(`jax.jit(..., compiler_options=...)`), so it touches only metajax's own programs, not the rest of
the process. Other backends get no extra options.

Every jitted step the library builds goes through `metajax.xla.jit`; wrap your own jitted
gradients of metajax models with it too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "jit"]

# Per-backend XLA options for correctness (see the module docstring).
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
  """The options metajax compiles with on `backend` (default: `jax.default_backend()`)."""
  backend = backend or jax.default_backend()
  return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else {}


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
  """`jax.jit(fun, **kwargs)` with `compiler_options(...)` merged under any given ones.

  Options the caller passes in `compiler_options=` win over metajax's.
  """
  options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
  return jax.jit(fun, compiler_options=options or None, **kwargs)
