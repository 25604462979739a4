"""Both notebooks execute headlessly with small settings; the committed files carry no outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_captioning.ipynb", "02_swap_fusion.ipynb"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs before committing"
                assert "def " not in cell.source and "class " not in cell.source, f"{path.name}: define things in vlm, not here"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    for key, value in {"VLM_NB_STEPS": "6", "VLM_NB_DATA": str(tmp_path / "shapes"), "VLM_NB_OUT": str(tmp_path / "out"),
                       "VLM_NB_SMALL_DATA": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
