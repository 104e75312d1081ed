"""What the network predicts (eps, v, x_0, EDM's F) and Restart sampling: on Gaussian data, where the exact
prediction is known, every parameterization converts exactly and samples exactly as eps-prediction does; Restart's
forward jump has the statistics of the forward process and its passes are the ODE solver's."""
import math

import pytest
import torch

import samplers
from conftest import run_script
from noise_scheduler import PREDICTIONS, make_scheduler
from sampling import sample
from solvers import forward_jump, restart_timesteps, spaced_timesteps

MU, S = 0.3, 0.25         # data x_0 ~ N(MU, S^2) in every pixel, well inside [-1, 1]
SIGMA_DATA = 0.4          # the edm prediction's sigma_data (any positive value: the conversions are exact for each)


def scheduler(prediction="eps"):
    return make_scheduler("linear", 1000, prediction, SIGMA_DATA if prediction == "edm" else None)


def edm_coefficients(sched, t, ndim):
    """Karras et al.'s (2022, table 1) c_in, c_skip, c_out at sigma = sigma_t / alpha_t, for their x = x_t / alpha_t."""
    a = sched.alphas_cumprod[t].double().reshape(-1, *([1] * (ndim - 1)))
    sigma, s = ((1 - a) / a).sqrt(), SIGMA_DATA
    return 1 / (sigma ** 2 + s ** 2).sqrt(), s ** 2 / (sigma ** 2 + s ** 2), sigma * s / (sigma ** 2 + s ** 2).sqrt()


def exact_eps(sched, x, t):
    """E[eps | x_t] for data N(MU, S^2), t a (B,) tensor: x_t ~ N(alpha MU, alpha^2 S^2 + sigma^2)."""
    a = sched.alphas_cumprod[t].double().reshape(-1, *([1] * (x.dim() - 1)))
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    return (sigma * (x.double() - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)).float()


def exact_output(sched, x, t):
    """The exact prediction of each parameterization, written from its definition, not from to_eps."""
    eps = exact_eps(sched, x, t)
    a = sched.alphas_cumprod[t].reshape(-1, *([1] * (x.dim() - 1)))
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    x0 = (x - sigma * eps) / alpha
    if sched.prediction == "edm":                  # D(x; sigma) = c_skip x + c_out F, D the exact x_0, x = x_t / alpha
        _, c_skip, c_out = edm_coefficients(sched, t, x.dim())
        return ((x0 - c_skip * x / alpha) / c_out).float()
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[sched.prediction]


class GaussianModel(torch.nn.Module):
    """A stand-in network that returns the exact prediction of its scheduler's parameterization."""

    def __init__(self, sched):
        super().__init__()
        self.sched, self.in_channels, self.image_size, self.num_classes = sched, 1, 4, None

    def forward(self, x, t, labels=None):
        if self.sched.prediction == "edm":         # it is given c_in x_t / alpha_t: undo that
            c_in, _, _ = edm_coefficients(self.sched, t, x.dim())
            alpha = self.sched.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
            x = (x / c_in * alpha).float()
        return exact_output(self.sched, x, t)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_prediction_converts_exactly_to_eps_and_x0(prediction):
    sched = scheduler(prediction)
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(64, 1, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = sched.add_noise(x0, noise, t)
    # the training target of the true (x_0, eps) converts back to that very eps and x_0
    target = sched.target(x0, noise, t)
    eps = sched.to_eps(target, x_t, t)
    assert torch.allclose(eps, noise, atol=2e-3 if prediction == "x0" else 1e-4)
    assert torch.allclose(sched.predict_x0(x_t, t, sched.to_eps(target, x_t, t)), x0, atol=2e-3)
    # and the exact (posterior-mean) prediction converts to the exact eps
    assert torch.allclose(sched.to_eps(exact_output(sched, x_t, t), x_t, t), exact_eps(sched, x_t, t), atol=2e-3)


@pytest.mark.parametrize("prediction", ["v", "x0", "edm"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpm++", 10), ("dpm++sde", 10), ("restart", 20),
                                           ("unipc", 5)])
def test_a_sampler_given_the_exact_prediction_lands_where_it_does_with_eps(prediction, sampler, steps):
    runs = {}
    for p in ("eps", prediction):
        sched = scheduler(p)
        runs[p] = sample(GaussianModel(sched), sched, 16, device=torch.device("cpu"), sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.allclose(runs["eps"], runs[prediction], atol=1e-3)


def test_loss_weights_express_each_objective_in_x0_error():
    """|| target - prediction ||^2 = w(t) || x_0 - x_0-hat ||^2, with w = SNR, SNR + 1, 1, 1 / c_out^2 for eps, v,
    x_0, edm."""
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    for prediction in PREDICTIONS:
        sched = scheduler(prediction)
        x_t = sched.add_noise(x0, noise, t)
        wrong = sched.target(x0, noise, t) + 0.01 * torch.randn(x0.shape, generator=g)
        x0_hat = sched.predict_x0(x_t, t, sched.to_eps(wrong, x_t, t))
        lhs = (wrong - sched.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        rhs = sched.x0_loss_weight(t) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
        assert torch.allclose(lhs, rhs, rtol=2e-2), prediction


def test_edm_preconditioning_feeds_the_network_unit_variance_and_asks_for_a_unit_variance_target():
    """Karras et al. (2022, table 1): c_in gives the network inputs of unit variance at every noise level, and with
    data of std sigma_data the target of F has unit variance too; with sigma_data = 1 it is -v."""
    sched = scheduler("edm")
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0, 50, 200, 500, 999]).repeat_interleave(20_000)
    x0 = SIGMA_DATA * torch.randn(len(t), 1, 1, 1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_in = sched.model_input(sched.add_noise(x0, noise, t), t).reshape(5, -1)
    target = sched.target(x0, noise, t).reshape(5, -1)
    assert torch.allclose(x_in.std(dim=1), torch.ones(5), atol=0.02)
    assert torch.allclose(target.std(dim=1), torch.ones(5), atol=0.02)
    v_sched, unit = make_scheduler("linear", 1000, "v"), make_scheduler("linear", 1000, "edm", 1.0)
    assert torch.allclose(unit.target(x0, noise, t), -v_sched.target(x0, noise, t), atol=1e-3)
    assert torch.equal(make_scheduler().model_input(x0, t), x0), "the other predictions see x_t itself"
    with pytest.raises(ValueError, match="sigma_data"):
        make_scheduler("linear", 1000, "edm")


def test_lognormal_sampling_puts_half_the_mass_below_edms_median_noise_level():
    """ln(sigma_t / alpha_t) ~ N(-1.2, 1.2^2): half the draws below sigma = e^-1.2, 16% above e^0 (one std up)."""
    sched = scheduler()
    probs = sched.timestep_probs("lognormal")
    assert probs.shape == (1000,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    t = sched.sample_timesteps(200_000, torch.Generator().manual_seed(0), probs=probs)
    log_sigma = -sched.lambdas[t]
    assert float((log_sigma < -1.2).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float((log_sigma > 0.0).float().mean()) == pytest.approx(0.1587, abs=0.02)


def test_restart_forward_jump_gives_the_forward_process_statistics():
    """From x_{t_min} ~ q(x_{t_min} | x_0), the jump to t_max is distributed as q(x_{t_max} | x_0)."""
    sched = make_scheduler()
    g = torch.Generator().manual_seed(3)
    x0 = torch.full((200_000,), 0.7)
    t_min, t_max = 30, 300
    x_min = sched.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((len(x0),), t_min))
    x_max = forward_jump(sched, x_min, t_min, t_max, generator=g)
    a = float(sched.alphas_cumprod[t_max])
    assert abs(x_max.mean().item() - math.sqrt(a) * 0.7) < 0.01
    assert abs(x_max.std().item() - math.sqrt(1 - a)) < 0.01


def test_restart_walk_and_network_evaluations():
    sched = make_scheduler()
    sigma = lambda t: math.exp(-float(sched.lambdas[t]))        # noqa: E731
    walk = restart_timesteps(sched, 20, sigma_min=sigma(30), sigma_max=sigma(120), restarts=2, restart_steps=3)
    jumps = [i for i in range(len(walk) - 1) if walk[i + 1] > walk[i]]
    assert walk[0] == 999 and [walk[i] for i in jumps] == [30, 30] and [walk[i + 1] for i in jumps] == [120, 120]
    assert len(walk) - len(jumps) == 20                        # every other timestep costs one network evaluation
    assert walk[jumps[1] + 1:jumps[1] + 5] == [120, 90, 60, 30]
    for bad in [dict(sigma_min=sigma(120), sigma_max=sigma(30)), dict(restarts=9), dict(sigma_max=sigma(32))]:
        with pytest.raises(ValueError):
            restart_timesteps(sched, 20, **{**dict(sigma_min=sigma(30), sigma_max=sigma(120), restarts=2,
                                                  restart_steps=3), **bad})
    landing = restart_timesteps(sched, 20, sigma_min=sigma(30), sigma_max=sigma(120), restarts=2, restart_steps=3,
                                      lands=True)                # UniPC's: t = 0 is reached, not evaluated
    jumps = [i for i in range(len(landing) - 1) if landing[i + 1] > landing[i]]
    assert landing[-1] == 0 and len(landing) - len(jumps) - 1 == 20 and [landing[i] for i in jumps] == [30, 30]
    main = [t for i, t in enumerate(landing) if i <= jumps[0] or i > jumps[-1] + 4]     # without 120, 90, 60, 30
    assert len(main) == 20 - 2 * 3 + 1 and sorted(set(main), reverse=True) == main    # the main pass, and the landing


def test_restart_without_jumps_is_the_ode_solver(monkeypatch):
    """Restart's passes are DPM-Solver++(2M) steps: with no restarts, and t_min on the solver's grid, its samples
    are the ODE solver's, bit for bit."""
    sched = make_scheduler()
    model = GaussianModel(sched)
    kw = dict(device=torch.device("cpu"), steps=10, progress=False)
    sigma = lambda t: math.exp(-float(sched.lambdas[t]))        # noqa: E731
    no_restarts = dict(sigma_min=sigma(111), sigma_max=sigma(300), restarts=0, restart_steps=3)
    monkeypatch.setattr(samplers, "RESTART", no_restarts)
    assert restart_timesteps(sched, 10, **samplers.RESTART) == spaced_timesteps(sched, 10, "uniform")
    restart = sample(model, sched, 64, sampler="restart", generator=torch.Generator().manual_seed(4), **kw)
    ode = sample(model, sched, 64, sampler="dpm++", generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(restart, ode)


def test_restart_samples_gaussian_data_with_its_statistics():
    """Given the exact noise of Gaussian data, Restart at 20 evaluations is no farther from the data's statistics than
    the ODE solver it reuses at 20 steps (both are off by the long last steps of a 20-step walk), and at 100
    evaluations it is within a few per cent."""
    sched = make_scheduler()
    counted, std_error = [], {}
    for sampler, steps in (("restart", 20), ("dpm++", 20), ("restart", 100)):
        x = sample(GaussianModel(sched), sched, 4000, sampler=sampler, steps=steps, device=torch.device("cpu"),
                   generator=torch.Generator().manual_seed(5), progress=False,
                   callback=lambda t, x_t, x0: counted.append((sampler, steps)))
        assert abs(x.mean().item() - MU) < 0.01
        std_error[sampler, steps] = abs(x.std().item() / S - 1)
    assert counted.count(("restart", 20)) == 20 and counted.count(("restart", 100)) == 100   # one per evaluation
    assert std_error["restart", 20] < std_error["dpm++", 20] and std_error["restart", 100] < 0.05


def test_restart_through_the_scripts(good_checkpoint, tmp_path):
    run_script("sampling.py", "--ckpt", good_checkpoint, "--sampler", "restart", "--steps", "12", "--num-samples", "4",
               "--out-dir", str(tmp_path), "--precision", "fp32")
    assert (tmp_path / "x0_0.png").exists()


def test_restart_with_too_few_steps_is_a_usage_error(good_checkpoint, tmp_path):
    result = run_script("sampling.py", "--ckpt", good_checkpoint, "--sampler", "restart", "--steps", "5",
                        "--num-samples", "2", "--out-dir", str(tmp_path), "--precision", "fp32", check=False)
    assert result.returncode == 2 and "--sampler restart --steps 5" in result.stderr
    assert not (tmp_path / "x0_0.png").exists()


@pytest.mark.slow
def test_a_checkpoint_from_before_the_prediction_option_trains_on_and_samples_as_before(good_checkpoint, tmp_path,
                                                                                         data_dir):
    """The checkpoint format of before --prediction: no such key in its configuration.  It samples exactly as the
    same weights with prediction eps, and --resume continues it as an eps model."""
    ckpt = torch.load(good_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["config"]["prediction"] == "eps"
    del ckpt["config"]["prediction"]
    ckpt["format"] = "ddpm-checkpoint-v1"          # as written then: no SHA-256 either
    old = tmp_path / "old"
    old.mkdir()
    torch.save(ckpt, old / "ddpm_ckpt.pth")
    for name, path in (("new", good_checkpoint), ("old", old / "ddpm_ckpt.pth")):
        run_script("sampling.py", "--ckpt", path, "--sampler", "dpm++", "--steps", "4", "--num-samples", "4",
                   "--out-dir", str(tmp_path / f"samples_{name}"), "--precision", "fp32")
    from PIL import Image
    assert Image.open(tmp_path / "samples_new" / "x0_0.png").tobytes() == \
        Image.open(tmp_path / "samples_old" / "x0_0.png").tobytes()
    run_script("training.py", "--data-dir", data_dir, "--out-dir", old, "--resume", "--epochs", "2",
               "--preview-samples", "0")
    resumed = torch.load(old / "ddpm_ckpt.pth", map_location="cpu", weights_only=False)
    assert resumed["config"]["prediction"] == "eps" and resumed["epoch"] == 2
