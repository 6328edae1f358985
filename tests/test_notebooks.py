"""Every notebook runs top to bottom (QUICK settings, Agg backend) and is stored without outputs."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_equivalence", "02_flatland", "03_temperature_sweep", "04_optimizers",
            "05_zoo_tour"]


def test_the_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_outputs_cleared(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has an execution count"
    # Each notebook uses the package; none redefines its public functions.
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "import energy_attn" in code or "from energy_attn" in code
    for name in ("hopfield_energy", "minimize_energy", "simulate_and_plot_patterns"):
        assert f"def {name}" not in code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    import nbclient  # the [test] extra installs nbclient, nbformat, ipykernel
    import nbformat

    # The kernel inherits this environment: quick settings, headless plotting.
    monkeypatch.setenv("ENERGY_ATTN_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
