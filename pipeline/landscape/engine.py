"""The grid engine: loss and accuracy of a network at many points :math:`\\theta_0 + \\sum_j c_j d_j` of weight space.

Every point is a pure function evaluation, ``torch.func.functional_call(model, {**params, **buffers}, (x,))``, on
an eval-mode view of the model (BatchNorm on its running statistics, no dropout); the module and its tensors are
never written. The loss of a point is the mean over the whole probe set, :math:`\\frac1N \\sum_i \\ell_i`, whatever
the split into batches (each batch adds its per-sample *sum*; the total is divided by ``N`` once).

Points are evaluated ``chunk`` at a time: ``chunk == 1`` is a plain loop of forward passes, ``chunk > 1`` stacks
the chunk's parameter sets and runs one ``torch.func.vmap``-ed forward pass, which turns each layer into one batched
matrix product or grouped convolution. A plain chain of linear layers (the MLP) gets an explicit batched forward
instead, whose first layer is computed once per batch for all points (:class:`_LinearChain`): on a CPU the MLP's
forward is bound by its matrix products, so saving products is what speeds it up, not batching alone.
:func:`choose_chunk` measures which chunk size is fastest for a model on a device, :func:`choose_layout` whether
convolutions run faster channels-last. :func:`sequential_shift_loop` is the in-place baseline of the
``loss-landscape`` and ``loss-landscapes`` packages, kept for benchmarks.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from pipeline.curvature.operators import LOSSES, eval_batchnorm_view, loss_sum
from pipeline.training.models import MLP

# Decisions of choose_chunk, keyed by (architecture structure, device, dtype, input shape, batch size, candidates,
# engine): measured once per process.
CHUNK_CACHE: dict[tuple, int] = {}
# Decisions of choose_layout (channels-last or not), keyed by (architecture structure, device, dtype, input shape,
# batch size).
LAYOUT_CACHE: dict[tuple, bool] = {}

DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32)
ENGINES = ("auto", "vmap")


# --------------------------------------------------------------------------------------------------------------
# Eval-mode view and argument checks
# --------------------------------------------------------------------------------------------------------------


def _eval_copy(module: nn.Module) -> nn.Module:
    """Shallow copy of the module tree with ``training = False`` everywhere; parameters and buffers are the same
    tensors, but held in fresh dicts so that ``functional_call`` swapping them never touches the original."""
    view = copy.copy(module)
    view._parameters = dict(module._parameters)
    view._buffers = dict(module._buffers)
    view._modules = {name: None if child is None else _eval_copy(child) for name, child in module._modules.items()}
    view.training = False
    return view


def evaluation_view(model: nn.Module, *, affine_batchnorm: bool = False) -> nn.Module:
    """The function the landscape evaluates: ``model`` in eval mode (BatchNorm on its running statistics, no
    dropout). The original module, including its ``training`` flags, is left as it is.

    BatchNorm stays ``nn.BatchNorm*d`` by default: for forward passes alone its fused eval-mode kernel was measured
    faster than :class:`pipeline.curvature.operators.EvalBatchNorm` (ResNet20 on the digits probe set, CPU: 44 vs
    51 ms per point), and ``vmap`` handles it, running statistics batched or not. ``affine_batchnorm=True`` gives
    the EvalBatchNorm form instead (the same function, cheaper second derivatives).
    """
    view = _eval_copy(model)
    return eval_batchnorm_view(view) if affine_batchnorm else view


def _check_directions(base: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]], what: str) -> None:
    for j, d in enumerate(directions):
        for name, t in d.items():
            if name not in base:
                raise ValueError(
                    f"{what}[{j}]: unknown name {name!r}; allowed: the names of the "
                    f"{'buffers' if what.startswith('buffer') else 'parameters'} ({len(base)} of them)"
                )
            if t.shape != base[name].shape:
                raise ValueError(
                    f"{what}[{j}][{name!r}]: shape {tuple(t.shape)} differs from {tuple(base[name].shape)}"
                )


def _check_common(coords: Tensor, n_directions: int, x: Tensor, y: Tensor, batch_size: int, loss: str) -> None:
    if coords.dim() != 2 or coords.shape[1] != n_directions:
        raise ValueError(
            f"coords: expected shape (P, {n_directions}) for {n_directions} directions, got {tuple(coords.shape)}"
        )
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x, y: need as many targets as inputs (> 0), got {len(x)} inputs, {len(y)} targets")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if loss not in LOSSES:
        raise ValueError(f"loss: unknown name {loss!r}; allowed: {', '.join(LOSSES)}")


class _Points:
    """:math:`\\theta_0` and the directions flattened once, so that a chunk of points costs a few vector operations.

    :meth:`at` returns ``{name: (n, *shape)}``, :math:`\\theta_0 + \\sum_j c_{:,j} d_j` for every name some direction
    moves (views into one ``(n, D)`` block per dtype and device). The same elementwise expression serves every chunk
    size, so the loop and the batched engines evaluate bitwise identical weights.
    """

    def __init__(self, base: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]]):
        names = list(dict.fromkeys(name for d in directions for name in d))
        by_kind: dict[tuple, list[str]] = {}
        for name in names:
            by_kind.setdefault((base[name].dtype, base[name].device), []).append(name)
        self.groups = []
        for (dtype, device), group in by_kind.items():
            sizes = [base[n].numel() for n in group]
            flat = torch.cat([base[n].detach().reshape(-1) for n in group])
            stacked = torch.zeros(len(directions), flat.numel(), dtype=dtype, device=device)
            for j, d in enumerate(directions):
                for n, part in zip(group, stacked[j].split(sizes)):
                    if n in d:
                        part.copy_(d[n].detach().reshape(-1))
            self.groups.append((group, [base[n].shape for n in group], sizes, flat, stacked))

    def at(self, coords: Tensor) -> dict[str, Tensor]:
        n = coords.shape[0]
        out: dict[str, Tensor] = {}
        for group, shapes, sizes, flat, stacked in self.groups:
            c = coords.to(device=flat.device, dtype=flat.dtype)
            total = flat.expand(n, flat.numel())
            for j in range(stacked.shape[0]):
                # one fused pass per direction (mul + add would be two over the whole parameter vector)
                total = (
                    torch.addcmul(total, c[:, j : j + 1], stacked[j])
                    if j == 0
                    else total.addcmul_(c[:, j : j + 1], stacked[j])
                )
            for name, shape, part in zip(group, shapes, total.split(sizes, dim=1)):
                out[name] = part.view((n,) + tuple(shape))
        return out


def _point_loss_sums(outputs: Tensor, y: Tensor, loss: str) -> Tensor:
    """``(n,)`` float64: for each of ``n`` points, :func:`loss_sum` over the batch of its outputs ``(n, B, classes)``.

    The network runs in its own dtype; the loss of its outputs is computed in float64, so it is exact to float64
    rounding of *those* outputs at every scale. In float32, cross-entropy as :math:`\\log \\sum_k e^{f_k} - f_y`
    cancels catastrophically for a well-fit sample (the two terms agree to the loss's size): on the digits MLP at
    loss 1.5e-3 it was 6.7e-5 off float64 (``F.cross_entropy``, 7.5e-6). The outputs are ``classes`` numbers per
    sample and point, so the float64 arithmetic costs nothing beside the forward pass. Cross-entropy as
    :math:`\\sum_i (\\log \\sum_k e^{f_{ik}} - f_{i y_i})` on the whole stack at once.
    """
    outputs = outputs.to(torch.float64)
    if loss == "cross_entropy":
        picked = outputs.gather(-1, y.view(1, -1, 1).expand(outputs.shape[0], -1, 1)).squeeze(-1)
        return (torch.logsumexp(outputs, dim=-1) - picked).sum(dim=-1)
    y = y.to(torch.float64) if y.is_floating_point() else y
    return vmap(lambda o: loss_sum(o, y, loss))(outputs)


def _targets_correct(outputs: Tensor, y: Tensor) -> Tensor:
    """Number of correct predictions per point, ``outputs`` ``(n, B, classes)``; NaN for regression (floating)
    targets."""
    if y.is_floating_point():
        return torch.full(outputs.shape[:1], math.nan, dtype=torch.float64, device=outputs.device)
    return (outputs.argmax(dim=-1) == y).sum(dim=-1).to(torch.float64)


# --------------------------------------------------------------------------------------------------------------
# Linear chains (the MLP): an explicit batched forward with the first layer done once per batch
# --------------------------------------------------------------------------------------------------------------

# Parameter-free layers that act elementwise, so they apply unchanged to a tensor with a leading points axis.
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.SiLU, nn.Identity, nn.Dropout)


def linear_chain(view: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``[(name prefix, layer)]`` when ``view`` is a plain chain of ``Flatten``, ``Linear`` and elementwise layers
    (an ``nn.Sequential`` or :class:`pipeline.training.models.MLP`), else ``None``. Exact types only: a subclass may
    override ``forward``, and a module with hooks is not a plain chain."""
    if type(view) is MLP:
        seq, prefix = view.net, "net."
    elif type(view) is nn.Sequential:
        seq, prefix = view, ""
    else:
        return None
    if type(seq) is not nn.Sequential:
        return None
    layers = []
    for name, layer in seq.named_children():
        if type(layer) not in (nn.Linear, nn.Flatten) + _ELEMENTWISE:
            return None
        if layer._forward_hooks or layer._forward_pre_hooks:
            return None
        layers.append((f"{prefix}{name}.", layer))
    if not any(type(layer) is nn.Linear for _, layer in layers):
        return None
    return layers


class _LinearChain:
    """Batched forward of a linear chain at ``n`` points, equal to the per-point forward up to float rounding.

    The first ``Linear`` sees the same input ``h`` at every point, and its output is affine in the coefficients:
    :math:`W(c) h + b(c) = (W_0 h + b_0) + \\sum_j c_j (D_j h + \\delta b_j)`. Its ``1 + k`` products are computed
    once per batch (:meth:`prepare`) instead of once per point, and each point pays only the combination. Later
    layers see a different input per point: one batched product each, bias fused (``baddbmm``).

    Activations are kept transposed, ``(n, features, samples)``: each layer is then :math:`W h^\\top + b`, which
    was measured faster than :math:`h W^\\top + b` (twice as fast for the 10-class output layer).
    """

    def __init__(
        self,
        layers: list[tuple[str, nn.Module]],
        base: Mapping[str, Tensor],
        directions: Sequence[Mapping[str, Tensor]],
    ):
        self.layers = layers
        self.base = base
        self.stem = next(i for i, (_, layer) in enumerate(layers) if type(layer) is nn.Linear)
        prefix = layers[self.stem][0]
        self.stem_names = (prefix + "weight", prefix + "bias")
        self.directions = directions
        # the later layers move through the stacked weights; the stem through its precomputed products
        self.rest = _Points(base, [{n: t for n, t in d.items() if n not in self.stem_names} for d in directions])

    def stem_input(self, xb: Tensor) -> Tensor:
        h = xb
        for _, layer in self.layers[: self.stem]:
            h = layer(h)
        return h

    def accepts(self, xb: Tensor) -> bool:
        """Whether the first ``Linear`` sees one feature vector per sample (``(B, features)``), which the transposed
        layout assumes."""
        with torch.no_grad():
            return self.stem_input(xb[:1]).dim() == 2

    def prepare(self, xb: Tensor) -> tuple[Tensor, Tensor]:
        """``(z0, Z)``: the stem's output at :math:`\\theta_0`, ``(out, B)``, and per direction, ``(k, out, B)``."""
        h = self.stem_input(xb)
        w_name, b_name = self.stem_names
        z0 = F.linear(h, self.base[w_name], self.base.get(b_name)).T.contiguous()
        per_direction = []
        for d in self.directions:
            d = {n: d[n].to(device=z0.device, dtype=z0.dtype) for n in self.stem_names if n in d}
            z = (h @ d[w_name].T).T if w_name in d else torch.zeros_like(z0)
            per_direction.append(z + d[b_name][:, None] if b_name in d else z)
        return z0, torch.stack(per_direction) if per_direction else z0.new_zeros((0,) + z0.shape)

    def forward(self, coords: Tensor, prepared: tuple[Tensor, Tensor]) -> Tensor:
        """Outputs ``(n, B, classes)`` at the ``n`` points ``coords`` (``(n, k)``)."""
        z0, per_direction = prepared
        n = coords.shape[0]
        c = coords.to(device=z0.device, dtype=z0.dtype)
        # z0 + c @ Z in one fused product; the result is a fresh tensor, so a following ReLU may work in place
        h = torch.addmm(z0.reshape(1, -1), c, per_direction.flatten(1)).view((n,) + z0.shape)
        moved = self.rest.at(coords)
        for prefix, layer in self.layers[self.stem + 1 :]:
            if type(layer) is nn.ReLU:
                h = h.relu_()  # in place: every h here is an intermediate this method created
            elif type(layer) is nn.Linear:
                w = moved.get(prefix + "weight", self.base[prefix + "weight"])
                b = moved.get(prefix + "bias", self.base.get(prefix + "bias"))
                w = w if w.dim() == 3 else w.expand(n, *w.shape)
                if b is None:
                    h = torch.bmm(w, h)
                else:
                    h = torch.baddbmm(b.unsqueeze(-1) if b.dim() == 2 else b.view(1, -1, 1), w, h)
            elif type(layer) is not nn.Flatten:  # Flatten of one feature vector per sample: nothing to do
                h = layer(h)
        # back to samples-major, contiguous: argmax along a strided class axis was measured 10x slower than this copy
        return h.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------------------


def evaluate_points(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 512,
    chunk: int | None = None,
    buffer_directions: Sequence[Mapping[str, Tensor]] | None = None,
    loss: str = "cross_entropy",
    engine: str = "auto",
    channels_last: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss and accuracy at the points :math:`\\theta(c) = \\theta_0 + \\sum_j c_j d_j`, one per row ``c`` of
    ``coords``.

    :math:`L(\\theta) = \\frac1N \\sum_{i=1}^N \\ell(f(x_i; \\theta), y_i)` over all of ``(x, y)``, evaluated in batches
    of ``batch_size`` with the model in eval mode (see :func:`evaluation_view`); accuracy is the fraction of
    ``argmax f = y``. With ``buffer_directions`` the floating-point buffers move too,
    :math:`b(c) = b_0 + \\sum_j c_j \\delta b_j` (BatchNorm running statistics, needed to interpolate between two
    trained models); buffers no direction names (``num_batches_tracked``) stay fixed.

    Args:
        model: the network; only its structure is used (no parameter or buffer of it is read unless absent from
            ``params``/``buffers``, and none is written).
        params: :math:`\\theta_0`, by name (trainable parameters).
        buffers: the buffers, by name (BatchNorm running statistics).
        directions: :math:`d_j`, dicts over (a subset of) the names of ``params`` with their shapes.
        coords: ``(P, len(directions))`` coefficients (float64 advised; cast to the parameters' dtype).
        x, y: the probe set (inputs; class labels, or float targets for ``mse``).
        batch_size: samples per forward pass.
        chunk: points per forward pass; 1 = plain loop, > 1 = ``vmap`` over stacked parameter sets, ``None`` =
            :func:`choose_chunk` (measured once per model and device).
        buffer_directions: one dict per direction over floating-point buffers, or ``None`` (buffers fixed).
        loss: ``cross_entropy`` or ``mse`` (:func:`pipeline.curvature.operators.loss_sum`).
        engine: for ``chunk > 1``: ``auto`` uses the explicit batched forward of :class:`_LinearChain` when the
            model is a plain chain of linear and elementwise layers (the MLP) and no buffer moves, else ``vmap``;
            ``vmap`` always uses ``vmap``.
        channels_last: run 2-D convolutions on channels-last inputs and weights (the same function; oneDNN's
            convolutions are much faster in that layout on some CPUs); ``None`` = :func:`choose_layout`, measured
            once per model and device, for a model with ``Conv2d`` layers and 4-D inputs (else off).

    Returns:
        ``(loss, accuracy)``, each ``(P,)`` float64 on the CPU; accuracy is NaN for floating targets.

    Raises:
        ValueError: for mismatched shapes or names, ``chunk < 1``, ``batch_size < 1``, an unknown ``loss`` or
            ``engine``, or ``channels_last`` with inputs that are not 4-D.
    """
    _check_common(coords, len(directions), x, y, batch_size, loss)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk: must be >= 1 or None (measured), got {chunk}")
    if engine not in ENGINES:
        raise ValueError(f"engine: unknown name {engine!r}; allowed: {', '.join(ENGINES)}")
    _check_directions(params, directions, "directions")
    if buffer_directions is not None:
        if len(buffer_directions) != len(directions):
            raise ValueError(
                f"buffer_directions: need one per direction ({len(directions)}), got {len(buffer_directions)}"
            )
        _check_directions(buffers, buffer_directions, "buffer_directions")
        fixed_kind = [n for d in buffer_directions for n in d if not buffers[n].is_floating_point()]
        if fixed_kind:
            raise ValueError(f"buffer_directions: only floating-point buffers can move, not {fixed_kind[0]!r}")
    if channels_last and x.dim() != 4:
        raise ValueError(f"channels_last: needs 4-D inputs (N, C, H, W), got shape {tuple(x.shape)}")
    if channels_last is None:
        channels_last = _has_conv2d(model, x) and choose_layout(model, params, buffers, x, batch_size=batch_size)
    if chunk is None:
        chunk = choose_chunk(model, params, buffers, x, batch_size=batch_size, engine=engine)

    view = evaluation_view(model)
    device = next(iter(params.values())).device if params else x.device
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), x.dtype)
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
    y = y.to(device=device, dtype=dtype if y.is_floating_point() else None)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    n_samples = len(x)
    buffer_directions = list(buffer_directions or [])

    moved_names = {n for d in directions for n in d}
    moved_buffer_names = {n for d in buffer_directions for n in d}
    fixed = {n: p.detach() for n, p in params.items() if n not in moved_names}
    fixed.update({n: b.detach() for n, b in buffers.items() if n not in moved_buffer_names})
    layout = _channels_last if channels_last else (lambda tensors: tensors)
    fixed = layout(fixed)

    n_points = coords.shape[0]
    total_loss = torch.zeros(n_points, dtype=torch.float64)
    total_correct = torch.zeros(n_points, dtype=torch.float64)
    coords = coords.to(torch.float64)

    def forward(moved: dict[str, Tensor], moved_buffers: dict[str, Tensor], xb: Tensor) -> Tensor:
        return functional_call(view, {**fixed, **moved, **moved_buffers}, (xb,))

    layers = linear_chain(view) if chunk > 1 and engine == "auto" and not buffer_directions else None
    if layers is not None:
        base = {n: p.detach() for n, p in view.named_parameters()}
        base.update({n: p.detach() for n, p in params.items()})
        chain = _LinearChain(layers, base, directions)
        if not chain.accepts(x):
            layers = None
    if layers is None:
        points = _Points(params, directions)
        buffer_points = _Points(buffers, buffer_directions)

    with torch.no_grad():
        prepared = [chain.prepare(xb) for xb, _ in batches] if layers is not None else None
        for start in range(0, n_points, chunk):
            c = coords[start : start + chunk]
            rows = slice(start, start + len(c))
            if layers is None:
                moved = points.at(c)
                moved_buffers = buffer_points.at(c) if buffer_directions else {}
            for b, (xb, yb) in enumerate(batches):
                if layers is not None:
                    out = chain.forward(c, prepared[b])
                    sums = _point_loss_sums(out, yb, loss)
                elif chunk == 1:
                    out = forward(
                        layout({n: t[0] for n, t in moved.items()}), {n: t[0] for n, t in moved_buffers.items()}, xb
                    ).unsqueeze(0)
                    sums = _point_loss_sums(out, yb, loss)
                else:
                    batched = vmap(forward, in_dims=(0, 0 if moved_buffers else None, None))
                    out = batched(moved, moved_buffers, xb)
                    sums = _point_loss_sums(out, yb, loss)
                total_loss[rows] += sums.cpu()
                total_correct[rows] += _targets_correct(out, yb).cpu()
    return total_loss / n_samples, total_correct / n_samples


# --------------------------------------------------------------------------------------------------------------
# Chunk size and layout by measurement
# --------------------------------------------------------------------------------------------------------------


def structure_key(model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> str:
    """A digest of what a measured chunk or layout depends on in the architecture: every module's path, class
    (module and qualified name), ``extra_repr`` (kernel sizes, strides, widths) and plain attributes (flags such as a
    missing shortcut), and every parameter's and buffer's name, shape and dtype. Two architectures that differ in any
    of these get their own measurement (``resnet20`` and ``resnet20_noshort`` share class and parameter count)."""
    import hashlib

    plain = (bool, int, float, str, tuple, type(None))
    parts = []
    for path, module in model.named_modules():
        attributes = sorted(
            (k, repr(v))
            for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, plain)
        )
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        parts.append(f"{path}|{kind}|{module.extra_repr()}|{attributes}")
    for name, tensor in [*params.items(), *buffers.items()]:
        parts.append(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _has_conv2d(model: nn.Module, x: Tensor) -> bool:
    return x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules())


def _channels_last(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """4-D tensors (convolution weights) in channels-last layout; the rest unchanged. (In the batched engine the
    stacked weights are 5-D and stay as they are: vmap's grouped convolution reshapes them anyway.)"""
    return {n: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for n, t in tensors.items()}


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_chunk(
    model, params, buffers, x, y, chunk: int, batch_size: int, engine: str, channels_last: bool | None = None
) -> float:
    """Seconds for one chunk of ``chunk`` points over one batch (weights built from a zero direction, so the
    measurement includes the cost of stacking the parameter sets)."""
    zero = {n: torch.zeros_like(p) for n, p in params.items()}
    coords = torch.zeros(chunk, 1, dtype=torch.float64)
    device = next(iter(params.values())).device
    _synchronize(device)
    start = time.perf_counter()
    evaluate_points(
        model,
        params,
        buffers,
        [zero],
        coords,
        x,
        y,
        batch_size=batch_size,
        chunk=chunk,
        engine=engine,
        channels_last=channels_last,
    )
    _synchronize(device)
    return time.perf_counter() - start


def choose_chunk(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    *,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    batch_size: int = 512,
    budget_s: float = 1.0,
    engine: str = "auto",
) -> int:
    """The fastest number of points per forward pass, by measurement, for this model on this device.

    The best chunk depends on the model's shapes and on the hardware (a GPU wants large batched products; on a CPU
    a convolutional net may run fastest one point at a time, since ``vmap`` turns its convolutions into grouped
    ones), so it is measured rather than fixed. Each candidate size, in increasing order, runs one chunk on one
    batch of ``x``: once untimed (first-run costs), then timed, best of two (three for short runs). A larger chunk
    is adopted only if its throughput (points per second) beats the best so far by 5 %; growth stops when two
    sizes in a row fall below 90 % of the best throughput (one dip is timing noise or a kernel-selection quirk: the
    MLP on this CPU runs chunk 4 slower than chunks 2 and 8), when a chunk takes longer than ``budget_s``, or at
    out-of-memory.
    The decision is cached in :data:`CHUNK_CACHE` per (architecture, :func:`structure_key`; device, dtype, input
    shape, batch size, candidates, engine), so a process measures once per model and device.

    Args:
        model, params, buffers: as for :func:`evaluate_points`.
        x: probe inputs (only the first batch is used).
        candidates: chunk sizes to try, each >= 1.
        batch_size: samples per forward pass, as it will be used.
        budget_s: longest acceptable time of one timed chunk, in seconds.
        engine: the engine the chunks will run on (see :func:`evaluate_points`).

    Returns:
        One of ``candidates``.

    Raises:
        ValueError: for empty or non-positive candidates, ``batch_size < 1``, ``budget_s <= 0``, an unknown
            ``engine`` or empty ``x``.
    """
    if not candidates or any(int(c) != c or c < 1 for c in candidates):
        raise ValueError(f"candidates: need positive integers, got {tuple(candidates)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not budget_s > 0:
        raise ValueError(f"budget_s: must be > 0 seconds, got {budget_s}")
    if len(x) == 0:
        raise ValueError("x: the probe set is empty")
    if engine not in ENGINES:
        raise ValueError(f"engine: unknown name {engine!r}; allowed: {', '.join(ENGINES)}")
    candidates = tuple(sorted(set(int(c) for c in candidates)))
    first = next(iter(params.values()))
    xb = x[:batch_size]
    key = (
        structure_key(model, params, buffers),
        str(first.device),
        str(first.dtype),
        tuple(x.shape[1:]),
        len(xb),
        candidates,
        engine,
    )
    if key in CHUNK_CACHE:
        return CHUNK_CACHE[key]
    yb = torch.zeros(len(xb), dtype=torch.long)  # labels do not change the cost of cross-entropy
    best, best_rate, drops = candidates[0], 0.0, 0
    for chunk in candidates:
        try:
            # the first run of a size pays one-time costs (vmap's first trace, allocations): never timed alone
            seconds = _time_chunk(model, params, buffers, xb, yb, chunk, batch_size, engine)
            seconds = min(seconds, _time_chunk(model, params, buffers, xb, yb, chunk, batch_size, engine))
            if seconds < budget_s / 10:  # short runs are noisy (other processes, clock changes): best of five
                for _ in range(3):
                    seconds = min(seconds, _time_chunk(model, params, buffers, xb, yb, chunk, batch_size, engine))
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not _is_out_of_memory(error):
                raise
            if first.device.type == "cuda":
                torch.cuda.empty_cache()
            break
        rate = chunk / max(seconds, 1e-9)
        drops = drops + 1 if rate < 0.9 * best_rate else 0
        if drops == 2:  # two clear drops in a row, beyond timing noise: larger chunks will not help
            break
        if rate > 1.05 * best_rate:  # a larger chunk must win clearly: under noise, the smaller one uses less memory
            best, best_rate = chunk, rate
        if seconds > budget_s:
            break
    CHUNK_CACHE[key] = best
    return best


def choose_layout(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, *, batch_size: int = 512
) -> bool:
    """Whether channels-last convolutions are faster for this model on this device, by measurement.

    One point over one batch of ``x`` is timed in each layout (after an untimed run of each; best of two,
    alternating), and the decision cached in :data:`LAYOUT_CACHE` per (architecture, :func:`structure_key`; device,
    dtype, input shape, batch size). Models without ``Conv2d`` or with inputs that are not 4-D get ``False`` unmeasured.

    Raises:
        ValueError: for ``batch_size < 1`` or empty ``x``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("x: the probe set is empty")
    if not _has_conv2d(model, x):
        return False
    first = next(iter(params.values()))
    xb = x[:batch_size]
    key = (
        structure_key(model, params, buffers),
        str(first.device),
        str(first.dtype),
        tuple(x.shape[1:]),
        len(xb),
    )
    if key not in LAYOUT_CACHE:
        yb = torch.zeros(len(xb), dtype=torch.long)
        seconds = {False: math.inf, True: math.inf}
        for repeat in range(3):
            for layout in (False, True):
                elapsed = _time_chunk(model, params, buffers, xb, yb, 1, batch_size, "auto", layout)
                if repeat:  # the first round is the untimed warm-up
                    seconds[layout] = min(seconds[layout], elapsed)
        LAYOUT_CACHE[key] = seconds[True] < seconds[False]
    return LAYOUT_CACHE[key]


# --------------------------------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------------------------------


def sequential_shift_loop(
    model: nn.Module,
    directions: Sequence[Mapping[str, Tensor]],
    coords: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 512,
    loss: str = "cross_entropy",
) -> tuple[Tensor, Tensor]:
    """Baseline for benchmarks: the in-place evaluation of ``loss-landscape`` (Li et al.) and ``loss-landscapes``.

    For each point, the module's own weights are shifted in place, :math:`\\theta \\leftarrow \\theta_0 +
    \\sum_j c_j d_j` (``p.data.add_``), the module is called, and the weights are restored. This is the only code of
    the library that writes ``p.data``: it exists to measure the engine against what those packages do. Weights
    are restored by copying from a saved clone, not by subtracting the shift (which would leave rounding residue
    in every weight), under ``torch.no_grad``, and also when the evaluation raises. The module is put in eval mode
    for the loop and its ``training`` flags restored afterwards; buffers do not move.

    Args and Returns: as for :func:`evaluate_points` (directions over the module's parameter names).

    Raises:
        ValueError: for mismatched shapes or names, ``batch_size < 1`` or an unknown ``loss``.
    """
    _check_common(coords, len(directions), x, y, batch_size, loss)
    named = dict(model.named_parameters())
    _check_directions(named, directions, "directions")
    first = next(iter(named.values()))
    x = x.to(device=first.device, dtype=first.dtype if x.is_floating_point() else None)
    y = y.to(device=first.device, dtype=first.dtype if y.is_floating_point() else None)
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    names = list(dict.fromkeys(n for d in directions for n in d))
    saved = {n: named[n].detach().clone() for n in names}
    flags = {m: m.training for m in model.modules()}
    n_points = coords.shape[0]
    losses = torch.zeros(n_points, dtype=torch.float64)
    correct = torch.zeros(n_points, dtype=torch.float64)
    model.eval()
    try:
        with torch.no_grad():
            for i, c in enumerate(coords.tolist()):
                for j, d in enumerate(directions):
                    for n, t in d.items():
                        named[n].data.add_(t, alpha=c[j])
                for xb, yb in batches:
                    out = model(xb)
                    losses[i] += float(loss_sum(out, yb, loss))
                    correct[i] += float(_targets_correct(out.unsqueeze(0), yb)[0])
                for n in names:
                    named[n].data.copy_(saved[n])
    finally:
        with torch.no_grad():
            for n in names:
                named[n].data.copy_(saved[n])
        for m, flag in flags.items():
            m.training = flag
    return losses / len(x), correct / len(x)
