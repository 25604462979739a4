"""The notebooks are committed with the outputs of a real run (`make notebooks`) and execute
headlessly with small settings through the same script; notebook 02's parameter table counts
trainable parameters only."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
from tiny_models import tiny_model

from vlm.stages import set_trainable

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def load_runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "scripts" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_committed_with_the_outputs_of_a_run():
    assert [p.name for p in NOTEBOOKS] == ["01_captioning.ipynb", "02_swap_fusion.ipynb", "03_few_shot.ipynb"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        counts = [cell.execution_count for cell in code]
        assert counts == list(range(1, len(code) + 1)), f"{path.name}: run `make notebooks` before committing"
        assert not [o for cell in code for o in cell.outputs if o.output_type == "error"], path.name
        assert any(o.get("data", {}).get("image/png") for cell in code for o in cell.outputs), f"{path.name}: no picture"
        for cell in code:
            assert "def " not in cell.source and "class " not in cell.source, f"{path.name}: define things in vlm, not here"


def code_after(path: Path, heading: str) -> str:
    """Source of the first code cell after the markdown cell that starts with `heading`."""
    cells = nbformat.read(path, as_version=4).cells
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith(heading))
    return next(c.source for c in cells[start + 1 :] if c.cell_type == "code")


@pytest.mark.parametrize("fusion", ["llava", "flamingo"])
def test_swap_notebook_counts_trainable_parameters_only(fusion):
    # The recipe trains everything, so the notebook's own run cannot tell trainable from total:
    # run its table cell on a model whose text and vision parts are frozen.
    model = tiny_model(fusion)
    table = set_trainable(model, "align")
    namespace = {"pd": pd, "runs": {fusion: SimpleNamespace(model=SimpleNamespace(parameter_table=table))}}
    exec(code_after(NOTEBOOKS[1], "## Trainable parameters"), namespace)
    column = namespace["trainable"][fusion]
    assert table.frozen > 0
    assert column["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert column["fusion"] == sum(p.numel() for p in model.fusion.parameters())
    assert column["text"] == column["vision"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """`make notebooks`' script on a copy, with small settings: every cell runs and the copy is
    written with its outputs."""
    for key, value in {"VLM_NB_STEPS": "6", "VLM_NB_DATA": str(tmp_path / "shapes"), "VLM_NB_OUT": str(tmp_path / "out"),
                       "VLM_NB_SMALL_DATA": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    assert load_runner().main([str(path), "--out", str(tmp_path / "executed"), "--timeout", "600"]) == 0
    executed = nbformat.read(tmp_path / "executed" / path.name, as_version=4)
    assert all(cell.execution_count for cell in executed.cells if cell.cell_type == "code")
