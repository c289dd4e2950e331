"""Tests of `metajax.experiment.checkpoint`: bit-exact round trips, atomic writes, retention, clear errors."""

from __future__ import annotations

import os

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


def test_round_trip_is_bit_exact(tmp_path):
  state = make_state()
  config = {"ways": 5, "hidden": [8, 8], "zeroing": True, "rotations": None}
  path = checkpoint.save(tmp_path, 5, state, config=config)
  assert path.name == "checkpoint_00000005.msgpack"
  restored, restored_config, step = checkpoint.restore(tmp_path, make_state(seed=1))
  assert step == 5 and restored_config == config
  assert isinstance(restored["meta"], MetaState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert leaves_equal_bitwise(restored, state)


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


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  state = make_state()
  checkpoint.save(tmp_path, 1, state)

  def crash(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save(tmp_path, 2, make_state(seed=3))
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["checkpoint_00000001.msgpack"]  # no temporary left behind
  restored, _, step = checkpoint.restore(tmp_path, state)
  assert step == 1 and leaves_equal_bitwise(restored, state)


def test_stray_temporaries_are_ignored(tmp_path):
  state = make_state()
  checkpoint.save(tmp_path, 1, state)
  (tmp_path / ".checkpoint_00000002.msgpack.abc.tmp").write_bytes(b"\x00" * 10)
  assert checkpoint.latest_step(tmp_path) == 1


def test_a_broken_newest_checkpoint_falls_back_with_a_warning(tmp_path):
  state = make_state()
  checkpoint.save(tmp_path, 1, state)
  path = checkpoint.save(tmp_path, 2, make_state(seed=2))
  path.write_bytes(path.read_bytes()[:100])  # e.g. a disk error
  with pytest.warns(UserWarning, match="checkpoint_00000002.msgpack"):
    restored, _, step = checkpoint.restore(tmp_path, state)
  assert step == 1 and leaves_equal_bitwise(restored, state)


def test_checksum_mismatch_is_detected(tmp_path):
  path = checkpoint.save(tmp_path, 1, make_state())
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF  # flip bits inside the serialised state
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError):
    checkpoint.read(path)


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
  (tmp_path / "x.msgpack").write_bytes(b"not msgpack")
  with pytest.raises(checkpoint.CheckpointError, match="is unreadable|is not a"):
    checkpoint.read(tmp_path / "x.msgpack")


def test_typed_keys_must_be_stored_as_key_data(tmp_path):
  with pytest.raises(TypeError, match="key_data"):
    checkpoint.save(tmp_path, 1, {"key": jax.random.key(0)})


def test_write_json_atomic(tmp_path):
  checkpoint.write_json_atomic(tmp_path / "sub" / "r.json", {"acc": 0.5, "n": [1, 2]})
  assert (tmp_path / "sub" / "r.json").read_text().startswith("{")
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]
