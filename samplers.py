"""The samplers faster than the paper's 1000 steps: DDIM, DPM-Solver++(2M) and its SDE form, UniPC, Restart, the
walks fitted to a model, and the student that distill.py distils from a model for one, two and four evaluations.
A sampler is its timesteps plus its update: walk_of turns a number of network evaluations into the timesteps (the one
place where that happens, fitting them to the model where the sampler asks for it, once per model), and walk() runs
the reverse process along them with the sampler's update (solvers.py).

    from samplers import walk_of
    timesteps, afs = walk_of(pipeline, "unipc", 5)      # fitted to the model the first time, then kept with its weights

sampling.py's sample() and generate() call them; nothing here imports sampling.py.
"""
import contextlib
import math

import torch
from tqdm import tqdm

from checkpoint import store_fit
from dataset import to_model_range, to_uint8
from fid import frechet_distance, gaussian_stats
from hardware import autocast
from run_folder import folder_lock
from solvers import ddim_step, dpm_solver_step, forward_jump, restart_timesteps, spaced_timesteps, unic_correction

# Classifier-free guidance of a conditional model: 1, the conditional model itself (one network pass per evaluation).
# w = 1.5 halved the FID of a 936-step Fashion-MNIST model (4.1 / 4.8 against 9.3 / 10.7) but raised that of an
# 880-step model of scikit-learn's digits by 37 to 49% (52.9 / 58.3 against 35.5 / 42.7); 1.25 and 2 likewise
# (docs/experiments.md, Class labels): chosen by the worst case, no guidance unless asked for.
DEFAULT_GUIDANCE = 1.0
SAMPLERS = ("ddpm", "ddim", "dpm++", "dpm++sde", "restart", "fitted", "unipc", "student")
DEFAULT_STEPS = {"ddim": 50, "dpm++": 20, "dpm++sde": 20, "restart": 20, "fitted": 10, "unipc": 5, "student": 2}
# Restart sampling (Xu et al., 2023): its interval of noise levels sigma = sigma_t / alpha_t, how often it jumps back
# up, and the ODE steps of each pass down.  Chosen by its worst case over two datasets and two sample seeds among
# eleven settings at 20 evaluations (docs/experiments.md, Restart 20): wider intervals than 0.1..0.4 corrected
# more of the ODE's drift.
RESTART = dict(sigma_min=0.2, sigma_max=1.5, restarts=2, restart_steps=3)
# Restart's 20 evaluations: what training.py --fid-every measures with (so that training curves compare across runs)
# and the reference walk that fit_walk_power fits the few-step walks to.  The README recommends --steps 10.
FID_SAMPLER = ("restart", 20)
LOGSNR_FROM = 26     # DPM-Solver++ steps from which the timesteps are spaced evenly in log-SNR rather than in t
# --steps N without --sampler: UniPC, on a walk fitted to the model below WALK_FIT_BELOW evaluations, with one of
# Restart's jumps from there on (walk_power).  On even spacing at 5, UniPC scored 0.4 to 0.7 times the FID of evenly
# spaced DPM-Solver++(2M); at 10, still evenly spaced, on seven models of 1,155 to 3,730 steps (two datasets, two
# training seeds), its worst sample seed scored 0.64 to 1.13 times the fitted sampler's (lower on six) and 0.85 to
# 1.16 times DPM-Solver++(2M)'s (docs/experiments.md: UniPC, the five-step sampler).
STEPS_SAMPLER = "unipc"
# The step counts a student is distilled for (--sampler student --steps N), and below which `--steps N` alone draws
# with it: there nothing else is usable (3 evaluations scored 2.3 to 3.4 times the DDPM), while at 4 UniPC's fitted
# walk has the better worst case over MNIST and Fashion-MNIST (20.9 against the student's 29.6; docs/experiments.md,
# Distillation).
STUDENT_STEPS = (1, 2, 4)
STUDENT_ONLY_BELOW = 3
# A student reads its x_0 from its output as its teacher does, but divides by alpha_t no less than this (student_x0).
# At 1 it never divides: most of the speckle in the one-step student's images went, and its FID (sample seed 0) fell
# from 53.5 to 42.7 at one evaluation, 29.8 to 28.3 at two and 22.1 to 17.0 at four against 0.05 (docs/experiments.md,
# Distillation).  A student keeps the value it was distilled with in its file, and sampling reads it from there.
STUDENT_ALPHA_MIN = 1.0


SAMPLER_NAMES = {"ddim": "DDIM", "dpm++": "DPM-Solver++(2M)", "dpm++sde": "SDE-DPM-Solver++(2M)",
                 "student": "distilled student",
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


# ---- the number of steps becomes timesteps -----------------------------------------------------------------------
def walk_of(pipeline, sampler, steps, progress=False):
    """(timesteps, analytic first step) of a sampler on this pipeline: UniPC's with the power fitted to the model
    (walk_power), the fitted sampler's from the pipeline's fit (both made now, and stored with the model by
    store_fit, if it has none), every other sampler's from sampler_timesteps."""
    if sampler == "unipc":
        return unipc_timesteps(pipeline.scheduler, steps, walk_power(pipeline, steps, progress)), False
    if sampler == "student":
        return student_timesteps(pipeline.scheduler, steps), False
    if sampler != "fitted":
        return sampler_timesteps(pipeline.scheduler, sampler, steps), False
    if pipeline.fit is None or "grid" not in pipeline.fit:
        pipeline.fit = {**(pipeline.fit or {}), **fit_costs(pipeline, progress=progress), "weights": pipeline.weights}
        keep_fit(pipeline)
    afs = steps <= FITTED_AFS_UP_TO
    return fit_timesteps(pipeline.fit, steps, afs), afs


def spacing(sampler, steps):
    """How a few-step sampler spaces its timesteps (solvers.spaced_timesteps), chosen by measured FID
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
        return spaced_timesteps(scheduler, steps, "logsnr")
    if sampler == "ddpm":
        return scheduler.timesteps()
    if sampler == "student":
        return student_timesteps(scheduler, steps)
    if sampler == "unipc":      # `steps` evaluations, from T-1 down to the last, then one step more to land on t = 0
        return unipc_timesteps(scheduler, steps, unipc_spacing(steps))
    if sampler == "restart":
        return restart_timesteps(scheduler, steps, **RESTART)
    return spaced_timesteps(scheduler, steps, spacing(sampler, steps))


# ---- the walk: the network's noise, and the sampler's update at each timestep ------------------------------------
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
def walk(model, scheduler, x, sampler, timesteps, *, generator=None, eta=0.0, labels=None, guidance_scale=1.0,
         callback=None, progress=False, analytic_first_step=False, first_eps=None, alpha_min=STUDENT_ALPHA_MIN):
    """The reverse process of a faster sampler from x = x_T (B, C, H, W) along `timesteps` (walk_of); returns the
    last x, float32, unclipped.  Runs in the caller's precision (autocast) and inference mode (sampling.sample).

    A timestep followed by a larger one is Restart's jump back up (solvers.forward_jump): no evaluation.  "ddim":
    DDIM with noise scale `eta`; "dpm++" / "dpm++sde" / "fitted" / "restart": DPM-Solver++(2M), on the reverse SDE
    for dpm++sde and for the fitted sampler from FITTED_SDE_FROM evaluations on; "unipc": UniPC (Zhao et al.,
    2023), DPM-Solver++(2M) steps each corrected by UniC with the next evaluation; its walk lands on t = 0 without
    evaluating there (x_0 is x at t = 0, whose noise sigma_0 = 0.01 is below a grey level), so that every
    evaluation is spent on the way down.  analytic_first_step takes the first step's noise as x_T itself instead of
    asking the network (AFS, Dockhorn et al., 2022 / Zhou et al., 2024: at t = T-1, x_T = alpha x_0 + sigma eps with
    alpha < 0.01, so eps is x_T up to that), which saves one evaluation.  first_eps: the network's noise at the
    first timestep for this x_T, if it is known already (the walk fit draws four walks from the same noise): it
    replaces the first evaluation, with the same result.  "student": `model` is a student (distill.py), which reads
    its x_0 with the alpha_min it was distilled with (student_x0).  callback(t, x_t, x0_pred) after every evaluation."""
    x0, previous, corrector = x, None, None
    lands = sampler == "unipc"             # the walk's last timestep, 0, is reached but not evaluated
    evaluations = len(timesteps) - int(analytic_first_step) - int(lands)
    stochastic = sampler == "dpm++sde" or (sampler == "fitted" and evaluations >= FITTED_SDE_FROM)
    for i, t in enumerate(tqdm(timesteps, desc=f"{sampler} sampling", leave=False, disable=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1           # -1: the clean data x_0
        if t_prev > t:                                                    # Restart's jump back up: no evaluation
            x, previous, corrector = forward_jump(scheduler, x, t, t_prev, generator), None, None
            continue
        if lands and i == len(timesteps) - 1:                             # UniPC at t = 0: x is the sample
            if callback is not None:
                callback(t, x, x0)
            break
        tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        if sampler == "student":                                          # `model` is the student
            x, x0 = student_step(model, scheduler, x, t, t_prev, labels, alpha_min)
            if callback is not None:
                callback(t, x, x0)
            continue
        if analytic_first_step and i == 0:
            eps = x                                                        # AFS: no evaluation
        elif first_eps is not None and i == 0:
            eps = first_eps.float()                                        # evaluated already
        else:
            eps = network_eps(model, scheduler, x, tt, labels, guidance_scale)   # epsilon_theta(x_t, t)
        if sampler == "ddim":
            x, x0 = ddim_step(scheduler, eps, t, t_prev, x, eta=eta, generator=generator)
        elif sampler == "unipc":
            x0 = scheduler.predict_x0(x, tt, eps).clamp(-1.0, 1.0)
            if corrector is not None:                     # UniC: the step that led here, corrected by x0
                x, eps = unic_correction(scheduler, x0, t, *corrector)
            corrector = (x, t, x0, previous)
            x, x0 = dpm_solver_step(scheduler, eps, t, t_prev, x, previous, generator=generator)
        else:           # dpm++, dpm++sde, fitted, and the ODE passes of restart
            x, x0 = dpm_solver_step(scheduler, eps, t, t_prev, x, previous, stochastic=stochastic, generator=generator)
        previous = None if analytic_first_step and i == 0 else (t, x0)     # (AFS's x_0 is not extrapolated)
        if callback is not None:
            callback(t, x, x0)
    return x


# ---- the fitted sampler: timesteps fitted to the model (GITS) ------------------------------------------------
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
    grid = spaced_timesteps(scheduler, min(grid_steps, scheduler.num_timesteps), "logsnr")
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
            x, x0 = dpm_solver_step(scheduler, eps, t, t_next, x, previous)
            previous = (t, x0)

    def error(i, j, eps):
        landed = dpm_solver_step(scheduler, eps, grid[i], grid[j], states[i])[0]
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
# 2023, algorithm 1; solvers.restart_timesteps): an even walk down to the noise level sigma_min, a jump back up
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
    does not descend strictly.  power "karras": EDM's spacing instead (solvers.spaced_timesteps); "restart": the
    even walk with Restart's jump of UNIPC_RESTART (solvers.restart_timesteps, landing)."""
    T = scheduler.num_timesteps
    if not 1 <= steps < T:
        raise ValueError(f"UniPC takes 1 to {T - 1} steps on this model")
    if power == "karras":
        return spaced_timesteps(scheduler, steps + 1, "karras")
    if power == "restart":
        return restart_timesteps(scheduler, steps, **UNIPC_RESTART, lands=True)
    walk = (torch.linspace((T - 1) ** (1 / power), 0, steps + 1, dtype=torch.float64) ** power).round().long().tolist()
    if any(later >= earlier for earlier, later in zip(walk, walk[1:])):
        raise ValueError(f"{steps} steps spaced with power {power:g} repeat a timestep of this {T}-step schedule")
    return walk


@torch.inference_mode()
def fit_walk_power(pipeline, steps, samples=None, seed=WALK_FIT_SEED, progress=True):
    """The walk of UniPC's `steps` evaluations (unipc_timesteps) for this model, from WALK_POWERS: the evenest (the
    smallest power; EDM's spacing, "karras", counts as less even than every power) whose images are nearest those of
    the 20-step Restart sampler (FID_SAMPLER), drawn from the same noise, up to a tolerance.  The
    distance is FID's (Heusel et al., 2017), the Frechet distance between Gaussians fitted to features of the two
    sets of images, in the features the network itself computes (UNet.features at t = 0): no data and no other
    network are needed.  The tolerance is WALK_FIT_TOLERANCE times the same distance between the two halves of the
    reference images, a measure of the noise in the distances: the power moves from even spacing only for a
    difference larger than that.  The same weights and seed give the same power.  Costs 17 + 3 * steps network
    evaluations per image (the four walks share their first)."""
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
    jumps = sum(later > earlier for ts in walks.values() for earlier, later in zip(ts, ts[1:]))  # (as walk() counts)
    evaluations = sum(map(len, walks.values())) - jumps             # a callback each, but none at Restart's jumps
    with tqdm(total=evaluations * math.ceil(samples / batch), unit="step", disable=not progress,
              desc=f"fitting UniPC's {steps}-step walk to the model") as bar:
        for first in range(0, samples, batch):
            part = slice(first, first + batch)
            x_T, y = noise[part].float(), None if labels is None else labels[part]
            t = torch.full((len(x_T),), walks["reference"][0], dtype=torch.long, device=device)
            with autocast(device, pipeline.precision):                 # every walk's first evaluation: made once
                eps_T = network_eps(model, scheduler, x_T, t, y, DEFAULT_GUIDANCE)
            for name, timesteps in walks.items():
                assert timesteps[0] == walks["reference"][0]
                with autocast(device, pipeline.precision):
                    x = walk(model, scheduler, x_T, FID_SAMPLER[0] if name == "reference" else "unipc", timesteps,
                             generator=generators[name], labels=y, guidance_scale=DEFAULT_GUIDANCE, first_eps=eps_T,
                             callback=lambda *_: bar.update())
                x = to_model_range(to_uint8(x.clamp(-1, 1))).to(device)     # as the images are saved
                t0 = torch.zeros(len(x), dtype=torch.long, device=device)
                with autocast(device, pipeline.precision):
                    features[name].append(model.features(scheduler.model_input(x, t0), t0).float().cpu())
    stats = {name: gaussian_stats(torch.cat(parts)) for name, parts in features.items()}
    halves = [gaussian_stats(half) for half in torch.cat(features["reference"]).chunk(2)]
    distance = {power: frechet_distance(*stats[power], *stats["reference"]) for power in walks if power != "reference"}
    tolerance = WALK_FIT_TOLERANCE * frechet_distance(*halves[0], *halves[1])
    near = [power for power in distance if distance[power] <= min(distance.values()) + tolerance]
    return min(near, key=lambda power: math.inf if power == "karras" else power)      # the evenest: EDM's last


def keep_fit(pipeline):
    """Store the pipeline's fit with its weights, in the file they were read from (checkpoint.store_fit), unless a
    training run holds that file's folder."""
    if pipeline.source is not None:
        store_fit(pipeline.source, pipeline.fit, pipeline.weights, lock=folder_lock(pipeline.source))


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
        keep_fit(pipeline)
    return powers[str(steps)]


# ---- the distilled student (distill.py): one network evaluation per step, for few steps -----------------------
def student_timesteps(scheduler, steps):
    """The timesteps of a `steps`-evaluation student, evenly spaced in t from T-1: T = 1000 gives [999] for one,
    [999, 499] for two and [999, 749, 499, 249] for four evaluations, each step landing on the next timestep and
    the last on the clean image.  The walks are nested (every two-step timestep is a four-step one), so the student
    learns fewer jumps."""
    T = scheduler.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"a student takes 1 to {T} steps on this model")
    return [T - 1 - (i * T) // steps for i in range(steps)]


def student_x0(scheduler, output, x_t, t, alpha_min=STUDENT_ALPHA_MIN):
    """The student's x_0 at (x_t, t), t a (B,) tensor: its output read as its teacher's is (scheduler.to_eps), then
        x_0 = (x_t - sigma_t eps) / max(alpha_t, alpha_min)
    which is eq. 4 inverted (the teacher's own x_0) wherever alpha_t >= alpha_min.  Near pure noise the teacher's x_0
    divides by alpha_t (1 / 157 at T-1), so an error of 0.01 in eps becomes one of 1.6 in x_0, whose range is
    [-1, 1]: a student whose one step must land on a sharp image from there cannot be that precise.  With alpha_min
    = 1 (the default) it never divides, x_0 = x_t - sigma_t eps, so an error in eps is one of at most as much in
    x_0; the student learns the scale that its teacher's division gave."""
    eps = scheduler.to_eps(output, x_t, t)
    alpha = scheduler.sqrt_alphas_cumprod[t].view(-1, *[1] * (x_t.dim() - 1))
    sigma = scheduler.sqrt_one_minus_alphas_cumprod[t].view(-1, *[1] * (x_t.dim() - 1))
    return (x_t.float() - sigma * eps) / alpha.clamp(min=alpha_min)


def student_step(student, scheduler, x, t, t_prev, labels=None, alpha_min=STUDENT_ALPHA_MIN):
    """One step of a student from x_t to x_{t_prev} (t_prev = -1: the clean image): its x_0 (student_x0), clipped to
    [-1, 1], and DDIM's deterministic step with it (Song et al., 2021, eq. 12), the noise being the one that x_t
    and that x_0 imply.  Returns (x_{t_prev}, x_0)."""
    tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    output = student(scheduler.model_input(x, tt), tt, labels, torch.full_like(tt, t_prev))
    x0 = student_x0(scheduler, output, x, tt, alpha_min).clamp(-1.0, 1.0)
    alpha, sigma = scheduler.sqrt_alphas_cumprod[t], scheduler.sqrt_one_minus_alphas_cumprod[t]
    return ddim_step(scheduler, (x.float() - alpha * x0) / sigma, t, t_prev, x)
