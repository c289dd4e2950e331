"""README.md stays true: its two commands, CI's use of its test command, and its API example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
  return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", README, re.S)]


def test_readme_has_exactly_two_commands():
  blocks = _blocks("bash")
  assert len(blocks) == 2, f"README.md must show exactly two commands, found {blocks}"
  install, tests = blocks
  assert "pip install" in install and "experiments/train.py" in install
  assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
  test_command = _blocks("bash")[1].split("&&")[-1].strip()
  ci = (ROOT / ".ci" / "run").read_text()
  assert test_command in ci.splitlines(), (
    f"the README's test command {test_command!r} is not a line of .ci/run")


def test_readme_main_config_exists():
  install = _blocks("bash")[0]
  match = re.search(r"--config=(\S+?):(\w+)", install)
  assert match, install
  config_file, name = match.groups()
  assert (ROOT / config_file).is_file()
  assert name in (ROOT / config_file).read_text()


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path):
  code = _blocks("python")[0]
  script = tmp_path / "example.py"
  script.write_text(code)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                       timeout=600).stdout
  accuracy = float(re.search(r"held-out classes: ([0-9.]+)", out).group(1))
  assert accuracy > 0.5, out  # chance is 0.2


@pytest.mark.slow
def test_readme_own_model_example_runs(tmp_path):
  code = _blocks("python")[1]
  assert "linen_model" in code
  script = tmp_path / "own_model.py"
  script.write_text(code)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True,
                       timeout=600).stdout
  assert "'head'" in out, out
