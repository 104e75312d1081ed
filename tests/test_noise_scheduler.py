"""The schedule, the forward process q(x_t | x_0) and the reverse steps, pinned with known values."""
import math

import pytest
import torch

from noise_scheduler import CosineNoiseScheduler, LinearNoiseScheduler, make_scheduler
from solvers import KARRAS_SIGMA_MAX, ddim_step, spaced_timesteps


@pytest.fixture(scope="module")
def sched():
    return LinearNoiseScheduler(1000, 1e-4, 0.02)


def test_linear_schedule_values_and_edges(sched):
    assert sched.betas.dtype == torch.float32 and sched.betas.shape == (1000,)
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.02)
    # alpha-bar is strictly decreasing, starts at 1 - beta_1, and "alpha-bar before step 0" is 1
    assert (sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all()
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert sched.alphas_cumprod_prev[0].item() == 1.0
    # the last step is (nearly) pure noise: alpha-bar_T = 4.04e-5 for this schedule
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    # posterior variance beta-tilde: 0 at t = 0, and at T-1 equal to beta (1 - abar_{T-2}) / (1 - abar_{T-1})
    assert sched.posterior_variance[0].item() == 0.0
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - b, 0)
    expected = (b[-1] * (1 - abar[-2]) / (1 - abar[-1])).item()
    assert sched.posterior_variance[-1].item() == pytest.approx(expected, rel=1e-6)
    assert (sched.posterior_variance[1:] < sched.betas[1:]).all()


def test_schedule_is_computed_in_float64(sched):
    # float32 cumprod of 1000 factors drifts; the stored values match the float64 computation
    b = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar64 = torch.cumprod(1 - b, 0)
    assert torch.allclose(sched.alphas_cumprod.double(), abar64, rtol=1e-6, atol=0)


def test_add_noise_matches_closed_form(sched):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    out = sched.add_noise(x0, noise, t)
    # reference in float64: 1 - alpha-bar in float32 loses digits near t = 0, the scheduler's float64 table does not
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    for i, ti in enumerate(t.tolist()):
        expected = abar[ti].sqrt() * x0[i].double() + (1 - abar[ti]).sqrt() * noise[i].double()
        assert torch.allclose(out[i].double(), expected, atol=1e-6)


def test_forward_chain_step_by_step_matches_add_noise_in_distribution(sched):
    # iterate q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) and compare moments with q(x_t | x_0)
    torch.manual_seed(0)
    n, x0 = 20000, torch.tensor([0.8, -0.5])
    x = x0.repeat(n, 1)
    checkpoints = {0: None, 99: None, 499: None, 999: None}
    for t in range(1000):
        x = (1 - sched.betas[t]).sqrt() * x + sched.betas[t].sqrt() * torch.randn_like(x)
        if t in checkpoints:
            checkpoints[t] = x.clone()
    for t, xt in checkpoints.items():
        abar = sched.alphas_cumprod[t]
        direct = sched.add_noise(x0.repeat(n, 1)[:, :, None, None], torch.randn(n, 2, 1, 1), torch.full((n,), t))
        se = (1 / math.sqrt(n)) * 5
        assert torch.allclose(xt.mean(0), abar.sqrt() * x0, atol=se), t
        assert torch.allclose(xt.var(0), (1 - abar).expand(2), atol=5 * math.sqrt(2 / n)), t
        assert torch.allclose(direct.mean(0).flatten(), xt.mean(0), atol=2 * se), t


def test_reverse_step_mean_is_equation_11_without_clipping(sched):
    x_t, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for t in (1, 300, 999):
        mean, _ = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(0), clip_x0=False)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
        a, b, abar = sched.alphas[t], sched.betas[t], sched.alphas_cumprod[t]
        mu = (x_t - b / (1 - abar).sqrt() * eps) / a.sqrt()
        assert torch.allclose(mean, mu + sched.posterior_variance[t].sqrt() * noise, atol=1e-5), t


def test_reverse_step_adds_no_noise_at_t0_and_is_seeded(sched):
    x_t, eps = torch.randn(2, 1, 4, 4) * 0.1, torch.randn(2, 1, 4, 4) * 0.1
    a, _ = sched.step(eps, 0, x_t, generator=torch.Generator().manual_seed(1))
    b, _ = sched.step(eps, 0, x_t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c, _ = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(1))
    d, _ = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(1))
    e, _ = sched.step(eps, 500, x_t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_reverse_step_variance_is_posterior_variance(sched):
    x_t, eps = torch.zeros(50000, 1, 1, 1), torch.zeros(50000, 1, 1, 1)
    x_prev, _ = sched.step(eps, 400, x_t, generator=torch.Generator().manual_seed(0))
    assert x_prev.var().item() == pytest.approx(sched.posterior_variance[400].item(), rel=0.03)


def test_predicted_x0_recovers_data_given_true_noise(sched):
    x0, noise = torch.rand(4, 1, 6, 6) * 2 - 1, torch.randn(4, 1, 6, 6)
    t = torch.tensor([5, 50, 500, 900])
    assert torch.allclose(sched.predict_x0(sched.add_noise(x0, noise, t), t, noise), x0, atol=1e-3)


def test_ddpm_timesteps_walk_every_step_down_to_zero(sched):
    assert sched.timesteps() == list(range(999, -1, -1))


@pytest.mark.parametrize("steps", [1, 5, 10, 20, 50, 999, 1000])
def test_ddim_timesteps_descending_unique_end_at_zero(sched, steps):
    ts = spaced_timesteps(sched, steps)
    assert ts[0] == 999 and ts == sorted(set(ts), reverse=True) and len(ts) == steps
    assert ts[-1] == (0 if steps > 1 else 999)       # a single step starts from pure noise, at t = T-1
    assert all(0 <= t < 1000 for t in ts)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_karras_timesteps_space_the_noise_levels_evenly_in_their_seventh_root_below_sigma_max(schedule):
    """EDM's eq. 5 (rho = 7): after the start at T-1, the noise levels s_t = sigma_t / alpha_t of the walk lie evenly
    in s^(1/7) from min(KARRAS_SIGMA_MAX, s_{T-1}) down to s_0, to within the rounding to a training timestep.  The
    cosine schedule's s_{T-1} is some 20,000: without the bound its walk would dwell in its last few timesteps."""
    sched = make_scheduler(schedule, 1000)
    abar = sched.alphas_cumprod.double()
    s = ((1 - abar) / abar).sqrt()
    for steps in (3, 6, 11, 21):
        ts = spaced_timesteps(sched, steps, "karras")
        assert ts[0] == 999 and ts[-1] == 0 and ts == sorted(set(ts), reverse=True) and len(ts) == steps
        top, bottom = min(float(s[999]), KARRAS_SIGMA_MAX) ** (1 / 7), float(s[0]) ** (1 / 7)
        expected = torch.linspace(top, bottom, steps, dtype=torch.float64)[1:]
        assert torch.allclose(s[ts[1:]] ** (1 / 7), expected, rtol=0.01), (ts, expected ** 7)
        assert s[ts[1]] < KARRAS_SIGMA_MAX, "the second level is below sigma_max"
    assert spaced_timesteps(sched, 11, "karras") != spaced_timesteps(sched, 11, "logsnr") != spaced_timesteps(sched, 11)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        spaced_timesteps(sched, 11, "edm")


def test_ddim_timesteps_reject_too_many_steps(sched):
    with pytest.raises(ValueError):
        spaced_timesteps(sched, 1001)


def test_ddim_eta0_is_deterministic(sched):
    x_t, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    a, _ = ddim_step(sched, eps, 500, 480, x_t, eta=0.0, generator=torch.Generator().manual_seed(1))
    b, _ = ddim_step(sched, eps, 500, 480, x_t, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_ddim_with_every_step_and_eta1_is_the_ancestral_step(sched):
    x_t, eps = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    for clip in (False, True):
        for t in (1, 10, 500, 999):
            ddim, x0a = ddim_step(sched, eps, t, t - 1, x_t, eta=1.0, generator=torch.Generator().manual_seed(7),
                                        clip_x0=clip)
            ddpm, x0b = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(7), clip_x0=clip)
            # equal in exact arithmetic; float32 rounding is amplified by 1 / sqrt(1 - alpha-bar) near t = 0
            assert torch.allclose(ddim, ddpm, atol=1e-3, rtol=1e-4), (t, clip)
            assert torch.allclose(x0a, x0b)


def test_cosine_schedule_matches_its_formula():
    sched = CosineNoiseScheduler(1000)
    s, T = 0.008, 1000
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2           # noqa: E731
    for t in (0, 1, 100, 500, 900):
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5), t
    assert (sched.alphas_cumprod > 0).all() and (sched.alphas_cumprod <= 1).all()
    assert (sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all()
    assert sched.betas.max().item() <= 0.999 + 1e-6


def test_make_scheduler_by_name():
    assert isinstance(make_scheduler("cosine", 10), CosineNoiseScheduler)
    assert make_scheduler("linear", 10).num_timesteps == 10
    with pytest.raises(ValueError):
        make_scheduler("quadratic")


def test_diffusion_loss_is_zero_for_the_true_noise_and_about_one_for_none(sched):
    """Algorithm 1's loss: x_t is built from the same eps that the network is scored against."""
    from training import diffusion_loss
    x0 = torch.rand(512, 1, 8, 8) * 2 - 1

    def oracle(x_t, t, labels):          # knows x_0, so it can solve eq. 4 for eps
        abar = sched.alphas_cumprod[t][:, None, None, None]
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    generator = torch.Generator().manual_seed(0)
    assert diffusion_loss(oracle, sched, x0, generator=generator).item() < 1e-6
    zero = diffusion_loss(lambda x_t, t, labels: torch.zeros_like(x_t), sched, x0, generator=generator)
    assert zero.item() == pytest.approx(1.0, abs=0.02)          # E[eps^2] = 1


def test_diffusion_loss_drops_labels_to_the_null_token_at_the_given_rate(sched):
    from training import diffusion_loss
    seen = []

    def net(x_t, t, labels):
        seen.append(labels)
        return torch.zeros_like(x_t)

    labels = torch.arange(4000) % 10
    generator = torch.Generator().manual_seed(0)
    diffusion_loss(net, sched, torch.zeros(4000, 1, 2, 2), labels, generator=generator, label_dropout=0.25,
                   null_label=10)
    dropped = seen[0] == 10
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(seen[0][~dropped], labels[~dropped])
    diffusion_loss(net, sched, torch.zeros(4000, 1, 2, 2), labels, generator=generator, label_dropout=0.0,
                   null_label=10)
    assert torch.equal(seen[1], labels)
