"""`jax.jit` with the XLA compiler options metajax compiles its steps with, per backend.

Why: on jax/jaxlib 0.10.2, XLA:CPU's algebraic simplifier (the `algsimp` pass) miscompiles
second-order meta-gradients of convolutional networks with BatchNorm: eager op-by-op runs and
central finite differences agree with each other, the compiled gradient does not
(`tests/platform/test_xla.py`; each case has a reproducer in `benchmarks/`, history in
`docs/BENCHMARKS.md`):

  * the inner loop unrolled (`lax.scan(..., unroll=True)`): a Conv-4 with 4 filters at 16x16,
    2 to 8 tasks, 2 to 5 steps, 1e-2 to 3e-1 off in float64 (`xla_cpu_sweep.py`);
  * one inner step of conv -> BatchNorm -> 2x2 max-pool -> linear head on 4x4 or 8x8 images
    (`xla_cpu_minimal.py`, standalone: JAX only), 1e-2 to 1e-1 off;
  * float64 at 48 channels or more: the Hessian-vector product through conv -> BatchNorm ->
    max-pool is NaN or 1e-1 off (`xla_cpu_f64_width.py`), and so is a 64-filter Conv-4's
    meta-gradient at the benchmark's W20 shapes;
  * max-pooling differentiated by `jnp.max`'s rule (XLA recomputed a fused input with different
    rounding for the max and for the comparison with it): `metajax.nn.conv.max_pool_2x2` routes the
    tangent through one argmax, which compiles right either way.

With `xla_disable_hlo_passes=algsimp` every one of these equals the op-by-op gradient to float64
rounding (1e-15 to 1e-12), rolled and unrolled, at every width (session 9; the sweep 16 of 16,
W20's shapes at 64 filters 2.7e-15 where the previous option gave NaN). It is also the fastest
option measured for the Conv-4 meta-steps with the inner loop unrolled (W5 and W20 13-17%
faster than session 8's default, `docs/BENCHMARKS.md`). (The previous option,
`xla_cpu_use_fusion_emitters=False`, was right only with the inner loop rolled and below 48
channels in float64; `algsimp` off with the old emitters does not compile metajax's im2col
convolution: "negative padding in IrEmitter".) The options are given per compiled function
(`jax.jit(..., compiler_options=...)`), so they touch only metajax's own programs, not the rest of
the process. Other backends get no extra options.

Every jitted step the library builds goes through `metajax.platform.xla.jit`; wrap your own jitted
gradients of metajax models with it too (plain `jax.jit` is wrong in the cases above), and check a
new formulation on small inputs with `eager_mismatch` (compiled against op by op) before trusting
it at scale.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "eager_mismatch", "jit"]

# Per-backend XLA options for correctness (see the module docstring).
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_disable_hlo_passes": "algsimp"}


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


def eager_mismatch(fun: Callable[..., Any], *args: Any,
                   jit: Callable[[Callable[..., Any]], Callable[..., Any]] = jit) -> float:
  """How far the compiled `fun(*args)` is from the same function run op by op.

  Runs `fun` compiled by `jit` (default: this module's) and under `jax.disable_jit()`, and returns
  max |compiled - eager| / max |eager| over every leaf of the output pytree. In float64 a right
  compilation gives ~1e-15; the miscompiles in this module's docstring gave 1e-3 to 1e-1. Eager
  runs are slow: use it on small inputs (a few tasks, small images), where those bugs showed.

  Args:
    fun: the function to check, e.g. `jax.grad(meta_loss)`.
    *args: its arguments.
    jit: how to compile it (e.g. `jax.jit` to check plain JAX's compilation).

  Returns:
    The largest absolute difference, relative to the largest absolute eager value (0.0 when the
    eager output is all zeros and the compiled one equals it).
  """
  compiled = jax.tree.leaves(jit(fun)(*args))
  with jax.disable_jit():
    eager = jax.tree.leaves(fun(*args))
  if len(compiled) != len(eager):
    raise ValueError(f"compiled and eager outputs differ in structure: {len(compiled)} vs "
                     f"{len(eager)} leaves")
  if not eager:
    return 0.0
  def as_float(a):  # bool and int outputs compare too
    a = jnp.asarray(a)
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))

  compiled, eager = [as_float(c) for c in compiled], [as_float(e) for e in eager]
  diff = max(float(jnp.max(jnp.abs(c - e))) for c, e in zip(compiled, eager))
  scale = max(float(jnp.max(jnp.abs(e))) for e in eager)
  return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
