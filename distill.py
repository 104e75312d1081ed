"""Distil a trained model into a student that draws images in one, two or four network evaluations.

    python distill.py                          # default/ddpm_ckpt.pth -> default/student.pth, in at most 8 minutes
    python sampling.py --steps 1               # then one network evaluation per image (--steps 2; --sampler student
                                               # --steps 4 for four)
    python distill.py --resume --max-minutes 5 # five minutes more on the same student
    python distill.py --out-dir runs/fm        # the model of another run folder

The method follows Simple and Fast Distillation (Zhou et al., 2024): the student starts as a copy of the teacher (its
EMA weights) and is fine-tuned only on the steps it will take.  It is the teacher's U-Net with one more input, the
timestep s that its step lands on (unet.UNet(jump=True), zero at first), so that one student serves 1, 2 and 4
evaluations (samplers.student_timesteps: evenly in t, nested).
1. The teacher draws trajectories for TEACHER_SHARE of the minutes: from x_T ~ N(0, I) and a class, DPM-Solver++(2M)
   in TEACHER_STEPS evaluations (Lu et al., 2022b), and keeps x_t at every timestep of the student's walks and x_0 at
   the end.
2. The student's step from x_t to s is DDIM's with its own x_0 (samplers.student_step, Song et al., 2021, eq. 12):
        x_s = alpha_s x_0 + sigma_s (x_t - alpha_t x_0) / sigma_t.
   The x_0 that lands on the teacher's x_s is that equation solved for x_0,
        x_0* = (x_s - sigma_s / sigma_t x_t) / (alpha_s - sigma_s alpha_t / sigma_t)
   and the loss is |x_0 - x_0*|^2 (samplers.student_x0 reads x_0 from the output): every jump weighs alike, in the
   image's own units.
The student keeps the SHA-256 of the teacher weights it was distilled from (checkpoint.STUDENT_FORMAT), and sampling
uses it with no other weights.  Ctrl-C or SIGTERM saves and stops; the student is also saved every SAVE_EVERY
seconds, so a killed run loses at most that (--resume goes on).
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from checkpoint import (
    STUDENT_FORMAT,
    CheckpointError,
    load_student,
    rng_state,
    save_checkpoint,
    set_rng_state,
    student_path,
)
from cli import add_device_options, fail, logger, positive_float, positive_int, show_log
from hardware import LAYOUT_NAMES, StopRequest, autocast, choose_speed, pick_device
from run_folder import CKPT_NAME, DEFAULT_OUT_DIR, claim_run_folder, lock_run_folder
from samplers import DEFAULT_GUIDANCE, STUDENT_ALPHA_MIN, STUDENT_STEPS, network_eps, student_timesteps, student_x0
from sampling import choose_precision, model_config, read_model
from solvers import dpm_solver_step, spaced_timesteps
from unet import UNet

log = logger(__name__)
DEFAULT_MINUTES = 8.0       # the whole run, the teacher's trajectories included
TEACHER_STEPS = 24          # evaluations of the teacher's walk, besides the student's timesteps it must stop at
# The jumps per optimizer step and Adam's rate: of (128, 2e-4), (64, 5e-4) and (32, 1e-3), the last scored best at 1,
# 2 and 4 evaluations on real MNIST digits (docs/experiments.md, Distillation: one, two and four evaluations).
BATCH_SIZE = 32
LR = 1e-3
# Adam's first steps move every weight by about the full rate whatever its gradient: at 1e-3 from the start, the first
# step threw a student of the 30-minute MNIST model from a loss of 0.15 to 65 (docs/experiments.md, Distillation).
WARMUP_STEPS = 50           # the rate rises linearly over these optimizer steps, as training's --warmup-steps
# The teacher draws trajectories, TEACHER_BATCH at a time, for this share of --max-minutes (unless --trajectories N
# says how many).  From 512 trajectories the student learnt those by heart: 2,048 (29% of 8 minutes) took its FID at
# one evaluation from 189 to 50-54, and 4,096 (55%, a third fewer updates) scored 1.06 to 1.08 times 2,048's at one
# evaluation, 0.86 to 0.89 at two and 0.68 to 0.75 at four (docs/experiments.md, Distillation).  A share, not a
# number, so that a slower machine keeps minutes to learn in.
TEACHER_SHARE = 0.55
TEACHER_BATCH = 256
SAVE_EVERY = 60.0           # seconds between saves


# ---- what the student learns -------------------------------------------------------------------------------
def learning_rate(step, lr):
    """Adam's rate at optimizer step `step` (0-based): a linear warm-up over WARMUP_STEPS, then `lr`."""
    return lr * min(1.0, (step + 1) / WARMUP_STEPS)


def student_jumps(scheduler, step_counts=STUDENT_STEPS):
    """Every jump (t, s) that a walk of the student takes, s = -1 for the clean image: for T = 1000 and 1, 2, 4
    steps, (999, -1), (999, 499), (499, -1), (999, 749), (749, 499), (499, 249), (249, -1)."""
    jumps = set()
    for steps in step_counts:
        walk = student_timesteps(scheduler, steps) + [-1]
        jumps.update(zip(walk, walk[1:]))
    return sorted(jumps, reverse=True)


def alpha_sigma_of(scheduler, t):
    """alpha_t and sigma_t for a (B,) tensor of timesteps, shaped (B, 1, 1, 1); t = -1: 1 and 0 (the clean image)."""
    clean = t < 0
    alpha = torch.where(clean, 1.0, scheduler.sqrt_alphas_cumprod[t.clamp(min=0)])
    sigma = torch.where(clean, 0.0, scheduler.sqrt_one_minus_alphas_cumprod[t.clamp(min=0)])
    return alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)


def jump_target(scheduler, x_t, t, x_s, s):
    """x_0*, the x_0 whose DDIM step from x_t at t lands on x_s at s (the module's docstring, step 2)."""
    alpha_t, sigma_t = alpha_sigma_of(scheduler, t)
    alpha_s, sigma_s = alpha_sigma_of(scheduler, s)
    return (x_s - sigma_s / sigma_t * x_t) / (alpha_s - sigma_s * alpha_t / sigma_t)


@torch.inference_mode()
def teacher_trajectories(pipeline, n, keep, generator, batch_size=TEACHER_BATCH, progress=None, until=None):
    """Trajectories of the teacher from x_T ~ N(0, I): ({t: x_t (m, C, H, W)} for t in `keep` and -1 (x_0), the
    classes (m,) or None).  DPM-Solver++(2M) over TEACHER_STEPS timesteps evenly in log-SNR, and every one of `keep`.
    m = n; with n None, as many as it begins, batch_size at a time, before time.perf_counter() passes `until` (the
    same seed draws the same first ones, so asking for that many again gives the same trajectories)."""
    model, scheduler, device = pipeline.model, pipeline.scheduler, pipeline.device
    walk = sorted(set(spaced_timesteps(scheduler, TEACHER_STEPS, "logsnr")) | set(keep), reverse=True)
    shape = (model.in_channels, model.image_size, model.image_size)
    kept = {t: [] for t in [*keep, -1]}
    classes = []
    drawn = 0
    while (drawn < n) if n is not None else (drawn == 0 or time.perf_counter() < until):
        b = batch_size if n is None else min(batch_size, n - drawn)
        drawn += b
        x = torch.randn((b, *shape), generator=generator).to(device)
        labels = torch.randint(model.num_classes, (b,), generator=generator).to(device) if model.num_classes else None
        previous = None
        with autocast(device, pipeline.precision):
            for i, t in enumerate(walk):
                if t in kept:
                    kept[t].append(x.float().cpu())
                t_prev = walk[i + 1] if i + 1 < len(walk) else -1
                eps = network_eps(model, scheduler, x, torch.full((b,), t, device=device), labels)
                x, x0 = dpm_solver_step(scheduler, eps, t, t_prev, x, previous)
                previous = (t, x0)
                if progress is not None:
                    progress()
        kept[-1].append(x.float().cpu())
        classes.append(labels.cpu() if labels is not None else None)
    return {t: torch.cat(xs) for t, xs in kept.items()}, (torch.cat(classes) if model.num_classes else None)


def distil_loss(student, scheduler, trajectories, classes, jumps, index, jump_index, precision, alpha_min):
    """The mean |x_0 - x_0*|^2 over a batch: trajectory index[i] at the jump jumps[jump_index[i]]."""
    device = scheduler.device
    t = torch.tensor([jumps[j][0] for j in jump_index.tolist()], device=device)
    s = torch.tensor([jumps[j][1] for j in jump_index.tolist()], device=device)
    x_t = torch.stack([trajectories[jumps[j][0]][i] for i, j in zip(index.tolist(), jump_index.tolist())]).to(device)
    x_s = torch.stack([trajectories[jumps[j][1]][i] for i, j in zip(index.tolist(), jump_index.tolist())]).to(device)
    labels = classes[index].to(device) if classes is not None else None
    with autocast(device, precision):
        output = student(scheduler.model_input(x_t, t), t, labels, s)
    x0 = student_x0(scheduler, output.float(), x_t, t, alpha_min)
    return (x0 - jump_target(scheduler, x_t, t, x_s, s)).square().mean()


# ---- the script ----------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description="Distil a trained model into a student for 1, 2 and 4 network "
                                            "evaluations (sampling.py --steps 1).")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"the run folder: its {CKPT_NAME} is the teacher, and "
                   f"the student goes beside it (default {DEFAULT_OUT_DIR})")
    p.add_argument("--max-minutes", type=positive_float, default=DEFAULT_MINUTES,
                   help=f"the whole run, the teacher's trajectories included (default {DEFAULT_MINUTES:g})")
    p.add_argument("--resume", action="store_true", help="go on distilling the student in the run folder")
    p.add_argument("--overwrite", action="store_true", help="replace the student in the run folder")
    p.add_argument("--trajectories", type=positive_int,
                   help=f"the teacher's trajectories to learn from (default: as many as it draws in "
                        f"{TEACHER_SHARE:.0%} of --max-minutes; --resume: as many as before)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                   help=f"jumps per optimizer step (default {BATCH_SIZE})")
    p.add_argument("--lr", type=positive_float, default=LR, help=f"Adam's learning rate (default {LR:g})")
    p.add_argument("--seed", type=int, default=0, help="random seed of the trajectories and the batches (default 0)")
    add_device_options(p, "auto: the faster of bf16 and fp32 on this device, timed at start-up")
    return p


def start(args, parser):
    """(teacher pipeline, student, optimizer, state of the file to go on from or None), or exit with one sentence:
    no teacher, a student in the way (without --resume or --overwrite), a student of other weights to resume."""
    ckpt, path = os.path.join(args.out_dir, CKPT_NAME), student_path(os.path.join(args.out_dir, CKPT_NAME))
    if args.resume and args.overwrite:
        parser.error("--resume goes on with the student and --overwrite replaces it: pass one of them")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if not os.path.isfile(ckpt):
        fail(f"there is no trained model at {ckpt} to distil; train one first with: python training.py"
             + ("" if args.out_dir == DEFAULT_OUT_DIR else f" --out-dir {args.out_dir}"))
    lock_run_folder(args.out_dir)
    try:
        teacher = read_model(ckpt, device)
        state = load_student(path) if args.resume and os.path.exists(path) else None
    except CheckpointError as e:
        fail(e)
    if args.resume and state is None:
        fail(f"there is no student at {path} to resume; start one with: python distill.py"
             + ("" if args.out_dir == DEFAULT_OUT_DIR else f" --out-dir {args.out_dir}"))
    if os.path.exists(path) and not (args.resume or args.overwrite):
        fail(f"{path} exists; pass --resume to go on distilling it or --overwrite to replace it", code=2)
    if state is not None and state["teacher"] != teacher.weights:
        fail(f"the student in {path} was distilled from other weights than those in {ckpt} (training went on since); "
             f"start again with --overwrite")
    claim_run_folder()
    choose_precision(teacher)
    student = UNet(**model_config(teacher.config), jump=True).to(device)
    missing = student.load_state_dict(teacher.model.state_dict() if state is None else state["student"], strict=False)
    assert state is not None or all(k.startswith("jump_embedding.") for k in missing.missing_keys)
    precision, layout, note = choose_speed(student, device, args.precision, training=True,
                                           batch_size=args.batch_size)
    student.to(memory_format=layout).train()
    log.info(f"distilling on {device.type} in {precision}, {LAYOUT_NAMES[layout]} ({note})")
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    return teacher, student, optimizer, precision, state


def save(path, teacher, student, optimizer, step, seconds, generator, how):
    """The student and all it needs to go on (checkpoint.STUDENT_FORMAT), sealed and written atomically; `how` it was
    distilled goes into its "distill" entry, which sampling reads its alpha_min and guidance scale from."""
    save_checkpoint({
        "format": STUDENT_FORMAT, "config": teacher.config, "student": student.state_dict(), "teacher": teacher.weights,
        "distill": {**how, "minutes": seconds / 60}, "optimizer": optimizer.state_dict(), "step": step,
        "seconds": seconds, "rng": rng_state(generator)}, path)


def main(argv=None):
    show_log()
    parser = build_parser()
    args = parser.parse_args(argv)
    began = time.perf_counter()
    budget = args.max_minutes * 60
    stop = StopRequest()
    teacher, student, optimizer, precision, state = start(args, parser)
    path = student_path(os.path.join(args.out_dir, CKPT_NAME))
    scheduler = teacher.scheduler
    jumps = student_jumps(scheduler)
    keep = sorted({t for t, _ in jumps}, reverse=True)
    # The same seed draws the same trajectories, so a resumed run learns from those it learnt from before.
    generator = torch.Generator().manual_seed(args.seed)
    # A resumed run draws as many as before; --trajectories N draws N; else the teacher draws for TEACHER_SHARE.
    n = state["distill"]["trajectories"] if state is not None else args.trajectories
    until = began + TEACHER_SHARE * budget if n is None else None
    evaluations = len(set(spaced_timesteps(scheduler, TEACHER_STEPS, "logsnr")) | set(keep))
    def progress():
        bar.update()
        if stop.signum is not None:             # nothing to save yet: a student file there stays as it was
            raise SystemExit(stop.exit_code())

    with tqdm(total=None if n is None else len(range(0, n, TEACHER_BATCH)) * evaluations, desc="teacher's trajectories",
              unit="eval", leave=False) as bar:
        trajectories, classes = teacher_trajectories(teacher, n, keep, generator, progress=progress, until=until)
    n = len(trajectories[-1])
    # A resumed student goes on reading its x_0 as it was distilled to (samplers.student_x0).
    alpha_min = state["distill"]["alpha_min"] if state is not None else STUDENT_ALPHA_MIN
    how = {"steps": list(STUDENT_STEPS), "alpha_min": alpha_min, "guidance_scale": DEFAULT_GUIDANCE,
           "teacher_steps": TEACHER_STEPS, "trajectories": n, "batch_size": args.batch_size, "lr": args.lr,
           "warmup_steps": WARMUP_STEPS, "seed": args.seed}
    log.info(f"the teacher drew {n} trajectories in {time.perf_counter() - began:.0f} s")
    teacher.model = None                                # (its weights' digest stays, for the student's file)
    step, seconds_before = (state["step"], state["seconds"]) if state is not None else (0, 0.0)
    if state is not None:
        set_rng_state(state["rng"], generator)
    launch_seconds = time.perf_counter() - began
    last_save = time.perf_counter()
    with tqdm(total=round(budget), initial=min(round(launch_seconds), round(budget)), desc="distilling", unit="s",
              leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}") as bar:
        while launch_seconds < budget and stop.signum is None:
            index = torch.randint(n, (args.batch_size,), generator=generator)
            jump_index = torch.randint(len(jumps), (args.batch_size,), generator=generator)
            loss = distil_loss(student, scheduler, trajectories, classes, jumps, index, jump_index, precision,
                               alpha_min)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args.lr)
            optimizer.step()
            step += 1
            launch_seconds = time.perf_counter() - began
            bar.set_postfix_str(f"step {step}, loss {loss.item():.4f}", refresh=False)
            bar.update(min(round(launch_seconds), round(budget)) - bar.n)
            if time.perf_counter() - last_save >= SAVE_EVERY:
                save(path, teacher, student, optimizer, step, seconds_before + launch_seconds, generator, how)
                last_save = time.perf_counter()
    if state is None and step == 0 and stop.signum is None:
        fail(f"--max-minutes {args.max_minutes:g} ran out while the teacher drew its trajectories, before the student "
             f"took a step; give it more minutes (nothing was written)")
    try:
        save(path, teacher, student, optimizer, step, seconds_before + time.perf_counter() - began, generator, how)
    except CheckpointError as e:
        fail(e)
    stop.ignore_further()
    minutes = (time.perf_counter() - began) / 60
    where = "" if args.out_dir == DEFAULT_OUT_DIR else f" --ckpt {os.path.join(args.out_dir, CKPT_NAME)}"
    print(f"distilled {step} steps in {minutes:.1f} minutes: wrote {path}; sample with python sampling.py{where} "
          f"--steps 1 (or --steps 2, or --sampler student --steps 4)")
    if stop.signum is not None:
        raise SystemExit(stop.exit_code())


if __name__ == "__main__":
    main()
