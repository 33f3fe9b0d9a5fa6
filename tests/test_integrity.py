"""Every file diffes-pl reads back and trusts is refused when damaged (issue 22): 64 bytes flipped at
the start, middle or end of a search checkpoint, a store's manifest or shard, an export's files, an
evaluation batch or evaluations.jsonl raise one line naming that file and the way out, and the
refusal changes no file. Intact files still load (Lightning resumes the sealed checkpoint), and files
of older versions without checksums are still read."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from diffes_pl import export
from diffes_pl.evaluation.generate import ImageSet
from diffes_pl.integrity import DamagedFileError, check_zip
from diffes_pl.schedule import Schedule
from diffes_pl.search.archive_file import read_evaluations
from diffes_pl.search.resume import CHECKPOINT_FORMAT, GenerationCheckpoint, read_checkpoint
from diffes_pl.trajectory import MANIFEST_SHA256, StoreCorruptError, TrajectoryStore, make_key

from helpers.routing_reference import random_store_and_partition
from helpers.search_runs import ENV, calibrated_search, fit_command

WHERE = ["start", "middle", "end"]
SEARCH = {"num_stages": 4, "steps": 8, "num_probes": 4, "offspring": 4, "survivors": 2, "max_move": 2}


def offset(path: Path, where: str) -> int:
    size = path.stat().st_size
    return {"start": 0, "middle": size // 2 - 32, "end": size - 64}[where]


def flip(path: Path, where: str, count: int = 64) -> int:
    """XORs `count` bytes of `path` with 0xFF at `where`; returns the offset."""
    data = bytearray(path.read_bytes())
    at = offset(path, where)
    for i in range(at, at + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return at


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and message, message
    return message


def refused(folder: Path, error, call, *phrases: str) -> str:
    """Runs `call`, which must raise `error`; the message is one line holding `phrases`, and no file
    under `folder` changed."""
    before = snapshot(folder)
    with pytest.raises(error) as err:
        call()
    assert snapshot(folder) == before
    line = one_line(err)
    for phrase in phrases:
        assert phrase in line, line
    return line


# --- (a) the search checkpoint ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A 1-generation search of the built-in model (Wanda, 4 stages of 2 steps, 4 probes)."""
    root = tmp_path_factory.mktemp("search")
    module, trainer = calibrated_search(root, 1, callbacks=[GenerationCheckpoint()], **SEARCH)
    trainer.fit(module)
    return root, module


@pytest.mark.parametrize("where", WHERE)
def test_a_damaged_checkpoint_is_refused(search, tmp_path, where):
    root, _ = search
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(root / "checkpoints" / "last.ckpt", ckpt)
    flip(ckpt, where)
    line = refused(tmp_path, DamagedFileError, lambda: read_checkpoint(ckpt), f"checkpoint {ckpt} is ",
                   "resume from a copy, or start again with --overwrite true")
    assert "damaged (checksum mismatch" in line or "truncated or corrupt" in line


def test_the_cli_refuses_a_damaged_checkpoint_in_one_line(search, tmp_path):
    """The probe of issue 22: 64 bytes flipped in the middle of last.ckpt, then `fit --ckpt_path last`."""
    root, _ = search
    run = tmp_path / "run"
    shutil.copytree(root, run)
    flip(run / "checkpoints" / "last.ckpt", "middle")
    before = snapshot(run)
    # refused before its settings are compared with the checkpoint's, or anything is built
    out = subprocess.run(fit_command(run, 2, "--ckpt_path", "last"), env=ENV, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line == (f"diffes-pl: error: DamagedFileError: checkpoint {run / 'checkpoints' / 'last.ckpt'} is damaged "
                    "(checksum mismatch: it changed after it was written); resume from a copy, or start again with "
                    "--overwrite true (its generations are lost)")
    assert {k: v for k, v in snapshot(run).items() if "lock" not in k} == \
        {k: v for k, v in before.items() if "lock" not in k}


def test_an_intact_checkpoint_resumes_under_lightning(search, tmp_path):
    """The seal lives in the zip comment: torch.load and Lightning's own loading read the file as before."""
    import lightning as L

    from diffes_pl.pruners import WandaPruner
    from diffes_pl.search.lightning_module import DiffES

    root, module = search
    ckpt = tmp_path / "last.ckpt"
    shutil.copy(root / "checkpoints" / "last.ckpt", ckpt)
    assert check_zip(ckpt, CHECKPOINT_FORMAT) == (True, "")
    assert torch.load(ckpt, weights_only=False)["diffes"]["archive"] == module.search.archive
    assert read_checkpoint(ckpt)["diffes"]["archive"] == module.search.archive
    resumed = DiffES(pruner=WandaPruner(), store=str(module.context.store_path), **SEARCH)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / "run",
                        callbacks=[GenerationCheckpoint()])
    trainer.fit(resumed, ckpt_path=str(ckpt))
    assert resumed.search.generation == 2
    assert resumed.search.archive[:len(module.search.archive)] == module.search.archive
    assert check_zip(tmp_path / "run" / "checkpoints" / "last.ckpt", CHECKPOINT_FORMAT) == (True, "")  # resealed


def test_a_checkpoint_without_a_seal_is_read_with_a_warning(search, tmp_path):
    """Checkpoints of older versions end with a zip without comment: read, unverified, with one warning."""
    root, module = search
    data = (root / "checkpoints" / "last.ckpt").read_bytes()
    legacy = data[:data.rindex(b"PK\x05\x06") + 20] + b"\0\0"  # the EOCD, its comment length 0, no comment
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(legacy)
    assert check_zip(ckpt, CHECKPOINT_FORMAT) == (False, "")
    with pytest.warns(UserWarning, match="has no checksum .* read unverified"):
        assert read_checkpoint(ckpt)["diffes"]["archive"] == module.search.archive
    ckpt.write_bytes(legacy[:-30])  # a legacy file cut short is still refused
    with pytest.raises(DamagedFileError, match="truncated or corrupt"):
        read_checkpoint(ckpt)


# --- (f) evaluations.jsonl ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", WHERE)
def test_a_damaged_evaluations_line_is_refused(search, tmp_path, where):
    root, _ = search
    path = tmp_path / "evaluations.jsonl"
    shutil.copy(root / "evaluations.jsonl", path)
    at = flip(path, where)
    line_number = path.read_bytes()[:at].count(b"\n") + 1
    refused(tmp_path, DamagedFileError, lambda: read_evaluations(path), f"{path} line {line_number} is damaged (",
            "it is rewritten from checkpoints/last.ckpt when the search resumes, or rerun the search")


def test_evaluation_rows_hold_no_check_and_edits_are_refused(search, tmp_path):
    root, module = search
    rows = read_evaluations(root / "evaluations.jsonl")
    assert rows == module.search.archive and all("check" not in r for r in rows)
    lines = (root / "evaluations.jsonl").read_text().splitlines()
    assert all(json.loads(line)["check"] for line in lines)
    path = tmp_path / "evaluations.jsonl"
    edited = json.loads(lines[2])
    edited["fitness"] += 0.01  # still valid JSON, another result
    path.write_text("\n".join([*lines[:2], json.dumps(edited), *lines[3:]]) + "\n")
    refused(tmp_path, DamagedFileError, lambda: read_evaluations(path),
            "line 3 is damaged (checksum mismatch: it changed after it was written)")
    # a file of an older version (no check on any line) is read as it is
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_evaluations(path) == rows


# --- (b, c) the trajectory store ------------------------------------------------------------------------
FIELDS = {"denoiser": {"name": "tiny-digits"}, "pruner": {"name": "obs"}}


def small_store(path: Path) -> TrajectoryStore:
    manifest = {"key": make_key(FIELDS), "key_fields": FIELDS, "pruner": "obs", "levels_max": 2, "num_stages": 2,
                "compensated": True}
    stages = [{"blocks.0.ff.order": torch.tensor([2, 0, 1, 3]), "blocks.0.ff.weight.1": torch.randn(64, 3)}
              for _ in range(2)]
    return TrajectoryStore.write(path, manifest, stages)


@pytest.mark.parametrize("where", WHERE)
def test_a_damaged_manifest_is_named_as_the_manifest(tmp_path, where):
    store = small_store(tmp_path / "store")
    manifest = tmp_path / "store" / "manifest.json"
    assert store.manifest["format"] == 3 and MANIFEST_SHA256 in store.manifest
    flip(manifest, where)
    refused(tmp_path, StoreCorruptError, lambda: TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS),
            f"the manifest {manifest} ", f"delete {tmp_path / 'store'} and rebuild it")


def test_an_edited_manifest_is_blamed_on_the_manifest_not_a_shard(tmp_path):
    small_store(tmp_path / "store")
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    record = manifest["shards"]["stage_00.safetensors"]
    record["sha256"] = ("0" if record["sha256"][0] != "0" else "1") + record["sha256"][1:]
    path.write_text(json.dumps(manifest, indent=1))
    line = refused(tmp_path, DamagedFileError, lambda: TrajectoryStore.open(tmp_path / "store"),
                   f"the manifest {path} was changed after the store was written (checksum mismatch); delete")
    assert "stage_00" not in line


@pytest.mark.parametrize("where", WHERE)
def test_a_damaged_shard_is_refused(tmp_path, where):
    small_store(tmp_path / "store")
    shard = tmp_path / "store" / "stage_01.safetensors"
    flip(shard, where)
    refused(tmp_path, DamagedFileError, lambda: TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS),
            f"the trajectory store shard {shard} is corrupt: checksum mismatch")


def test_a_format_2_store_still_opens(tmp_path):
    small_store(tmp_path / "store")
    path = tmp_path / "store" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest[MANIFEST_SHA256]
    path.write_text(json.dumps({**manifest, "format": 2}, indent=1))
    store = TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)  # shards verified, manifest as before
    assert store.order(1, "blocks.0.ff").tolist() == [2, 0, 1, 3]
    flip(tmp_path / "store" / "stage_00.safetensors", "end")
    with pytest.raises(StoreCorruptError, match="stage_00.safetensors is corrupt: checksum mismatch"):
        TrajectoryStore.open(tmp_path / "store", key_fields=FIELDS)


# --- (d) exports ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    store, partition = random_store_and_partition(tiny, root / "store", 4, 2, 4, compensated=True)
    schedule = Schedule([3, 1], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict())
    return export.save(tiny, store, schedule, root / "exported")


def weights_file(folder: Path) -> str:
    (weights,) = [p for p in folder.rglob("diffusion_pytorch_model*.safetensors")]
    return weights.relative_to(folder).as_posix()


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("name", ["weights", "transformer/routes/stage_00.safetensors", "transformer/routes/manifest.json",
                                  "transformer/schedule.json", "transformer/routing.json", "export.json"])
def test_a_damaged_export_file_is_refused_before_loading(exported, tmp_path, where, name):
    folder = tmp_path / "exported"
    shutil.copytree(exported, folder)
    name = weights_file(folder) if name == "weights" else name
    flip(folder / name, where)
    refused(tmp_path, DamagedFileError, lambda: export.load(folder),
            f"export {folder}: {name} is damaged (", "export again with diffes_pl.export.save")


def test_an_export_missing_a_file_is_refused_and_an_intact_one_loads(exported, tmp_path):
    folder = tmp_path / "exported"
    shutil.copytree(exported, folder)
    _, router = export.load(folder)
    router.remove()
    info = json.loads((folder / "export.json").read_text())
    assert info["format"] == "diffes-pl-routed/4" and "transformer/routes/manifest.json" in info["files"]
    name = weights_file(folder)
    assert info["files"][name]["bytes"] == (folder / name).stat().st_size
    (folder / "transformer" / "routes" / "stage_01.safetensors").unlink()
    refused(tmp_path, DamagedFileError, lambda: export.load(folder),
            f"export {folder}: transformer/routes/stage_01.safetensors is damaged (the file is missing)")


def test_a_format_2_export_still_loads(tiny, tmp_path):
    from helpers.legacy_export import save_layout_3

    store, partition = random_store_and_partition(tiny, tmp_path / "store", 4, 2, 4, compensated=True)
    schedule = Schedule([3, 1], store.levels_max, 2, partition.steps_per_stage, partition=partition.to_dict())
    folder = save_layout_3(tiny, store, schedule, tmp_path / "exported")
    info = json.loads((folder / "export.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("files", export.EXPORT_SHA256)}
    (folder / "export.json").write_text(json.dumps({**old, "format": "diffes-pl-routed/2"}))
    routes = json.loads((folder / "routes" / "manifest.json").read_text())  # its store is format 2 as well
    del routes[MANIFEST_SHA256]
    (folder / "routes" / "manifest.json").write_text(json.dumps({**routes, "format": 2}))
    with pytest.warns(UserWarning, match="has no checksums"):
        _, router = export.load(folder)
    router.remove()


# --- (e) evaluation image batches --------------------------------------------------------------------
def image_set(root: Path) -> ImageSet:
    return ImageSet(root, "dense", None, {"seed": 0, "batch_size": 4}, num_images=8)


@pytest.mark.parametrize("where", WHERE)
def test_a_damaged_evaluation_batch_is_refused(tmp_path, where):
    images = image_set(tmp_path)
    for b in range(2):
        images.save(b, torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(b)))
    assert images.load().shape == (8, 1, 8, 8)
    batch = images.batch_path(0)  # the first read: write_pngs writes no PNG before it
    flip(batch, where)
    fix = "delete it (it is sampled again) and rerun"
    refused(tmp_path, DamagedFileError, images.load, f"evaluation batch {batch} is damaged (", fix)
    refused(tmp_path, DamagedFileError, images.write_pngs, f"evaluation batch {batch} is damaged (", fix)


def test_batches_of_an_older_version_are_not_reused(tmp_path):
    """Batch files without a checksum: a folder of an older version has another name (never matched);
    such a file found in a current folder is refused."""
    from safetensors.torch import save_file

    images = image_set(tmp_path)
    legacy = json.dumps({"levels": None, "seed": 0, "batch_size": 4}, sort_keys=True, default=str)
    assert images.folder.name != f"dense-{hashlib.sha256(legacy.encode()).hexdigest()[:10]}"
    images.folder.mkdir(parents=True)
    for b in range(2):
        save_file({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, str(images.batch_path(b)))
    refused(tmp_path, DamagedFileError, images.load, "is damaged (its checksum is missing)")
