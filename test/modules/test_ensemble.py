from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from torchrl_depeff.modules.ensemble import DynamicsEnsemble, EnsembleLinear, EnsembleMLP

KERNELS = ["bmm", "loop", "auto"]


def _linear_ref(layer: EnsembleLinear, x: torch.Tensor, shared: bool) -> torch.Tensor:
    return torch.stack(
        [
            (x if shared else x[e]) @ layer.weight[e] + layer.bias[e, 0]
            for e in range(layer.num_members)
        ]
    )


class TestEnsembleLinear:
    @pytest.mark.parametrize("kernel", KERNELS)
    @pytest.mark.parametrize("shared", [True, False])
    def test_matches_member_loop(self, kernel, shared):
        layer = EnsembleLinear(4, 6, 3, kernel=kernel)
        x = torch.randn(2, 5, 6) if shared else torch.randn(4, 2, 5, 6)
        out = layer(x, member_first=not shared)
        assert out.shape == (4, 2, 5, 3)
        torch.testing.assert_close(out, _linear_ref(layer, x, shared), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("kernel", ["bmm", "loop"])
    def test_big_layer_kernels_agree(self, kernel):
        # the "auto" rule switches to "loop" for big layers: both must give the same numbers
        layer = EnsembleLinear(2, 600, 500, kernel=kernel)
        x = torch.randn(2, 7, 600)
        torch.testing.assert_close(layer(x), _linear_ref(layer, x, False), atol=1e-4, rtol=1e-5)

    def test_infers_member_first(self):
        layer = EnsembleLinear(3, 2, 2)
        assert layer(torch.randn(3, 4, 2)).shape == (3, 4, 2)
        assert layer(torch.randn(4, 2)).shape == (3, 4, 2)

    def test_independent_init_like_nn_linear(self):
        layer = EnsembleLinear(5, 64, 32)
        bound = 1 / math.sqrt(64)
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        # uniform on [-b, b] has std b / sqrt(3)
        assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        for i in range(5):
            for j in range(i + 1, 5):
                assert not torch.allclose(layer.weight[i], layer.weight[j])
                assert not torch.allclose(layer.bias[i], layer.bias[j])

    @pytest.mark.parametrize("kernel", ["bmm", "loop"])
    def test_member_gradient_isolation(self, kernel):
        layer = EnsembleLinear(4, 3, 2, kernel=kernel)
        out = layer(torch.randn(10, 3), member_first=False)
        out[2].pow(2).sum().backward()
        for e in range(4):
            nonzero = layer.weight.grad[e].abs().sum() > 0
            assert bool(nonzero) == (e == 2)
            assert bool(layer.bias.grad[e].abs().sum() > 0) == (e == 2)

    def test_validation(self):
        with pytest.raises(ValueError, match="num_members"):
            EnsembleLinear(0, 3, 2)
        with pytest.raises(ValueError, match="kernel"):
            EnsembleLinear(2, 3, 2, kernel="fast")
        with pytest.raises(ValueError, match="3"):
            EnsembleLinear(2, 3, 2)(torch.randn(5, 4))


class TestEnsembleMLP:
    @pytest.mark.parametrize("kernel", KERNELS)
    @pytest.mark.parametrize("shared", [True, False])
    def test_matches_member_loop(self, kernel, shared):
        mlp = EnsembleMLP(3, 4, 2, num_cells=(8, 5), activation_class=nn.SiLU, kernel=kernel)
        x = torch.randn(6, 4) if shared else torch.randn(3, 6, 4)
        out = mlp(x, member_first=not shared)
        ref = []
        for e in range(3):
            h = x if shared else x[e]
            for i, layer in enumerate(mlp.layers):
                h = h @ layer.weight[e] + layer.bias[e, 0]
                if i < len(mlp.layers) - 1:
                    h = torch.nn.functional.silu(h)
            ref.append(h)
            torch.testing.assert_close(mlp.forward_member(x if shared else x[e], e), h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=1e-5)


    @pytest.mark.parametrize("kernel", KERNELS)
    def test_member_gradient_isolation(self, kernel):
        mlp = EnsembleMLP(3, 4, 2, num_cells=(8,), kernel=kernel)
        mlp(torch.randn(3, 5, 4), member_first=True)[1].sum().backward()
        for layer in mlp.layers:
            norms = layer.weight.grad.flatten(1).abs().sum(1)
            assert norms[1] > 0 and norms[0] == 0 and norms[2] == 0

    def test_auto_rule(self):
        assert EnsembleMLP(2, 23, 17, num_cells=(1024, 1024))._cpu_kernel == "loop"
        assert EnsembleMLP(2, 23, 17, num_cells=(200, 200, 200, 200))._cpu_kernel == "bmm"
        mlp = EnsembleMLP(2, 23, 17, num_cells=(600, 600))  # loop on CPU: same numbers as bmm
        x = torch.randn(2, 9, 23)
        ref = EnsembleMLP(2, 23, 17, num_cells=(600, 600), kernel="bmm")
        ref.load_state_dict(mlp.state_dict())
        torch.testing.assert_close(mlp(x), ref(x), atol=1e-5, rtol=1e-5)


def _model(**kwargs) -> DynamicsEnsemble:
    kw = dict(num_members=4, num_cells=(16, 16))
    kw.update(kwargs)
    model = DynamicsEnsemble(3, 2, **kw)
    obs, act = torch.randn(64, 3) * 2 + 1, torch.randn(64, 2)
    next_obs = obs + 0.5 * torch.randn(64, 3)
    model.fit_normalizers(obs, act, next_obs, torch.randn(64, 1) * 3 if model.predict_reward else None)
    return model


class TestDynamicsEnsemble:
    @pytest.mark.parametrize("probabilistic", [False, True])
    @pytest.mark.parametrize("predict_reward", [False, True])
    def test_forward_shapes_and_keys(self, probabilistic, predict_reward):
        model = _model(probabilistic=probabilistic, predict_reward=predict_reward)
        td = TensorDict({"observation": torch.randn(5, 7, 3), "action": torch.randn(5, 7, 2)}, [5, 7])
        out = model(td)
        assert out["loc"].shape == (5, 7, 4, 3)
        assert ("scale" in out.keys()) == probabilistic
        assert ("reward" in out.keys()) == predict_reward
        assert model.out_keys == ["loc"] + ["scale"] * probabilistic + ["reward"] * predict_reward
        if probabilistic:
            assert out["scale"].shape == (5, 7, 4, 3) and (out["scale"] > 0).all()
        if predict_reward:
            assert out["reward"].shape == (5, 7, 4, 1)
        pred = model.predict(td["observation"], td["action"])
        torch.testing.assert_close(out["loc"], pred.loc.movedim(0, -2))

    @pytest.mark.parametrize("probabilistic", [False, True])
    def test_loc_is_obs_plus_denormalised_delta(self, probabilistic):
        model = _model(probabilistic=probabilistic, predict_reward=True)
        obs, act = torch.randn(9, 3), torch.randn(9, 2)
        mean, log_var = model.forward_normalized(obs, act)
        pred = model.predict(obs, act)
        tn = model.target_normalizer
        target = mean * tn.scale + tn.loc
        torch.testing.assert_close(pred.loc, obs + target[..., :3])
        torch.testing.assert_close(pred.reward, target[..., 3:])
        if probabilistic:
            torch.testing.assert_close(pred.scale, (0.5 * log_var).exp()[..., :3] * tn.scale[:3])
            assert (log_var >= model.min_logvar - 1e-6).all() and (log_var <= model.max_logvar + 1e-6).all()

    def test_member_first_inputs(self):
        model = _model(probabilistic=True)
        obs, act = torch.randn(4, 6, 3), torch.randn(4, 6, 2)
        mean, _ = model.forward_normalized(obs, act, member_first=True)
        for e in range(4):
            ref, _ = model.forward_normalized(obs[e], act[e])
            torch.testing.assert_close(mean[e], ref[e], atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("grouped_kernel", ["grouped_mm", "gather", "padded", "loop"])
    @pytest.mark.parametrize("probabilistic", [False, True])
    def test_member_index_equals_gather(self, grouped_kernel, probabilistic):
        model = _model(probabilistic=probabilistic, predict_reward=True, grouped_kernel=grouped_kernel)
        obs, act = torch.randn(5, 11, 3), torch.randn(5, 11, 2)
        idx = torch.randint(4, (5, 11))
        idx[0, :4] = 3  # make groups unbalanced
        with torch.no_grad():
            full = model.predict(obs, act)
            part = model.predict(obs, act, member_index=idx)

        def gather(x):
            return x.gather(0, idx[None, ..., None].expand(1, *idx.shape, x.shape[-1]))[0]

        torch.testing.assert_close(part.loc, gather(full.loc), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.reward, gather(full.reward), atol=1e-5, rtol=1e-5)
        if probabilistic:
            torch.testing.assert_close(part.scale, gather(full.scale), atol=1e-5, rtol=1e-5)

    def test_member_index_with_missing_member(self):
        model = _model()
        obs, act = torch.randn(6, 3), torch.randn(6, 2)
        idx = torch.tensor([0, 0, 2, 2, 2, 0])
        full = model.predict(obs, act).loc
        torch.testing.assert_close(model.predict(obs, act, member_index=idx).loc, full[idx, torch.arange(6)])

    @pytest.mark.parametrize("grouped_kernel", ["padded", "loop"])
    def test_member_index_does_not_run_full_batch(self, grouped_kernel):
        model = _model(grouped_kernel=grouped_kernel)
        rows = []
        net = model.network
        fwd, fwd_member = net.forward, net.forward_member
        net.forward = lambda x, member_first=None, kernel=None: rows.append(x.shape[0] * x.shape[1]) or fwd(
            x, member_first, kernel=kernel
        )
        net.forward_member = lambda x, e: rows.append(x.shape[0]) or fwd_member(x, e)
        model.predict(torch.randn(400, 3), torch.randn(400, 2), member_index=torch.arange(400) % 4)
        rows = sum(rows)
        assert rows == 400  # 4 members x 100 rows, not 4 x 400

    @pytest.mark.parametrize("grouped_kernel", ["grouped_mm", "auto"])
    def test_grouped_mm_runs_each_row_once(self, grouped_kernel, monkeypatch):
        import torch.nn.functional as F

        model = _model(grouped_kernel=grouped_kernel)
        rows, original = [], F.grouped_mm

        def recording(a, b, *, offs):
            rows.append((a.shape[0], b.shape[0], offs.tolist()))
            return original(a, b, offs=offs)

        monkeypatch.setattr(F, "grouped_mm", recording)
        with torch.no_grad():
            model.predict(torch.randn(400, 3), torch.randn(400, 2), member_index=torch.arange(400) % 4)
        # one grouped GEMM per layer over the 400 rows, 100 rows per member
        assert rows == [(400, 4, [100, 200, 300, 400])] * 3

    @pytest.mark.parametrize("grouped_kernel", ["grouped_mm", "gather", "padded", "loop"])
    @pytest.mark.parametrize("probabilistic", [False, True])
    def test_scalar_member_index_is_one_member_for_all_rows(self, grouped_kernel, probabilistic):
        model = _model(probabilistic=probabilistic, predict_reward=True, grouped_kernel=grouped_kernel)
        obs, act = torch.randn(2, 7, 3), torch.randn(2, 7, 2)
        with torch.no_grad():
            full = model.predict(obs, act)
            part = model.predict(obs, act, member_index=torch.tensor(2))
        torch.testing.assert_close(part.loc, full.loc[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.reward, full.reward[2], atol=1e-5, rtol=1e-5)
        if probabilistic:
            torch.testing.assert_close(part.scale, full.scale[2], atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("probabilistic", [False, True])
    def test_member_predictor_scalar_index_views(self, probabilistic):
        # a reused predictor with a 0-d index: every member bit for bit as a fresh predict(), and
        # close to the all-member bmm; in-place weight updates followed; gradients intact after
        # no_grad calls filled its view cache
        model = _model(probabilistic=probabilistic, predict_reward=True, grouped_kernel="gather")
        obs, act = torch.randn(6, 3), torch.randn(6, 2)
        step = model.member_predictor()  # "gather": the 0-d per-member addmm with and without grad
        with torch.no_grad():
            for e in (3, 0, 3, 1, 2):
                ref = model.predict(obs, act, member_index=torch.tensor(e))
                out = step(obs, act, torch.tensor(e))
                assert torch.equal(out.loc, ref.loc) and torch.equal(out.reward, ref.reward)
                if probabilistic:
                    assert torch.equal(out.scale, ref.scale)
                torch.testing.assert_close(out.loc, model.predict(obs, act).loc[e])
                for p in model.parameters():
                    p.mul_(1.1)

        def loss(pred):  # through the scale too: max/min_logvar get gradients
            return pred.loc.sum() + (pred.scale.sum() if probabilistic else 0.0)

        for e in range(4):
            model.zero_grad()
            loss(step(obs, act, torch.tensor(e))).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            loss(model.predict(obs, act, member_index=torch.tensor(e))).backward()
            for g, p in zip(grads, model.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
            first = model.network.layers[0].weight.grad
            assert first[e].abs().sum() > 0 and first.abs().sum() == first[e].abs().sum()  # member e only
        for bad in (4, -1):
            with pytest.raises(IndexError, match=f"member_index {bad} out of range for 4 members"), torch.no_grad():
                step(obs, act, torch.tensor(bad))

    def test_grouped_mm_unaligned_widths_and_weight_updates(self):
        # 3 + 2 inputs, 7 hidden, 3 + 1 outputs x 2 heads: no width is a multiple of 16 bytes
        model = DynamicsEnsemble(3, 2, num_members=3, num_cells=(7,), probabilistic=True, predict_reward=True,
                                 grouped_kernel="grouped_mm")
        obs, act, idx = torch.randn(20, 3), torch.randn(20, 2), torch.randint(3, (20,))
        with torch.no_grad():
            ref = model.predict(obs, act).loc[idx, torch.arange(20)]
            torch.testing.assert_close(model.predict(obs, act, member_index=idx).loc, ref)
            for p in model.parameters():
                p.mul_(1.5)  # the cached padded weights must follow in-place updates
            ref = model.predict(obs, act).loc[idx, torch.arange(20)]
            torch.testing.assert_close(model.predict(obs, act, member_index=idx).loc, ref)

    def test_grouped_mm_refuses_gradients_auto_stays_differentiable(self):
        obs, act, idx = torch.randn(8, 3), torch.randn(8, 2), torch.randint(4, (8,))
        with pytest.raises(RuntimeError, match="inference-only"):
            _model(grouped_kernel="grouped_mm").predict(obs, act, member_index=idx)
        model = _model()
        model.predict(obs, act, member_index=idx).loc.sum().backward()
        assert model.network.layers[0].weight.grad.abs().sum() > 0

    def test_out_keys_are_honoured(self):
        model = _model(probabilistic=True, predict_reward=True)
        keyed = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16, 16), probabilistic=True, predict_reward=True,
                                 in_keys=["obs", "act"],
                                 out_keys=[("model", "loc"), ("model", "scale"), ("model", "reward")])
        keyed.load_state_dict(model.state_dict())
        obs, act = torch.randn(5, 3), torch.randn(5, 2)
        td = TensorDict({"obs": obs, "act": act, "loc": torch.zeros(5, 2)}, [5])
        out = keyed(td)
        assert torch.equal(out["loc"], torch.zeros(5, 2))  # the policy's "loc" is left alone
        ref = model(TensorDict({"observation": obs, "action": act}, [5]))
        for name in ("loc", "scale", "reward"):
            torch.testing.assert_close(out["model", name], ref[name])
        keyed.out_keys = ["a", "b"]
        with pytest.raises(ValueError, match=r"\['a', 'b'\] must have 3 entries"):
            keyed(td)

    def test_dtype_mismatch_is_a_clear_error(self):
        model = _model()
        with pytest.raises(TypeError, match="float64.*float32"):
            model.predict(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
        double = _model().double()
        assert double.predict(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64),
                              member_index=torch.tensor([0, 1, 2, 3])).loc.dtype == torch.float64

    @pytest.mark.parametrize("probabilistic", [False, True])
    def test_state_dict_roundtrip(self, probabilistic):
        torch.manual_seed(0)
        a = _model(probabilistic=probabilistic, predict_reward=True, num_elites=2)
        a.set_elites(torch.tensor([3.0, 1.0, 2.0, 0.5]))
        torch.manual_seed(1)
        b = DynamicsEnsemble(3, 2, num_members=4, num_cells=(16, 16), probabilistic=probabilistic,
                             predict_reward=True, num_elites=2)
        b.load_state_dict(a.state_dict())
        obs, act = torch.randn(8, 3), torch.randn(8, 2)
        pa, pb = a.predict(obs, act), b.predict(obs, act)
        torch.testing.assert_close(pa.loc, pb.loc, rtol=0, atol=0)
        torch.testing.assert_close(pa.reward, pb.reward, rtol=0, atol=0)
        assert b.elite_indices.tolist() == [1, 3]
        assert "input_normalizer.loc" in a.state_dict() and "target_normalizer.scale" in a.state_dict()

    def test_set_elites_lowest(self):
        model = _model(num_elites=2)
        assert model.elite_indices.tolist() == [0, 1]
        model.set_elites(torch.tensor([0.3, float("nan"), 0.1, 0.2]))
        assert model.elite_indices.tolist() == [2, 3]
        with pytest.raises(ValueError, match="holdout_losses"):
            model.set_elites(torch.zeros(3))

    def test_validation(self):
        with pytest.raises(ValueError, match="num_members"):
            DynamicsEnsemble(3, 2, num_members=0)
        with pytest.raises(ValueError, match="observation_dim"):
            DynamicsEnsemble(0, 2)
        with pytest.raises(ValueError, match="num_elites"):
            DynamicsEnsemble(3, 2, num_members=2, num_elites=3)
        model = _model()
        with pytest.raises(ValueError, match="observation last dim must be 3"):
            model.predict(torch.randn(4, 5), torch.randn(4, 2))
        with pytest.raises(ValueError, match="action last dim must be 2"):
            model.predict(torch.randn(4, 3), torch.randn(4, 1))
        with pytest.raises(ValueError, match="batch shape"):
            model.predict(torch.randn(4, 3), torch.randn(5, 2))
        with pytest.raises(ValueError, match="reward"):
            DynamicsEnsemble(3, 2, predict_reward=True, num_cells=(4,)).fit_normalizers(
                torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 3)
            )
