"""References shared by the routing tests of every denoiser family: a trajectory store with random
removal orders (and random compensated weights), and the masking listener that applies a schedule
to the DENSE denoiser — what routed sampling must equal."""
import torch
import torch.nn.functional as F

from diffes_pl.denoisers import keep_from_order
from diffes_pl.trajectory import TrajectoryStore, make_key


def random_store(adapter, path, levels_max, partition, compensated=False, depth=False):
    """A store for `partition`'s stages: random orders per stage (blocks for depth), and with
    `compensated` random output-side weights [out, kept · unit_width] at every level 1..H."""
    g = torch.Generator().manual_seed(0)
    stages = []
    for _ in range(partition.num_stages):
        tensors = {"blocks.order": torch.randperm(len(adapter.blocks()), generator=g)} if depth else {}
        for group in [] if depth else adapter.unit_groups():
            tensors[f"{group.name}.order"] = torch.randperm(group.size, generator=g)
            for level in range(1, levels_max + 1) if compensated else []:
                kept = group.size - group.removed_at(level, levels_max)
                out = adapter.output_layer(group).out_features
                tensors[f"{group.name}.weight.{level}"] = 0.1 * torch.randn(out, kept * group.unit_width, generator=g)
        stages.append(tensors)
    fields = {"denoiser": adapter.identity(), "partition": partition.to_dict()}
    manifest = {"key": make_key(fields), "key_fields": fields, "pruner": "test", "levels_max": levels_max,
                "num_stages": partition.num_stages, "compensated": compensated, "depth": depth}
    return TrajectoryStore.write(path, manifest, stages)


def random_store_and_partition(adapter, path, steps, stages, levels_max, compensated=False, depth=False,
                               sampler="ddim"):
    """`random_store` for `adapter`'s `sampler` trajectory of `steps` steps cut into `stages` stages (H =
    `levels_max`, or every block for `depth`), and that partition."""
    from diffes_pl.partition import StagePartition

    partition = StagePartition.from_scheduler(adapter.make_scheduler(sampler), steps, stages)
    levels_max = len(adapter.blocks()) if depth else levels_max
    return random_store(adapter, path, levels_max, partition, compensated=compensated, depth=depth), partition


class Handles:
    """Several hook handles removed together (a masked unit that feeds two output layers)."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self):
        for h in self.handles:
            h.remove()


def column_mask_hook(layer, cols):
    """Zeroes every input column of `layer` except `cols` (a forward pre-hook)."""
    mask = torch.zeros(layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
    mask[torch.as_tensor(cols).to(mask.device)] = 1
    return layer.register_forward_pre_hook(lambda _m, args: (args[0] * mask, *args[1:]))


def mask_units(adapter, group, keep):
    """The masking reference that slicing must equal: the removed units' input columns of the dense
    output layer zeroed — and, for heads shared by two streams (FLUX's and SD3's joint attention, whose
    text stream has its own output layer `to_add_out`), of that layer too. Returns a removable handle."""
    cols = group.columns(keep)
    dense = adapter.dense_module(group)
    handles = [column_mask_hook(adapter.output_layer(group, dense), cols)]
    text_out = getattr(dense, "to_add_out", None) if group.kind == "heads" else None
    if text_out is not None:
        handles.append(column_mask_hook(text_out, cols))
    return Handles(handles)


def mask_block(adapter, index):
    """Makes block `index` return its input streams (the dense block still runs): each stream the
    block returns (`adapter.block_io`: argument name, position, output index) is its input."""

    def hook(_module, args, kwargs, output):
        inputs = [kwargs[name] if name in kwargs else args[position] for name, position, _ in adapter.block_io]
        if adapter.block_io[0][2] is None:  # the block returns the one stream
            return inputs[0]
        out = list(output)
        for x, (_, _, index_out) in zip(inputs, adapter.block_io):
            if out[index_out] is not None:  # SD3's context_pre_only last block returns no text stream
                out[index_out] = x
        return tuple(out)

    return adapter.dense_block(index).register_forward_hook(hook, with_kwargs=True)


class MaskingListener:
    """Per stage, hooks on the dense modules: removed units' input columns zeroed (or the stored
    compensated weight applied on the kept columns), skipped blocks masked."""

    def __init__(self, adapter, store, schedule):
        self.adapter, self.store, self.schedule, self.handles, self.stage = adapter, store, schedule, [], None

    def on_step(self, step, stage):
        if stage == self.stage:
            return
        assert 0 <= stage < self.store.num_stages, f"step {step} maps to stage {stage}, outside the store"
        self.clear()
        self.stage, level, store = stage, self.schedule.levels[stage], self.store
        if store.depth:
            self.handles = [mask_block(self.adapter, i) for i in store.block_order(stage)[:level].tolist()]
            return
        for group in self.adapter.unit_groups():
            removed = group.removed_at(level, store.levels_max)
            if removed == 0:
                continue
            keep = keep_from_order(store.order(stage, group.name), removed)
            weight = store.weight(stage, group.name, level)
            # masked (both output layers where a unit feeds two: FLUX's and SD3's joint heads) ...
            self.handles.append(mask_units(self.adapter, group, keep))
            if weight is not None:  # ... and the compensated weight on the kept columns of the output layer
                cols = group.columns(keep)
                self.handles.append(self.adapter.output_layer(group).register_forward_hook(
                    lambda m, args, out, c=cols, w=weight: F.linear(args[0][..., c], w.to(args[0].dtype), m.bias)))

    def clear(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def sliced_vs_masked(adapter, keeps, latents, timesteps, cond):
    """One denoiser call three ways: dense, with the groups in `keeps` (name → kept units) masked on
    the dense modules, and with them sliced and installed. The dense denoiser is restored afterwards
    and checked bit for bit. Returns (dense, masked, sliced) outputs."""
    dense = adapter.predict_noise(latents, timesteps, cond)
    handles = [mask_units(adapter, g, keeps[g.name]) for g in adapter.unit_groups() if g.name in keeps]
    masked = adapter.predict_noise(latents, timesteps, cond)
    for h in handles:
        h.remove()
    for g in adapter.unit_groups():
        if g.name in keeps:
            adapter.install(g, adapter.sliced_module(g, keeps[g.name]))
    sliced = adapter.predict_noise(latents, timesteps, cond)
    adapter.restore_dense()
    assert adapter.is_dense()
    torch.testing.assert_close(adapter.predict_noise(latents, timesteps, cond), dense, rtol=0, atol=0)  # bit for bit
    return dense, masked, sliced


def dense_masked_routed(adapter, store, schedule, conditions, **sample_kw):
    """Latents of the dense denoiser, of the schedule applied by masking the dense denoiser, and of the
    schedule routed (router removed afterwards): the three samples every routing test compares."""
    import diffes_pl as dp
    from diffes_pl.routing import Router

    dense = dp.sample(adapter, conditions, output="latents", **sample_kw)
    masker = MaskingListener(adapter, store, schedule)
    try:
        masked = dp.sample(adapter, conditions, num_stages=store.num_stages, listeners=[masker], output="latents",
                           **sample_kw)
    finally:
        masker.clear()
    with Router(adapter, store, schedule) as router:
        routed = dp.sample(adapter, conditions, router=router, output="latents", **sample_kw)
    return dense, masked, routed


def masking_callback(masker, partition):
    """A diffusers `callback_on_step_end` that tells `masker` (a MaskingListener, or a list of
    listeners) the steps inside a pipeline by the pipeline's own step counter — a reference for the
    timestep hook (`Router.attach`): stage 0 now, the stage of step i + 1 after step i."""
    listeners = masker if isinstance(masker, list) else [masker]
    for listener in listeners:
        listener.on_step(0, partition.step_to_stage[0])

    def callback(_pipe, step, _t, _kw):
        if step + 1 < partition.num_steps:
            for listener in listeners:
                listener.on_step(step + 1, partition.step_to_stage[step + 1])
        return {}

    return callback


def mixed_keeps(adapter, seed=0):
    """Kept units (sorted) of every unit group: in turn half, one, none and all of its units, at random."""
    g = torch.Generator().manual_seed(seed)
    return {grp.name: torch.sort(torch.randperm(grp.size, generator=g)[:[grp.size // 2, 1, 0, grp.size][i % 4]]).values
            for i, grp in enumerate(adapter.unit_groups())}
