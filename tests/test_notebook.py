"""The walk-through notebook: committed with its outputs (plots visible on a code host), written against
the public API only, and run end to end (executed, not just stored) with a small budget."""
import base64
import re
from pathlib import Path

import nbclient  # dev dependencies: a missing one fails the test, never skips it
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
PNG = b"\x89PNG\r\n\x1a\n"


def code_outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_committed_notebook_holds_its_outputs_and_plots():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "commit the notebook executed, every cell"
    assert not [o for o in code_outputs(nb) if o.output_type == "error"]
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in code_outputs(nb) if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3 and all(png.startswith(PNG) and len(png) > 2000 for png in pngs)
    text = "".join(o.get("text", "") for o in code_outputs(nb))
    assert re.search(r"best schedule: \[(\d+, ){9}\d+\] fitness 0\.\d+", text)
    assert re.search(r"^searched +SSIM 0\.\d{3}", text, re.M) and re.search(r"^uniform +SSIM", text, re.M)


def test_notebook_uses_the_public_api_only():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.findall(r"from diffes_pl\.|import diffes_pl\.", source)  # `import diffes_pl as dp` only
    for internal in ("ensure_store", ".search.", "search.archive", "Schedule(list"):
        assert internal not in source, internal
    import diffes_pl as dp

    used = set(re.findall(r"\bdp\.(\w+)", source))
    assert used <= set(dp.__all__) | {"__version__"}, used - set(dp.__all__)


def test_walkthrough_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFES_NOTEBOOK_GENERATIONS", "2")
    monkeypatch.setenv("DIFFES_NOTEBOOK_PROBES", "4")
    monkeypatch.setenv("DIFFES_NOTEBOOK_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    before = sorted(p.relative_to(ROOT) for p in (ROOT / "notebooks").rglob("*"))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for o in code_outputs(nb))
    assert "best schedule:" in text and "searched" in text and "uniform" in text
    assert "2 generations, 4 probes" in text
    assert (tmp_path / "run" / "schedule.json").exists() and (tmp_path / "run" / "store").is_dir()
    images = [o for o in code_outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # dense samples, search plots, dense vs pruned grid
    # the run went where it was told: nothing new beside the notebook
    assert sorted(p.relative_to(ROOT) for p in (ROOT / "notebooks").rglob("*")) == before
