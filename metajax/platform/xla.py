"""`jax.jit` with the XLA compiler options metajax compiles its steps with, per backend.

Why: on jax/jaxlib 0.10.2, XLA:CPU's algebraic simplifier (the `algsimp` pass) miscompiles
second-order meta-gradients of convolutional networks with BatchNorm: eager op-by-op runs and
central finite differences agree with each other, the compiled gradient does not
(`tests/platform/test_xla.py`; each case has a reproducer in `benchmarks/xla_cpu/`;
`docs/xla_cpu.md` has the minimal one and a report for XLA's tracker):

  * the inner loop unrolled (`lax.scan(..., unroll=True)`): a Conv-4 with 4 filters at 16x16,
    2 to 8 tasks, 2 to 5 steps, 1e-2 to 3e-1 off in float64 (`xla_cpu/sweep.py`);
  * one inner step of conv -> BatchNorm -> 2x2 max-pool -> linear head on 4x4 or 8x8 images
    (`xla_cpu/minimal.py`, standalone: JAX only), 1e-2 to 1e-1 off;
  * float64 at 48 channels or more: the Hessian-vector product through conv -> BatchNorm ->
    max-pool is NaN or 1e-1 off (`xla_cpu/f64_width.py`), and so is a 64-filter Conv-4's
    20-way 1-shot meta-gradient with 5 inner steps;
  * max-pooling differentiated by `jnp.max`'s rule (XLA recomputed a fused input with different
    rounding for the max and for the comparison with it): `metajax.nn.conv.max_pool_2x2` routes the
    tangent through one argmax, which compiles right either way.

With `xla_disable_hlo_passes=algsimp` every one of these equals the op-by-op gradient to float64
rounding (1e-15 to 1e-12), rolled and unrolled, at every width (the sweep: 16 of 16 right; the
64-filter 20-way Conv-4 2.7e-15 where the fusion-emitter option below gave NaN). It is also the
fastest option measured for Conv-4 meta-steps with the inner loop unrolled, which is why
`make_meta_step` unrolls short inner loops (`docs/BENCHMARKS.md`). (The earlier option,
`xla_cpu_use_fusion_emitters=False`, was right only with the inner loop rolled and below 48
channels in float64; `algsimp` off with the old emitters does not compile metajax's im2col
convolution: "negative padding in IrEmitter".) The options are given per compiled function
(`jax.jit(..., compiler_options=...)`), so they touch only metajax's own programs, not the rest of
the process. Other backends get no extra options.

Every jitted step the library builds goes through `metajax.platform.xla.jit`; wrap your own jitted
gradients of metajax models with it too (plain `jax.jit` is wrong in the cases above), and check a
new formulation on small inputs with `eager_mismatch` (compiled against op by op) before trusting
it at scale.

Which jaxlib versions: `VERIFIED_JAXLIB` lists those on which the reproducers were run, wrong under
plain `jax.jit` and right with the option. On any other jaxlib the option is still applied, and
the first CPU compilation warns once (`UnverifiedJaxlibWarning`) that it is unverified there.
Applied, because turning an optimisation pass off cannot make a program wrong (at worst slower),
while leaving it on where the miscompile persists gives wrong meta-gradients without any error;
the warning says how to check the new version. The day a jaxlib compiles the minimal reproducer
right without the option, the slow test `test_minimal_reproducer_under_the_installed_jaxlib`
fails and says so: run every reproducer of `benchmarks/xla_cpu/` there, and drop the option for
the versions on which all of them are right.

Speed, per CPU family: besides the correctness option, XLA:CPU is given the options measured
fastest on the host's family of vector units (`CPU_TUNING`, keyed by `metajax.platform.cpu.family`:
"avx512-intel", "avx512-amd", "avx2", "baseline"), e.g. 512-bit vectors on Intel's AVX-512 CPUs,
where XLA's default of 256 leaves half of every vector unit idle. They change which instructions compute a result, never
what is computed: every option in the table passed the float64 exactness tests above on its
family (`tests/platform/test_xla.py` runs them under the options in effect). The choice: the
`tuning` argument of `compiler_options` / `jit`, else the environment variable
`METAJAX_XLA_CPU_TUNING`, else "auto" (the host's family); "off" gives the correctness option
alone, a family name that family's row on any CPU (to compare). The options a run compiled with
are printed by the benchmark and stored with its results.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jaxlib

from metajax.platform import cpu

__all__ = [
  "CPU_COMPILER_OPTIONS",
  "CPU_TUNING",
  "TUNING_ENV",
  "VERIFIED_JAXLIB",
  "UnverifiedJaxlibWarning",
  "compiler_options",
  "eager_mismatch",
  "jit",
  "parse_tuning",
  "tuning_options",
  "verified",
]

# Per-backend XLA options for correctness (see the module docstring).
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_disable_hlo_passes": "algsimp"}

# CPU family -> speed options measured fastest there and exact under the float64 tests (see the
# module docstring; docs/BENCHMARKS.md has the measurements).
CPU_TUNING: dict[str, dict[str, Any]] = {
  # 512-bit units: XLA's default vector width of 256 leaves half of each idle.
  "avx512-intel": {"xla_cpu_prefer_vector_width": 512},
  # Zen 4 splits 512-bit instructions in two: 512-bit vectors measured no faster there.
  "avx512-amd": {},
  "avx2": {},
  "baseline": {},
}
TUNING_ENV = "METAJAX_XLA_CPU_TUNING"
_TUNING_MODES = ("auto", "off")

# jaxlib version -> what was run on it: each reproducer wrong under plain jit, right with
# CPU_COMPILER_OPTIONS. Add a version only after running them all there.
VERIFIED_JAXLIB: dict[str, str] = {
  "0.10.2": "benchmarks/xla_cpu/{minimal,miscompile,sweep,f64_width}.py and tests/platform/"
            "test_xla.py: plain jit 1e-2 to 3e-1 off (or NaN) in float64, algsimp off 1e-15",
}

_warned = False


class UnverifiedJaxlibWarning(UserWarning):
  """metajax's XLA:CPU option is applied on a jaxlib it was not verified on."""


def verified(version: str | None = None) -> bool:
  """Whether `CPU_COMPILER_OPTIONS` were verified on jaxlib `version` (default: the installed)."""
  return (version or jaxlib.__version__) in VERIFIED_JAXLIB


def _warn_once_if_unverified() -> None:
  global _warned
  if _warned or verified():
    return
  _warned = True
  warnings.warn(
    f"metajax compiles on XLA:CPU with {CPU_COMPILER_OPTIONS} (the algebraic simplifier "
    f"miscompiles second-order meta-gradients on jaxlib {', '.join(VERIFIED_JAXLIB)}); jaxlib "
    f"{jaxlib.__version__} is not verified: the option is still applied (it keeps gradients "
    f"right and can only cost speed). To check this version: python benchmarks/xla_cpu/"
    f"minimal.py --size=8 (the 'emitters on' column is plain jax.jit)",
    UnverifiedJaxlibWarning, stacklevel=3)


def parse_tuning(value: str | None) -> str:
  """Checks a tuning choice: "auto", "off" or a family of `CPU_TUNING` (None: the environment
  variable `METAJAX_XLA_CPU_TUNING`, else "auto"). Returns it lower-cased."""
  where = "tuning"
  if value is None:
    value, where = os.environ.get(TUNING_ENV) or "auto", TUNING_ENV
  choice = str(value).strip().lower()
  if choice not in _TUNING_MODES and choice not in CPU_TUNING:
    allowed = ", ".join(repr(c) for c in (*_TUNING_MODES, *CPU_TUNING))
    raise ValueError(f"{where}={value!r} is not an XLA:CPU tuning choice; allowed: {allowed}")
  return choice


@functools.cache
def _host_family() -> str:
  return cpu.cpu_info().family


def tuning_options(tuning: str | None = None) -> dict[str, Any]:
  """The speed options of `CPU_TUNING` that `tuning` selects (see `parse_tuning`): the host's
  family for "auto", none for "off", the named family's otherwise."""
  choice = parse_tuning(tuning)
  if choice == "off":
    return {}
  return dict(CPU_TUNING[_host_family() if choice == "auto" else choice])


def compiler_options(backend: str | None = None, *, tuning: str | None = None) -> dict[str, Any]:
  """The options metajax compiles with on `backend` (default: `jax.default_backend()`).

  On CPU: `CPU_COMPILER_OPTIONS` (correctness, always) and the speed options `tuning` selects
  (`tuning_options`); other backends get none. With a jaxlib outside `VERIFIED_JAXLIB`, the
  first call warns once (`UnverifiedJaxlibWarning`); the options are the same.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return {}
  _warn_once_if_unverified()
  return {**tuning_options(tuning), **CPU_COMPILER_OPTIONS}


def jit(fun: Callable[..., Any], *, tuning: str | None = None, **kwargs: Any) -> Any:
  """`jax.jit(fun, **kwargs)` with `compiler_options(tuning=tuning)` merged under any given ones.

  Options the caller passes in `compiler_options=` win over metajax's.
  """
  options = {**compiler_options(tuning=tuning), **(kwargs.pop("compiler_options", None) or {})}
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
