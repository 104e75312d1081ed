"""The steps of the samplers faster than the paper's 1000: DDIM, DPM-Solver++(2M) and its SDE form, UniPC's corrector
UniC, Restart's forward jump, and the grids of timesteps they walk.  Each is a function of a NoiseScheduler
(noise_scheduler.py, the paper's process); samplers.py puts them together into samplers.

Notation (paper -> code), beside noise_scheduler.py's:
    alpha_t, sigma_t     sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t): DPM-Solver's x_t = alpha_t x_0 + sigma_t eps
    lambda_t             log(alpha_t / sigma_t), half the log-SNR (scheduler.lambdas): DPM-Solver's time
    t_prev = -1          the clean data x_0 (alpha 1, sigma 0, lambda infinite)
Every step takes the network's noise eps at (x_t, t), float32, and returns (x_{t_prev}, the predicted x_0).

    python -c "import solvers, noise_scheduler as n; print(solvers.spaced_timesteps(n.make_scheduler(), 10, 'logsnr'))"
"""
import math

import torch

from noise_scheduler import noise_like

# The "karras" spacing of timesteps (spaced_timesteps): Karras et al., 2022, eq. 5, with their rho, from at most
# KARRAS_SIGMA_MAX, just above the linear schedule's sigma_t / alpha_t at T-1 (157 at T = 1000).  Their sigma_max of
# 80 moved the 10-step walk's FID by -2% to +8% on four models (docs/experiments.md, EDM's spacing for ten
# evaluations); the cap matters for the cosine schedule, whose 20,000 at T-1 would crowd the steps into noise alone.
KARRAS_RHO, KARRAS_SIGMA_MAX = 7.0, 160.0


# ---- the timesteps a sampler walks -------------------------------------------------------------------
def spaced_timesteps(scheduler, num_steps=None, spacing="uniform"):
    """The timesteps a sampler walks, descending from T-1 and ending at 0 (a single step: just T-1).

    None (or T) gives all T steps of the ancestral sampler.  Fewer gives a subsequence of the training
    timesteps: spacing "uniform" spaces them evenly in t (DDIM, Song et al., 2021, section 4.2);
    "logsnr" evenly in lambda = log(alpha_t / sigma_t), half the log-SNR (DPM-Solver, Lu et al., 2022a,
    section 3.3); "karras" evenly in s^(1/rho), s = sigma_t / alpha_t = exp(-lambda_t), the noise level of
    x_t / alpha_t (EDM, Karras et al., 2022, eq. 5, rho = 7): long steps where the noise is high, short ones
    near the data.  Its levels run from s_{T-1}, or KARRAS_SIGMA_MAX if lower, down to s_0, after a first
    step at T-1, where every walk starts: the cosine schedule's s_{T-1}, some 20,000, would otherwise crowd
    most steps into its last few timesteps, where x_t is noise alone.  Both take the training timestep of the
    nearest lambda, or the next one down where that one is taken (the cosine schedule's lambda plunges over
    its last few timesteps).
    """
    T = scheduler.num_timesteps
    if num_steps is None or num_steps == T:
        return list(range(T - 1, -1, -1))
    if not 1 <= num_steps <= T:
        raise ValueError(f"the number of sampling steps must be between 1 and {T}, got {num_steps}")
    if num_steps == 1:
        return [T - 1]                         # one step: from pure noise straight to x_0
    if spacing == "uniform":
        return torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()
    if spacing == "logsnr":
        lambdas = scheduler.lambdas.cpu()
        targets = torch.linspace(float(lambdas[T - 1]), float(lambdas[0]), num_steps)
    elif spacing == "karras":
        lambdas = scheduler.lambdas.cpu().double()
        s_max, s_min = min(math.exp(-lambdas[T - 1]), KARRAS_SIGMA_MAX), math.exp(-lambdas[0])
        levels = torch.linspace(s_max ** (1 / KARRAS_RHO), s_min ** (1 / KARRAS_RHO), num_steps,
                                dtype=torch.float64) ** KARRAS_RHO                # eq. 5
        targets = -levels.log()                                                   # as lambdas
        targets[0] = lambdas[T - 1]                                               # the walk starts at T-1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use uniform, logsnr or karras")
    timesteps = []
    for i, target in enumerate(targets):
        t = int((lambdas - target).abs().argmin())
        if timesteps:
            t = min(t, timesteps[-1] - 1)                 # strictly descending
        timesteps.append(max(t, num_steps - 1 - i))       # and room left for the steps still to come
    return timesteps


def restart_timesteps(scheduler, num_steps, sigma_min, sigma_max, restarts, restart_steps, lands=False):
    """The walk of Restart sampling (Xu et al., 2023, algorithm 1) with `num_steps` network evaluations in all:
    an ODE pass from T-1 down to t_min, then `restarts` times a forward jump back up to t_max followed by an
    ODE pass of `restart_steps` steps down to t_min again, then the ODE pass on to 0.  t_min and t_max are the
    timesteps whose noise level sigma_t / alpha_t = exp(-lambda_t) (the paper's sigma, Karras et al., 2022's
    time) is nearest sigma_min and sigma_max.  The main pass has num_steps - restarts * restart_steps
    timesteps, evenly spaced in t, with t_min in place of the nearest one.  A timestep followed by a larger
    one marks a forward jump (forward_jump), which evaluates nothing.  lands: the walk is a landing one, as
    UniPC's (samplers.unipc_timesteps): its last timestep, t = 0, is reached and not evaluated, so the main
    pass gets one timestep more, and t_min never takes its place."""
    main_steps = num_steps - restarts * restart_steps
    noise_levels = torch.exp(-scheduler.lambdas.cpu().double())
    t_min, t_max = (int((noise_levels - s).abs().argmin()) for s in (sigma_min, sigma_max))
    if t_max - t_min < restart_steps:
        raise ValueError(f"the restart interval sigma {sigma_min:g}..{sigma_max:g} spans timesteps {t_min}..{t_max} "
                         f"of this schedule, too few for {restart_steps} steps")
    if restarts < 0 or restart_steps < 1 or main_steps < 2:
        raise ValueError(f"{num_steps} steps leave too few for the main pass after {restarts} restarts of "
                         f"{restart_steps} steps")
    main = spaced_timesteps(scheduler, main_steps + int(lands), "uniform")
    inner = range(1, len(main) - int(lands))                                  # never the first, T-1
    nearest = min(inner, key=lambda i: abs(main[i] - t_min))
    main[nearest] = t_min
    if main != sorted(set(main), reverse=True):
        raise ValueError(f"t_min {t_min} does not fit between the {main_steps} steps of the main pass")
    restart_pass = torch.linspace(t_max, t_min, restart_steps + 1, dtype=torch.float64).round().long().tolist()
    return main[:nearest + 1] + restarts * restart_pass + main[nearest + 1:]


# ---- the steps -------------------------------------------------------------------------------------------
def alpha_sigma(scheduler, t):
    """(alpha_t, sigma_t, lambda_t) as float64 scalars; t = -1 is the clean data (alpha 1, sigma 0, lambda inf)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    a = float(scheduler.alphas_cumprod[t])
    return math.sqrt(a), math.sqrt(1.0 - a), float(scheduler.lambdas[t])


def ddim_step(scheduler, eps, t, t_prev, x_t, eta=0.0, generator=None, clip_x0=True):
    """One DDIM step x_t -> x_{t_prev} (Song et al., 2021, eq. 12), t_prev < t, t_prev = -1 means x_0.

    sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)      (eq. 16)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    where a = alpha-bar.  eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the
    ancestral step with variance beta-tilde_t.  Returns (x_{t_prev}, predicted x_0).
    """
    eps, x_t = eps.float(), x_t.float()
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
    x0 = scheduler.predict_x0(x_t, tt, eps)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x_t - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()     # the noise consistent with the clipped x_0
    sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma ** 2).clamp(min=0.0).sqrt() * eps
    if eta > 0 and t_prev >= 0:
        x_prev = x_prev + sigma * noise_like(x_t, generator)
    return x_prev, x0


def dpm_solver_step(scheduler, eps, t, t_prev, x_t, previous=None, stochastic=False, generator=None, clip_x0=True):
    """One step of DPM-Solver++(2M) (Lu et al., 2022b, algorithm 2) from x_t to x_{t_prev}, t_prev < t,
    t_prev = -1 meaning x_0.  Returns (x_{t_prev}, predicted x_0).

    With alpha = sqrt(alpha-bar), sigma = sqrt(1 - alpha-bar), lambda = log(alpha / sigma), the diffusion ODE
    has the exact solution
        x_prev = sigma_prev / sigma_t x_t + sigma_prev int_{lambda_t}^{lambda_prev} e^lambda x_0(lambda) dlambda
    (the data-prediction form, Lu et al., 2022b, section 4).  With h = lambda_prev - lambda_t:
        first order, x_0 held constant (= DDIM with eta 0):
            x_prev = sigma_prev / sigma_t x_t - alpha_prev (e^-h - 1) D,  D = x_0
        second order, multistep: x_0 extrapolated linearly in lambda from the previous step's prediction,
            D = (1 + 1 / (2r)) x_0 - 1 / (2r) x_0_last,   r = h_last / h                    (algorithm 2)
    previous = (t_last, x_0_last) from the step before, or None: the first step is first order, and so is
    the last (to t_prev = -1, where h is infinite and the update is x_0 itself).
    stochastic: SDE-DPM-Solver++(2M), the same extrapolation on the reverse SDE instead of the ODE,
        x_prev = sigma_prev / sigma_t e^-h x_t + alpha_prev (1 - e^-2h) D + sigma_prev sqrt(1 - e^-2h) z,
    whose first-order step is the ancestral step of DDIM with eta 1.
    clip_x0 clips the predicted x_0 to [-1, 1] (the paper's thresholding, in its static form).
    """
    eps, x_t = eps.float(), x_t.float()
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
    x0 = scheduler.predict_x0(x_t, tt, eps)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    if t_prev < 0:                       # the last step, first order: sigma_prev = 0 leaves x_prev = D = x_0
        return x0, x0
    alpha_t, sigma_t, lambda_t = alpha_sigma(scheduler, t)
    alpha_prev, sigma_prev, lambda_prev = alpha_sigma(scheduler, t_prev)
    h = lambda_prev - lambda_t
    d = x0
    if previous is not None:
        t_last, x0_last = previous
        h_last = lambda_t - alpha_sigma(scheduler, t_last)[2]
        r = h_last / h
        d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_last
    if not stochastic:
        return sigma_prev / sigma_t * x_t - alpha_prev * math.expm1(-h) * d, x0
    x_prev = sigma_prev / sigma_t * math.exp(-h) * x_t - alpha_prev * math.expm1(-2.0 * h) * d
    return x_prev + sigma_prev * math.sqrt(-math.expm1(-2.0 * h)) * noise_like(x_t, generator), x0


def unic_correction(scheduler, x0_t, t, x_s, s, x0_s, previous=None):
    """UniC, the corrector of UniPC (Zhao et al., 2023, section 3.1): after a DPM-Solver++(2M) step from x_s at
    timestep s to x_t, the network's prediction x0_t there corrects x_t itself, for no further evaluation.
    Returns (x_t corrected, the eps that x0_t implies at the corrected x_t).

    With h = lambda_t - lambda_s and B(h) = e^-h - 1 (the "bh2" variant, for data prediction), the step from s
    is redone with the divided differences of the predictions at s (D_t = x0_t - x0_s, and with previous =
    (t_last, x0_last) also D_last = (x0_last - x0_s) / r, r = (lambda_last - lambda_s) / h):
        x_t = sigma_t / sigma_s x_s - alpha_t B(h) (x0_s + rho_last D_last + rho_t D_t)
    where (rho_last, rho_t) solve the order conditions [[1, 1], [r, 1]] rho = (b_1, b_2), b_k = k! z phi_{k+1}(z)
    / B(h) at z = -h, phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z (their eq. 9 and
    theorem 3.1): a step of order 3 from a predictor of order 2.  Without previous (the first step), rho_t = 1/2:
    the trapezoidal rule."""
    x_s, x0_s, x0_t = x_s.float(), x0_s.float(), x0_t.float()
    _, sigma_s, lambda_s = alpha_sigma(scheduler, s)
    alpha_t, sigma_t, lambda_t = alpha_sigma(scheduler, t)
    h = lambda_t - lambda_s
    b_h = math.expm1(-h)
    z_phi_2 = b_h / -h - 1.0                              # z phi_2(z) at z = -h
    b_1, b_2 = z_phi_2 / b_h, 2.0 * (z_phi_2 / -h - 0.5) / b_h
    d = 0.5 * (x0_t - x0_s)
    if previous is not None:
        t_last, x0_last = previous
        r = (alpha_sigma(scheduler, t_last)[2] - lambda_s) / h
        rho_last, rho_t = (b_1 - b_2) / (1.0 - r), (b_2 - r * b_1) / (1.0 - r)
        d = rho_last * (x0_last.float() - x0_s) / r + rho_t * (x0_t - x0_s)
    x_t = sigma_t / sigma_s * x_s - alpha_t * b_h * (x0_s + d)
    return x_t, (x_t - alpha_t * x0_t) / sigma_t


def forward_jump(scheduler, x_t, t, t_up, generator=None):
    """Noise x_t forward to x_{t_up}, t_up > t, with q(x_{t_up} | x_t) (Restart sampling's forward jump, Xu et al.,
    2023, eq. 3, in variance-preserving form): x_{t_up} = a x_t + sqrt(1 - alpha-bar_{t_up} - a^2 (1 - alpha-bar_t)) z,
    a = sqrt(alpha-bar_{t_up} / alpha-bar_t).  From x_t ~ q(x_t | x_0) it gives exactly q(x_{t_up} | x_0)."""
    alpha_t, sigma_t, _ = alpha_sigma(scheduler, t)
    alpha_up, sigma_up, _ = alpha_sigma(scheduler, t_up)
    a = alpha_up / alpha_t
    return a * x_t.float() + math.sqrt(max(0.0, sigma_up ** 2 - (a * sigma_t) ** 2)) * noise_like(x_t, generator)
