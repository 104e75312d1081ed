"""The training recipe: Min-SNR-gamma weighting, the budget-aware learning rate, and a run set by its minutes."""
import math

import pytest
import torch

from conftest import TINY_MODEL, make_digits, run_script, write_idx
from noise_scheduler import LinearNoiseScheduler
from test_scripts import assert_same_tensors, load
from training import DEFAULTS, diffusion_loss, learning_rate, planned_steps


def noisy_predictor(x_t, t, labels):
    return 0.5 * x_t + 0.01 * t[:, None, None, None].float() / 1000


def loss_with(gamma, seed=0):
    sched = LinearNoiseScheduler()
    x0 = torch.rand(256, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return diffusion_loss(noisy_predictor, sched, x0, generator=torch.Generator().manual_seed(seed),
                          min_snr_gamma=gamma)


def test_min_snr_weighting_with_infinite_gamma_is_the_plain_objective():
    assert loss_with(math.inf).item() == pytest.approx(loss_with(None).item(), rel=1e-6)
    assert loss_with(5.0).item() < loss_with(None).item()       # the weights min(SNR, 5) / SNR are at most 1


def test_min_snr_weights_each_sample_by_min_snr_gamma_over_snr():
    sched = LinearNoiseScheduler()
    g = torch.Generator().manual_seed(3)
    x0 = torch.zeros(1000, 1, 2, 2)
    t = sched.sample_timesteps(1000, g)                                        # the draws diffusion_loss will make
    noise = torch.randn(x0.shape, generator=g)
    predictor = lambda x_t, t_, labels: torch.zeros_like(x_t)                 # noqa: E731 (error = the noise itself)
    loss = diffusion_loss(predictor, sched, x0, generator=torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    expected = (torch.minimum(snr, torch.tensor(5.0)) / snr * noise.pow(2).mean(dim=(1, 2, 3))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_linear_schedule_warms_up_then_reaches_zero_at_the_last_step():
    config = {**DEFAULTS, "lr": 1e-3, "warmup_steps": 10, "lr_schedule": "linear"}
    total = 110
    rates = [learning_rate(config, step, total) for step in range(total)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)          # warm-up
    assert rates[-1] == 0.0 and rates[-2] > 0                                          # zero at the last step
    assert rates[60] == pytest.approx(1e-3 * (109 - 60) / (109 - 10))                  # a straight line between
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    constant = {**config, "lr_schedule": "constant"}
    assert [learning_rate(constant, s, total) for s in (9, 60, 109)] == [pytest.approx(1e-3)] * 3
    assert learning_rate(config, 60, total) == learning_rate(config, 60, total), "a function of the step alone"


def test_the_plan_follows_the_epochs_or_the_minutes_left():
    assert planned_steps(1000, 10, None, 0.0, 10) == 1000                 # no deadline: --epochs decides
    now = __import__("time").monotonic()
    # 100 steps took 100 s; 50 s are left: 50 more steps, and never more than the epochs allow
    assert planned_steps(10_000, 100, now + 50, now - 100, 100) in (149, 150)
    assert planned_steps(120, 100, now + 50, now - 100, 100) == 120
    assert planned_steps(math.inf, 100, now - 1, now - 100, 100) == 100   # past the deadline: no step left


@pytest.mark.slow
def test_max_minutes_alone_trains_past_the_default_epochs_and_ends_with_the_rate_at_zero(tmp_path):
    write_idx(tmp_path / "data" / "MNIST" / "raw", "train", *make_digits(16, 0))     # one small step per epoch
    write_idx(tmp_path / "data" / "MNIST" / "raw", "t10k", *make_digits(16, 1))
    out = tmp_path / "run"
    result = run_script("training.py", "--data-dir", tmp_path / "data", "--out-dir", out, "--batch-size", "16",
                        "--preview-samples", "0", "--warmup-steps", "5", "--lr-schedule", "linear", *TINY_MODEL,
                        "--max-minutes", "0.3")
    assert "--max-minutes 0.3 reached" in result.stdout
    state = load(out / "ddpm_ckpt.pth")
    assert state["step"] > DEFAULTS["epochs"], \
        "the 20 default epochs (of one step each) do not cut a run of set minutes"
    assert state["optimizer"]["param_groups"][0]["lr"] < 0.1 * DEFAULTS["lr"], "the rate decays to the deadline"


def train_tiny(data_dir, out, *extra):
    """A tiny model's run of training.py on data_dir into out; the checkpoint it leaves."""
    run_script("training.py", "--data-dir", data_dir, "--out-dir", out, "--batch-size", "64",
               "--preview-samples", "0", *TINY_MODEL, *extra)
    return load(out / "ddpm_ckpt.pth")


@pytest.mark.slow
def test_a_new_run_trains_with_min_snr_and_an_old_plain_checkpoint_resumes_with_the_plain_objective(data_dir,
                                                                                                     tmp_path):
    """The default objective is Min-SNR; a checkpoint trained with the paper's objective, whether it records
    --loss plain or predates the option, goes on with the paper's objective: bit for bit the run it would have
    been without the change of default."""
    straight = train_tiny(data_dir, tmp_path / "straight", "--loss", "plain", "--epochs", "2")
    train_tiny(data_dir, tmp_path / "recorded", "--loss", "plain", "--epochs", "1")
    old = train_tiny(data_dir, tmp_path / "old", "--loss", "plain", "--epochs", "1")
    del old["config"]["loss"], old["config"]["min_snr_gamma"]          # as written before --loss existed,
    old["format"] = "ddpm-checkpoint-v1"                               # and before the SHA-256
    torch.save(old, tmp_path / "old" / "ddpm_ckpt.pth")
    for name in ("recorded", "old"):
        resumed = train_tiny(data_dir, tmp_path / name, "--resume", "--epochs", "2")
        assert resumed["config"]["loss"] == "plain"
        for key in ("model", "ema"):
            assert_same_tensors(resumed[key], straight[key])
    minsnr = train_tiny(data_dir, tmp_path / "new", "--epochs", "2")
    assert minsnr["config"]["loss"] == "min-snr" and minsnr["config"]["min_snr_gamma"] == DEFAULTS["min_snr_gamma"]
    assert any(not torch.equal(minsnr["model"][k], straight["model"][k]) for k in straight["model"]), \
        "the two objectives train different weights"


@pytest.mark.slow
def test_a_min_snr_checkpoint_resumes_with_the_gamma_it_was_trained_with(data_dir, tmp_path):
    """Checkpoints of Min-SNR-5, the default before gamma 20, go on with gamma 5: bit for bit the run they began."""
    assert DEFAULTS["min_snr_gamma"] != 5.0

    straight = train_tiny(data_dir, tmp_path / "straight", "--min-snr-gamma", "5", "--epochs", "2")
    train_tiny(data_dir, tmp_path / "resumed", "--min-snr-gamma", "5", "--epochs", "1")
    resumed = train_tiny(data_dir, tmp_path / "resumed", "--resume", "--epochs", "2")
    assert resumed["config"]["min_snr_gamma"] == 5.0
    for key in ("model", "ema"):
        assert_same_tensors(resumed[key], straight[key])
    default = train_tiny(data_dir, tmp_path / "default", "--epochs", "2")
    assert any(not torch.equal(default["model"][k], straight["model"][k]) for k in straight["model"]), \
        "gamma 5 and the default gamma train different weights"


def test_speed_sampling_draws_the_nearly_pure_noise_timesteps_five_times_less_often():
    sched = LinearNoiseScheduler()
    assert sched.timestep_probs("uniform") is None
    probs = sched.timestep_probs("speed")
    slow = int((probs < probs.max()).sum())
    assert slow == 1000 - 641, "the slope of sqrt(1 - alpha-bar) falls below 1e-4 a step at t = 641"
    t = sched.sample_timesteps(200_000, torch.Generator().manual_seed(0), probs=probs)
    counts = torch.bincount(t, minlength=1000).float()
    assert float(counts[:641].mean() / counts[641:].mean()) == pytest.approx(5.0, rel=0.05)
    # uniform draws are exactly those of before the option (the same generator calls), so old runs resume bit for bit
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sched.sample_timesteps(64, g1), torch.randint(0, 1000, (64,), generator=g2))


def test_stratified_timesteps_cover_every_stratum_of_each_batch_and_are_uniform_over_batches():
    sched = LinearNoiseScheduler()
    g = torch.Generator().manual_seed(0)
    batches = [sched.sample_timesteps(128, g, stratified=True) for _ in range(2000)]
    for t in batches[:50]:
        strata = torch.sort((t.double() + 0.5) * 128 / 1000).values.floor().long()
        assert torch.equal(torch.unique(t), torch.sort(t).values), "no timestep twice in a batch of 128 < T"
        assert (strata - torch.arange(128)).abs().max() <= 1, "one draw in each 1/B of the timesteps"
    assert not torch.equal(batches[0], torch.sort(batches[0]).values), "the strata come in random order"
    # each draw alone is uniform over the T timesteps: the first of 40,000 batches (independent of each other), 40 a
    # timestep, pass a chi-square test (999 degrees of freedom; 1,160 is its 0.03% tail)
    first = torch.stack([sched.sample_timesteps(128, g, stratified=True)[0] for _ in range(40_000)])
    counts = torch.bincount(first, minlength=1000).double()
    assert float(((counts - 40) ** 2 / 40).sum()) < 1160
    # independent draws cover the noise levels less evenly: a batch of them misses strata that stratified ones never do
    plain = sched.sample_timesteps(128, torch.Generator().manual_seed(0))
    assert len(torch.unique((plain * 128) // 1000)) < 128 == len(torch.unique((batches[0] * 128 + 64) // 1000))


@pytest.mark.slow
def test_stratified_timesteps_and_adam_beta2_are_run_options_kept_on_resume(data_dir, tmp_path):
    base = train_tiny(data_dir, tmp_path / "base", "--epochs", "1")
    new = train_tiny(data_dir, tmp_path / "new", "--timestep-sampling", "stratified", "--adam-beta2", "0.99",
                     "--epochs", "1")
    assert new["config"]["adam_beta2"] == 0.99 and new["config"]["timestep_sampling"] == "stratified"
    assert [group["betas"] for group in new["optimizer"]["param_groups"]] == [(0.9, 0.99)]
    assert [group["betas"] for group in base["optimizer"]["param_groups"]] == [(0.9, DEFAULTS["adam_beta2"])]
    assert any(not torch.equal(new["model"][k], base["model"][k]) for k in base["model"])
    refused = run_script("training.py", "--data-dir", data_dir, "--out-dir", tmp_path / "new", "--resume",
                         "--adam-beta2", "0.999", "--epochs", "2", check=False)
    assert refused.returncode == 2 and "--adam-beta2 0.999 (checkpoint: 0.99)" in refused.stderr
    resumed = train_tiny(data_dir, tmp_path / "new", "--resume", "--epochs", "2")
    assert resumed["step"] > new["step"] and resumed["config"]["adam_beta2"] == 0.99
    assert [group["betas"] for group in resumed["optimizer"]["param_groups"]] == [(0.9, 0.99)]
    del base["config"]["adam_beta2"]                                      # as written before the option existed
    base["format"] = "ddpm-checkpoint-v1"
    torch.save(base, tmp_path / "base" / "ddpm_ckpt.pth")
    old = train_tiny(data_dir, tmp_path / "base", "--resume", "--epochs", "2")
    assert old["config"]["adam_beta2"] == 0.999
    assert [group["betas"] for group in old["optimizer"]["param_groups"]] == [(0.9, 0.999)]
    impossible = run_script("training.py", "--data-dir", data_dir, "--out-dir", tmp_path / "x", "--adam-beta2", "1",
                            check=False)
    assert impossible.returncode == 2 and "--adam-beta2" in impossible.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_checkpoint_of_before_timestep_sampling_resumes_uniform_and_the_option_cannot_change_on_resume(data_dir,
                                                                                                         tmp_path):
    straight = train_tiny(data_dir, tmp_path / "straight", "--timestep-sampling", "uniform", "--epochs", "2")
    old = train_tiny(data_dir, tmp_path / "old", "--timestep-sampling", "uniform", "--epochs", "1")
    del old["config"]["timestep_sampling"]                              # as written before the option existed
    old["format"] = "ddpm-checkpoint-v1"
    torch.save(old, tmp_path / "old" / "ddpm_ckpt.pth")
    resumed = train_tiny(data_dir, tmp_path / "old", "--resume", "--epochs", "2")
    assert resumed["config"]["timestep_sampling"] == "uniform"
    for key in ("model", "ema"):
        assert_same_tensors(resumed[key], straight[key])
    speed = train_tiny(data_dir, tmp_path / "speed", "--timestep-sampling", "speed", "--epochs", "2")
    assert any(not torch.equal(speed["model"][k], straight["model"][k]) for k in straight["model"]), \
        "the two samplings of t train different weights"
    refused = run_script("training.py", "--data-dir", data_dir, "--out-dir", tmp_path / "speed", "--resume",
                         "--timestep-sampling", "uniform", "--epochs", "3", check=False)
    assert refused.returncode == 2 and "--timestep-sampling uniform (checkpoint: speed)" in refused.stderr
    assert load(tmp_path / "speed" / "ddpm_ckpt.pth")["step"] == speed["step"], "nothing was trained or written"


@pytest.mark.slow
def test_an_edm_run_measures_sigma_data_on_its_images_keeps_it_on_resume_and_samples(data_dir, tmp_path):
    """--prediction edm preconditions with the training pixels' std, which the checkpoint keeps: a resumed run and
    the sampler use the value the run started with."""
    from dataset import load_dataset, to_model_range
    from sampling import generate, load_model

    edm = ("--prediction", "edm", "--timestep-sampling", "lognormal", "--loss", "plain")
    first = train_tiny(data_dir, tmp_path / "edm", *edm, "--epochs", "1")
    images, _ = load_dataset("mnist", data_dir)
    sigma_data = float(to_model_range(images).double().std())
    assert 0.1 < sigma_data < 1 and first["config"]["sigma_data"] == pytest.approx(sigma_data, abs=1e-4)
    resumed = train_tiny(data_dir, tmp_path / "edm", "--resume", "--epochs", "2")
    assert resumed["config"]["sigma_data"] == first["config"]["sigma_data"] and resumed["step"] > first["step"]
    pipeline = load_model(tmp_path / "edm" / "ddpm_ckpt.pth", "cpu", "fp32")
    assert pipeline.scheduler.sigma_data == first["config"]["sigma_data"]
    drawn, _ = generate(pipeline, 4, sampler="dpm++", steps=5, progress=False)
    assert drawn.shape == (4, 1, 28, 28) and drawn.dtype == torch.uint8 and drawn.float().std() > 0
    plain = train_tiny(data_dir, tmp_path / "eps", "--epochs", "1")
    assert "sigma_data" not in plain["config"], "only the edm prediction measures the data"


@pytest.mark.slow
def test_labelled_data_trains_a_conditional_model_unless_unconditional_is_asked(data_dir, tmp_path):
    from PIL import Image

    default = train_tiny(data_dir, tmp_path / "default", "--epochs", "1")
    assert default["config"]["conditional"] is True and default["config"]["num_classes"] == 10
    assert "label_embedding.weight" in default["model"]
    paper = train_tiny(data_dir, tmp_path / "paper", "--epochs", "1", "--unconditional")
    assert paper["config"]["conditional"] is False and paper["config"]["num_classes"] is None
    assert not any(k.startswith("label_embedding") for k in paper["model"])
    refused = run_script("training.py", "--data-dir", data_dir, "--out-dir", tmp_path / "paper", "--resume",
                         "--conditional", "--epochs", "2", check=False)
    assert refused.returncode == 2 and "--conditional (checkpoint: --unconditional)" in refused.stderr
    resumed = train_tiny(data_dir, tmp_path / "paper", "--resume", "--epochs", "2")
    assert resumed["config"]["conditional"] is False and resumed["step"] > paper["step"]
    # a checkpoint without the key (none was written so, but LEGACY_CONFIG says what it would mean) stays unconditional
    del resumed["config"]["conditional"]
    resumed["format"] = "ddpm-checkpoint-v1"
    torch.save(resumed, tmp_path / "paper" / "ddpm_ckpt.pth")
    old = train_tiny(data_dir, tmp_path / "paper", "--resume", "--epochs", "3")
    assert old["config"]["conditional"] is False and old["config"]["num_classes"] is None
    # images without labels (a folder without class sub-folders) train the unconditional model, with no flag
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(8):
        Image.new("L", (28, 28), i * 30).save(flat / f"{i}.png")
    unlabelled = train_tiny(str(flat), tmp_path / "flat_run", "--dataset", "folder", "--image-size", "28",
                            "--batch-size", "4", "--epochs", "1")
    assert unlabelled["config"]["conditional"] is False and unlabelled["config"]["num_classes"] is None
