"""Hook-based references for feature caching, independent of `diffes_pl.caching`: they let the
DENSE denoiser compute everything and overwrite what a cached step would reuse, with torch hooks
registered after (so run after) a `MaskingListener`'s. Routed + cached sampling must equal them."""
from diffes_pl.caching import full_steps


class _Steps:
    """Full or cached per step, by the refresh rule (tested on its own in test_refresh.py)."""

    def __init__(self, partition, intervals, levels):
        self.full = full_steps(partition.step_to_stage, intervals, levels)
        self.handles, self.step = [], None

    def clear(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class BlockCacheReference(_Steps):
    """Block caching by hooks: at a full step record h_b (block b's input) and h_N (block N−1's
    output); at a cached step block b returns its input + (h_N − h_b) and later blocks return
    their input. Streams via the adapter's `block_io`."""

    def __init__(self, adapter, partition, intervals, branch, levels=None):
        super().__init__(partition, intervals, levels)
        self.adapter, self.branch, self.residuals, self.pending = adapter, branch, [], []

    def _ins(self, args, kwargs):
        return [kwargs[n] if n in kwargs else args[p] for n, p, _ in self.adapter.block_io]

    def _outs(self, out):
        return [out if i is None else out[i] for _, _, i in self.adapter.block_io]

    def _build(self, streams, like):
        if self.adapter.block_io[0][2] is None:
            return streams[0]
        out = list(like)
        for (_, _, i), s in zip(self.adapter.block_io, streams):
            out[i] = s
        return tuple(out)

    def on_step(self, step, stage):
        self.clear()
        self.step = step
        full, blocks, b = self.full[step], self.adapter.blocks(), self.branch
        last = len(blocks) - 1
        if full:
            self.residuals, self.pending = [], []
        calls = {"n": 0}

        def pre_b(_m, args, kwargs):
            self.pending.append(self._ins(args, kwargs))

        def post_last(_m, args, kwargs, out):
            h_b = self.pending.pop(0)
            self.residuals.append([None if o is None else o - h for o, h in zip(self._outs(out), h_b)])

        def cached_b(_m, args, kwargs, out):
            r = self.residuals[calls["n"]]
            calls["n"] += 1
            return self._build([None if x is None else h + x for h, x in zip(self._ins(args, kwargs), r)], out)

        def passthrough(_m, args, kwargs, out):
            return self._build(self._ins(args, kwargs), out)

        if full:
            self.handles.append(blocks[b].register_forward_pre_hook(pre_b, with_kwargs=True))
            self.handles.append(blocks[last].register_forward_hook(post_last, with_kwargs=True))
            return
        self.handles.append(blocks[b].register_forward_hook(cached_b, with_kwargs=True))
        self.handles += [blocks[i].register_forward_hook(passthrough, with_kwargs=True) for i in range(b + 1, last + 1)]


class DeepCacheReference(_Steps):
    """DeepCache by one hook: up block n−1−b's `hidden_states` are recorded at a full step and
    replaced by the recorded ones at a cached step (the deep part still runs, unused)."""

    def __init__(self, adapter, partition, intervals, branch, levels=None):
        super().__init__(partition, intervals, levels)
        unet = adapter.denoiser
        self.entry = unet.up_blocks[len(unet.up_blocks) - 1 - branch]
        self.stored = []

    def on_step(self, step, stage):
        self.clear()
        full = self.full[step]
        if full:
            self.stored = []
        calls = {"n": 0}

        def hook(_m, args, kwargs):
            if full:
                self.stored.append(kwargs["hidden_states"])
                return None
            kwargs = {**kwargs, "hidden_states": self.stored[calls["n"]]}
            calls["n"] += 1
            return args, kwargs

        self.handles.append(self.entry.register_forward_pre_hook(hook, with_kwargs=True))


def masked_cached(adapter, store, schedule, reference, conditions, **sample_kw):
    """Latents of `schedule` applied by masking the dense denoiser, with `reference` caching."""
    import diffes_pl as dp
    from helpers.routing_reference import MaskingListener

    masker = MaskingListener(adapter, store, schedule)
    try:
        return dp.sample(adapter, conditions, num_stages=store.num_stages, listeners=[masker, reference],
                         output="latents", **sample_kw)
    finally:
        masker.clear()
        reference.clear()
