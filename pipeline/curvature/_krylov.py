"""What the matrix-free solvers share: the counted matvec, seeded random draws, re-orthogonalisation.

A symmetric operator is known only through ``matvec(v) = A v``; each call is a Hessian-vector product in practice
(the dominant cost), so calls are counted exactly. Internal linear algebra is float64; vectors live on ``device`` and
small projected matrices on the CPU. Random draws come from a seeded CPU generator and are then moved to ``device``,
so results do not depend on the device.
"""

from __future__ import annotations

from typing import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


F64 = torch.float64


# Floor of the breakdown test (Lanczos coupling beta <= this * largest |Ritz value|): with float64 matvecs an
# invariant Krylov space leaves beta ~ 1e-15 relative. Lanczos uses max(tol, floor); SLQ, which has no tol, the floor.
BREAKDOWN = 1e-12


class Counted:
    """Wraps a matvec: counts its calls and checks that it returns a float64 vector of length ``dim``."""

    def __init__(self, matvec: MatVec, dim: int):
        self.matvec, self.dim, self.calls = matvec, dim, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.matvec(v)
        self.calls += 1
        if not isinstance(out, torch.Tensor) or out.shape != (self.dim,) or out.dtype != F64:
            got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"matvec must return a float64 tensor of shape ({self.dim},), got {got}")
        return out


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def gaussian(gen: torch.Generator, dim: int, device: torch.device) -> torch.Tensor:
    return torch.randn(dim, generator=gen, dtype=F64).to(device)


def rademacher(gen: torch.Generator, dim: int, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, (dim,), generator=gen).to(F64) * 2 - 1).to(device)


def orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt against the rows of ``basis``, done twice ("twice is enough", Giraud et al. 2005).

    Returns ``(w - basis^T c, c)`` with ``c`` the summed coefficients of both passes (on the CPU).
    """
    c1 = basis @ w
    w = w - c1 @ basis
    c2 = basis @ w
    return w - c2 @ basis, (c1 + c2).cpu()


def fresh_direction(gen: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
    """A seeded random unit vector orthogonal to the rows of ``basis`` (which must not span the whole space)."""
    while True:
        w, _ = orthogonalise(gaussian(gen, basis.shape[1], basis.device), basis)
        norm = float(w.norm())
        if norm > 1e-8:  # a draw almost inside span(basis) is redrawn rather than amplified
            return w / norm
