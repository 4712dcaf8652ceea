import pytest
import torch

from po_cluster.model.spectral import SpectralLayer


def _trained_layer(dim=6, seed=0) -> SpectralLayer:
    torch.manual_seed(seed)
    layer = SpectralLayer(dim)
    with torch.no_grad():
        layer.skew.normal_(0, 0.5)
        layer.log_sigma.normal_(0, 0.5)
    return layer


def test_untrained_layer_is_exactly_identity():
    layer = SpectralLayer(5)
    z = torch.randn(3, 5)
    assert torch.equal(layer.matrix(), torch.eye(5))
    assert torch.allclose(layer(z), z, atol=0)


def test_basis_is_orthogonal_and_w_symmetric_positive():
    layer = _trained_layer()
    v = layer.basis()
    assert torch.allclose(v @ v.T, torch.eye(6), atol=1e-5)
    w = layer.matrix()
    assert torch.allclose(w, w.T, atol=1e-6)
    assert torch.all(torch.linalg.eigvalsh(w) > 0)
    # the eigenvalues of W are the σ_i
    assert torch.allclose(torch.linalg.eigvalsh(w).sort().values, layer.sigma().sort().values, atol=1e-5)


def test_t_knob():
    layer = _trained_layer()
    z = torch.randn(4, 6)
    assert torch.equal(layer(z, t=0.0), z)  # exactly the starting model
    w1, w2, wm1 = layer.matrix(1.0), layer.matrix(2.0), layer.matrix(-1.0)
    assert torch.allclose(w2, w1 @ w1, atol=1e-5)  # t = 2 applies what was learned twice
    assert torch.allclose(wm1 @ w1, torch.eye(6), atol=1e-5)  # t = -1 reverses it
    assert torch.allclose(layer(z, t=1.0), z @ w1, atol=1e-5)


def test_sigma_overrides():
    layer = _trained_layer()
    sigma = layer.sigma(1.0, {2: 3.0})
    assert sigma[2] == 3.0
    assert torch.equal(sigma[:2], layer.sigma(1.0)[:2])
    with pytest.raises(IndexError, match="out of range"):
        layer.sigma(1.0, {6: 1.0})
    with pytest.raises(ValueError, match="> 0"):
        layer.sigma(1.0, {0: 0.0})
    # overrides apply even at t = 0
    z = torch.randn(2, 6)
    assert not torch.allclose(layer(z, 0.0, {0: 5.0}), z)
