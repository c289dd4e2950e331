"""Tests of `metajax.experiment.checkpoint`: bit-exact round trips on orbax, keep-N plus the best,
corruption of any part caught by the digest with a fall-back, killed writes cleaned, Ctrl-C
during a save, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.experiment import build, checkpoint
from metajax.meta import MetaState

REPO = Path(__file__).resolve().parents[2]


def make_state(width: int = 3, seed: int = 0) -> dict:
  key = jax.random.key(seed)
  params = {"encoder": {"w": jax.random.normal(key, (2, width))},
            "head": {"b": jnp.arange(width, dtype=jnp.float32) / 7.0}}
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p) * 1e-3, params)
  _, opt_state = optimizer.update(grads, opt_state, params)  # non-trivial moments and count
  return {"meta": MetaState(params, opt_state, jnp.asarray(5, jnp.int32)),
          "train_key": jax.random.key_data(jax.random.key(42))}


def leaves_equal_bitwise(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(la, lb))


CONFIG = {"ways": 5, "hidden": [8, 8], "zeroing": True, "rotations": None, "inner_lr": 0.4}
ACCURACY = checkpoint.Best("eval/accuracy_after", "max")


def test_round_trip_is_bit_exact(tmp_path):
  state = make_state()
  path = checkpoint.save(tmp_path, 5, state, config=CONFIG)
  assert path == tmp_path / "checkpoint_00000005" and path.is_dir()
  assert {p.name for p in path.iterdir()} >= {"state", "config", "digest"}
  restored, restored_config, step = checkpoint.restore(tmp_path, make_state(seed=1))
  assert step == 5 and restored_config == CONFIG
  assert isinstance(restored["meta"], MetaState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert leaves_equal_bitwise(restored, state)
  # the config is stored beside the state as plain JSON
  stored = json.loads((path / "config" / "metadata").read_text())
  assert stored == CONFIG


def test_restore_into_shape_dtype_structs(tmp_path):
  state = make_state()
  checkpoint.save(tmp_path, 1, state)
  target = jax.eval_shape(lambda: make_state())
  restored, _, _ = checkpoint.restore(tmp_path, target)
  assert leaves_equal_bitwise(restored, state)


def test_keeps_the_newest(tmp_path):
  state = make_state()
  for step in range(1, 6):
    checkpoint.save(tmp_path, step, state, keep=2)
  assert checkpoint.all_steps(tmp_path) == [4, 5]
  assert checkpoint.latest_step(tmp_path) == 5
  assert checkpoint.latest_step(tmp_path / "missing") is None


@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 3)])
def test_keeps_the_best_besides_the_newest(tmp_path, mode, best):
  state = make_state()
  criterion = checkpoint.Best("eval/metric", mode)
  values = {1: 0.5, 2: 0.9, 3: 0.1, 4: None, 5: 0.3, 6: None}  # None: no evaluation at that step
  with checkpoint.Checkpoints(tmp_path, keep=2, best=criterion) as checkpoints:
    for step, value in values.items():
      metrics = None if value is None else {"eval/metric": value, "eval/other": 7.0}
      checkpoints.save(step, state, config=CONFIG, metrics=metrics)
  assert checkpoint.all_steps(tmp_path) == sorted({best, 5, 6})
  assert checkpoint.best_step(tmp_path, criterion) == best
  # a second writer (a resumed run) sees the stored metrics and keeps the same best
  checkpoint.save(tmp_path, 7, state, keep=2, best=criterion)
  assert checkpoint.all_steps(tmp_path) == sorted({best, 6, 7})
  assert checkpoint.read(tmp_path, best)[2] == best  # its metrics are covered by the digest too


def test_no_metric_means_no_best(tmp_path):
  checkpoint.save(tmp_path, 1, make_state(), best=ACCURACY)
  assert checkpoint.best_step(tmp_path, ACCURACY) is None


def test_killed_writes_are_ignored_then_removed(tmp_path):
  state = make_state()
  checkpoint.save(tmp_path, 1, state)
  # what a process killed while writing leaves: orbax's unfinished step folder, and a
  # `write_atomic` temporary
  unfinished = tmp_path / "checkpoint_00000002.orbax-checkpoint-tmp-1796222836"
  (unfinished / "state").mkdir(parents=True)
  (unfinished / "state" / "partial").write_bytes(b"\x00" * 10)
  (tmp_path / ".config.json.abc123.tmp").write_bytes(b"{")
  assert checkpoint.latest_step(tmp_path) == 1
  restored, _, step = checkpoint.restore(tmp_path, state)
  assert step == 1 and leaves_equal_bitwise(restored, state)
  with checkpoint.Checkpoints(tmp_path) as checkpoints:
    assert sorted(checkpoints.removed) == [".config.json.abc123.tmp", unfinished.name]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000001"]


def _largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_flipped_digit_of_the_stored_config_is_caught(tmp_path):
  checkpoint.save(tmp_path, 1, make_state(), config=CONFIG)
  path = checkpoint.save(tmp_path, 2, make_state(seed=2), config=CONFIG)
  stored = path / "config" / "metadata"
  text = stored.read_text()
  assert '"ways": 5' in text
  stored.write_text(text.replace('"ways": 5', '"ways": 6'))  # still valid JSON
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint_00000002.* is corrupt"):
    checkpoint.read(tmp_path, 2)
  with pytest.warns(UserWarning, match="checkpoint_00000002") as caught:
    restored, config, step = checkpoint.restore(tmp_path, make_state())
  assert len(caught) == 1  # one warning, naming the broken checkpoint
  assert step == 1 and config == CONFIG and leaves_equal_bitwise(restored, make_state())


def test_flipped_array_bytes_are_caught(tmp_path):
  path = checkpoint.save(tmp_path, 1, make_state())
  data_file = _largest_file(path / "state")
  data = bytearray(data_file.read_bytes())
  data[len(data) // 2] ^= 0xFF  # a disk error inside the stored arrays
  data_file.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint_00000001"):
    checkpoint.read(tmp_path, 1)


@pytest.mark.parametrize("damage", ["truncated", "missing_item", "missing_digest"])
def test_a_partial_newest_checkpoint_falls_back_with_one_warning(tmp_path, damage):
  state = make_state()
  checkpoint.save(tmp_path, 1, state)
  path = checkpoint.save(tmp_path, 2, make_state(seed=2))
  if damage == "truncated":
    for p in (path / "state").rglob("*"):
      if p.is_file():
        p.write_bytes(p.read_bytes()[:3])
  elif damage == "missing_item":
    for p in sorted((path / "state").rglob("*"), reverse=True):
      p.unlink() if p.is_file() else p.rmdir()
    (path / "state").rmdir()
  else:
    for p in (path / "digest").iterdir():
      p.unlink()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    restored, _, step = checkpoint.restore(tmp_path, state)
  messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
              and "broken checkpoint" in str(w.message)]
  assert len(messages) == 1 and "checkpoint_00000002" in messages[0]
  assert step == 1 and leaves_equal_bitwise(restored, state)


def test_another_model_shape_is_a_clear_error(tmp_path):
  checkpoint.save(tmp_path, 1, make_state(width=3))
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpoint.restore(tmp_path, make_state(width=4))
  message = str(info.value)
  assert "does not fit" in message
  assert "meta/params/encoder/w: shape (2, 3) float32 in the checkpoint, (2, 4) float32" in message


def test_missing_and_extra_entries_are_named(tmp_path):
  checkpoint.save(tmp_path, 1, {"a": np.zeros(2), "b": np.ones(3)})
  with pytest.raises(checkpoint.CheckpointError, match="c: missing from the checkpoint"):
    checkpoint.restore(tmp_path, {"a": np.zeros(2), "b": np.ones(3), "c": np.ones(1)})
  with pytest.raises(checkpoint.CheckpointError, match="b: in the checkpoint but not in this"):
    checkpoint.restore(tmp_path, {"a": np.zeros(2)})


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
    checkpoint.restore(tmp_path, make_state())
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
    checkpoint.read(tmp_path, 3)


def test_the_earlier_format_is_refused_with_a_clear_message(tmp_path):
  (tmp_path / "checkpoint_00000250.msgpack").write_bytes(b"\x85")
  for call in (lambda: checkpoint.read_latest(tmp_path), lambda: checkpoint.Checkpoints(tmp_path),
               lambda: checkpoint.save(tmp_path, 1, make_state())):
    with pytest.raises(checkpoint.CheckpointError, match="earlier msgpack format "
                       r"\(checkpoint_00000250.msgpack\).*new --workdir"):
      call()


def test_typed_keys_must_be_stored_as_key_data(tmp_path):
  with pytest.raises(TypeError, match="key_data"):
    checkpoint.save(tmp_path, 1, {"key": jax.random.key(0)})


def test_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="keep must be >= 1"):
    checkpoint.Checkpoints(tmp_path, keep=0)


def test_copy_checkpoint(tmp_path):
  state = make_state()
  checkpoint.save(tmp_path / "run", 3, state, config=CONFIG)
  for _ in range(2):  # the second copy replaces the first
    path = checkpoint.copy_checkpoint(tmp_path / "run", 3, tmp_path / "archive")
  assert path == checkpoint.checkpoint_path(tmp_path / "archive", 3)
  assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == [path.name]
  restored, config, step = checkpoint.restore(tmp_path / "archive", state)
  assert step == 3 and config == CONFIG and leaves_equal_bitwise(restored, state)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
    checkpoint.copy_checkpoint(tmp_path / "run", 4, tmp_path / "archive")


def test_write_json_atomic(tmp_path):
  checkpoint.write_json_atomic(tmp_path / "sub" / "r.json", {"acc": 0.5, "n": [1, 2]})
  assert (tmp_path / "sub" / "r.json").read_text().startswith("{")
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]


# ------------------------------------------------------------------- extra JSON, every part checked

EXTRA = {"log": {"since_log": {"records": [[5, {"outer/loss": 0.25}]],
                               "dtypes": {"outer/loss": "float32"}},
                 "final": {"outer/loss": 0.5}, "eval_step": None}}


def test_extra_json_round_trips_and_is_covered_by_the_digest(tmp_path):
  checkpoint.save(tmp_path, 1, make_state(), config=CONFIG, extra=EXTRA)
  path = checkpoint.save(tmp_path, 2, make_state(seed=2), config=CONFIG, extra=EXTRA)
  read = checkpoint.read_checkpoint(tmp_path, 2)
  assert (read.step, read.config, read.extra, read.metrics) == (2, CONFIG, EXTRA, None)
  assert leaves_equal_bitwise(read.state, checkpoint.read(tmp_path, 2)[0])
  stored = path / "extra" / "metadata"
  stored.write_text(stored.read_text().replace("0.25", "0.26"))
  with pytest.raises(checkpoint.CheckpointError, match="checkpoint_00000002.* is corrupt"):
    checkpoint.read_checkpoint(tmp_path, 2)
  with pytest.warns(checkpoint.CheckpointWarning, match="checkpoint_00000002"):
    assert checkpoint.read_checkpoint(tmp_path).step == 1


def test_a_checkpoint_without_extra_json_reads_as_before(tmp_path):
  checkpoint.save(tmp_path, 1, make_state(), config=CONFIG)
  assert not (checkpoint.checkpoint_path(tmp_path, 1) / "extra").exists()
  assert checkpoint.read_checkpoint(tmp_path).extra is None


@pytest.mark.parametrize("ckpt_dir", sorted(
  {p.parent for p in (REPO / "docs/results/runs").glob("*/checkpoints/checkpoint_*")}),
  ids=lambda p: p.parent.name)
def test_an_archived_run_still_reads(ckpt_dir):
  """A checkpoint written by an earlier version (the reproduction archive keeps those of its
  unfinished runs) reads and verifies without a fall-back."""
  step = checkpoint.latest_step(ckpt_dir)
  assert step is not None
  with warnings.catch_warnings():
    warnings.simplefilter("error", checkpoint.CheckpointWarning)  # no fall-back: it is good
    state_dict, config, read_step = checkpoint.read_latest(ckpt_dir)
  assert read_step == step
  # The run's config.json is rewritten when it resumes: it may differ from the checkpoint's
  # stored config in the fields a resume may change (and in fields newer than the checkpoint,
  # at their ABSENT value), never in a field that defines the run.
  current = json.loads((ckpt_dir.parent / "config.json").read_text())
  assert build.config_diff(build.config_to_dict(build.config_from_dict(config)),
                           build.config_to_dict(build.config_from_dict(current)),
                           ignore=build.RESUMABLE_FIELDS) == []
  assert {"meta", "train_key"} <= set(state_dict)


def _damaged_copies(tmp_path):
  """A directory with good checkpoints 1 and 2 (2 tracked as the best), and the files of 2."""
  source = tmp_path / "good"
  with checkpoint.Checkpoints(source, best=ACCURACY) as checkpoints:
    checkpoints.save(1, make_state(), config=CONFIG, metrics={"eval/accuracy_after": 0.5},
                     extra=EXTRA)
    checkpoints.save(2, make_state(seed=2), config=CONFIG, metrics={"eval/accuracy_after": 0.6},
                     extra={"log": None})
  files = sorted(p.relative_to(source) for p in checkpoint.checkpoint_path(source, 2).rglob("*")
                 if p.is_file())
  return source, files


def test_any_damaged_file_of_the_newest_checkpoint_falls_back_or_reads_the_same(tmp_path):
  """Every file of the newest checkpoint, flipped, truncated or deleted: reading it either gives
  exactly what was saved (a file the content does not depend on, e.g. a commit marker) or falls
  back to the previous checkpoint with one warning naming it; never other content, never an
  error other than CheckpointError, and the directory still opens for writing."""
  source, files = _damaged_copies(tmp_path)
  expected = {step: checkpoint.read_checkpoint(source, step) for step in (1, 2)}
  assert len(files) >= 6
  fell_back = set()
  for i, name in enumerate(files):
    for damage in ("flip", "truncate", "delete"):
      directory = tmp_path / f"copy{i}_{damage}"
      shutil.copytree(source, directory)
      target = directory / name
      data = bytearray(target.read_bytes())
      if damage == "delete":
        target.unlink()
      elif damage == "truncate":
        target.write_bytes(bytes(data[:len(data) // 2]))
      elif data:
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = checkpoint.read_checkpoint(directory)
      broken = [w for w in caught if issubclass(w.category, checkpoint.CheckpointWarning)]
      want = expected[read.step]
      assert read.step == 2 or (len(broken) == 1 and "checkpoint_00000002" in str(
        broken[0].message)), (name, damage)
      assert (read.config, read.extra, read.metrics) == (want.config, want.extra, want.metrics)
      assert leaves_equal_bitwise(read.state, want.state), (name, damage)
      if read.step == 1:
        fell_back.add(str(name))
      with checkpoint.Checkpoints(directory, best=ACCURACY):
        pass
  # the parts that hold content are all among those caught
  assert {"checkpoint_00000002/config/metadata", "checkpoint_00000002/extra/metadata",
          "checkpoint_00000002/digest/metadata", "checkpoint_00000002/metrics/metrics"} <= fell_back


def test_the_best_checkpoint_falls_back_to_the_next_best(tmp_path):
  with checkpoint.Checkpoints(tmp_path, keep=1, best=ACCURACY) as checkpoints:
    for step, accuracy in ((1, 0.7), (2, 0.9), (3, 0.1)):
      checkpoints.save(step, make_state(seed=step), config=CONFIG,
                       metrics={"eval/accuracy_after": accuracy})
  assert checkpoint.all_steps(tmp_path) == [2, 3]  # the newest and the best
  assert checkpoint.read_checkpoint(tmp_path, best=ACCURACY).step == 2
  stored = checkpoint.checkpoint_path(tmp_path, 2) / "config" / "metadata"
  stored.write_text(stored.read_text().replace('"ways": 5', '"ways": 6'))
  with pytest.warns(checkpoint.CheckpointWarning, match="using the best good one, step 3"):
    assert checkpoint.read_checkpoint(tmp_path, best=ACCURACY).step == 3
  with pytest.raises(checkpoint.CheckpointError, match="has a eval/missing to pick"):
    checkpoint.read_checkpoint(tmp_path, best=checkpoint.Best("eval/missing"))


def test_a_sigint_during_a_save_takes_effect_once_it_is_complete(tmp_path):
  if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    pytest.skip("SIGINT is handled by something else here")
  state = make_state()
  with checkpoint.Checkpoints(tmp_path) as checkpoints:
    save = checkpoints._manager.save

    def interrupted_save(*args, **kwargs):
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the write starts
      return save(*args, **kwargs)

    checkpoints._manager.save = interrupted_save
    with pytest.raises(KeyboardInterrupt):
      checkpoints.save(1, state, config=CONFIG)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert checkpoint.all_steps(tmp_path) == [1]
  assert leaves_equal_bitwise(checkpoint.read(tmp_path, 1)[0], checkpoint.read_latest(tmp_path)[0])
  assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_one_line_warnings(monkeypatch):
  monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back afterwards
  checkpoint.one_line_warnings()
  checkpoint.one_line_warnings()  # idempotent
  line = warnings.formatwarning(checkpoint.CheckpointWarning("skipping 1 (a\n  b)"),
                                checkpoint.CheckpointWarning, "f.py", 3)
  assert line == "warning: skipping 1 (a b)\n"
  assert "f.py:3" in warnings.formatwarning(UserWarning("x"), UserWarning, "f.py", 3)
