"""Metric writers for the training loop: JSON lines, TensorBoard, a progress line, and plots.

Metrics are flat dicts of scalars named `inner/...`, `outer/...`, `eval/...`, `test/...`.

* `IntervalMeans`: the per-step metrics since the last log line, whose means a log line writes;
  its `state()` is JSON that `IntervalMeans.from_state` restores exactly (a checkpoint stores it,
  so a run resumed between two log lines writes the averages an uninterrupted run writes).
* `JsonlWriter`: one JSON object per line, `{"step": s, "time": t, name: value, ...}` in
  `<workdir>/metrics.jsonl`; on resume, lines of steps after the restored checkpoint are dropped
  (`truncate_after`) so the file describes exactly one run.
* `TensorBoardWriter`: TF event files via `tensorboardX`: the scalars, and the run's config as
  text and as hyper-parameters (`write_config`).
* `ProgressLine`: on a terminal a `tqdm` bar (rate, ETA, the latest metrics as its postfix);
  elsewhere (CI logs, files, notebooks) plain lines,
  `step 120/3000 (4%) | 5.1 steps/s | ETA 9m25s | outer/loss 0.913 ...`.
* `read_metrics` / `plot_learning_curves`: a workdir's metrics as PNG learning curves;
  `plot_comparison` (with `mean_over_runs` for seeds): one metric of several runs. Figures are
  drawn on `matplotlib.figure.Figure` objects with the Agg canvas: no display needed, and
  pyplot's global backend (a notebook's inline figures) is left as it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
Scalars = Mapping[str, float]


def _scalar(value: Any) -> float | int:
  value = np.asarray(value)
  if value.shape != ():
    raise ValueError(f"metrics must be scalars, got shape {value.shape}")
  return value.item()


class IntervalMeans:
  """The scalars of each step since the last log line; `pop_means` averages and clears them.

  Values keep their dtype (float32 metrics are averaged in float32, as numpy does), and `state()`
  records it: a `from_state` copy gives bit-identical means.
  """

  def __init__(self) -> None:
    self._records: list[tuple[int, dict[str, np.ndarray]]] = []

  def add(self, step: int, scalars: Scalars) -> None:
    """Records step `step`'s scalars (the steps since the last log line, in order)."""
    self._records.append((int(step), {k: np.asarray(v) for k, v in scalars.items()}))

  def __len__(self) -> int:
    return len(self._records)

  @property
  def steps(self) -> list[int]:
    return [step for step, _ in self._records]

  def pop_means(self) -> dict[str, float]:
    """The mean of each metric (those of the latest step) over the recorded steps; then clears
    them. Empty when nothing was recorded."""
    if not self._records:
      return {}
    means = {k: float(np.mean([m[k] for _, m in self._records])) for k in self._records[-1][1]}
    self._records.clear()
    return means

  def state(self) -> dict[str, Any]:
    """The recorded steps as JSON: `{"records": [[step, {name: value}], ...], "dtypes": {name:
    dtype}}` (a float32 value is exactly a JSON number)."""
    dtypes = {k: v.dtype.name for _, m in self._records for k, v in m.items()}
    return {"records": [[step, {k: _scalar(v) for k, v in m.items()}]
                        for step, m in self._records], "dtypes": dtypes}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> IntervalMeans:
    """The accumulator whose `state()` is `state`.

    Raises:
      ValueError: `state` is not such JSON.
    """
    means = cls()
    try:
      dtypes = {k: np.dtype(v) for k, v in state["dtypes"].items()}
      for step, values in state["records"]:
        means.add(step, {k: np.asarray(v, dtypes[k]) for k, v in values.items()})
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"not the state of an IntervalMeans: {e}") from e
    return means


class JsonlWriter:
  """Appends `{"step": step, "time": unix_time, **scalars}` lines to a file (flushed each write)."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def truncate_after(self, step: int, *, also_at_step: tuple[str, ...] = ()) -> None:
    """Drops lines with a step > `step` (metrics logged after the checkpoint we resume from),
    and lines at `step` holding a metric with one of the prefixes `also_at_step` (e.g. the final
    "test/" evaluation, which a resumed run repeats)."""
    if not self.path.exists():
      return

    def keep(record: Mapping[str, Any]) -> bool:
      at = record.get("step", 0)
      return at < step or (at == step and not any(k.startswith(also_at_step) for k in record
                                                   if also_at_step))

    kept = [r for r in read_metrics(self.path) if keep(r)]
    tmp = _temporary(self.path)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Scalars) -> None:
    record = {"step": int(step), "time": time.time(),
              **{k: _scalar(v) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record, allow_nan=True) + "\n")

  def close(self) -> None:
    pass


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
  """Appends `record` as one JSON line to `path`, durably (flushed and fsynced).

  A line torn by a crash before it (no final newline) is cut off first, so the new line never
  joins it. The line goes out in one `write` on a file opened for appending.
  """
  path = Path(path)
  line = (json.dumps(dict(record), allow_nan=True) + "\n").encode()
  with open(path, "ab+") as f:
    size = f.seek(0, os.SEEK_END)
    if size:
      f.seek(size - 1)
      if f.read(1) != b"\n":  # a torn last line: keep up to the newline before it
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def _temporary(path: Path) -> Path:
  """The file `truncate_after` writes before renaming it over the metrics file `path`."""
  return path.with_name(path.name + ".tmp")


def remove_temporaries(workdir: str | os.PathLike[str]) -> list[str]:
  """Removes the file of a `truncate_after` of `<workdir>/metrics.jsonl` killed before its rename;
  returns the names removed."""
  tmp = _temporary(Path(workdir) / METRICS_FILE)
  if not tmp.is_file():
    return []
  tmp.unlink(missing_ok=True)
  return [tmp.name]


class TensorBoardWriter:
  """TensorBoard event files in `logdir`: scalars, and the config as text and hyper-parameters."""

  def __init__(self, logdir: str | os.PathLike[str]):
    from tensorboardX import SummaryWriter  # a dependency; imported here as it loads protobuf

    self._writer = SummaryWriter(str(logdir), flush_secs=30)

  def write(self, step: int, scalars: Scalars) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, _scalar(value), int(step))

  def write_config(self, config: Mapping[str, Any], metrics: Sequence[str] = ()) -> None:
    """Records `config` (a flat or nested dict) as a JSON text summary `config` and as the run's
    hyper-parameters (TensorBoard's HPARAMS tab), with `metrics` (scalar names this run writes,
    e.g. "test/accuracy_after") as the columns to compare runs by.

    Nested fields become dotted names; values other than bool, int, float and str are recorded
    as their JSON text (None as "None"). The hyper-parameters go into this run's own event file
    (tensorboardX's `add_hparams` would start a separate run directory per call).
    """
    from tensorboardX.summary import hparams

    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    # TensorBoard renders text as markdown: indent to keep it a code block.
    self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    experiment, start, end = hparams(_flat_hparams(config), {name: 0.0 for name in metrics})
    for summary in (experiment, start, end):
      self._writer.file_writer.add_summary(summary)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


HParam = bool | int | float | str


def _flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, HParam]:
  """`config` as `{dotted.name: bool | int | float | str}`, what TensorBoard's hparams accept."""
  flat: dict[str, HParam] = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flat_hparams(value, name + "."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    elif isinstance(value, np.generic):
      flat[name] = value.item()
    else:
      flat[name] = "None" if value is None else json.dumps(value, default=str)
  return flat


def format_duration(seconds: float) -> str:
  """`3725 -> "1h02m05s"`, `65 -> "1m05s"`, `7.2 -> "7s"`; "?" for NaN or inf."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _shown_metrics(scalars: Scalars, max_metrics: int) -> list[tuple[str, float | int]]:
  """The metrics a progress line shows: outer/eval/test first, then inner, at most `max_metrics`."""
  shown = [(k, v) for k, v in scalars.items() if k.startswith(("outer/", "eval/", "test/"))]
  shown += [(k, v) for k, v in scalars.items() if k.startswith("inner/")]
  return [(k, _scalar(v)) for k, v in shown[:max_metrics]]


def format_progress(step: int, num_steps: int, rate: float, scalars: Scalars,
                    max_metrics: int = 6) -> str:
  """The progress line: step, percentage, rate (steps/s), ETA, and a few metrics."""
  eta = (num_steps - step) / rate if rate > 0 else math.inf
  pct = 100.0 * step / num_steps if num_steps else 100.0
  parts = [f"step {step}/{num_steps} ({pct:.0f}%)",
           f"{rate:.2f} steps/s" if rate > 0 else "? steps/s", f"ETA {format_duration(eta)}"]
  metrics = " ".join(f"{k} {v:.4g}" for k, v in _shown_metrics(scalars, max_metrics))
  return " | ".join(parts + ([metrics] if metrics else []))


def _is_terminal(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False


class ProgressLine:
  """Training progress: a `tqdm` bar on a terminal, plain `format_progress` lines elsewhere.

  On a terminal the bar (on `file`, default stderr) shows the step, the rate and the ETA as
  `tqdm` measures them, and the metrics of the latest `write` as its postfix; `message` prints a
  line above it without breaking it. Elsewhere (a CI log, a file, a notebook's output) every
  `write` prints one `format_progress` line through `print_fn`, its rate measured over the steps
  since the previous line. Either way `reset` restarts the rate measurement, so compilation and
  evaluations are not counted as training time.

  Args:
    num_steps: the step the run ends at.
    start_step: the step it starts from (a resumed run's checkpoint).
    print_fn: where plain lines and messages go.
    clock: seconds, for the plain lines' rate (a fake one in tests).
    tty: True for the bar, False for plain lines; default: the bar when `file` is a terminal.
    file: the bar's stream (default `sys.stderr`).
  """

  def __init__(self, num_steps: int, start_step: int = 0,
               print_fn: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
               *, tty: bool | None = None, file: IO[str] | None = None):
    self.num_steps = num_steps
    self._print = print_fn
    self._clock = clock
    self._last = (start_step, clock())
    file = file if file is not None else sys.stderr
    self._bar: tqdm.tqdm | None = None
    if _is_terminal(file) if tty is None else tty:
      # mininterval=0: `write` is called every `log_every` steps already; draw each one.
      self._bar = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", file=file,
                            dynamic_ncols=True, leave=True, mininterval=0)

  def reset(self, step: int) -> None:
    """Restarts the rate measurement (e.g. after an evaluation or the first compilation)."""
    self._last = (step, self._clock())
    if self._bar is not None:
      self._bar.reset()  # restarts tqdm's clock and its rate average, and sets n to 0
      self._bar.n = self._bar.last_print_n = self._bar.initial = step
      self._bar.refresh()

  def write(self, step: int, scalars: Scalars) -> None:
    """Shows `step` and the metrics `scalars` (a bar update, or one plain line)."""
    if self._bar is not None:
      postfix = " ".join(f"{k}={v:.4g}" for k, v in _shown_metrics(scalars, 6))
      self._bar.set_postfix_str(postfix, refresh=False)
      if step > self._bar.n:
        self._bar.update(step - self._bar.n)
      else:
        self._bar.refresh()
      return
    now = self._clock()
    last_step, last_time = self._last
    rate = (step - last_step) / max(now - last_time, 1e-9) if step > last_step else 0.0
    self._last = (step, now)
    self._print(format_progress(step, self.num_steps, rate, scalars))

  def message(self, line: str) -> None:
    """Prints `line` through `print_fn`; on a terminal above the bar, which is then redrawn."""
    if self._bar is None:
      self._print(line)
      return
    with tqdm.tqdm.external_write_mode(file=sys.stdout):  # clears bars on stdout and stderr
      self._print(line)

  def close(self) -> None:
    """Leaves the bar's last state on the terminal."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class MultiWriter:
  """Writes the same scalars to several writers."""

  def __init__(self, writers: Sequence[Any]):
    self.writers = list(writers)

  def write(self, step: int, scalars: Scalars) -> None:
    for w in self.writers:
      w.write(step, scalars)

  def close(self) -> None:
    for w in self.writers:
      w.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a metrics file (or of `<workdir>/metrics.jsonl`), torn lines skipped."""
  path = Path(path)
  if path.is_dir():
    path = path / METRICS_FILE
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut by a crash
  return records


def series(records: Iterable[Mapping[str, Any]], name: str) -> tuple[np.ndarray, np.ndarray]:
  """`(steps, values)` of one metric across records that have it."""
  pairs = [(r["step"], r[name]) for r in records if name in r and r[name] is not None]
  if not pairs:
    return np.zeros(0, np.int64), np.zeros(0)
  steps, values = zip(*pairs)
  return np.asarray(steps), np.asarray(values, np.float64)


def mean_over_runs(runs: Sequence[Sequence[Mapping[str, Any]]],
                   name: str) -> list[dict[str, Any]]:
  """Metric `name` averaged over several runs (e.g. seeds) at the steps all of them recorded.

  Returns:
    Records `{"step": s, name: mean, name + "_sd": sd}`, sd the sample standard deviation across
    the runs (the spread of one run, not a confidence interval of the mean), for
    `plot_comparison(..., band="_sd")`.

  Raises:
    ValueError: with fewer than two runs, or when no step is common to all of them.
  """
  if len(runs) < 2:
    raise ValueError(f"mean_over_runs needs at least 2 runs, got {len(runs)}")
  by_step = [dict(zip(*series(records, name))) for records in runs]
  common = sorted(set.intersection(*(set(s) for s in by_step)))
  if not common:
    raise ValueError(f"no step has {name!r} in all {len(runs)} runs")
  out = []
  for step in common:
    values = np.asarray([s[step] for s in by_step])
    out.append({"step": int(step), name: float(values.mean()),
                name + "_sd": float(values.std(ddof=1))})
  return out


def _figure(**kwargs: Any) -> Any:
  """A `matplotlib.figure.Figure` on the Agg canvas: it renders to files without a display and
  without pyplot, so pyplot's backend and figure list (a notebook's inline figures) are untouched
  and nothing needs closing."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _draw_series(ax: Any, records: Sequence[Mapping[str, Any]], name: str, *,
                 label: str | None = None, band_alpha: float = 0.25, band: str = "_ci95") -> bool:
  """Plots metric `name` against the step on `ax`, with its `<name><band>` band (+-) when every
  point has one. Returns whether the metric had any point."""
  steps, values = series(records, name)
  if not len(steps):
    return False
  ax.plot(steps, values, marker="." if len(steps) < 30 else None, lw=1.2, label=label)
  _, ci = series(records, name + band)
  if len(ci) == len(values):
    ax.fill_between(steps, values - ci, values + ci, alpha=band_alpha)
  return True


def plot_learning_curves(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                         title: str = "") -> list[Path]:
  """Writes one PNG per metric group (`inner`, `outer`, `eval`, ...) and `learning_curves.png`.

  Each group's figure has one panel per metric against the step; `*_ci95` metrics are drawn as a
  band around the metric they belong to.

  Returns:
    The paths written.
  """
  names = sorted({k for r in records for k in r if "/" in k and not k.endswith("_ci95")})
  if not names:
    raise ValueError("no metrics (names like 'outer/loss') to plot")
  groups: dict[str, list[str]] = {}
  for name in names:
    groups.setdefault(name.split("/", 1)[0], []).append(name)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  def draw(ax, name):
    _draw_series(ax, records, name)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)

  paths = []
  for group, members in groups.items():
    cols = min(3, len(members))
    rows = math.ceil(len(members) / cols)
    fig = _figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, members):
      draw(ax, name)
    for ax in list(axes.flat)[len(members):]:
      ax.axis("off")
    fig.suptitle(f"{title} {group}".strip())
    fig.tight_layout()
    path = out_dir / f"{group}.png"
    fig.savefig(path, dpi=100)
    paths.append(path)
  # one overview: the main curves
  main = [n for n in ("outer/loss", "outer/query_accuracy", "eval/accuracy_after",
                      "eval/loss_after") if n in names] or names[:4]
  fig = _figure(figsize=(4 * len(main), 3))
  axes = fig.subplots(1, len(main), squeeze=False)
  for ax, name in zip(axes.flat, main):
    draw(ax, name)
  fig.suptitle(title)
  fig.tight_layout()
  path = out_dir / "learning_curves.png"
  fig.savefig(path, dpi=100)
  paths.append(path)
  return paths


def plot_comparison(curves: Mapping[str, Sequence[Mapping[str, Any]]], metric: str,
                    path: str | os.PathLike[str], title: str = "", log_y: bool = False,
                    band: str = "_ci95") -> Path:
  """One PNG with `metric` against the step for several runs (`label -> records`), each with its
  `<metric><band>` band (+-) when recorded: the evaluation's 95% interval by default, `"_sd"` for
  curves from `mean_over_runs`. Runs without the metric are left out of the legend. `log_y` draws
  the metric on a log scale (losses that span orders of magnitude).

  Returns:
    The path written.
  """
  fig = _figure(figsize=(6.5, 4))
  ax = fig.subplots()
  drawn = [_draw_series(ax, records, metric, label=label, band_alpha=0.2, band=band)
           for label, records in curves.items()]
  if not any(drawn):
    raise ValueError(f"no run has the metric {metric!r}")
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel("outer step")
  ax.set_ylabel(metric)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
