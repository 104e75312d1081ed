"""What is fitted to a trained model: UniPC's walk for `--steps N` (its power, chosen by the network's own
features), the fitted sampler's timesteps placed by dynamic programming on the model's own trajectories (GITS), the
analytic first step, and `sampling.py --steps N` through the scripts."""
import itertools
import random

import pytest
import torch

import samplers
import sampling
from conftest import run_script
from noise_scheduler import make_scheduler
from samplers import FIT_GRID, WALK_POWERS, fit_costs, fit_timesteps, unipc_timesteps
from sampling import Pipeline, generate, sample
from solvers import restart_timesteps, spaced_timesteps
from test_solvers import MU, S, gaussian_eps
from unet import UNet


def brute_force(fit, steps, afs):
    """The cheapest path by trying every one: the first point 0, the last n - 1, and the rest in increasing order."""
    n, points = len(fit["grid"]), steps + (1 if afs else 0)
    best = None
    for middle in itertools.combinations(range(1, n - 1), points - 2):
        path = (0, *middle, n - 1)
        total = sum((fit["cost_afs"][j] if afs and i == 0 else fit["cost"][i][j]) for i, j in zip(path, path[1:]))
        if best is None or total < best[0]:
            best = (total, path)
    return [fit["grid"][i] for i in best[1]]


def test_the_dynamic_programme_finds_the_cheapest_path_from_the_first_timestep_to_the_last():
    rng = random.Random(0)
    n = 9
    grid = list(range(n * 10, 0, -10))
    for trial in range(20):
        fit = dict(grid=grid, cost=[[rng.uniform(0, 1) for _ in range(n)] for _ in range(n)],
                   cost_afs=[rng.uniform(0, 1) for _ in range(n)])
        for steps in (2, 3, 5):
            for afs in (False, True):
                path = fit_timesteps(fit, steps, afs)
                assert path == brute_force(fit, steps, afs), (trial, steps, afs)
                assert len(path) == steps + afs and path[0] == grid[0] and path[-1] == grid[-1]


class GaussianModel(torch.nn.Module):
    """A 'network' that predicts the exact noise of data N(MU, S^2) in every pixel, counting its calls."""
    in_channels, image_size, num_classes = 1, 4, None

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler, self.calls = scheduler, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        return gaussian_eps(self.scheduler, x, int(t[0]))


def test_fitted_timesteps_beat_fixed_ones_on_gaussian_data_and_afs_saves_an_evaluation():
    """With the exact eps of Gaussian data, 3 and 4 fitted evaluations (with the analytic first step before them) draw
    samples whose mean and spread are closer to the data's than DPM-Solver++(2M) at as many steps spaced evenly in t
    or in log-SNR; the network is called once per evaluation, never for the analytic first step."""
    scheduler = make_scheduler("linear", 1000)
    model = GaussianModel(scheduler)
    pipeline = Pipeline(model, scheduler, torch.device("cpu"))
    pipeline.fit = fit_costs(pipeline, samples=16, grid_steps=40, progress=False)
    assert pipeline.fit == fit_costs(pipeline, samples=16, grid_steps=40, progress=False), "deterministic"
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    def error(x):
        return abs(float(x.mean()) - MU) + abs(float(x.std()) - S)
    for steps in (3, 4):
        model.calls = 0
        fitted = sample(model, scheduler, len(noise), device="cpu", noise=noise, progress=False, sampler="fitted",
                        analytic_first_step=True, timesteps=fit_timesteps(pipeline.fit, steps, True))
        assert model.calls == steps
        for spacing in ("uniform", "logsnr"):
            fixed = sample(model, scheduler, len(noise), device="cpu", noise=noise, progress=False, sampler="dpm++",
                           timesteps=spaced_timesteps(scheduler, steps, spacing))
            assert error(fitted) < error(fixed), (steps, spacing, error(fitted), error(fixed))


def test_generate_fits_once_and_draws_the_same_images_for_the_same_seed():
    scheduler = make_scheduler("linear", 1000)
    pipeline = Pipeline(GaussianModel(scheduler), scheduler, torch.device("cpu"))
    first, _ = generate(pipeline, 8, seed=3, sampler="fitted", steps=10, progress=False)
    fit = pipeline.fit
    assert fit is not None and len(fit["grid"]) == FIT_GRID
    again, _ = generate(pipeline, 8, seed=3, sampler="fitted", steps=10, progress=False)
    assert pipeline.fit is fit, "the fit is made once per model"
    assert torch.equal(first, again)
    restart = lambda steps: restart_timesteps(scheduler, steps, **samplers.UNIPC_RESTART, lands=True)  # noqa: E731
    for steps, walk in ((10, restart(10)), (19, restart(19)), (50, restart(50))):  # UniPC, nothing fitted
        alone, _ = generate(pipeline, 8, seed=3, steps=steps, progress=False)
        assert torch.equal(alone, generate(pipeline, 8, seed=3, sampler="unipc", steps=steps, progress=False)[0])
        assert samplers.walk_of(pipeline, "unipc", steps)[0] == walk == samplers.sampler_timesteps(scheduler, "unipc",
                                                                                                   steps)
    assert not torch.equal(alone, first)


def test_unipc_walk_of_power_one_is_even_spacing_and_a_larger_power_crowds_it_towards_the_data():
    for T in (50, 1000):
        scheduler = make_scheduler("linear", T)
        for steps in range(1, min(T, 60)):
            assert unipc_timesteps(scheduler, steps) == spaced_timesteps(scheduler, steps + 1, "uniform")
        for power in (1.25, 1.5, 2.0):
            walk = unipc_timesteps(scheduler, 5, power)
            assert walk[0] == T - 1 and walk[-1] == 0 and walk == sorted(set(walk), reverse=True)
            assert walk[-2] < unipc_timesteps(scheduler, 5)[-2], "the last evaluation nearer the data"
        with pytest.raises(ValueError, match="takes 1 to"):
            unipc_timesteps(scheduler, T)
    with pytest.raises(ValueError, match="repeat a timestep"):
        unipc_timesteps(make_scheduler("linear", 50), 40, 2.0)


@pytest.mark.slow
def test_the_walk_fit_keeps_the_evenest_power_whose_images_are_nearest_the_reference(monkeypatch):
    """With the reference made UniPC's own walk at power 1.5, that power draws the very same images (distance 0):
    without tolerance the fit must choose it, with a boundless one the evenest walk, power 1; with the reference at
    power 1 the fit chooses 1 wherever it stands among the powers.  The same for EDM's spacing ("karras"), which
    counts as less even than every power.  The same weights and seed choose the same again."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=()).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)                  # a network that predicts some noise
    pipeline = Pipeline(model, make_scheduler("linear", 50), torch.device("cpu"))
    first = samplers.fit_walk_power(pipeline, 4, samples=40, progress=False)
    assert first in WALK_POWERS and first == samplers.fit_walk_power(pipeline, 4, samples=40, progress=False)

    monkeypatch.setattr(samplers, "FID_SAMPLER", ("unipc", 5))
    monkeypatch.setattr(samplers, "sampler_timesteps", lambda scheduler, sampler, steps: unipc_timesteps(
        scheduler, steps, reference_power))
    for reference_power, tolerance, powers, chosen in ((1.5, 0.0, (1.0, 2.0, 1.5, 1.25), 1.5),
                                                       (1.5, 1e9, (1.5, 2.0, 1.0, 1.25), 1.0),
                                                       (1.0, 0.0, (2.0, 1.5, 1.0, 1.25), 1.0),
                                                       ("karras", 0.0, (1.0, "karras", 1.5), "karras"),
                                                       ("karras", 1e9, ("karras", 1.5, 1.25), 1.25)):
        monkeypatch.setattr(samplers, "WALK_FIT_TOLERANCE", tolerance)
        monkeypatch.setattr(samplers, "WALK_POWERS", powers)
        assert samplers.fit_walk_power(pipeline, 5, samples=40, progress=False) == chosen, (reference_power, tolerance)


@pytest.mark.slow
def test_sampling_steps_alone_uses_unipc_and_refuses_impossible_step_counts(good_checkpoint, tmp_path):
    out, ckpt = tmp_path / "s", tmp_path / "ddpm_ckpt.pth"
    from checkpoint import load_checkpoint, save_checkpoint
    state = load_checkpoint(str(good_checkpoint))          # a copy without a fit: fits are stored in the checkpoint,
    state.pop("fit", None)                                 # and other tests may have stored one in the shared one
    save_checkpoint(state, str(ckpt), keep_previous=False)
    alone = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", out, "--num-samples", "4", "--steps", "10")
    assert "10-step UniPC (DPM-Solver++(2M) and UniC)," in alone.stdout
    assert "fitting" not in alone.stderr, "from 10 evaluations on, the walk has a restart: nothing to fit (5: below)"
    fitted = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", out, "--num-samples", "4",
                        "--sampler", "fitted", "--steps", "10")
    assert "10-step SDE-DPM-Solver++(2M) on fitted timesteps" in fitted.stdout and (out / "x0_0.png").exists()
    assert "fitting timesteps to the model" in fitted.stderr, "the fit shows a progress bar"
    for options, sentence in ((["--steps", "50"], "UniPC takes 1 to 49 steps"),                    # T = 50
                              (["--sampler", "fitted", "--steps", "50"], "fitted sampler takes 1 to 49 steps")):
        refused = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", out, *options, check=False)
        assert refused.returncode == 2 and sentence in refused.stderr, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]                    # argparse's usage, then one sentence
        assert last.startswith("sampling.py: error:") and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_the_fit_is_stored_with_the_model_carried_into_the_export_and_refused_when_damaged(train_tiny, tmp_path,
                                                                                           monkeypatch, capsys):
    """The first `--steps 5` fits UniPC's walk and `--sampler fitted --steps 10` the fitted sampler's timesteps; both
    are stored in the checkpoint (not as a new save: the previous one stays); the next runs read them (no fit, the
    same images); export.py carries them; a fit stored for other weights is made again; a malformed stored fit stops
    with one sentence and exit 1.  The walk's first fit runs sampling.py's main in this process, its sets 40 images
    instead of 1,000 (the rule is tested above; 1,000 took 80 to 100 s of this test on two cores); what it stored
    is then read by the script in its own process."""
    from checkpoint import load_checkpoint, previous_path, save_checkpoint, weights_digest
    from sampling import read_model
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "2", "--preview-samples", "0")
    ckpt = out / "ddpm_ckpt.pth"
    previous = open(previous_path(str(ckpt)), "rb").read()
    runs = {"walk": ["--steps", "5"], "fitted": ["--sampler", "fitted", "--steps", "10"]}
    runs = {name: [*options, "--precision", "fp32"] for name, options in runs.items()}   # the same in every process

    def draw(name, folder, check=True):
        return run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / folder / name, "--num-samples", "4",
                          *runs[name], check=check)
    monkeypatch.setattr(samplers, "WALK_FIT_SAMPLES", 40)
    sampling.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "a" / "walk"), "--num-samples", "4", *runs["walk"]])
    assert "fitting UniPC's 5-step walk" in capsys.readouterr().err
    assert load_checkpoint(str(ckpt))["fit"]["walk_power"]["5"] in WALK_POWERS
    assert "fitting timesteps" in draw("fitted", "a").stderr
    state = load_checkpoint(str(ckpt))
    assert state["fit"]["weights"] == weights_digest(state["ema"]) and state["step"] == 2 * 256 // 32
    assert set(state["fit"]["walk_power"]) == {"5"} and len(state["fit"]["grid"]) == min(FIT_GRID, 50)
    assert open(previous_path(str(ckpt)), "rb").read() == previous, "storing the fit is not a new save"
    for name in runs:
        again = draw(name, "b")
        assert "fitting" not in again.stderr
        assert (tmp_path / "a" / name / "x0_0.png").read_bytes() == (tmp_path / "b" / name / "x0_0.png").read_bytes()

    export = tmp_path / "model.safetensors"
    run_script("export.py", "--ckpt", ckpt, "--out", export)
    assert read_model(str(export), torch.device("cpu")).fit == state["fit"]

    other = dict(state, fit={**state["fit"], "weights": "0" * 64})
    save_checkpoint(other, str(ckpt), keep_previous=False)
    assert read_model(str(ckpt), torch.device("cpu")).fit is None, "a fit of other weights is never used"
    for name, damage in (("fitted", {"cost": [[0.0]]}), ("walk", {"walk_power": {"5": "1.5"}}),
                         ("walk", {"walk_power": {"five": 1.5}})):
        save_checkpoint(dict(state, fit={**state["fit"], **damage}), str(ckpt), keep_previous=False)
        refused = draw(name, "c", check=False)
        assert refused.returncode == 1 and "fitted timesteps stored in" in refused.stderr, damage
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr


def test_a_first_evaluation_known_already_replaces_the_networks_with_the_same_images():
    """fit_walk_power draws its four walks from the same noise, all starting at T-1, and asks the network there once
    for all of them: sample() given that answer (first_eps) draws the same images with one evaluation fewer."""
    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1).eval()
    scheduler, cpu, noise = make_scheduler("linear", 50), torch.device("cpu"), torch.randn(3, 1, 8, 8)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    for sampler, walk in (("unipc", unipc_timesteps(scheduler, 5, 1.5)),
                          ("restart", samplers.sampler_timesteps(scheduler, "restart", 20))):
        t = torch.full((3,), walk[0])
        with torch.no_grad():
            first_eps = samplers.predict_noise(model, noise, t)
        images, evaluations = [], []
        for known in (None, first_eps):
            before = len(calls)
            images.append(sample(model, scheduler, 3, device=cpu, sampler=sampler, noise=noise, timesteps=walk,
                                 generator=torch.Generator().manual_seed(1), first_eps=known, progress=False))
            evaluations.append(len(calls) - before)
        assert torch.equal(images[0], images[1]), sampler
        assert evaluations[1] == evaluations[0] - 1 and evaluations[0] == (5 if sampler == "unipc" else 20), sampler
