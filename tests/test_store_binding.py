"""A schedule is bound to the trajectory store it was searched on: the router refuses another
pruner's or calibration's store, `diffes-pl test` routes with the store recorded in the schedule and
says so in evaluation.json, and a damaged store stops `fit` with one line before it is reused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router, RoutingError
from helpers.routing_reference import random_store
from helpers.search_runs import ENV, ROOT, SMALL


def test_router_refuses_another_pruners_or_calibrations_store(tiny, tmp_path):
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 4, 2)
    store = random_store(tiny, tmp_path / "store", 4, partition)  # built by the pruner "test"

    def schedule(**binding):
        return Schedule([3, 1], 4, 2, partition.steps_per_stage, partition=partition.to_dict(),
                        store="runs/obs/store", **binding)

    with pytest.raises(RoutingError) as err:
        Router(tiny, store, schedule(pruner="obs"))
    assert str(err.value) == (f"the schedule was searched with the 'obs' pruner but the trajectory store at "
                              f"{store.path} was built by 'test'; route it with the store it was searched on "
                              f"(runs/obs/store), or search a schedule on this store")
    with pytest.raises(RoutingError, match=rf"searched on the trajectory store with key 0123456789ab… but the store "
                                           rf"at {store.path} has key {store.key[:12]}…"):
        Router(tiny, store, schedule(pruner="test", store_key="0123456789abcdef"))
    Router(tiny, store, schedule(pruner="test", store_key=store.key)).remove()  # its own store: routed
    Router(tiny, store, schedule()).remove()  # an older schedule without a binding: routed as before


def test_store_key_round_trips_and_old_schedules_load(tmp_path):
    s = Schedule([10, 6, 8], 16, 8, [1, 1, 1], pruner="obs", store="runs/x/store", store_key="abc")
    s.save(tmp_path / "s.json")
    assert Schedule.load(tmp_path / "s.json").store_key == "abc"
    data = json.loads((tmp_path / "s.json").read_text())
    del data["store_key"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Schedule.load(tmp_path / "old.json").store_key is None


# --- the CLI ---------------------------------------------------------------------------------------
def cli(*args: str, cwd: Path, rc: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffes_pl.cli", *args]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("diffes-pl: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


def evaluate(run: Path, schedule: Path, rc: int = 0) -> subprocess.CompletedProcess:
    return cli("test", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL, "--trainer.default_root_dir", str(run),
               "--schedule", str(schedule), "--eval.num_images", "4", "--eval.batch_size", "4",
               "--eval.latency_batch_size", "0", "--eval.uniform", "false", "--eval.metrics", "[ssim]",
               cwd=run.parent, rc=rc)


@pytest.fixture(scope="module")
def wanda_run(tmp_path_factory):
    """A run folder holding only a Wanda store (`diffes-pl predict`)."""
    run = tmp_path_factory.mktemp("binding") / "run"
    cli("predict", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL, "--trainer.default_root_dir", str(run),
        cwd=run.parent)
    manifest = json.loads((run / "store" / "manifest.json").read_text())
    assert manifest["pruner"] == "wanda"
    return run, manifest


def _schedule(manifest: dict, **binding) -> Schedule:
    partition = manifest["key_fields"]["partition"]
    return Schedule([6, 2, 4, 4], 8, 4, partition["steps_per_stage"], partition=partition, **binding)


def test_obs_schedule_on_a_wanda_store_is_refused(wanda_run):
    run, manifest = wanda_run
    _schedule(manifest, pruner="obs", store=str(run / "store")).save(run / "obs.json")
    line = error_line(evaluate(run, run / "obs.json", rc=2))
    assert line == (f"diffes-pl: error: RoutingError: the schedule was searched with the 'obs' pruner but the "
                    f"trajectory store at {run / 'store'} was built by 'wanda'; route it with the store it was "
                    f"searched on ({run / 'store'}), or search a schedule on this store")
    assert not (run / "eval").exists()  # refused before sampling anything


def test_schedule_whose_store_is_gone_is_not_evaluated_on_another(wanda_run):
    run, manifest = wanda_run
    _schedule(manifest, pruner="wanda", store=str(run / "gone"), store_key="0" * 64).save(run / "moved.json")
    line = error_line(evaluate(run, run / "moved.json", rc=2))
    assert line.startswith(f"diffes-pl: error: StoreMismatchError: the schedule {run / 'moved.json'} was searched "
                           f"on the trajectory store {run / 'gone'} (key 000000000000…), which is gone; the "
                           f"configured store {run / 'store'} (key {manifest['key'][:12]}…, pruner wanda)")


def test_test_uses_the_store_recorded_in_the_schedule(wanda_run):
    """A schedule copied into another folder is still routed with the store it was searched on, and
    evaluation.json says which store, key and pruner were evaluated."""
    run, manifest = wanda_run
    elsewhere = run.parent / "elsewhere"
    elsewhere.mkdir()
    schedule = _schedule(manifest, pruner="wanda", store=str(run / "store"), store_key=manifest["key"])
    schedule.save(elsewhere / "schedule.json")
    out = evaluate(elsewhere, elsewhere / "schedule.json")
    assert f"on the trajectory store {run / 'store'} (pruner wanda)" in out.stdout
    result = json.loads((elsewhere / "evaluation.json").read_text())
    assert result["store"] == str(run / "store") and result["store_key"] == manifest["key"]
    assert result["pruner"] == "wanda" and result["levels"] == [6, 2, 4, 4]
    assert result["schedule"] == str(elsewhere / "schedule.json")
    assert result["results"]["searched"]["levels"] == [6, 2, 4, 4] and 0 < result["results"]["searched"]["ssim"] < 1
    assert not (elsewhere / "store").exists()


def test_truncated_store_stops_fit_before_reuse(wanda_run):
    import shutil

    run = wanda_run[0].parent / "truncated"
    shutil.copytree(wanda_run[0] / "store", run / "store")  # the other tests keep an intact store
    shard = run / "store" / "stage_01.safetensors"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 100])
    out = cli("fit", "--config", str(ROOT / "configs/tiny_obs.yaml"), *SMALL, "--trainer.max_epochs", "1",
              "--trainer.default_root_dir", str(run), cwd=run.parent, rc=2)
    assert error_line(out) == (f"diffes-pl: error: StoreCorruptError: the trajectory store shard {shard} is corrupt: "
                               f"truncated ({size - 100} of {size} bytes); delete {run / 'store'} and rebuild it "
                               f"with `diffes-pl predict --config <your config>`")
    assert "reusing it" not in out.stdout
