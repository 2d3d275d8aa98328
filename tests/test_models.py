import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.training.models import BasicBlock, PadShortcut, build_model, count_parameters


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
    with pytest.raises(ValueError, match="allowed: mlp, resnet20, resnet20_noshort"):
        build_model("vgg", ModelConfig(), (1, 8, 8), 10)
