"""Unstructured and N:M OBS (sparse_solver) against independent references. What is proven:

* the column sweep (``refine_steps=0``; lazy block updates, any block size) equals sequential OBS
  done by brute force: visit columns in order, fix each (zero if masked), re-solve all later
  columns by least squares;
* ``least_squares_weight`` equals per-row ``torch.linalg.lstsq`` on the calibration inputs
  restricted to the kept columns, and exact mode returns it (with the fast mode's mask);
* the fast mode (sweep + the default 20-step batched CG refinement) is within 1.10× of that
  optimum for the same mask on random layers (iid and correlated inputs) and on the built-in
  DiT's layers, where the bare sweep is 1.16–2.04× here (ratios printed and recorded); the refinement
  never increases the error, keeps the mask exactly, and stops early once converged;
* masks are exact: unstructured removes ``removal_count(s, out·in)`` weights (baselines: per
  row), N:M exactly ``m − n`` of every ``m`` inputs of each row; levels chained with ``removed=``
  nest, a prior mask larger than the target is refused, sparsity 0 is the identity;
* on the built-in DiT's layers with Hessians from real activations, OBS's reconstruction error
  (with and without refinement) is below Wanda's, which is below magnitude's, at 50 % and at 2:4;
* float32 agrees with float64, dead columns are handled, bad input gives clear errors.
"""
from __future__ import annotations

import pytest
import torch

from diffes_pl.pruners.obs_solver import damp_hessian
from diffes_pl.pruners.sparse_solver import (SparseResult, least_squares_weight, magnitude_mask, obs_sparse,
                                             reconstruction_error, removal_count, wanda_mask)

# Small matrices: a second thread only adds synchronisation cost on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = [dict(sparsity=0.5), dict(n_m=(2, 4)), dict(n_m=(4, 8))]
TARGET_IDS = ["50%", "2:4", "4:8"]


def layer(out: int, n_in: int, tokens: int, seed: int = 0, correlated: bool = True):
    """Random float64 weight [out, in], calibration inputs X [tokens, in] (input columns mixed by a
    random matrix when ``correlated``) and H = XᵀX."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    if correlated:
        X = X @ torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    return torch.randn(out, n_in, generator=g, dtype=torch.float64), X, X.T @ X


def check_nm(mask: torch.Tensor, n: int, m: int) -> None:
    out, n_in = mask.shape
    assert (mask.view(out, n_in // m, m).sum(-1) == m - n).all()


# --- the sweep and the least-squares reference ---------------------------------------------------
@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n_m=(2, 4))], ids=["50%", "2:4"])
@pytest.mark.parametrize("block", [1, 4, 5, 12])
def test_sweep_is_sequential_obs(target, block):
    out, n_in = 5, 12
    W, _, H = layer(out, n_in, 40, seed=0)
    Hd, _ = damp_hessian(H, 0.01)
    res = obs_sparse(W, H, block_size=block, refine_steps=0, **target)  # the bare sweep
    assert res.refine_iters == 0
    ref = W.clone()
    for j in range(n_in):  # fix column j, then the optimum of the later columns given columns ≤ j
        ref[res.mask[:, j], j] = 0
        fixed, free = torch.arange(j + 1), torch.arange(j + 1, n_in)
        if len(free):
            rhs = (ref[:, fixed] - W[:, fixed]) @ Hd[fixed][:, free]  # [out, |free|]
            ref[:, free] = W[:, free] - torch.linalg.solve(Hd[free][:, free], rhs.T).T
    torch.testing.assert_close(res.weight, ref, rtol=1e-10, atol=1e-10)
    assert not res.weight[res.mask].any()
    assert res.error == pytest.approx(reconstruction_error(W, res.weight, Hd), rel=1e-10)


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n_m=(2, 4))], ids=["50%", "2:4"])
def test_least_squares_weight_is_lstsq_on_inputs(target):
    out, n_in = 3, 8
    W, X, H = layer(out, n_in, 20, seed=1, correlated=False)
    mask = obs_sparse(W, H, **target).mask
    Y = X @ W.T  # [tokens, out] outputs of the dense layer
    ref = torch.zeros_like(W)
    for i in range(out):
        K = (~mask[i]).nonzero().squeeze(1)
        ref[i, K] = torch.linalg.lstsq(X[:, K], Y[:, i:i + 1]).solution.squeeze(1)
    torch.testing.assert_close(least_squares_weight(W, H, mask, damp=0.0), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_exact_mode_is_the_least_squares_optimum_for_the_fast_mask(target):
    W, _, H = layer(16, 64, 128, seed=2)
    fast = obs_sparse(W, H, **target)
    exact = obs_sparse(W, H, mode="exact", **target)
    assert torch.equal(exact.mask, fast.mask)
    opt = least_squares_weight(W, H, fast.mask, fast.damp)
    torch.testing.assert_close(exact.weight, opt, rtol=1e-6, atol=1e-6 * float(opt.abs().max()))
    Hd, _ = damp_hessian(H, exact.damp)
    assert exact.error == pytest.approx(reconstruction_error(W, exact.weight, Hd), rel=1e-9)
    # optimality: any perturbation of the kept weights costs more
    D = torch.randn(W.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * ~fast.mask
    assert reconstruction_error(W, exact.weight + 1e-3 * D, Hd) > exact.error


def optimum_ratios(W, H, target, **kw):
    """(refined fast, bare sweep) reconstruction error over the least-squares optimum for the same
    mask, damped H; and the fast result."""
    res = obs_sparse(W, H, **target, **kw)
    sweep = obs_sparse(W, H, refine_steps=0, **target, **kw)
    assert torch.equal(res.mask, sweep.mask)
    W = W.double()
    Hd, _ = damp_hessian(H, res.damp)
    best = reconstruction_error(W, least_squares_weight(W, H, res.mask, res.damp), Hd)
    return reconstruction_error(W, res.weight, Hd) / best, reconstruction_error(W, sweep.weight, Hd) / best, res


# Measured (out 64, in 256, 512 tokens, float64, seeds 0-2, blocks 64/128): the bare sweep is
# 1.16-1.18x the optimum with iid inputs and 1.78-1.86x with correlated ones; after the default
# refinement 1.0000x (iid, 6 CG iterations, stopped by refine_tol) and 1.0001x (correlated, 15).
@pytest.mark.parametrize("correlated", [False, True], ids=["iid", "correlated"])
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("seed", range(3))
def test_fast_vs_optimum_ratio(seed, block, target, correlated, record_property):
    W, _, H = layer(64, 256, 512, seed=seed, correlated=correlated)
    ratio, bare, res = optimum_ratios(W, H, target, block_size=block)
    record_property("fast_over_optimum", ratio)
    record_property("sweep_over_optimum", bare)
    record_property("refine_iters", res.refine_iters)
    print(f"fast/optimum seed={seed} block={block} {target} correlated={correlated}: {ratio:.4f} "
          f"(bare sweep {bare:.4f}, {res.refine_iters} CG iterations)")
    assert 1 - 1e-9 <= ratio <= 1.10
    assert bare > 1.1  # the refinement is what brings it there


def test_refinement_is_monotone_and_keeps_the_mask():
    W, _, H = layer(48, 192, 384, seed=15)
    for target in TARGETS:
        for dtype in (torch.float64, torch.float32):
            runs = [obs_sparse(W, H, dtype=dtype, refine_steps=k, refine_tol=0.0, **target) for k in range(13)]
            assert [r.refine_iters for r in runs] == list(range(13))
            errors = [r.error for r in runs]
            Hd, _ = damp_hessian(H, runs[0].damp)
            for r in runs:
                assert torch.equal(r.mask, runs[0].mask)  # the mask never changes
                assert not r.weight[r.mask].any()  # masked weights exactly 0
                assert r.error == pytest.approx(reconstruction_error(W, r.weight, Hd), rel=1e-9 if dtype == torch.float64 else 1e-4)
            slack = 1e-12 if dtype == torch.float64 else 1e-5
            assert all(b <= a * (1 + slack) for a, b in zip(errors, errors[1:])), (target, dtype, errors)
            assert errors[-1] < 0.8 * errors[0]


def test_refinement_falls_back_to_the_sweep_if_it_got_worse(monkeypatch):
    import diffes_pl.pruners.sparse_solver as ss

    W, _, H = layer(8, 32, 64, seed=17)
    sweep = obs_sparse(W, H, sparsity=0.5, refine_steps=0)
    real = ss._refine

    def worse(Wk, W0, Hd, mask, steps, tol):  # as if rounding had made the refinement worse
        out, f, it = real(Wk, W0, Hd, mask, steps, tol)
        return (out + 0.5 * ~mask), f, it

    monkeypatch.setattr(ss, "_refine", worse)
    res = obs_sparse(W, H, sparsity=0.5)
    assert res.refine_iters > 0 and torch.equal(res.weight, sweep.weight) and res.error == pytest.approx(sweep.error)


def test_refinement_stops_early_and_zero_steps_is_the_sweep():
    W, _, H = layer(32, 128, 256, seed=16, correlated=False)
    sweep = obs_sparse(W, H, sparsity=0.5, refine_steps=0)
    assert sweep.refine_iters == 0
    long = obs_sparse(W, H, sparsity=0.5, refine_steps=500)  # converges long before: stopped by refine_tol
    assert 0 < long.refine_iters < 20 and long.error < sweep.error
    tight = obs_sparse(W, H, sparsity=0.5, refine_steps=500, refine_tol=1e-8)
    assert long.refine_iters < tight.refine_iters < 500 and tight.error <= long.error
    exact = obs_sparse(W, H, sparsity=0.5, mode="exact")
    assert exact.refine_iters == 0 and tight.error == pytest.approx(exact.error, rel=1e-7)
    W32 = W.float()  # fast mode with refinement returns the input's dtype and device
    assert obs_sparse(W32, H, sparsity=0.5).weight.dtype == torch.float32


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 3)])
def test_nm_result_does_not_depend_on_block_size(n_m):
    W, _, H = layer(8, 48, 96, seed=3)
    results = [obs_sparse(W, H, n_m=n_m, block_size=b) for b in (1, 5, 16, 48, 200)]  # 5 → a multiple of m
    for r in results[1:]:
        assert torch.equal(r.mask, results[0].mask)
        torch.testing.assert_close(r.weight, results[0].weight, rtol=1e-9, atol=1e-9)


# --- masks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.37, 0.5, 0.9])
def test_unstructured_mask_is_exact(sparsity):
    out, n_in = 7, 30  # blocks of 8: the last one partial; 0.37 · 210 = 77.7 → 78
    W, X, H = layer(out, n_in, 60, seed=4)
    res = obs_sparse(W, H, sparsity=sparsity, block_size=8)
    assert res.mask.dtype == torch.bool and res.mask.device.type == "cpu"
    assert int(res.mask.sum()) == removal_count(sparsity, out * n_in) == int(sparsity * out * n_in + 0.5)
    assert not res.weight[res.mask].any() and res.weight[~res.mask].all()
    for mask in (wanda_mask(W, X.norm(dim=0), sparsity=sparsity), magnitude_mask(W, sparsity=sparsity)):
        assert (mask.sum(1) == removal_count(sparsity, n_in)).all()  # per row


def test_first_choices_follow_the_obs_saliency():
    # Before any compensation the saliency is w² / U_jj², U the upper Cholesky factor of H⁻¹.
    W, _, H = layer(6, 16, 40, seed=14)
    Hd, _ = damp_hessian(H, 0.01)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    sal = (W / U.diagonal()) ** 2  # [out, in]
    one_block = obs_sparse(W, H, sparsity=0.4, block_size=16).mask  # the whole layer is one block
    expected = torch.zeros_like(one_block)
    expected.view(-1)[sal.flatten().argsort()[:removal_count(0.4, W.numel())]] = True
    assert torch.equal(one_block, expected)
    first = obs_sparse(W, H, n_m=(1, 4)).mask[:, :4]  # the first group of 4 is chosen before any update
    assert torch.equal(first, sal[:, :4] < sal[:, :4].max(1, keepdim=True).values)


def test_unstructured_blocks_share_the_removals():
    W, _, H = layer(10, 64, 128, seed=5)
    res = obs_sparse(W, H, sparsity=0.3, block_size=16)  # 0.3 · 10 · 16 = 48 per block
    assert res.mask.view(10, 4, 16).sum((0, 2)).tolist() == [48] * 4


@pytest.mark.parametrize("n_m", [(2, 4), (4, 8), (1, 4), (3, 4), (2, 3)])
def test_nm_masks_are_exact(n_m):
    n, m = n_m
    W, X, H = layer(6, 48, 96, seed=6)
    res = obs_sparse(W, H, n_m=n_m, block_size=16)
    check_nm(res.mask, n, m)
    assert not res.weight[res.mask].any()
    check_nm(wanda_mask(W, X.norm(dim=0), n_m=n_m), n, m)
    check_nm(magnitude_mask(W, n_m=n_m), n, m)


def test_baseline_masks_pick_the_lowest_scores():
    W = torch.tensor([[1.0, -4.0, 3.0, 2.0], [0.5, 0.1, -0.2, 9.0]])
    norm = torch.tensor([5.0, 1.0, 1.0, 1.0])  # Wanda: column 0 weighs 5×
    assert magnitude_mask(W, sparsity=0.5).tolist() == [[True, False, False, True], [False, True, True, False]]
    assert wanda_mask(W, norm, sparsity=0.5).tolist() == [[False, False, True, True], [False, True, True, False]]
    assert magnitude_mask(W, n_m=(1, 2)).tolist() == [[True, False, False, True], [False, True, True, False]]
    assert wanda_mask(W, norm, n_m=(1, 2)).tolist() == [[False, True, False, True], [False, True, True, False]]


# --- nesting ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_unstructured_levels_nest(mode):
    out, n_in = 12, 40
    W, X, H = layer(out, n_in, 80, seed=7)
    prev = obs_sparse(W, H, sparsity=0.0, mode=mode)
    masks = {"wanda": None, "magnitude": None}
    for s in (0.2, 0.45, 0.7, 0.9):
        res = obs_sparse(prev.weight, H, sparsity=s, removed=prev.mask, block_size=16, mode=mode)
        assert (res.mask | ~prev.mask).all()  # mask_ℓ ⊆ mask_ℓ₊₁
        assert int(res.mask.sum()) == removal_count(s, out * n_in)
        assert not res.weight[res.mask].any()
        for name, fn in (("wanda", lambda **kw: wanda_mask(W, X.norm(dim=0), **kw)), ("magnitude", lambda **kw: magnitude_mask(W, **kw))):
            mask = fn(sparsity=s, removed=masks[name])
            assert masks[name] is None or (mask | ~masks[name]).all()
            assert (mask.sum(1) == removal_count(s, n_in)).all()
            masks[name] = mask
        prev = res


def test_nm_levels_nest():
    W, X, H = layer(8, 32, 64, seed=8)
    prev = None
    for n in (3, 2, 1):  # keep 3 of 4, then 2, then 1
        res = obs_sparse(W if prev is None else prev.weight, H, n_m=(n, 4), removed=None if prev is None else prev.mask)
        check_nm(res.mask, n, 4)
        if prev is not None:
            assert (res.mask | ~prev.mask).all()
        prev = res
    m1 = magnitude_mask(W, n_m=(3, 4))
    assert (magnitude_mask(W, n_m=(2, 4), removed=m1) | ~m1).all()


def test_prior_mask_with_weights_is_zeroed_and_counted():
    W, X, H = layer(6, 32, 64, seed=9)
    prior = magnitude_mask(W, sparsity=0.25)  # the input still holds these weights
    res = obs_sparse(W, H, sparsity=0.25, removed=prior)
    assert torch.equal(res.mask, prior)
    assert not res.weight[prior].any()
    plain = obs_sparse(W, H, sparsity=0.5, removed=prior)
    assert (plain.mask | ~prior).all() and int(plain.mask.sum()) == removal_count(0.5, W.numel())


def test_sparsity_zero_is_the_identity():
    W, X, H = layer(5, 16, 32, seed=10)
    W32 = W.float()
    for mode in ("fast", "exact"):
        res = obs_sparse(W32, H, sparsity=0.0, mode=mode)
        assert torch.equal(res.weight, W32) and res.weight is not W32 and res.error == 0.0
        assert res.mask.dtype == torch.bool and not res.mask.any() and res.mask.shape == W.shape
    assert not wanda_mask(W, X.norm(dim=0), sparsity=0.0).any() and not magnitude_mask(W, sparsity=0.0).any()


def test_prior_mask_above_the_target_raises():
    W, X, H = layer(4, 16, 32, seed=11)
    half = magnitude_mask(W, sparsity=0.5)
    with pytest.raises(ValueError, match=r"prior mask removes 32 weights, more than the 16 asked at sparsity=0.25"):
        obs_sparse(W, H, sparsity=0.25, removed=half)
    with pytest.raises(ValueError, match=r"more than the 4 per row"):
        wanda_mask(W, X.norm(dim=0), sparsity=0.25, removed=half)
    with pytest.raises(ValueError, match=r"more than the 4 per row"):
        magnitude_mask(W, sparsity=0.25, removed=half)
    three = torch.zeros(4, 16, dtype=torch.bool)
    three[2, 4:7] = True  # 3 of the 4 inputs 4..7 of row 2
    with pytest.raises(ValueError, match=r"removes 3 of the 4 inputs 4\.\.7 of row 2, more than the 2 that 2:4 removes"):
        obs_sparse(W, H, n_m=(2, 4), removed=three)
    with pytest.raises(ValueError, match="more than the 2 that 2:4"):
        magnitude_mask(W, n_m=(2, 4), removed=three)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hessian=torch.eye(7)), "hessian"),
    (dict(weight=torch.zeros(8)), r"\[out, in\]"),
    (dict(sparsity=None), "exactly one of sparsity"),
    (dict(n_m=(2, 4)), "exactly one of sparsity"),
    (dict(sparsity=1.0), r"sparsity=1.0 must be a number in \[0, 1\)"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=None, n_m=(4, 4)), "0 < n < m"),
    (dict(sparsity=None, n_m=(0, 4)), "0 < n < m"),
    (dict(sparsity=None, n_m=(2, 3)), "m=3 must divide the layer's in=8"),
    (dict(sparsity=None, n_m=4), r"pair \(n, m\)"),
    (dict(block_size=0), "block_size=0 must be a positive integer"),
    (dict(mode="slow"), "mode='slow'"),
    (dict(refine_steps=-1), r"refine_steps=-1 must be an integer ≥ 0"),
    (dict(refine_steps=2.5), "refine_steps"),
    (dict(refine_steps=True), "refine_steps"),
    (dict(refine_tol=-0.1), r"refine_tol=-0.1 must be a number in \[0, 1\)"),
    (dict(refine_tol=1.0), "refine_tol"),
    (dict(damp=-1.0), "damp"),
    (dict(dtype=torch.int64), "floating-point"),
    (dict(hessian=torch.full((8, 8), float("nan"))), "finite"),
    (dict(weight=torch.full((4, 8), float("inf"))), "finite"),
    (dict(removed=torch.zeros(4, 8)), "bool mask shaped like weight"),
    (dict(removed=torch.zeros(4, 4, dtype=torch.bool)), "bool mask shaped like weight"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(weight=torch.zeros(4, 8), hessian=torch.eye(8), sparsity=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        obs_sparse(args.pop("weight"), args.pop("hessian"), **args)


def test_bad_baseline_and_reference_input_raises():
    W = torch.ones(4, 8)
    with pytest.raises(ValueError, match=r"column_norm must be a finite \[in\] = \[8\]"):
        wanda_mask(W, torch.ones(4), sparsity=0.5)
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        magnitude_mask(W)
    with pytest.raises(ValueError, match="mask a bool tensor of the same shape"):
        least_squares_weight(W, torch.eye(8), torch.zeros(4, 8))


# --- the built-in model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_layers(tiny):
    """Three Linear layers of the tiny DiT with their inputs over 64 noised digits (16 tokens each)."""
    from diffes_pl.data.digits import load_digits_split

    blocks = tiny.blocks()
    layers = {"blocks.1.attn1.to_out.0": blocks[1].attn1.to_out[0], "blocks.2.ff.net.0.proj": blocks[2].ff.net[0].proj,
              "blocks.3.ff.net.2": blocks[3].ff.net[2]}
    inputs = {k: [] for k in layers}
    handles = [m.register_forward_pre_hook(lambda _m, args, k=k: inputs[k].append(args[0].reshape(-1, args[0].shape[-1]).double()))
               for k, m in layers.items()]
    x0, y = load_digits_split("train")
    x0, y = x0[:64], y[:64]
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 1000, (64,), generator=g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].float()[:, None, None, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(x0.shape, generator=g)
    try:
        with torch.no_grad():
            tiny.predict_noise(xt, t, y)
    finally:
        for h in handles:
            h.remove()
    return {k: (layers[k].weight.detach().clone(), torch.cat(inputs[k])) for k in layers}


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(n_m=(2, 4))], ids=["50%", "2:4"])
def test_obs_beats_wanda_beats_magnitude_on_the_builtin_model(real_layers, target):
    for name, (W, X) in real_layers.items():
        H = X.T @ X  # [in, in] from 1024 real input tokens
        wanda = reconstruction_error(W, W * ~wanda_mask(W, X.norm(dim=0), **target), H)
        magnitude = reconstruction_error(W, W * ~magnitude_mask(W, **target), H)
        for steps in (0, 20):  # the bare sweep and the default refinement
            obs = obs_sparse(W, H, refine_steps=steps, **target)
            error = reconstruction_error(W, obs.weight, H)
            print(f"{name} {target} refine_steps={steps}: obs {error:.4g}  wanda {wanda:.4g}  magnitude {magnitude:.4g}")
            assert error < wanda < magnitude, name
            assert obs.weight.dtype == W.dtype == torch.float32


# Measured (float32 weights, float64 solve): the bare sweep is 1.58-2.04x the optimum for its mask on
# these layers; after the default refinement 1.0001-1.0073x (19-20 iterations; the largest on
# blocks.3.ff.net.2, 512 inputs, where refine_tol is not reached within the 20 steps).
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_fast_vs_optimum_ratio_on_the_builtin_model(real_layers, target, record_property):
    for name, (W, X) in real_layers.items():
        ratio, bare, res = optimum_ratios(W, X.T @ X, target)
        record_property(f"{name}.fast_over_optimum", ratio)
        record_property(f"{name}.sweep_over_optimum", bare)
        record_property(f"{name}.refine_iters", res.refine_iters)
        print(f"fast/optimum {name} {target}: {ratio:.4f} (bare sweep {bare:.4f}, {res.refine_iters} CG iterations)")
        assert 1 - 1e-6 <= ratio <= 1.10, name


# --- precision, dead columns --------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_float32_agrees_with_float64(target, mode):
    W, _, H = layer(32, 128, 256, seed=12, correlated=False)
    W, H = W.float(), H.float()
    r64 = obs_sparse(W, H, mode=mode, **target)
    r32 = obs_sparse(W, H, mode=mode, dtype=torch.float32, **target)
    assert r32.weight.dtype == torch.float32 and isinstance(r32, SparseResult)
    Hd, _ = damp_hessian(H, 0.01)
    e64, e32 = reconstruction_error(W, r64.weight, Hd), reconstruction_error(W, r32.weight, Hd)
    assert e32 == pytest.approx(e64, rel=1e-2)
    assert r32.error == pytest.approx(e32, rel=1e-3)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_dead_columns_are_zero_weights(mode):
    W, _, H = layer(6, 16, 40, seed=13)
    H[[3, 9]] = 0
    H[:, [3, 9]] = 0  # inputs 3 and 9 always zero
    res = obs_sparse(W, H, sparsity=0.25, mode=mode)
    assert not res.weight[:, [3, 9]].any()
    assert int(res.mask.sum()) == removal_count(0.25, W.numel())
    W0 = W.clone()
    W0[:, [3, 9]] = 0
    Hd, _ = damp_hessian(H, res.damp)
    assert res.error == pytest.approx(reconstruction_error(W0, res.weight, Hd), rel=1e-9)
    assert reconstruction_error(W, res.weight, H) == pytest.approx(reconstruction_error(W0, res.weight, H), rel=1e-12)
