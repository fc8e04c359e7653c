"""ResUNet: output geometry (even and odd sizes), gradient flow, instance norm, parameter budget."""
import torch
from torch import nn

from gnt_shiftadd.models.resunet import ResUNet


def tiny_net(out_channels: int = 8) -> ResUNet:
    return ResUNet(out_channels=out_channels, layers=(1, 1, 1), base_channels=8)


def layer1_size(net: ResUNet, images: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        return tuple(net.layer1(net.stem(images)).shape[-2:])


def test_output_is_quarter_resolution_for_even_sizes():
    torch.manual_seed(0)
    net = tiny_net()
    out = net(torch.rand(2, 3, 64, 80))
    assert out.shape == (2, 8, 16, 20)
    assert torch.isfinite(out).all()


def test_odd_sizes_match_layer1_resolution():
    torch.manual_seed(0)
    net = tiny_net(out_channels=5)
    for height, width in [(75, 101), (33, 47), (17, 23)]:
        images = torch.rand(1, 3, height, width)
        out = net(images)
        assert out.shape[:2] == (1, 5)
        assert tuple(out.shape[-2:]) == layer1_size(net, images)
    assert tuple(net(torch.rand(1, 3, 75, 101)).shape[-2:]) == (19, 26)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = tiny_net()
    out = net(torch.rand(2, 3, 40, 56))
    (out * torch.randn_like(out)).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_uses_instance_norm_not_batch_norm():
    net = tiny_net()
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.affine and not m.track_running_stats for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_default_is_resnet34_sized():
    """Default ResUNet (layers 3-4-6, 64 base channels, 32 outputs): 8,915,040 parameters
    (ResNet-34 stem + layers 1-3 = 8,174,528, U-Net decoder = 740,512)."""
    net = ResUNet()
    count = sum(p.numel() for p in net.parameters())
    assert 8.5e6 < count < 9.5e6, count
    out = net(torch.rand(1, 3, 32, 48))
    assert out.shape == (1, 32, 8, 12)
