"""Noise schedules and the forward / reverse process of DDPM (Ho et al., 2020).

Timestep convention, used everywhere in this repository:
    t is an integer in [0, T-1].  Index t holds beta_t of the paper's step t+1, so
    alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]), and "alpha-bar before step 0" is 1
    (alphas_cumprod_prev[0] = 1).  x_0 is the data; training draws t uniformly from [0, T-1];
    sampling walks t = T-1, ..., 0 and the step at t = 0 adds no noise.

Notation (paper -> code):
    beta_t               betas
    alpha_t = 1 - beta_t alphas
    alpha-bar_t          alphas_cumprod
    beta-tilde_t         posterior_variance             (eq. 7)
    mu-tilde_t coeffs    posterior_mean_coef1 (x_0), posterior_mean_coef2 (x_t)   (eq. 7)
    epsilon_theta        eps (the model's prediction of the noise)
    SNR(t)               snr = alpha-bar_t / (1 - alpha-bar_t)
    alpha_t, sigma_t     sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t): DPM-Solver's x_t = alpha_t x_0 + sigma_t eps
    lambda_t             lambdas = log(alpha_t / sigma_t), half the log-SNR
    v_t                  v = alpha_t eps - sigma_t x_0, the "velocity" (Salimans & Ho, 2022, section 4)

What the network predicts (`prediction`): "eps", the paper's noise epsilon_theta (eq. 11); "v", the velocity
v_theta; "x0", the data itself; or "edm", the output F_theta of Karras et al.'s (2022) preconditioned denoiser
D = c_skip x + c_out F_theta(c_in x) (their table 1), written for this process.  The scheduler converts each to
eps in one place (`to_eps`), so every sampler, which works with eps, works with every parameterization; and
`model_input` is what the network sees of x_t (x_t itself, or c_in's unit-variance scaling for "edm").

    python -c "from noise_scheduler import LinearNoiseScheduler as S; print(S().betas[:3])"
"""
import math

import torch


def extract(coefficients, t, x_shape):
    """Gather one coefficient per sample and shape it to broadcast over x: (B,) -> (B, 1, 1, 1)."""
    out = coefficients.gather(0, t.to(coefficients.device))
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


def _noise_like(x, generator):
    """Standard normal noise of x's shape, drawn from `generator` (on the generator's device) if given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)


PREDICTIONS = ("eps", "v", "x0", "edm")
# The "karras" spacing of timesteps (NoiseScheduler.timesteps): Karras et al., 2022, eq. 5, with their rho, from at most
# KARRAS_SIGMA_MAX, just above the linear schedule's sigma_t / alpha_t at T-1 (157 at T = 1000).  Their sigma_max of
# 80 moved the 10-step walk's FID by -2% to +8% on four models (docs/experiments.md, EDM's spacing for ten
# evaluations); the cap matters for the cosine schedule, whose 20,000 at T-1 would crowd the steps into noise alone.
KARRAS_RHO, KARRAS_SIGMA_MAX = 7.0, 160.0
# Training timesteps (timestep_probs): "uniform" as the paper, or SpeeD's asymmetric sampling, whose convergence area
# (the slope of sqrt(1 - alpha-bar_t) against t / T below SPEED_SLOPE: 1e-4 a step at T = 1000, as Wang et al. set it)
# is drawn SPEED_RATIO times less often (their 2.5 against 0.5).
# "lognormal": EDM's log-normal distribution of noise levels, ln sigma ~ N(P_MEAN, P_STD^2) (Karras et al., 2022, table 1),
# with sigma = sigma_t / alpha_t, over the T timesteps.  "stratified": uniform, as the paper's, but each batch's
# timesteps spread evenly over 0..T-1 (Kingma et al., 2021's low-discrepancy sampler; sample_timesteps).
TIMESTEP_SAMPLINGS = ("uniform", "stratified", "speed", "lognormal")
SPEED_SLOPE, SPEED_RATIO = 0.1, 5.0
P_MEAN, P_STD = -1.2, 1.2


class NoiseScheduler:
    """Everything the forward and reverse process need, derived from a beta schedule, and what the network
    predicts (one of PREDICTIONS).

    Computed in float64 for accuracy, stored as float32 tensors; `.to(device)` moves them.  sigma_data, the
    standard deviation of the training data, is what the "edm" prediction is preconditioned with.
    """

    def __init__(self, betas, prediction="eps", sigma_data=None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas < 1).all(), "betas must lie in (0, 1)"
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
        if prediction == "edm" and not (sigma_data is not None and sigma_data > 0):
            raise ValueError(f"the edm prediction needs the data's standard deviation sigma_data > 0, got {sigma_data}")
        self.prediction, self.sigma_data = prediction, sigma_data
        self.num_timesteps = betas.shape[0]
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Forward process q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I)   (eq. 4)
        # Posterior q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I)                  (eq. 6, 7)
        tensors = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            snr=alphas_cumprod / (1.0 - alphas_cumprod),                  # signal-to-noise ratio of x_t
            lambdas=0.5 * torch.log(alphas_cumprod / (1.0 - alphas_cumprod)),   # log(alpha_t / sigma_t), DPM-Solver's time
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        )
        # EDM's preconditioning (Karras et al., 2022, table 1) in this process's coordinates.  Their x and sigma are
        # x_t / alpha_t and sigma_t / alpha_t; with s = sigma_data and n_t = sqrt(sigma_t^2 + alpha_t^2 s^2), the
        # std of x_t, c_in x = x_t / n_t, c_skip x = alpha_t s^2 / n_t^2 x_t, c_out = sigma_t s / n_t, and
        # D = c_skip x + c_out F is the network's x_0.  (With s = 1, n_t = 1 and F = -v: v-prediction.)
        s_data = float(sigma_data) if prediction == "edm" else 1.0
        n_t = (1.0 - alphas_cumprod + alphas_cumprod * s_data ** 2).sqrt()
        tensors.update(c_in=1.0 / n_t, c_skip=alphas_cumprod.sqrt() * s_data ** 2 / n_t ** 2,
                       c_out=(1.0 - alphas_cumprod).sqrt() * s_data / n_t)
        for name, value in tensors.items():
            setattr(self, name, value.float())
        self._names = list(tensors)

    def to(self, device):
        for name in self._names:
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self):
        return self.betas.device

    # ---- forward process -------------------------------------------------------------------
    def sample_timesteps(self, batch_size, generator=None, device=None, probs=None, stratified=False):
        """t ~ Uniform({0, ..., T-1}), one per sample (algorithm 1, line 3); or t drawn from `probs`, a distribution
        over the T timesteps (timestep_probs).  stratified: the B draws of the batch share one u ~ U[0, 1) and take
        the strata (u + k) / B, k = 0..B-1, in random order (the low-discrepancy sampler of Variational Diffusion
        Models, Kingma et al., 2021): each t is still uniform, so the expected loss is the paper's, but every batch
        covers the noise levels evenly and its loss varies less from batch to batch."""
        gen_device = generator.device if generator is not None else (device or self.device)
        if stratified:
            assert probs is None, "stratified draws are uniform"
            u = torch.rand((), generator=generator, device=gen_device)
            k = torch.randperm(batch_size, generator=generator, device=gen_device)
            t = ((u + k) / batch_size * self.num_timesteps).long().clamp(max=self.num_timesteps - 1)
        elif probs is None:
            t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        else:
            t = torch.multinomial(probs.to(gen_device), batch_size, replacement=True, generator=generator)
        return t.to(device or self.device)

    def timestep_probs(self, sampling):
        """The distribution of training timesteps: None for "uniform", the paper's; for "lognormal", EDM's
        ln sigma ~ N(P_MEAN, P_STD^2) (Karras et al., 2022, section 5) for sigma = sigma_t / alpha_t = exp(-lambda_t),
        each timestep taking the mass of its stretch of ln sigma; for "speed", SpeeD's asymmetric
        sampling (Wang et al., 2024, section 4.2).  Where the noise scale sqrt(1 - alpha-bar_t) has nearly stopped
        growing, x_t is almost pure noise and its eps almost x_t itself: little is left to learn there.  Those
        timesteps, whose slope d sqrt(1 - alpha-bar_t) / d(t / T) is below SPEED_SLOPE (t >= 641 of the linear
        schedule with T = 1000), are drawn SPEED_RATIO times less often than the others."""
        if sampling in ("uniform", "stratified"):
            return None
        if sampling == "lognormal":
            log_sigma = -self.lambdas.double().cpu()
            density = torch.exp(-0.5 * ((log_sigma - P_MEAN) / P_STD) ** 2)
            weight = density * torch.gradient(log_sigma)[0].abs()          # the pdf times the stretch of each t
            return (weight / weight.sum()).float().to(self.device)
        if sampling != "speed":
            raise ValueError(f"unknown timestep sampling {sampling!r}")
        noise_scale = (1.0 - self.alphas_cumprod.double().cpu()).sqrt()
        slope = torch.gradient(noise_scale)[0] * self.num_timesteps
        weight = torch.where(slope > SPEED_SLOPE, SPEED_RATIO, 1.0)
        return (weight / weight.sum()).float().to(self.device)

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps   (eq. 4; algorithm 1, line 5)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def target(self, x0, noise, t):
        """What the network learns to predict from x_t = add_noise(x0, noise, t): the noise eps (algorithm 1,
        line 5), v = alpha_t eps - sigma_t x_0 (Salimans & Ho, 2022, section 4), x_0, or for "edm" the F for which
        c_skip x_t + c_out F = x_0 (Karras et al., 2022, eq. 8: its plain MSE is their weighted loss, lambda = 1 / c_out^2)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        if self.prediction == "edm":                        # F's target, (x_0 - c_skip x) / c_out
            x_t = self.add_noise(x0, noise, t)
            return (x0 - extract(self.c_skip, t, x0.shape) * x_t) / extract(self.c_out, t, x0.shape)
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)

    def x0_loss_weight(self, t):
        """w(t) with || target - prediction ||^2 = w(t) || x_0 - x_0-hat ||^2 for the prediction learnt: SNR(t) for
        eps, SNR(t) + 1 for v, 1 for x_0 (Salimans & Ho, 2022, section 4; Hang et al., 2023, section 3.4), and
        1 / c_out^2 = SNR(t) + 1 / sigma_data^2 for edm."""
        if self.prediction == "edm":
            return self.c_out[t] ** -2
        snr = self.snr[t]
        return {"eps": snr, "v": snr + 1.0, "x0": torch.ones_like(snr)}[self.prediction]

    def model_input(self, x_t, t):
        """What the network sees of x_t: x_t, or for edm c_in x = x_t / sqrt(sigma_t^2 + alpha_t^2 sigma_data^2), the
        noisy image scaled to unit variance at every t (Karras et al., 2022, table 1)."""
        if self.prediction != "edm":
            return x_t
        return x_t * extract(self.c_in, t, x_t.shape).to(x_t.dtype)

    # ---- reverse process -------------------------------------------------------------------
    def to_eps(self, output, x_t, t):
        """The noise eps that the network's output stands for at (x_t, t), t a (B,) tensor:
            eps  = output                                                        (eq. 11's epsilon_theta)
            v:     eps = sigma_t x_t + alpha_t v                                 (from x_t = alpha_t x_0 + sigma_t eps)
            x0:    eps = (x_t - alpha_t x_0) / sigma_t                           (eq. 4)
            edm:   the same, with x_0 = c_skip x_t + c_out F                     (Karras et al., 2022, eq. 7)
        with alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t)."""
        output, x_t = output.float(), x_t.float()
        if self.prediction == "eps":
            return output
        alpha = extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sigma = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        if self.prediction == "v":
            return sigma * x_t + alpha * output
        if self.prediction == "edm":
            output = extract(self.c_skip, t, x_t.shape) * x_t + extract(self.c_out, t, x_t.shape) * output
        return (x_t - alpha * output) / sigma

    def predict_x0(self, x_t, t, eps):
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def timesteps(self, num_steps=None, spacing="uniform"):
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
        T = self.num_timesteps
        if num_steps is None or num_steps == T:
            return list(range(T - 1, -1, -1))
        if not 1 <= num_steps <= T:
            raise ValueError(f"the number of sampling steps must be between 1 and {T}, got {num_steps}")
        if num_steps == 1:
            return [T - 1]                         # one step: from pure noise straight to x_0
        if spacing == "uniform":
            return torch.linspace(T - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()
        if spacing == "logsnr":
            lambdas = self.lambdas.cpu()
            targets = torch.linspace(float(lambdas[T - 1]), float(lambdas[0]), num_steps)
        elif spacing == "karras":
            lambdas = self.lambdas.cpu().double()
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

    def restart_timesteps(self, num_steps, sigma_min, sigma_max, restarts, restart_steps, lands=False):
        """The walk of Restart sampling (Xu et al., 2023, algorithm 1) with `num_steps` network evaluations in all:
        an ODE pass from T-1 down to t_min, then `restarts` times a forward jump back up to t_max followed by an
        ODE pass of `restart_steps` steps down to t_min again, then the ODE pass on to 0.  t_min and t_max are the
        timesteps whose noise level sigma_t / alpha_t = exp(-lambda_t) (the paper's sigma, Karras et al., 2022's
        time) is nearest sigma_min and sigma_max.  The main pass has num_steps - restarts * restart_steps
        timesteps, evenly spaced in t, with t_min in place of the nearest one.  A timestep followed by a larger
        one marks a forward jump (forward_jump), which evaluates nothing.  lands: the walk is a landing one, as
        UniPC's (sampling.unipc_timesteps): its last timestep, t = 0, is reached and not evaluated, so the main
        pass gets one timestep more, and t_min never takes its place."""
        main_steps = num_steps - restarts * restart_steps
        noise_levels = torch.exp(-self.lambdas.cpu().double())
        t_min, t_max = (int((noise_levels - s).abs().argmin()) for s in (sigma_min, sigma_max))
        if t_max - t_min < restart_steps:
            raise ValueError(f"the restart interval sigma {sigma_min:g}..{sigma_max:g} spans timesteps {t_min}..{t_max} "
                             f"of this schedule, too few for {restart_steps} steps")
        if restarts < 0 or restart_steps < 1 or main_steps < 2:
            raise ValueError(f"{num_steps} steps leave too few for the main pass after {restarts} restarts of "
                             f"{restart_steps} steps")
        main = self.timesteps(main_steps + int(lands), "uniform")
        inner = range(1, len(main) - int(lands))                                  # never the first, T-1
        nearest = min(inner, key=lambda i: abs(main[i] - t_min))
        main[nearest] = t_min
        if main != sorted(set(main), reverse=True):
            raise ValueError(f"t_min {t_min} does not fit between the {main_steps} steps of the main pass")
        restart_pass = torch.linspace(t_max, t_min, restart_steps + 1, dtype=torch.float64).round().long().tolist()
        return main[:nearest + 1] + restarts * restart_pass + main[nearest + 1:]

    def step(self, eps, t, x_t, generator=None, clip_x0=True):
        """One ancestral step x_t -> x_{t-1} (algorithm 2, lines 3-4).

        eps: the model's noise prediction at (x_t, t); t: a Python int shared by the batch.
        Returns (x_{t-1}, predicted x_0).

        Without clipping, mu-tilde_t(x_t, x_0(x_t, eps)) equals eq. 11,
            mu_theta = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha-bar_t) * eps);
        with clip_x0 the predicted x_0 is first clipped to the data range [-1, 1], as in the
        authors' code, and the mean is taken from the posterior, eq. 7.
        The variance is sigma_t^2 = beta-tilde_t, which is 0 at t = 0: the last step adds no noise.
        """
        eps, x_t = eps.float(), x_t.float()
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0 = self.predict_x0(x_t, tt, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        mean = (extract(self.posterior_mean_coef1, tt, x_t.shape) * x0
                + extract(self.posterior_mean_coef2, tt, x_t.shape) * x_t)       # eq. 7
        if t == 0:
            return mean, x0
        std = extract(self.posterior_variance, tt, x_t.shape).sqrt()
        return mean + std * _noise_like(x_t, generator), x0                     # algorithm 2, line 4

    def ddim_step(self, eps, t, t_prev, x_t, eta=0.0, generator=None, clip_x0=True):
        """One DDIM step x_t -> x_{t_prev} (Song et al., 2021, eq. 12), t_prev < t, t_prev = -1 means x_0.

        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)      (eq. 16)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        where a = alpha-bar.  eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is the
        ancestral step with variance beta-tilde_t.  Returns (x_{t_prev}, predicted x_0).
        """
        eps, x_t = eps.float(), x_t.float()
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
        x0 = self.predict_x0(x_t, tt, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - a_t.sqrt() * x0) / (1.0 - a_t).sqrt()     # the noise consistent with the clipped x_0
        sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma ** 2).clamp(min=0.0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * _noise_like(x_t, generator)
        return x_prev, x0

    def forward_jump(self, x_t, t, t_up, generator=None):
        """Noise x_t forward to x_{t_up}, t_up > t, with q(x_{t_up} | x_t) (Restart sampling's forward jump, Xu et al.,
        2023, eq. 3, in variance-preserving form): x_{t_up} = a x_t + sqrt(1 - alpha-bar_{t_up} - a^2 (1 - alpha-bar_t)) z,
        a = sqrt(alpha-bar_{t_up} / alpha-bar_t).  From x_t ~ q(x_t | x_0) it gives exactly q(x_{t_up} | x_0)."""
        alpha_t, sigma_t, _ = self._alpha_sigma(t)
        alpha_up, sigma_up, _ = self._alpha_sigma(t_up)
        a = alpha_up / alpha_t
        return a * x_t.float() + math.sqrt(max(0.0, sigma_up ** 2 - (a * sigma_t) ** 2)) * _noise_like(x_t, generator)

    def _alpha_sigma(self, t):
        """(alpha_t, sigma_t, lambda_t) as float64 scalars; t = -1 is the clean data (alpha 1, sigma 0, lambda inf)."""
        if t < 0:
            return 1.0, 0.0, math.inf
        a = float(self.alphas_cumprod[t])
        return math.sqrt(a), math.sqrt(1.0 - a), float(self.lambdas[t])

    def dpm_solver_step(self, eps, t, t_prev, x_t, previous=None, stochastic=False, generator=None, clip_x0=True):
        """One step of DPM-Solver++(2M) (Lu et al., 2022b, algorithm 2) from x_t to x_{t_prev}, t_prev < t,
        t_prev = -1 meaning x_0.  Returns (x_{t_prev}, predicted x_0).

        With alpha = sqrt(alpha-bar), sigma = sqrt(1 - alpha-bar), lambda = log(alpha / sigma), the diffusion ODE
        has the exact solution  x_prev = sigma_prev / sigma_t x_t + sigma_prev int_{lambda_t}^{lambda_prev} e^lambda x_0(lambda) dlambda
        (the data-prediction form, Lu et al., 2022b, section 4).  With h = lambda_prev - lambda_t:
            first order, x_0 held constant (= DDIM with eta 0):   x_prev = sigma_prev / sigma_t x_t - alpha_prev (e^-h - 1) D,  D = x_0
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
        x0 = self.predict_x0(x_t, tt, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        if t_prev < 0:                       # the last step, first order: sigma_prev = 0 leaves x_prev = D = x_0
            return x0, x0
        alpha_t, sigma_t, lambda_t = self._alpha_sigma(t)
        alpha_prev, sigma_prev, lambda_prev = self._alpha_sigma(t_prev)
        h = lambda_prev - lambda_t
        d = x0
        if previous is not None:
            t_last, x0_last = previous
            h_last = lambda_t - self._alpha_sigma(t_last)[2]
            r = h_last / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_last
        if not stochastic:
            return sigma_prev / sigma_t * x_t - alpha_prev * math.expm1(-h) * d, x0
        x_prev = sigma_prev / sigma_t * math.exp(-h) * x_t - alpha_prev * math.expm1(-2.0 * h) * d
        return x_prev + sigma_prev * math.sqrt(-math.expm1(-2.0 * h)) * _noise_like(x_t, generator), x0

    def unic_correction(self, x0_t, t, x_s, s, x0_s, previous=None):
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
        _, sigma_s, lambda_s = self._alpha_sigma(s)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma(t)
        h = lambda_t - lambda_s
        b_h = math.expm1(-h)
        z_phi_2 = b_h / -h - 1.0                              # z phi_2(z) at z = -h
        b_1, b_2 = z_phi_2 / b_h, 2.0 * (z_phi_2 / -h - 0.5) / b_h
        d = 0.5 * (x0_t - x0_s)
        if previous is not None:
            t_last, x0_last = previous
            r = (self._alpha_sigma(t_last)[2] - lambda_s) / h
            rho_last, rho_t = (b_1 - b_2) / (1.0 - r), (b_2 - r * b_1) / (1.0 - r)
            d = rho_last * (x0_last.float() - x0_s) / r + rho_t * (x0_t - x0_s)
        x_t = sigma_t / sigma_s * x_s - alpha_t * b_h * (x0_s + d)
        return x_t, (x_t - alpha_t * x0_t) / sigma_t


class LinearNoiseScheduler(NoiseScheduler):
    """beta_t linear from beta_start to beta_end over T steps (Ho et al., 2020, section 4)."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction="eps", sigma_data=None):
        super().__init__(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64), prediction, sigma_data)


class CosineNoiseScheduler(NoiseScheduler):
    """alpha-bar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2)  (Nichol & Dhariwal, 2021, eq. 17).

    betas are clipped to max_beta = 0.999 to avoid a singularity at the end of the chain.
    Here alphas_cumprod[t] is alpha-bar at the paper's step t + 1.
    """

    def __init__(self, num_timesteps=1000, s=0.008, max_beta=0.999, prediction="eps", sigma_data=None):
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)
        super().__init__(betas, prediction, sigma_data)


SCHEDULES = {"linear": LinearNoiseScheduler, "cosine": CosineNoiseScheduler}


def make_scheduler(schedule="linear", num_timesteps=1000, prediction="eps", sigma_data=None):
    """The scheduler named in a checkpoint's configuration."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule](num_timesteps=num_timesteps, prediction=prediction, sigma_data=sigma_data)
