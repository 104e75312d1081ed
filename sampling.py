"""Sample from a trained DDPM: algorithm 2 of Ho et al. (2020), or one of the faster samplers of samplers.py (DDIM,
DPM-Solver++, UniPC, Restart, fitted timesteps).

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
import dataclasses
import math
import os
import time

import torch
from tqdm import tqdm

from checkpoint import (
    CheckpointError,
    checked_fit,
    is_safetensors,
    read_student,
    read_weights,
    student_path,
    weights_digest,
)
from cli import add_device_options, fail, first_line, int_list, logger, positive_int, show_log
from dataset import to_uint8
from hardware import LAYOUT_NAMES, autocast, choose_speed, compile_for_sampling, memory_format, pick_device
from noise_scheduler import NoiseScheduler, make_scheduler
from run_folder import DEFAULT_CKPT, DEFAULT_OUT_DIR
from samplers import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    SAMPLERS,
    STEPS_SAMPLER,
    STUDENT_ONLY_BELOW,
    network_eps,
    sampler_label,
    sampler_timesteps,
    walk,
    walk_of,
)
from unet import UNet
from visualize import grid_frame, save_gif, save_grid

log = logger(__name__)
MODEL_KEYS = ("in_channels", "image_size", "base_channels", "channel_mults", "num_res_blocks",
              "attention_resolutions", "dropout", "num_heads", "num_classes")


def model_config(config):
    """The UNet's constructor arguments, taken from a run's configuration."""
    return {k: config[k] for k in MODEL_KEYS}


@torch.no_grad()
def sample(model, scheduler, num_samples, *, device, precision="fp32", generator=None, sampler="ddpm", steps=None,
           labels=None, guidance_scale=1.0, noise=None, callback=None, progress=True, timesteps=None, **faster):
    """Run the reverse process from x_T ~ N(0, I) and return x_0 in [-1, 1], float32 (B, C, H, W).

    sampler "ddpm": the paper's ancestral sampler over all T steps (algorithm 2).  Any other (samplers.SAMPLERS)
    walks `timesteps`, by default the `steps` network evaluations of samplers.sampler_timesteps, with its own update
    (samplers.walk, which takes the options in `faster`: eta, analytic_first_step, first_eps).  labels (B,) draw a
    conditional model's classes, with classifier-free guidance of scale `guidance_scale` (samplers.predict_noise).
    callback(t, x_t, x0_pred) is called after every network evaluation, with tensors of torch.inference_mode (the
    walk runs in it, 5 to 10% faster than under no_grad on a 2-core CPU): to change one in place later, clone it.
    """
    shape = (num_samples, model.in_channels, model.image_size, model.image_size)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else device)
    x = noise.to(device, torch.float32)                                        # x_T ~ N(0, I)  (line 1)
    if labels is not None:
        labels = labels.to(device)
    if sampler == "ddpm" and (timesteps is not None or faster.get("eta") or faster.get("analytic_first_step")):
        raise ValueError("the DDPM walks all T timesteps with the paper's step: timesteps, eta and the analytic first "
                         "step are for the faster samplers")
    with torch.inference_mode(), autocast(device, precision):      # (the returned x_0 is an ordinary tensor)
        if sampler != "ddpm":
            if timesteps is None:
                timesteps = sampler_timesteps(scheduler, sampler, steps)
            x = walk(model, scheduler, x, sampler, timesteps, generator=generator, labels=labels,
                     guidance_scale=guidance_scale, callback=callback, progress=progress, **faster)
        else:
            for t in tqdm(scheduler.timesteps(), desc="ddpm sampling", leave=False, disable=not progress):  # (line 2)
                tt = torch.full((num_samples,), t, dtype=torch.long, device=device)
                eps = network_eps(model, scheduler, x, tt, labels, guidance_scale)   # epsilon_theta(x_t, t)
                x, x0 = scheduler.step(eps, t, x, generator=generator)              # lines 3-4
                if callback is not None:
                    callback(t, x, x0)
    return x.clamp(-1, 1)                                                      # line 6: return x_0


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
    student: torch.nn.Module = None     # the student distilled from these weights (distill.py), if there is one
    distill: dict = None                # how it was distilled (its file's "distill"), with "file", where it was read
    no_student: str = None              # else why not: one sentence, what NoStudent says


class NoStudent(ValueError):
    """One or two network evaluations were asked of a model that has no student distilled from its weights."""


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
    pipeline = Pipeline(model, scheduler, device, "fp32", config, checked_fit(stored, digest, path), path, digest)
    return add_student(pipeline, read_student(path))


def add_student(pipeline, state):
    """The pipeline with the student of `state` (checkpoint.read_student) if it was distilled from the pipeline's
    weights; otherwise pipeline.no_student says why there is none, and names the command that makes one."""
    path = pipeline.source
    where = path if state is not None and is_safetensors(path) else student_path(path)
    if state is None:
        pipeline.no_student = (f"{path} has no student for one or two network evaluations; distil one with: "
                               f"{distill_command(path)}")
    elif state["teacher"] != pipeline.weights:
        pipeline.no_student = (f"the student in {where} was distilled from other weights than those in {path}, so it "
                               f"is not used; distil again with: {distill_command(path, '--overwrite ')}")
    else:
        try:
            student = UNet(**model_config(state["config"] if "config" in state else pipeline.config), jump=True)
            student.load_state_dict(state["student"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"the student in {where} does not fit its model ({first_line(e)})") from None
        pipeline.student = student.to(pipeline.device, memory_format=memory_format(pipeline.device)).eval()
        pipeline.distill = {**state["distill"], "file": where}
    return pipeline


def distill_command(path, flags=""):
    """The command that distils a student for the weights in `path`: distill.py on its run folder, or, for a file
    export.py made, on the run folder it came from, followed by exporting it again."""
    if is_safetensors(path):
        return (f"python distill.py {flags}--out-dir RUN_FOLDER on the run folder it came from, "
                "then python export.py again")
    folder = os.path.dirname(path) or "."
    same = os.path.abspath(folder) == os.path.abspath(DEFAULT_OUT_DIR)
    return (f"python distill.py {flags}" + ("" if same else f"--out-dir {folder}")).rstrip()


def choose_precision(pipeline, precision="auto", batch_size=100):
    """Run the pipeline in the fastest way for sampling: --precision auto times the model in each precision and
    layout (hardware.choose_speed); the layout goes on the model, the precision on the pipeline, and the
    choice is printed on stderr.  Returns the pipeline."""
    precision, layout, note = choose_speed(pipeline.model, pipeline.device, precision, training=False,
                                           batch_size=batch_size)
    pipeline.model.to(memory_format=layout)
    if pipeline.student is not None:
        pipeline.student.to(memory_format=layout)
    pipeline.precision = precision
    log.info(f"sampling on {pipeline.device.type} in {precision}, {LAYOUT_NAMES[layout]} ({note})")
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
    sampler, steps = sampler_for(pipeline, sampler, steps)
    if sampler == "student":
        model, guidance_scale = pipeline.student, pipeline.distill["guidance_scale"]
    timesteps, afs = walk_of(pipeline, sampler, steps, progress)          # the samplers' room, once
    faster = {} if sampler == "ddpm" else dict(timesteps=timesteps, eta=eta, analytic_first_step=afs)
    if sampler == "student":
        faster["alpha_min"] = pipeline.distill["alpha_min"]           # as it was distilled (samplers.student_x0)
    generator = torch.Generator(device=device).manual_seed(seed)
    images, requested = [], []
    with tqdm(total=len(timesteps) * math.ceil(num_samples / batch_size), desc=f"{sampler} sampling", unit="step",
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
                       sampler=sampler, labels=labels, guidance_scale=guidance_scale, callback=after_step,
                       progress=False, **faster)
            images.append(to_uint8(x).cpu())
            requested.append(labels)
    return torch.cat(images), (torch.cat(requested) if num_classes else None)


def sampler_for(pipeline, sampler, steps):
    """(sampler, steps) that generate() draws with: `steps` alone asks for the student below STUDENT_ONLY_BELOW
    evaluations (one and two), else for STEPS_SAMPLER; nothing at all for the paper's DDPM.  NoStudent for one or two
    evaluations, or --sampler student, without a student of these weights."""
    alone = sampler is None and steps is not None
    if alone:
        sampler = "student" if pipeline.student is not None and steps < STUDENT_ONLY_BELOW else STEPS_SAMPLER
    sampler = sampler or "ddpm"
    if pipeline.student is None and (sampler == "student" or alone and steps < STUDENT_ONLY_BELOW):
        raise NoStudent(pipeline.no_student or "this model has no student for one or two network evaluations; "
                                               "distil one with: python distill.py")
    if sampler != "ddpm" and steps is None:
        steps = DEFAULT_STEPS[sampler]
    return sampler, steps


# ---- what --save-every and --gif record ---------------------------------------------------------------------
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
    sampler: no option at all asks for the paper's DDPM, --sampler alone for its DEFAULT_STEPS.  --steps alone
    leaves args.sampler None, for sampler_for to choose once the model is read (the student, where it has one)."""
    if args.sampler is None and not args.steps:
        args.sampler = "ddpm"
    if args.sampler not in (None, "ddpm") and args.steps is None:
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
    show_log()
    args, parser = parse_args(argv)
    try:
        pipeline = read_model(args.ckpt, args.device)
    except CheckpointError as e:
        fail(e)
    T, num_classes = pipeline.scheduler.num_timesteps, pipeline.model.num_classes
    if args.sampler != "ddpm" and max(args.steps) > T:
        parser.error(f"--steps {max(args.steps)} is more than the {T} timesteps the model was trained with")
    try:
        runs = [("ddpm", None)] if args.sampler == "ddpm" else [sampler_for(pipeline, args.sampler, s)
                                                               for s in args.steps]
    except NoStudent as e:
        fail(e, code=2)
    for sampler, steps in runs:
        if sampler != "ddpm":
            check_walk(pipeline.scheduler, sampler, steps, parser)
    if any(sampler == "student" for sampler, _ in runs):
        log.info(f"drawing with the student distilled from these weights ({pipeline.distill['file']}, "
                 f"{pipeline.distill['minutes']:.1f} minutes of distillation)")
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
