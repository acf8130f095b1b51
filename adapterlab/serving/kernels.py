"""Fast multi-adapter deltas for a batch whose rows each name their own adapter.

Every function here is pure tensor math over a batch ``x [B, T, d_in]`` (B requests, T tokens each)
and an adapter index per row; none loops over tokens or rows. They are tested against the plain loop
in :mod:`adapterlab.serving.layer` (its ``Semantics:`` block is the definition).

* :func:`plan_rows` groups the rows of a batch by adapter once per batch (shared by every layer).
* :func:`lora_delta` — grouped LoRA: the rows of each distinct adapter are packed into one padded
  segment and the whole batch runs as two batched matmuls over the distinct adapters (``grouped``),
  or, when padding would waste more than it saves, every row gathers its own factors (``gather``).
* :func:`shared_basis_delta` — Compress-then-Serve: one shared GEMM ``x Vᵀ``, the per-row core
  (gathered ``c×c`` bmm, or an element-wise scale for diagonal cores), one shared GEMM with ``Uᵀ``.
* :func:`sparse_delta` — a SHiRA (sparse) delta applied without densifying it.

Reference: Brüel-Gabrielsson et al., "Compress then Serve", https://arxiv.org/abs/2407.00066;
Chen et al., "Punica: Multi-Tenant LoRA Serving", https://arxiv.org/abs/2310.18547.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BundlePlan",
    "RowPlan",
    "lora_delta",
    "plan_bundle",
    "plan_rows",
    "shared_basis_apply",
    "shared_basis_delta",
    "sparse_delta",
]

#: ``auto`` picks the grouped path while its data movement ``G (r + m T)`` stays within this factor of
#: the per-row gather's ``B (r + T)`` (G distinct adapters, m rows in the largest group, T tokens).
MAX_PAD_WASTE = 1.0


@dataclass(frozen=True)
class RowPlan:
    """How the rows of one batch map onto adapter slots (computed once per batch).

    Attributes:
        slots: ``[B]`` slot of each row; ``null`` for rows without an adapter of this kind.
        null: the slot value meaning "no adapter" (the bank keeps an all-zero slot there).
        uniq: ``[G]`` distinct non-null slots present in the batch.
        index: ``[G, m]`` row numbers of each group, padded with ``B`` (a zero pad row).
        place: ``[B]`` flat position ``g * m + j`` of each row in the grouped output, ``G * m`` for null rows.
        identity: True when every row uses the same slot (no packing needed).
        mode: ``"grouped"`` (padded segments), ``"gather"`` (per-row factors) or ``"auto"`` (chosen per
            call from the rank and the number of tokens).
        first: the first distinct slot as a Python int (no device sync in the layers).
    """

    slots: Tensor
    null: int
    uniq: Tensor
    index: Tensor
    place: Tensor
    identity: bool
    mode: str
    first: int = -1

    @property
    def empty(self) -> bool:
        return self.uniq.numel() == 0


def plan_rows(slots: Tensor, null: int, *, mode: str = "auto") -> RowPlan:
    """Group the rows of a batch by slot (tensor ops only).

    Args:
        slots: ``[B]`` long, the adapter slot of each row (``null`` = no adapter).
        null: the "no adapter" slot value.
        mode: ``"auto"`` | ``"grouped"`` | ``"gather"``.
    """
    if mode not in ("auto", "grouped", "gather"):
        raise ValueError(f"plan mode {mode!r} is not one of auto, grouped, gather")
    slots = slots.long()
    B = slots.numel()
    active = slots != null
    uniq, inverse, counts = torch.unique(slots[active], return_inverse=True, return_counts=True)
    G = uniq.numel()
    m = int(counts.max()) if G else 0
    n_active = int(active.sum())
    identity = G == 1 and n_active == B
    # row order grouped by slot; position of each active row inside its group
    group_of_row = torch.full((B,), G, dtype=torch.long, device=slots.device)
    group_of_row[active] = inverse
    order = torch.argsort(group_of_row, stable=True)  # active rows grouped, null rows last
    starts = torch.zeros(G + 1, dtype=torch.long, device=slots.device)
    starts[1:] = torch.cumsum(counts, 0)
    sorted_groups = group_of_row[order]
    pos_sorted = torch.arange(B, device=slots.device) - starts[sorted_groups.clamp(max=G)]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    place = torch.where(active, group_of_row * m + pos, torch.full_like(pos, G * m))
    index = torch.full((G * m + 1,), B, dtype=torch.long, device=slots.device)
    index[place] = torch.arange(B, device=slots.device)  # null rows all land on the trailing cell
    index = index[: G * m].view(G, m)  # [G * m] -> [G, m]
    if identity:
        mode = "grouped"
    return RowPlan(slots, null, uniq, index, place, identity, mode, int(uniq[0]) if G else -1)


def lora_delta(x: Tensor, A: Tensor, Bf: Tensor, plan: RowPlan) -> Tensor | None:
    """Per-row LoRA delta ``Δy_b = (x_b A_sᵀ) B_sᵀ`` with ``s = plan.slots[b]``.

    Args:
        x: ``[B, T, d_in]``.
        A: ``[S + 1, r, d_in]`` stacked down-projections (slot ``S`` all zeros).
        Bf: ``[S + 1, d_out, r]`` stacked up-projections, LoRA scale folded in.
        plan: from :func:`plan_rows`.

    Returns:
        ``[B, T, d_out]``, or None when no row uses a LoRA.
    """
    if plan.empty:
        return None
    Bsz, T, d_in = x.shape
    d_out = Bf.shape[1]
    if plan.identity:  # one adapter for the whole batch: two plain GEMMs
        s = plan.first
        return (x @ A[s].T) @ Bf[s].T  # [B, T, d_in] -> [B, T, r] -> [B, T, d_out]
    G, m = plan.index.shape
    mode = plan.mode
    if mode == "auto":  # bytes moved: grouped gathers G factor sets + padded rows, gather B factor sets
        r = A.shape[1]
        mode = "grouped" if G * (r + m * T) <= MAX_PAD_WASTE * Bsz * (r + T) else "gather"
    if mode == "gather":
        z = torch.bmm(x, A[plan.slots].transpose(1, 2))  # [B, T, d_in] x [B, d_in, r] -> [B, T, r]
        return torch.bmm(z, Bf[plan.slots].transpose(1, 2))  # [B, T, r] x [B, r, d_out] -> [B, T, d_out]
    xp = torch.cat([x, x.new_zeros(1, T, d_in)])  # [B + 1, T, d_in] (row B = zero pad)
    xg = xp[plan.index].reshape(G, m * T, d_in)  # [G, m, T, d_in] -> [G, m*T, d_in]
    z = torch.bmm(xg, A[plan.uniq].transpose(1, 2))  # [G, m*T, r]
    d = torch.bmm(z, Bf[plan.uniq].transpose(1, 2))  # [G, m*T, d_out]
    d = torch.cat([d.reshape(G * m, T, d_out), d.new_zeros(1, T, d_out)])  # [G*m + 1, T, d_out]
    return d[plan.place]  # [B, T, d_out]


@dataclass(frozen=True)
class BundlePlan:
    """Which rows of a batch use a shared-basis bundle, computed once per batch.

    Attributes:
        sub: ``[B']`` the batch rows using the bundle, or None when every row does.
        parts: per cluster present ``(g, sel, idx)``: ``sel`` selects its rows among the ``B'``
            (None = all of them), ``idx`` is their adapter index in the bundle.
        rows: the batch size B.
    """

    sub: Tensor | None
    parts: list[tuple[int, Tensor | None, Tensor]]
    rows: int


def plan_bundle(rows: Tensor, group: Tensor) -> BundlePlan | None:
    """Plan :func:`shared_basis_delta` for ``rows [B]`` (adapter index per row, -1 = not this bundle)."""
    rows_cpu = rows.detach().to("cpu", torch.long)
    group_cpu = group.detach().to("cpu", torch.long)
    active = rows_cpu >= 0
    if not bool(active.any()):
        return None
    dev = rows.device
    every = bool(active.all())
    sub = None if every else torch.nonzero(active).squeeze(1)
    idx = rows_cpu if sub is None else rows_cpu[sub]
    g_of = group_cpu[idx]
    present = torch.unique(g_of).tolist()
    parts: list[tuple[int, Tensor | None, Tensor]] = []
    for g in present:  # one entry per cluster present (1 without clustering)
        sel = None if len(present) == 1 else torch.nonzero(g_of == g).squeeze(1)
        parts.append((int(g), None if sel is None else sel.to(dev), (idx if sel is None else idx[sel]).to(dev)))
    return BundlePlan(None if sub is None else sub.to(dev), parts, int(rows_cpu.numel()))


def shared_basis_apply(x: Tensor, U: Tensor, V: Tensor, cores: Tensor, plan: BundlePlan) -> Tensor:
    """:func:`shared_basis_delta` with a precomputed :class:`BundlePlan` (no host syncs)."""
    full = cores.dim() == 3
    xs = x if plan.sub is None else x[plan.sub]  # [B', T, d_in]
    out: Tensor | None = None
    for g, sel, idx in plan.parts:
        xg = xs if sel is None else xs[sel]
        z = xg @ V[g].T  # shared GEMM: [b, T, d_in] -> [b, T, c]
        if full:
            z = torch.bmm(z, cores[idx].transpose(1, 2))  # [b, T, c] x [b, c, c] -> [b, T, c]
        else:
            z = z * cores[idx][:, None, :]  # [b, T, c] * [b, 1, c]
        d = z @ U[g].T  # shared GEMM: [b, T, c] -> [b, T, d_out]
        if sel is None and plan.sub is None:
            return d
        if out is None:
            out = x.new_zeros(x.shape[0], x.shape[1], U.shape[1])
        target = torch.arange(x.shape[0], device=x.device) if plan.sub is None else plan.sub
        out.index_copy_(0, target if sel is None else target[sel], d)
    assert out is not None
    return out


def shared_basis_delta(x: Tensor, U: Tensor, V: Tensor, cores: Tensor, group: Tensor, rows: Tensor) -> Tensor | None:
    """Per-row shared-basis delta ``Δy_b = x_b V_gᵀ Σ_iᵀ U_gᵀ`` with ``i = rows[b]``, ``g = group[i]``.

    Args:
        x: ``[B, T, d_in]``.
        U: ``[G, d_out, c]``; V: ``[G, c, d_in]`` shared bases per cluster.
        cores: ``[n, c, c]`` (full) or ``[n, c]`` (diagonal), scales folded in.
        group: ``[n]`` cluster of each adapter.
        rows: ``[B]`` adapter index of each row in this bundle, ``-1`` for rows not using it.

    Returns:
        ``[B, T, d_out]`` (zero for rows with ``-1``), or None when no row uses the bundle.
    """
    plan = plan_bundle(rows, group)
    return None if plan is None else shared_basis_apply(x, U, V, cores, plan)


def sparse_delta(x: Tensor, rows_idx: Tensor, cols_idx: Tensor, values: Tensor, d_out: int) -> Tensor:
    """``x Sᵀ`` for a sparse ``S [d_out, d_in]`` given as COO ``(rows_idx, cols_idx, values)``.

    ``x [..., d_in] -> [..., d_out]``; memory ``O(N·K)``, never a dense ``S``.
    """
    contrib = x[..., cols_idx] * values  # [..., K]
    out = x.new_zeros(*x.shape[:-1], d_out)
    out.index_add_(-1, rows_idx, contrib)  # scatter-add each entry into its output column
    return out
