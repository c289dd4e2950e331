"""tools/reproduce/kao_reference: Kao et al.'s mini-ImageNet test curves as the suite's reference."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tools/ is not installed: it is imported from the checkout
  sys.path.insert(0, str(REPO))

from tools.reproduce import kao_reference, suite  # noqa: E402


def test_rows_map_to_the_outer_steps_their_script_wrote_them_at():
  # 13 rows per epoch of 2,500 steps: within-epoch steps 0, 200, ..., 2400.
  assert [kao_reference.outer_step(r) for r in (0, 1, 12, 13, 14, 26, 154)] == [
    0, 200, 2400, 2500, 2700, 5000, 29700]


def _write_run(results: Path, name: str, file: str, rows: int, value: float) -> None:
  folder = results / name
  folder.mkdir(parents=True)
  lines = [",".join(map(str, range(11)))]
  lines += [",".join(["0.2"] * 10 + [str(value + r / 1000)]) for r in range(rows)]
  (folder / file).write_text("\n".join(lines) + "\n")


def test_build_averages_the_notebooks_runs_row_by_row(tmp_path):
  results = tmp_path / kao_reference.RESULTS
  _write_run(results, "mini_5w1s15q_SO_initvar1.0_seed223", "test_E11S2300.csv", 155, 0.40)
  _write_run(results, "mini_5w1s15q_SO_initvar1.0_seed224", "test_E6S1000.csv", 156, 0.50)
  _write_run(results, "mini_5w1s15q_SO_initvar0.0_seed223", "test_E11S2300.csv", 155, 0.90)
  _write_run(results, "mini_5w1s15q_SO_zero1_initvar0.0_seed222", "test_E11S2300.csv", 155, 0.6)
  _write_run(results, "mini_5w1s15q_SO_initvar1.0_seed225", "test_E11S2300.csv", 100, 0.99)
  data = kao_reference.build(tmp_path)
  random = data["settings"]["5w1s_SO_random"]
  # initvar0.0 (zero-initialised, not zeroed) and the short file are left out.
  assert random["runs"] == ["mini_5w1s15q_SO_initvar1.0_seed223/test_E11S2300.csv",
                            "mini_5w1s15q_SO_initvar1.0_seed224/test_E6S1000.csv"]
  assert random["accuracy"][0] == pytest.approx(45.0)
  assert random["accuracy"][26] == pytest.approx(100 * (0.45 + 0.026))
  assert data["settings"]["5w1s_SO_zeroing"]["accuracy"][0] == pytest.approx(60.0)
  path = tmp_path / "ref.json"
  path.write_text(json.dumps(data))
  # The last row written at or before the step: 4,999 is row 25 (step 4,900), 5,000 row 26.
  assert kao_reference.reference(path, 1, "so", False, 4999) == pytest.approx(100 * (0.45 + 0.025))
  assert kao_reference.reference(path, 1, "so", False, 5000) == pytest.approx(100 * (0.45 + 0.026))


def test_the_committed_reference_and_the_suite_agree():
  data = json.loads(suite.KAO_MINI_REFERENCE.read_text())
  assert data["steps"] == [kao_reference.outer_step(r) for r in range(kao_reference.ROWS)]
  assert sorted(data["settings"]) == sorted(
    kao_reference.setting_key(s, o, z) for s in (1, 5) for o in ("so", "fo") for z in (0, 1))
  runs = [r for r in suite.SUITE if r.group == "kao_mini"]
  assert len(runs) == 8 and all(r.dataset == "miniimagenet" for r in runs)
  for run in runs:
    shots = int(run.name[4])
    order = "fo" if "_fo" in run.name else "so"
    expected = kao_reference.reference(suite.KAO_MINI_REFERENCE, shots, order,
                                       run.name.endswith("_zero"), suite.KAO_MINI_STEPS)
    assert run.paper == (expected, suite.KAO_MINI, 10)
    assert f"--config.num_steps={suite.KAO_MINI_STEPS}" in run.overrides


def test_each_dataset_gets_its_own_data_dir():
  by_dataset = {r.dataset: r for r in suite.SUITE}
  assert set(by_dataset) == {"omniglot", "miniimagenet", "sinusoid"}
  for dataset, expected in [("omniglot", "--config.data_dir=/o"),
                            ("miniimagenet", "--config.data_dir=/m"), ("sinusoid", None)]:
    cmd = by_dataset[dataset].train_command(Path("root"), "/o", "/m")
    assert [c for c in cmd if c.startswith("--config.data_dir")] == ([expected] if expected else [])


def test_report_sets_the_curve_beside_the_in_training_evaluations(tmp_path):
  from tools.reproduce import report

  run = next(r for r in suite.SUITE if r.name == "mini1s_so_zero")
  workdir = tmp_path / run.name
  workdir.mkdir()
  records = [{"step": 1000, "eval/accuracy_after": 0.41}, {"step": 1100, "outer/loss": 1.0},
             {"step": 5000, "eval/accuracy_after": 0.465}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  rows = report.curve_table([run], tmp_path)
  theirs = [kao_reference.reference_at(suite.KAO_MINI_REFERENCE, "5w1s_SO_zeroing", s)
            for s in (1000, 5000)]
  assert rows[2:] == [
    f"| {run.label} | 1,000 | 41.00 | {theirs[0]:.2f} | {41.0 - theirs[0]:+.2f} |",
    f"| {run.label} | 5,000 | 46.50 | {theirs[1]:.2f} | {46.5 - theirs[1]:+.2f} |"]
  assert report.curve_table([r for r in suite.SUITE if not r.curve][:3], tmp_path) == []
