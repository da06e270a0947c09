from __future__ import annotations

import pytest
import torch

from torchrl_depeff.modules.normalizers import Normalizer


class TestNormalizer:
    def test_init_identity(self):
        norm = Normalizer(4)
        x = torch.randn(3, 4)
        torch.testing.assert_close(norm.normalize(x), x)
        assert set(norm.state_dict()) == {"loc", "scale"}

    def test_fit_matches_population_stats(self):
        x = torch.randn(7, 50, 3) * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([2.0, -1.0, 0.0])
        norm = Normalizer(3)
        norm.fit(x)
        flat = x.reshape(-1, 3)
        torch.testing.assert_close(norm.loc, flat.mean(0))
        torch.testing.assert_close(norm.scale, flat.std(0, unbiased=False))
        z = norm.normalize(x).reshape(-1, 3)
        torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, atol=1e-5, rtol=1e-5)

    def test_constant_feature_gets_unit_scale(self):
        x = torch.randn(100, 2)
        x[:, 1] = 4.0
        norm = Normalizer(2)
        norm.fit(x)
        assert norm.scale[1] == 1.0
        assert norm.loc[1] == 4.0
        assert torch.isfinite(norm.normalize(x)).all()

    def test_denormalize_scale(self):
        norm = Normalizer(2)
        norm.fit(torch.tensor([[0.0, 0.0], [2.0, 4.0]]))
        torch.testing.assert_close(norm.denormalize_scale(torch.ones(2)), torch.tensor([1.0, 2.0]))

    def test_refit_replaces_stats(self):
        norm = Normalizer(1)
        norm.fit(torch.zeros(10, 1) + torch.arange(10.0)[:, None])
        norm.fit(torch.tensor([[5.0], [7.0]]))
        torch.testing.assert_close(norm.loc, torch.tensor([6.0]))
        torch.testing.assert_close(norm.scale, torch.tensor([1.0]))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_raises_with_count(self, bad):
        x = torch.randn(10, 3)
        x[2, 1] = bad
        x[5, 0] = bad
        with pytest.raises(ValueError, match="2 non-finite"):
            Normalizer(3).fit(x)

    def test_dim_mismatch_raises(self):
        with pytest.raises(ValueError, match="3"):
            Normalizer(3).fit(torch.randn(5, 4))
        with pytest.raises(ValueError, match="0"):
            Normalizer(0)

    def test_state_dict_roundtrip(self):
        a, b = Normalizer(3), Normalizer(3)
        a.fit(torch.randn(20, 3) * 4 + 1)
        b.load_state_dict(a.state_dict())
        x = torch.randn(6, 3)
        torch.testing.assert_close(a.normalize(x), b.normalize(x), rtol=0, atol=0)
