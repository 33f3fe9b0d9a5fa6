"""The export writer of format diffes-pl-routed/3 (pipeline/, routes/ and schedule.json side by
side; the dense pipeline opens dense), kept to check that such exports still load."""
import os
import shutil
import tempfile
from pathlib import Path

from diffes_pl.export import EXPORT_SHA256, _save_pipeline
from diffes_pl.integrity import file_records, sealed
from diffes_pl.io import write_json
from diffes_pl.routed_model import routes
from diffes_pl.trajectory import MANIFEST_SHA256, TrajectoryStore


def save_layout_3(adapter, store, schedule, path):
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    text_encoders, missing = _save_pipeline(adapter, adapter.denoiser, tmp / "pipeline", None)
    manifest = {k: v for k, v in store.manifest.items() if k not in ("nbytes", "format", MANIFEST_SHA256)}
    TrajectoryStore.write(tmp / "routes", manifest, routes(store, schedule, adapter))
    schedule.save(tmp / "schedule.json")
    write_json(tmp / "export.json", sealed({"format": "diffes-pl-routed/3", "name": adapter.name,
                                            "family": adapter.family, "noise_schedule": adapter.noise_schedule,
                                            "text_encoders": text_encoders, "pipeline_missing": missing,
                                            "text_len": adapter.text_len, "files": file_records(tmp)}, EXPORT_SHA256))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
