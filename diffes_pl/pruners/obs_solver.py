"""Structured Optimal Brain Surgeon (OBS) for groups of input columns of a linear layer.

Pure functions, no Lightning. The layer is ``y = W x`` with ``W: [out, in]``; its input columns come
in contiguous groups of ``group_size`` (attention heads × head_dim, or MLP channels with
``group_size=1``). Removing a group means zeroing its columns (and then slicing them, and the
matching outputs of the previous layer, away). With ``H = Σ x xᵀ`` over calibration inputs, the
output error of a changed weight ``Ŵ`` is ``tr((W − Ŵ) H (W − Ŵ)ᵀ)``; OBS removes a set of groups and
re-fits the kept columns to minimise it. For a removed set ``R`` and kept set ``K`` the optimum is

    Ŵ_K = W_K − W_R (Hinv_RR)⁻¹ Hinv_RK,        error = tr(W_R (Hinv_RR)⁻¹ W_Rᵀ),

with ``Hinv`` the inverse of the (damped) full Hessian. The greedy solver removes one group at a
time, the one with the least error ``E_G = Σ_rows w_Gᵀ (Hinv_GG)⁻¹ w_G`` given the groups already
removed (``Hinv`` then being the inverse over the kept columns), like OBC / SparseGPT's
``fasterprune`` do for single weights.

Two modes give the same greedy choices (up to round-off):

* ``exact``: the textbook loop; every step updates all of ``W [out, in]`` and ``Hinv [in, in]``.
* ``fast``: the greedy choice only needs, per group, the diagonal blocks of ``Hinv`` and of
  ``Q = Ŵᵀ Ŵ`` (``E_G = tr((Hinv_GG)⁻¹ Q_GG)``). Both matrices get a low-rank update per step;
  the updates are kept pending (the few columns a step needs are rebuilt from them) and applied
  every ``block_groups`` steps as one matrix product, after which removed columns are dropped.
  The weights are computed only at the milestones, by the closed form above (one Cholesky factor
  of ``Hinv_RR`` in removal order serves every milestone and also gives the errors).

Where and in what precision (docs/DESIGN.md: Data flow, pruners/*): the solve runs on ``device``
(the pruner passes its own, the trainer's accelerator, where the Hessians are gathered), in
``dtype`` float64 by default. Float64 matters for the inverse of the damped Hessian (with
damp = 0.01 its condition number may reach about 100 · in, 5e5 for 4608 MLP channels), for the up
to ``n`` rank-``g`` downdates accumulated into ``Hinv`` and ``Q`` (float32 round-off piles up until
a ``Hinv_GG`` block loses positive definiteness: the "numerical breakdown" error) and for the
closed-form weights (a triangular solve against that inverse). The weight comes in and goes out in
its own dtype and device; only the solve's temporaries (a few ``[in, in]`` matrices) live on
``device``. float32 is offered for GPUs whose float64 rate is 1/32–1/64 of float32 (consumer
cards), at the accuracy cost stated above.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PruneResult", "damp_hessian", "prune_groups", "solve_threads", "solver_device"]

_RETRIES = 3  # times the damping is raised ×10 when the Hessian is not positive definite


@dataclass
class PruneResult:
    """The layer after removing ``len(removed)`` groups of input columns."""

    removed: Tensor  # [m] long: removed group indices, in removal order
    kept: Tensor  # [n_groups − m] long: kept group indices, ascending
    weight: Tensor  # [out, (n_groups − m) * group_size]: compensated weight of the kept columns
    error: float  # tr((W − Ŵ) H (W − Ŵ)ᵀ) with the damped H, Ŵ zero at the removed columns
    damp: float = 0.0  # relative damping actually used (larger than asked if it had to be raised)


def damp_hessian(hessian: Tensor, damp: float, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """SparseGPT's preparation of ``H``: symmetrise, dead columns (``H_jj == 0``) get ``H_jj = 1``,
    then ``damp * mean(diag(H))`` is added to the diagonal. Returns ``(H_damped, dead)``."""
    H = hessian.to(dtype)
    H = (H + H.T) / 2  # [in, in]
    dead = H.diagonal() == 0  # [in]
    H.diagonal()[dead] = 1
    H.diagonal().add_(damp * H.diagonal().mean())
    return H, dead


def _inverse(hessian: Tensor, damp: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """``(Hinv, dead, damp_used)``: Cholesky inverse of the damped Hessian; the damping is raised
    ×10 (at least to 0.01) up to ``_RETRIES`` times while the Hessian is not positive definite."""
    damps = [damp] + [max(damp, 1e-3) * 10**k for k in range(1, _RETRIES + 1)]
    for i, d in enumerate(damps):
        H, dead = damp_hessian(hessian, d, dtype)
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:  # (cholesky_solve: torch.cholesky_inverse is several × slower on some sizes)
            return torch.cholesky_solve(torch.eye(len(H), dtype=dtype, device=H.device), L), dead, d
        if i < _RETRIES:
            warnings.warn(f"Hessian not positive definite (damp={d:g}); damping raised to {damps[i + 1]:g}",
                          RuntimeWarning, stacklevel=3)
    raise ValueError(f"Hessian not positive definite even with damp={damps[-1]:g} (it may be indefinite or "
                     "not a sum of x xᵀ); increase damp or the number of calibration samples")


def _diag_blocks(M: Tensor, g: int) -> Tensor:
    """``[k, k] → [k/g, g, g]``: the diagonal ``g × g`` blocks (a copy)."""
    n = M.shape[0] // g
    idx = torch.arange(n, device=M.device)
    return M.view(n, g, n, g)[idx, :, idx, :]


def _group_errors(hblk: Tensor, qblk: Tensor) -> Tensor:
    """``E_G = tr(hblk_G⁻¹ qblk_G)`` for blocks ``[n, g, g]`` → ``[n]``; ``inf`` where the ``Hinv``
    block is (numerically) not positive definite, so that such a group is never picked."""
    if hblk.shape[-1] == 1:
        h = hblk[:, 0, 0]
        return torch.where(h > 0, qblk[:, 0, 0] / h, torch.inf)
    L, info = torch.linalg.cholesky_ex(hblk)  # [n, g, g]
    err = torch.cholesky_solve(qblk, L).diagonal(dim1=-2, dim2=-1).sum(-1)  # [n]
    return torch.where(info == 0, err, torch.inf)


def _block_outer(a: Tensor, b: Tensor, g: int) -> Tensor:
    """Diagonal ``g × g`` blocks of ``a bᵀ`` for ``a, b: [k, g]`` → ``[k/g, g, g]``."""
    if g == 1:
        return (a * b).view(-1, 1, 1)
    return a.view(-1, g, g) @ b.view(-1, g, g).mT


def _obs_step(h: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """For ``h = Hinv[:, G]`` ``[k, g]``: ``u = h L⁻ᵀ`` with ``L Lᵀ = Hinv_GG`` (so ``u uᵀ`` is the
    ``Hinv`` downdate) and ``r = h Hinv_GG⁻¹`` (the OBS compensation is ``δW = −W_G rᵀ``)."""
    L, info = torch.linalg.cholesky_ex(h[cols])  # [g, g]
    if info != 0:
        raise ValueError("numerical breakdown in the OBS updates (an inverse-Hessian block lost positive "
                         "definiteness); use dtype=torch.float64 or increase damp")
    Linv = torch.linalg.solve_triangular(L, torch.eye(len(L), dtype=L.dtype, device=L.device), upper=False)
    u = h @ Linv.T  # [k, g]
    return u, u @ Linv


def _greedy_exact(W: Tensor, Hinv: Tensor, g: int, steps: int, record: set[int]) -> tuple[list[int], list[float], dict]:
    """Textbook greedy structured OBS. Returns (order, step errors, {m: Ŵ [out, in] zero at removed})."""
    W, Hinv = W.clone(), Hinv.clone()  # [out, in], [in, in]
    n = W.shape[1] // g
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    order, errs, snaps = [], [], {}
    for step in range(steps):
        if step in record:
            snaps[step] = W.clone()
        if g == 1:
            qblk = (W * W).sum(0).view(-1, 1, 1)  # [n, 1, 1]
        else:
            Wg = W.view(-1, n, g).permute(1, 2, 0)  # [n, g, out]
            qblk = Wg @ Wg.mT  # [n, g, g]
        err = _group_errors(_diag_blocks(Hinv, g), qblk)  # [n]
        err[~alive] = torch.inf
        j = int(torch.argmin(err))
        cols = slice(j * g, (j + 1) * g)
        u, r = _obs_step(Hinv[:, cols], cols)  # [in, g] each
        W.addmm_(W[:, cols].clone(), r.T, alpha=-1)  # W −= W_G Hinv_GG⁻¹ Hinv_G,:
        Hinv.addmm_(u, u.T, alpha=-1)  # Hinv −= Hinv_:,G Hinv_GG⁻¹ Hinv_G,:
        W[:, cols] = 0
        Hinv[cols, :] = 0
        Hinv[:, cols] = 0
        alive[j] = False
        order.append(j)
        errs.append(float(err[j]))
    if steps in record:
        snaps[steps] = W.clone()
    return order, errs, snaps


def _greedy_fast(W: Tensor, Hinv: Tensor, g: int, steps: int, block: int) -> list[int]:
    """The same greedy order, from lazily updated ``Hinv`` and ``Q = Ŵᵀ Ŵ`` (see module docstring).
    Removed columns are dropped from the matrices now and then (local indices; ``groups`` maps the
    local groups to the global ones)."""
    Hf, Qf = Hinv.clone(), W.T @ W  # [k, k] each (symmetric), up to date but for the pending factors
    k = len(Hf)
    groups = torch.arange(k // g, device=W.device)  # [n_local]
    # Pending factors of the last nb steps: Hinv = Hf − Σ_i U_iᵀ U_i,  Q = Qf − Σ_i (V_iᵀ R_i + R_iᵀ V_i).
    U, VR = Hf.new_empty(block, g, k), Hf.new_empty(block, 2, g, k)  # U_i; (V_i, R_i)
    hblk, qblk = _diag_blocks(Hf, g), _diag_blocks(Qf, g)  # [n_local, g, g]
    alive = torch.ones(len(groups), dtype=torch.bool, device=W.device)
    nb, order = 0, []
    for _ in range(steps):
        err = _group_errors(hblk, qblk)
        err[~alive] = torch.inf
        j = int(torch.argmin(err))
        cols = slice(j * g, (j + 1) * g)
        Up, VRp = U[:nb].view(-1, k), VR[:nb].view(-1, k)  # [nb*g, k], [nb*2g, k]
        h = (Hf[cols] - Up[:, cols].T @ Up).T  # [k, g] current Hinv_:,G (Hf symmetric: read rows)
        q = (Qf[cols] - VR[:nb, :, :, cols].flip(1).reshape(-1, g).T @ VRp).T  # [k, g] current Q_:,G
        u, r = _obs_step(h, cols)
        v = q - 0.5 * r @ q[cols]  # Q' = Q − q rᵀ − r qᵀ + r Q_GG rᵀ = Q − v rᵀ − r vᵀ
        U[nb], VR[nb, 0], VR[nb, 1] = u.T, v.T, r.T
        nb += 1
        hblk -= _block_outer(u, u, g)
        qblk -= _block_outer(v, r, g) + _block_outer(r, v, g)
        alive[j] = False
        order.append(int(groups[j]))
        if nb == block and len(order) < steps:  # apply the pending updates (one product each)
            Hf.addmm_(U.view(-1, k).T, U.view(-1, k), alpha=-1)
            Qf.addmm_(VR.flip(1).view(-1, k).T, VR.view(-1, k), alpha=-1)
            nb = 0
            if 4 * int(alive.sum()) <= 3 * len(alive):  # a quarter removed: drop removed columns
                keep = alive.repeat_interleave(g).nonzero().squeeze(1)  # [k']
                Hf, Qf, k = Hf[keep[:, None], keep], Qf[keep[:, None], keep], len(keep)
                U, VR = Hf.new_empty(block, g, k), Hf.new_empty(block, 2, g, k)
                groups, alive = groups[alive], alive[alive]
            hblk, qblk = _diag_blocks(Hf, g), _diag_blocks(Qf, g)
    return order


def _closed_form(W: Tensor, Hinv: Tensor, g: int, order: list[int], milestones: list[int]) -> dict:
    """``{m: (Ŵ_K [out, |K|], kept groups, error)}`` for the first ``m`` groups of ``order`` removed
    (``milestones`` ascending), from one Cholesky factor ``L Lᵀ = Hinv_RR`` of all removed columns in
    removal order: its leading blocks factor every milestone's ``Hinv_RR``. With ``Y = W_R L⁻ᵀ`` and
    ``P = L⁻¹ Hinv_R,:`` (``= Lᵀ`` on the removed columns), ``Ŵ = W − Y[:, :m] P[:m]`` and the error
    is ``‖Y[:, :m]‖²``; so milestones are reached by cumulative rank updates."""
    n = W.shape[1] // g
    ar = torch.arange(g, device=W.device)
    rest = torch.ones(n, dtype=torch.bool, device=W.device)
    rest[order] = False
    removed = torch.tensor(order, dtype=torch.long, device=W.device)
    gperm = torch.cat([removed, rest.nonzero().squeeze(1)])  # [n] groups: removal order, then never removed
    perm = (gperm[:, None] * g + ar).flatten()  # [in] columns: removal order, then never removed
    mg = len(order) * g
    rc, kc = perm[:mg], perm[mg:]
    Hr = Hinv[rc]  # [mg, in]
    L = torch.linalg.cholesky(Hr[:, rc])  # [mg, mg]
    Yt = torch.linalg.solve_triangular(L, W[:, rc].T, upper=False)  # [mg, out] = (W_R L⁻ᵀ)ᵀ
    P = torch.cat([L.T, torch.linalg.solve_triangular(L, Hr[:, kc], upper=False)], 1)  # [mg, in]
    cum = torch.cat([Yt.new_zeros(1), (Yt**2).sum(1).view(-1, g).sum(1).cumsum(0)])  # [M+1] errors
    Wp = W[:, perm]  # [out, in], columns permuted; becomes Ŵ as groups are removed
    out, done = {}, 0
    for m in milestones:
        a, b = done * g, m * g
        Wp[:, b:] -= Yt[a:b].T @ P[a:b, b:]  # columns < b are removed (≈ 0): skipped
        kg, idx = gperm[m:].sort()  # kept groups ascending
        out[m] = (Wp[:, b:].view(len(W), -1, g)[:, idx].flatten(1), kg, float(cum[m]))
        done = m
    return out


def prune_groups(weight: Tensor, hessian: Tensor, group_size: int, milestones: Sequence[int], *,
                 damp: float = 0.01, dtype: torch.dtype = torch.float64, mode: str = "exact",
                 block_groups: int = 32, device: torch.device | str | None = None) -> list[PruneResult]:
    """Greedy structured OBS: remove groups of ``group_size`` input columns of ``weight`` one at a
    time, compensating the kept columns, and report the layer after each milestone.

    Args:
        weight: ``[out, in]`` weight of the layer whose input columns are pruned.
        hessian: ``[in, in]`` ``H = Σ x xᵀ`` over calibration inputs of the layer.
        group_size: columns per group; group ``g`` is columns ``g*group_size:(g+1)*group_size``.
        milestones: numbers of removed groups (``0..n_groups``, any order, repeats allowed) to report.
        damp: relative damping, ``damp * mean(diag(H))`` added to the diagonal (raised ×10 up to 3
            times, with a warning, if the Hessian is not positive definite).
        dtype: computation dtype (``float64`` default; ``float32`` is faster, less accurate).
        mode: ``"exact"`` (per-step full updates) or ``"fast"`` (lazy blocked updates, closed-form
            weights at the milestones); both take the same greedy choices up to round-off.
        block_groups: ``fast`` mode: greedy steps between two applications of the pending updates.
        device: where the solve runs (default: where ``hessian`` is); see the module docstring.

    Returns:
        One :class:`PruneResult` per milestone, in the order given, weights on ``weight``'s device
        and in its dtype (orders and kept indices on the CPU). Milestone 0 returns the input
        weight unchanged. Dead columns (``H_jj == 0``) are treated as zero weights, as in SparseGPT.
    """
    if weight.ndim != 2 or hessian.ndim != 2 or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"weight must be [out, in] and hessian [in, in]; got weight {tuple(weight.shape)}, "
                         f"hessian {tuple(hessian.shape)}")
    n_in = weight.shape[1]
    if not isinstance(group_size, int) or group_size < 1 or n_in % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive integer dividing in={n_in}")
    n = n_in // group_size
    ms = [int(m) for m in milestones]
    if any(m < 0 or m > n for m in ms):
        raise ValueError(f"milestones {ms} out of range: each must lie in 0..n_groups={n}")
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode={mode!r}; expected 'exact' or 'fast'")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} must be a floating-point dtype")
    if damp < 0 or block_groups < 1:
        raise ValueError(f"damp={damp} must be ≥ 0 and block_groups={block_groups} ≥ 1")
    if not (torch.isfinite(weight).all() and torch.isfinite(hessian).all()):
        raise ValueError("weight and hessian must be finite (no NaN/inf)")

    where = solver_device(hessian, device)
    Hinv, dead, used = _inverse(hessian.to(where), damp, dtype)  # [in, in]
    W = weight.detach().to(where, dtype, copy=True)  # [out, in]
    W[:, dead] = 0
    steps = max(ms, default=0)
    if mode == "exact":
        order, errs, snaps = _greedy_exact(W, Hinv, group_size, steps, set(ms))
        cum = [0.0]
        for e in errs:
            cum.append(cum[-1] + e)
        found = {}
        for m in set(ms):
            kept = torch.ones(n, dtype=torch.bool, device=W.device)
            kept[order[:m]] = False
            kg = kept.nonzero().squeeze(1)
            found[m] = (snaps[m].view(-1, n, group_size)[:, kg].flatten(1), kg, cum[m])
    else:
        order = _greedy_fast(W, Hinv, group_size, steps, block_groups)
        found = _closed_form(W, Hinv, group_size, order, sorted(set(ms)))
    results = []
    for m in ms:
        Wk, kg, err = found[m]
        Wk = weight.detach().clone() if m == 0 else Wk.to(weight.device, weight.dtype)
        results.append(PruneResult(torch.tensor(order[:m], dtype=torch.long), kg.cpu(), Wk, float(err), used))
    return results


def solver_device(hessian: Tensor, device: torch.device | str | None = None) -> torch.device:
    """Where :func:`prune_groups` computes: ``device`` when given, else where the Hessian already
    is (moving it would copy the largest input). The meta device is refused: nothing to solve."""
    where = torch.device(device) if device is not None else hessian.device
    if where.type == "meta" or hessian.device.type == "meta":
        raise ValueError("the OBS solve needs real tensors; the meta device holds no values")
    return where


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a batch scheduler sets it), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def solve_threads(device: torch.device | str, solving_processes: int = 1,
                  running_processes: int = 1) -> Iterator[int]:
    """torch's intra-op threads for a CPU solve: the process's CPUs shared by the processes that solve
    at once. Lightning's DDP launchers give each of ``running_processes`` ranks cpus // ranks threads
    (unless OMP_NUM_THREADS is set); when only rank 0 solves (a single-pass stage), the others wait at
    a barrier and their cores would idle. Never lowers the current setting (a user's OMP_NUM_THREADS
    in a one-process run is kept), and restores it afterwards. Yields the threads used; a
    non-CPU device is left alone."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu":
        yield before
        return
    share = available_cpus() // max(1, solving_processes)
    lifted = running_processes > solving_processes and share > before
    if lifted:
        torch.set_num_threads(share)
    try:
        yield torch.get_num_threads()
    finally:
        if lifted:
            torch.set_num_threads(before)
