"""A minimal calibration source for pruner tests: digits noised per stage by hand (independent of
CalibrationDataModule, so the pruners are tested on their own)."""
import lightning as L
import torch

from diffes_pl.data.digits import load_digits_split


class HandNoisedDigits(L.LightningDataModule):
    def __init__(self, nsamples=24, batch_size=8, seed=0):
        super().__init__()
        self.nsamples, self.batch_size, self.seed = nsamples, batch_size, seed
        self.stage = 0

    def settings(self):
        return {"source": "hand", "nsamples": self.nsamples, "seed": self.seed}

    def attach(self, adapter, partition):
        self.adapter, self.partition = adapter, partition

    def set_stage(self, stage):
        self.stage = stage

    def items(self, stage):
        x0, y = load_digits_split("train")
        x0, y = x0[: self.nsamples], y[: self.nsamples]
        g = torch.Generator().manual_seed(self.seed * 1000 + stage)
        low, high = self.partition.stage_interval(stage)
        t = torch.randint(int(low) + 1, int(high) + 1, (self.nsamples,), generator=g)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)[t].float()[:, None, None, None]
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g)
        return [{"latents": xt[i], "timesteps": t[i], "stage": torch.tensor(stage), "cond": y[i]}
                for i in range(self.nsamples)]

    def predict_dataloader(self):
        return torch.utils.data.DataLoader(self.items(self.stage), batch_size=self.batch_size)


def hand_hessians(adapter, groups, run):
    """Σ x xᵀ / tokens [in, in] (float64) of each group's dense output-layer inputs, gathered by hand
    while `run()` calls the denoiser: the reference the pruners' statistics are checked against."""
    sums, handles = {}, []
    for g in groups:
        def hook(_m, args, name=g.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            h, n = sums.get(name, (0, 0))
            sums[name] = (h + x.T @ x, n + x.shape[0])
        handles.append(adapter.output_layer(g).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    assert set(sums) == {g.name for g in groups}, "run() never reached some groups' output layers"
    return {k: h / n for k, (h, n) in sums.items()}


def run_items(adapter, items):
    """A `run` for `hand_hessians`: the denoiser on each calibration item alone."""
    return lambda: [adapter.predict_noise(b["latents"][None], b["timesteps"][None], b["cond"][None]) for b in items]


def assert_obs_beats_wanda(adapter, stores, stage, hessians, levels_max):
    """At `stage`, for every group and every level that keeps a unit: the layer reconstruction error
    trace(ΔW · H · ΔWᵀ) of `stores["obs"]` ≤ that of `stores["wanda"]`, where ΔW is the output layer's
    dense weight minus its pruned form (removed columns zero; kept ones the store's compensated weight,
    or unchanged) and H = `hessians[group]`. Level(s) removing every unit give every pruner the same
    empty layer and are skipped. Returns how many (group, level) pairs were compared."""
    compared = 0
    for g in adapter.unit_groups():
        w = adapter.output_layer(g).weight.detach()
        for level in range(1, levels_max + 1):
            removed = g.removed_at(level, levels_max)
            if removed == g.size:
                continue
            errors = {}
            for name, store in stores.items():
                cols = g.columns(torch.sort(store.order(stage, g.name)[removed:]).values)
                pruned = torch.zeros_like(w)
                comp = store.weight(stage, g.name, level)
                pruned[:, cols] = w[:, cols] if comp is None else comp.to(w.dtype)
                delta = (w - pruned).double()
                errors[name] = float(torch.trace(delta @ hessians[g.name] @ delta.T))
            assert errors["obs"] <= errors["wanda"] * (1 + 1e-6), (stage, g.name, level, errors)
            compared += 1
    return compared


# --- text-to-image pruners calibrated on captions ---------------------------------------------------
def caption_trainer(root):
    """A quiet CPU Trainer for `build_store` in `root`."""
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root)


def caption_datamodule(folder, nsamples=8):
    """Caption calibration (no labels) on the image folder `folder`, seed 0."""
    from diffes_pl.data.calibration import CalibrationDataModule

    return CalibrationDataModule(source=str(folder), label_column=None, caption_column="text", nsamples=nsamples,
                                 batch_size=4, seed=0)


def obs_and_wanda_on_captions(adapter, sampler, caption_folder, root, steps, stages, levels_max):
    """OBS and Wanda stores of `adapter` calibrated on `caption_folder`'s captions (`stages` stages of its
    `sampler`'s `steps`-step trajectory, H = `levels_max`), checked with `assert_obs_beats_wanda` at every
    stage on Σ x xᵀ / tokens gathered by hand over the datamodule's own samples. Returns the stores and
    how many (stage, group, level) errors were compared."""
    from diffes_pl.partition import StagePartition
    from diffes_pl.pruners import OBSPruner, WandaPruner, build_store

    partition = StagePartition.from_scheduler(adapter.make_scheduler(sampler), steps, stages)
    stores = {p.name: build_store(caption_trainer(root), p, caption_datamodule(caption_folder), adapter, partition,
                                  root / p.name, levels_max, log=lambda *_: None) for p in (OBSPruner(), WandaPruner())}
    dm = caption_datamodule(caption_folder)
    dm.attach(adapter, partition)
    compared = 0
    for stage in range(stages):
        ds = dm.stage_dataset(stage)
        hessians = hand_hessians(adapter, adapter.unit_groups(),
                                 lambda: adapter.predict_noise(ds.latents, ds.timesteps, ds.cond))
        compared += assert_obs_beats_wanda(adapter, stores, stage, hessians, levels_max)
    return stores, compared
