"""Permutation alignment (weight and activation matching) and the paths with reset or repaired statistics, checked
against what must hold exactly: a permuted network is the same function, a permuted copy is matched back to
itself, weight matching of one hidden layer is the brute-force optimum, ``reset`` is ``update_bn``, ``repair``
gives each channel the interpolated statistics, and every path variant ends at its endpoint models."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections import Counter

import pytest
import torch
import torch.fx
from torch import nn

from models.example import small_cnn
from pipeline.config import ModelConfig
from pipeline.errors import ModelError
from pipeline.landscape.connectivity import (
    align_partner,
    connectivity_summary,
    evaluate_model,
    interpolate_state,
    model_state,
    reset_statistics,
    site_statistics,
    statistics_path,
)
from pipeline.landscape.engine import evaluate_points
from pipeline.landscape.permutation import (
    _site_outputs,
    activation_matching,
    inverse,
    matching_objective,
    permutation_spec,
    permute,
    random_permutations,
    weight_matching,
)
from pipeline.landscape.plan import path_scan, state
from pipeline.training.models import build_model

SHAPE = (3, 8, 8)
ARCHITECTURES = {
    "mlp": ("mlp", {"mlp_widths": (12, 10)}),
    "mlp_tanh": ("mlp", {"mlp_widths": (9,), "mlp_activation": "tanh"}),
    "resnet8": ("resnet", {"resnet_depth": 8, "resnet_width": 0.5}),
    "resnet14_noshort": ("resnet", {"resnet_depth": 14, "resnet_width": 0.25, "resnet_shortcut": False}),
    "resnet8_group": ("resnet", {"resnet_depth": 8, "resnet_width": 0.5, "resnet_norm": "group", "resnet_groups": 4}),
    "resnet8_layer": ("resnet", {"resnet_depth": 8, "resnet_width": 0.5, "resnet_norm": "layer"}),
    "resnet8_none": ("resnet", {"resnet_depth": 8, "resnet_width": 0.5, "resnet_norm": "none"}),
    "resnet14_group_noshort": (
        "resnet",
        {"resnet_depth": 14, "resnet_width": 0.5, "resnet_norm": "group", "resnet_shortcut": False},
    ),
}


def make(arch: str, seed: int = 0) -> nn.Module:
    name, overrides = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = build_model(name, dataclasses.replace(ModelConfig(), **overrides), SHAPE, 10).eval()
    # BatchNorm statistics and affine maps away from (0, 1) and (1, 0), so that a permutation that misses them shows
    generator = torch.Generator().manual_seed(seed + 100)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(generator=generator)
    return model


def trainable(model: nn.Module, tensors: dict) -> dict:
    names = {n for n, _ in model.named_parameters()}
    return {n: t for n, t in tensors.items() if n in names}


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def permuted_copy(model: nn.Module, seed: int = 2):
    spec = permutation_spec(model, SHAPE)
    perms = random_permutations(spec, torch.Generator().manual_seed(seed))
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(permute(spec, model_state(model), perms))
    return spec, perms, permuted


# --------------------------------------------------------------------------------------------------------------
# The spec
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_a_random_permutation_of_the_spec_leaves_the_function_unchanged(arch):
    model = make(arch)
    spec, _, permuted = permuted_copy(model)
    assert spec.groups, "the spec found no permutation"
    x, y = inputs(), torch.arange(64) % 10
    with torch.no_grad():
        before, after = model(x), permuted(x)
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * float(before.abs().max()))
    assert evaluate_model(permuted, x, y)[0] == pytest.approx(evaluate_model(model, x, y)[0], rel=1e-6)
    changed = [n for n, t in model_state(model).items() if not torch.equal(t, model_state(permuted)[n])]
    assert changed  # the permutation did move tensors


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_spec_covers_every_parameter_and_buffer(arch):
    model = make(arch)
    spec = permutation_spec(model, SHAPE)
    names = set(model_state(model))
    assert set(spec.axes) | set(spec.fixed) == names and not set(spec.axes) & set(spec.fixed)
    for tensor, by_axis in spec.axes.items():
        for axis, groups in by_axis.items():
            for group, where in groups.items():
                assert sorted(where) == sorted(set(where)) and len(where) == spec.groups[group]


def test_the_spec_has_the_permutations_the_architecture_implies():
    # ResNet-8 at width 1/2 (8, 16, 32 channels): the stem and one block per stage
    with_skips = permutation_spec(make("resnet8"), SHAPE)
    # the residual stream of stage 1 (the stem and the first block's output), each block's inner channels, and the
    # channels that the option-A shortcuts of stages 2 and 3 pad around the stream
    assert with_skips.groups == {
        "conv1": 8,
        "layer1.0.conv1": 8,
        "layer2.0.conv1": 16,
        "layer2.0.conv2": 16 - 8,
        "layer3.0.conv1": 32,
        "layer3.0.conv2": 32 - 16,
    }
    assert with_skips.axes["layer2.0.conv2.weight"][0] == {
        "conv1": list(range(4, 12)),
        "layer2.0.conv2": [*range(4), *range(12, 16)],
    }
    without = permutation_spec(make("resnet14_noshort"), SHAPE)
    convs = [n[: -len(".weight")] for n in model_state(make("resnet14_noshort")) if "conv" in n]
    assert list(without.groups) == convs  # one permutation per layer
    assert list(without.groups.values()) == [4, 4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]
    mlp = permutation_spec(make("mlp"), SHAPE)
    assert mlp.groups == {"net.1": 12, "net.3": 10} and "net.5.bias" in mlp.fixed
    # 4 groups per GroupNorm: units move only within their group, so each permutation above splits into one per
    # group of channels (2, 4, 8 per group at widths 8, 16, 32; the stream of stage 1 sits inside stage 2's groups)
    group = permutation_spec(make("resnet8_group"), SHAPE)
    assert Counter(group.groups.values()) == {2: 8, 4: 6, 8: 6}
    assert sum(group.groups.values()) == sum(with_skips.groups.values())
    assert len(permutation_spec(small_cnn((3, 8, 8), 10, channels=4, hidden=6), SHAPE).groups) == 3


class _ParameterOutsideALayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(192, 5)
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.layer(x.flatten(1)) * self.scale


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.spare = nn.Linear(192, 5), nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(x.flatten(1))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(192, 5)

    def forward(self, x):
        return self.layer(x.flatten(1)) if x.sum() > 0 else -self.layer(x.flatten(1))


@pytest.mark.parametrize(
    "model, message",
    [
        (_ParameterOutsideALayer(), "uses the tensor 'scale' outside a layer"),
        (_Unused(), "the tensor 'spare.weight' is not used by the forward"),
        (_DataDependent(), "torch.fx cannot trace its forward"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10)), "flattens 4 permuted channels"),
        (nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.LSTMCell(8, 8)), "LSTMCell"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 1, groups=2)), "convolution with 2 groups"),
    ],
)
def test_a_network_the_spec_cannot_follow_is_refused_in_one_line(model, message):
    with pytest.raises(ModelError) as error:
        permutation_spec(model, SHAPE, what="mine")
    assert message in str(error.value) and str(error.value).startswith("mine: ")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("arch", ["mlp", "resnet8", "resnet14_noshort", "resnet8_group", "resnet8_none"])
def test_matching_a_permuted_copy_recovers_the_permutation_and_a_zero_barrier(arch, method):
    model = make(arch)
    spec, perms, permuted = permuted_copy(model)
    if method == "weights":
        match = weight_matching(spec, trainable(model, model_state(model)), trainable(model, model_state(permuted)))
    else:
        match = activation_matching(spec, model, permuted, inputs(512))
    expected = inverse(perms)
    if method == "weights":
        assert all(torch.equal(match.perms[g], expected[g]) for g in spec.groups)
        back = permute(spec, model_state(permuted), match.perms)
        assert all(torch.equal(back[n], t) for n, t in model_state(model).items())
    else:  # units whose activations are zero on every input (dead ReLUs) may match any other dead unit
        outputs = _site_outputs(torch.fx.symbolic_trace(model), spec.activation_sites, inputs(512))
        for group in spec.groups:
            live = torch.zeros(spec.groups[group], dtype=torch.bool)
            for site, groups in spec.activation_sites.items():
                if group in groups:
                    live |= outputs[site][:, groups[group]].reshape(512, len(live), -1).abs().amax(dim=(0, 2)) > 0
            assert live.any() and torch.equal(match.perms[group][live], expected[group][live]), group
    aligned = align_partner(model, permuted, method, inputs(512)).model
    ts = torch.linspace(0, 1, 5, dtype=torch.float64)
    x, y = inputs(32, seed=5), torch.arange(32) % 10
    path = statistics_path(model, aligned, ts, "interpolate", x, {"train": (x, y)})["train"][0]
    assert float(path.max() - path.min()) <= 1e-6 * float(path.abs().max())  # zero barrier: the same network
    naive = statistics_path(model, permuted, ts, "interpolate", x, {"train": (x, y)})["train"][0]
    assert float((naive - naive[0]).abs().max()) > 1e-3  # while the unaligned path is another one


def test_weight_matching_of_one_hidden_layer_is_the_brute_force_optimum():
    torch.manual_seed(3)
    a = nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.ReLU(), nn.Linear(6, 10))
    b = nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.ReLU(), nn.Linear(6, 10))
    spec = permutation_spec(a, SHAPE)
    assert spec.groups == {"1": 6}
    sa, sb = trainable(a, model_state(a)), trainable(b, model_state(b))
    best = max(
        itertools.permutations(range(6)),
        key=lambda p: matching_objective(spec, sa, sb, {"1": torch.tensor(p)}),
    )
    match = weight_matching(spec, sa, sb)
    assert match.perms["1"].tolist() == list(best)
    assert match.objective[-1] == pytest.approx(matching_objective(spec, sa, sb, {"1": torch.tensor(best)}), rel=1e-12)


@pytest.mark.parametrize("arch", ["resnet8", "resnet14_noshort", "mlp"])
def test_weight_matching_never_lowers_the_objective_and_is_seeded(arch):
    a, b = make(arch, seed=0), make(arch, seed=7)
    spec = permutation_spec(a, SHAPE)
    sa, sb = trainable(a, model_state(a)), trainable(a, model_state(b))
    first = weight_matching(spec, sa, sb, seed=4)
    assert first.passes >= 2 and len(first.objective) == first.passes + 1
    assert all(later >= earlier for earlier, later in zip(first.objective, first.objective[1:]))
    assert first.objective[-1] > first.objective[0]
    assert first.objective[-1] == pytest.approx(matching_objective(spec, sa, sb, first.perms), rel=1e-12)
    again = weight_matching(spec, sa, sb, seed=4)
    assert all(torch.equal(first.perms[g], again.perms[g]) for g in spec.groups) and first.objective == again.objective
    limited = weight_matching(spec, sa, sb, seed=4, max_passes=1)
    assert limited.passes == 1 and limited.objective[-1] <= first.objective[-1]


def test_alignment_leaves_both_models_untouched_and_checks_the_function():
    a, b = make("resnet8", 0), make("resnet8", 7)
    before = {n: t.clone() for n, t in {**model_state(a), **{f"b.{k}": v for k, v in model_state(b).items()}}.items()}
    result = align_partner(a, b, "weights", inputs(64))
    after = {**model_state(a), **{f"b.{k}": v for k, v in model_state(b).items()}}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert result.output_change < 1e-5
    assert result.match.objective[-1] > result.match.objective[0]


# --------------------------------------------------------------------------------------------------------------
# Paths with recomputed or repaired statistics
# --------------------------------------------------------------------------------------------------------------


def test_reset_is_torch_update_bn():
    model = make("resnet8")
    x = inputs(96)
    ours = copy.deepcopy(model)
    reset_statistics(ours, x, batch_size=32)
    theirs = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn([(xb,) for xb in x.split(32)], theirs)
    for (name, mine), (_, reference) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert torch.allclose(mine, reference, rtol=1e-6, atol=1e-7), name
    assert not ours.training


@pytest.mark.parametrize("arch", ["resnet8", "resnet8_none", "mlp", "resnet8_layer"])
def test_every_path_variant_ends_at_its_endpoint_models(arch):
    a, b = make(arch, 0), make(arch, 7)
    spec = permutation_spec(a, SHAPE)
    x, y = inputs(80), torch.arange(80) % 10
    test = (inputs(40, seed=9), torch.arange(40) % 10)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    splits = {"train": (x, y), "test": test}
    ends = {name: (evaluate_model(a, *split), evaluate_model(b, *split)) for name, split in splits.items()}
    for mode in ("interpolate", "repair"):
        path = statistics_path(a, b, ts, mode, x, splits, sites=list(spec.repair_sites))
        for name in splits:
            (la, aa), (lb, ab) = ends[name]
            assert float(path[name][0][0]) == pytest.approx(la, rel=1e-5) and float(path[name][1][0]) == aa
            assert float(path[name][0][-1]) == pytest.approx(lb, rel=1e-5) and float(path[name][1][-1]) == ab
    reset = statistics_path(a, b, ts, "reset", x, splits)
    for end, model in ((0, a), (-1, b)):
        recomputed = copy.deepcopy(model)
        reset_statistics(recomputed, x)
        for name, split in splits.items():
            assert float(reset[name][0][end]) == pytest.approx(evaluate_model(recomputed, *split)[0], rel=1e-6)


def test_repair_gives_every_site_the_interpolated_statistics():
    a, b = make("resnet8_none", 0), make("resnet8_none", 7)
    spec = permutation_spec(a, SHAPE)
    sites = list(spec.repair_sites)
    x = inputs(128)
    at_a, at_b = site_statistics(a, sites, x), site_statistics(b, sites, x)
    t = 0.3
    # the corrected midpoint network, measured from outside: the hooks of statistics_path, re-applied by hand
    from pipeline.landscape import connectivity

    scratch = copy.deepcopy(a)
    scratch.load_state_dict(interpolate_state(model_state(a), model_state(b), t))
    targets = {s: ((1 - t) * at_a[s][0] + t * at_b[s][0], (1 - t) * at_a[s][1] + t * at_b[s][1]) for s in sites}
    repair = connectivity._Repair(targets)
    handles = connectivity._hooked(scratch, sites, repair.hook)
    with torch.no_grad():
        scratch(x)
    repair.collect = False
    measured = site_statistics(scratch, sites, x)
    for h in handles:
        h.remove()
    plain = site_statistics(scratch, sites, x)
    for s in sites:
        assert torch.allclose(measured[s][0], targets[s][0], atol=1e-5 * float(targets[s][1].max()))
        assert torch.allclose(measured[s][1], targets[s][1], rtol=1e-5)
    assert any(not torch.allclose(plain[s][1], targets[s][1], rtol=1e-2) for s in sites)  # it did correct something


def test_the_interpolated_variant_is_the_scan_engines_path():
    a, b = make("resnet8", 0), make("resnet8", 7)
    x, y = inputs(48), torch.arange(48) % 10
    scan = path_scan("partner", state(a), state(b), 5, other_is_start=False)
    engine_loss, engine_accuracy = evaluate_points(
        a,
        *state(a),
        [scan.direction],
        scan.coords,
        x,
        y,
        chunk=1,
        buffer_directions=[scan.buffer_direction],
        channels_last=False,
    )
    ours = statistics_path(a, b, scan.alpha, "interpolate", x, {"train": (x, y)})["train"]
    assert torch.allclose(ours[0], engine_loss, rtol=1e-6) and torch.equal(ours[1], engine_accuracy)


def test_the_summary_of_a_path_follows_the_papers_definitions():
    ts = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    loss = torch.tensor([1.0, 2.0, 3.0, 2.5, 0.6], dtype=torch.float64)
    accuracy = torch.tensor([0.9, 0.6, 0.4, 0.5, 0.8], dtype=torch.float64)
    summary = connectivity_summary(ts, loss, accuracy)
    assert summary["loss_barrier"] == pytest.approx(3.0 - 0.8)
    assert summary["accuracy_barrier"] == pytest.approx(100 * (0.85 - 0.4))
    assert summary["midpoint_accuracy"] == 0.4 and summary["midpoint_t"] == 0.5
    assert (summary["start_accuracy"], summary["end_accuracy"]) == (0.9, 0.8)
