"""The reproduction suite as data: its runs, their groups, the published figures they face.

Every run is one `experiments/train.py` invocation in `<root>/<run>` followed by
`experiments/evaluate.py` on the final checkpoint, once per test-time inner-step count. What a run
has done is read from its workdir's files alone (`status`), so the queue, the archive and the
report agree on it without any state of their own, and a root copied elsewhere keeps its meaning.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from absl import app

from metajax.algorithms.selfsup_pretrain import MOCO_SHUFFLE_GROUPS
from metajax.experiment import checkpoint
from tools.reproduce import kao_reference

# The project root: the commands run there, and relative roots are read from there.
ROOT = Path(__file__).resolve().parents[2]
LOG_FILE = "reproduce_log.jsonl"
KAO_PAPER = "Kao et al. 2022, official code's Omniglot curves"
KAO_MINI = "Kao et al. 2022, official code's mini-ImageNet test curves at the same step"
KAO_MINI_REFERENCE = Path(__file__).with_name("references") / "kao_miniimagenet.json"
KAO_MINI_STEPS = 5_000  # the budget of the mini-ImageNet runs (their runs: 30,000 steps)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the suite.

  Attributes:
    name: its workdir name under the root.
    group: the comparison it belongs to (a table and a plot in the report).
    config: `experiments/configs/<file>:<variant>`.
    overrides: extra `--config.<field>=<value>` flags.
    label: its row label in the report.
    eval_steps: test-time inner steps of the final evaluations.
    paper: the published figure (accuracy %, or None), where it comes from, and the test-time
      inner steps it is compared at (one of `eval_steps`).
    curve: the key of a published learning curve in `KAO_MINI_REFERENCE` ("" if none), which
      the report sets beside the run's in-training evaluations, step by step.
    probes: further final evaluations of a pre-trained encoder, each a `pretrain_eval` other
      than the config's own (`evaluate.py --pretrain_eval`), at every one of `eval_steps`.
  """

  name: str
  group: str
  config: str
  overrides: tuple[str, ...] = ()
  label: str = ""
  eval_steps: tuple[int, ...] = (1, 3)
  paper: tuple[float | None, str, int] = (None, "", 1)
  curve: str = ""
  probes: tuple[str, ...] = ()

  @property
  def evaluations(self) -> tuple[tuple[int, str], ...]:
    """Its final evaluations: (test-time inner steps, probe or "" for the config's own)."""
    return (*((k, "") for k in self.eval_steps),
            *((k, probe) for probe in self.probes for k in self.eval_steps))

  @property
  def dataset(self) -> str:
    """The config file's stem: `omniglot`, `miniimagenet` or `sinusoid`."""
    return self.config.split(".py:", 1)[0]

  def train_command(self, root: Path, data_dir: str | None,
                    miniimagenet_dir: str | None = None) -> list[str]:
    """The `experiments/train.py` command of this run, to run from the project root.

    `data_dir` is given to the Omniglot runs, `miniimagenet_dir` to the mini-ImageNet ones (None:
    the configs' own default, the dataset's environment variable).
    """
    cmd = [sys.executable, "experiments/train.py", f"--config=experiments/configs/{self.config}",
           f"--workdir={root / self.name}", *self.overrides]
    source = {"omniglot": data_dir, "miniimagenet": miniimagenet_dir}.get(self.dataset)
    if source:
      cmd.append(f"--config.data_dir={source}")
    return cmd

  def eval_command(self, root: Path, steps: int, num_tasks: int, probe: str = "") -> list[str]:
    """The `experiments/evaluate.py` command of the final evaluation with `steps` inner steps
    (and the pre-trained encoder evaluated by `probe`, if given)."""
    return [sys.executable, "experiments/evaluate.py", f"--workdir={root / self.name}",
            f"--num_inner_steps={steps}", f"--num_tasks={num_tasks}",
            *([f"--pretrain_eval={probe}"] if probe else []),
            f"--output={eval_file(root / self.name, steps, probe)}"]


def eval_file(workdir: Path, steps: int, probe: str = "") -> Path:
  """Where the final evaluation of `workdir` with `steps` test-time inner steps (by `probe`, if
  given) is written."""
  return workdir / f"eval_test_{steps}steps{'_' + probe if probe else ''}.json"


def _kao(name: str, group: str, shots: int, order: str, zeroing: bool, *extra: str,
         seed: int = 0, paper: float | None = None, label: str = "") -> Run:
  variant = f"kao5way{shots}shot" + ("_zeroing" if zeroing else "")
  algo = {"fo": "fomaml", "so": "maml"}[order]
  overrides = (f"--config.algorithm={algo}", f"--config.seed={seed}", *extra)
  label = label or (f"5w{shots}s {order.upper()} " + ("zeroing" if zeroing else "random head")
                    + (f" seed {seed}" if seed else ""))
  return Run(name, group, f"omniglot.py:{variant}", overrides, label,
             paper=(paper, KAO_PAPER if paper is not None else "", 1))


def _kao_mini(shots: int, order: str, zeroing: bool) -> Run:
  name = f"mini{shots}s_{order}" + ("_zero" if zeroing else "")
  variant = f"kao5way{shots}shot" + ("_zeroing" if zeroing else "")
  algo = {"fo": "fomaml", "so": "maml"}[order]
  paper = kao_reference.reference(KAO_MINI_REFERENCE, shots, order, zeroing, KAO_MINI_STEPS)
  return Run(name, "kao_mini", f"miniimagenet.py:{variant}",
             (f"--config.algorithm={algo}", "--config.seed=0",
              f"--config.num_steps={KAO_MINI_STEPS}"),
             f"5w{shots}s {order.upper()} " + ("zeroing" if zeroing else "random head"),
             eval_steps=(10,), paper=(paper, KAO_MINI, 10),
             curve=kao_reference.setting_key(shots, order, zeroing))


def _sinusoid(algorithm: str, shots: int) -> Run:
  return Run(f"sinusoid_{algorithm}_k{shots}", "sinusoid", "sinusoid.py:default",
             (f"--config.algorithm={algorithm}", f"--config.shots={shots}",
              f"--config.queries={shots}"),
             f"{'MAML' if algorithm == 'maml' else 'pre-training'}, K={shots}",
             eval_steps=(1, 10))


def _suite() -> list[Run]:
  """Every run in the queue's order: the sinusoid toy, Kao et al.'s central comparison, the
  studies around it, more seeds of the central runs, then Finn et al.'s setting."""
  runs = [_sinusoid(a, k) for k in (5, 10) for a in ("maml", "pretrain")]
  central = [("kao1s_fo", 1, "fo", False, 88.6), ("kao1s_fo_zero", 1, "fo", True, 93.8),
             ("kao5s_so", 5, "so", False, 97.3), ("kao5s_so_zero", 5, "so", True, 97.9)]
  runs += [_kao(n, "kao", s, o, z, paper=p) for n, s, o, z, p in central]
  runs += [_kao(f"kao1s_fo_inner{k}" + ("_zero" if z else ""), "inner_steps", 1, "fo", z,
                f"--config.num_inner_steps={k}",
                label=f"{k} train steps, " + ("zeroing" if z else "random head"))
           for k in (1, 3, 5) for z in (False, True)]
  runs += [_kao(n, "kao_other", s, o, z) for n, s, o, z in
           [("kao1s_so", 1, "so", False), ("kao1s_so_zero", 1, "so", True),
            ("kao5s_fo", 5, "fo", False), ("kao5s_fo_zero", 5, "fo", True)]]
  runs += [
    Run("kao1s_protonet", "reference", "omniglot.py:kao5way1shot",
        ("--config.algorithm=protonet", "--config.seed=0"), "Prototypical Networks 5w1s",
        eval_steps=(1,)),
    Run("kao1s_reptile", "reference", "omniglot.py:kao5way1shot",
        ("--config.algorithm=reptile", "--config.seed=0", "--config.num_inner_steps=5",
         "--config.inner_lr=0.1", "--config.optimizer=sgd", "--config.meta_lr=1.0"),
        "Reptile 5w1s (5 inner SGD steps of 0.1, outer SGD 1.0)", eval_steps=(3, 50)),
  ]
  runs += [_kao(f"{n}_seed{seed}", "kao", s, o, z, seed=seed, paper=p)
           for seed in (1, 2) for n, s, o, z, p in central]
  runs.append(Run("finn5w1s", "finn", "omniglot.py:5way1shot",
                  ("--config.num_steps=2000", "--config.eval_every=500", "--config.seed=0"),
                  "MAML 5w1s, Conv-4, rotations, 2,000 of the paper's 60,000 steps",
                  eval_steps=(3,), paper=(98.7, "Finn et al. 2017, table 1 (60,000 steps)", 3)))
  runs += [_kao_mini(s, o, z) for o in ("so", "fo") for s in (1, 5) for z in (False, True)]
  runs += [Run(f"methods_{algorithm}", "methods", f"omniglot.py:methods_{config}",
               (f"--config.algorithm={algorithm}", "--config.seed=0"), label)
           for algorithm, config, label in METHODS]
  runs += [Run(f"family_{algorithm}", "family", "omniglot.py:kao5way1shot",
               (f"--config.algorithm={algorithm}", "--config.seed=0"), label,
               eval_steps=(1,), paper=paper)
           for algorithm, label, paper in METRIC_LEARNERS]
  runs += [Run(f"family_{algorithm}", "family", "omniglot.py:kao5way1shot",
               (f"--config.algorithm={algorithm}", "--config.seed=0", *flags),
               f"{label}, then prototypes", eval_steps=(10,), probes=("linear_probe",))
           for algorithm, label, flags in SELF_SUPERVISED]
  return runs


# The inner-loop methods compared at one budget: (algorithm, named config, label).
METHODS = (
  ("maml", "maml", "MAML, second order"),
  ("mamlpp", "mamlpp", "MAML++ (multi-step loss, per-step lrs and BatchNorm, cosine meta lr)"),
  ("imaml", "maml", "implicit MAML (conjugate gradient)"),
  ("meta_lstm", "meta_lstm", "meta-learner LSTM (Ravi & Larochelle)"),
  ("lstm_optimizer", "lstm_optimizer", "LSTM optimizer (Andrychowicz et al.)"),
)

# The metric learners of the family comparison: (algorithm, label, the paper's Omniglot 5-way
# 1-shot figure (their split, rotated classes, far longer training)).
METRIC_LEARNERS = (
  ("matching", "Matching Networks (cosine attention)",
   (98.1, "Vinyals et al. 2016, table 1", 1)),
  ("matching_fce", "Matching Networks, full-context embeddings",
   (98.1, "Vinyals et al. 2016, table 1", 1)),
  ("relation", "Relation Networks", (99.6, "Sung et al. 2018, table 1", 1)),
  ("siamese", "Siamese networks (verification pairs)", (None, "", 1)),
)
# The pre-training objectives of the family comparison, evaluated by prototypes (their default)
# and by a linear probe: (algorithm, label, flags beyond the config's defaults).
SELF_SUPERVISED = (
  ("simclr", "SimCLR (two affine views)", ()),
  ("supcon", "SupCon (labels as positives)", ()),
  ("byol", "BYOL (EMA target, predictor, no negatives)", ()),
  ("moco", "MoCo v2 (momentum encoder, queue of negatives, shuffled BatchNorm)",
   (f"--config.moco_shuffle_groups={MOCO_SHUFFLE_GROUPS}",)),
  ("barlow_twins", "Barlow Twins (cross-correlation towards identity)", ()),
  ("swav", "SwAV (Sinkhorn-Knopp prototypes, swapped prediction)", ()),
)
# Finished runs of other groups shown again in a group's table, as its reference points.
SHOWN_WITH: dict[str, tuple[str, ...]] = {"family": ("kao1s_fo_zero", "kao1s_protonet")}

SUITE: tuple[Run, ...] = tuple(_suite())
# Each group is one section of the report (a table and its plots), in this order.
GROUPS = {
  "sinusoid": "Sinusoid regression: MAML vs pre-training (test MSE, lower is better)",
  "kao": "Kao et al.'s Omniglot setting: random head vs the zeroing trick",
  "inner_steps": "Inner steps in training, with and without zeroing (5-way 1-shot, first order)",
  "kao_other": "Kao et al.'s setting, the other orders",
  "reference": "Reference points at the same budget (Kao et al.'s setting, 3,000 steps)",
  "finn": "The classic MAML setting (Finn et al. 2017), as far as the budget goes",
  "kao_mini": "Kao et al.'s mini-ImageNet setting: random head vs the zeroing trick "
              f"({KAO_MINI_STEPS:,} of their 30,000 steps)",
  "methods": "Inner-loop methods at one budget (Kao et al.'s 5-way 1-shot setting, 3,000 steps, "
             "second order; the papers train far longer, in other settings: MAML++ reports "
             "97.65 +- 0.05 for Omniglot 20-way 1-shot after 50,000 steps)",
  "family": "Metric learners and pre-training objectives beside MAML with the zeroing trick and "
            "ProtoNet (Kao et al.'s 5-way 1-shot setting, 3,000 steps; the papers train far "
            "longer on rotated classes; Siamese networks report 92.0 for 20-way 1-shot only)",
}


def select(names: Sequence[str]) -> list[Run]:
  """The runs named (or in the groups named), in suite order; every run when `names` is empty.

  Raises:
    app.UsageError: a name is neither a run nor a group.
  """
  if not names:
    return list(SUITE)
  known = {r.name for r in SUITE} | set(GROUPS)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise app.UsageError(f"unknown runs/groups {unknown}; choose from groups {sorted(GROUPS)} or "
                         f"runs {[r.name for r in SUITE]}")
  return [r for r in SUITE if r.name in names or r.group in names]


def read_json(path: Path) -> dict[str, Any] | None:
  """The JSON object in `path`, or None if it is missing or not (yet) valid JSON."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def status(run: Run, root: Path) -> dict[str, Any]:
  """What exists of `run` under `root`: its training results, evaluations, progress and wall time.

  Returns:
    A dict with `results` (its `results.json`, or None while training), `evals` (test-time inner
    steps -> the final evaluation's metrics, or None), `probes` (probe -> the same for that
    probe's evaluations), `step` (its newest checkpoint's, 0 if
    none), `num_steps` and `config` (its `config.json`), `log` (the queue's entries for it),
    `train_seconds` (the sum of its training invocations' wall clocks) and `done` (trained and
    every evaluation written).
  """
  workdir = ROOT / root / run.name
  log = []
  if (workdir / LOG_FILE).exists():
    log = [json.loads(line) for line in (workdir / LOG_FILE).read_text().splitlines() if line]
  config = read_json(workdir / "config.json") or {}
  step = checkpoint.latest_step(workdir / "checkpoints") if workdir.exists() else None
  found = {(k, probe): read_json(eval_file(workdir, k, probe)) for k, probe in run.evaluations}
  found = {key: e["metrics"] if e else None for key, e in found.items()}  # name -> mean, ci95
  evals = {k: found[k, ""] for k in run.eval_steps}
  probes = {probe: {k: found[k, probe] for k in run.eval_steps} for probe in run.probes}
  results = read_json(workdir / "results.json")
  return {"results": results, "evals": evals, "probes": probes, "step": step or 0,
          "num_steps": config.get("num_steps"), "config": config,
          "train_seconds": sum(e["seconds"] for e in log if e["kind"] == "train"),
          "log": log, "done": results is not None and all(v is not None for v in found.values())}


def progress(st: dict[str, Any]) -> str:
  """A run's progress in words, from its `status`."""
  if st["done"]:
    return "finished"
  if not st["log"] and not st["step"] and not st["config"]:
    return "not started"
  return f"running/unfinished: step {st['step']} of {st['num_steps'] or '?'}"
