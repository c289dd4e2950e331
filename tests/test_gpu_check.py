"""The accelerator check's dry mode: the same code path on CPU with tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow  # a tiny benchmark workload in a subprocess, the peers where installed
def test_dry_run(tmp_path):
  out = tmp_path / "gpu_check.json"
  # --timeout bounds each benchmark subprocess: generous, for a loaded machine
  proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", f"--json={out}", "--reps=2",
                         "--timeout=900"], capture_output=True, text=True, timeout=2400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["dry"] and result["failed"] == []
  checks = {r["check"]: r for r in result["exactness"]}
  assert len(checks) == 5
  for r in checks.values():
    assert r["ok"] in (True, None), r
  assert any("central differences" in c and r["value"] < r["tolerance"]
             for c, r in checks.items())
  assert set(result["benchmark"]["workloads"]) == {"W1"}
  for r in result["benchmark"]["workloads"].values():
    assert r["median_s"] > 0 and r["spec"]["tiny"]
  assert "gpu_check: 0 failed" in proc.stdout


def test_refuses_a_machine_without_an_accelerator():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--skip_benchmark"], capture_output=True,
                        text=True, timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert proc.returncode == 1
  assert "jax sees no accelerator here; run with --dry" in proc.stderr
