"""Permutation symmetry of hidden units, and the alignment of one trained network to another.

Reordering the hidden units of a layer, together with the rows of the weights that make them and the columns of the
weights that read them, leaves the function a network computes unchanged. Two networks trained from different seeds
are, to a large part, the same solution with its units in another order (Entezari et al. 2022); the loss barrier on
the straight line between them mostly measures that order, unless the second network is first permuted to match the
first (Ainsworth et al. 2023, "Git Re-Basin"; Jordan et al. 2023, "REPAIR").

:func:`permutation_spec` derives *which* tensor axes one permutation touches from the network itself, not from a
table typed per architecture: it traces the forward pass with ``torch.fx`` and follows every channel (the feature
axis, dimension 1) from the layer that makes it through normalisations, activations, pooling, additions,
concatenations and channel padding to the layers that read it. A residual addition ties the channels of its two
inputs together, so a residual stream shares one permutation; a network without skips gets one per layer; an MLP
one per hidden layer. Channels a permutation must leave in place (the input's, the logits') are fixed. A
``GroupNorm`` with several groups normalises each group of channels together, so its channels are permuted only
within their group (exchanges of whole groups are not searched). The parameter-free "option A" shortcut of the
CIFAR ResNets zero-pads new channels around the old ones: the old ones keep the previous stage's permutation and
the padded ones get one of their own.

:func:`weight_matching` is Ainsworth et al.'s coordinate descent: for each permutation in a seeded random order,
the score matrix :math:`S_{kl} = \\sum \\langle W^A_{k\\cdot}, W^B_{l\\cdot} \\rangle` summed over every weight the
permutation touches (the other permutations applied), solved exactly by
``scipy.optimize.linear_sum_assignment(maximize=True)``; passes repeat until none improves the matching objective
:math:`\\sum_W \\langle W^A, \\pi(W^B) \\rangle`, which never decreases. :func:`activation_matching` is the variant
of Jordan et al.: the correlation of each unit's activations in the two networks over a set of inputs, the same
solver, one permutation at a time.

A permutation ``perm`` of ``n`` units (a ``LongTensor``) means: unit ``k`` of the permuted network is unit
``perm[k]`` of the original.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ModelError

# Layers that act on each channel alike (or permute-equivariantly across them) and hold no parameter.
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# The nonlinearities among them: where activation matching observes the units.
_ACTIVATION_MODULES = _PASS_MODULES[:15]
_ACTIVATION_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    F.softplus,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
}
_PASS_FUNCTIONS = _ACTIVATION_FUNCTIONS | {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    torch.abs,
}
_ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
_PASS_METHODS = _ACTIVATION_METHODS | {"contiguous", "clone", "softmax", "log_softmax", "abs", "float", "double"}
_BINARY = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


# --------------------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PermutationSpec:
    """Which axes of which tensors each permutation of hidden units touches.

    Attributes:
        groups: permutation name -> number of units, in the order the forward pass meets them.
        axes: tensor name (parameter or buffer) -> axis -> permutation name -> positions along that axis of the
            permutation's units ``0 .. n-1`` (a tensor no permutation touches is absent; see ``fixed``).
        fixed: the tensors no permutation touches (the input layer's columns, scalars such as
            ``num_batches_tracked``, normalisations of fixed channels).
        activation_sites: ``torch.fx`` node name -> permutation name -> channel positions, the outputs where
            :func:`activation_matching` compares the units (nonlinearities; a layer's output when no nonlinearity
            sees a permutation).
        repair_sites: module name -> channels: where REPAIR corrects the channel statistics (the output of each
            hidden layer, after its normalisation when one follows directly).
    """

    groups: dict[str, int]
    axes: dict[str, dict[int, dict[str, list[int]]]]
    fixed: tuple[str, ...] = ()
    activation_sites: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    repair_sites: dict[str, int] = field(default_factory=dict)

    def touching(self, group: str) -> list[tuple[str, int, list[int]]]:
        """``(tensor, axis, positions)`` for every axis the permutation ``group`` touches."""
        return [
            (name, axis, groups[group])
            for name, by_axis in self.axes.items()
            for axis, groups in by_axis.items()
            if group in groups
        ]

    def describe(self) -> str:
        sizes = list(self.groups.values())
        return (
            f"{len(sizes)} permutation(s) of {sum(sizes)} units (sizes {min(sizes, default=0)}-{max(sizes, default=0)})"
            f" over {len(self.axes)} tensor(s)"
        )


class _Units:
    """Channels as units: each made by an origin (a layer's output, padded channels, the input, the output), merged
    with a union-find where the forward pass ties two channels to be the same (a residual addition)."""

    def __init__(self):
        self.parent: list[int] = []
        self.origin: list[int] = []
        self.origins: list[tuple[str, bool]] = []  # (name, fixed)
        self.labels: dict[int, set] = {}

    def new(self, name: str, n: int, *, fixed: bool = False) -> np.ndarray:
        self.origins.append((name, fixed))
        start = len(self.parent)
        self.parent += list(range(start, start + n))
        self.origin += [len(self.origins) - 1] * n
        return np.arange(start, start + n)

    def find(self, u: int) -> int:
        while self.parent[u] != u:
            self.parent[u] = self.parent[self.parent[u]]
            u = self.parent[u]
        return u

    def union(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        if len(a) != len(b):
            raise ModelError(f"{where}: joins {len(a)} channels with {len(b)}")
        for u, v in zip(a.tolist(), b.tolist()):
            ru, rv = self.find(u), self.find(v)
            if ru != rv:
                self.parent[max(ru, rv)] = min(ru, rv)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def permutation_spec(model: nn.Module, input_shape: tuple[int, ...], *, what: str | None = None) -> PermutationSpec:
    """The permutation spec of ``model`` for inputs of shape ``(C, H, W)`` (or ``(F,)``), derived from its forward.

    The forward is traced with ``torch.fx`` and run once on zeros (on a copy of the model in eval mode: the model
    and its running statistics are not touched) for the shapes.

    Raises:
        pipeline.errors.ModelError: one line naming the model and the layer, function or tensor it cannot place:
            a forward ``torch.fx`` cannot trace, a layer or function outside the supported set, a parameter used
            outside a layer, a reshape that mixes channels and pixels of permuted channels, a tensor the forward
            never uses.
    """
    what = what or type(model).__name__
    probe = copy.deepcopy(model).eval()
    try:
        traced = torch.fx.symbolic_trace(probe)
    except Exception as error:  # any tracing failure: one line, not fx's multi-line traceback
        raise ModelError(f"{what}: torch.fx cannot trace its forward ({_first_line(error)})") from None
    first = next(iter(probe.parameters()), None)
    example = torch.zeros(2, *input_shape, dtype=first.dtype if first is not None else torch.float32)
    if first is not None:
        example = example.to(first.device)
    try:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(traced).propagate(example)
    except Exception as error:
        raise ModelError(f"{what}: its forward fails on zeros of shape {tuple(example.shape)} ({_first_line(error)})")
    return _derive(traced, probe, what)


def _indexes_features(index, rank: int) -> bool:
    """Whether ``tensor[index]`` selects along the batch or feature axis (dimensions 0 and 1) or adds axes."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in index):
        return True
    if Ellipsis in index:
        e = index.index(Ellipsis)
        tail = len(index) - e - 1
        entries = [
            index[d] if d < e else (index[e + 1 + d - (rank - tail)] if d >= rank - tail else slice(None))
            for d in (0, 1)
        ]
    else:
        entries = [index[d] if d < len(index) else slice(None) for d in (0, 1)]
    return any(entry != slice(None) for entry in entries)


def _derive(traced: torch.fx.GraphModule, probe: nn.Module, what: str) -> PermutationSpec:
    units = _Units()
    modules = dict(traced.named_modules())
    layout: dict[Any, np.ndarray | None] = {}
    tensor_axes: dict[str, dict[int, np.ndarray]] = {}
    activation_nodes: list[tuple[str, np.ndarray]] = []
    layer_nodes: list[tuple[str, str, np.ndarray, Any]] = []  # (node, module, units, node)

    def place(tensor: str, axis: int, where: np.ndarray) -> None:
        by_axis = tensor_axes.setdefault(tensor, {})
        if axis in by_axis:  # a layer called twice: its channels are the same units both times
            units.union(by_axis[axis], where, f"{what}: {tensor}")
        else:
            by_axis[axis] = where

    def fixed_tensor(tensor: str) -> None:
        tensor_axes.setdefault(tensor, {})

    def of(arg, where: str) -> np.ndarray:
        if not isinstance(arg, torch.fx.Node) or layout.get(arg) is None:
            raise ModelError(f"{what}: {where}: expects a feature map, got {arg!r}")
        return layout[arg]

    def fail(node, detail: str):
        raise ModelError(f"{what}: cannot derive a permutation spec at {node.name} ({detail})")

    def reshape(node, source) -> np.ndarray:
        channels = of(source, node.name)
        before, after = _shape(source), _shape(node)
        if before is None or after is None or len(before) < 2 or len(after) < 2 or before[0] != after[0]:
            fail(node, f"a reshape from {before} to {after} that moves the batch or feature axis")
        if after[1] == before[1] and math.prod(after[2:]) == math.prod(before[2:]):
            return channels
        spatial = math.prod(before[2:])
        if len(after) == 2 and after[1] == before[1] * spatial:
            if spatial == 1:
                return channels
            if all(units.origins[units.origin[u]][1] for u in channels.tolist()):
                return units.new(f"{node.name}:flat", after[1], fixed=True)
            fail(node, f"flattens {before[1]} permuted channels of {spatial} pixels each; pool them first")
        fail(node, f"a reshape from {before} to {after} that mixes channels with other axes")

    for node in traced.graph.nodes:
        shape = _shape(node)
        if node.op == "placeholder":
            layout[node] = units.new("input", shape[1], fixed=True) if shape and len(shape) >= 2 else None
        elif node.op == "get_attr":
            fail(node, f"uses the tensor {node.target!r} outside a layer; wrap it in a module")
        elif node.op == "call_module":
            module = modules[node.target]
            name = node.target
            source = node.args[0] if node.args else None
            own = [n for n, _ in module.named_parameters(recurse=False)] + [
                n for n, _ in module.named_buffers(recurse=False)
            ]
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                channels = of(source, name)
                if isinstance(module, nn.Linear) and (shape is None or len(shape) != 2):
                    fail(node, f"a Linear layer on a {len(shape or ())}-D input; only (batch, features) is supported")
                groups = getattr(module, "groups", 1)
                if groups == 1:
                    out = units.new(name, module.weight.shape[0])
                    place(f"{name}.weight", 0, out)
                    place(f"{name}.weight", 1, channels)
                elif groups == module.weight.shape[0] == len(channels) and module.weight.shape[1] == 1:
                    out = channels  # depthwise: channel k reads channel k only
                    place(f"{name}.weight", 0, out)
                else:
                    fail(node, f"a convolution with {groups} groups (only 1 or depthwise are supported)")
                if module.bias is not None:
                    place(f"{name}.bias", 0, out)
                layout[node] = out
                layer_nodes.append((node.name, name, out, node))
            elif isinstance(module, _NORMS):
                channels = of(source, name)
                per_channel = not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) == len(shape) - 1
                for tensor in own:
                    if tensor == "num_batches_tracked" or not per_channel:
                        fixed_tensor(f"{name}.{tensor}")
                    else:
                        place(f"{name}.{tensor}", 0, channels)
                if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
                    size = module.num_channels // module.num_groups
                    for position, u in enumerate(channels.tolist()):
                        units.labels.setdefault(u, set()).add((name, position // size))
                layout[node] = channels
            elif isinstance(module, nn.PReLU):
                channels = of(source, name)
                if module.weight.numel() == 1:
                    fixed_tensor(f"{name}.weight")
                else:
                    place(f"{name}.weight", 0, channels)
                layout[node] = channels
                activation_nodes.append((node.name, channels))
            elif isinstance(module, (nn.Flatten, nn.Unflatten)):
                layout[node] = reshape(node, source)
            elif isinstance(module, _PASS_MODULES):
                layout[node] = of(source, name)
                if isinstance(module, _ACTIVATION_MODULES):
                    activation_nodes.append((node.name, layout[node]))
            else:
                held = f" (holds {own[0]!r})" if own else ""
                fail(node, f"layer {name!r} of type {type(module).__name__}{held} is not one the spec can follow")
        elif node.op in ("call_function", "call_method"):
            target = node.target
            tensors = [a for a in node.args if isinstance(a, torch.fx.Node) and layout.get(a) is not None]
            if shape is None:  # sizes, shapes, tuples: no channels to follow
                layout[node] = None
                continue
            is_fn = node.op == "call_function"
            if (is_fn and target in _PASS_FUNCTIONS) or (not is_fn and target in _PASS_METHODS):
                layout[node] = of(node.args[0], node.name)
                if (is_fn and target in _ACTIVATION_FUNCTIONS) or (not is_fn and target in _ACTIVATION_METHODS):
                    activation_nodes.append((node.name, layout[node]))
            elif (is_fn and target in _BINARY) or (not is_fn and target in _BINARY_METHODS):
                full = [a for a in tensors if _shape(a) is not None and len(_shape(a)) >= 2 and _shape(a)[1] > 1]
                if not full:
                    fail(node, "an arithmetic operation on no feature map")
                for other in full[1:]:
                    units.union(layout[full[0]], layout[other], f"{what}: {node.name}")
                layout[node] = layout[full[0]]
            elif (is_fn and target in _RESHAPE_FUNCTIONS) or (not is_fn and target in _RESHAPE_METHODS):
                layout[node] = reshape(node, node.args[0])
            elif (is_fn and target in _REDUCE_FUNCTIONS) or (not is_fn and target in _REDUCE_METHODS):
                before = _shape(node.args[0])
                if len(shape) < 2 or shape[1] != before[1] or shape[0] != before[0]:
                    fail(node, f"a reduction from {before} to {shape} over the feature axis")
                layout[node] = of(node.args[0], node.name)
            elif is_fn and target is operator.getitem:
                source = node.args[0]
                before = _shape(source)
                if _indexes_features(node.args[1], len(before)) or len(shape) != len(before) or shape[1] != before[1]:
                    fail(node, "indexes the feature axis")
                layout[node] = of(source, node.name)
            elif is_fn and target is F.pad:
                source = node.args[0]
                pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
                mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
                rank = len(_shape(source))
                channels = of(source, node.name)
                if len(pad) // 2 >= rank:
                    fail(node, "pads the batch axis")
                if len(pad) // 2 == rank - 1 and (pad[-2] or pad[-1]):
                    if mode != "constant":
                        fail(node, f"pads channels in mode {mode!r}")
                    new = units.new(f"{node.name}:pad", pad[-2] + pad[-1])
                    channels = np.concatenate([new[: pad[-2]], channels, new[pad[-2] :]])
                layout[node] = channels
            elif is_fn and target is torch.cat:
                parts = node.args[0]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                dim = dim % len(shape)
                if dim == 1:
                    layout[node] = np.concatenate([of(p, node.name) for p in parts])
                elif dim == 0:
                    fail(node, "concatenates along the batch axis")
                else:
                    for p in parts[1:]:
                        units.union(of(parts[0], node.name), of(p, node.name), f"{what}: {node.name}")
                    layout[node] = of(parts[0], node.name)
            else:
                label = getattr(target, "__name__", str(target))
                fail(node, f"the {'function' if is_fn else 'method'} {label!r} is not one the spec can follow")
        elif node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for result in results:
                if isinstance(result, torch.fx.Node) and layout.get(result) is not None:
                    units.union(layout[result], units.new("output", len(layout[result]), fixed=True), f"{what}: output")

    missing = [n for n, _ in list(probe.named_parameters()) + list(probe.named_buffers()) if n not in tensor_axes]
    if missing:
        raise ModelError(
            f"{what}: the tensor {missing[0]!r} is not used by the forward; cannot place it in a permutation"
        )
    return _assemble(units, tensor_axes, activation_nodes, layer_nodes, modules, what)


def _assemble(units, tensor_axes, activation_nodes, layer_nodes, modules, what) -> PermutationSpec:
    members: dict[int, list[int]] = {}
    for u in range(len(units.parent)):
        members.setdefault(units.find(u), []).append(u)
    signatures: dict[tuple, list[int]] = {}
    for root, us in members.items():
        origins = [units.origin[u] for u in us]
        if any(units.origins[o][1] for o in origins) or len(set(origins)) < len(origins):
            continue  # fixed: tied to the input or output, or to another channel of its own layer
        labels = tuple(sorted(label for u in us for label in units.labels.get(u, ())))
        key = (tuple(sorted(set(origins))), tuple(sorted({lab[0] for lab in labels})), labels)
        signatures.setdefault(key, []).append(root)
    # one permutation per signature whose classes differ only in their group labels' indices
    by_origins: dict[tuple, list[tuple[tuple, list[int]]]] = {}
    for key, roots in signatures.items():
        by_origins.setdefault(key[:2], []).append((key, sorted(roots)))
    groups: dict[str, int] = {}
    group_of: dict[int, tuple[str, int]] = {}
    for (origins, _), parts in sorted(by_origins.items(), key=lambda item: min(min(r) for _, r in item[1])):
        base = units.origins[origins[0]][0]
        for index, (_, roots) in enumerate(sorted(parts, key=lambda part: part[1][0])):
            if len(roots) < 2:
                continue
            name = base if len(parts) == 1 else f"{base}#{index}"
            groups[name] = len(roots)
            for k, root in enumerate(roots):
                group_of[root] = (name, k)

    def positions(where: np.ndarray, tensor: str) -> dict[str, list[int]]:
        out: dict[str, list[int | None]] = {}
        for position, u in enumerate(where.tolist()):
            hit = group_of.get(units.find(u))
            if hit is not None:
                slots = out.setdefault(hit[0], [None] * groups[hit[0]])
                if slots[hit[1]] is not None:
                    raise ModelError(f"{what}: {tensor} holds one unit of {hit[0]!r} twice")
                slots[hit[1]] = position
        for name, slots in out.items():
            if any(s is None for s in slots):
                raise ModelError(f"{what}: {tensor} holds only part of the permutation {name!r}")
        return out  # type: ignore[return-value]

    axes: dict[str, dict[int, dict[str, list[int]]]] = {}
    fixed = []
    for tensor, by_axis in tensor_axes.items():
        placed = {axis: p for axis, where in by_axis.items() if (p := positions(where, f"{tensor} axis {axis}"))}
        if placed:
            axes[tensor] = placed
        else:
            fixed.append(tensor)
    activation_sites = {}
    seen: set[str] = set()
    for node_name, where in activation_nodes:
        if p := positions(where, node_name):
            activation_sites[node_name] = p
            seen |= set(p)
    repair_sites = {}
    for node_name, module_name, out, node in layer_nodes:
        p = positions(out, node_name)
        if not p:
            continue  # the classifier: its outputs are fixed
        if set(p) - seen:
            activation_sites[node_name] = p
            seen |= set(p)
        users = list(node.users)
        site = module_name
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], _NORMS):
            site = users[0].target
        repair_sites[site] = len(out)
    return PermutationSpec(groups, axes, tuple(fixed), activation_sites, repair_sites)


# --------------------------------------------------------------------------------------------------------------
# Permuting
# --------------------------------------------------------------------------------------------------------------


def _index(length: int, groups: Mapping[str, list[int]], perms: Mapping[str, Tensor], skip: str | None = None):
    index = torch.arange(length)
    for group, where in groups.items():
        if group == skip:
            continue
        pos = torch.as_tensor(where)
        index[pos] = pos[perms[group]]
    return index


def permute_tensor(
    spec: PermutationSpec, name: str, tensor: Tensor, perms: Mapping[str, Tensor], *, except_axis: int | None = None
) -> Tensor:
    """``tensor`` (the spec's ``name``) with the permutations of ``perms`` applied on its axes (but ``except_axis``)."""
    for axis, groups in spec.axes.get(name, {}).items():
        if axis == except_axis:
            continue
        tensor = tensor.index_select(axis, _index(tensor.shape[axis], groups, perms).to(tensor.device))
    return tensor


def permute(spec: PermutationSpec, tensors: Mapping[str, Tensor], perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``tensors`` (parameters and buffers by name) with the permutations applied: the state of the same
    function with its units reordered.

    Raises:
        KeyError: for a tensor the spec does not know (not of the model it was derived from).
    """
    known = set(spec.axes) | set(spec.fixed)
    unknown = [n for n in tensors if n not in known]
    if unknown:
        raise KeyError(f"{unknown[0]!r}: not a tensor of the model the permutation spec was derived from")
    return {n: permute_tensor(spec, n, t, perms).clone() for n, t in tensors.items()}


def identity_permutations(spec: PermutationSpec) -> dict[str, Tensor]:
    return {g: torch.arange(n) for g, n in spec.groups.items()}


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> dict[str, Tensor]:
    """One uniformly random permutation per group of ``spec``, drawn from ``generator`` in the spec's order."""
    return {g: torch.randperm(n, generator=generator) for g, n in spec.groups.items()}


def inverse(perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {g: torch.argsort(p) for g, p in perms.items()}


# --------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Match:
    """The permutations that align model B to model A, and the objective after each pass (the first entry: before
    any pass, with B as it is)."""

    method: str
    perms: dict[str, Tensor]
    objective: list[float]
    passes: int

    def payload(self) -> dict:
        return {
            "method": self.method,
            "permutations": {g: p.tolist() for g, p in self.perms.items()},
            "objective": list(self.objective),
            "passes": self.passes,
        }


def matching_objective(
    spec: PermutationSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor], perms: Mapping[str, Tensor]
) -> float:
    """:math:`\\sum_W \\langle W^A, \\pi(W^B) \\rangle` over the tensors of ``a`` the spec permutes (float64)."""
    total = 0.0
    for name in a:
        if name in spec.axes:
            total += float((a[name].double() * permute_tensor(spec, name, b[name], perms).double()).sum())
    return total


def _rows(t: Tensor, axis: int, where: list[int]) -> Tensor:
    return (
        t.double().index_select(axis, torch.as_tensor(where, device=t.device)).movedim(axis, 0).reshape(len(where), -1)
    )


def _assign(score: Tensor) -> Tensor:
    from scipy.optimize import linear_sum_assignment

    _, columns = linear_sum_assignment(score.cpu().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long)


def weight_matching(
    spec: PermutationSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    seed: int = 0,
    max_passes: int = 100,
) -> Match:
    """Permutations of model B's units that maximise :math:`\\sum_W \\langle W^A, \\pi(W^B) \\rangle` (Ainsworth et
    al. 2023, Algorithm 1: weight matching).

    ``a`` and ``b`` are the two models' trainable parameters by name (buffers such as running statistics are
    permuted with the result but not matched). Each pass visits the permutations in an order drawn from
    ``torch.Generator().manual_seed(seed)`` (a new order each pass) and replaces one by the exact solution of its
    linear assignment problem with the others held fixed when that raises the objective; the passes stop when one
    changes nothing, or after ``max_passes``. The objective never decreases from pass to pass.
    """
    perms = identity_permutations(spec)
    names = list(spec.groups)
    touching = {g: [(n, axis, where) for n, axis, where in spec.touching(g) if n in a] for g in names}
    generator = torch.Generator().manual_seed(seed)
    current = matching_objective(spec, a, b, perms)
    objective = [current]
    passes = 0
    for _ in range(max_passes):
        passes += 1
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            group = names[i]
            if not touching[group]:
                continue
            n = spec.groups[group]
            score = torch.zeros(n, n, dtype=torch.float64)
            for name, axis, where in touching[group]:
                wa = _rows(a[name], axis, where)
                wb = _rows(permute_tensor(spec, name, b[name], perms, except_axis=axis), axis, where)
                score += (wa @ wb.T).cpu()
            candidate = _assign(score)
            rows = torch.arange(n)
            tolerance = 1e-12 * max(1.0, abs(current))
            if float(score[rows, candidate].sum() - score[rows, perms[group]].sum()) <= tolerance:
                continue
            trial = {**perms, group: candidate}
            value = matching_objective(spec, a, b, trial)  # exact, also where a tensor holds the group twice
            if value > current + tolerance:
                perms, current, changed = trial, value, True
        objective.append(current)
        if not changed:
            break
    return Match("weights", perms, objective, passes)


def _site_outputs(traced: torch.fx.GraphModule, sites: Mapping[str, Any], x: Tensor) -> dict[str, Tensor]:
    """The outputs of the ``torch.fx`` nodes named in ``sites`` for input ``x`` (no grad)."""
    wanted = set(sites)
    found: dict[str, Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                found[n.name] = out
            return out

    with torch.no_grad():
        Recorder(traced).run(x)
    return found


def activation_matching(
    spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, x: Tensor, *, batch_size: int = 512
) -> Match:
    """Permutations of model B's units that maximise the summed correlation of matched units' activations over the
    inputs ``x`` (Jordan et al. 2023, after Li et al. 2016): for each permutation, the Pearson correlation of every
    unit of A with every unit of B at each of the spec's activation sites (pixels and samples pooled), summed over
    the sites, then one linear assignment. The models run in eval mode; neither is changed.

    The objective is the mean correlation of matched units over the sites, before (identity) and after.
    """
    was = model_a.training, model_b.training
    model_a.eval(), model_b.eval()
    sums: dict[tuple[str, str], dict[str, Tensor]] = {}
    count: dict[str, int] = {}
    traced = torch.fx.symbolic_trace(model_a), torch.fx.symbolic_trace(model_b)
    try:
        for xb in x.split(batch_size):
            out_a = _site_outputs(traced[0], spec.activation_sites, xb)
            out_b = _site_outputs(traced[1], spec.activation_sites, xb)
            for site, groups in spec.activation_sites.items():
                for group, where in groups.items():
                    fa, fb = _rows(out_a[site], 1, where).T, _rows(out_b[site], 1, where).T  # (samples x pixels, n)
                    s = sums.setdefault((site, group), {})
                    for key, value in (
                        ("a", fa.sum(0)),
                        ("b", fb.sum(0)),
                        ("aa", (fa * fa).sum(0)),
                        ("bb", (fb * fb).sum(0)),
                        ("ab", fa.T @ fb),
                    ):
                        s[key] = s.get(key, 0) + value.cpu()
                    count[site] = count.get(site, 0) + len(fa)
    finally:
        model_a.train(was[0]), model_b.train(was[1])
    correlation = {g: torch.zeros(n, n, dtype=torch.float64) for g, n in spec.groups.items()}
    observed = dict.fromkeys(spec.groups, 0)  # sites per permutation
    for (site, group), s in sums.items():
        n = count[site]
        mean_a, mean_b = s["a"] / n, s["b"] / n
        std_a = (s["aa"] / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (s["bb"] / n - mean_b**2).clamp_min(0).sqrt()
        cov = s["ab"] / n - torch.outer(mean_a, mean_b)
        correlation[group] += cov / (torch.outer(std_a, std_b) + 1e-12)
        observed[group] += 1
    perms = {g: _assign(c) if observed[g] else torch.arange(len(c)) for g, c in correlation.items()}
    pairs = sum(spec.groups[g] * k for g, k in observed.items()) or 1

    def mean_corr(p):
        return float(sum(c[torch.arange(len(c)), p[g]].sum() for g, c in correlation.items()) / pairs)

    return Match("activations", perms, [mean_corr(identity_permutations(spec)), mean_corr(perms)], 1)
