"""The walk-through notebook runs end to end (executed, not just stored) with a small budget."""
from pathlib import Path

import nbclient  # dev dependencies: a missing one fails the test, never skips it
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def test_walkthrough_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFES_NOTEBOOK_GENERATIONS", "2")
    monkeypatch.setenv("DIFFES_NOTEBOOK_PROBES", "4")
    monkeypatch.setenv("DIFFES_NOTEBOOK_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "best schedule:" in text and "searched" in text and "uniform" in text
    assert (tmp_path / "run" / "schedule.json").exists() and (tmp_path / "run" / "store").is_dir()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # dense samples, search plots, dense vs pruned grid
