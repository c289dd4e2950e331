"""The fault battery: the binaries as a careful user meets them, killed, corrupted, misused.

* Kills: `experiments/train.py` killed at each phase (SIGKILL while the data loads, while the
  first step compiles, between checkpoints, inside a checkpoint write before its rename, right
  after a rename, in the final evaluation; SIGTERM; SIGINT), then rerun: every output
  (`metrics.jsonl` without its wall-clock field, `results.json`, `config.json`, each checkpoint's
  state bit for bit, config, metrics and extra) is that of an uninterrupted run. The signal is
  real and comes from inside the binary's process at the chosen phase (`fault_runner.py`).
* Two processes on one workdir: the second is refused in one line naming the first, whose
  outputs are those of an uninterrupted run.
* Corruption: a damaged newest checkpoint is skipped by `evaluate.py` with one warning line
  naming it; a corrupt deflate stream in `images_background.zip` and an archive with 5 of its 30
  alphabets end `train.py` in one line naming the file, nothing cached.
* Divergence: a NaN ends `train.py` in one line naming the step, the last good checkpoint and the
  command that resumes from it with a lower meta_lr; that command resumes and finishes.
* Bad inputs: each exits 1 with one `error:` line and no traceback. Those of classify.py,
  `evaluate.py --split`, unknown config fields and failed writes are in tests/test_experiments.py;
  the in-process forms of these faults in test_faults.py, test_resume.py and test_divergence.py.

Slow (a subprocess per run, on the sinusoid smoke config; Omniglot's only for its archives): CI's
second step.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from metajax.data import omniglot as omniglot_lib
from metajax.experiment import checkpoint, train

from tests.data.test_omniglot import _break_deflate
from tests.experiment.test_resume import outputs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("fault_runner.py")
TIMEOUT = 300  # seconds a subprocess may take on a loaded 2-core machine
# log_every does not divide checkpoint_every; evaluations on "val" during training and at the
# last step, then the test evaluation; one step per compiled call
FLAGS = ("--config=experiments/configs/sinusoid.py:smoke", "--config.num_steps=12",
         "--config.checkpoint_every=4", "--config.log_every=3", "--config.eval_every=4",
         "--config.eval_split=val", "--config.eval_num_tasks=2", "--config.test_num_tasks=2",
         "--config.eval_batch_size=2", "--config.keep_checkpoints=100")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  """The binaries' environment: one persistent compilation cache for the module, no re-exec."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "METAJAX_HUGEPAGES": "0",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def run(*args: str, env: dict, phase: str | None = None) -> subprocess.CompletedProcess:
  """A binary of experiments/ (`args[0]`), under `fault_runner.py` at `phase` if given."""
  command = [sys.executable, *([str(RUNNER), phase] if phase else []),
             str(REPO / "experiments" / args[0]), *args[1:]]
  return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a refused command ends with: exit status 1, no traceback."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == errors[0]
  return errors[0]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> tuple[Path, dict]:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  ok(run("train.py", *FLAGS, f"--workdir={workdir}", env=env))
  return workdir, outputs(workdir)


# ------------------------------------------------------------------------------------- kills

KILLS = {  # phase -> (exit status of the killed run, the checkpoint the rerun resumes from)
  "data loading": (-9, None), "compilation": (-9, None), "between checkpoints": (-9, None),
  "checkpoint write": (-9, 4), "after a rename": (-9, 8), "final evaluation": (-9, 12),
  "sigterm": (-15, 8), "sigint": (130, 8),
}


@pytest.mark.parametrize("phase", list(KILLS))
def test_a_killed_run_rerun_writes_the_uninterrupted_outputs(env, reference, tmp_path, phase):
  workdir = tmp_path / "run"
  killed = run("train.py", *FLAGS, f"--workdir={workdir}", env=env, phase=phase)
  status, resumes_from = KILLS[phase]
  assert killed.returncode == status, killed.stderr[-3000:]
  assert not (workdir / train.RESULTS_FILE).exists()
  if phase == "sigint":
    assert "Traceback" not in killed.stderr
    assert killed.stderr.strip().splitlines()[-1].startswith(
      "interrupted; the last checkpoint is step 8 in ")
  left = [p.name for p in (workdir / train.CHECKPOINT_DIR).glob("*.orbax-checkpoint-tmp*")]
  assert bool(left) == (phase == "checkpoint write")
  rerun = ok(run("train.py", *FLAGS, f"--workdir={workdir}", env=env))
  if resumes_from is not None:
    assert f"resuming from checkpoint step {resumes_from} in " in rerun.stdout
  assert all(name in rerun.stdout for name in left)  # it says what it removed
  assert outputs(workdir) == reference[1]


def test_a_second_process_on_the_workdir_is_refused_and_the_first_is_intact(env, reference,
                                                                            tmp_path):
  workdir, release = tmp_path / "run", tmp_path / "release"
  first = subprocess.Popen([sys.executable, str(RUNNER), "hold", str(REPO / "experiments/train.py"),
                            *FLAGS, f"--workdir={workdir}"], env={**env, "FAULT_RELEASE": str(release)},
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + TIMEOUT
    while (checkpoint.latest_step(workdir / train.CHECKPOINT_DIR) or 0) < 8:
      assert first.poll() is None and time.time() < deadline, "the first run did not get to 8"
      time.sleep(0.05)
    for flags in (FLAGS, (*FLAGS[:-1], "--config.seed=1")):  # the same command, another seed
      line = error_line(run("train.py", *flags, f"--workdir={workdir}", env=env))
      assert line.startswith(f"error: workdir {str(workdir)!r} is in use by pid {first.pid} on ")
  finally:
    release.write_text("")
    _, stderr = first.communicate(timeout=TIMEOUT)
  assert first.returncode == 0, stderr[-3000:]
  assert outputs(workdir) == reference[1]


# ------------------------------------------------------------------------------- corruptions


def test_evaluate_skips_a_damaged_newest_checkpoint_with_one_warning_line(env, reference,
                                                                         tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  newest = checkpoint.checkpoint_path(workdir / train.CHECKPOINT_DIR, 12)
  data = max((p for p in (newest / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  result = ok(run("evaluate.py", f"--workdir={workdir}", "--num_tasks=2", "--batch_size=2",
                  f"--output={tmp_path / 'eval.json'}", env=env))
  warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
  assert len(warned) == 1 and newest.name in warned[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert json.loads((tmp_path / "eval.json").read_text())["step"] == 8


def _omniglot_copy(tmp_path: Path, omniglot_dir: Path) -> Path:
  """A data folder with the evaluation archive linked and room for a background one."""
  data = tmp_path / "data"
  data.mkdir()
  name = f"{omniglot_lib.EVALUATION}.zip"
  (data / name).symlink_to(Path(omniglot_dir) / name)
  return data


def _train_on(data: Path, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
  return run("train.py", "--config=experiments/configs/omniglot.py:smoke",
             f"--workdir={tmp_path / 'run'}", f"--config.data_dir={data}",
             f"--config.cache_dir={tmp_path / 'cache'}", env=env)


def test_a_corrupt_deflate_stream_ends_train_in_one_line_naming_the_file(env, tmp_path,
                                                                        omniglot_dir):
  data = _omniglot_copy(tmp_path, omniglot_dir)
  archive = data / f"{omniglot_lib.BACKGROUND}.zip"
  shutil.copyfile(Path(omniglot_dir) / archive.name, archive)
  with zipfile.ZipFile(archive) as zf:  # the first member the loader decodes
    member = min((n for n in zf.namelist() if n.endswith(".png")), key=lambda n: n.split("/")[1:])
  _break_deflate(archive, member)
  line = error_line(_train_on(data, tmp_path, env))
  assert line.startswith(f"error: cannot read {member} from {str(archive)!r} (Error -3 ")
  assert not list((tmp_path / "cache").glob("*.npz"))


def test_an_archive_with_some_alphabets_ends_train_in_one_line(env, tmp_path, omniglot_dir):
  data = _omniglot_copy(tmp_path, omniglot_dir)
  archive = data / f"{omniglot_lib.BACKGROUND}.zip"
  kept = sorted(omniglot_lib.PUBLISHED_ALPHABETS[omniglot_lib.BACKGROUND])[:5]
  with zipfile.ZipFile(Path(omniglot_dir) / archive.name) as source, \
       zipfile.ZipFile(archive, "w") as partial:  # an interrupted copy: 5 of the 30 alphabets
    for info in source.infolist():
      parts = info.filename.split("/")
      if len(parts) > 1 and parts[1] in kept:
        partial.writestr(info, source.read(info))
  line = error_line(_train_on(data, tmp_path, env))
  assert line.startswith(f"error: incomplete Omniglot archive {str(archive)!r}: it has 5 of the "
                         "30 published alphabets (missing ")
  assert not list((tmp_path / "cache").glob("*.npz"))


# --------------------------------------------------------------------- divergence, bad inputs


def test_a_nan_names_the_command_that_resumes_with_a_lower_learning_rate(env, tmp_path):
  """Two healthy steps, then a meta_lr of 10 (allowed to change on resume): a NaN at step 4.
  The one line it ends with names the command that resumes from step 2 with meta_lr 1.0, which
  finishes the run."""
  workdir = tmp_path / "run"
  flags = ["--config=experiments/configs/sinusoid.py:smoke", "--config.eval_every=0",
           "--config.test_num_tasks=0", "--config.checkpoint_every=2", f"--workdir={workdir}"]
  ok(run("train.py", *flags, "--config.num_steps=2", env=env))
  stopped = run("train.py", *flags, "--config.num_steps=8", "--config.meta_lr=10.0",
                "--allow_config_change=meta_lr", env=env)
  prefix = (f"error: outer/grad_norm = inf at step 4: training stopped; the last good checkpoint "
            f"is step 2 in {str(workdir / train.CHECKPOINT_DIR)!r}; to resume from it with a 10x "
            "lower meta_lr: ")
  line = error_line(stopped)
  assert line.startswith(prefix), line
  command = shlex.split(line[len(prefix):])
  assert command[:2] == [sys.executable, str(REPO / "experiments/train.py")]
  assert command[-2:] == ["--config.meta_lr=1.0", "--allow_config_change=meta_lr"]
  resumed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=TIMEOUT)
  assert "resuming from checkpoint step 2 in " in ok(resumed).stdout
  assert "meta_lr 0.001 -> 1.0" in resumed.stdout  # the checkpoint of step 2 had 0.001
  assert json.loads((workdir / train.RESULTS_FILE).read_text())["step"] == 8


def test_a_field_that_cannot_change_on_resume_is_refused_in_one_line(env, tmp_path):
  result = run("train.py", "--config=experiments/configs/sinusoid.py:smoke",
               f"--workdir={tmp_path / 'run'}", "--allow_config_change=meta_lr,ways", env=env)
  assert error_line(result).startswith("error: allow_config_change: 'ways' cannot change on "
                                       "resume, it defines the run (changeable: ")
