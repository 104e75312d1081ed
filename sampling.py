"""Sample from a trained DDPM: algorithm 2 of Ho et al. (2020), DDIM (Song et al., 2021) or DPM-Solver++
(Lu et al., 2022).

    python sampling.py                                   # 100 samples, all 1000 steps -> default/samples/x0_0.png
    python sampling.py --sampler dpm++ --steps 20        # DPM-Solver++(2M): 20 network evaluations
    python sampling.py --sampler ddim --steps 50         # 50 DDIM steps (eta 0: deterministic)
    python sampling.py --sampler ddim --steps 5,10,20,50 # one grid per step count, same starting noise
    python sampling.py --save-every 100 --individual     # also x0_{t}.png every 100 steps, and one PNG per sample

The model, its noise schedule, image size and channels are all rebuilt from the checkpoint.  From Python:

    from sampling import generate, load_model, save_grid
    pipeline = load_model("default/ddpm_ckpt.pth")                  # the EMA weights, on the fastest device
    pipeline = load_model("default/model.safetensors")              # or the same weights as export.py writes them
    images, labels = generate(pipeline, 16, sampler="dpm++", steps=20)
    save_grid(images, "grid.png", nrow=4)
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, checked_fit, read_weights, store_fit, weights_digest
from cli import add_device_options, fail, first_line, int_list, positive_int
from dataset import to_model_range, to_uint8
from hardware import LAYOUT_NAMES, autocast, choose_speed, compile_for_sampling, memory_format, pick_device
from noise_scheduler import NoiseScheduler, make_scheduler
from run_folder import DEFAULT_CKPT, DEFAULT_OUT_DIR
from unet import UNet

MODEL_KEYS = ("in_channels", "image_size", "base_channels", "channel_mults", "num_res_blocks",
              "attention_resolutions", "dropout", "num_heads", "num_classes")


def model_config(config):
    """The UNet's constructor arguments, taken from a run's configuration."""
    return {k: config[k] for k in MODEL_KEYS}


# Classifier-free guidance of a conditional model: 1, the conditional model itself (one network pass per evaluation).
# w = 1.5 halved the FID of a 936-step Fashion-MNIST model (4.1 / 4.8 against 9.3 / 10.7) but raised that of an
# 880-step model of scikit-learn's digits by 37 to 49% (52.9 / 58.3 against 35.5 / 42.7); 1.25 and 2 likewise
# (docs/experiments.md, Class labels): chosen by the worst case, no guidance unless asked for.
DEFAULT_GUIDANCE = 1.0
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde", "restart", "fitted", "unipc")
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "dpm++sde": 20, "restart": 20, "fitted": 10, "unipc": 5}
# Restart sampling (Xu et al., 2023): its interval of noise levels sigma = sigma_t / alpha_t, how often it jumps back
# up, and the ODE steps of each pass down.  Chosen by its worst case over two datasets and two sample seeds among
# eleven settings at 20 evaluations (docs/experiments.md, Restart 20): wider intervals than 0.1..0.4 corrected
# more of the ODE's drift.
RESTART = dict(sigma_min=0.2, sigma_max=1.5, restarts=2, restart_steps=3)
# The recommended fast sampler: the best worst case over the datasets measured (docs/experiments.md).  training.py
# --fid-every measures with it; change it here.
FID_SAMPLER = ("restart", 20)
LOGSNR_FROM = 26     # DPM-Solver++ steps from which the timesteps are spaced evenly in log-SNR rather than in t
# --steps N without --sampler: UniPC, on a walk fitted to the model below WALK_FIT_BELOW evaluations, with one of
# Restart's jumps from there on (walk_power).  On even spacing at 5, UniPC scored 0.4 to 0.7 times the FID of evenly
# spaced DPM-Solver++(2M); at 10, still evenly spaced, on seven models of 1,155 to 3,730 steps (two datasets, two
# training seeds), its worst sample seed scored 0.64 to 1.13 times the fitted sampler's (lower on six) and 0.85 to
# 1.16 times DPM-Solver++(2M)'s (docs/experiments.md: UniPC, the five-step sampler).
STEPS_SAMPLER = "unipc"


def spacing(sampler, steps):
    """How a few-step sampler spaces its timesteps (noise_scheduler.timesteps), chosen by measured FID
    (docs/experiments.md, Timestep spacing of DPM-Solver++): DDIM evenly in t; DPM-Solver++ evenly in t for up
    to 25 steps (at 10 and 20 steps far better than in log-SNR), evenly in log-SNR, as in the paper, from 26 on
    (at 50 steps far better than in t, whose last step, from t ~ 20 to 0, is too long for the extrapolation)."""
    return "logsnr" if sampler.startswith("dpm++") and steps >= LOGSNR_FROM else "uniform"


def sampler_timesteps(scheduler, sampler, steps):
    """The timesteps a sampler walks: all T for "ddpm", else `steps` of them, spaced as `spacing` says.  (The fitted
    sampler's depend on the model: walk_of.)"""
    if sampler == "fitted":
        grid = min(FIT_GRID, scheduler.num_timesteps)
        if not 1 <= steps < grid:
            raise ValueError(f"the fitted sampler takes 1 to {grid - 1} steps on this model")
        return scheduler.timesteps(steps, "logsnr")
    if sampler == "ddpm":
        return scheduler.timesteps(None, "uniform")
    if sampler == "unipc":      # `steps` evaluations, from T-1 down to the last, then one step more to land on t = 0
        return unipc_timesteps(scheduler, steps, unipc_spacing(steps))
    if sampler == "restart":
        return scheduler.restart_timesteps(steps, **RESTART)
    return scheduler.timesteps(steps, spacing(sampler, steps))


SAMPLER_NAMES = {"ddim": "DDIM", "dpm++": "DPM-Solver++(2M)", "dpm++sde": "SDE-DPM-Solver++(2M)",
                 "unipc": "UniPC (DPM-Solver++(2M) and UniC)",
                 "fitted": "DPM-Solver++(2M) on fitted timesteps",
                 "restart": "Restart (DPM-Solver++(2M))"}


def sampler_label(sampler, steps, num_timesteps, eta=0.0):
    """'1000-step DDPM', '50-step DDIM (eta 0)', '20-step DPM-Solver++(2M)'."""
    if sampler == "ddpm":
        return f"{num_timesteps}-step DDPM"
    if sampler == "fitted" and steps >= FITTED_SDE_FROM:
        return f"{steps}-step SDE-{SAMPLER_NAMES[sampler]}"
    return f"{steps}-step {SAMPLER_NAMES[sampler]}" + (f" (eta {eta:g})" if sampler == "ddim" else "")


def predict_noise(model, x, t, labels=None, guidance_scale=1.0):
    """The network's prediction at (x_t, t), float32: epsilon_theta, or v or x_0 for a model trained to predict those
    (scheduler.to_eps converts).  With labels and a guidance scale w != 1, classifier-free guidance
        eps = eps_uncond + w * (eps_cond - eps_uncond)      (Ho & Salimans, 2022)
    in one batched forward pass over [conditional; unconditional]: w = 1 is the conditional
    prediction, w = 0 the unconditional one, w > 1 pushes samples towards their class.  For v and x_0 the same
    combination of the outputs is that of their eps, since to_eps is affine in the output."""
    if labels is None or guidance_scale == 1.0:
        return model(x, t, labels).float()
    null = torch.full_like(labels, model.num_classes)                          # the "no label" token
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def network_eps(model, scheduler, x, t, labels=None, guidance_scale=1.0):
    """epsilon_theta(x_t, t), float32, whatever the network predicts: it sees model_input(x_t) (x_t itself, c_in x_t
    for "edm"), and to_eps turns its output (eps, v, x_0 or EDM's F) into the noise that every sampler steps with."""
    return scheduler.to_eps(predict_noise(model, scheduler.model_input(x, t), t, labels, guidance_scale), x, t)


@torch.no_grad()
def sample(model, scheduler, num_samples, *, device, precision="fp32", generator=None, sampler="ddpm",
           steps=None, eta=0.0, labels=None, guidance_scale=1.0, noise=None, callback=None, progress=True,
           timesteps=None, analytic_first_step=False, first_eps=None):
    """Run the reverse process from x_T ~ N(0, I) and return x_0 in [-1, 1], float32 (B, C, H, W).

    sampler "ddpm": the ancestral sampler over all T steps (algorithm 2); "ddim": DDIM over `steps` timesteps with noise
    scale `eta`; "dpm++" / "dpm++sde": DPM-Solver++(2M) or its SDE form over `steps` timesteps; "restart": Restart
    sampling, DPM-Solver++(2M) passes with forward jumps between them, `steps` network evaluations in all
    (noise_scheduler.restart_timesteps). labels (B,) draw a conditional model's classes, with classifier-free guidance
    of scale `guidance_scale` (see predict_noise). callback(t, x_t, x0_pred) is called after every network evaluation,
    with tensors of torch.inference_mode (the walk runs in it, 5 to 10% faster than under no_grad on a 2-core CPU): to
    change one in place later, clone it. `timesteps` replaces the sampler's own walk (the "fitted" sampler's timesteps,
    fit_timesteps); analytic_first_step takes the first step's noise as x_T itself instead of asking the network (AFS,
    Dockhorn et al., 2022 / Zhou et al., 2024: at t = T-1, x_T = alpha x_0 + sigma eps with alpha < 0.01, so eps is x_T
    up to that), which saves one evaluation. The fitted sampler steps with DPM-Solver++(2M), on the reverse SDE from
    FITTED_SDE_FROM evaluations on. "unipc": UniPC (Zhao et al., 2023), DPM-Solver++(2M) steps each corrected by UniC
    with the next evaluation; its walk lands on t = 0 without evaluating there (x_0 is x at t = 0, whose noise sigma_0 =
    0.01 is below a grey level), so that all `steps` evaluations are spent on the way down. first_eps: the network's
    noise at the first timestep for this noise, if it is known already (the walk fit draws four walks from the same
    noise, all starting at T-1): it replaces the first evaluation, with the same result.
    """
    shape = (num_samples, model.in_channels, model.image_size, model.image_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else device)
    x = noise.to(device, torch.float32)                                        # x_T ~ N(0, I)  (line 1)
    if timesteps is None:
        timesteps = sampler_timesteps(scheduler, sampler, steps)
    if labels is not None:
        labels = labels.to(device)
    x0, previous, corrector = x, None, None
    lands = sampler == "unipc"             # the walk's last timestep, 0, is reached but not evaluated
    evaluations = len(timesteps) - int(analytic_first_step) - int(lands)
    stochastic = sampler == "dpm++sde" or (sampler == "fitted" and evaluations >= FITTED_SDE_FROM)
    with torch.inference_mode(), autocast(device, precision):      # (the returned x_0 is an ordinary tensor)
        for i, t in enumerate(tqdm(timesteps, desc=f"{sampler} sampling", leave=False, disable=not progress)):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1           # -1: the clean data x_0
            if t_prev > t:                                                    # Restart's jump back up: no evaluation
                x, previous, corrector = scheduler.forward_jump(x, t, t_prev, generator), None, None
                continue
            if lands and i == len(timesteps) - 1:                             # UniPC at t = 0: x is the sample
                if callback is not None:
                    callback(t, x, x0)
                break
            tt = torch.full((num_samples,), t, dtype=torch.long, device=device)
            if analytic_first_step and i == 0:
                eps = x                                                        # AFS: no evaluation
            elif first_eps is not None and i == 0:
                eps = first_eps.float()                                        # evaluated already
            else:
                eps = network_eps(model, scheduler, x, tt, labels, guidance_scale)   # epsilon_theta(x_t, t)
            if sampler == "ddpm":
                x, x0 = scheduler.step(eps, t, x, generator=generator)         # lines 3-4
            elif sampler == "ddim":
                x, x0 = scheduler.ddim_step(eps, t, t_prev, x, eta=eta, generator=generator)
            elif sampler == "unipc":
                x0 = scheduler.predict_x0(x, tt, eps).clamp(-1.0, 1.0)
                if corrector is not None:                     # UniC: the step that led here, corrected by x0
                    x, eps = scheduler.unic_correction(x0, t, *corrector)
                corrector = (x, t, x0, previous)
                x, x0 = scheduler.dpm_solver_step(eps, t, t_prev, x, previous, generator=generator)
            else:           # dpm++, dpm++sde, fitted, and the ODE passes of restart
                x, x0 = scheduler.dpm_solver_step(eps, t, t_prev, x, previous, stochastic=stochastic,
                                                  generator=generator)
            previous = None if analytic_first_step and i == 0 else (t, x0)     # (AFS's x_0 is not extrapolated)
            if callback is not None:
                callback(t, x, x0)
    return x.clamp(-1, 1)                                                      # line 6: return x_0


# ---- timesteps fitted to the model: few-step sampling ---------------------------------------------------------
# The fit (fit_costs): FIT_SAMPLES trajectories of a FIT_GRID-step DPM-Solver++(2M) walk, evenly spaced in log-SNR,
# from noise drawn with FIT_SEED: FIT_SAMPLES x FIT_GRID network evaluations, 16 to 18 s for the default model on 2
# cores of an AMD EPYC in fp32.
FIT_SAMPLES, FIT_GRID, FIT_SEED = 64, 60, 0
# The fitted sampler takes the analytic first step up to FITTED_AFS_UP_TO evaluations, and from FITTED_SDE_FROM on
# steps on the reverse SDE (SDE-DPM-Solver++(2M)) rather than the ODE: FID 39.8 (ODE) against 47.1 (SDE) at 5
# evaluations and 35.7 against 26.0 at 10 on a 922-step Fashion-MNIST model, 60.5 against 92.3 and 159.9 against 49.4
# on a 394-step model of scikit-learn's digits (docs/experiments.md).
FITTED_AFS_UP_TO, FITTED_SDE_FROM = 10, 10


@torch.inference_mode()
def fit_costs(pipeline, samples=FIT_SAMPLES, grid_steps=FIT_GRID, seed=FIT_SEED, progress=True):
    """What fit_timesteps needs to place any number of steps on this model: a fine grid of timesteps and the
    local error of one step between any two of its points, measured on the model's own trajectories (GITS,
    Chen et al., 2024, section 4).  A teacher walk of `grid_steps` DPM-Solver++(2M) steps records, at each grid
    point i, the state x_i and the network's noise eps_i; a first-order step (DDIM, eta 0) from the teacher's
    x_i with eps_i to grid point j then lands at some x'_j, and
        cost[i][j] = mean over the samples of || x'_j - x_j ||        (the error a step i -> j adds);
    cost_afs[j] is cost[0][j] with the analytic first step's eps = x_T.  No data is needed, only the model, and
    the result is the same for the same weights and seed.  Returns a dict of plain lists."""
    model, scheduler, device = pipeline.model, pipeline.scheduler, pipeline.device
    grid = scheduler.timesteps(min(grid_steps, scheduler.num_timesteps), "logsnr")
    generator = torch.Generator(device=device).manual_seed(seed)
    num_classes = model.num_classes
    labels = torch.arange(samples, device=device) % num_classes if num_classes else None
    x = torch.randn((samples, model.in_channels, model.image_size, model.image_size), generator=generator,
                    device=device)
    states, noises, previous = [], [], None
    with autocast(device, pipeline.precision):
        for i, t in enumerate(tqdm(grid, desc="fitting timesteps to the model", unit="step", disable=not progress)):
            tt = torch.full((samples,), t, dtype=torch.long, device=device)
            eps = network_eps(model, scheduler, x, tt, labels, DEFAULT_GUIDANCE)
            states.append(x)
            noises.append(eps)
            t_next = grid[i + 1] if i + 1 < len(grid) else -1
            x, x0 = scheduler.dpm_solver_step(eps, t, t_next, x, previous)
            previous = (t, x0)

    def error(i, j, eps):
        landed = scheduler.dpm_solver_step(eps, grid[i], grid[j], states[i])[0]
        return float((landed - states[j]).flatten(1).norm(dim=1).mean())
    n = len(grid)
    cost = [[error(i, j, noises[i]) if j > i else 0.0 for j in range(n)] for i in range(n)]
    cost_afs = [0.0] + [error(0, j, states[0]) for j in range(1, n)]
    return dict(grid=grid, cost=cost, cost_afs=cost_afs, samples=samples, seed=seed)


def fit_timesteps(fit, steps, analytic_first_step):
    """The `steps` network evaluations (and, with analytic_first_step, one free step before them) from the fit's grid
    (fit_costs) that make the least total error: the cheapest path from the grid's first point, T-1, to its last,
    t = 0, through steps (+ 1) points, found by dynamic programming over (points used, last point), as GITS does.
    Returns the descending timesteps."""
    grid, n = fit["grid"], len(fit["grid"])
    points = steps + (1 if analytic_first_step else 0)
    if not 1 <= steps or points > n:
        raise ValueError(f"the fitted sampler takes 1 to {n - int(analytic_first_step)} steps, not {steps}")
    if points == 1:
        return [grid[0]]

    def step_cost(i, j):
        return fit["cost_afs"][j] if analytic_first_step and i == 0 else fit["cost"][i][j]
    best = {(1, 0): (0.0, None)}                     # (points on the path, its last point) -> (cost, the point before)
    for k in range(2, points + 1):
        for j in range(k - 1, n):
            options = [(best[k - 1, i][0] + step_cost(i, j), i) for i in range(k - 2, j) if (k - 1, i) in best]
            if options:
                best[k, j] = min(options)
    path = [n - 1]
    for k in range(points, 1, -1):
        path.append(best[k, path[-1]][1])
    return [grid[i] for i in reversed(path)]


# ---- UniPC's walk, fitted to the model: few-step sampling ----------------------------------------------------
# Below WALK_FIT_BELOW evaluations, UniPC walks t_i = (T-1)(1 - i/N)^p (unipc_timesteps) with the power p fitted to the
# model among WALK_POWERS (fit_walk_power), or EDM's spacing ("karras").  No one walk served every model at 5
# evaluations: near-even spacing was best on Fashion-MNIST and 1.5 or EDM's spacing on the digits (2.24-3.45 times
# the 1000-step DDPM's FID there with p = 1).  p = 2 was best on none of ten models at 5; p = 1.25 on none of four, and
# was picked once on ten, wrongly; on four models EDM's spacing at 5 scored 0.79-0.93 times the best power's FID on the
# digits, 1.7 times on Fashion-MNIST (docs/experiments.md, UniPC's walk, fitted to the model, and EDM's spacing for ten
# evaluations).  p = 1.1 took the place of 1: on both Fashion-MNIST models of the conditional default it scored 0.90 to
# 1.01 times p = 1's FID at 3, 4 and 5 evaluations (docs/experiments.md, The walk fit of the conditional default).  The
# fit draws WALK_FIT_SAMPLES images with the 20-step Restart sampler, the reference, and as many with UniPC on each
# walk, from the same noise, and keeps the evenest walk whose images lie nearest the reference, up to
# WALK_FIT_TOLERANCE times the distance between the reference's two halves: a difference within the noise of the
# measure does not move the walk from near-even spacing.  On Fashion-MNIST EDM's spacing came nearer than p = 1.1 by at
# most 1.4 times that distance and scored 1.4 to 1.5 times its FID; where it won, on the digits, by 28 to 31 times.
# 800 images a walk (not 1,000) keep the fit within a minute on a slow 2-core CPU; on those four models they chose
# the same walks, EDM's spacing nearer by at most 1.1 times on Fashion-MNIST and by 15.7 to 16.2 on the digits.
WALK_POWERS = (1.1, 1.5, "karras")
WALK_FIT_BELOW, WALK_FIT_SAMPLES, WALK_FIT_SEED, WALK_FIT_TOLERANCE = 10, 800, 0, 2.0
# From WALK_FIT_BELOW evaluations on, nothing fitted, UniPC's walk holds one of Restart's forward jumps (Xu et al.,
# 2023, algorithm 1; NoiseScheduler.restart_timesteps): an even walk down to the noise level sigma_min, a jump back up
# to sigma_max with fresh noise, restart_steps steps down to sigma_min again, and on to the data.  The jump contracts
# the error the walk has gathered so far, as the DDPM's noise does at every step.  At 10, on two models of each of two
# datasets with two sample seeds, it scored 0.62 to 0.97 times the FID of EDM's spacing (the walk before) and 0.90 to
# 1.06 times that of the 20-step Restart sampler; of the settings and walks screened, its worst case over the models
# was the best; at 15, 20 and 50 it beat the walks it replaced on every model (docs/experiments.md, A restart in
# UniPC's walk).
UNIPC_RESTART = dict(sigma_min=0.1, sigma_max=1.0, restarts=1, restart_steps=3)


def unipc_spacing(steps):
    """UniPC's walk where nothing is fitted to the model: "restart" (an even walk with one of Restart's jumps) from
    WALK_FIT_BELOW evaluations on, power 1 (even in t) below (without a model to fit)."""
    return "restart" if steps >= WALK_FIT_BELOW else 1.0


def unipc_timesteps(scheduler, steps, power=1.0):
    """UniPC's walk of `steps` evaluations and the landing on t = 0: t_i = (T-1)(1 - i/steps)^power, i = 0..steps,
    rounded.  Power 1 spaces the timesteps evenly in t; a larger power crowds them towards the data, where the
    last steps of a short walk leave grain that a briefly trained model does not remove.  ValueError if the walk
    does not descend strictly.  power "karras": EDM's spacing instead (NoiseScheduler.timesteps); "restart": the
    even walk with Restart's jump of UNIPC_RESTART (NoiseScheduler.restart_timesteps, landing)."""
    T = scheduler.num_timesteps
    if not 1 <= steps < T:
        raise ValueError(f"UniPC takes 1 to {T - 1} steps on this model")
    if power == "karras":
        return scheduler.timesteps(steps + 1, "karras")
    if power == "restart":
        return scheduler.restart_timesteps(steps, **UNIPC_RESTART, lands=True)
    walk = (torch.linspace((T - 1) ** (1 / power), 0, steps + 1, dtype=torch.float64) ** power).round().long().tolist()
    if any(later >= earlier for earlier, later in zip(walk, walk[1:])):
        raise ValueError(f"{steps} steps spaced with power {power:g} repeat a timestep of this {T}-step schedule")
    return walk


@torch.inference_mode()
def fit_walk_power(pipeline, steps, samples=None, seed=WALK_FIT_SEED, progress=True):
    """The walk of UniPC's `steps` evaluations (unipc_timesteps) for this model, from WALK_POWERS: the evenest (the
    smallest power; EDM's spacing, "karras", counts as less even than every power) whose images are nearest those of
    the 20-step Restart sampler (the README's fast sampler), drawn from the same noise, up to a tolerance.  The
    distance is FID's (Heusel et al., 2017), the Frechet distance between Gaussians fitted to features of the two
    sets of images, in the features the network itself computes (UNet.features at t = 0): no data and no other
    network are needed.  The tolerance is WALK_FIT_TOLERANCE times the same distance between the two halves of the
    reference images, a measure of the noise in the distances: the power moves from even spacing only for a
    difference larger than that.  The same weights and seed give the same power.  Costs 17 + 3 * steps network
    evaluations per image (the four walks share their first)."""
    from fid import frechet_distance, gaussian_stats
    model, scheduler, device = pipeline.model, pipeline.scheduler, pipeline.device
    samples = samples or WALK_FIT_SAMPLES
    walks = {"reference": sampler_timesteps(scheduler, *FID_SAMPLER)}
    for power in WALK_POWERS:
        with contextlib.suppress(ValueError):                       # a power that repeats a timestep is not tried
            walks[power] = unipc_timesteps(scheduler, steps, power)
    if len(walks) == 2:                                              # one power to try: nothing to compare
        return next(power for power in walks if power != "reference")
    batch, num_classes = min(samples, 100), model.num_classes
    shape = (samples, model.in_channels, model.image_size, model.image_size)
    labels = torch.arange(samples, device=device) % num_classes if num_classes else None
    generators = {}
    for name in walks:       # one generator a walk (Restart's jumps draw from it), each past the same noise
        generators[name] = torch.Generator(device=device).manual_seed(seed)
        noise = torch.randn(shape, generator=generators[name], device=device)
    features = {name: [] for name in walks}
    jumps = sum(later > earlier for walk in walks.values() for earlier, later in zip(walk, walk[1:]))  # (as sample)
    evaluations = sum(map(len, walks.values())) - jumps             # a callback each, but none at Restart's jumps
    with tqdm(total=evaluations * math.ceil(samples / batch), unit="step", disable=not progress,
              desc=f"fitting UniPC's {steps}-step walk to the model") as bar:
        for first in range(0, samples, batch):
            part = slice(first, first + batch)
            x_T, y = noise[part].float(), None if labels is None else labels[part]
            t = torch.full((len(x_T),), walks["reference"][0], dtype=torch.long, device=device)
            with autocast(device, pipeline.precision):                 # every walk's first evaluation: made once
                eps_T = network_eps(model, scheduler, x_T, t, y, DEFAULT_GUIDANCE)
            for name, walk in walks.items():
                assert walk[0] == walks["reference"][0]
                x = sample(model, scheduler, len(x_T), device=device, precision=pipeline.precision,
                           generator=generators[name], sampler=FID_SAMPLER[0] if name == "reference" else "unipc",
                           noise=x_T, timesteps=walk, labels=y, guidance_scale=DEFAULT_GUIDANCE, first_eps=eps_T,
                           callback=lambda *_: bar.update(), progress=False)
                x = to_model_range(to_uint8(x)).to(device)                 # as the images are saved
                t0 = torch.zeros(len(x), dtype=torch.long, device=device)
                with autocast(device, pipeline.precision):
                    features[name].append(model.features(scheduler.model_input(x, t0), t0).float().cpu())
    stats = {name: gaussian_stats(torch.cat(parts)) for name, parts in features.items()}
    halves = [gaussian_stats(half) for half in torch.cat(features["reference"]).chunk(2)]
    distance = {power: frechet_distance(*stats[power], *stats["reference"]) for power in walks if power != "reference"}
    tolerance = WALK_FIT_TOLERANCE * frechet_distance(*halves[0], *halves[1])
    near = [power for power in distance if distance[power] <= min(distance.values()) + tolerance]
    return min(near, key=lambda power: math.inf if power == "karras" else power)      # the evenest: EDM's last


def walk_power(pipeline, steps, progress=False):
    """The power of UniPC's `steps`-evaluation walk on this pipeline's model: the one stored in its fit, or else
    fitted now (fit_walk_power) and stored with the model (store_fit); from WALK_FIT_BELOW evaluations on, what
    unipc_spacing says, fitted to nothing."""
    if steps >= WALK_FIT_BELOW:
        return unipc_spacing(steps)
    powers = (pipeline.fit or {}).get("walk_power", {})
    if str(steps) not in powers:
        power = fit_walk_power(pipeline, steps, progress=progress)
        powers = {**powers, str(steps): power}
        pipeline.fit = {**(pipeline.fit or {}), "walk_power": powers, "weights": pipeline.weights}
        store_fit(pipeline.source, pipeline.fit, pipeline.weights)
    return powers[str(steps)]


# ---- a trained model, ready to sample: the Python API -------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    """A trained model ready to sample from: the network (with the EMA weights, in eval mode), its noise
    schedule, the device and the precision it runs in, and the training run's configuration."""
    model: torch.nn.Module
    scheduler: NoiseScheduler
    device: torch.device
    precision: str = "fp32"
    config: dict = dataclasses.field(default_factory=dict)
    fit: dict = None            # what is fitted to these weights, made when first needed: fit_costs for the
    #                             "fitted" sampler, and "walk_power", {steps: power} for UniPC (walk_power)
    source: str = None          # the file the weights were read from (read_model), where a new fit is stored
    weights: str = None         # weights_digest of those weights


def walk_of(pipeline, sampler, steps, progress=False):
    """(timesteps, analytic first step) of a sampler on this pipeline: UniPC's with the power fitted to the model
    (walk_power), the fitted sampler's from the pipeline's fit (both made now, and stored with the model by
    store_fit, if it has none), every other sampler's from sampler_timesteps."""
    if sampler == "unipc":
        return unipc_timesteps(pipeline.scheduler, steps, walk_power(pipeline, steps, progress)), False
    if sampler != "fitted":
        return sampler_timesteps(pipeline.scheduler, sampler, steps), False
    if pipeline.fit is None or "grid" not in pipeline.fit:
        pipeline.fit = {**(pipeline.fit or {}), **fit_costs(pipeline, progress=progress), "weights": pipeline.weights}
        store_fit(pipeline.source, pipeline.fit, pipeline.weights)
    afs = steps <= FITTED_AFS_UP_TO
    return fit_timesteps(pipeline.fit, steps, afs), afs


def read_model(path, device):
    """The EMA weights of a checkpoint, or of the safetensors file export.py makes of one, as a Pipeline on
    `device`, in fp32 and the default layout; CheckpointError with one sentence if the file cannot be read, its
    weights are not finite, or they do not fit the model its configuration describes."""
    weights, config, stored = read_weights(path)
    try:
        model = UNet(**model_config(config))
        model.load_state_dict(weights)
        scheduler = make_scheduler(config["schedule"], config["num_timesteps"], config.get("prediction", "eps"),
                                   config.get("sigma_data"))
        scheduler.to(device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit the model its configuration describes "
                              f"({first_line(e)})") from None
    model.to(device, memory_format=memory_format(device)).eval()
    digest = weights_digest(weights)
    return Pipeline(model, scheduler, device, "fp32", config, checked_fit(stored, digest, path), path, digest)


def choose_precision(pipeline, precision="auto", batch_size=100):
    """Run the pipeline in the fastest way for sampling: --precision auto times the model in each precision and
    layout (hardware.choose_speed); the layout goes on the model, the precision on the pipeline, and the
    choice is printed on stderr.  Returns the pipeline."""
    precision, layout, note = choose_speed(pipeline.model, pipeline.device, precision, training=False,
                                           batch_size=batch_size)
    pipeline.model.to(memory_format=layout)
    pipeline.precision = precision
    print(f"sampling on {pipeline.device.type} in {precision}, {LAYOUT_NAMES[layout]} ({note})", file=sys.stderr,
          flush=True)
    return pipeline


def load_model(path, device="auto", precision="auto", batch_size=100):
    """A checkpoint written by training.py, as a Pipeline ready for generate(): the EMA weights on `device`
    ('auto': cuda, then mps, then cpu) in the fastest precision and layout for batches of `batch_size`.
    Raises CheckpointError (one sentence on what is wrong with the file) or ValueError (an unknown device)."""
    return choose_precision(read_model(path, pick_device(device)), precision, batch_size)


@torch.no_grad()
def generate(pipeline, num_samples, *, seed=0, batch_size=100, sampler=None, steps=None, eta=0.0, label=None,
             guidance_scale=DEFAULT_GUIDANCE, callback=None, progress=True):
    """Draw num_samples images: uint8 (N, C, H, W) on the CPU, and the class asked of each, (N,) (None for an
    unconditional model).  The one sampling driver of sampling.py, evaluate.py and training's sample grids.

    The noise comes from one generator seeded with `seed`, drawn `batch_size` images at a time, so the same seed
    gives the same images.  A conditional model draws class `label`, or else class k in row k of a 10-column
    grid (image i is class i // 10, modulo the number of classes).  sampler, steps (default DEFAULT_STEPS), eta
    and guidance_scale are sample()'s; without a sampler, `steps` alone asks for STEPS_SAMPLER and
    nothing at all for the paper's DDPM, as in sampling.py.  callback(t, x_t, x0_pred) is called after every step
    of every batch.
    """
    model, device, num_classes = pipeline.model, pipeline.device, pipeline.model.num_classes
    if sampler is None:
        sampler = STEPS_SAMPLER if steps is not None else "ddpm"
    if sampler != "ddpm" and steps is None:
        steps = DEFAULT_STEPS[sampler]
    timesteps, afs = walk_of(pipeline, sampler, steps, progress)
    generator = torch.Generator(device=device).manual_seed(seed)
    walk = len(timesteps)
    images, requested = [], []
    with tqdm(total=walk * math.ceil(num_samples / batch_size), desc=f"{sampler} sampling", unit="step",
              leave=False, disable=not progress) as bar:
        def after_step(t, x_t, x0):
            bar.update()
            if callback is not None:
                callback(t, x_t, x0)

        for first in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - first)
            labels = None
            if num_classes:     # `label`, or else row k of a 10-column grid is class k
                labels = (torch.full((n,), label) if label is not None
                          else torch.arange(first, first + n) // 10 % num_classes)
            x = sample(model, pipeline.scheduler, n, device=device, precision=pipeline.precision, generator=generator,
                       sampler=sampler, steps=steps, eta=eta, labels=labels, guidance_scale=guidance_scale,
                       callback=after_step, progress=False, timesteps=timesteps, analytic_first_step=afs)
            images.append(to_uint8(x).cpu())
            requested.append(labels)
    return torch.cat(images), (torch.cat(requested) if num_classes else None)


# ---- pictures -----------------------------------------------------------------------------------------------
def grid_frame(x, nrow=10, padding=2):
    """A PIL image of a batch of images (B, C, H, W), floats in [-1, 1] or uint8: `nrow` images per row,
    `padding` white pixels around each; grayscale for one channel, RGB for three."""
    from PIL import Image
    images = (x if x.dtype == torch.uint8 else to_uint8(x)).cpu()
    b, c, h, w = images.shape
    columns = min(nrow, b)
    rows = math.ceil(b / columns)
    grid = torch.full((c, padding + rows * (h + padding), padding + columns * (w + padding)), 255, dtype=torch.uint8)
    for i in range(b):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    pixels = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)


def save_grid(x, path, nrow=10, padding=2):
    """Save images (floats in [-1, 1], or uint8) as one grid PNG, `nrow` images per row."""
    grid_frame(x, nrow, padding).save(path)


def save_gif(frames, path, seconds=4.0):
    """An animated GIF that plays the frames in `seconds` and holds the last one."""
    duration = max(20, int(1000 * seconds / max(1, len(frames))))
    frames[0].save(path, save_all=True, append_images=frames[1:] + [frames[-1]] * 10, duration=duration, loop=0)


class Recorder:
    """generate()'s callback for --save-every and --gif: the predicted x_0 of every batch at the first step at or
    past each multiple of K ({t: [uint8 batches]}), and the frames of the first batch's reverse process."""

    def __init__(self, pipeline, sampler, steps, args):
        self.walk, self.T = walk_of(pipeline, sampler, steps, progress=True)[0], pipeline.scheduler.num_timesteps
        self.save_every, self.gif, self.gif_of = args.save_every, args.gif, args.gif_of
        self.gif_every = max(1, (self.T if sampler == "ddpm" else steps) // 50)
        self.calls, self.snapshots, self.frames = 0, {}, []

    def __call__(self, t, x_t, x0):
        i = self.calls % len(self.walk)                     # the step's place in its batch's walk
        before = self.walk[i - 1] if i else self.T          # the timestep of the step before
        if self.save_every and (before - 1) // self.save_every != (t - 1) // self.save_every:
            self.snapshots.setdefault(t, []).append(to_uint8(x0).cpu())
        if self.gif and self.calls < len(self.walk) and (t % self.gif_every == 0 or t == 0):
            self.frames.append(grid_frame(x_t if self.gif_of == "xt" else x0))
        self.calls += 1


# ---- the script ---------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a trained DDPM checkpoint.")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint written by training.py")
    p.add_argument("--num-samples", type=positive_int, default=100, help="how many images (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images denoised at once (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same samples")
    add_device_options(p, "network precision; auto = the faster of bf16 and fp32, timed on this device at start-up")
    p.add_argument("--out-dir", default=os.path.join(DEFAULT_OUT_DIR, "samples"), help="where the PNGs go")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="ddpm: all T ancestral steps (the default "
                   f"without --steps; with --steps, {STEPS_SAMPLER}); fitted: "
                   "DPM-Solver++(2M) on timesteps fitted to the model; ddim, dpm++ (DPM-Solver++(2M)), dpm++sde (its "
                   "stochastic form), unipc (DPM-Solver++(2M) with UniC's corrector) or restart (Restart sampling): "
                   "--steps network evaluations")
    p.add_argument("--steps", type=int_list, default=None, help="network evaluations of the few-step samplers, or a "
                   "list like 5,10,20 for one grid each (default 50 for ddim, 10 for fitted, 5 for unipc, 20 for "
                   "the others)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--label", type=int, default=None,
                   help="class to draw (conditional models); default: one row per class")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance w: "
                   f"0 unconditional, 1 conditional, >1 stronger (default {DEFAULT_GUIDANCE})")
    p.add_argument("--save-every", type=positive_int, default=None, metavar="K",
                   help="also save the grid of the predicted x_0 every K timesteps as x0_{t}.png (few-step samplers: "
                   "at the first step past each multiple of K)")
    p.add_argument("--gif", action="store_true", help="also write reverse.gif, an animation of the reverse process")
    p.add_argument("--gif-of", choices=["xt", "x0"], default="xt", help="animate x_t (default) or the predicted x_0")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (with CUDA graphs on a GPU)")
    p.add_argument("--individual", action="store_true",
                   help="also save every sample as its own PNG in OUT_DIR/individual/")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_sampling_options(args, p)
    return args, p


def check_sampling_options(args, parser):
    """Usage errors (exit 2) for the sampling options shared with evaluate.py; resolves args.device and the
    sampler: --steps alone asks for STEPS_SAMPLER, no option at all for the paper's
    DDPM."""
    if args.sampler is None:
        args.sampler = STEPS_SAMPLER if args.steps else "ddpm"
    if args.sampler != "ddpm" and args.steps is None:
        args.steps = [DEFAULT_STEPS[args.sampler]]
    if not 0.0 <= args.eta <= 1.0:
        parser.error(f"--eta must lie between 0 and 1, got {args.eta}")
    if args.guidance_scale < 0:
        parser.error(f"--guidance-scale must be 0 or more, got {args.guidance_scale}")
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        parser.error(str(e))


def check_walk(scheduler, sampler, steps, parser):
    """A usage error (exit 2) for a step count this sampler cannot walk on this model's schedule (restart)."""
    try:
        sampler_timesteps(scheduler, sampler, steps)
    except ValueError as e:
        parser.error(f"--sampler {sampler} --steps {steps}: {e}")


def main(argv=None):
    args, parser = parse_args(argv)
    try:
        pipeline = read_model(args.ckpt, args.device)
    except CheckpointError as e:
        fail(e)
    T, num_classes = pipeline.scheduler.num_timesteps, pipeline.model.num_classes
    if args.sampler != "ddpm" and max(args.steps) > T:
        parser.error(f"--steps {max(args.steps)} is more than the {T} timesteps the model was trained with")
    for steps in args.steps or []:
        check_walk(pipeline.scheduler, args.sampler, steps, parser)
    if args.label is not None and not num_classes:
        parser.error(f"--label {args.label}: {args.ckpt} holds an unconditional model (train with --conditional)")
    if args.label is not None and not 0 <= args.label < num_classes:
        parser.error(f"--label {args.label} is outside the model's classes 0..{num_classes - 1}")
    choose_precision(pipeline, args.precision, batch_size=min(args.batch_size, args.num_samples))
    if args.compile:
        pipeline.model = compile_for_sampling(pipeline.model, args.device)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {args.out_dir} ({e.strerror})")

    runs = [("ddpm", None)] if args.sampler == "ddpm" else [(args.sampler, s) for s in args.steps]
    for sampler, steps in runs:
        recorder = Recorder(pipeline, sampler, steps, args)
        start = time.perf_counter()
        images, _ = generate(pipeline, args.num_samples, seed=args.seed, batch_size=args.batch_size, sampler=sampler,
                             steps=steps, eta=args.eta, label=args.label, guidance_scale=args.guidance_scale,
                             callback=recorder)
        seconds = time.perf_counter() - start
        suffix = "" if len(runs) == 1 else f"_{sampler}_{steps}"
        final = os.path.join(args.out_dir, "x0_0.png" if len(runs) == 1 else f"{sampler}_{steps}.png")
        save_grid(images, final)
        print(f"{args.num_samples} samples, {sampler_label(sampler, steps, T, args.eta)}, {seconds:.1f} s on "
              f"{args.device.type} ({pipeline.precision}): wrote {final}")
        write_extras(args, images, recorder, suffix, only_run=len(runs) == 1)


def write_extras(args, images, recorder, suffix, only_run):
    """What --save-every, --gif and --individual ask for, beside a run's grid."""
    for t, grid in recorder.snapshots.items():
        if t != 0 or not only_run:               # x0_0.png is the final grid itself
            save_grid(torch.cat(grid), os.path.join(args.out_dir, f"x0_{t}{suffix}.png"))
    if recorder.snapshots:
        print(f"wrote the predicted x_0 every {args.save_every} steps as x0_{{t}}{suffix}.png in {args.out_dir}")
    if args.gif:
        gif = os.path.join(args.out_dir, f"reverse{suffix}.gif")
        save_gif(recorder.frames, gif)
        print(f"wrote {gif} ({len(recorder.frames)} frames of {'x_t' if args.gif_of == 'xt' else 'the predicted x_0'})")
    if args.individual:
        folder = os.path.join(args.out_dir, f"individual{suffix}")
        os.makedirs(folder, exist_ok=True)
        for i, img in enumerate(images):
            save_grid(img[None], os.path.join(folder, f"{i:05d}.png"), padding=0)
        print(f"wrote {len(images)} PNGs to {folder}")


if __name__ == "__main__":
    main()
