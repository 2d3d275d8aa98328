import pytest
import torch
from torch import nn

from pipeline.config import RESNET_NORMS, ConfigError, ModelConfig, parse_params
from pipeline.curvature.operators import HessianOperator, ProbeSet, dense_matrix
from pipeline.training.models import MLP, BasicBlock, PadShortcut, ResNet, build_model, count_parameters


def test_resnet20_has_the_published_parameter_count():
    # He et al. (2016), CIFAR ResNet20 with parameter-free shortcuts: 0.27M (269,722 with 10 classes).
    assert count_parameters(build_model("resnet20", ModelConfig(), (3, 32, 32), 10)) == 269_722


def test_noshort_differs_only_by_the_missing_shortcuts():
    with_skip = build_model("resnet20", ModelConfig(), (3, 32, 32), 10)
    without = build_model("resnet20_noshort", ModelConfig(), (3, 32, 32), 10)
    assert count_parameters(without) == count_parameters(with_skip)  # option-A shortcuts have no parameters
    assert any(isinstance(m, PadShortcut) for m in with_skip.modules())
    assert all(b.shortcut is None for b in without.modules() if isinstance(b, BasicBlock))
    assert [n for n, _ in without.named_parameters()] == [n for n, _ in with_skip.named_parameters()]


def test_mlp_parameter_count_follows_depth_and_width():
    cfg = ModelConfig(mlp_depth=2, mlp_width=32)
    # 64 -> 32 -> 32 -> 10, weights and biases
    assert count_parameters(build_model("mlp", cfg, (1, 8, 8), 10)) == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert count_parameters(build_model("mlp", ModelConfig(mlp_depth=0), (1, 8, 8), 3)) == 64 * 3 + 3


@pytest.mark.parametrize("name", ["mlp", "resnet20", "resnet20_noshort"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_models_map_batches_to_class_logits(name, shape):
    model = build_model(name, ModelConfig(mlp_width=16), shape, 7)
    assert model(torch.randn(3, *shape)).shape == (3, 7)


def test_pad_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="allowed: mlp, resnet, resnet<depth>"):
        build_model("vgg", ModelConfig(), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="depth 6n \\+ 2"):
        build_model("resnet21", ModelConfig(), (1, 8, 8), 10)


# He et al. (2016), Table 6: CIFAR-10 ResNets with option-A shortcuts, at 3x32x32 and 10 classes.
PUBLISHED_PARAMETERS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}  # millions


@pytest.mark.parametrize("depth", sorted(PUBLISHED_PARAMETERS))
def test_the_resnet_family_has_the_published_parameter_counts(depth):
    for name in (f"resnet{depth}", f"resnet{depth}_noshort"):
        n = count_parameters(build_model(name, ModelConfig(), (3, 32, 32), 10))
        assert round(n / 1e6, 2 if depth < 100 else 1) == PUBLISHED_PARAMETERS[depth], (name, n)
    # the family's own spelling gives the same network
    family = build_model("resnet", ModelConfig(resnet_depth=depth), (3, 32, 32), 10)
    assert count_parameters(family) == count_parameters(build_model(f"resnet{depth}", ModelConfig(), (3, 32, 32), 10))


def _weights(build) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build().state_dict()


@pytest.mark.parametrize("shortcut", [True, False])
def test_the_old_names_are_aliases_with_bitwise_identical_weights(shortcut):
    """``resnet20``/``resnet20_noshort`` are the family at depth 20, and both build exactly what the constructor the
    pipeline always called builds for the same seed (same modules in the same order, same initialisation draws)."""
    alias = "resnet20" if shortcut else "resnet20_noshort"
    old = _weights(lambda: ResNet(1, 10, blocks_per_stage=3, shortcut=shortcut))
    for build in (
        lambda: build_model(alias, ModelConfig(), (1, 8, 8), 10),
        lambda: build_model("resnet", ModelConfig(resnet_depth=20, resnet_shortcut=shortcut), (1, 8, 8), 10),
    ):
        new = _weights(build)
        assert list(new) == list(old)
        assert all(torch.equal(new[k], old[k]) for k in old)


def test_width_multiplier_scales_the_channels():
    model = build_model("resnet", ModelConfig(resnet_depth=8, resnet_width=2), (3, 32, 32), 10)
    assert [model.conv1.out_channels, model.layer2[0].conv1.out_channels, model.fc.in_features] == [32, 64, 128]
    quarter = build_model("resnet", ModelConfig(resnet_depth=8, resnet_width=0.25), (3, 32, 32), 10)
    assert [quarter.conv1.out_channels, quarter.fc.in_features] == [4, 16]
    with pytest.raises(ConfigError, match="model.resnet_width: 16 x 0.3 = 4.8 is not a whole number"):
        ModelConfig(resnet_width=0.3)
    with pytest.raises(ConfigError, match="model.resnet_depth: must be 6n \\+ 2"):
        ModelConfig(resnet_depth=21)


@pytest.mark.parametrize("norm", RESNET_NORMS)
def test_every_normalisation_gives_a_working_network(norm):
    model = build_model("resnet", ModelConfig(resnet_depth=8, resnet_width=0.25, resnet_norm=norm), (1, 8, 8), 3)
    kinds = {"batch": nn.BatchNorm2d, "group": nn.GroupNorm, "layer": nn.GroupNorm, "none": nn.Identity}
    assert isinstance(model.layer1[0].bn1, kinds[norm])
    if norm == "layer":
        assert model.layer1[0].bn1.num_groups == 1
    if norm == "group":  # 8 groups asked, 4 channels: the largest divisor of 4 not above 8
        assert model.layer1[0].bn1.num_groups == 4 and model.layer3[0].bn1.num_groups == 8
    assert (model.conv1.bias is not None) == (norm == "none")  # without a normalisation the convolutions have biases
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)


@pytest.mark.parametrize("norm", RESNET_NORMS)
def test_the_curvature_of_every_normalisation_matches_a_dense_float64_hessian(norm):
    """Depth 8, width 1/4: the operator's Hessian block of ``layer1.0`` and ``fc`` (repeatability check passed in
    eval mode) against ``torch.autograd.functional.hessian`` of the same loss, both float64."""
    torch.manual_seed(0)
    cfg = ModelConfig(resnet_depth=8, resnet_width=0.25, resnet_norm=norm)
    model = build_model("resnet", cfg, (1, 6, 6), 3).double()
    x, y = torch.randn(12, 1, 6, 6, dtype=torch.float64), torch.arange(12) % 3
    if norm == "batch":  # running statistics that are not the identity map
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    wrt = [n for n, _ in model.named_parameters() if n.startswith(("layer1.0.", "fc."))]
    op = HessianOperator(model, ProbeSet.from_tensors(x, y, 5), wrt=wrt)  # batches of 5, 5, 2
    dense = dense_matrix(op)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in wrt]

    def loss(*flat):
        values = {n: t.view(s) for n, t, s in zip(wrt, flat, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, {**params, **values}, (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params[n].detach().reshape(-1) for n in wrt))
    reference = torch.cat([torch.cat(list(row), dim=1) for row in blocks], dim=0)
    assert dense.shape == reference.shape == (op.dim, op.dim)
    torch.testing.assert_close(dense, reference, rtol=1e-9, atol=1e-11)


def test_mlp_takes_one_width_per_hidden_layer():
    model = build_model("mlp", ModelConfig(mlp_widths=(32, 16)), (1, 8, 8), 10)
    assert isinstance(model, MLP)
    assert [m.out_features for m in model.net if isinstance(m, nn.Linear)] == [32, 16, 10]
    assert count_parameters(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


@pytest.mark.parametrize(
    "model, needle",
    [
        ("resnet21", "runs.a.model: 'resnet21': a CIFAR ResNet has depth 6n + 2"),
        ("resnet2", "runs.a.model: 'resnet2': a CIFAR ResNet has depth 6n + 2"),
        ("vgg", "runs.a.model: unknown model 'vgg'; allowed: mlp, resnet, resnet<depth>"),
        ("models.x:", "runs.a.model: unknown model 'models.x:'"),
    ],
)
def test_run_model_names_are_checked_at_load(model, needle):
    with pytest.raises(ConfigError) as info:
        parse_params({"runs": {"a": {"model": model}}})
    assert str(info.value).startswith(needle) and "\n" not in str(info.value)


def test_model_names_and_kwargs_that_load():
    params = parse_params(
        {
            "runs": {
                "deep": {"model": "resnet56_noshort"},
                "mine": {"model": "models.example:small_cnn", "model_kwargs": {"channels": 4, "tags": [1, 2]}},
            }
        }
    )
    assert params.run("mine").model.model_kwargs == (("channels", 4), ("tags", (1, 2)))
    with pytest.raises(ConfigError, match="runs.mine.model_kwargs.f: expected a plain value"):
        parse_params({"runs": {"mine": {"model": "m:f", "model_kwargs": {"f": {"nested": 1}}}}})
