import pytest
import torch

from models import create_model
from models.whitening import patch_whitening, whiten_stem


def correlated_images(n=256, size=16, seed=0):
    """Images whose neighbouring pixels are strongly correlated (smoothed noise), like real ones."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, size + 2, size + 2, generator=g)
    return 3.0 + (noise[..., :-2, :-2] + noise[..., 1:-1, 1:-1] + noise[..., 2:, 2:]) * 2.0


@pytest.mark.parametrize("patch_size", [2, 4])
def test_whitened_stem_outputs_are_centred_and_decorrelated(patch_size):
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=3, in_chans=1, patch_size=patch_size)
    conv = model.downsample_layers[0][0]
    before = conv.weight.detach().clone()
    images = correlated_images()
    filters = whiten_stem(model, images)
    d = patch_size ** 2
    assert filters == min(2 * d, 40)
    n = filters // 2
    with torch.no_grad():
        out = conv(images).permute(0, 2, 3, 1).reshape(-1, conv.out_channels).double()
    # The whitened half: zero mean, unit variance, no correlation (up to what eps takes off the flattest directions).
    whitened = out[:, :n]
    assert whitened.mean(0).abs().max() < 1e-4
    cov = torch.cov(whitened.T)
    assert (cov - torch.eye(n, dtype=cov.dtype)).abs().max() < 0.05
    torch.testing.assert_close(conv.weight[n:2 * n], -conv.weight[:n])  # each filter with its negative
    assert torch.equal(conv.weight[2 * n:], before[2 * n:])  # filters past 2 x patch dims keep their init


def test_patch_whitening_orders_directions_by_variance():
    images = correlated_images()
    filters, mean = patch_whitening(images, 2)
    assert filters.shape == (4, 1, 2, 2) and mean.shape == (4,)
    # Larger variance directions need the smaller scale: filter norms grow down the list.
    norms = filters.flatten(1).norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1])
