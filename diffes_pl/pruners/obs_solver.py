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
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PruneResult", "damp_hessian", "prune_groups"]

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
        if info == 0:
            return torch.cholesky_inverse(L), dead, d
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


def _obs_step(h: Tensor, cols: slice) -> tuple[Tensor, Tensor]:
    """For ``h = Hinv[:, G]`` ``[k, g]``: ``u = h L⁻ᵀ`` (so ``u uᵀ = h Hinv_GG⁻¹ hᵀ``, the ``Hinv``
    downdate) and ``r = h Hinv_GG⁻¹`` (the OBS compensation ``δW = −W_G rᵀ``), ``L L ᵀ = Hinv_GG``."""
    L, info = torch.linalg.cholesky_ex(h[cols])  # [g, g]
    if info != 0:
        raise ValueError("numerical breakdown in the OBS updates (an inverse-Hessian block lost positive "
                         "definiteness); use dtype=torch.float64 or increase damp")
    u = torch.linalg.solve_triangular(L, h.T, upper=False).T  # [k, g]
    r = torch.linalg.solve_triangular(L.T, u.T, upper=True).T  # [k, g]
    return u, r


def _greedy_exact(W: Tensor, Hinv: Tensor, g: int, steps: int, record: set[int]) -> tuple[list[int], list[float], dict]:
    """Textbook greedy structured OBS. Returns (order, step errors, {m: Ŵ [out, in] zero at removed})."""
    W, Hinv = W.clone(), Hinv.clone()  # [out, in], [in, in]
    n = W.shape[1] // g
    alive = torch.ones(n, dtype=torch.bool)
    order, errs, snaps = [], [], {}
    for step in range(steps):
        if step in record:
            snaps[step] = W.clone()
        Wg = W.view(-1, n, g).permute(1, 2, 0)  # [n, g, out]
        err = _group_errors(_diag_blocks(Hinv, g), Wg @ Wg.mT)  # [n]
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
    Matrices live on the kept columns only (local indices); ``groups`` maps local → global."""
    Hf, Qf = Hinv.clone(), W.T @ W  # [k, k] each, updated up to the pending factors
    groups = torch.arange(W.shape[1] // g)  # [n_local]
    k = Hf.shape[0]
    # Pending: Hinv = Hf − U Uᵀ,  Q = Qf − V Rᵀ − R Vᵀ  (c columns in use).
    U, V, R = (Hf.new_empty(k, block * g) for _ in range(3))  # [k, block*g]
    hblk, qblk = _diag_blocks(Hf, g), _diag_blocks(Qf, g)  # [n_local, g, g]
    alive = torch.ones(len(groups), dtype=torch.bool)
    c, order = 0, []
    for _ in range(steps):
        err = _group_errors(hblk, qblk)
        err[~alive] = torch.inf
        j = int(torch.argmin(err))
        cols = slice(j * g, (j + 1) * g)
        h = Hf[:, cols] - U[:, :c] @ U[cols, :c].T  # [k, g] current Hinv_:,G
        q = Qf[:, cols] - V[:, :c] @ R[cols, :c].T - R[:, :c] @ V[cols, :c].T  # [k, g] current Q_:,G
        u, r = _obs_step(h, cols)
        v = q - 0.5 * r @ q[cols]  # Q' = Q − q rᵀ − r qᵀ + r Q_GG rᵀ = Q − v rᵀ − r vᵀ
        U[:, c:c + g], V[:, c:c + g], R[:, c:c + g] = u, v, r
        c += g
        ub, vb, rb = (x.view(-1, g, g) for x in (u, v, r))  # [n_local, g, g]
        hblk -= ub @ ub.mT
        qblk -= vb @ rb.mT + rb @ vb.mT
        alive[j] = False
        order.append(int(groups[j]))
        if c == U.shape[1] and len(order) < steps:  # flush the pending updates, drop removed columns
            Hf.addmm_(U, U.T, alpha=-1)
            Qf.addmm_(torch.cat([V, R], 1), torch.cat([R, V], 1).T, alpha=-1)
            keep = alive.repeat_interleave(g).nonzero().squeeze(1)  # [k']
            Hf, Qf = Hf[keep][:, keep], Qf[keep][:, keep]
            groups, k, c = groups[alive], len(keep), 0
            alive = torch.ones(len(groups), dtype=torch.bool)
            U, V, R = U[keep], V[keep], R[keep]
            hblk, qblk = _diag_blocks(Hf, g), _diag_blocks(Qf, g)
    return order


def _closed_form(W: Tensor, Hinv: Tensor, g: int, order: list[int], milestones: list[int]) -> dict:
    """``{m: (Ŵ_K [out, |K|], kept groups, error)}`` for the first ``m`` groups of ``order`` removed."""
    n = W.shape[1] // g
    rc = (torch.tensor(order, dtype=torch.long)[:, None] * g + torch.arange(g)).flatten()  # [M*g] columns
    L = torch.linalg.cholesky(Hinv[rc][:, rc])  # [Mg, Mg]; leading blocks factor every Hinv_RR
    Yt = torch.linalg.solve_triangular(L, W[:, rc].T, upper=False)  # [Mg, out] = L⁻¹ W_Rᵀ
    cum = torch.cat([Yt.new_zeros(1), (Yt**2).sum(1).view(-1, g).sum(1).cumsum(0)])  # [M+1] errors
    out = {}
    for m in milestones:
        kept = torch.ones(n, dtype=torch.bool)
        kept[order[:m]] = False
        kg = kept.nonzero().squeeze(1)  # [n − m]
        kc = (kg[:, None] * g + torch.arange(g)).flatten()  # [(n − m) g]
        mg = m * g
        if mg and len(kc):
            Zt = torch.linalg.solve_triangular(L[:mg, :mg].T, Yt[:mg], upper=True)  # [mg, out] = Hinv_RR⁻¹ W_Rᵀ
            Wk = W[:, kc] - Zt.T @ Hinv[rc[:mg]][:, kc]  # [out, |K|]
        else:
            Wk = W[:, kc]
        out[m] = (Wk, kg, float(cum[m]))
    return out


def prune_groups(weight: Tensor, hessian: Tensor, group_size: int, milestones: Sequence[int], *,
                 damp: float = 0.01, dtype: torch.dtype = torch.float64, mode: str = "exact",
                 block_groups: int = 32) -> list[PruneResult]:
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

    Returns:
        One :class:`PruneResult` per milestone, in the order given. Milestone 0 returns the input
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

    Hinv, dead, used = _inverse(hessian, damp, dtype)  # [in, in]
    W = weight.detach().to(dtype).clone()  # [out, in]
    W[:, dead] = 0
    steps = max(ms, default=0)
    if mode == "exact":
        order, errs, snaps = _greedy_exact(W, Hinv, group_size, steps, set(ms))
        cum = [0.0]
        for e in errs:
            cum.append(cum[-1] + e)
        found = {}
        for m in set(ms):
            kept = torch.ones(n, dtype=torch.bool)
            kept[order[:m]] = False
            kg = kept.nonzero().squeeze(1)
            found[m] = (snaps[m].view(-1, n, group_size)[:, kg].flatten(1), kg, cum[m])
    else:
        order = _greedy_fast(W, Hinv, group_size, steps, block_groups)
        found = _closed_form(W, Hinv, group_size, order, sorted(set(ms)))
    results = []
    for m in ms:
        Wk, kg, err = found[m]
        Wk = weight.detach().clone() if m == 0 else Wk.to(weight.dtype)
        results.append(PruneResult(torch.tensor(order[:m], dtype=torch.long), kg, Wk, float(err), used))
    return results
