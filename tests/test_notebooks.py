"""The Colab notebooks: stored clean and paired with their .py twins, and executed headless.

Each `colab/<name>.ipynb` is paired with `colab/<name>.py` (jupytext percent format). Edit either,
then sync them: `jupytext --sync colab/<name>.py` (or `jupytext --to ipynb colab/<name>.py`), and
strip outputs before committing (`jupytext --to ipynb` writes none).

Execution (slow step: `pytest -m slow tests/test_notebooks.py`) runs every notebook in a fresh
kernel from `colab/`, with `METAJAX_NOTEBOOK_SMOKE=1` (tiny budgets, same code), and fails on
the first cell that raises.
"""

from __future__ import annotations

import time
from pathlib import Path

import jupytext
import nbformat
import pytest

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = ("quickstart", "zeroing_trick", "sinusoid")
NEEDS_OMNIGLOT = {"quickstart": True, "zeroing_trick": True, "sinusoid": False}
CELL_TIMEOUT_S = 600


def _cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_every_notebook_is_listed():
  assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)
  assert sorted(p.stem for p in COLAB.glob("*.py")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_in_sync_with_its_twin(name):
  path = COLAB / f"{name}.ipynb"
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"{path.name} cell {i} has stored outputs: strip them"
      assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
  assert notebook.metadata.get("kernelspec", {}).get("name") == "python3", path.name
  assert notebook.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", path.name
  twin = jupytext.read(COLAB / f"{name}.py")
  assert _cells(twin) == _cells(notebook), (
    f"{path.name} and {name}.py differ: run `jupytext --sync colab/{name}.py`")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, request, monkeypatch, tmp_path):
  from nbclient import NotebookClient

  monkeypatch.setenv("METAJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # A smoke run checks that the notebook works, not how fast XLA's code is: compile quickly.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  monkeypatch.setenv("METAJAX_CACHE_DIR", str(tmp_path / "cache"))
  if NEEDS_OMNIGLOT[name]:
    request.getfixturevalue("omniglot_pool")  # preprocesses once per session, into its cache
    monkeypatch.setenv("METAJAX_OMNIGLOT_DIR", str(request.getfixturevalue("omniglot_dir")))
    monkeypatch.setenv("METAJAX_CACHE_DIR", str(request.getfixturevalue("omniglot_cache_dir")))
  notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(COLAB)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
  print(f"\n[{name}] executed in {time.perf_counter() - start:.1f} s")
  errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
            if output.get("output_type") == "error"]
  assert not errors
  figures = [output for cell in notebook.cells for output in cell.get("outputs", [])
             if "image/png" in output.get("data", {})]
  assert figures, f"{name} drew no figure"
