"""Comparison statistics (diffes_pl.evaluation.intervals) against references: KID against torchmetrics'
KernelInceptionDistance and a brute-force double sum, the exact sign-flip p against an enumeration
of all 2^n flips, bootstrap intervals and decisions on synthetic data with a known answer, and the
false-call rate of the paired test when there is no difference."""
import itertools
import json
import warnings

import numpy as np
import pytest
import torch

from diffes_pl.evaluation import intervals as I
from diffes_pl.evaluation.metrics import Precomputed, fid_from_features


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices (d ≤ 16): a second intra-op thread only adds synchronisation (~10× slower FID)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussians(n, d=8, shift=0.5, seed=0):
    """real [n, d] ~ N(0, I) and fake [n, d] ~ N(shift, I), float64 (true FID = d · shift²)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64) + shift)


def torchmetrics_kid(real, fake, subsets, subset_size, seed):
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will save all extracted features"
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=subset_size)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torchmetrics draws its subsets from the global RNG
            mean, std = metric.compute()
    return float(mean), float(std)


# --- KID -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 5])
def test_kid_equals_torchmetrics_on_random_subsets(seed):
    real, fake = gaussians(60, d=16, shift=0.3)
    fake = fake[:50]
    mean, std = I.kid_from_features(real, fake, subset_size=30, subsets=7, seed=seed)
    ref_mean, ref_std = torchmetrics_kid(real, fake, subsets=7, subset_size=30, seed=seed)
    assert mean == pytest.approx(ref_mean, rel=1e-6) and std == pytest.approx(ref_std, rel=1e-6)
    assert std > 0
    # the seed picks the subsets: another seed, another value; the global RNG is left alone
    state = torch.random.get_rng_state()
    assert I.kid_from_features(real, fake, 30, 7, seed=seed + 1)[0] != pytest.approx(mean, rel=1e-9)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_kid_full_set_equals_torchmetrics_and_brute_force():
    real, fake = gaussians(12, d=3, shift=0.7, seed=1)
    mean, std = I.kid_from_features(real, fake, subset_size=12, subsets=1)
    assert std == 0.0
    # one subset of every row: the draw only permutes rows, so any seed gives the same value
    assert mean == pytest.approx(torchmetrics_kid(real, fake, 1, 12, seed=3)[0], rel=1e-6)

    x, y, m, d = real.tolist(), fake.tolist(), 12, 3
    k = lambda u, v: (sum(a * b for a, b in zip(u, v)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    assert mean > 0.1  # the shift shows


def test_kid_explicit_indices_and_errors():
    real, fake = gaussians(20, d=4)
    subsets = [(torch.arange(10), torch.arange(10, 20)), (torch.arange(5, 15), torch.arange(10))]
    mean, std = I.kid_from_features(real, fake, subset_size=10, indices=subsets)
    each = [I.kid_from_features(real[r], fake[f], subset_size=10, subsets=1)[0] for r, f in subsets]
    assert mean == pytest.approx(np.mean(each), rel=1e-12) and std == pytest.approx(np.std(each), rel=1e-12)
    with pytest.raises(ValueError, match="exceeds"):
        I.kid_from_features(real, fake, subset_size=21)
    with pytest.raises(ValueError, match=r"\[20, 4\] and \[20, 3\]"):
        I.kid_from_features(real, fake[:, :3], subset_size=10)


# --- bootstrap -------------------------------------------------------------------------------------

def test_fid_bootstrap_interval_contains_estimate_and_shrinks_with_n():
    widths = {}
    for n in (100, 400):
        real, fake = gaussians(n)  # true FID 8 · 0.25 = 2
        iv = I.bootstrap_interval(fid_from_features, real, fake, n_boot=200, seed=0)
        assert iv.value == pytest.approx(fid_from_features(real, fake), rel=1e-12)
        assert iv.low < iv.value < iv.high and iv.contains_value
        widths[n] = iv.width
    assert widths[400] < 0.6 * widths[100]  # ~1/2 expected from 1/sqrt(n)
    # deterministic under the seed, different under another
    real, fake = gaussians(100)
    a = I.bootstrap_interval(fid_from_features, real, fake, n_boot=100, seed=3)
    b = I.bootstrap_interval(fid_from_features, real, fake, n_boot=100, seed=3)
    c = I.bootstrap_interval(fid_from_features, real, fake, n_boot=100, seed=4)
    assert np.array_equal(a.boot, b.boot) and a == b and not np.array_equal(a.boot, c.boot)
    json.dumps(a.to_dict())


def test_basic_interval_corrects_the_fid_bias():
    real, fake = gaussians(100)  # true FID 2; the estimate is 3.35, biased up at n = 100
    pct = I.bootstrap_interval(fid_from_features, real, fake, n_boot=200)
    basic = I.bootstrap_interval(fid_from_features, real, fake, n_boot=200, method="basic")
    assert np.array_equal(pct.boot, basic.boot) and basic.method == "basic"
    assert basic.low == pytest.approx(2 * pct.value - pct.high) and basic.high == pytest.approx(2 * pct.value - pct.low)
    assert not pct.low <= 2 <= pct.high and basic.low <= 2 <= basic.high
    # over 20 draws: the percentile interval rarely brackets the true FID, the basic one mostly does
    covered = {"percentile": 0, "basic": 0}
    for s in range(20):
        iv = I.bootstrap_interval(fid_from_features, *gaussians(100, seed=100 + s), n_boot=100, seed=s, method="basic")
        lo, hi = np.quantile(iv.boot, [0.025, 0.975])
        covered["percentile"] += bool(lo <= 2 <= hi)
        covered["basic"] += bool(iv.low <= 2 <= iv.high)
    assert covered["percentile"] <= 10 and covered["basic"] >= 16, covered
    with pytest.raises(ValueError, match="method"):
        I.bootstrap_interval(fid_from_features, real, fake, method="bca")


def test_fid_bootstrap_in_higher_dimension_is_bias_dominated():
    # 32-d, n = 100, true FID 2: the estimate is ~7.6 and every resample, with its repeated rows,
    # lies above it; the flag makes that visible in the JSON
    real, fake = gaussians(100, d=32, shift=0.25)
    iv = I.bootstrap_interval(fid_from_features, real, fake, n_boot=100)
    assert iv.value == pytest.approx(7.624, abs=1e-3) and iv.low > iv.value and not iv.contains_value
    assert iv.to_dict()["contains_value"] is False


def test_paired_bootstrap_shares_indices():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + 0.1 * rng.normal(size=200)  # strongly correlated: pairing cancels the shared part
    diff = lambda u, v: float(np.mean(u) - np.mean(v))
    paired = I.bootstrap_interval(diff, x, y, n_boot=300, paired=True)
    independent = I.bootstrap_interval(diff, x, y, n_boot=300, paired=False)
    assert paired.width < 0.2 * independent.width
    # the same indices for both: resampled means of (x, x) always agree
    assert np.all(I.bootstrap_interval(diff, x, x, n_boot=100, paired=True).boot == 0)
    with pytest.raises(ValueError, match=r"\[200\] and \[199\]"):
        I.bootstrap_interval(diff, x, y[:199], n_boot=100, paired=True)


# --- paired per-probe scores -----------------------------------------------------------------------

def test_paired_difference_known_shift_is_a_win():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 0.9, size=64)  # e.g. SSIM per probe
    b = a - 0.1 + 0.02 * rng.normal(size=64)
    c = I.paired_difference(a, b, n_boot=1000, seed=0)
    assert c.decision == "win" and c.low < 0.1 < c.high and c.mean_diff == pytest.approx(0.1, abs=0.01)
    assert c.p_value < 1e-3 and c.test == "sign-flip monte-carlo" and c.n == 64
    assert I.paired_difference(b, a, n_boot=1000).decision == "loss"
    # lower is better (FID-like): a's larger score is now the loss
    assert I.paired_difference(a, b, n_boot=1000, higher_is_better=False).decision == "loss"
    json.dumps(c.to_dict())


@pytest.mark.parametrize("n", [8, 40])
def test_identical_scores_tie_with_p_one(n):
    a = np.random.default_rng(2).normal(size=n)
    c = I.paired_difference(a, a.copy(), n_boot=200)
    assert c.decision == "tie" and c.p_value == 1.0 and c.mean_diff == 0.0 and c.low == c.high == 0.0


def test_exact_sign_flip_p_equals_enumeration():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=8), rng.normal(size=8) - 0.4
    d = (a - b).tolist()
    observed = abs(sum(d)) / 8
    flips = [abs(sum(s * x for s, x in zip(signs, d))) / 8 for signs in itertools.product((1, -1), repeat=8)]
    brute = sum(f >= observed for f in flips) / 2**8
    c = I.paired_difference(a, b, n_boot=200)
    assert c.test == "sign-flip exact" and c.p_value == brute
    assert 0 < brute < 1 and brute * 2**8 == round(brute * 2**8)


def test_monte_carlo_p_approximates_exact_enumeration():
    d = np.random.default_rng(4).normal(0.3, 1.0, size=18)  # 2^18 flips: enumerable here, Monte Carlo in the module
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=18)))
    exact = float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9))
    p, test = I.sign_flip_p_value(d, n_perm=20000, seed=0)
    assert test == "sign-flip monte-carlo" and p == pytest.approx(exact, abs=0.01)


def test_paired_difference_is_deterministic_under_the_seed():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert I.paired_difference(a, b, n_boot=300, seed=7) == I.paired_difference(a, b, n_boot=300, seed=7)
    assert I.paired_difference(a, b, n_boot=300, seed=7).low != I.paired_difference(a, b, n_boot=300, seed=8).low


def test_false_calls_without_a_true_difference_are_rare():
    rng = np.random.default_rng(6)
    calls = 0
    for rep in range(200):
        a, b = rng.normal(size=(2, 20))  # no true difference
        calls += I.paired_difference(a, b, n_boot=200, n_perm=400, seed=rep).decision != "tie"
    assert calls <= 20  # nominal 5 %


def test_seeds_pool_per_probe():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(3, 25)) + 0.3  # [seeds, probes]
    b = rng.normal(size=(3, 25))
    pooled = I.paired_difference(a, b, n_boot=300)
    assert pooled.n == 25 and pooled.mean_diff == pytest.approx(float((a - b).mean()), rel=1e-12)
    # the probe is the unit: the same as the per-probe means over seeds
    assert pooled == I.paired_difference(a.mean(0), b.mean(0), n_boot=300)
    assert I.pooled_paired(list(a), [torch.tensor(x) for x in b], n_boot=300) == pooled
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        I.pooled_paired(list(a), list(b[:2]))
    with pytest.raises(ValueError, match=r"\[3, 25\] and \[3, 24\]"):
        I.paired_difference(a, b[:, :24])


def test_across_seeds():
    s = I.across_seeds([3.0, 4.0, 5.0])
    assert s == {"mean": 4.0, "std": 1.0, "min": 3.0, "max": 5.0, "n": 3}
    assert I.across_seeds(torch.tensor([2.5]))["std"] == 0.0
    with pytest.raises(ValueError):
        I.across_seeds([])


# --- set-level metrics -----------------------------------------------------------------------------

def test_distribution_difference_fid():
    real, near = gaussians(150, d=4, shift=0.1, seed=0)
    _, far = gaussians(150, d=4, shift=0.8, seed=1)
    c = I.distribution_difference(real, near, far, fid_from_features, n_boot=200, seed=0)
    assert c.mean_diff == pytest.approx(fid_from_features(real, near) - fid_from_features(real, far), rel=1e-12)
    assert c.decision == "win" and c.high < 0 and c.p_value == 0.0 and c.test == "bootstrap"
    assert I.distribution_difference(real, far, near, fid_from_features, n_boot=200).decision == "loss"
    same = I.distribution_difference(real, near, near.clone(), fid_from_features, n_boot=100)
    assert same.decision == "tie" and same.p_value == 1.0 and same.mean_diff == 0.0
    # with KID (mean over subsets) as the metric: the same call
    kid = lambda r, f: I.kid_from_features(r, f, subset_size=50, subsets=5)[0]
    assert I.distribution_difference(real, near, far, kid, n_boot=100).decision == "win"
    with pytest.raises(ValueError, match=r"\[150, 4\] and \[149, 4\]"):
        I.distribution_difference(real, near, far[:149], fid_from_features)


def test_distribution_difference_ties_on_two_draws_of_one_distribution():
    real, a = gaussians(150, d=4, shift=0.3, seed=2)
    _, b = gaussians(150, d=4, shift=0.3, seed=3)
    c = I.distribution_difference(real, a, b, fid_from_features, n_boot=200)
    assert c.decision == "tie" and c.low < 0 < c.high and c.p_value > 0.05


def test_distribution_difference_basic_interval_brackets_the_true_fid_difference():
    """FID's resampling bias grows with a method's spread: for N(0, I) vs N(0, 1.3² I) generators the
    percentile interval of the paired difference misses the true difference (−d·0.09), the basic
    (reflected) interval, the default, covers it."""
    d = 32
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        real = torch.randn(200, d, generator=g, dtype=torch.float64)
        a = torch.randn(300, d, generator=g, dtype=torch.float64)
        b = torch.randn(300, d, generator=g, dtype=torch.float64) * 1.3
        basic = I.distribution_difference(real, a, b, fid_from_features, n_boot=200)
        pct = I.distribution_difference(real, a, b, fid_from_features, n_boot=200, method="percentile")
        assert basic.mean_diff == pct.mean_diff
        assert basic.low < -d * 0.09 < basic.high and basic.decision == "win"
        assert pct.high < -d * 0.09
    with pytest.raises(ValueError, match="method"):
        I.distribution_difference(real, a, b, fid_from_features, method="bca")


def _mmd_brute(x, y, pairs_x, pairs_y):
    """Unbiased MMD² by explicit sums over the allowed within-set pairs and all cross pairs."""
    k = lambda u, v: (float(u @ v) / len(u) + 1.0) ** 3  # noqa: E731
    kxx = np.mean([k(x[i], x[j]) for i, j in pairs_x])
    kyy = np.mean([k(y[i], y[j]) for i, j in pairs_y])
    kxy = np.mean([k(u, v) for u in x for v in y])
    return kxx + kyy - 2 * kxy


def test_kid_unbiased_equals_torchmetrics_estimator_and_brute_force():
    real, fake = gaussians(14, d=5, shift=0.4, seed=7)
    assert I.kid_unbiased(real, fake) == pytest.approx(I.kid_from_features(real, fake, 14, 1)[0], rel=1e-10)
    fake = fake[:9]  # N ≠ M: torchmetrics cannot, the U-statistic can
    distinct = lambda n: [(i, j) for i in range(n) for j in range(n) if i != j]  # noqa: E731
    assert I.kid_unbiased(real, fake) == pytest.approx(_mmd_brute(real, fake, distinct(14), distinct(9)), rel=1e-10)


def test_kid_resample_never_pairs_a_row_with_its_own_copy():
    """Replicate 0 of `kid_interval` equals the brute-force U-statistic of the resampled multisets
    over pairs of copies of DIFFERENT original rows (the counts are redrawn from the same seed)."""
    real, fake = gaussians(10, d=4, shift=0.3, seed=8)
    fake = fake[:7]
    iv = I.kid_interval(real, fake, n_boot=100, seed=5)
    rng = np.random.default_rng(5)
    w = rng.multinomial(10, np.full(10, 0.1), size=100)[0]  # all real counts are drawn first
    v = rng.multinomial(7, np.full(7, 1 / 7), size=100)[0]
    rows_r = [i for i in range(10) for _ in range(w[i])]
    rows_f = [i for i in range(7) for _ in range(v[i])]
    assert w.max() > 1 and v.max() > 1  # the case at issue: the resample holds copies
    allowed = lambda rows: [(a, b) for a in range(len(rows)) for b in range(len(rows)) if rows[a] != rows[b]]  # noqa: E731
    brute = _mmd_brute(real[rows_r], fake[rows_f], allowed(rows_r), allowed(rows_f))
    assert iv.boot[0] == pytest.approx(brute, rel=1e-9)


def test_kid_interval_brackets_the_estimate_where_the_naive_resample_does_not():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(150, 64, generator=g, dtype=torch.float64)
    fake = torch.randn(120, 64, generator=g, dtype=torch.float64) * 1.1
    iv = I.kid_interval(real, fake, n_boot=200)
    assert iv.value == I.kid_unbiased(real, fake)
    assert iv.contains_value and abs(iv.boot.mean() - iv.value) < 0.1 * iv.width
    naive = I.bootstrap_interval(I.kid_unbiased, real, fake, n_boot=100)
    assert naive.low > iv.high  # copies paired with themselves: every naive resample far above


def test_kid_difference_decisions():
    real, near = gaussians(150, d=8, shift=0.1, seed=0)
    _, far = gaussians(150, d=8, shift=0.8, seed=1)
    c = I.kid_difference(real, near, far, n_boot=200)
    assert c.mean_diff == pytest.approx(I.kid_unbiased(real, near) - I.kid_unbiased(real, far), rel=1e-12)
    assert c.decision == "win" and c.high < 0 and c.test == "bootstrap" and c.n == 150
    assert I.kid_difference(real, far, near, n_boot=200).decision == "loss"
    same = I.kid_difference(real, near, near.clone(), n_boot=100)
    assert same.decision == "tie" and same.p_value == 1.0 and same.mean_diff == 0.0
    _, other = gaussians(150, d=8, shift=0.1, seed=2)
    assert I.kid_difference(real, near, other, n_boot=200).decision == "tie"
    with pytest.raises(ValueError, match=r"\[150, 8\] and \[149, 8\]"):
        I.kid_difference(real, near, far[:149])


# --- validation ------------------------------------------------------------------------------------

def test_input_validation():
    x = np.zeros(10)
    with pytest.raises(ValueError, match="n_boot must be at least 100"):
        I.bootstrap_interval(np.mean, x, n_boot=99)
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        I.paired_difference(x, x, level=1.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        I.bootstrap_interval(np.mean, np.zeros(1))
    with pytest.raises(ValueError, match="at least 2 probes"):
        I.paired_difference(np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        I.distribution_difference(np.zeros((1, 2)), np.zeros((5, 2)), np.zeros((5, 2)), lambda r, f: 0.0)


def test_standardise_scales_a_dimension_constant_on_the_real_set_by_the_mean_std():
    """A dead feature (0 on every real row) keeps its mean-std scale, so a generated row that touches it
    slightly moves KID slightly — dividing by ≈ 0 made such a row thousands of σ out and KID ≈ −1.5."""
    real, fake = gaussians(60, d=6, shift=0.2, seed=3)
    real, fake = real.clone(), fake.clone()
    real[:, 2] = 0.0  # a dead ReLU on the real set
    fake[:, 2] = 0.0
    z_real, z_fake = I.standardise(real, fake)
    others = real[:, [0, 1, 3, 4, 5]]
    assert torch.allclose(z_real[:, 0], (real[:, 0] - real[:, 0].mean()) / real[:, 0].std())  # a live one
    assert torch.equal(z_real[:, 2], torch.zeros(60, dtype=real.dtype))
    touched = fake.clone()
    touched[0, 2] = 3e-4  # what one pruned digit did
    _, z_touched = I.standardise(real, touched)
    assert z_touched[0, 2] == pytest.approx(3e-4 / float(others.std(dim=0).mean()), rel=1e-9)
    before, after = I.kid_unbiased(z_real, z_fake), I.kid_unbiased(*I.standardise(real, touched))
    assert abs(after - before) < 1e-4 and before > 0
    far = fake.clone()
    far[:, 2] = 5.0  # every generated row lights the dead feature: much further from the real set
    assert I.kid_unbiased(*I.standardise(real, far)) > before + 1.0
