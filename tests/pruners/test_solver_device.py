"""Where the OBS solve runs and with how many threads (issue 24, part 5). No test needs CUDA: the
placement is checked on CPU tensors and by the decisions themselves (`solver_device`,
`solve_threads`), and a device other than the CPU is only named, never used."""
import lightning as L
import pytest
import torch

from diffes_pl.partition import StagePartition
from diffes_pl.pruners import OBSPruner, build_store
from diffes_pl.pruners import obs as obs_module
from diffes_pl.pruners.obs import solve_summary
from diffes_pl.pruners.obs_solver import available_cpus, prune_groups, solve_threads, solver_device

from helpers.pruner_reference import HandNoisedDigits


def _problem():
    g = torch.Generator().manual_seed(24)
    X = torch.randn(32, 200, generator=g, dtype=torch.float64)
    return torch.randn(12, 32, generator=g), X @ X.T  # weight float32 [out, in], Hessian float64 [in, in]


def test_cpu_float64_solve_is_the_previous_one():
    W, H = _problem()
    # order and errors printed by the implementation before `device` existed (commit 799ad35), same inputs
    before = prune_groups(W, H, 4, [2, 8], mode="fast")
    assert before[1].removed.tolist() == [4, 1, 5, 7, 3, 6, 0, 2]
    assert before[0].error == pytest.approx(15476.28316959137, rel=1e-12)
    assert before[1].error == pytest.approx(78888.86789346898, rel=1e-12)
    for mode in ("fast", "exact"):
        default = prune_groups(W, H, 4, [0, 2, 5, 8], mode=mode)
        named = prune_groups(W, H, 4, [0, 2, 5, 8], mode=mode, device="cpu")
        for a, b in zip(default, named):  # naming the device changes nothing, bit for bit
            assert torch.equal(a.weight, b.weight) and torch.equal(a.removed, b.removed) and a.error == b.error


def test_results_come_back_in_the_weights_dtype_and_device():
    W, H = _problem()
    for res in prune_groups(W, H, 4, [0, 3], device="cpu"):
        assert res.weight.dtype == torch.float32 and res.weight.device.type == "cpu"
        assert res.removed.device.type == "cpu" and res.kept.device.type == "cpu"
    assert prune_groups(W.double(), H, 4, [3])[0].weight.dtype == torch.float64


def test_solver_device_is_the_named_device_else_the_hessians():
    H = torch.zeros(4, 4)
    assert solver_device(H) == torch.device("cpu")
    assert solver_device(H, "cuda:1") == torch.device("cuda", 1)  # named, not allocated: no GPU needed
    with pytest.raises(ValueError, match="meta"):
        solver_device(torch.zeros(4, 4, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        prune_groups(torch.zeros(2, 4), H + torch.eye(4), 1, [1], device="meta")


def test_solve_threads_lifts_only_what_lightning_divided(monkeypatch):
    monkeypatch.setattr("diffes_pl.pruners.obs_solver.available_cpus", lambda: 8)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # as Lightning's DDP launcher leaves 4 ranks on 8 CPUs
        with solve_threads("cpu", solving_processes=1, running_processes=4) as n:
            assert n == torch.get_num_threads() == 8  # rank 0 solves alone: every CPU
        assert torch.get_num_threads() == 2  # restored
        with solve_threads("cpu", solving_processes=4, running_processes=4) as n:
            assert n == 2  # every rank solves: the division stands
        with solve_threads("cpu", 1, 1) as n:
            assert n == 2  # one process: its own setting (OMP_NUM_THREADS, torch's default) is kept
        with solve_threads("cuda", 1, 4) as n:
            assert n == 2  # the solve is on the accelerator: CPU threads untouched
        torch.set_num_threads(1)
        with solve_threads("cpu", 2, 4) as n:
            assert n == 4
    finally:
        torch.set_num_threads(before)
    assert available_cpus() >= 1


def test_solve_summary_line():
    line = solve_summary(3, {"blocks.0.attn1": (0, 0.25), "blocks.0.ff": (0, 0.5), "blocks.1.ff": (1, 0.625)})
    assert line == "stage 3: OBS solve 1.4 s (2 blocks, 3 groups; slowest block 0 0.8 s, blocks.1.ff 0.6 s)"


def test_pruner_solves_on_its_device_and_prints_one_line_per_stage(tiny, tmp_path, monkeypatch, capsys):
    seen = []
    real = obs_module.prune_groups

    def spy(weight, hessian, *args, **kwargs):
        seen.append((kwargs["device"], hessian.device, weight.device))
        return real(weight, hessian, *args, **kwargs)

    monkeypatch.setattr(obs_module, "prune_groups", spy)
    partition = StagePartition.from_scheduler(tiny.make_scheduler("ddim"), 20, 2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    build_store(trainer, OBSPruner(), HandNoisedDigits(), tiny, partition, tmp_path / "store", 8, log=lambda *_: None)
    groups = len(tiny.unit_groups())
    assert len(seen) == 2 * groups
    assert all(d == torch.device("cpu") and h.type == "cpu" and w.type == "cpu" for d, h, w in seen)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "OBS solve" in ln]
    blocks = len({g.block for g in tiny.unit_groups()})
    assert [ln.split(":")[0] for ln in lines] == ["stage 0", "stage 1"]
    assert all(f"({blocks} blocks, {groups} groups;" in ln for ln in lines)
