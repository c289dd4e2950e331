"""One-step smoke tests of every binary in experiments/, run as the user runs them (subprocesses).

train -> evaluate -> classify -> plot on the `smoke` config on real Omniglot; a run SIGKILLed
mid-training, or while it writes a checkpoint, and restarted ends bit-identical to an
uninterrupted one; bad flags and config names fail fast.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from metajax.experiment import build, checkpoint, train

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300


@pytest.fixture(scope="module")
def env(omniglot_dir, omniglot_cache_dir, omniglot_pool, tmp_path_factory):
  """Environment of the binaries: the real data, the tests' (already warm) Omniglot cache, and a
  persistent JAX compilation cache shared by the subprocesses of this module."""
  del omniglot_pool  # only requested so that the cache is built once, in this process
  return {**os.environ, "METAJAX_OMNIGLOT_DIR": str(omniglot_dir),
          "METAJAX_CACHE_DIR": str(omniglot_cache_dir),
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def run(binary: str, *flags: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, str(REPO / "experiments" / binary), *flags], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
  if check and result.returncode != 0:
    pytest.fail(f"{binary} {' '.join(flags)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr[-4000:]}")
  return result


@pytest.fixture(scope="module")
def smoke_workdir(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  result = run("train.py", "--config=experiments/configs/omniglot.py:smoke",
               f"--workdir={workdir}", env=env)
  return workdir, result.stdout, result.stderr


def test_train(smoke_workdir):
  workdir, stdout, stderr = smoke_workdir
  assert "orbax" not in stderr  # orbax's INFO records (a dozen per checkpoint) are dropped
  assert "step 2/2 (100%)" in stdout and "steps/s" in stdout
  assert "test at step 2 (4 tasks, 3 inner steps" in stdout
  assert "accuracy after:" in stdout and "+-" in stdout
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 2 and 0.0 <= results["test/accuracy_after"] <= 1.0
  assert checkpoint.all_steps(workdir / "checkpoints") == [1, 2]
  assert json.loads((workdir / "config.json").read_text())["model"] == "kao_conv"


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_again_resumes_and_does_not_retrain(smoke_workdir, env):
  workdir, _, _ = smoke_workdir
  before = _files(checkpoint.checkpoint_path(workdir / "checkpoints", 2))
  stdout = run("train.py", "--config=experiments/configs/omniglot.py:smoke",
               f"--workdir={workdir}", env=env).stdout
  assert "resuming from checkpoint step 2" in stdout
  assert _files(checkpoint.checkpoint_path(workdir / "checkpoints", 2)) == before


def test_evaluate(smoke_workdir, env, tmp_path):
  workdir, _, _ = smoke_workdir
  output = tmp_path / "eval.json"
  stdout = run("evaluate.py", f"--workdir={workdir}", "--num_tasks=4", "--batch_size=4",
               f"--output={output}", env=env).stdout
  assert "accuracy before:" in stdout and "accuracy after:" in stdout
  result = json.loads(output.read_text())
  assert result["step"] == 2 and result["num_tasks"] == 4 and result["num_inner_steps"] == 3
  after = result["metrics"]["accuracy_after"]
  assert set(after) == {"mean", "ci95", "num_tasks"} and after["num_tasks"] == 4
  # same fixed tasks as the training run's final test evaluation (same eval_seed, same size)
  results = json.loads((workdir / "results.json").read_text())
  assert after["mean"] == pytest.approx(results["test/accuracy_after"], abs=1e-6)


def _write_user_images(root: Path, pool, classes: list[int]) -> tuple[Path, Path]:
  """Omniglot characters as a user would draw them: black on white, other sizes and modes."""
  support, query = root / "support", root / "query"
  for c in classes:
    (support / f"char{c}").mkdir(parents=True)
    strokes = np.asarray(pool.images[c, 0, ..., 0])
    image = Image.fromarray(np.uint8(255 * (1 - strokes))).resize((64, 64))
    image.save(support / f"char{c}" / "a.png")
    query.mkdir(exist_ok=True)
    drawn = Image.fromarray(np.uint8(255 * (1 - np.asarray(pool.images[c, 1, ..., 0]))))
    drawn.resize((50, 50)).convert("RGB").save(query / f"q{c}.jpg")
  return support, query


def test_classify(smoke_workdir, env, tmp_path, omniglot_pool):
  workdir, _, _ = smoke_workdir
  support, query = _write_user_images(tmp_path, omniglot_pool, [1300, 1301, 1302, 1400, 1500])
  output = tmp_path / "pred.csv"
  stdout = run("classify.py", f"--workdir={workdir}", f"--support_dir={support}",
               f"--query_dir={query}", f"--output={output}", env=env).stdout
  with open(output) as f:
    rows = list(csv.DictReader(f))
  assert [Path(r["image"]).name for r in rows] == [f"q{c}.jpg" for c in (1300, 1301, 1302, 1400,
                                                                          1500)]
  assert all(r["label"] in {f"char{c}" for c in (1300, 1301, 1302, 1400, 1500)} for r in rows)
  assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
  assert "q1300.jpg" in stdout


def test_classify_too_many_classes(smoke_workdir, env, tmp_path, omniglot_pool):
  workdir, _, _ = smoke_workdir
  support, query = _write_user_images(tmp_path, omniglot_pool, list(range(1300, 1306)))
  result = run("classify.py", f"--workdir={workdir}", f"--support_dir={support}",
               f"--query_dir={query}", env=env, check=False)
  assert result.returncode != 0
  assert "6 classes but the model was trained for 5-way" in result.stderr


@pytest.mark.slow
def test_classify_prints_the_predictions_before_a_failed_write(smoke_workdir, env, tmp_path,
                                                                omniglot_pool):
  workdir, _, _ = smoke_workdir
  support, query = _write_user_images(tmp_path, omniglot_pool, [1300, 1301, 1302, 1400, 1500])
  (tmp_path / "a_file").write_text("")
  output = tmp_path / "a_file" / "pred.csv"  # a folder that is a file: no write can succeed
  result = run("classify.py", f"--workdir={workdir}", f"--support_dir={support}",
               f"--query_dir={query}", f"--output={output}", env=env, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: could not write {str(output)!r} (")
  assert line.endswith(f"); the predictions are printed above, pass --output to write them elsewhere")
  assert "q1300.jpg" in result.stdout


@pytest.mark.slow
def test_evaluate_prints_the_metrics_before_a_failed_write(smoke_workdir, env, tmp_path):
  workdir, _, _ = smoke_workdir
  (tmp_path / "a_file").write_text("")
  output = tmp_path / "a_file" / "eval.json"  # a folder that is a file: no write can succeed
  result = run("evaluate.py", f"--workdir={workdir}", "--num_tasks=4", "--batch_size=4",
               f"--output={output}", env=env, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: could not write {str(output)!r} (")
  assert line.endswith(f"); the metrics are printed above, pass --output to write them elsewhere")
  assert "accuracy after:" in result.stdout


def test_plot(smoke_workdir, env, tmp_path):
  workdir, _, _ = smoke_workdir
  stdout = run("plot.py", f"--workdir={workdir}", f"--out_dir={tmp_path}", env=env).stdout
  names = {p.name for p in tmp_path.glob("*.png")}
  assert {"outer.png", "inner.png", "test.png", "learning_curves.png"} <= names
  assert "learning_curves.png" in stdout
  assert (tmp_path / "outer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  out = tmp_path / "cmp.png"
  stdout = run("plot.py", f"--compare=a={workdir},b={workdir}", "--metric=outer/loss",
               f"--out={out}", env=env).stdout
  assert str(out) in stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  bad = run("plot.py", f"--compare={workdir}", f"--out={out}", env=env, check=False)
  assert bad.returncode != 0 and "is not label=workdir" in bad.stderr
  bad = run("plot.py", f"--compare=a={workdir}", "--metric=no/such", f"--out={out}", env=env,
            check=False)
  assert bad.returncode != 0 and "no run has the metric 'no/such'" in bad.stderr


def test_bad_flags_fail_before_any_compute(env, tmp_path):
  start = time.time()
  result = run("train.py", "--config=experiments/configs/omniglot.py:smoke",
               f"--workdir={tmp_path / 'run'}", "--config.algorithm=reptyle", "--config.ways=1",
               "--config.shots=10", "--config.queries=15", env=env, check=False)
  assert result.returncode == 1
  for message in ("algorithm='reptyle' is not one of", "ways=1 must be an int >= 2",
                  "shots + queries = 10 + 15 is more than the 20 images"):
    assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()
  assert time.time() - start < 60


def test_a_misspelt_config_name_lists_the_names(env, tmp_path):
  result = run("train.py", "--config=experiments/configs/omniglot.py:readne",
               f"--workdir={tmp_path / 'run'}", env=env, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "has no config 'readne' (did you mean 'readme'?); its configs are: 5way1shot" in (
    result.stderr)
  assert not (tmp_path / "run").exists()


def _unfinished(ckpt_dir: Path) -> list[str]:
  """orbax's temporary folders: checkpoints being written."""
  return [p.name for p in ckpt_dir.glob("*.orbax-checkpoint-tmp*")] if ckpt_dir.is_dir() else []


@pytest.mark.parametrize("when", ["training", "writing a checkpoint"])
def test_killed_run_resumes_bit_exact(env, tmp_path, when):
  """SIGKILL at a random point of training, or while a checkpoint is being written; the rerun
  cleans up, resumes from the newest complete checkpoint, and ends bit-identical."""
  flags = ["--config=experiments/configs/sinusoid.py:smoke", "--config.num_steps=60",
           "--config.checkpoint_every=1", "--config.log_every=60", "--config.eval_every=0",
           "--config.test_num_tasks=0"]
  workdir = tmp_path / "killed"
  ckpt_dir = workdir / "checkpoints"
  process = subprocess.Popen([sys.executable, str(REPO / "experiments/train.py"), *flags,
                              f"--workdir={workdir}"], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + TIMEOUT

  def ready() -> bool:
    if (checkpoint.latest_step(ckpt_dir) or 0) < 3:
      return False
    return when == "training" or bool(_unfinished(ckpt_dir))

  while not ready() and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.001)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = checkpoint.latest_step(ckpt_dir)
  assert killed_at is not None and killed_at < 60, "the run ended before it could be killed"
  left = _unfinished(ckpt_dir)
  if when == "writing a checkpoint":
    assert left, "the kill came after the checkpoint was complete"
  stdout = run("train.py", *flags, f"--workdir={workdir}", env=env).stdout
  assert f"resuming from checkpoint step {killed_at}" in stdout
  assert all(name in stdout for name in left)  # the rerun says what it removed
  assert not _unfinished(ckpt_dir)

  # The uninterrupted reference, in this process (checkpoint_every does not change the numbers).
  config = build.config_from_dict(json.loads((workdir / "config.json").read_text()))
  config.checkpoint_every = 60
  train.train_and_evaluate(config, tmp_path / "uninterrupted", print_fn=lambda _: None)
  resumed, _, step = checkpoint.read_latest(ckpt_dir)
  reference, _, _ = checkpoint.read_latest(tmp_path / "uninterrupted" / "checkpoints")
  assert step == 60
  leaves, reference_leaves = jax.tree.leaves(resumed), jax.tree.leaves(reference)
  assert len(leaves) == len(reference_leaves) > 0
  for x, y in zip(leaves, reference_leaves):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a refused command ends with: exit status 1, no traceback."""
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["one_class", "txt_class", "empty_query", "corrupt_png",
                                 "truncated_png"])
def test_classify_refuses_bad_folders_in_one_line(smoke_workdir, env, tmp_path, omniglot_pool,
                                                 bad):
  workdir, _, _ = smoke_workdir
  support, query = _write_user_images(tmp_path, omniglot_pool, [1300, 1301, 1302])
  if bad == "one_class":
    for c in (1301, 1302):
      shutil.rmtree(support / f"char{c}")
    expected = "needs one sub-folder of images per class, at least 2; found 1: 'char1300'"
  elif bad == "txt_class":
    (support / "char1301" / "a.png").unlink()
    (support / "char1301" / "a.txt").write_text("not an image")
    expected = f"the support class folder {str(support / 'char1301')!r} has no images"
  elif bad == "empty_query":
    for image in query.iterdir():
      image.unlink()
    expected = f"the query folder {str(query)!r} has no images (it is empty)"
  else:
    image = support / "char1301" / "a.png"
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2] if bad == "truncated_png" else b"\x89PNG garbage")
    expected = f"cannot read the image {str(image)!r} ("
  result = run("classify.py", f"--workdir={workdir}", f"--support_dir={support}",
               f"--query_dir={query}", f"--output={tmp_path / 'pred.csv'}", env=env, check=False)
  assert expected in _error_line(result)
  assert not (tmp_path / "pred.csv").exists()


@pytest.mark.slow
def test_evaluate_refuses_a_split_the_dataset_lacks(smoke_workdir, env, tmp_path):
  workdir, _, _ = smoke_workdir
  result = run("evaluate.py", f"--workdir={workdir}", "--split=val",
               f"--output={tmp_path / 'eval.json'}", env=env, check=False)
  assert _error_line(result) == ("error: --split='val' is not a split of this run's omniglot data; "
                                 "its splits are: train, test")


@pytest.mark.slow
@pytest.mark.parametrize("binary", ["evaluate.py", "classify.py"])
def test_binaries_without_a_config_refuse_config_overrides(env, tmp_path, binary):
  folders = ([f"--support_dir={tmp_path}", f"--query_dir={tmp_path}"] if binary == "classify.py"
             else [])
  result = run(binary, f"--workdir={tmp_path}", *folders, "--config.wayz=5", env=env, check=False)
  assert _error_line(result) == (f"error: --config.wayz=5: {binary} has no --config flag; it uses "
                                 "the config stored in the workdir's checkpoint")


@pytest.mark.slow
def test_an_unknown_config_field_names_the_nearest_one(env, tmp_path):
  result = run("train.py", "--config=experiments/configs/omniglot.py:smoke",
               f"--workdir={tmp_path / 'run'}", "--config.wayz=5", env=env, check=False)
  assert _error_line(result) == ("error: --config.wayz=5: the config has no field 'wayz' "
                                 "(did you mean --config.ways?)")
  assert not (tmp_path / "run").exists()
