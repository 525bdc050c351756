"""Joint sparse recovery by rank-aware order-recursive matching pursuit (RA-ORMP).

A weight gradient with fewer rows than inputs (a LoRA adapter's ``A`` gradient ``[r, d]``) no longer spans
each input: every row is a mix ``T = C X`` of the ``k`` inputs ``X [k, d]``, ``k > r``. The inputs are still
determined when they come from a known set of candidate *atoms* (vocabulary rows, or the hidden states of
candidate prefixes): ``T``'s rows lie in the span of exactly those atoms, and for atoms in general position
no other set of at most ``(spark + rank(T) − 1) / 2`` atoms spans them (Davies & Eldar 2012, Thm. 1). Finding
that set is joint sparse recovery from multiple measurement vectors (Cotter, Rao, Engan, Kreutz-Delgado
2005). The greedy solver here is *rank-aware* ORMP (Davies & Eldar, "Rank Awareness in Joint Sparse Recovery",
IEEE Trans. Inf. Theory 58(2), 2012, §V): each pick maximises ``‖Uᵀ a‖ / ‖P⊥ a‖``, with ``U`` an orthonormal
basis of the current residual's row space and ``P⊥`` the projection away from the atoms already picked.

:class:`Pursuit` keeps the state so the dictionary may grow between picks (the decoder assembly adds the
extensions of every prefix it picks); :class:`SharedPursuit` solves several such problems with one support
(one batch position seen through several layers); :func:`joint_support` is the functional form over a fixed
dictionary; :func:`prune_support` drops picks the final fit does not need (backward elimination).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from leak_audit.attacks.budget import late

__all__ = ["Pursuit", "SharedPursuit", "joint_support", "prune_support", "relative_residual"]


def relative_residual(targets: Tensor, atoms: Tensor) -> float:
    """``‖T − T P‖ / ‖T‖``, ``P`` the projection onto the span of ``atoms`` ``[s, d]`` (``targets`` ``[k, d]``)."""
    t = targets.to(torch.float64)
    norm = float(torch.linalg.matrix_norm(t))
    if norm == 0.0:
        return 0.0
    if atoms.shape[0] == 0:
        return 1.0
    q, _ = torch.linalg.qr(atoms.to(torch.float64).T)  # [d, s]
    return float(torch.linalg.matrix_norm(t - (t @ q) @ q.T)) / norm


class Pursuit:
    """Incremental RA-ORMP: targets ``[k, d]`` explained by atoms picked one at a time from a dictionary that
    may grow between picks.

    Args:
        targets: ``[k, d]`` rows to explain (any float dtype; kept in float64).
        rtol: singular values of the residual below ``rtol`` times its largest span no direction of ``U``.
        degenerate: an atom whose part outside the picked span is below this fraction of its norm is already
            explained (a repeat): it is never picked. Atoms are scored in float32, so their projections carry
            about ``1e-7`` relative error: below ``1e-3`` the part outside is round-off.

    Attributes:
        picked: indices of the picked atoms, in pick order.
    """

    def __init__(self, targets: Tensor, rtol: float = 1e-6, degenerate: float = 1e-3) -> None:
        self.targets = targets.to(torch.float64)
        self.device = self.targets.device
        self.norm = float(torch.linalg.matrix_norm(self.targets))
        self.rtol = rtol
        self.degenerate = degenerate
        d = self.targets.shape[1]
        self.basis = torch.zeros(d, 0, dtype=torch.float64, device=self.device)  # orthonormal, picked span
        # the dictionary grows in place: buffers of doubling capacity, the first `_n` rows in use (growing by
        # concatenation copied the whole dictionary at every extension: 18 of the 99 s of a 427-pick pursuit)
        self._n = 0
        self._atoms = torch.zeros(0, d, dtype=torch.float32, device=self.device)
        self._rest = torch.zeros(0, dtype=torch.float64, device=self.device)  # ‖P⊥ a‖² per atom
        self._full = torch.zeros(0, dtype=torch.float64, device=self.device)  # ‖a‖² per atom
        self.picked: list[int] = []

    @property
    def atoms(self) -> Tensor:
        """The dictionary ``[n, d]`` (float32), in the order the atoms were added."""
        return self._atoms[: self._n]

    @property
    def rest(self) -> Tensor:
        """``‖P⊥ a‖²`` per atom ``[n]`` (float64): each atom's part outside the picked span."""
        return self._rest[: self._n]

    @property
    def full(self) -> Tensor:
        """``‖a‖²`` per atom ``[n]`` (float64)."""
        return self._full[: self._n]

    def extend(self, atoms: Tensor) -> None:
        """Append ``atoms`` ``[m, d]`` to the dictionary (their indices follow the earlier ones)."""
        a = atoms.to(device=self.device, dtype=torch.float32)
        full = a.to(torch.float64).pow(2).sum(1)
        inside = (a.to(torch.float64) @ self.basis).pow(2).sum(1) if self.basis.shape[1] else torch.zeros_like(full)
        n, m = self._n, a.shape[0]
        if n + m > self._atoms.shape[0]:
            size = max(n + m, 2 * self._atoms.shape[0])
            self._atoms = torch.cat([self.atoms, self._atoms.new_empty(size - n, a.shape[1])])
            self._full = torch.cat([self.full, self._full.new_empty(size - n)])
            self._rest = torch.cat([self.rest, self._rest.new_empty(size - n)])
        self._atoms[n:n + m] = a
        self._full[n:n + m] = full
        self._rest[n:n + m] = (full - inside).clamp_min(0.0)
        self._n = n + m

    def residual(self) -> float:
        """The targets' relative residual outside the picked span (``1.0`` before any pick, ``0.0`` for zero
        targets)."""
        if self.norm == 0.0:
            return 0.0
        t = self.targets
        return float(torch.linalg.matrix_norm(t - (t @ self.basis) @ self.basis.T)) / self.norm

    def scores(self) -> Tensor:
        """Each atom's RA-ORMP score ``‖Uᵀ a‖² / ‖P⊥ a‖²`` in ``[0, 1]`` (``[n]``, float64); ``-1`` for picked and
        degenerate atoms, ``0`` everywhere once the residual is zero."""
        score = torch.zeros(self.atoms.shape[0], dtype=torch.float64, device=self.device)
        if self.norm == 0.0 or self.atoms.shape[0] == 0:
            return score
        t = self.targets
        resid = t - (t @ self.basis) @ self.basis.T
        u, s, _ = torch.linalg.svd(resid.T, full_matrices=False)  # [d, k]
        if s.numel() and float(s[0]) > 0.0:
            u = u[:, s > self.rtol * s[0]].to(torch.float32)
            score = (self.atoms @ u).to(torch.float64).pow(2).sum(1) / self.rest.clamp_min(1e-300)
        score[self.rest <= self.degenerate**2 * self.full] = -1.0
        if self.picked:
            score[torch.tensor(self.picked, device=self.device)] = -1.0
        return score

    def take(self, index: int) -> None:
        """Pick atom ``index``: its part outside the picked span joins the basis."""
        a = self.atoms[index].to(torch.float64)
        a = a - self.basis @ (self.basis.T @ a)
        a = a - self.basis @ (self.basis.T @ a)  # twice: Gram-Schmidt keeps the basis orthonormal in float64
        norm = torch.linalg.vector_norm(a)
        if float(norm) > 0.0:
            q = a / norm
            self.basis = torch.cat([self.basis, q[:, None]], 1)
            drop = (self.atoms @ q.to(torch.float32)).to(torch.float64).pow(2)
            self._rest[: self._n] = (self.rest - drop).clamp_min(0.0)
        self.picked.append(index)

    def step(self) -> int | None:
        """Pick the atom that best explains the residual's row space; ``None`` when no atom is left (or the
        residual is zero)."""
        score = self.scores()
        if score.numel() == 0:
            return None
        best = int(score.argmax())
        if float(score[best]) <= 0.0:
            return None
        self.take(best)
        return best


class SharedPursuit:
    """Several RA-ORMP problems with one support: atom ``i`` of every block stands for the same unknown (one
    position of the batch, seen through several layers' gradients). A pick maximises the sum of the blocks'
    scores and is taken in every block; the residual is the largest block's.

    Args:
        targets: one ``[k_l, d_l]`` per block.
        rtol, degenerate: as for :class:`Pursuit`.
    """

    def __init__(self, targets: Sequence[Tensor], rtol: float = 1e-6, degenerate: float = 1e-3) -> None:
        if not targets:
            raise ValueError("SharedPursuit needs at least one block of targets")
        self.blocks = [Pursuit(t, rtol, degenerate) for t in targets]

    @property
    def picked(self) -> list[int]:
        return self.blocks[0].picked

    def extend(self, atoms: Sequence[Tensor]) -> None:
        """Append one ``[m, d_l]`` per block (the same ``m`` unknowns)."""
        if len(atoms) != len(self.blocks):
            raise ValueError(f"got atoms for {len(atoms)} blocks, the pursuit has {len(self.blocks)}")
        for block, a in zip(self.blocks, atoms, strict=True):
            block.extend(a)

    def residual(self) -> float:
        return max(block.residual() for block in self.blocks)

    def step(self) -> int | None:
        score = torch.stack([block.scores() for block in self.blocks])  # [blocks, n]
        score = torch.where((score < 0).any(0), torch.full_like(score[0], -1.0), score.sum(0))
        if score.numel() == 0:
            return None
        best = int(score.argmax())
        if float(score[best]) <= 0.0:
            return None
        for block in self.blocks:
            block.take(best)
        return best


def joint_support(
    targets: Tensor,
    atoms: Tensor,
    tol: float = 1e-6,
    max_atoms: int | None = None,
    deadline: float | None = None,
    patience: int | None = None,
) -> tuple[list[int], float, bool]:
    """The few atoms whose span holds every row of ``targets`` (RA-ORMP over a fixed dictionary).

    Args:
        targets: ``[k, d]`` (e.g. the stacked ``lora_A`` gradients of layer 0, ``k = 2r``).
        atoms: ``[n, d]`` candidate atoms (e.g. every vocabulary row's layer-0 input).
        tol: stop once the relative residual is below it (float32 gradients: round-off near ``1e-7``).
        max_atoms: at most this many picks (default: ``d − 1``).
        deadline: ``time.monotonic()`` value after which the picks stop.
        patience: stop once this many picks in a row left the residual above 0.9 of what it was (noisy targets:
            the picks have reached the noise floor); ``None``: no such stop.

    Returns:
        ``(picked, residual, cut)``: atom indices in pick order, the final relative residual, and whether the
        deadline stopped the picks.
    """
    d = targets.shape[1]
    limit = d - 1 if max_atoms is None else min(max_atoms, d - 1)
    state = Pursuit(targets)
    state.extend(atoms)
    res = state.residual()
    mark, since = res, 0
    while res > tol and len(state.picked) < limit:
        if late(deadline):
            return state.picked, res, True
        if state.step() is None:
            break
        res = state.residual()
        if res < 0.9 * mark:
            mark, since = res, 0
        else:
            since += 1
            if patience is not None and since >= patience:
                break
    return state.picked, res, False


def prune_support(
    targets: Tensor | Sequence[Tensor], atoms: Tensor | Sequence[Tensor], slack: float = 2.0, tol: float = 1e-6
) -> list[int]:
    """Backward elimination: drop, last picked first, every atom without which the fit stays as good.

    An atom is dropped when the relative residual without it stays below ``max(slack · r₀, tol)``, ``r₀`` the
    residual with every atom (greedy picks made before the right atoms were in reach explain nothing at the end).
    With several blocks (:class:`SharedPursuit`) the residual is the largest block's.

    Args:
        targets: ``[k, d]``, or one ``[k_l, d_l]`` per block.
        atoms: ``[s, d]`` the picked atoms in pick order, or one ``[s, d_l]`` per block.

    Returns:
        The indices (into ``atoms``) kept, ascending.
    """
    blocks = list(zip([targets] if isinstance(targets, Tensor) else targets,
                      [atoms] if isinstance(atoms, Tensor) else atoms, strict=True))

    def residual(index: list[int]) -> float:
        return max(relative_residual(t, a[index]) for t, a in blocks)

    keep = list(range(blocks[0][1].shape[0]))
    bound = max(slack * residual(keep), tol)
    for j in reversed(range(len(keep))):
        rest = [i for i in keep if i != j]
        if residual(rest) <= bound:
            keep = rest
    return keep
