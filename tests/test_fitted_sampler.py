"""The fitted sampler: timesteps placed by dynamic programming on the model's own trajectories (GITS), the
analytic first step, and `sampling.py --steps N` through the scripts."""
import itertools
import random

import torch

from conftest import run_script
from noise_scheduler import make_scheduler
from sampling import FIT_GRID, Pipeline, fit_costs, fit_timesteps, generate, sample
from test_solvers import MU, S, gaussian_eps


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
                           timesteps=scheduler.timesteps(steps, spacing))
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
    for steps in (5, 10):                                                       # steps alone: UniPC
        alone, _ = generate(pipeline, 8, seed=3, steps=steps, progress=False)
        assert torch.equal(alone, generate(pipeline, 8, seed=3, sampler="unipc", steps=steps, progress=False)[0])
    assert not torch.equal(alone, first)


def test_sampling_steps_alone_uses_unipc_and_refuses_impossible_step_counts(good_checkpoint, tmp_path):
    out = tmp_path / "s"
    for steps in ("5", "10"):
        alone = run_script("sampling.py", "--ckpt", good_checkpoint, "--out-dir", out, "--num-samples", "4",
                           "--steps", steps)
        assert f"{steps}-step UniPC (DPM-Solver++(2M) and UniC)," in alone.stdout and "fitting" not in alone.stderr
    fitted = run_script("sampling.py", "--ckpt", good_checkpoint, "--out-dir", out, "--num-samples", "4",
                        "--sampler", "fitted", "--steps", "10")
    assert "10-step SDE-DPM-Solver++(2M) on fitted timesteps" in fitted.stdout and (out / "x0_0.png").exists()
    assert "fitting timesteps to the model" in fitted.stderr, "the fit shows a progress bar"
    for options, sentence in ((["--steps", "50"], "UniPC takes 1 to 49 steps"),                    # T = 50
                              (["--sampler", "fitted", "--steps", "50"], "fitted sampler takes 1 to 49 steps")):
        refused = run_script("sampling.py", "--ckpt", good_checkpoint, "--out-dir", out, *options, check=False)
        assert refused.returncode == 2 and sentence in refused.stderr, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]                    # argparse's usage, then one sentence
        assert last.startswith("sampling.py: error:") and "Traceback" not in refused.stderr


def test_the_fit_is_stored_with_the_model_carried_into_the_export_and_refused_when_damaged(train_tiny, tmp_path):
    """The first `--sampler fitted --steps 10` fits and stores the fit in the checkpoint (not as a new save: the
    previous one stays); the next run reads it (no fit, the same images); export.py carries it; a fit stored for other
    weights is made again; a malformed stored fit stops with one sentence and exit 1."""
    from checkpoint import load_checkpoint, previous_path, save_checkpoint
    from sampling import read_model, weights_digest
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "2", "--preview-samples", "0")
    ckpt = out / "ddpm_ckpt.pth"
    previous = open(previous_path(str(ckpt)), "rb").read()
    first = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "a", "--num-samples", "4",
                        "--sampler", "fitted", "--steps", "10")
    assert "fitting timesteps" in first.stderr
    state = load_checkpoint(str(ckpt))
    assert state["fit"]["weights"] == weights_digest(state["ema"]) and state["step"] == 2 * 256 // 32
    assert open(previous_path(str(ckpt)), "rb").read() == previous, "storing the fit is not a new save"
    second = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "b", "--num-samples", "4",
                        "--sampler", "fitted", "--steps", "10")
    assert "fitting timesteps" not in second.stderr
    assert (tmp_path / "a" / "x0_0.png").read_bytes() == (tmp_path / "b" / "x0_0.png").read_bytes()

    export = tmp_path / "model.safetensors"
    run_script("export.py", "--ckpt", ckpt, "--out", export)
    assert read_model(str(export), torch.device("cpu")).fit == state["fit"]

    other = dict(state, fit={**state["fit"], "weights": "0" * 64})
    save_checkpoint(other, str(ckpt), keep_previous=False)
    assert read_model(str(ckpt), torch.device("cpu")).fit is None, "a fit of other weights is never used"
    damaged = dict(state, fit={**state["fit"], "cost": [[0.0]]})
    save_checkpoint(damaged, str(ckpt), keep_previous=False)
    refused = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "c", "--sampler", "fitted",
                         "--steps", "10", check=False)
    assert refused.returncode == 1 and "fitted timesteps stored in" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
