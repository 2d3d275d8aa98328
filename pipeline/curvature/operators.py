"""Curvature operators of a network's loss over a fixed probe set: Hessian- and Gauss-Newton-vector products.

The loss is the mean over the *whole* probe set, :math:`L(\\theta) = \\frac1N \\sum_{i=1}^N \\ell(f(x_i;\\theta), y_i)`,
whatever its split into batches: each batch contributes its per-sample *sum* divided by the total ``N``, so batches of
unequal size are weighted exactly (no mean of batch means). The operators act on flat ``float64`` vectors, so the
solvers in :mod:`pipeline.curvature.eigen` see only ``matvec`` and ``dim``.

Parameters are a ``dict[str, Tensor]`` evaluated through ``torch.func.functional_call``; the module is never
mutated. Buffers (BatchNorm statistics) are passed as clones, and a repeatability probe at construction refuses a
model whose forward is not a fixed function of its parameters (training-mode BatchNorm, dropout).

Three Hessian-vector-product implementations, chosen per use by measurement (``benchmarks/hvp.py``):

``reverse_over_reverse``
    Double backward with the gradient graph built once per probe batch and kept: each product is one backward
    through the retained graph of :math:`g^\\top v`. Fastest per product; memory holds the probe set's graph.
``forward_over_reverse``
    ``torch.func.jvp(grad(L), (θ,), (v,))`` per batch, as in the ``torch.func`` tutorials and curvlinops.
``double_backward``
    Gradient graph rebuilt for every product (PyHessian's multi-batch mode): least memory, slowest.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from pipeline.curvature._checks import CurvatureError

# torch's forward-mode decompositions script themselves on first use and warn about torch.jit.script (torch's own
# internals, nothing to act on here); keep the users' logs clean.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

HVP_IMPLEMENTATIONS = ("reverse_over_reverse", "forward_over_reverse", "double_backward")
LOSSES = ("cross_entropy", "mse")
BN_MODE = "eval"  # BatchNorm uses its running statistics; recorded with every result


# --------------------------------------------------------------------------------------------------------------
# Probe set and loss
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSet:
    """A fixed set of samples split into batches (the last may be smaller); the loss is the mean over all of them."""

    batches: tuple[tuple[Tensor, Tensor], ...]

    @classmethod
    def from_tensors(cls, x: Tensor, y: Tensor, batch_size: int) -> "ProbeSet":
        if len(x) != len(y) or len(x) == 0:
            raise CurvatureError(
                f"probe set: need as many targets as inputs (> 0), got {len(x)} inputs, {len(y)} targets"
            )
        if batch_size < 1:
            raise CurvatureError(f"probe set: batch_size must be >= 1, got {batch_size}")
        return cls(tuple(zip(x.split(batch_size), y.split(batch_size))))

    @property
    def size(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ProbeSet":
        return ProbeSet(
            tuple(
                (x.to(device=device, dtype=dtype if x.is_floating_point() else None), y.to(device))
                for x, y in self.batches
            )
        )


def loss_sum(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """Sum over the batch of the per-sample loss.

    ``cross_entropy``: :math:`-\\log \\mathrm{softmax}(f)_y`. ``mse``: :math:`\\lVert f - t \\rVert^2` with ``t`` the
    one-hot target for integer labels (or ``targets`` itself when it is floating point), so for a linear model with
    one output the Hessian of the mean is :math:`2X^\\top X/N`.
    """
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="sum")
    if loss == "mse":
        target = (
            targets.to(outputs.dtype).reshape(outputs.shape)
            if targets.is_floating_point()
            else F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        )
        return ((outputs - target) ** 2).sum()
    raise CurvatureError(f"loss: unknown name {loss!r}; allowed: {', '.join(LOSSES)}")


def output_hessian_product(outputs: Tensor, targets: Tensor, u: Tensor, loss: str) -> Tensor:
    """:math:`\\nabla^2_f \\ell \\, u` per sample (the loss Hessian with respect to the network outputs).

    Cross-entropy: :math:`(\\mathrm{diag}\\,p - p p^\\top) u` with :math:`p = \\mathrm{softmax}(f)`; MSE: :math:`2u`.
    """
    if loss == "cross_entropy":
        p = outputs.softmax(dim=-1)
        return p * u - p * (p * u).sum(dim=-1, keepdim=True)
    if loss == "mse":
        return 2.0 * u
    raise CurvatureError(f"loss: unknown name {loss!r}; allowed: {', '.join(LOSSES)}")


# --------------------------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, level: str = "module") -> dict[str, list[str]]:
    """Trainable parameter names grouped by the module that owns them.

    ``module``: every module with its own parameters (a convolution, a BatchNorm, a linear layer).
    ``block``: the first two levels of the module tree (``conv1``, ``layer1.0``, ``fc``), i.e. a residual block
    with its BatchNorms, or one layer of an MLP (``net.0``).
    """
    if level not in ("module", "block"):
        raise CurvatureError(f"groups: unknown level {level!r}; allowed: module, block")
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else name
        if level == "block":
            owner = ".".join(owner.split(".")[:2])
        groups.setdefault(owner, []).append(name)
    return groups


class EvalBatchNorm(nn.Module):
    r"""BatchNorm in eval mode written as the per-channel affine map it is, for cheap second derivatives.

    :math:`y = x s + (\beta - \mu s)` with :math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}`, the running statistics
    held fixed: the same function as ``nn.BatchNorm*d`` in eval mode (parameter and buffer names unchanged), whose
    double backward is a few multiplications instead of the general training-mode formula (measured on ResNet20:
    ``benchmarks/hvp.py``).
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        if bn.num_batches_tracked is not None:
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = self.weight * scale
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(view) + shift.view(view)


def eval_batchnorm_view(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no BatchNorm in eval mode, else a shallow copy whose eval-mode BatchNorms are
    :class:`EvalBatchNorm` (sharing the same parameter and buffer tensors; the original module is not modified)."""
    if not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats
        for m in model.modules()
    ):
        return model
    import copy

    view = copy.copy(model)
    view._modules = dict(model._modules)
    for name, child in model._modules.items():
        if child is None:
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not child.training and child.track_running_stats:
            view._modules[name] = EvalBatchNorm(child)
        else:
            view._modules[name] = eval_batchnorm_view(child)
    return view


class CurvatureOperator:
    """A symmetric linear operator on the flattened parameters ``wrt`` (``dim`` entries), applied by :meth:`matvec`.

    ``matvec`` takes and returns 1-D ``float64`` tensors; internally the network runs in the parameters' dtype.
    The primitive operations spent so far are counted (:func:`account`): ``products`` (matrix-vector products),
    ``forwards`` and ``gradients`` (passes over the whole probe set; a pass over one batch counts its share), and
    ``samples`` (per-sample gradients).
    """

    kind = "operator"

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        *,
        wrt: Sequence[str] | None = None,
        loss: str = "cross_entropy",
        check: bool = True,
    ):
        if loss not in LOSSES:
            raise CurvatureError(f"loss: unknown name {loss!r}; allowed: {', '.join(LOSSES)}")
        if probe.size == 0:
            raise CurvatureError("probe set is empty")
        self.module = model
        self.model = eval_batchnorm_view(model)  # same function, cheaper second derivatives
        self.loss = loss
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if wrt is None:
            wrt = list(named)
        unknown = [name for name in wrt if name not in named]
        if unknown or not wrt:
            raise CurvatureError(f"wrt: unknown parameter names {unknown or '[]'}; the model has {', '.join(named)}")
        self.names = list(wrt)
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        self.dtype = named[self.names[0]].dtype
        self.device = named[self.names[0]].device
        # Constants: parameters outside `wrt` and all buffers, cloned so that nothing here can touch the module.
        self.fixed = {n: p.detach().clone() for n, p in named.items() if n not in self.names}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.point = {n: named[n].detach().clone() for n in self.names}
        self.probe = probe.to(self.device, self.dtype)
        self.n = self.probe.size
        self.products = 0
        self.forwards = 0.0
        self.gradients = 0.0
        self.samples = 0
        self._gradient: Tensor | None = None
        if check:
            self.check_repeatable()

    # -- flat <-> dict ---------------------------------------------------------------------------------------
    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        if v.shape != (self.dim,):
            raise CurvatureError(f"matvec: expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        return {n: chunk.view(shape) for n, chunk, shape in zip(self.names, v.split(self.numels), self.shapes)}

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names]).to(torch.float64)

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        # Fresh clones of the buffers: even a training-mode BatchNorm could not write into the module's own.
        buffers = {n: b.clone() for n, b in self.buffers.items()}
        return functional_call(self.model, {**self.fixed, **params, **buffers}, (x,))

    def batch_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """This batch's share of the probe-set mean: its loss sum divided by the total sample count N."""
        return loss_sum(self.forward(params, x), y, self.loss) / self.n

    def loss_value(self) -> float:
        self.forwards += 1
        with torch.no_grad():
            return float(sum(self.batch_loss(self.point, x, y) for x, y in self.probe.batches))

    def gradient(self) -> Tensor:
        """Flat gradient of the probe-set loss at the point (counted as a gradient, not a product). Computed once:
        the point never moves, so later calls return a copy of the first result."""
        if self._gradient is None:
            self.gradients += 1
            total = {n: torch.zeros_like(p) for n, p in self.point.items()}
            for x, y in self.probe.batches:
                leaves = {n: p.detach().requires_grad_(True) for n, p in self.point.items()}
                grads = torch.autograd.grad(self.batch_loss(leaves, x, y), list(leaves.values()))
                for n, g in zip(leaves, grads):
                    total[n] += g
            self._gradient = self.flatten(total)
        return self._gradient.clone()

    # -- products --------------------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """The operator applied to the flat vector ``v`` (float64 in, float64 out)."""
        out = self.flatten(self._apply(self.unflatten(v)))
        self.products += 1
        return out

    __call__ = matvec

    def _apply(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def check_repeatable(self) -> None:
        """Refuse a model whose forward is not a fixed function of the parameters.

        Two forward passes of the first probe batch must agree, and a forward must leave the (cloned) buffers as
        they were; training-mode BatchNorm fails the second test (it updates running statistics and normalises by
        batch statistics), dropout fails the first.
        """
        x, _ = self.probe.batches[0]
        self.forwards += 2 * len(x) / self.n
        with torch.no_grad():
            buffers = {n: b.clone() for n, b in self.buffers.items()}
            first = functional_call(self.model, {**self.fixed, **self.point, **buffers}, (x,))
            second = functional_call(self.model, {**self.fixed, **self.point, **buffers}, (x,))
        moved = [n for n, b in buffers.items() if b.is_floating_point() and not torch.equal(b, self.buffers[n])]
        if moved or not torch.equal(first, second):
            culprits = [
                f"{type(m).__name__} '{name}'"
                for name, m in self.module.named_modules()
                if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
            ]
            why = "forward updates buffers " + ", ".join(moved[:3]) if moved else "two forward passes differ"
            raise CurvatureError(
                f"curvature matvec is not repeatable ({why}); modules in training mode: "
                f"{', '.join(culprits[:4]) or 'none found'}; put the model in eval mode (BatchNorm statistics fixed, "
                "no dropout) before computing curvature"
            )


class HessianOperator(CurvatureOperator):
    """Hessian of the probe-set mean loss with respect to the parameters ``wrt``.

    Args:
        model: the network; put it in eval mode first (checked, see :meth:`check_repeatable`).
        probe: the probe set; batches may differ in size (weighted exactly).
        wrt: parameter names spanning the operator (default: all trainable ones); the rest are held fixed, so
            ``wrt`` = one layer's names gives that layer's diagonal block of the full Hessian.
        loss: ``cross_entropy`` or ``mse`` (see :func:`loss_sum`).
        hvp: one of :data:`HVP_IMPLEMENTATIONS`.
    """

    kind = "hessian"

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        *,
        wrt: Sequence[str] | None = None,
        loss: str = "cross_entropy",
        hvp: str = "reverse_over_reverse",
        check: bool = True,
    ):
        if hvp not in HVP_IMPLEMENTATIONS:
            raise CurvatureError(f"hvp: unknown implementation {hvp!r}; allowed: {', '.join(HVP_IMPLEMENTATIONS)}")
        super().__init__(model, probe, wrt=wrt, loss=loss, check=check)
        self.hvp = hvp
        self._graph: tuple[list[Tensor], list[Tensor]] | None = None

    def _retained_graph(self) -> tuple[list[Tensor], list[Tensor]]:
        """Leaves and the gradient of the whole probe loss with its graph, built once (sum of the batches' grads)."""
        if self._graph is None:
            self.gradients += 1  # the gradient with its graph, which every later product backpropagates through
            leaves = [self.point[n].detach().clone().requires_grad_(True) for n in self.names]
            params = dict(zip(self.names, leaves))
            grads = None
            for x, y in self.probe.batches:
                g = torch.autograd.grad(self.batch_loss(params, x, y), leaves, create_graph=True)
                grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
            self._graph = (leaves, grads)
        return self._graph

    def _apply(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        vs = [v[n] for n in self.names]
        if self.hvp == "reverse_over_reverse":
            # H v as the vector-Jacobian product of the gradient with v (H is symmetric): one backward through
            # the retained graph, without building the scalar g^T v first.
            leaves, grads = self._retained_graph()
            return dict(zip(self.names, torch.autograd.grad(grads, leaves, grad_outputs=vs, retain_graph=True)))
        if self.hvp == "double_backward":
            total = [torch.zeros_like(u) for u in vs]
            for x, y in self.probe.batches:
                leaves = [self.point[n].detach().clone().requires_grad_(True) for n in self.names]
                g = torch.autograd.grad(self.batch_loss(dict(zip(self.names, leaves)), x, y), leaves, create_graph=True)
                hv = torch.autograd.grad(sum((a * u).sum() for a, u in zip(g, vs)), leaves)
                total = [t + h for t, h in zip(total, hv)]
            return dict(zip(self.names, total))
        # forward_over_reverse: jvp of the gradient, per batch.
        total = {n: torch.zeros_like(v[n]) for n in self.names}
        for x, y in self.probe.batches:
            grad_fn = torch.func.grad(lambda p: self.batch_loss(p, x, y))
            _, hv = jvp(grad_fn, (self.point,), (v,))
            for n in self.names:
                total[n] += hv[n]
        return total


class GGNOperator(CurvatureOperator):
    """Generalised Gauss-Newton matrix :math:`G = \\frac1N \\sum_i J_i^\\top \\nabla^2_f \\ell_i \\, J_i`
    (positive semi-definite).

    ``J_i`` is the Jacobian of the network output for sample ``i`` with respect to the parameters ``wrt``. Each
    product: :math:`J v` by forward mode (``torch.func.jvp``), the loss Hessian in closed form, and :math:`J^\\top`
    by a backward through the forward graph kept per batch.
    """

    kind = "ggn"

    def __init__(
        self,
        model: nn.Module,
        probe: ProbeSet,
        *,
        wrt: Sequence[str] | None = None,
        loss: str = "cross_entropy",
        check: bool = True,
    ):
        super().__init__(model, probe, wrt=wrt, loss=loss, check=check)
        self._graphs: list[tuple[list[Tensor], Tensor]] | None = None

    def _forward_graphs(self) -> list[tuple[list[Tensor], Tensor]]:
        if self._graphs is None:
            self.forwards += 1  # the forward graphs every later product backpropagates through
            self._graphs = []
            for x, _ in self.probe.batches:
                leaves = [self.point[n].detach().clone().requires_grad_(True) for n in self.names]
                self._graphs.append((leaves, self.forward(dict(zip(self.names, leaves)), x)))
        return self._graphs

    def _apply(self, v: dict[str, Tensor]) -> dict[str, Tensor]:
        total = [torch.zeros_like(v[n]) for n in self.names]
        for (x, y), (leaves, outputs) in zip(self.probe.batches, self._forward_graphs()):
            _, jv = jvp(lambda p: self.forward(p, x), (self.point,), (v,))
            w = output_hessian_product(outputs.detach(), y, jv, self.loss) / self.n
            jtw = torch.autograd.grad(outputs, leaves, grad_outputs=w, retain_graph=True)
            total = [t + g for t, g in zip(total, jtw)]
        return dict(zip(self.names, total))


OPERATORS: dict[str, Callable[..., CurvatureOperator]] = {"hessian": HessianOperator, "ggn": GGNOperator}

ACCOUNT = ("forwards", "gradients", "hvps", "samples")  # the primitive operations every analysis records


def account(op: CurvatureOperator) -> dict[str, float]:
    """The primitive operations ``op`` has spent so far, by :data:`ACCOUNT` name: forwards and gradients in passes
    over the whole probe set, curvature-vector products, per-sample gradients. An analysis records the difference
    of two accounts beside its wall time, so ``benchmarks/efficiency.py`` can price it at the measured unit costs."""
    return {"forwards": op.forwards, "gradients": op.gradients, "hvps": op.products, "samples": op.samples}


def spent(op: CurvatureOperator, before: Mapping[str, float]) -> dict[str, float]:
    """What ``op`` spent since ``before`` (an earlier :func:`account`)."""
    return {k: v - before[k] for k, v in account(op).items()}


def dense_matrix(op: CurvatureOperator) -> Tensor:
    """The operator as a dense ``(dim, dim)`` float64 matrix, one product per column (tests, tiny models only)."""
    if op.dim > 5000:
        raise CurvatureError(f"dense_matrix: dim {op.dim} is too large (> 5000) for a dense matrix")
    eye = torch.eye(op.dim, dtype=torch.float64)
    return torch.stack([op.matvec(e) for e in eye], dim=1)


def relative_difference(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), math.ulp(1.0)))
