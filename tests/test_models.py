"""The ConvNet's CPU pooling gives PyTorch's average-pool values, bit for bit, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from d4m.models import AvgPool2x2, build_model


@pytest.mark.parametrize("shape", [(5, 16, 32, 32), (3, 4, 7, 9), (2, 3, 15, 14), (1, 1, 2, 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pool_equals_avg_pool2d_bitwise(shape, layout):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).exp() * 100).contiguous(
        memory_format=layout)
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = AvgPool2x2()(ours), F.avg_pool2d(reference, 2, 2)
    assert out.shape == expected.shape and torch.equal(out, expected)
    grad = torch.randn(expected.shape, generator=gen)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours.grad, reference.grad)


def test_convnet_trains_as_with_avg_pool2d():
    """Ten AdamW steps of the ConvNet end at the same weights with its pooling as with nn.AvgPool2d."""
    torch.manual_seed(0)
    ours = build_model("convnet", 10, 32)
    reference = build_model("convnet", 10, 32)
    reference.load_state_dict(ours.state_dict())
    for i, layer in enumerate(reference.features):
        if isinstance(layer, AvgPool2x2):
            reference.features[i] = torch.nn.AvgPool2d(2, 2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for model in (ours, reference):
        optimiser = torch.optim.AdamW(model.parameters())
        for _ in range(10):
            optimiser.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimiser.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters()))
    assert sum(isinstance(m, AvgPool2x2) for m in ours.modules()) == 3
