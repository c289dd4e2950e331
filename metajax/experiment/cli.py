"""Checks of a binary's command line and inputs that end in one line instead of a traceback.

ml_collections' config flag turns each `--config.<field>=<value>` into a flag of its own while
absl parses the command line; a field the config lacks (a typo) ends there in a traceback.
`config_override_error` finds such an argument before absl parses anything and names the field
and the nearest one that exists; `exit_on_bad_config_overrides` is the call a binary makes first:

    if __name__ == "__main__":
      cli.exit_on_bad_config_overrides(sys.argv)
      app.run(main)

`split_error` checks an evaluation split against the splits of the run's dataset, before any
data is loaded; `stored_config` reads the config a workdir's newest checkpoint holds, for it.
`stop_message` is the line a run stopped at a bad step ends with: what happened, the last good
checkpoint and the exact command that resumes from it with a lower learning rate
(`resume_command`).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
import shlex
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from pathlib import Path

from absl import flags

from metajax.experiment import build
from metajax.experiment import checkpoint as ckpt_lib
from metajax.experiment import train

# `--config.<path>`, `-config.<path>` and, for booleans, `--noconfig.<path>`, with or without
# `=<value>`: the arguments ml_collections reads as overrides of the flag named `config`.
_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.(?P<path>[^=]*)")


def config_override_error(argv: Sequence[str], fields: Collection[str], *,
                          takes_config: bool = True, program: str = "") -> str | None:
  """The one-line error of the first `--config.<field>` argument that names no field, or None.

  Args:
    argv: the command line, `argv[0]` the program (absl's convention); parsing stops at `--`.
    fields: the valid field names (`build.FIELDS`); every field is a leaf, so a dotted path
      (`--config.ways.x`) is refused too.
    takes_config: False for a binary without a `--config` flag, where any override is refused
      (its config is the one stored in the checkpoint).
    program: the binary's name for the message (default: `argv[0]`'s file name).

  Returns:
    e.g. "--config.wayz=5: the config has no field 'wayz' (did you mean --config.ways?)".
  """
  program = program or (Path(argv[0]).name if argv else "this binary")
  for arg in argv[1:]:
    if arg == "--":
      break
    match = _OVERRIDE.match(arg)
    if match is None:
      continue
    if not takes_config:
      return (f"{arg}: {program} has no --config flag; it uses the config stored in the "
              "workdir's checkpoint")
    path = match.group("path")
    field, _, rest = path.partition(".")
    if field in fields:
      if rest:
        return f"{arg}: the config field {field!r} has no sub-field {rest!r}"
      continue
    close = difflib.get_close_matches(field, sorted(fields), n=1)
    hint = (f"did you mean --config.{close[0]}?" if close else
            "the fields are: " + ", ".join(sorted(fields)))
    return f"{arg}: the config has no field {field!r} ({hint})"
  return None


def exit_on_bad_config_overrides(argv: Sequence[str] | None = None, *,
                                 fields: Collection[str] | None = None,
                                 takes_config: bool = True) -> None:
  """Exits with `error: <config_override_error>` (status 1) when an override names no field.

  What a binary calls before `app.run`: the overrides of `--flagfile` files are expanded first,
  as ml_collections does.

  Args:
    argv: the command line (default `sys.argv`).
    fields: the valid field names (default `build.FIELDS`).
    takes_config: False for a binary without a `--config` flag.
  """
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error:
    pass  # a missing flag file: absl reports it when it parses the command line
  error = config_override_error(argv, build.FIELDS if fields is None else fields,
                                takes_config=takes_config)
  if error is not None:
    sys.exit(f"error: {error}")


def split_error(config: build.Config, split: str) -> str | None:
  """Why `split` cannot be evaluated for `config`'s dataset (naming the splits it has), or None.

  A dataset without named splits (synthetic tasks) takes any name.
  """
  splits = build.DATASETS[config.dataset].classes(config) if (
    config.get("dataset") in build.DATASETS) else {}
  if not splits or split in splits:
    return None
  return (f"--split={split!r} is not a split of this run's {config.dataset} data; its splits are: "
          + ", ".join(splits))


def stored_config(workdir: str | os.PathLike[str]) -> build.Config | None:
  """The config stored in `workdir`'s newest readable checkpoint, or None when there is none.

  Every checkpoint of a workdir holds the same dataset and splits (they are not resumable
  fields), so the newest tells which splits any of them can be evaluated on. Problems with the
  checkpoints themselves are left to the code that restores one, which names them: nothing is
  warned about here.
  """
  ckpt_dir = Path(workdir) / train.CHECKPOINT_DIR
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      _, saved, _ = ckpt_lib.read_latest(ckpt_dir)
      return build.config_from_dict(saved)
    except (ckpt_lib.CheckpointError, build.ConfigError, OSError):
      return None


ALLOW_FLAG = "allow_config_change"  # train.py's flag of the fields that may change on resume


def resume_command(argv: Sequence[str], values: Mapping[str, Any], *, allow: bool = True) -> str:
  """`argv` as one shell line with `--config.<field>=<value>` for each of `values` (the field's
  own overrides dropped) and, with `allow`, those fields added to `--allow_config_change`.

  Args:
    argv: the command as it was run (`sys.orig_argv`: the interpreter, the script, the flags);
      parsing stops at `--`.
    values: e.g. `{"meta_lr": 1e-4}`.
    allow: add the fields to `--allow_config_change` (resuming from a checkpoint of the old
      values); False when there is no checkpoint to resume from.
  """
  fields = set(values)
  allowed: list[str] = []
  out: list[str] = []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--":
      out.extend(args[i:])
      break
    match = _OVERRIDE.match(arg)
    name, has_value = arg.lstrip("-").partition("=")[0], "=" in arg
    if match is not None and match.group("path") in fields:
      # `--config.meta_lr 0.1`: the value is the next argument
      i += 1 if has_value or i + 1 >= len(args) or args[i + 1].startswith("-") else 2
      continue
    if arg.startswith("-") and name == ALLOW_FLAG:
      value = arg.partition("=")[2] if has_value else (args[i + 1] if i + 1 < len(args) else "")
      allowed += [f for f in value.split(",") if f]
      i += 1 if has_value else 2
      continue
    out.append(arg)
    i += 1
  out += [f"--config.{k}={v!r}" for k, v in values.items()]
  if allow:
    allowed += [f for f in values if f not in allowed]
  if allowed:
    out.append(f"--{ALLOW_FLAG}={','.join(dict.fromkeys(allowed))}")
  return shlex.join(out)


def stop_message(error: train.TrainingStopped, argv: Sequence[str]) -> str:
  """The one line a binary ends with when a bad step stopped training: what was wrong at which
  step, the last good checkpoint, and the exact command that resumes from it with the lower
  learning rates of `error.lower` (or starts again when no checkpoint was written)."""
  if not error.lower:
    return str(error)
  lower = " and ".join(f"a {train.LOWER_BY}x lower {k}" for k in error.lower)
  resume = error.checkpoint_step is not None
  return (f"{error.summary}; to {'resume from it' if resume else 'start again'} with {lower}: "
          f"{resume_command(argv, error.lower, allow=resume)}")
