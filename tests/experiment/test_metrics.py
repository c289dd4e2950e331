"""Tests of metajax.experiment.metrics: progress output, TensorBoard summaries, headless plots,
the log-interval accumulator and its JSON state."""

from __future__ import annotations

import io
import json
import struct

import matplotlib
import numpy as np
import pytest

from metajax.experiment import metrics


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


SCALARS = {"inner/support_loss": 1.25, "outer/loss": 0.5, "outer/grad_norm": 3.0}


def test_plain_lines_when_not_a_terminal():
  lines, clock = [], FakeClock()
  progress = metrics.ProgressLine(10, 0, lines.append, clock, file=io.StringIO())  # not a TTY
  clock.now += 2.0
  progress.write(4, SCALARS)
  assert lines == ["step 4/10 (40%) | 2.00 steps/s | ETA 3s | outer/loss 0.5 outer/grad_norm 3 "
                   "inner/support_loss 1.25"]
  progress.reset(4)  # e.g. after an evaluation: its time is not training time
  clock.now += 30.0
  progress.reset(4)
  clock.now += 1.0
  progress.write(6, {})
  assert lines[-1] == "step 6/10 (60%) | 2.00 steps/s | ETA 2s"
  progress.message("eval at step 6")
  assert lines[-1] == "eval at step 6"
  progress.close()


def test_bar_on_a_terminal():
  out, lines = io.StringIO(), []
  progress = metrics.ProgressLine(10, 2, lines.append, tty=True, file=out)
  progress.reset(3)  # the first step compiled: restart the rate
  progress.write(5, SCALARS)
  progress.message("eval at step 5")
  progress.write(10, {"outer/loss": 0.25})
  progress.close()
  text = out.getvalue()
  assert "5/10" in text and "10/10" in text
  assert "step/s" in text  # tqdm's rate
  assert "outer/loss=0.5" in text and "outer/loss=0.25" in text
  assert lines == ["eval at step 5"]  # messages still go through print_fn; no plain lines
  progress.close()  # twice is fine


def test_format_duration_and_progress():
  assert metrics.format_duration(3725) == "1h02m05s"
  assert metrics.format_duration(65) == "1m05s"
  assert metrics.format_duration(float("nan")) == "?"
  line = metrics.format_progress(0, 0, 0.0, {})
  assert line == "step 0/0 (100%) | ? steps/s | ETA ?"


def _events(logdir):
  """Every `Event` in the TFRecord files of `logdir` (length, crc, data, crc framing)."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(logdir.rglob("events.out.tfevents.*")):
    raw = path.read_bytes()
    at = 0
    while at < len(raw):
      (length,) = struct.unpack("<Q", raw[at:at + 8])
      events.append(event_pb2.Event.FromString(raw[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


def test_tensorboard_scalars_config_and_hparams(tmp_path):
  writer = metrics.TensorBoardWriter(tmp_path)
  writer.write(3, {"outer/loss": 0.5})
  writer.write_config({"algorithm": "maml", "inner_lr": 0.4, "hidden": (40, 40), "rotations": None,
                       "model": {"filters": 64}}, metrics=["test/accuracy_after"])
  writer.close()
  assert [p.parent for p in tmp_path.rglob("events.out.tfevents.*")] == [tmp_path]  # one run
  values = {v.tag: v for e in _events(tmp_path) for v in e.summary.value}
  assert values["outer/loss"].simple_value == 0.5
  (config,) = [v for tag, v in values.items() if tag.split("/")[0] == "config"]
  assert '"algorithm": "maml"' in config.tensor.string_val[0].decode()
  assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(values)
  start = values["_hparams_/session_start_info"].metadata.plugin_data.content
  assert b"model.filters" in start and b"[40, 40]" in start


def test_flat_hparams():
  flat = metrics._flat_hparams({"a": {"b": 1, "c": {"d": True}}, "e": [1, 2], "f": None})
  assert flat == {"a.b": 1, "a.c.d": True, "e": "[1, 2]", "f": "None"}


def test_plots_leave_the_global_backend_alone(tmp_path, monkeypatch):
  def no_switch(*args, **kwargs):
    raise AssertionError("the library must not switch matplotlib's backend")

  monkeypatch.setattr(matplotlib, "use", no_switch)
  records = [{"step": s, "outer/loss": 1.0 / s, "eval/accuracy_after": 0.1 * s,
              "eval/accuracy_after_ci95": 0.01} for s in range(1, 5)]
  paths = metrics.plot_learning_curves(records, tmp_path / "plots", title="run")
  assert sorted(p.name for p in paths) == ["eval.png", "learning_curves.png", "outer.png"]
  path = metrics.plot_comparison({"a": records, "b": records[:2]}, "outer/loss",
                                 tmp_path / "cmp.png", log_y=True)
  for p in [*paths, path]:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no run has the metric"):
    metrics.plot_comparison({"a": records}, "test/nothing", tmp_path / "none.png")


def test_interval_means_restored_from_json_give_bit_identical_means():
  """A checkpoint stores the metrics since the last log line as JSON: the restored accumulator
  averages to the very float32 means the uninterrupted one does."""
  rng = np.random.default_rng(0)
  steps = [{"outer/loss": np.float32(rng.uniform(0, 3)), "inner/steps": np.asarray(7, np.int32),
            "outer/grad_norm": np.asarray(rng.uniform(0, 1e3), np.float32)} for _ in range(5)]
  uninterrupted, first_half = metrics.IntervalMeans(), metrics.IntervalMeans()
  for step, scalars in enumerate(steps[:3], start=1):
    uninterrupted.add(step, scalars)
    first_half.add(step, scalars)
  resumed = metrics.IntervalMeans.from_state(json.loads(json.dumps(first_half.state())))
  assert resumed.steps == [1, 2, 3] and len(resumed) == 3
  for step, scalars in enumerate(steps[3:], start=4):
    uninterrupted.add(step, scalars)
    resumed.add(step, scalars)
  expected = uninterrupted.pop_means()
  assert resumed.pop_means() == expected and len(resumed) == 0
  # float32 averaging, as numpy does it: not the float64 mean of the same numbers
  assert expected["outer/loss"] == float(np.mean(np.asarray([s["outer/loss"] for s in steps])))
  assert expected["inner/steps"] == 7.0
  assert resumed.pop_means() == {}


@pytest.mark.parametrize("state", [{}, {"records": [[1, {"a": 1.0}]], "dtypes": {}},
                                   {"records": 3, "dtypes": {}},
                                   {"records": [], "dtypes": {"a": "no-such-dtype"}}])
def test_interval_means_refuse_other_json(state):
  with pytest.raises(ValueError, match="not the state of an IntervalMeans"):
    metrics.IntervalMeans.from_state(state)


def test_remove_temporaries_removes_a_killed_truncation(tmp_path):
  writer = metrics.JsonlWriter(tmp_path / metrics.METRICS_FILE)
  writer.write(1, {"outer/loss": 1.0})
  writer.write(2, {"outer/loss": 2.0})
  writer.truncate_after(1)
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1]
  assert metrics.remove_temporaries(tmp_path) == []  # a completed truncation leaves nothing
  (tmp_path / "metrics.jsonl.tmp").write_text('{"step": 1')  # killed before its rename
  assert metrics.remove_temporaries(tmp_path) == ["metrics.jsonl.tmp"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [metrics.METRICS_FILE]
