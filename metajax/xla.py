"""`jax.jit` with the XLA compiler options metajax compiles its steps with, per backend.

Why: on jax/jaxlib 0.10.2, XLA:CPU has miscompiled second-order meta-gradients of small
convolutional networks (`benchmarks/xla_cpu_miscompile.py` and `xla_cpu_minimal.py` reproduce
each case; eager op-by-op runs and central finite differences agree with each other,
`tests/test_xla.py`):

  * with 2 inner steps and the inner loop unrolled (`lax.scan(..., unroll=True)`), the gradient
    was 11% off in float32 and 4% in float64 with BatchNorm differentiated through its formula;
    with `metajax.norm`'s JVP rule that case is right, but a 2-task one is wrong with the
    emitters *off* (`xla_cpu_miscompile.py --tasks=2 --activation=softplus --dtype=float64`).
    The cause is not known. metajax's inner loop is rolled by default, which compiled right in
    every case tried, under either setting;
  * with 1 inner step, rolled, when max-pooling was differentiated by `jnp.max`'s rule (20% off):
    XLA recomputed a fused input with different rounding for the max and for the comparison with
    it. `metajax.conv.max_pool_2x2` now routes the tangent through one argmax, which compiles
    right either way;
  * a one-step meta-gradient of a network as small as one conv -> BatchNorm -> 2x2 max-pool ->
    linear head, 2 tasks of 4x4 images (`benchmarks/xla_cpu_minimal.py`, standalone: JAX only):
    with the inner step written without a loop it is wrong under either emitter setting (1e-2 to
    1e-1); inside a `lax.scan` it is wrong with the emitters on at 8x8 images or 8 tasks, and
    right with them off. Disabling XLA's `algsimp` pass makes every case right, but metajax's
    im2col Conv-4 did not compile without it (a negative padding left for the emitter);
  * through `jax.lax.conv_general_dilated` (instead of `metajax.conv`'s im2col convolution, the
    CPU default), even metajax's guarded path is wrong: a Conv-4 at 16x16 with 1 inner step, or
    with 2 or 3 and `remat`, 3e-1 to 6e-1 off. The models warn when given it on CPU;
  * in float64 only, at 48 channels or more: the Hessian-vector product of one conv ->
    BatchNorm -> 2x2 max-pool -> linear head is NaN or 7e-2 to 8e-1 off under either emitter
    setting (`benchmarks/xla_cpu_f64_width.py`), and so is a 64-filter Conv-4's second-order
    meta-gradient; 16 and 32 channels are right, and so is float32 at every width. Check a
    full-width network's float64 meta-gradient op by op (`jax.disable_jit()`), not compiled
    (`Conv4Encoder` warns when traced in float64 on CPU with more than 32 filters);
  * the unrolled inner loop at the benchmark's W20 shapes (64 filters, 5 steps): 1.9e-2 off in
    float32, where the rolled loop is right (1.1e-6 against float64 op by op).

With `xla_cpu_use_fusion_emitters=False` XLA:CPU uses its older loop emitters. Together with the
inner loop in a rolled `lax.scan` (`metajax.adapt`, even for one step), the one-argmax max-pool
derivative and the im2col convolution, it was right in every float32 case above and in every
float64 one below 48 channels; none of them alone was. The measured Conv-4 meta-steps are as
fast with it (W20, 20-way with 5 inner steps, within the drift in session 6's A/B,
`docs/BENCHMARKS.md`). The option is given per compiled function (`jax.jit(...,
compiler_options=...)`), so it touches only metajax's own programs, not the rest of the process.
Other backends get no extra options.

Every jitted step the library builds goes through `metajax.xla.jit`; wrap your own jitted
gradients of metajax models with it too, and check a new formulation on small inputs with
`eager_mismatch` (compiled against op by op) before trusting it at scale.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "eager_mismatch", "jit"]

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
