"""The notebooks in notebooks/: stored clean, Colab-ready, and executed top to bottom.

`execute_notebook` runs a notebook with nbclient in a fresh "python3" kernel (ipykernel of the
interpreter running the tests; the kernel inherits this process's environment, so the 8
simulated devices and the session's corpus directory that tests/conftest.py sets), after
injecting a cell of parameter overrides right below the notebook's "parameters" cell
(papermill's convention). `png_outputs` / `assert_plots` check the figures it produced.
Adding a notebook to the executed ones is one test function: see the two at the end.
"""
from __future__ import annotations

import ast
import base64
import json
import os
import struct
import sys
from pathlib import Path
from typing import Mapping, Optional

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"


# ----------------------------------------------------------------------------------------
# The harness (reusable: a new notebook's test is a call to execute_notebook + assert_plots)
# ----------------------------------------------------------------------------------------

def parameters_cell_index(nb) -> int:
  """Index of the single code cell tagged "parameters"."""
  found = [i for i, cell in enumerate(nb.cells)
           if PARAMETERS_TAG in cell.get("metadata", {}).get("tags", [])]
  if len(found) != 1:
    raise ValueError(f"expected exactly one cell tagged {PARAMETERS_TAG!r}, found {len(found)}.")
  if nb.cells[found[0]].cell_type != "code":
    raise ValueError("the parameters cell must be a code cell.")
  return found[0]


def parameter_names(nb) -> list:
  """Names the parameters cell assigns (it must hold nothing but assignments)."""
  tree = ast.parse(nb.cells[parameters_cell_index(nb)].source)
  names = []
  for node in tree.body:
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
      raise ValueError(f"the parameters cell may hold only assignments, found "
                       f"{type(node).__name__} at line {node.lineno}.")
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names += [t.id for t in targets if isinstance(t, ast.Name)]
  return names


def inject_parameters(nb, parameters: Mapping[str, object]):
  """Adds a cell `NAME = repr(value)` per override right after the parameters cell. Names the
  notebook does not define are refused (a typo would otherwise silently do nothing)."""
  unknown = sorted(set(parameters) - set(parameter_names(nb)))
  if unknown:
    raise KeyError(f"not parameters of this notebook: {unknown}; it has "
                   f"{parameter_names(nb)}.")
  source = "# Injected by tests/test_notebooks.py\n" + "".join(
      f"{name} = {value!r}\n" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = [INJECTED_TAG]
  nb.cells.insert(parameters_cell_index(nb) + 1, cell)
  return nb


def execute_notebook(path, parameters: Optional[Mapping[str, object]] = None,
                     workdir=None, timeout: int = 600, save_to=None,
                     kernel_name: str = "python3"):
  """Runs the notebook at `path` top to bottom with `parameters` injected; returns the
  executed nbformat.NotebookNode. A failing cell raises nbclient's CellExecutionError (with
  the cell's traceback). `workdir` is the kernel's starting directory (default: the
  notebook's own, as Jupyter does; the notebooks find the repository root from there);
  `timeout` is per cell, in seconds; `save_to` (a path) keeps the executed notebook, also
  when a cell failed."""
  path = Path(path)
  nb = nbformat.read(path, as_version=4)
  inject_parameters(nb, parameters or {})
  client = nbclient.NotebookClient(
      nb, timeout=timeout, kernel_name=kernel_name, allow_errors=False,
      resources={"metadata": {"path": str(workdir or path.parent)}})
  try:
    client.execute()
  finally:
    if save_to is not None:
      nbformat.write(nb, str(save_to))
  return nb


def png_outputs(nb) -> list:
  """[(cell index, PNG bytes)] of every image/png output, in order."""
  images = []
  for i, cell in enumerate(nb.cells):
    for output in cell.get("outputs", []):
      data = output.get("data", {})
      if "image/png" in data:
        images.append((i, base64.b64decode(data["image/png"])))
  return images


def png_size(png: bytes) -> tuple:
  """(width, height) from a PNG's IHDR chunk."""
  if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
    raise ValueError("not a PNG")
  return struct.unpack(">II", png[16:24])


def assert_plots(nb, expected: int, min_size=(300, 200)) -> list:
  """At least `expected` PNG figures, each at least `min_size` pixels; returns them."""
  images = png_outputs(nb)
  assert len(images) >= expected, (
      f"{len(images)} image/png outputs (cells {[i for i, _ in images]}), expected >= {expected}")
  for cell, png in images:
    width, height = png_size(png)
    assert width >= min_size[0] and height >= min_size[1], (cell, width, height)
  return images


def _python_source(source: str) -> str:
  """A cell's source with IPython syntax (%magic, !shell) turned into Python calls."""
  try:
    from IPython.core.inputtransformer2 import TransformerManager  # pylint: disable=g-import-not-at-top
  except ImportError:
    return source
  return TransformerManager().transform_cell(source)


def output_text(nb) -> str:
  """All stream and text/plain / text/html output of the notebook, concatenated."""
  parts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream":
        parts.append(output.get("text", ""))
      for mime in ("text/plain", "text/html"):
        if mime in output.get("data", {}):
          parts.append(output["data"][mime])
  return "\n".join(parts)


# ----------------------------------------------------------------------------------------
# Cheap checks on every stored notebook
# ----------------------------------------------------------------------------------------

def test_there_are_notebooks():
  names = {p.name for p in NOTEBOOKS}
  assert {"01_quickstart.ipynb", "03_sharding.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean_and_colab_ready(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs"
  # The first cell sets the notebook up, in Colab (clone + install) and locally (find the
  # repository root; install only if missing), then moves to the repository root.
  first = nb.cells[0]
  assert first.cell_type == "code", "the first cell must be the setup code"
  for needle in ('"google.colab" in sys.modules', "MOE_JAX_REPO", "git", "clone",
                 "pip", "install", "[notebooks]", "setup.py", "gin_configs", "os.chdir"):
    assert needle in first.source, f"first cell lacks {needle!r}"
  ast.parse(first.source)
  # A parameters cell (papermill-style) of plain assignments, after the setup.
  index = parameters_cell_index(nb)
  assert index > 0
  assert parameter_names(nb), "empty parameters cell"
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":  # valid Python once IPython's magics (%, !) are translated
      ast.parse(_python_source(cell.source), filename=f"{path.name}, cell {i}")


def test_injected_parameters_follow_the_parameters_cell():
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("import os"),
      nbformat.v4.new_code_cell("STEPS = 300\nMODEL_DIR = 'runs/x'"),
      nbformat.v4.new_code_cell("print(STEPS)")])
  nb.cells[1].metadata["tags"] = [PARAMETERS_TAG]
  inject_parameters(nb, {"STEPS": 20, "MODEL_DIR": "/tmp/m"})
  assert nb.cells[2].metadata["tags"] == [INJECTED_TAG]
  assert "STEPS = 20\nMODEL_DIR = '/tmp/m'\n" in nb.cells[2].source
  with pytest.raises(KeyError, match="STPES"):
    inject_parameters(nb, {"STPES": 1})


@pytest.mark.slow
@pytest.mark.xdist_group("notebook_kernel")
def test_kernel_is_this_python_with_this_environment(tmp_path):
  """nbclient's "python3" kernel runs the interpreter of the tests (the venv's) and inherits
  the environment tests/conftest.py prepared."""
  path = tmp_path / "probe.ipynb"
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell("X = 1", metadata={"tags": [PARAMETERS_TAG]}),
      nbformat.v4.new_code_cell(
          "import os, sys\nprint(sys.executable)\nprint(os.environ.get('XLA_FLAGS'))\n"
          "print(os.environ.get('MOE_JAX_TFDS_DIR'))\nprint(X)")])
  nbformat.write(nb, str(path))
  out = output_text(execute_notebook(path, {"X": 2}, workdir=tmp_path, timeout=120))
  lines = out.split()
  assert lines[0] == sys.executable
  assert "--xla_force_host_platform_device_count=8" in out
  assert os.environ["MOE_JAX_TFDS_DIR"] in lines and lines[-1] == "2"


# ----------------------------------------------------------------------------------------
# The notebooks, executed (slow: each in its own xdist group, so the two run in parallel)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_dir():
  """The session's local corpus (tests/conftest.py's MOE_JAX_TFDS_DIR), built once under a
  file lock shared with the other tests, so the notebook neither rebuilds it in the repository
  nor downloads anything."""
  pipeline = pytest.importorskip("tasks.pipeline")
  return pipeline.prepare_corpus("small")


@pytest.mark.slow
@pytest.mark.xdist_group("notebook_01")
def test_quickstart_trains_then_routing_analysis_reports(corpus_dir, tmp_path):
  """01 trains a tiny model (two checkpoints); 02 analyses that run."""
  model_dir = tmp_path / "model"
  repo_run = REPO_ROOT / "runs" / "notebook_quickstart"  # the notebook's default MODEL_DIR
  existed = repo_run.exists()
  nb = execute_notebook(
      NOTEBOOK_DIR / "01_quickstart.ipynb",
      {"TRAIN_STEPS": 20, "MODEL_DIR": str(model_dir), "BATCH_SIZE": 8, "SEQUENCE_LENGTH": 128,
       "EVAL_EVERY": 10, "EVAL_BATCHES": 1, "LOG_EVERY": 5, "WARMUP_STEPS": 2,
       "CHECKPOINT_EVERY": 10, "PROGRESS_BAR": False},
      save_to=tmp_path / "executed.ipynb")
  assert_plots(nb, 3)  # loss, per-expert load over time, routing statistics
  text = output_text(nb)
  assert "trained to step 20" in text
  assert "parameters: total" in text
  assert (model_dir / "checkpoints" / "20").is_dir()
  rows = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
  # (openmoe_base_16e_cpu.gin: two layers, the second MoE)
  loads = [r["moe/layer_1/expert_load_after"] for r in rows if r["split"] == "train"]
  assert len(loads) == 4 and all(len(load) == 8 for load in loads)  # the per-expert plot's data
  assert {r["split"] for r in rows} >= {"eval/local_code_lm_8k", "eval/local_english_lm_8k",
                                        "eval/local_multilingual_lm_8k"}
  assert repo_run.exists() == existed, "the test run wrote into the repository's runs/"

  nb = execute_notebook(
      NOTEBOOK_DIR / "02_routing_analysis.ipynb",
      {"MODEL_DIR": str(model_dir), "MAX_TOKENS": 2000, "SEQUENCE_LENGTH": 128,
       "BATCH_SIZE": 8, "CAPACITY_FACTORS": [0.5, 2.0], "MIN_COUNT": 3},
      save_to=tmp_path / "executed_02.ipynb")
  # expert load, specialization, drops, agreement, confidence, dead experts
  assert_plots(nb, 6)
  text = output_text(nb)
  assert "analysing step 20, compared with step 10" in text
  assert "bytes per token" in text
  report = model_dir / "routing_report_notebook"
  assert (report / "report.md").exists() and (report / "records_step20.npz").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("notebook_03")
def test_sharding_notebook_runs_and_plots(tmp_path):
  nb = execute_notebook(
      NOTEBOOK_DIR / "03_sharding.ipynb",
      {"DRY_RUN_PRESET": "gin_configs/models/glam_tiny.gin", "DRY_RUN_SEQ_LEN": 32,
       "DRY_RUN_CONFIGS": [("data:8", False), ("data:2,expert:4", False)]},
      save_to=tmp_path / "executed.ipynb")
  assert_plots(nb, 1)  # dry-run memory per device
  text = output_text(nb)
  assert "CPU 0" in text  # jax.debug.visualize_* tables
  assert "num_experts=6 is not divisible by the 'expert' mesh axis" in text
  assert "all-to-all" in text
