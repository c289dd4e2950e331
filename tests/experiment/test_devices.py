"""Training over several local devices: the meta-batch's tasks split over a mesh, parameters
replicated, and the same parameters as on one device (4 forced CPU devices, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from metajax.experiment import build, train

SCRIPT = textwrap.dedent("""
  import sys
  from pathlib import Path
  import jax, numpy as np
  from metajax.experiment import build, checkpoint, train

  assert jax.local_device_count() == 4, jax.local_devices()
  root = Path(sys.argv[1])
  six = build.load_config_file("experiments/configs/sinusoid.py:smoke")
  six.meta_batch_size = 6
  assert train.task_mesh(six).size == 3  # "all": as many devices as divide the meta-batch
  six.devices = "4"
  try:
    train.task_mesh(six)
  except build.ConfigError as e:
    assert "meta_batch_size=6 cannot be split evenly over 4 devices" in str(e), e
  else:
    raise AssertionError("an explicit count that does not divide the meta-batch is refused")
  base = build.load_config_file("experiments/configs/sinusoid.py:smoke")
  base.update(num_steps=6, steps_per_call=3, log_every=3, checkpoint_every=3, eval_every=3,
              eval_num_tasks=4, test_num_tasks=4)
  params, lines = {}, {}
  for devices in (4, 1):
    config = build.config_from_dict(base.to_dict())
    config.devices = str(devices)
    lines[devices] = []
    result = train.train_and_evaluate(config, root / str(devices), print_fn=lines[devices].append)
    state, _, _ = checkpoint.read_latest(root / str(devices) / train.CHECKPOINT_DIR)
    params[devices] = jax.tree.leaves(state["meta"]["params"])
    tests = [v for k, v in result.items() if k.startswith("test/")]
    assert tests and np.all(np.isfinite(tests)), result
  assert any("split over 4 devices (1 each)" in l for l in lines[4]), lines[4]
  assert not any("split over" in l for l in lines[1]), lines[1]
  for a, b in zip(params[4], params[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(np.abs(a).max() > 0 for a in params[4])
  print("OK")
""")


@pytest.mark.slow  # two short trainings with their compilations in a subprocess
def test_four_devices_give_the_parameters_of_one(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, cwd=repo,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (out.stdout[-2000:]
                                                                    + out.stderr[-3000:])


def test_one_device_keeps_the_single_device_program():
  config = build.load_config_file("experiments/configs/sinusoid.py:smoke")
  assert config.devices == "all"
  if jax.local_device_count() == 1:
    assert train.task_mesh(config) is None
  config.devices = "1"
  assert train.task_mesh(config) is None


def test_device_count_errors():
  config = build.load_config_file("experiments/configs/sinusoid.py:smoke")
  config.devices = str(jax.local_device_count() + 1)
  with pytest.raises(build.ConfigError, match=rf"devices={jax.local_device_count() + 1}, but "
                                              rf"this process has {jax.local_device_count()}"):
    train.task_mesh(config)
  with pytest.raises(build.ConfigError, match="devices must be 'all' or a positive integer"):
    build.validate_config(build.config_from_dict({**config.to_dict(), "devices": "0"}))


def test_sharded_tasks_are_vmapped_under_auto(monkeypatch):
  """A loop over a task axis split over devices would run every task on every device: with a
  mesh, the step's `task_map="auto"` is "vmap"; an explicit choice is kept."""
  config = build.load_config_file("experiments/configs/sinusoid.py:smoke")
  model = build.build_model(config)
  learner = build.build_learner(config, model)
  seen = []
  monkeypatch.setattr(build, "make_meta_step",
                      lambda learner, optimizer, *, task_map, jit: seen.append(task_map))
  for task_map, sharded in (("auto", True), ("auto", False), ("map", True)):
    config.task_map = task_map
    build.build_meta_step(config, model, learner, sharded=sharded)
  assert seen == ["vmap", "auto", "map"]
