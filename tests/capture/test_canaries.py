"""Dirac canaries inside Opacus DP-SGD: what they add, what they leave alone, and the ε they certify."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from leak_audit.capture.canaries import CanaryError, DiracCanaries
from leak_audit.capture.privacy import epsilon_for, place_canaries
from leak_audit.cli.bench.canary import run_canary


def dp_mlp(sigma=1.0, clip=1.0, n=64, batch=8, seed=0, frozen=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    if frozen:
        model[0].weight.requires_grad_(False)
    x, y = torch.randn(n, 8), torch.randint(0, 2, (n,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    params = [p for p in model.parameters() if p.requires_grad]
    model, opt, data = engine.make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=data, noise_multiplier=sigma,
        max_grad_norm=clip, poisson_sampling=False, noise_generator=torch.Generator().manual_seed(seed))
    return model, opt, data, engine


def steps(model, opt, data, n):
    grads = []
    for i, (x, y) in enumerate(data):
        if i == n:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    return grads


def test_canaries_add_exactly_C_at_their_coordinates_and_leave_the_accountant_alone():
    base_model, base_opt, base_data, base_engine = dp_mlp()
    base = steps(base_model, base_opt, base_data, 6)
    model, opt, data, engine = dp_mlp()
    canaries = DiracCanaries(opt, dict(model.named_parameters()), 50, sample_rate=0.5, seed=3)
    released = steps(model, opt, data, 6)
    assert engine.accountant.history == base_engine.accountant.history
    assert epsilon_for(engine.accountant, 1e-5) == epsilon_for(base_engine.accountant, 1e-5)
    joined = 0
    for g0, g1 in zip(base, released, strict=True):  # lr 0: the same model, the same noise draws
        diff = {k: (g1[k] - g0[k]).reshape(-1) for k in g0}
        seen = set()
        for name, idx in canaries.coordinates:
            value = float(diff[name][idx]) * 8  # scale_grad divided by B = 8
            assert value == pytest.approx(0.0, abs=1e-5) or value == pytest.approx(1.0, abs=1e-5)
            joined += value > 0.5
            seen.add((name, idx))
        for k, d in diff.items():  # nothing else moved
            others = [i for i in range(d.numel()) if (k, i) not in seen]
            assert torch.allclose(d[others], torch.zeros(len(others)), atol=1e-6)
    included = int(canaries.included.sum())
    assert 0 < joined <= 6 * included  # only included canaries join, about half the steps each
    assert canaries.steps == 6
    canaries.remove()
    assert "add_noise" not in vars(opt)


def test_canaries_sit_only_on_trained_parameters():
    model, opt, _, _ = dp_mlp(frozen=True)
    canaries = DiracCanaries(opt, dict(model.named_parameters()), 40, sample_rate=0.1)
    names = {n for n, _ in canaries.coordinates}
    assert names and not any(n.endswith("0.weight") for n in names)
    assert len(set(canaries.coordinates)) == 40  # distinct coordinates, among the 50 trained


def test_an_honest_run_is_sound_and_a_tenth_of_the_noise_is_flagged():
    kwargs = dict(max_grad_norm=1.0, canaries=1000, steps=300, batch_size=8, dataset_size=256, delta=1e-5,
                  seed=0, accountant="prv", lr=0.01)
    honest = run_canary("tiny", noise_multiplier=1.0, inject=1.0, **kwargs)
    assert 0 < honest["epsilon_empirical"] < honest["epsilon"]
    faulty = run_canary("tiny", noise_multiplier=1.0, inject=0.1, **kwargs)
    assert faulty["epsilon"] == honest["epsilon"]  # the accountant was told sigma = 1 both times
    assert faulty["epsilon_empirical"] > faulty["epsilon"]


def test_bad_canary_settings_are_refused_with_the_reason():
    model, opt, _, _ = dp_mlp()
    params = dict(model.named_parameters())
    with pytest.raises(CanaryError, match="canaries must be an int >= 1, got 0"):
        DiracCanaries(opt, params, 0, sample_rate=0.1)
    with pytest.raises(CanaryError, match=r"1000 canaries need 1000 distinct trained coordinates, but the DP "
                                          r"optimizer trains 178: use canaries <= 178"):
        DiracCanaries(opt, params, 1000, sample_rate=0.1)
    with pytest.raises(CanaryError, match=r"sample rate must be in \(0, 1\], got 0"):
        DiracCanaries(opt, params, 10, sample_rate=0)
    model0, opt0, _, _ = dp_mlp(sigma=0.0)
    with pytest.raises(CanaryError, match="noise multiplier is 0.0: without noise epsilon is infinite"):
        DiracCanaries(opt0, dict(model0.named_parameters()), 10, sample_rate=0.1)
    with pytest.raises(CanaryError, match="no Opacus DPOptimizer"):
        place_canaries(None, 10, params, seed=0)
    release = SimpleNamespace(capture=SimpleNamespace(dp_optimizer=opt), sample_rate=0.1)
    with pytest.raises(CanaryError, match=r"under DDP \(2 processes\) is not supported: each rank's DPOptimizer"):
        place_canaries(release, 10, params, seed=0, world_size=2)
    with pytest.raises(CanaryError, match="no Opacus accountant was found: pass privacy_engine="):
        place_canaries(SimpleNamespace(capture=release.capture, sample_rate=None), 10, params, seed=0)
    per_layer = SimpleNamespace(add_noise=lambda: None, params=[], noise_multiplier=1.0, max_grad_norm=[1.0, 1.0])
    with pytest.raises(CanaryError, match=r"canaries need flat clipping \(one max_grad_norm\), got per-layer"):
        DiracCanaries(per_layer, params, 10, sample_rate=0.1)
    with pytest.raises(TypeError, match="expected an Opacus DPOptimizer, got SGD"):
        DiracCanaries(torch.optim.SGD(model.parameters(), lr=0.1), params, 10, sample_rate=0.1)


def test_state_dict_round_trip_resumes_the_scores():
    model, opt, data, _ = dp_mlp()
    canaries = DiracCanaries(opt, dict(model.named_parameters()), 20, sample_rate=0.5, seed=1)
    steps(model, opt, data, 3)
    state = canaries.state_dict()
    canaries.remove()
    again = DiracCanaries(opt, dict(model.named_parameters()), 20, sample_rate=0.5, seed=1)
    again.load_state_dict(state)
    assert again.steps == 3 and torch.equal(again.scores().llr, canaries.scores().llr)
    other = DiracCanaries(opt, dict(model.named_parameters()), 20, sample_rate=0.5, seed=2)
    if not torch.equal(other.included, again.included):
        with pytest.raises(CanaryError, match="another canary count or seed"):
            other.load_state_dict(state)
