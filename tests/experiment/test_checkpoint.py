"""Tests of `metajax.experiment.checkpoint`: bit-exact round trips on orbax, keep-N plus the best,
corruption caught by the digest with a fall-back, killed writes cleaned, clear errors."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metajax.experiment import checkpoint
from metajax.meta import MetaState


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
