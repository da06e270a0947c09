"""Bad inputs to the model env, the ensemble, its trainer and the penalties (issue 16): each one is
refused with a clear error naming the bad value, never accepted silently or failing deep inside."""
from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.data import Bounded, Unbounded
from torchrl.envs.transforms import StepCounter

from torchrl_depeff.envs.model_env import EnsembleModelEnv
from torchrl_depeff.envs.penalties import HardUncertaintyPenalty, SoftUncertaintyPenalty
from torchrl_depeff.modules.ensemble import DynamicsEnsemble
from torchrl_depeff.modules.normalizers import Normalizer
from torchrl_depeff.objectives.dynamics import EnsembleDynamicsLoss
from torchrl_depeff.trainers.dynamics import EnsembleTrainer

OBS, ACT = 3, 2


def _model(**kwargs) -> DynamicsEnsemble:
    kw = dict(num_members=3, num_cells=(8,), probabilistic=True)
    kw.update(kwargs)
    return DynamicsEnsemble(OBS, ACT, **kw)


def _start(n: int = 10) -> TensorDict:
    return TensorDict({"observation": torch.randn(n, OBS)}, [n])


def _env(**kwargs) -> EnsembleModelEnv:
    kwargs.setdefault("start_states", _start())
    kwargs.setdefault("uncertainty", ())
    return EnsembleModelEnv(
        kwargs.pop("model", None) or _model(),
        observation_spec=kwargs.pop("observation_spec", Unbounded(OBS)),
        action_spec=kwargs.pop("action_spec", Bounded(-1.0, 1.0, (ACT,))),
        reward_fn=lambda o, a, n: n[..., :1],
        batch_size=kwargs.pop("batch_size", 4),
        **kwargs,
    )


def _data(n: int = 50) -> TensorDict:
    obs = torch.randn(n, OBS)
    return TensorDict({"observation": obs, "action": torch.randn(n, ACT), ("next", "observation"): obs + 0.1}, [n])


class TestModelEnvConstructor:
    def test_unknown_member_selection(self):
        with pytest.raises(ValueError, match="'random_model'"):
            _env(member_selection="random_model")

    def test_unknown_uncertainty(self):
        with pytest.raises(ValueError, match="'variance'"):
            _env(uncertainty=("variance",))

    def test_non_positive_horizon(self):
        with pytest.raises(ValueError, match="max_episode_steps must be a positive int, got 0"):
            _env(max_episode_steps=0)

    def test_bool_horizon(self):
        with pytest.raises(ValueError, match="got True"):
            _env(max_episode_steps=True)

    def test_zero_batch(self):
        with pytest.raises(ValueError, match=r"got \[0\]"):
            _env(batch_size=0)

    def test_unknown_action_bounds(self):
        with pytest.raises(ValueError, match="'wrap'"):
            _env(action_bounds="wrap")

    def test_clip_needs_bounded_spec(self):
        with pytest.raises(ValueError, match="Unbounded"):
            _env(action_bounds="clip", action_spec=Unbounded(ACT))

    def test_nan_start_states(self):
        start = torch.randn(10, OBS)
        start[3, 1] = float("nan")
        with pytest.raises(ValueError, match=r"1 non-finite \(NaN/inf\) rows, the first is row 3"):
            _env(start_states=TensorDict({"observation": start}, [10]))

    def test_inf_start_states(self):
        start = torch.randn(10, OBS)
        start[[2, 7], 0] = float("inf")
        with pytest.raises(ValueError, match="2 non-finite .* row 2: .*inf"):
            _env(start_states=TensorDict({"observation": start}, [10]))

    def test_start_states_wrong_width(self):
        with pytest.raises(ValueError, match=r"\[N, 3\] tensor, got shape \[10, 4\]"):
            _env(start_states=TensorDict({"observation": torch.randn(10, 4)}, [10]))

    def test_integer_observation_spec(self):
        with pytest.raises(TypeError, match="torch.int64"):
            _env(observation_spec=Bounded(0, 5, (OBS,), dtype=torch.int64))

    def test_ensemble_without_predict(self):
        with pytest.raises(TypeError, match="Linear has no attribute 'num_members'"):
            _env(model=nn.Linear(3, 3))


class TestPenaltiesInTheEnv:
    def test_penalty_key_not_produced(self):
        with pytest.raises(KeyError, match="'model_std_norm'"):
            _env(penalty=SoftUncertaintyPenalty(0.1, "model_std_norm"), uncertainty=("disagreement",))

    def test_other_transform_as_penalty(self):
        with pytest.raises(TypeError, match="StepCounter"):
            _env(penalty=StepCounter(), uncertainty=("disagreement",))

    def test_penalty_key_clash(self):
        with pytest.raises(ValueError, match="'model_std_norm' is already used"):
            _env(penalty=SoftUncertaintyPenalty(0.1, "model_std_norm", penalty_key="model_std_norm"),
                 uncertainty=("std_norm",))

    def test_infinite_soft_coef(self):
        with pytest.raises(ValueError, match="got inf"):
            SoftUncertaintyPenalty(float("inf"))

    def test_bool_soft_coef(self):
        with pytest.raises(TypeError, match="got True"):
            SoftUncertaintyPenalty(True)

    def test_nan_hard_threshold(self):
        with pytest.raises(ValueError, match="threshold must be finite, got nan"):
            HardUncertaintyPenalty(float("nan"))

    def test_infinite_hard_reward(self):
        with pytest.raises(ValueError, match="penalty_reward must be finite, got -inf"):
            HardUncertaintyPenalty(3.0, float("-inf"))


class TestModelEnvResetAndStep:
    def test_reset_with_nan_observation(self):
        env = _env()
        obs = torch.zeros(4, OBS)
        obs[1, 2] = float("nan")
        with pytest.raises(ValueError, match=r"reset observation has 1 non-finite .* flat row 1"):
            env.reset(TensorDict({"observation": obs}, [4]))

    def test_reset_with_wrong_observation_shape(self):
        with pytest.raises(ValueError, match=r"shape \[4, 3\], got \[4, 5\]"):
            _env().reset(TensorDict({"observation": torch.zeros(4, 5)}, [4]))

    def test_set_state_without_observation(self):
        with pytest.raises(ValueError, match="set_state=True"):
            _env().reset(TensorDict({}, [4]), set_state=True)

    def test_step_with_wrong_action_width(self):
        env = _env()
        td = env.reset()
        td["action"] = torch.zeros(4, 5)
        with pytest.raises(ValueError, match=r"action last dim must be 2, got shape \[4, 5\]"):
            env.step(td)

    @pytest.mark.parametrize("fast", [True, False])
    def test_out_of_bounds_actions_checked_after_the_rollout(self, fast):
        env = _env(action_bounds="check", fast_rollout=fast)
        policy = TensorDictModule(lambda o: torch.full((o.shape[0], ACT), 3.0), in_keys=["observation"],
                                  out_keys=["action"])
        with pytest.raises(ValueError, match=r"20 rows of actions were outside .*\[-1.0, -1.0\].* the first: \[3.0, 3.0\]"):
            env.rollout(5, policy, break_when_any_done=False)


class TestEnsembleAndTrainer:
    def test_out_keys_count(self):
        with pytest.raises(ValueError, match=r"2 entries \(loc, scale\), got \['a'\]"):
            _model(out_keys=["a"])

    def test_unknown_grouped_kernel(self):
        with pytest.raises(ValueError, match="'fast'"):
            _model(grouped_kernel="fast")

    def test_float64_inputs(self):
        with pytest.raises(TypeError, match="observation dtype torch.float64 does not match the ensemble's torch.float32"):
            _model().predict(torch.zeros(2, OBS, dtype=torch.float64), torch.zeros(2, ACT))

    def test_float_member_index(self):
        with pytest.raises(TypeError, match="torch.float32"):
            _model().predict(torch.zeros(2, OBS), torch.zeros(2, ACT), member_index=torch.zeros(2))

    def test_member_index_shape(self):
        with pytest.raises(ValueError, match=r"member_index shape \(3,\) must equal the batch shape \(2,\)"):
            _model().predict(torch.zeros(2, OBS), torch.zeros(2, ACT), member_index=torch.zeros(3, dtype=torch.long))

    def test_fit_empty_data(self):
        with pytest.raises(ValueError, match=r"empty data \(batch_size=\[0\]"):
            EnsembleTrainer(_model()).fit(_data(0))

    def test_fit_nan_action(self):
        data = _data()
        data["action"][4, 0] = float("nan")
        with pytest.raises(ValueError, match="1 non-finite .* 'action'"):
            EnsembleTrainer(_model()).fit(data)

    def test_trainer_zero_batch(self):
        with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
            EnsembleTrainer(_model(), batch_size=0)

    def test_trainer_bool_lr(self):
        with pytest.raises(ValueError, match="lr must be a finite float, got True"):
            EnsembleTrainer(_model(), lr=True)

    def test_trainer_nan_weight_decay(self):
        with pytest.raises(ValueError, match="weight_decay must be a finite float, got nan"):
            EnsembleTrainer(_model(), weight_decay=float("nan"))

    def test_trainer_float_epochs(self):
        with pytest.raises(TypeError, match="max_epochs must be an int, got 2.5"):
            EnsembleTrainer(_model(), max_epochs=2.5)

    def test_unknown_loss_type(self):
        with pytest.raises(ValueError, match="'l1'"):
            EnsembleDynamicsLoss(_model(), loss_type="l1")

    def test_normalizer_empty_fit(self):
        with pytest.raises(ValueError, match="empty"):
            Normalizer(3).fit(torch.zeros(0, 3))
