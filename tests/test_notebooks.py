"""The notebooks under notebooks/: stored without outputs, public API only, and they run
top to bottom (nbclient, the python3 kernel of this environment)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "gmm.ipynb", "scaling_out.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has stored outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_public_api_only(path):
    import pipeline

    nb = nbformat.read(path, as_version=4)
    src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import pipeline as pl" in src
    # No private modules or names: only what `pipeline.__all__` exports.
    assert not re.search(r"\bfrom pipeline\.|\bimport pipeline\.", src), path.name
    used = set(re.findall(r"\bpl\.(\w+)", src))
    assert used, path.name
    assert used <= set(pipeline.__all__), sorted(used - set(pipeline.__all__))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # A LocalCluster in the notebook, not a scheduler somebody left in the environment;
    # the kernel's own (inline) matplotlib backend.
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    if os.environ.get("PIPELINE_KEEP_NOTEBOOKS"):
        nbformat.write(nb, os.path.join(os.environ["PIPELINE_KEEP_NOTEBOOKS"], path.name))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # The plots were drawn.
    if True:
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert images, f"{path.name} drew no figure"
