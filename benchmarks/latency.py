"""Dense vs routed denoiser step time and MACs, and the memory of routing vs stitched copies.

    python benchmarks/latency.py                                   # DiT-XL/2 (random weights), CPU, batch 1 2
    python benchmarks/latency.py --device cuda --batch-sizes 1 2 8 16 32 --dtype float16

A step is one denoiser forward on the CFG batch (2 × batch size). The routed model runs a uniform
level-L-of-H schedule through the Router (physically sliced heads and MLP channels; the store's
orders are random: speed depends on shapes, not on which units go). Times are medians after
warm-up (CUDA events on a GPU, perf_counter on CPU). Memory: a 10-stage schedule of varying levels
routed on one denoiser (all stages resident, and `resident=False`: one shared buffer per layer) vs 10
stitched pruned copies (parameter bytes, measured on the modules).
Writes benchmarks/results/latency_<device>.json.

    python benchmarks/latency.py --sparsity 2:4 [--device cuda --dtype float16]

N:M sparsity instead (issue 25): DiT-XL/2's six linear shapes per block (q, k, v and out 1152→1152,
MLP 1152→4608 and 4608→1152) on a CFG batch's tokens (2 × batch × 256), each timed dense, with the
2:4 mask applied to a dense weight (the same dense kernel: what unstructured or N:M sparsity gives
without a sparse kernel), and on CUDA with the weight in PyTorch's semi-structured format
(`to_sparse_semi_structured`: cuSPARSELt / CUTLASS, fp16/bf16). The CPU has no 2:4 kernel: there the
masked weight runs as fast as the dense one, and the script says so. Then a whole DiT-XL/2 call: dense,
with every attention and MLP linear 2:4-masked (magnitude masks) installed as the router installs a
sparse stage, and on CUDA those weights semi-structured. Writes benchmarks/results/latency_sparse_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffes_pl as dp
from diffes_pl.partition import StagePartition
from diffes_pl.schedule import Schedule
from diffes_pl.routing import Router
from diffes_pl.trajectory import TrajectoryStore, make_key


def random_store(adapter, path: Path, levels_max: int, num_stages: int) -> TrajectoryStore:
    g = torch.Generator().manual_seed(0)
    stages = [{f"{grp.name}.order": torch.randperm(grp.size, generator=g) for grp in adapter.unit_groups()}
              for _ in range(num_stages)]
    fields = {"denoiser": adapter.identity()}
    manifest = {"key": make_key(fields), "key_fields": fields, "pruner": "random", "levels_max": levels_max,
                "num_stages": num_stages}
    return TrajectoryStore.write(path, manifest, stages)


def timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            return times
    else:
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return times
    return run


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


DIT_XL_LINEARS = {"attn q/k/v/out": (1152, 1152), "mlp up": (1152, 4608), "mlp down": (4608, 1152)}


def sparse_layers(args, device: torch.device, dtype: torch.dtype) -> None:
    """Dense vs 2:4-masked dense vs semi-structured sparse (CUDA) per DiT-XL/2 linear shape."""
    from diffes_pl.pruners.sparse_solver import magnitude_mask

    n, m = (int(x) for x in args.sparsity.split(":"))
    run = timer(device)
    semi = None
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):  # the formats the kernels take
        from torch.sparse import to_sparse_semi_structured as semi
    g = torch.Generator().manual_seed(0)
    result = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": args.dtype, "sparsity": args.sparsity, "rows": []}
    for batch in args.batch_sizes:
        tokens = 2 * batch * 256  # CFG: conditional and unconditional halves, 256 tokens at 256 px
        for name, (fan_in, fan_out) in DIT_XL_LINEARS.items():
            weight = torch.randn(fan_out, fan_in, generator=g).to(device, dtype)
            masked = weight * ~magnitude_mask(weight.float().cpu(), n_m=(n, m)).to(device)
            x = torch.randn(tokens, fan_in, generator=g).to(device, dtype)
            row = {"layer": name, "in": fan_in, "out": fan_out, "batch": batch, "tokens": tokens}
            kinds = {"dense": weight, f"{args.sparsity} masked dense": masked}
            if semi is not None and (n, m) == (2, 4):
                kinds[f"{args.sparsity} semi-structured"] = semi(masked)
            with torch.inference_mode():
                for kind, w in kinds.items():
                    fn = lambda w=w: torch.nn.functional.linear(x, w)
                    run(fn, args.warmup)
                    row[kind] = statistics.median(run(fn, args.repeats))
            for kind in list(kinds)[1:]:
                row[f"{kind} / dense"] = row[kind] / row["dense"]
            result["rows"].append(row)
            print(" · ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    result["steps"] = whole_step(args, device, dtype, run, (n, m), semi)
    if semi is None:
        why = (f"no {args.sparsity} kernel on {device.type}" if device.type != "cuda" else
               "semi-structured kernels take float16 or bfloat16 (--dtype float16)")
        result["note"] = (f"{why}: a masked weight runs through the same dense kernel, so unstructured and N:M "
                          "sparsity give no speedup here")
        print(result["note"])
    out = Path(args.out or Path(__file__).parent / "results" / f"latency_sparse_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


def whole_step(args, device: torch.device, dtype: torch.dtype, run, n_m: tuple[int, int], semi) -> list[dict]:
    """One denoiser call of DiT-XL/2 (random weights) dense, with every attention and MLP linear at
    n:m installed as the router installs a sparse stage (full-size masked weights, by reference), and
    (CUDA, 2:4, fp16/bf16) with those weights as semi-structured sparse tensors."""
    from diffes_pl.pruners.sparse_solver import magnitude_mask

    adapter = dp.load_denoiser(args.model, weights=False, device=device, dtype=dtype)
    masked = {}
    for group in adapter.unit_groups():
        weights = {}
        for name, linear in adapter.sparse_linears().items():
            if name.startswith(group.name + "."):
                w = linear.weight.detach()
                weights[name[len(group.name) + 1:]] = w * ~magnitude_mask(w.float().cpu(), n_m=n_m).to(device)
        masked[group.name] = adapter.sparse_module(group, weights)
    rows = []
    for batch in args.batch_sizes:
        latents = torch.randn(2 * batch, *adapter.latent_shape, device=device, dtype=dtype)
        t = torch.full((2 * batch,), 500.0, device=device)
        cond = adapter.example_condition(2 * batch, device)
        fn = lambda: adapter.predict_noise(latents, t, cond)
        row = {"what": "whole DiT step (CFG batch)", "batch": batch}
        kinds = {"dense": None, f"{args.sparsity} masked dense": masked}
        if semi is not None and n_m == (2, 4):
            kinds[f"{args.sparsity} semi-structured"] = {
                name: _semi(module, semi) for name, module in masked.items()}
        with torch.inference_mode():
            for kind, modules in kinds.items():
                for group in adapter.unit_groups():
                    adapter.install(group, adapter.dense_module(group) if modules is None else modules[group.name])
                run(fn, args.warmup)
                row[kind] = statistics.median(run(fn, args.repeats))
        adapter.restore_dense()
        for kind in list(kinds)[1:]:
            row[f"{kind} / dense"] = row[kind] / row["dense"]
        rows.append(row)
        print(" · ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def _semi(module: torch.nn.Module, semi) -> torch.nn.Module:
    """A copy of `module` whose linear weights are semi-structured sparse tensors."""
    import copy

    module = copy.copy(module)
    module._modules = dict(module._modules)
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            new = copy.copy(child)
            new._parameters = dict(child._parameters)
            new.weight = torch.nn.Parameter(semi(child.weight.detach()), requires_grad=False)
            module._modules[name] = new
        else:
            module._modules[name] = _semi(child, semi)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/DiT-XL-2-256")
    parser.add_argument("--level", type=int, default=8)
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sparsity", default=None, help="N:M (e.g. 2:4): time DiT-XL/2's linear layers instead")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.sparsity is not None:
        return sparse_layers(args, device, dtype)
    adapter = dp.load_denoiser(args.model, weights=args.model == "tiny-digits", device=device, dtype=dtype)
    num_stages, steps = 10, 20
    partition = StagePartition.from_scheduler(adapter.make_scheduler("ddim"), steps, num_stages)
    tmp = Path(tempfile.mkdtemp())
    store = random_store(adapter, tmp / "store", args.levels, num_stages)
    uniform = Schedule([args.level] * num_stages, args.levels, args.level, partition.steps_per_stage,
                       partition=partition.to_dict())
    run = timer(device)
    dense_macs = dp.count_macs(adapter)
    result = {"model": args.model, "device": str(device), "device_name": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(), "dtype": args.dtype,
              "level": args.level, "levels": args.levels, "rows": []}
    with Router(adapter, store, uniform) as router:
        router.install(0)
        routed_macs = dp.count_macs(adapter)
        router.restore_dense()
        result["mac_ratio"] = dense_macs / routed_macs
        for b in args.batch_sizes:
            x = torch.randn(2 * b, *adapter.latent_shape, device=device, dtype=dtype)
            t = torch.full((2 * b,), 500, device=device)
            y = adapter.example_condition(2 * b, device)
            times = {}
            for label in ("dense", "routed"):
                if label == "routed":
                    router.install(0)
                else:
                    router.restore_dense()
                with torch.no_grad():
                    step = lambda: adapter.predict_noise(x, t, y)  # noqa: E731
                    run(step, args.warmup)
                    times[label] = statistics.median(run(step, args.repeats))
            router.restore_dense()
            row = {"batch": b, "dense_s": times["dense"], "routed_s": times["routed"],
                   "speedup": times["dense"] / times["routed"]}
            row["share_of_mac_ratio"] = row["speedup"] / result["mac_ratio"]
            result["rows"].append(row)
            print(f"batch {b:3d}: dense {times['dense'] * 1e3:9.1f} ms  routed {times['routed'] * 1e3:9.1f} ms  "
                  f"speedup {row['speedup']:.3f}x  ({100 * row['share_of_mac_ratio']:.0f} % of MAC ratio "
                  f"{result['mac_ratio']:.3f})", flush=True)
    # memory: a 10-stage schedule of varying levels (mean = level)
    shape = [4, 3, 2, 1, 0, 0, -1, -2, -3, -4]
    varied = Schedule([min(args.levels, max(0, args.level + d)) for d in shape], args.levels, args.level,
                      partition.steps_per_stage, partition=partition.to_dict())
    dense_bytes = param_bytes(adapter.denoiser)
    routed = {}
    for resident in (True, False):
        with Router(adapter, store, varied, resident=resident) as router:
            routed[resident] = dense_bytes + router.resident_bytes()
            if resident:
                stitched = 0
                for stage in range(num_stages):
                    router.install(stage)
                    stitched += param_bytes(adapter.denoiser)
                router.restore_dense()
    result["memory"] = {"schedule": varied.levels, "dense_bytes": dense_bytes, "routed_bytes": routed[True],
                        "routed_shared_bytes": routed[False], "stitched_bytes": stitched,
                        "routed_over_stitched": routed[True] / stitched,
                        "routed_shared_over_stitched": routed[False] / stitched}
    print(f"memory, 10-stage schedule {varied.levels}: 10 stitched copies {stitched / 2**30:.2f} GiB; routed "
          f"{routed[True] / 2**30:.2f} GiB (ratio {routed[True] / stitched:.3f}); routed with shared buffers "
          f"(resident=False) {routed[False] / 2**30:.2f} GiB (ratio {routed[False] / stitched:.3f})")
    out = Path(args.out or Path(__file__).parent / "results" / f"latency_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
