"""distill.py: the student's math, its file (sealed, tied to its teacher's weights), sampling with it in one, two
and four evaluations, and the script's safety (no overwrite, Ctrl-C / SIGTERM, resume)."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import STUDENT_NAME, CheckpointError, load_checkpoint, load_student, weights_digest
from conftest import ROOT, run_script
from distill import LR, WARMUP_STEPS, jump_target, learning_rate, student_jumps, teacher_trajectories
from noise_scheduler import make_scheduler
from samplers import STUDENT_ALPHA_MIN, student_step, student_timesteps, student_x0
from sampling import NoStudent, Pipeline, add_student, generate, load_model, read_model, sampler_for
from solvers import ddim_step
from test_reliability import flip_a_byte
from unet import UNet

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), num_classes=10)


def noisy_teacher(seed=0):
    torch.manual_seed(seed)
    model = UNet(**TINY)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


# ---- the math ------------------------------------------------------------------------------------------------
def test_the_walks_are_nested_and_the_jumps_are_those_of_the_walks():
    scheduler = make_scheduler("linear", 1000)
    assert student_timesteps(scheduler, 1) == [999]
    assert student_timesteps(scheduler, 2) == [999, 499]
    assert student_timesteps(scheduler, 4) == [999, 749, 499, 249]
    assert student_jumps(scheduler) == [(999, 749), (999, 499), (999, -1), (749, 499), (499, 249), (499, -1),
                                        (249, -1)]
    assert student_timesteps(make_scheduler("linear", 50), 4) == [49, 37, 24, 12]


def test_the_rate_warms_up_linearly_then_holds():
    rates = [learning_rate(step, 1e-3) for step in range(2 * WARMUP_STEPS)]
    assert rates[0] == pytest.approx(1e-3 / WARMUP_STEPS)
    assert all(a < b for a, b in zip(rates[:WARMUP_STEPS], rates[1:WARMUP_STEPS]))
    assert rates[WARMUP_STEPS - 1:] == [pytest.approx(1e-3)] * (WARMUP_STEPS + 1)


@pytest.mark.parametrize("t, s", [(999, -1), (999, 499), (749, 499), (249, -1), (499, 249)])
def test_the_target_is_the_x0_whose_ddim_step_lands_on_the_teachers_point(t, s):
    scheduler = make_scheduler("linear", 1000)
    x_t, x0 = torch.randn(4, 1, 28, 28), torch.rand(4, 1, 28, 28) * 1.8 - 0.9
    alpha, sigma = scheduler.sqrt_alphas_cumprod[t], scheduler.sqrt_one_minus_alphas_cumprod[t]
    x_s, _ = ddim_step(scheduler, (x_t - alpha * x0) / sigma, t, s, x_t)
    target = jump_target(scheduler, x_t, torch.full((4,), t), x_s, torch.full((4,), s))
    assert torch.allclose(target, x0, atol=2e-4)


def test_a_new_student_reads_its_teachers_noise_and_divides_by_alpha_min_at_least():
    scheduler = make_scheduler("linear", 1000)
    teacher = noisy_teacher()
    student = UNet(**TINY, jump=True)
    missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("jump_embedding.") for k in missing)
    x, y = torch.randn(3, 1, 28, 28), torch.arange(3)
    with torch.no_grad():
        for t in (999, 749, 499, 100):
            tt = torch.full((3,), t)
            eps = teacher(x, tt, y)
            alpha, sigma = float(scheduler.sqrt_alphas_cumprod[t]), float(scheduler.sqrt_one_minus_alphas_cumprod[t])
            for alpha_min in (0.05, STUDENT_ALPHA_MIN):
                ours = student_x0(scheduler, student(x, tt, y, torch.full((3,), 249)), x, tt, alpha_min)
                assert torch.allclose(ours, (x - sigma * eps) / max(alpha, alpha_min), atol=1e-4)
                if alpha >= alpha_min:                                     # the teacher's own x_0 (eq. 4 inverted)
                    assert torch.allclose(ours, scheduler.predict_x0(x, tt, eps), atol=1e-4)
        # with alpha_min below alpha_t, a step of a new student to s is the teacher's DDIM step, whatever s is told
        x_s, _ = student_step(student, scheduler, x, 499, 249, y, alpha_min=0.05)
        assert torch.allclose(x_s, ddim_step(scheduler, teacher(x, torch.full((3,), 499), y), 499, 249, x)[0],
                              atol=1e-4)


def test_the_jump_input_changes_a_trained_students_step():
    student = UNet(**TINY, jump=True)
    student.load_state_dict(noisy_teacher().state_dict(), strict=False)
    torch.nn.init.normal_(student.jump_embedding[-1].weight, std=0.5)
    x, y = torch.randn(2, 1, 28, 28), torch.arange(2)
    with torch.no_grad():
        a = student(x, torch.full((2,), 999), y, torch.full((2,), -1))
        b = student(x, torch.full((2,), 999), y, torch.full((2,), 499))
    assert not torch.allclose(a, b)


def test_the_teacher_draws_whole_batches_until_its_time_is_up_and_the_same_first_ones(monkeypatch):
    pipeline = pipeline_of(noisy_teacher())
    keep = [49, 24]
    clock = iter(range(100))                        # a clock that moves on by one second each time it is read
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    timed, classes = teacher_trajectories(pipeline, None, keep, torch.Generator().manual_seed(1), batch_size=2,
                                          until=2.5)   # the first batch, then three more read the clock at 0, 1, 2
    counted, counted_classes = teacher_trajectories(pipeline, 9, keep, torch.Generator().manual_seed(1),
                                                    batch_size=2)
    assert sorted(timed) == sorted(counted) == [-1, 24, 49]
    assert len(timed[-1]) == 8 and len(counted[-1]) == 9                     # whole batches, or n exactly
    for t in timed:
        assert torch.equal(timed[t], counted[t][:8])
    assert torch.equal(classes, counted_classes[:8])
    assert not torch.allclose(timed[-1], timed[49])                          # the walk went from x_T somewhere

# ---- which sampler --steps asks for ----------------------------------------------------------------------------
def pipeline_of(model, source="default/ddpm_ckpt.pth"):
    scheduler = make_scheduler("linear", 50)
    weights = weights_digest(model.state_dict())
    return Pipeline(model, scheduler, torch.device("cpu"), "fp32", {**TINY, "schedule": "linear"}, None, source,
                    weights)


def student_state(teacher, teacher_digest, alpha_min=STUDENT_ALPHA_MIN):
    student = UNet(**TINY, jump=True)
    student.load_state_dict(teacher.state_dict(), strict=False)
    config = {**TINY, "in_channels": 1, "image_size": 28, "dropout": 0.0, "num_heads": 4}
    return {"student": student.state_dict(), "teacher": teacher_digest, "config": config,
            "distill": {"guidance_scale": 1.0, "alpha_min": alpha_min, "minutes": 0.1}}


def test_without_a_student_one_or_two_evaluations_name_the_command_and_four_is_unipc():
    pipeline = add_student(pipeline_of(noisy_teacher()), None)
    for steps in (1, 2):
        with pytest.raises(NoStudent, match="python distill.py"):
            sampler_for(pipeline, None, steps)
        with pytest.raises(NoStudent):
            generate(pipeline, 2, steps=steps, progress=False)
    with pytest.raises(NoStudent):
        sampler_for(pipeline, "student", None)
    assert sampler_for(pipeline, None, 4) == ("unipc", 4)
    assert sampler_for(pipeline, None, None) == ("ddpm", None)
    assert sampler_for(pipeline, "dpm++", 1) == ("dpm++", 1)      # a sampler asked for by name is drawn
    assert sampler_for(pipeline, "unipc", 2) == ("unipc", 2)


def test_an_exported_file_without_a_student_says_to_distil_the_run_folder_and_export_again():
    pipeline = add_student(pipeline_of(noisy_teacher(), "fm.safetensors"), None)
    with pytest.raises(NoStudent, match="--out-dir RUN_FOLDER .* then python export.py again"):
        sampler_for(pipeline, None, 1)
    other = add_student(pipeline_of(noisy_teacher(), "runs/fm/ddpm_ckpt.pth"), None)
    with pytest.raises(NoStudent, match=r"python distill.py --out-dir runs/fm$"):
        sampler_for(other, None, 1)


def test_a_student_of_other_weights_is_never_used():
    teacher = noisy_teacher()
    pipeline = add_student(pipeline_of(teacher), student_state(teacher, "0" * 64))
    assert pipeline.student is None and "other weights" in pipeline.no_student
    with pytest.raises(NoStudent, match="--overwrite"):
        generate(pipeline, 2, steps=1, progress=False)


def test_a_student_of_these_weights_serves_one_two_and_four_evaluations():
    teacher = noisy_teacher()
    pipeline = pipeline_of(teacher)
    pipeline = add_student(pipeline, student_state(teacher, pipeline.weights))
    assert pipeline.student is not None
    for steps in (1, 2, 4):
        assert sampler_for(pipeline, None if steps < 4 else "student", steps) == ("student", steps)
        calls = []
        images, labels = generate(pipeline, 3, sampler="student", steps=steps, progress=False,
                                  callback=lambda t, x, x0: calls.append(t))
        assert images.shape == (3, 1, 28, 28) and images.dtype == torch.uint8
        assert calls == student_timesteps(pipeline.scheduler, steps)       # one evaluation per timestep
    assert sampler_for(pipeline, None, 4) == ("unipc", 4) and sampler_for(pipeline, None, 5) == ("unipc", 5)



def test_a_student_is_read_with_the_alpha_min_it_was_distilled_with():
    teacher = noisy_teacher()
    drawn = {}
    for alpha_min in (0.5, 1.0):          # (smaller ones clip this untrained student to black and white)
        pipeline = pipeline_of(teacher)
        pipeline = add_student(pipeline, student_state(teacher, pipeline.weights, alpha_min))
        drawn[alpha_min], _ = generate(pipeline, 4, steps=1, seed=2, progress=False)
        x_T = torch.randn((4, 1, 28, 28), generator=torch.Generator().manual_seed(2))
        x0 = student_x0(pipeline.scheduler, pipeline.student(x_T, torch.full((4,), 49), torch.arange(4) // 10 % 10,
                                                              torch.full((4,), -1)).detach(), x_T,
                        torch.full((4,), 49), alpha_min)
        expected = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        assert (drawn[alpha_min].int() - expected.int()).abs().max() <= 1     # one grey level for rounding
    assert not torch.equal(drawn[0.5], drawn[1.0])

# ---- the script, end to end ------------------------------------------------------------------------------------
DISTILL_QUICK = ["--max-minutes", "0.4", "--trajectories", "24", "--batch-size", "8", "--precision", "fp32"]


@pytest.fixture(scope="module")
def distilled(good_checkpoint, tmp_path_factory):
    """A run folder of its own (a copy of the tiny checkpoint) with a student distilled from it."""
    folder = tmp_path_factory.mktemp("distilled")
    shutil.copy(good_checkpoint, folder / "ddpm_ckpt.pth")
    result = run_script("distill.py", "--out-dir", folder, *DISTILL_QUICK)
    assert f"wrote {folder / STUDENT_NAME}" in result.stdout and "--steps 1" in result.stdout
    return folder


@pytest.mark.slow
def test_the_student_is_sealed_and_names_its_teachers_weights(distilled):
    state = load_student(str(distilled / STUDENT_NAME))
    assert state["teacher"] == weights_digest(load_checkpoint(str(distilled / "ddpm_ckpt.pth"))["ema"])
    assert state["step"] > 0 and 0 < state["seconds"] < 60
    assert state["distill"]["steps"] == [1, 2, 4]
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(state["step"] - 1, LR))
    damaged = distilled.parent / "damaged"
    damaged.mkdir(exist_ok=True)
    shutil.copy(distilled / "ddpm_ckpt.pth", damaged / "ddpm_ckpt.pth")
    shutil.copy(distilled / STUDENT_NAME, damaged / STUDENT_NAME)
    path = damaged / STUDENT_NAME
    path.write_bytes(flip_a_byte(path.read_bytes(), random.Random(3)))
    with pytest.raises(CheckpointError, match="damaged"):
        load_student(str(damaged / STUDENT_NAME))
    result = run_script("sampling.py", "--ckpt", damaged / "ddpm_ckpt.pth", "--steps", "1", check=False)
    assert result.returncode == 1 and "damaged" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sampling_draws_with_the_student_and_says_so(distilled, tmp_path):
    for steps in ("1", "2"):
        result = run_script("sampling.py", "--ckpt", distilled / "ddpm_ckpt.pth", "--steps", steps,
                            "--num-samples", "10", "--out-dir", tmp_path / steps)
        assert "drawing with the student distilled from these weights" in result.stderr
        assert f"{steps}-step distilled student" in result.stdout and (tmp_path / steps / "x0_0.png").exists()
    pipeline = load_model(str(distilled / "ddpm_ckpt.pth"), "cpu", "fp32")
    a, _ = generate(pipeline, 5, steps=1, seed=3, progress=False)
    b, _ = generate(pipeline, 5, steps=1, seed=3, progress=False)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_without_a_student_sampling_and_evaluate_answer_in_one_sentence(good_checkpoint, data_dir):
    for script in ("sampling.py", "evaluate.py"):
        extra = ["--data-dir", data_dir] if script == "evaluate.py" else []
        result = run_script(script, "--ckpt", good_checkpoint, "--steps", "1", *extra, check=False)
        assert result.returncode == 2, result.stderr
        assert "python distill.py" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 2


@pytest.mark.slow
def test_a_second_run_does_not_overwrite_the_student_without_a_flag(distilled):
    before = (distilled / STUDENT_NAME).read_bytes()
    result = run_script("distill.py", "--out-dir", distilled, *DISTILL_QUICK, check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr and "--resume" in result.stderr
    assert (distilled / STUDENT_NAME).read_bytes() == before
    result = run_script("distill.py", "--out-dir", distilled, "--resume", *DISTILL_QUICK)
    state = load_student(str(distilled / STUDENT_NAME))
    assert state["step"] > 0 and state["seconds"] > 30          # two launches of 0.4 minutes
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_student_of_weights_trained_since_is_refused_on_resume(good_checkpoint, distilled, train_tiny, tmp_path):
    folder = tmp_path / "moved_on"
    folder.mkdir()
    shutil.copy(distilled / STUDENT_NAME, folder / STUDENT_NAME)
    train_tiny(folder, "--epochs", "1", "--seed", "5")          # other weights than the student's teacher
    result = run_script("distill.py", "--out-dir", folder, "--resume", *DISTILL_QUICK, check=False)
    assert result.returncode == 1 and "other weights" in result.stderr and "--overwrite" in result.stderr
    result = run_script("sampling.py", "--ckpt", folder / "ddpm_ckpt.pth", "--steps", "2", check=False)
    assert result.returncode == 2 and "other weights" in result.stderr


@pytest.mark.slow
def test_sigterm_saves_the_student_and_resume_goes_on(good_checkpoint, tmp_path):
    shutil.copy(good_checkpoint, tmp_path / "ddpm_ckpt.pth")
    options = ["--out-dir", tmp_path, "--max-minutes", "5", "--trajectories", "24", "--batch-size", "8",
               "--precision", "fp32"]
    process = subprocess.Popen([sys.executable, "distill.py", *map(str, options)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while ", step " not in seen and process.poll() is None:      # the progress bar: steps are being taken
        seen = seen[-100:] + process.stderr.read(1)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    first = load_student(str(tmp_path / STUDENT_NAME))
    assert first["step"] >= 1
    run_script("distill.py", "--resume", *options[:2], "--max-minutes", "0.4", *options[4:])
    assert load_student(str(tmp_path / STUDENT_NAME))["step"] > first["step"]
    assert os.path.exists(tmp_path / "student.prev.pth")      # the save before the latest is kept


@pytest.mark.slow
def test_export_carries_the_student_and_draws_the_same_images(distilled, tmp_path):
    out = tmp_path / "model.safetensors"
    result = run_script("export.py", "--ckpt", distilled / "ddpm_ckpt.pth", "--out", out)
    assert "with the distilled student" in result.stdout
    a, _ = generate(load_model(str(distilled / "ddpm_ckpt.pth"), "cpu", "fp32"), 4, steps=2, progress=False)
    b, _ = generate(load_model(str(out), "cpu", "fp32"), 4, steps=2, progress=False)
    assert torch.equal(a, b)
    assert read_model(str(out), torch.device("cpu")).distill["file"] == str(out)


@pytest.mark.slow
def test_sigterm_while_the_teacher_draws_leaves_the_folder_as_it_was(good_checkpoint, tmp_path):
    shutil.copy(good_checkpoint, tmp_path / "ddpm_ckpt.pth")
    process = subprocess.Popen([sys.executable, "distill.py", "--out-dir", str(tmp_path), "--trajectories", "100000",
                                "--precision", "fp32"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    seen = ""
    while "eval" not in seen and process.poll() is None:          # the teacher's progress bar
        seen = seen[-100:] + process.stderr.read(1)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert not (tmp_path / STUDENT_NAME).exists()


def test_no_trained_model_no_distillation(tmp_path):
    result = run_script("distill.py", "--out-dir", tmp_path, check=False)
    assert result.returncode == 1 and "python training.py" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / STUDENT_NAME).exists()
