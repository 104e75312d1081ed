"""DPM-Solver++(2M), its SDE form and UniPC: against the exact solution of the diffusion ODE for Gaussian data,
against DDIM, with guidance, and through the scripts."""
import json
import math

import pytest
import torch
from PIL import Image

import samplers
from conftest import run_script
from noise_scheduler import LinearNoiseScheduler, make_scheduler
from sampling import sample
from solvers import ddim_step, dpm_solver_step, forward_jump, restart_timesteps, spaced_timesteps, unic_correction

MU, S = 0.3, 0.5          # data x_0 ~ N(MU, S^2) in every pixel


def gaussian_eps(sched, x, t):
    """The exact noise prediction E[eps | x_t] for data N(MU, S^2): x_t ~ N(alpha MU, alpha^2 S^2 + sigma^2)."""
    a = float(sched.alphas_cumprod[t])
    alpha, sigma = math.sqrt(a), math.sqrt(1 - a)
    return sigma * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)


def exact_ode_solution(sched, x_start, t_start, t_end):
    """The probability-flow ODE maps the Gaussian marginals linearly: it keeps (x_t - alpha_t MU) / std_t."""
    def moments(t):
        a = float(sched.alphas_cumprod[t])
        return math.sqrt(a) * MU, math.sqrt(a * S ** 2 + 1 - a)
    (m0, s0), (m1, s1) = moments(t_start), moments(t_end)
    return m1 + s1 * (x_start - m0) / s0


def solve(sched, sampler, num_steps, x, spacing="uniform"):
    """Walk the sampler's timesteps from T-1 down to t = 0 (not the final jump to x_0), with the exact eps."""
    timesteps = spaced_timesteps(sched, num_steps, spacing)
    previous = None
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        eps = gaussian_eps(sched, x, t)
        if sampler == "ddim":
            x, x0 = ddim_step(sched, eps, t, t_prev, x, eta=0.0, clip_x0=False)
        else:
            x, x0 = dpm_solver_step(sched, eps, t, t_prev, x, previous, clip_x0=False)
        previous = (t, x0)
    return x


def test_dpm_solver_is_second_order_and_ddim_first_order_on_gaussian_data():
    """Steps even in log-SNR (the spacing the solver uses): the error at t = 0 against the exact ODE solution."""
    sched = LinearNoiseScheduler()
    x_T = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    exact = exact_ode_solution(sched, x_T, sched.num_timesteps - 1, 0)
    steps = [20, 40, 80]
    errors = {name: [(solve(sched, name, n, x_T, "logsnr") - exact).pow(2).mean().sqrt().item() for n in steps]
              for name in ("ddim", "dpm++")}
    assert errors["dpm++"][0] < errors["ddim"][0] / 4, errors          # at 20 steps: far closer to the exact solution
    ddim_rates = [a / b for a, b in zip(errors["ddim"], errors["ddim"][1:])]
    dpm_rates = [a / b for a, b in zip(errors["dpm++"], errors["dpm++"][1:])]
    # halving the step size divides the error by about 2 for a first-order method, about 4 for a second-order one
    assert all(1.8 < r < 2.2 for r in ddim_rates), (ddim_rates, errors)
    assert all(3.4 < r < 4.6 for r in dpm_rates), (dpm_rates, errors)


def solve_unipc(sched, num_steps, x, spacing, clip=False):
    """UniPC from T-1 down to t = 0 with the exact eps: num_steps evaluations, each after the first correcting the
    step before it (UniC), the last step landing on t = 0 without one."""
    timesteps = spaced_timesteps(sched, num_steps + 1, spacing)
    previous = corrector = None
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        eps = gaussian_eps(sched, x, t)
        x0 = sched.predict_x0(x, torch.full(x.shape[:1], t), eps)
        x0 = x0.clamp(-1, 1) if clip else x0
        if corrector is not None:
            x, eps = unic_correction(sched, x0, t, *corrector)
        corrector = (x, t, x0, previous)
        x, x0 = dpm_solver_step(sched, eps, t, t_prev, x, previous, clip_x0=clip)
        previous = (t, x0)
    return x


def test_unipc_is_of_higher_order_than_dpm_solver_on_gaussian_data():
    """UniC turns the second-order steps of DPM-Solver++(2M) into third-order ones (Zhao et al., 2023, theorem 3.1):
    halving the step size divides UniPC's error by more than DPM-Solver++'s 4, and by 40 steps it is far smaller."""
    sched = LinearNoiseScheduler()
    x_T = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    exact = exact_ode_solution(sched, x_T, sched.num_timesteps - 1, 0)
    steps = [20, 40, 80]
    unipc = [(solve_unipc(sched, n, x_T, "logsnr") - exact).pow(2).mean().sqrt().item() for n in steps]
    dpm = [(solve(sched, "dpm++", n + 1, x_T, "logsnr") - exact).pow(2).mean().sqrt().item() for n in steps]
    rates = [a / b for a, b in zip(unipc, unipc[1:])]
    assert all(r > 5 for r in rates), (rates, unipc)
    assert unipc[1] < dpm[1] / 2 and unipc[2] < dpm[2] / 3, (unipc, dpm)


def test_unipc_spends_every_evaluation_on_the_way_down_and_lands_on_t_0():
    """sample()'s UniPC: `steps` network evaluations, the last step landing on t = 0 unevaluated, and the very
    result of the corrected steps written out above."""
    sched = LinearNoiseScheduler()
    calls = []

    class Gaussian(torch.nn.Module):
        in_channels, image_size, num_classes = 1, 4, None

        def forward(self, x, t, y=None):
            calls.append(int(t[0]))
            return gaussian_eps(sched, x, int(t[0]))

    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    seen = []
    x = sample(Gaussian(), sched, 16, device=torch.device("cpu"), sampler="unipc", steps=5, noise=noise,
               progress=False, callback=lambda t, x_t, x0: seen.append(t))
    assert calls == [999, 799, 599, 400, 200] and seen == calls + [0]
    assert torch.allclose(x, solve_unipc(sched, 5, noise, "uniform", clip=True).clamp(-1, 1), atol=1e-5)


def test_unipc_starts_afresh_after_restarts_jump():
    """UniPC on a walk with one of Restart's forward jumps (what --steps 10 walks): the jump evaluates nothing, and
    the steps after it are those of a UniPC walk that begins at the jump's top from the jumped x, with nothing
    carried over the jump (neither UniC's correction of the step that reached t_min nor the extrapolation from the
    prediction there)."""
    sched = LinearNoiseScheduler()
    model = GaussianEps(sched)
    walk = restart_timesteps(sched, 10, **samplers.UNIPC_RESTART, lands=True)
    top = next(i for i in range(len(walk) - 1) if walk[i + 1] > walk[i]) + 1        # the jump's top, t_max
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    kw = dict(device=torch.device("cpu"), sampler="unipc", progress=False)
    model.calls.clear()
    x = sample(model, sched, 16, noise=noise, timesteps=walk, generator=torch.Generator().manual_seed(7), **kw)
    assert model.calls == [t for i, t in enumerate(walk[:-1]) if i != top - 1]         # 10, none at the jump
    reached = []                                      # the first pass: down to t_min, where the walk's jump starts
    sample(model, sched, 16, noise=noise, timesteps=walk[:top], callback=lambda t, x_t, x0: reached.append(x_t), **kw)
    jumped = forward_jump(sched, reached[-1], walk[top - 1], walk[top], torch.Generator().manual_seed(7))
    assert torch.equal(x, sample(model, sched, 16, noise=jumped, timesteps=walk[top:], **kw))


class GaussianEps(torch.nn.Module):
    """The exact noise prediction for Gaussian data, counting the network evaluations."""
    in_channels, image_size, num_classes = 1, 4, None

    def __init__(self, sched):
        super().__init__()
        self.sched, self.calls = sched, []

    def forward(self, x, t, y=None):
        self.calls.append(int(t[0]))
        return gaussian_eps(self.sched, x, int(t[0]))


def test_first_step_equals_ddim_and_the_sde_first_step_equals_ddim_with_eta_1():
    sched = LinearNoiseScheduler()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(8, 1, 6, 6, generator=g), torch.randn(8, 1, 6, 6, generator=g)
    for t, t_prev in [(999, 947), (500, 480), (40, 0)]:
        dpm, x0_dpm = dpm_solver_step(sched, eps, t, t_prev, x, previous=None)
        ddim, x0_ddim = ddim_step(sched, eps, t, t_prev, x, eta=0.0)
        assert torch.allclose(dpm, ddim, atol=1e-5) and torch.equal(x0_dpm, x0_ddim)
        sde, _ = dpm_solver_step(sched, eps, t, t_prev, x, None, stochastic=True,
                                       generator=torch.Generator().manual_seed(7))
        ddim1, _ = ddim_step(sched, eps, t, t_prev, x, eta=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(sde, ddim1, atol=1e-5)
    # the second-order step differs from DDIM once there is a previous prediction to extrapolate from
    second, _ = dpm_solver_step(sched, eps, 500, 480, x, previous=(520, torch.zeros_like(x)))
    assert not torch.allclose(second, ddim_step(sched, eps, 500, 480, x)[0], atol=1e-3)


def test_the_final_step_returns_the_clipped_prediction_of_x0():
    sched = LinearNoiseScheduler()
    x, eps = 3 * torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    for stochastic in (False, True):
        out, x0 = dpm_solver_step(sched, eps, 0, -1, x, previous=(3, torch.randn_like(x)), stochastic=stochastic)
        assert torch.equal(out, x0) and x0.abs().max() <= 1.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 20, 50, 999, 1000])
def test_timesteps_are_descending_unique_and_end_at_zero(schedule, spacing, num_steps):
    sched = make_scheduler(schedule, 1000)
    ts = spaced_timesteps(sched, num_steps, spacing)
    assert ts == sorted(set(ts), reverse=True) and ts[0] == 999 and len(ts) == num_steps
    assert ts[-1] == (0 if num_steps > 1 else 999)


def test_logsnr_spacing_is_even_in_lambda():
    sched = LinearNoiseScheduler()
    lambdas = sched.lambdas[spaced_timesteps(sched, 10, "logsnr")]
    gaps = lambdas[1:] - lambdas[:-1]
    assert (gaps > 0).all() and gaps.max() / gaps.min() < 1.3           # rounding to integer t, nothing more


def test_impossible_step_counts_are_refused():
    with pytest.raises(ValueError, match="between 1 and 1000"):
        spaced_timesteps(LinearNoiseScheduler(), 1001, "logsnr")
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(LinearNoiseScheduler(), 10, "quadratic")


def test_guided_dpm_solver_with_scale_1_is_the_conditional_model():
    """w = 1 gives the conditional prediction; the solver then equals one run of the conditional model alone."""
    from unet import UNet
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,), num_classes=10).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    for p in model.label_embedding.parameters():
        torch.nn.init.normal_(p, std=1.0)
    sched = make_scheduler("linear", 1000)
    noise, labels = torch.randn(3, 1, 28, 28), torch.tensor([1, 5, 9])

    class Conditional(torch.nn.Module):          # the model with the labels always given
        in_channels, image_size, num_classes = 1, 28, None

        def forward(self, x, t, y=None):
            return model(x, t, labels)

    common = dict(device=torch.device("cpu"), sampler="dpm++", steps=6, noise=noise, progress=False)
    guided_1 = sample(model, sched, 3, labels=labels, guidance_scale=1.0, **common)
    conditional = sample(Conditional(), sched, 3, **common)
    assert torch.allclose(guided_1, conditional, atol=1e-5)
    guided_3 = sample(model, sched, 3, labels=labels, guidance_scale=3.0, **common)
    assert not torch.allclose(guided_3, guided_1, atol=1e-3)


@pytest.mark.slow
def test_dpm_solver_through_the_scripts(good_checkpoint, tmp_path):
    out = tmp_path / "s"
    result = run_script("sampling.py", "--ckpt", good_checkpoint, "--out-dir", out, "--num-samples", "12",
                        "--batch-size", "6", "--sampler", "dpm++", "--steps", "3,6", "--gif", "--individual",
                        "--save-every", "10")
    for steps in (3, 6):
        assert f"{steps}-step DPM-Solver++(2M)" in result.stdout
        assert Image.open(out / f"dpm++_{steps}.png").size == (10 * 30 + 2, 2 * 30 + 2)
        assert (out / f"reverse_dpm++_{steps}.gif").exists()
        assert len(list((out / f"individual_dpm++_{steps}").iterdir())) == 12
        assert list(out.glob(f"x0_*_dpm++_{steps}.png")), "--save-every wrote no snapshot"
    sde = run_script("sampling.py", "--ckpt", good_checkpoint, "--out-dir", tmp_path / "sde", "--num-samples", "4",
                     "--sampler", "dpm++sde")
    assert "20-step SDE-DPM-Solver++(2M)" in sde.stdout and (tmp_path / "sde" / "x0_0.png").exists()
    for steps in ("0", "51"):           # T = 50 in the tiny model
        bad = run_script("sampling.py", "--ckpt", good_checkpoint, "--out-dir", tmp_path / "bad", "--sampler", "dpm++",
                         "--steps", steps, check=False)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_evaluate_sweep_writes_a_table_a_json_and_a_picture_and_reuses_its_points(good_checkpoint, data_dir,
                                                                                   tmp_path, monkeypatch, capsys):
    """The first sweep runs evaluate.py's main in this process, so that UniPC's 2-step walk is fitted on 40 images
    a set instead of 1,000 (60 s of this test on two cores); the others run the script as a user would."""
    import evaluate
    common = ["evaluate.py", "--ckpt", good_checkpoint, "--data-dir", data_dir, "--cache-dir", tmp_path,
              "--num-samples", "10", "--batch-size", "10", "--classifier-epochs", "1", "--sweep",
              "--sweep-steps", "2,10", "--sweep-out", tmp_path / "sweep.json"]
    monkeypatch.setattr(samplers, "WALK_FIT_SAMPLES", 40)
    evaluate.main([str(arg) for arg in common[1:]])
    printed = capsys.readouterr().out
    points = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert len(points) == 7 * 2 - 1 + 2 and {p["label"] for p in points} == {     # no 2-step Restart: too few steps
        "DDIM (eta 0)", "DDIM (eta 1)", "DPM-Solver++(2M)", "SDE-DPM-Solver++(2M)", "Restart (DPM-Solver++(2M))",
        "UniPC (DPM-Solver++(2M) and UniC)",
        "DPM-Solver++(2M) on fitted timesteps", "SDE-DPM-Solver++(2M) on fitted timesteps",           # (2 and 10)
        "ODE limit (50-step DPM-Solver++(2M))", "DDPM (50 steps)"}
    assert all(p["fid"] > 0 and p["seconds_per_100"] > 0 for p in points)
    assert Image.open(tmp_path / "sweep.png").size[0] > 300
    assert "| DPM-Solver++(2M) | 10 |" in printed and "real images (floor)" in printed
    assert "| ODE limit (50-step DPM-Solver++(2M)) | 50 |" in printed and "no 2-step Restart" in printed
    again = run_script(*common)
    assert "reusing 15 points" in again.stdout and "sweep: DDIM" not in again.stdout
    only = run_script(*common[:-1], tmp_path / "only.json", "--sweep-samplers", "dpm++")
    points = json.loads((tmp_path / "only.json").read_text())["points"]
    assert [(p["label"], p["steps"]) for p in points] == [("DPM-Solver++(2M)", 2), ("DPM-Solver++(2M)", 10),
                                                          ("ODE limit (50-step DPM-Solver++(2M))", 50)]
    assert "DDPM" not in only.stdout


def test_dpm_solver_spaces_few_steps_evenly_in_t_and_many_in_log_snr():
    from samplers import spacing
    assert [spacing("dpm++", n) for n in (5, 20, 25, 26, 50)] == ["uniform"] * 3 + ["logsnr"] * 2
    assert spacing("dpm++sde", 50) == "logsnr" and spacing("ddim", 50) == "uniform"
