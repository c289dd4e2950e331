"""Tests of metajax.experiment.cli: config overrides that name no field, splits a dataset lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metajax.experiment import build, checkpoint, cli

REPO = Path(__file__).resolve().parents[2]
FIELDS = frozenset({"ways", "shots", "zeroing", "inner_lr", "meta_lr"})


def _argv(*args: str) -> list[str]:
  return ["train.py", "--config=experiments/configs/omniglot.py:smoke", "--workdir=/tmp/w", *args]


def test_a_misspelt_field_names_the_nearest_field():
  assert cli.config_override_error(_argv("--config.wayz=5"), FIELDS) == (
    "--config.wayz=5: the config has no field 'wayz' (did you mean --config.ways?)")


@pytest.mark.parametrize("args, bad, field", [
  (("--config.shots=1", "--config.inner_rl=0.1"), 1, "inner_rl"),  # the bad one after a good one
  (("--config.zeroingg",), 0, "zeroingg"),                          # a boolean without a value
  (("--noconfig.zeroingg",), 0, "zeroingg"),                        # absl's negated boolean
  (("-config.wayz", "5"), 0, "wayz"),                               # one dash, the value apart
])
def test_every_form_of_override_is_checked(args, bad, field):
  error = cli.config_override_error(_argv(*args), FIELDS)
  assert error is not None and error.startswith(f"{args[bad]}: the config has no field {field!r}")


def test_valid_overrides_and_other_flags_pass():
  argv = _argv("--config.ways=5", "--noconfig.zeroing", "--configuration=1", "--", "--config.x=1")
  assert cli.config_override_error(argv, FIELDS) is None


def test_a_field_without_a_close_match_lists_the_fields():
  assert cli.config_override_error(_argv("--config.qqq=1"), FIELDS) == (
    "--config.qqq=1: the config has no field 'qqq' (the fields are: inner_lr, meta_lr, shots, "
    "ways, zeroing)")


def test_a_sub_field_of_a_leaf_is_refused():
  assert cli.config_override_error(_argv("--config.ways.x=1"), FIELDS) == (
    "--config.ways.x=1: the config field 'ways' has no sub-field 'x'")


def test_a_binary_without_config_refuses_any_override():
  argv = ["experiments/evaluate.py", "--workdir=/tmp/w", "--config.ways=5"]
  assert cli.config_override_error(argv, FIELDS, takes_config=False) == (
    "--config.ways=5: evaluate.py has no --config flag; it uses the config stored in the "
    "workdir's checkpoint")
  assert cli.config_override_error(argv[:2], FIELDS, takes_config=False) is None


def test_exit_on_bad_config_overrides_reads_flag_files(tmp_path):
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text("--config.shots=1\n--config.num_step=5\n")
  with pytest.raises(SystemExit) as exit_info:
    cli.exit_on_bad_config_overrides(_argv(f"--flagfile={flagfile}"))
  assert exit_info.value.code == ("error: --config.num_step=5: the config has no field 'num_step' "
                                  "(did you mean --config.num_steps?)")
  cli.exit_on_bad_config_overrides(_argv("--config.num_steps=5"))  # build.FIELDS: no exit


def _config(**fields):
  config = build.load_config_file(REPO / "experiments/configs/default.py")
  config.update(fields)
  return config


def test_split_error_names_the_splits_of_the_dataset():
  assert cli.split_error(_config(split="kao"), "val") == (
    "--split='val' is not a split of this run's omniglot data; its splits are: train, test")
  assert cli.split_error(_config(split="finn"), "val") is None
  assert cli.split_error(_config(dataset="miniimagenet"), "validation").endswith(
    "its splits are: train, val, test")
  assert cli.split_error(_config(dataset="sinusoid"), "anything") is None  # synthetic tasks


def test_stored_config_is_the_newest_checkpoints(tmp_path):
  assert cli.stored_config(tmp_path) is None  # no checkpoint: left to the evaluation to say
  config = _config(split="lake")
  checkpoint.save(tmp_path / "checkpoints", 1, {"w": np.zeros(2, np.float32)},
                  config=build.config_to_dict(config))
  stored = cli.stored_config(tmp_path)
  assert stored is not None and stored.split == "lake"
  assert cli.split_error(stored, "val").endswith("its splits are: train, test")


def test_resume_command_sets_the_fields_and_allows_their_change():
  argv = ["python", "experiments/train.py", "--config=c.py:smoke", "--config.meta_lr=10.0",
          "--config.meta_lr", "5", "--allow_config_change=inner_lr", "--workdir=/tmp/a b"]
  assert cli.resume_command(argv, {"meta_lr": 1.0}) == (
    "python experiments/train.py --config=c.py:smoke '--workdir=/tmp/a b' --config.meta_lr=1.0 "
    "--allow_config_change=inner_lr,meta_lr")
  assert cli.resume_command(argv[:3], {"meta_lr": 1e-4}, allow=False) == (
    "python experiments/train.py --config=c.py:smoke --config.meta_lr=0.0001")


def test_stop_message_names_the_command_that_resumes(tmp_path):
  from metajax.experiment import train

  checkpoint.save(tmp_path, 2, {"w": np.zeros(2, np.float32)})
  error = train.NonFiniteError("outer/loss = nan", 4, tmp_path, lower={"meta_lr": 1e-4})
  assert cli.stop_message(error, ["python", "train.py", "--config.meta_lr=0.001"]) == (
    f"outer/loss = nan at step 4: training stopped; the last good checkpoint is step 2 in "
    f"{str(tmp_path)!r}; to resume from it with a 10x lower meta_lr: python train.py "
    "--config.meta_lr=0.0001 --allow_config_change=meta_lr")
  labels = train.BadLabelsError("inputs/bad_labels = 1: ...", 4, tmp_path, advice="Check it.")
  assert cli.stop_message(labels, ["train.py"]) == str(labels)
