"""tools/reproduce: the suite is well-formed; the queue trains, evaluates, skips what is done and
stops on SIGTERM; the archive keeps what resuming needs; the report quotes the runs' own files."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import app

from metajax.experiment import build, checkpoint, cli, metrics

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tools/ is not installed: it is imported from the checkout
  sys.path.insert(0, str(REPO))

from tools.reproduce import archive, queue, report, suite  # noqa: E402


def load(name: str, path: Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


TINY_STATE = {"w": np.arange(3, dtype=np.float32)}  # a checkpoint in the library's own format


def _tree(path: Path) -> dict[str, bytes]:
  """The files of a checkpoint (a file or a folder, whichever the format writes) by name."""
  if path.is_file():
    return {path.name: path.read_bytes()}
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_suite_is_well_formed():
  names = [r.name for r in suite.SUITE]
  assert len(names) == len(set(names))
  configs = {}
  for run in suite.SUITE:
    assert run.group in suite.GROUPS, run
    assert run.eval_steps and all(k >= 1 for k in run.eval_steps)
    file, variant = run.config.split(":")
    if file not in configs:
      configs[file] = load("metajax_config_" + file.removesuffix(".py"),
                           REPO / "experiments" / "configs" / file)
    config = configs[file].get_config(variant)
    for flag in run.overrides:  # every override names a field of that config
      field = re.fullmatch(r"--config\.(\w+)=.*", flag).group(1)
      assert field in config, (run.name, field)


def test_every_override_of_the_suite_names_a_config_field():
  for run in suite.SUITE:
    assert cli.config_override_error(["train.py", *run.overrides], build.FIELDS) is None, run.name


def test_select_groups_and_refuse_unknown_names():
  assert [r.group for r in suite.select(["kao"])] == ["kao"] * 12
  assert [r.name for r in suite.select(["kao1s_fo", "finn"])] == ["kao1s_fo", "finn5w1s"]
  with pytest.raises(app.UsageError, match="nope"):
    suite.select(["nope"])


def test_binary_lists_dry_runs_and_refuses_unknown_runs(tmp_path):
  """`python -m tools.reproduce` from the project root, as the docs show it."""

  def binary(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.reproduce", f"--root={tmp_path}", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=120)

  listed = binary("--list", "--runs=kao1s_fo,finn")
  assert listed.returncode == 0, listed.stderr
  assert [line.split()[:4] for line in listed.stdout.splitlines()] == [
    ["kao1s_fo", "kao", "not", "started"], ["finn5w1s", "finn", "not", "started"]]
  dry = binary("--dry_run", "--runs=sinusoid_maml_k5", "--eval_tasks=8")
  assert dry.returncode == 0, dry.stderr
  commands = dry.stdout.splitlines()
  assert len(commands) == 3 and not any(tmp_path.iterdir())  # train, two evaluations; no files
  assert commands[0].startswith(
    "python experiments/train.py --config=experiments/configs/sinusoid.py:default --workdir=")
  assert all("--num_tasks=8" in c for c in commands[1:])
  unknown = binary("--list", "--runs=nope")
  assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
  assert unknown.stderr.strip().splitlines() == [
    f"error: unknown runs/groups ['nope']; choose from groups {sorted(suite.GROUPS)} or runs "
    f"{[r.name for r in suite.SUITE]}"]


def test_check_data_names_the_run_and_the_flag(tmp_path, monkeypatch):
  omniglot = suite.Run("o", "kao", "omniglot.py:kao5way1shot")
  mini = suite.Run("m", "kao_mini", "miniimagenet.py:kao5way1shot")
  sinusoid = suite.Run("s", "sinusoid", "sinusoid.py:smoke")
  nowhere = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as error:
    queue.check_data([sinusoid, omniglot], tmp_path, str(nowhere))
  assert str(error.value).startswith(
    f"run o needs the omniglot data (--data_dir): Omniglot directory {str(nowhere)!r} does not "
    "exist or is not a directory; ")
  monkeypatch.delenv("METAJAX_MINIIMAGENET_DIR", raising=False)
  with pytest.raises(FileNotFoundError, match=re.escape(
      "run m needs the miniimagenet data (--miniimagenet_dir): no mini-ImageNet directory given")):
    queue.check_data([mini], tmp_path, None)
  queue.check_data([sinusoid, omniglot], tmp_path, str(tmp_path))  # a folder: found
  checkpoint.write_json_atomic(tmp_path / "o" / "results.json", {"step": 1})
  for k in omniglot.eval_steps:
    checkpoint.write_json_atomic(suite.eval_file(tmp_path / "o", k), {"metrics": {}})
  queue.check_data([omniglot], tmp_path, str(nowhere))  # finished: it needs no data


@pytest.mark.slow
def test_binary_refuses_missing_data_in_one_line(tmp_path):
  nowhere = tmp_path / "nowhere"
  result = subprocess.run([sys.executable, "-m", "tools.reproduce", f"--root={tmp_path}",
                           "--runs=kao1s_fo", f"--data_dir={nowhere}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"error: run kao1s_fo needs the omniglot data (--data_dir): Omniglot "
                         f"directory {str(nowhere)!r} does not exist")
  assert not (tmp_path / "kao1s_fo").exists()  # nothing started


def test_results_md_has_the_markers_of_the_code():
  text = (REPO / "docs" / "RESULTS.md").read_text()
  assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
  assert text.index(report.BEGIN) < text.index(report.END)


def test_queue_trains_evaluates_resumes_and_reports(tmp_path):
  run = suite.Run("sin", "sinusoid", "sinusoid.py:smoke", ("--config.num_steps=4",),
                  "smoke MAML", eval_steps=(1, 2))
  root = tmp_path / "runs"
  assert queue.work([run], root, None, eval_tasks=8, dry_run=False) == 0
  st = suite.status(run, root)
  assert st["done"] and st["results"]["step"] == 4 and st["step"] == 4
  assert [e["kind"] for e in st["log"]] == ["train", "eval", "eval"]
  assert all(e["returncode"] == 0 and e["seconds"] > 0 and e["cpu_seconds"] > 0
             for e in st["log"])

  # A second pass finds everything done: nothing runs, nothing is logged.
  assert queue.work([run], root, None, eval_tasks=8, dry_run=False) == 0
  assert len(suite.status(run, root)["log"]) == 3

  doc = tmp_path / "docs" / "RESULTS.md"
  doc.parent.mkdir()
  doc.write_text(f"# mine\nbefore\n{report.BEGIN}\nold\n{report.END}\nafter\n")
  report.report(doc, root, eval_tasks=8, runs=[run])
  text = doc.read_text()
  assert text.startswith("# mine\nbefore\n") and text.endswith("after\n") and "\nold\n" not in text
  row = next(line for line in text.splitlines() if line.startswith("| smoke MAML |"))
  for k in (1, 2):
    summary = json.loads((root / "sin" / f"eval_test_{k}steps.json").read_text())
    summary = summary["metrics"]["loss_after"]
    assert f"{summary['mean']:.3f} +- {summary['ci95']:.3f}" in row
  assert (doc.parent / "results" / "sinusoid.png").stat().st_size > 0
  assert "python experiments/train.py --config=experiments/configs/sinusoid.py:smoke" in text
  assert "No finished run yet." in text  # the other groups


def test_unfinished_runs_are_listed_without_figures(tmp_path, monkeypatch):
  run = suite.Run("half", "kao", "omniglot.py:kao5way1shot")
  monkeypatch.setattr(suite, "SUITE", (run,))  # the default of `runs`: the whole suite
  checkpoint.write_json_atomic(tmp_path / "half" / "config.json", {"num_steps": 3000})
  doc = tmp_path / "RESULTS.md"
  report.report(doc, tmp_path)
  text = doc.read_text()
  assert "`half` (running/unfinished: step 0 of 3000)" in text  # a config, no checkpoint yet
  checkpoint.save(tmp_path / "half" / "checkpoints", 250, TINY_STATE)
  report.report(doc, tmp_path, runs=[run])
  assert "`half` (running/unfinished: step 250 of 3000)" in doc.read_text()
  assert "| run |" not in text
  run = suite.Run("none", "kao", "omniglot.py:kao5way1shot")
  report.report(doc, tmp_path, runs=[run])
  assert "`none` (not started)" in doc.read_text()


def test_report_refuses_a_file_without_markers(tmp_path):
  doc = tmp_path / "RESULTS.md"
  doc.write_text("# hand-written only\n")
  with pytest.raises(ValueError, match="markers"):
    report.report(doc, tmp_path)
  assert doc.read_text() == "# hand-written only\n"


def test_classification_rows_compare_with_the_paper_at_its_test_steps(tmp_path):
  run = suite.Run("fo", "kao", "omniglot.py:kao5way1shot", label="FO random",
                  paper=(88.6, "Kao et al.", 1))
  workdir = tmp_path / "fo"
  accuracy = {1: (0.8912, 0.0066), 3: (0.9078, 0.0059)}
  for k, (mean, ci) in accuracy.items():
    checkpoint.write_json_atomic(suite.eval_file(workdir, k), {"metrics": {
      "accuracy_after": {"mean": mean, "ci95": ci, "num_tasks": 600}}})
  checkpoint.write_json_atomic(workdir / "results.json", {"step": 3000})
  (workdir / "metrics.jsonl").write_text(
    json.dumps({"step": 250, "eval/accuracy_after": 0.85, "eval/accuracy_after_ci95": 0.02}) + "\n")
  entry = {"kind": "train", "command": "python experiments/train.py ...", "returncode": 0,
           "seconds": 5400.0, "cpu_seconds": 7200.0, "start": "2026-11-23T13:00:00+00:00",
           "cpu": "x", "cores": 2, "backend": "cpu", "device": "cpu", "jax": "0"}
  (workdir / suite.LOG_FILE).write_text(json.dumps(entry) + "\n")
  doc = tmp_path / "RESULTS.md"
  report.report(doc, tmp_path, runs=[run])
  row = next(line for line in doc.read_text().splitlines() if line.startswith("| FO random |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells == ["FO random", "89.12 +- 0.66", "90.78 +- 0.59", "88.6 (1 step)",
                   f"{100 * accuracy[1][0] - 88.6:+.2f}", "1.50 h", "2.00 h", "2026-11-23 14:30"]


def test_archive_keeps_what_resuming_needs(tmp_path):
  run = suite.Run("half", "kao", "omniglot.py:kao5way1shot", eval_steps=(1,))
  root, dest = tmp_path / "root", tmp_path / "archive"
  checkpoint.write_json_atomic(root / "half" / "config.json", {"num_steps": 3000})
  (root / "half" / "metrics.jsonl").write_text('{"step": 250}\n')
  for step in (250, 500):
    checkpoint.save(root / "half" / "checkpoints", step, TINY_STATE)
  (root / "half" / "tensorboard").mkdir()
  assert archive.archive([run], root, dest) == ["half"]
  assert sorted(p.name for p in (dest / "half").iterdir()) == [
    "checkpoints", "config.json", "metrics.jsonl"]
  assert checkpoint.all_steps(dest / "half" / "checkpoints") == [500]
  copied = _tree(checkpoint.checkpoint_path(dest / "half" / "checkpoints", 500))
  original = _tree(checkpoint.checkpoint_path(root / "half" / "checkpoints", 500))
  markers = [name for name in original if name.endswith("commit_success.txt")]
  # The whole checkpoint, byte for byte, except orbax's commit markers: they named the absolute
  # folder of the machine that wrote them, and name it relative to the checkpoint in the archive.
  assert {k: v for k, v in copied.items() if k not in markers} == {
    k: v for k, v in original.items() if k not in markers}
  assert sorted(k for k in copied if k.endswith("commit_success.txt")) == sorted(markers)
  assert markers and all(str(tmp_path).encode() in original[k] for k in markers)
  assert not any(str(tmp_path).encode() in copied[k] for k in markers)
  restored, _, step = checkpoint.restore(dest / "half" / "checkpoints", TINY_STATE)
  assert step == 500 and np.array_equal(restored["w"], TINY_STATE["w"])
  # Copied back into an empty root, the run resumes from the archived step.
  assert suite.status(run, dest)["step"] == 500 and not suite.status(run, dest)["done"]

  # Finished: the archive keeps its figures and drops the checkpoint.
  checkpoint.write_json_atomic(root / "half" / "results.json", {"step": 3000})
  checkpoint.write_json_atomic(suite.eval_file(root / "half", 1), {"metrics": {}})
  assert archive.archive([run], root, dest) == ["half"]
  assert sorted(p.name for p in (dest / "half").rglob("*") if p.is_file()) == [
    "config.json", "eval_test_1steps.json", "metrics.jsonl", "results.json"]
  assert checkpoint.all_steps(dest / "half" / "checkpoints") == []
  assert suite.status(run, dest)["done"]

  # A run that never started is skipped.
  other = suite.Run("none", "kao", "omniglot.py:kao5way1shot")
  assert archive.archive([other], root, dest) == []


def test_sigterm_stops_the_queue_and_logs_the_running_command(tmp_path, monkeypatch):
  import signal
  import threading

  runs = [suite.Run(n, "kao", "omniglot.py:kao5way1shot", eval_steps=(1,)) for n in "ab"]
  monkeypatch.setattr(suite.Run, "train_command",
                      lambda self, *args: [sys.executable, "-c",
                                                    "import time; time.sleep(120)"])
  previous = signal.getsignal(signal.SIGTERM)
  timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  try:
    assert queue.work(runs, tmp_path, None, eval_tasks=8, dry_run=False) == 0
  finally:
    timer.cancel()
  assert signal.getsignal(signal.SIGTERM) is previous
  log = suite.status(runs[0], tmp_path)["log"]
  assert [(e["kind"], e["returncode"]) for e in log] == [("train", -signal.SIGTERM)]
  assert 2.0 < log[0]["seconds"] < 60
  assert not (tmp_path / "b").exists()  # nothing started after the signal


def _finished_run(workdir: Path, seed: int, accuracy: dict[int, float]) -> None:
  """The files of a finished classification run: its config, results and final evaluations."""
  checkpoint.write_json_atomic(workdir / "config.json", {"num_steps": 3000, "seed": seed})
  checkpoint.write_json_atomic(workdir / "results.json", {"step": 3000})
  (workdir / "metrics.jsonl").write_text("".join(
    json.dumps({"step": step, "eval/accuracy_after": accuracy[1] - 0.01 * (step == 250)}) + "\n"
    for step in (250, 500)))
  for k, mean in accuracy.items():
    checkpoint.write_json_atomic(suite.eval_file(workdir, k), {"metrics": {
      "accuracy_after": {"mean": mean, "ci95": 0.005, "num_tasks": 600}}})


def test_seed_table_averages_seeds_and_pairs_zeroing_with_its_random_head(tmp_path):
  paper = lambda p: (p, "Kao et al.", 1)  # noqa: E731
  runs = [suite.Run("a", "kao", "omniglot.py:kao5way1shot", label="FO random head",
                    paper=paper(88.6)),
          suite.Run("a_zero", "kao", "omniglot.py:kao5way1shot_zeroing",
                    label="FO zeroing", paper=paper(93.8)),
          suite.Run("a_seed1", "kao", "omniglot.py:kao5way1shot",
                    label="FO random head seed 1", paper=paper(88.6)),
          suite.Run("a_zero_seed1", "kao", "omniglot.py:kao5way1shot_zeroing",
                    label="FO zeroing seed 1", paper=paper(93.8)),
          suite.Run("a_seed2", "kao", "omniglot.py:kao5way1shot",
                    label="FO random head seed 2", paper=paper(88.6)),
          suite.Run("b", "kao", "omniglot.py:kao5way1shot", label="alone")]
  random = {0: {1: 0.89, 3: 0.91}, 1: {1: 0.87, 3: 0.90}, 2: {1: 0.88, 3: 0.92}}
  zero = {0: {1: 0.94, 3: 0.945}, 1: {1: 0.95, 3: 0.955}}
  for seed, acc in random.items():
    _finished_run(tmp_path / ("a" + (f"_seed{seed}" if seed else "")), seed, acc)
  for seed, acc in zero.items():
    _finished_run(tmp_path / ("a_zero" + (f"_seed{seed}" if seed else "")), seed, acc)
  _finished_run(tmp_path / "b", 0, {1: 0.5, 3: 0.5})  # one seed: no row
  # An unfinished seed is left out.
  checkpoint.write_json_atomic(tmp_path / "a_zero_seed2" / "config.json", {"seed": 2})
  runs.append(suite.Run("a_zero_seed2", "kao", "omniglot.py:kao5way1shot_zeroing"))
  statuses = {r.name: suite.status(r, tmp_path) for r in runs}
  lines = report.seed_table(runs, statuses)
  rows = {cells[0]: cells[1:] for cells in
          ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
  assert list(rows) == ["FO random head", "FO zeroing", "FO: zeroing - random head"]

  def sd(values):
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5

  assert rows["FO random head"] == [
    "0, 1, 2", "89.00, 87.00, 88.00", f"88.00 +- {sd([89, 87, 88]):.2f}",
    "91.00, 90.00, 92.00", f"91.00 +- {sd([91, 90, 92]):.2f}", "88.6 (1 step)", "-0.60"]
  assert rows["FO zeroing"][:3] == ["0, 1", "94.00, 95.00", f"94.50 +- {sd([94, 95]):.2f}"]
  assert rows["FO zeroing"][-1] == "+0.70"
  # The gain pairs each seed with itself: (94 - 89, 95 - 87), seed 2 has no zeroing twin.
  gains = rows["FO: zeroing - random head"]
  assert gains[:3] == ["0, 1", "5.00, 8.00", f"6.50 +- {sd([5, 8]):.2f}"]
  assert gains[-2:] == ["5.2 (1 step)", "+1.30"]
  assert report.seed_table(runs[-2:], statuses) == []  # no family with two seeds

  # The report puts the table under the group and plots each family's mean curve.
  doc = tmp_path / "RESULTS.md"
  report.report(doc, tmp_path, runs=runs)
  text = doc.read_text()
  assert "| FO: zeroing - random head | 0, 1 | 5.00, 8.00 |" in text
  assert "![kao over seeds](results/kao_seeds.png)" in text
  assert (tmp_path / "results" / "kao_seeds.png").stat().st_size > 0


def test_mean_over_runs_averages_the_common_steps():
  runs = [[{"step": 1, "m": 1.0}, {"step": 2, "m": 2.0}, {"step": 3, "m": 9.0}],
          [{"step": 1, "m": 3.0}, {"step": 2, "m": 2.0}, {"step": 2, "other": 0.0}],
          [{"step": 1, "m": 5.0}, {"step": 2, "m": 2.0}, {"step": 4, "m": 1.0}]]
  assert metrics.mean_over_runs(runs, "m") == [{"step": 1, "m": 3.0, "m_sd": 2.0},
                                               {"step": 2, "m": 2.0, "m_sd": 0.0}]
  with pytest.raises(ValueError, match="at least 2 runs, got 1"):
    metrics.mean_over_runs(runs[:1], "m")
  with pytest.raises(ValueError, match="no step has 'm' in all 2 runs"):
    metrics.mean_over_runs([[{"step": 1, "m": 1.0}], [{"step": 2, "m": 1.0}]], "m")


def test_probes_are_evaluations_of_their_own_and_rows_of_other_groups_are_shown(tmp_path, capsys):
  ssl = suite.Run("ssl", "family", "omniglot.py:kao5way1shot", ("--config.algorithm=simclr",),
                  "SimCLR", eval_steps=(10,), probes=("linear_probe",))
  assert ssl.evaluations == ((10, ""), (10, "linear_probe"))
  assert suite.eval_file(tmp_path, 10, "linear_probe").name == "eval_test_10steps_linear_probe.json"
  assert "--pretrain_eval=linear_probe" in ssl.eval_command(tmp_path, 10, 600, "linear_probe")
  assert not any(a.startswith("--pretrain_eval") for a in ssl.eval_command(tmp_path, 10, 600))
  _finished_run(tmp_path / "ssl", 0, {1: 0.5, 10: 0.61})  # its 1-step file unused
  st = suite.status(ssl, tmp_path)
  assert st["probes"] == {"linear_probe": {10: None}} and not st["done"]
  assert queue.work([ssl], tmp_path, None, eval_tasks=600, dry_run=True) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  assert len(printed) == 1 and "--pretrain_eval=linear_probe" in printed[0]
  assert "eval_test_10steps_linear_probe.json" in printed[0]
  checkpoint.write_json_atomic(suite.eval_file(tmp_path / "ssl", 10, "linear_probe"), {"metrics": {
    "accuracy_after": {"mean": 0.7234, "ci95": 0.0123, "num_tasks": 600}}})
  assert suite.status(ssl, tmp_path)["done"]
  assert archive.archive([ssl], tmp_path, tmp_path / "archive") == ["ssl"]
  assert (tmp_path / "archive" / "ssl" / "eval_test_10steps_linear_probe.json").exists()

  # A run of another group named in SHOWN_WITH is a row of this group's table too.
  reference = suite.Run(suite.SHOWN_WITH["family"][-1], "reference", "omniglot.py:kao5way1shot",
                        label="the reference", eval_steps=(1,))
  _finished_run(tmp_path / reference.name, 0, {1: 0.9})
  doc = tmp_path / "RESULTS.md"
  report.report(doc, tmp_path, runs=[ssl, reference])
  family = doc.read_text().split(f"### {suite.GROUPS['family']}", 1)[1].split("###", 1)[0]
  head = next(line for line in family.splitlines() if line.startswith("| run |"))
  assert "accuracy % after 10 steps, by linear probe" in head
  rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                            for line in family.splitlines()
                                            if line.startswith("| ") and "---" not in line)}
  assert rows["SimCLR"][:3] == ["", "61.00 +- 0.50", "72.34 +- 1.23"]
  assert rows["the reference"][:3] == ["90.00 +- 0.50", "", ""]
