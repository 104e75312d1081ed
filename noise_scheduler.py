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


def noise_like(x, generator):
    """Standard normal noise of x's shape, drawn from `generator` (on the generator's device) if given."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)


PREDICTIONS = ("eps", "v", "x0", "edm")
# Training timesteps (timestep_probs): "uniform" as the paper, or SpeeD's asymmetric sampling, whose convergence area
# (the slope of sqrt(1 - alpha-bar_t) against t / T below SPEED_SLOPE: 1e-4 a step at T = 1000, as Wang et al. set it)
# is drawn SPEED_RATIO times less often (their 2.5 against 0.5).
# "lognormal": EDM's log-normal distribution of noise levels, ln sigma ~ N(P_MEAN, P_STD^2) (Karras et al., 2022,
# table 1), with sigma = sigma_t / alpha_t, over the T timesteps.  "stratified": uniform, as the paper's, but each
# batch's timesteps spread evenly over 0..T-1 (Kingma et al., 2021's low-discrepancy sampler; sample_timesteps).
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
            lambdas=0.5 * torch.log(alphas_cumprod / (1.0 - alphas_cumprod)),     # log(alpha_t / sigma_t)
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
        c_skip x_t + c_out F = x_0 (Karras et al., 2022, eq. 8: its plain MSE is their weighted loss,
        lambda = 1 / c_out^2)."""
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

    def timesteps(self):
        """The timesteps of the ancestral sampler, algorithm 2, line 2: T-1, ..., 0.  (The faster samplers walk
        fewer: samplers.py.)"""
        return list(range(self.num_timesteps - 1, -1, -1))

    def predict_x0(self, x_t, t, eps):
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

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
        return mean + std * noise_like(x_t, generator), x0                     # algorithm 2, line 4


class LinearNoiseScheduler(NoiseScheduler):
    """beta_t linear from beta_start to beta_end over T steps (Ho et al., 2020, section 4)."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction="eps", sigma_data=None):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        super().__init__(betas, prediction, sigma_data)


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
