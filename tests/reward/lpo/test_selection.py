"""LPO's own choices on scripted LRM scores: which child wins and which loses, which step's tuple passes its
threshold (tanh(gap / 2) strictly above it), and which threshold each step gets from `--threshold LOW,HIGH`.

The scores are set by hand per step, prompt and candidate (the LRM is replaced where the sampler calls it), so the
expected tuples are known without computing an argmax. Each test fails on a mutation of the selection rule: the raw
gap instead of tanh(gap / 2), >= instead of >, winner and loser swapped, low and high swapped."""

from __future__ import annotations

import math

import pytest
import torch

from lpo.reward.backbones import load_generator
from lpo.reward.lpo import sampler
from lpo.reward.lpo import train as lpo_train
from lpo.reward.lpo.config import LPOConfig

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
K = 4
# per step: for each prompt (winner index, loser index, gap); the other candidates score strictly in between
SCRIPT = [
    [(2, 0, 2.0), (1, 3, 0.6)],  # tanh: 0.762 passes 0.5; 0.291 does not
    [(3, 1, 1.0), (0, 2, 1.3)],  # tanh: 0.462 and 0.572; the threshold sits exactly on 0.572
    [(1, 2, 0.6), (3, 0, 3.0)],  # the raw gap 0.6 passes 0.45, its tanh 0.291 does not; 0.905 passes
    [(0, 3, 4.0), (2, 1, 4.0)],  # no threshold at this step: never trained, whatever the gap
]


def scripted_scores(step: int) -> torch.Tensor:
    scores = torch.empty(K, len(PROMPTS))
    for b, (winner, loser, gap) in enumerate(SCRIPT[step]):
        middle = [k for k in range(K) if k not in (winner, loser)]
        scores[loser, b], scores[winner, b] = 1.0, 1.0 + gap
        for j, k in enumerate(middle):
            scores[k, b] = 1.0 + gap * (j + 1) / (len(middle) + 1)
    return scores


def half_gap_tanh(gap: float) -> float:
    """tanh(gap / 2) in the float32 arithmetic the sampler uses (to place a threshold exactly on it)."""
    return float(torch.tanh((torch.tensor(1.0 + gap, dtype=torch.float32) - torch.tensor(1.0)) / 2))


class NoTextLRM:
    """The sampler asks the LRM for text features once; the scores come from the script."""

    def encode_text(self, prompts):
        return None


@pytest.fixture(scope="module")
def generator(tiny_models_dir):
    return load_generator(str(tiny_models_dir / "sd15"))


def _rollout(generator, monkeypatch, thresholds_by_step):
    seen = []

    def score(lrm, children, timestep, prompts, text):
        seen.append(children.clone())
        return scripted_scores(len(seen) - 1)

    monkeypatch.setattr(sampler, "score_candidates", score)
    timesteps = generator.timesteps(len(SCRIPT))
    thresholds = {timesteps[i]: value for i, value in thresholds_by_step.items()}
    result = sampler.rollout(generator, generator.encode_prompts(PROMPTS), PROMPTS, NoTextLRM(),
                             [torch.Generator().manual_seed(s) for s in (3, 4)], thresholds, steps=len(SCRIPT),
                             guidance=1.0, eta=1.0, k=K)
    return result, seen, timesteps


def test_the_winner_is_the_best_child_and_the_loser_the_worst_where_tanh_of_half_the_gap_passes(generator,
                                                                                                 monkeypatch):
    on_the_edge = half_gap_tanh(SCRIPT[1][1][2])  # step 1, prompt 1: exactly its tanh(gap / 2), which must not pass
    result, seen, timesteps = _rollout(generator, monkeypatch, {0: 0.5, 1: on_the_edge, 2: 0.45})
    assert math.tanh(SCRIPT[0][0][2] / 2) > 0.5 > math.tanh(SCRIPT[0][1][2] / 2)
    assert SCRIPT[2][0][2] > 0.45 > math.tanh(SCRIPT[2][0][2] / 2)
    kept = list(zip(result.step_index, result.prompt_index))
    assert kept == [(0, 0), (2, 1)]  # (step 1, prompt 0): 0.462 < the edge threshold 0.572 as well
    for j, (step, b) in enumerate(kept):
        winner, loser, _ = SCRIPT[step][b]
        assert torch.equal(result.x_w[j], seen[step][winner, b])
        assert torch.equal(result.x_l[j], seen[step][loser, b])
        assert result.timesteps[j] == timesteps[step]
    # every step's parent is the x_t its children were drawn from; the tuples share it
    assert all(result.x_t[j].shape == result.x_w[j].shape for j in range(len(kept)))


def test_a_threshold_just_below_the_edge_passes_it(generator, monkeypatch):
    """The same rollout with step 1's threshold a hair below prompt 1's tanh(gap / 2): now that tuple is kept, so the
    strict comparison above is what excluded it."""
    result, _, _ = _rollout(generator, monkeypatch, {0: 0.5, 1: half_gap_tanh(SCRIPT[1][1][2]) - 1e-6, 2: 0.45})
    assert list(zip(result.step_index, result.prompt_index)) == [(0, 0), (1, 1), (2, 1)]


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_low_goes_to_the_least_noisy_step_and_high_to_the_noisiest(family, tiny_models_dir, lrms, prompt_file,
                                                                   tmp_path, monkeypatch):
    """The thresholds the trainer hands the sampler: LOW at the step of least std, HIGH at the step of most std
    (on the flow sampler the std is not monotone, so the noisiest step is not the first), linear in std between."""
    captured = {}

    class Stop(Exception):
        pass

    def capture(model, cond, prompts, lrm, generators, thresholds, steps, guidance, eta, *args, **kwargs):
        captured["thresholds"] = thresholds
        captured["stds"] = model.step_stds(eta)
        raise Stop

    monkeypatch.setattr(lpo_train, "rollout", capture)
    config = LPOConfig(family=family, base=str(tiny_models_dir / family), lrm=lrms[family], prompts=prompt_file,
                       out=tmp_path / "run", epochs=1, sample_batch_size=2, candidates=2, steps=8,
                       threshold=[0.1, 0.7], device="cpu", validation_images=0)
    with pytest.raises(Stop):
        lpo_train.run(config)
    thresholds = captured["thresholds"]
    timesteps, stds = captured["stds"]
    stds = dict(zip(timesteps, stds.tolist()))
    least, most = min(stds, key=stds.get), max(stds, key=stds.get)
    assert thresholds[least] == pytest.approx(0.1) and thresholds[most] == pytest.approx(0.7)
    for t, std in stds.items():
        share = (std - stds[least]) / (stds[most] - stds[least])
        assert thresholds[t] == pytest.approx(0.1 + 0.6 * share, abs=1e-9)


@pytest.mark.parametrize("where", ["parent", "child"])
def test_children_are_scored_at_the_parents_or_their_own_timestep(where, generator, monkeypatch):
    """`--score-timestep child` scores a step's children at the next grid point (the last step's at the grid's end,
    never below 0); `parent` at the step's own timestep, as the reference does."""
    told = []

    def score(lrm, children, timestep, prompts, text):
        told.append(timestep)
        return scripted_scores(len(told) - 1)

    monkeypatch.setattr(sampler, "score_candidates", score)
    timesteps = generator.timesteps(len(SCRIPT))
    every_step = {t: 0.0 for t in timesteps}  # a step without a threshold is not trained, so not scored
    sampler.rollout(generator, generator.encode_prompts(PROMPTS), PROMPTS, NoTextLRM(),
                    [torch.Generator().manual_seed(s) for s in (3, 4)], every_step, steps=len(SCRIPT), guidance=1.0,
                    eta=1.0, k=K, score_timestep=where)
    if where == "parent":
        assert told == list(timesteps)
    else:
        spacing = timesteps[0] - timesteps[1]
        assert told == [*timesteps[1:], max(timesteps[-1] - spacing, 0)]
