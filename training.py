"""Train a DDPM: algorithm 1 of Ho et al. (2020).

    python training.py                       # MNIST, 20 epochs, checkpoint in default/ddpm_ckpt.pth
    python training.py --max-minutes 30      # the CPU recipe: 30 minutes, however many epochs that is
    python training.py --resume              # continue that run exactly where it stopped
    python training.py --dataset fashion-mnist --epochs 5
    torchrun --standalone --nproc_per_node=2 training.py    # data-parallel on 2 processes (gloo on CPU, nccl on CUDA)

Every epoch writes the checkpoint (atomically) and a row of <out-dir>/loss_log.csv; every 50 steps add a
row to <out-dir>/loss_steps.csv; the first and last epochs, and others as time allows, leave a grid of
samples from the EMA weights in <out-dir>/samples/epoch_NNN.png.  Ctrl-C or SIGTERM finishes the current
step, saves the position inside the epoch and exits (130 / 143); --resume continues from there with the
same result, bit for bit on the CPU, as a run that was never stopped.  The checkpoint is also saved
mid-epoch every --save-every-minutes (5), so a SIGKILL or a power cut loses at most that much training.
A run holds a lock on <out-dir>/.lock for its whole life: a second run on the same folder is refused.
Under torchrun --max-restarts, a restarted attempt resumes the checkpoint its own launch saved, and a process
that stops answering makes the others fail after --dist-timeout, so that torchrun restarts them.

Reading order: algorithm 1's pieces (diffusion_loss, learning_rate, ema_update), then the run that repeats them
(RunState; Run, its set-up; Trainer, its loop; main), then its options, its plan and its sample grids.  The machinery
is called by its module: hardware.py (processes, signals, speed probe), run_folder.py (the folder, lock, logs).
"""
import copy
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import hardware
import run_folder
from checkpoint import CHECKPOINT_FORMAT, rng_state, set_rng_state
from cli import fail, show_log
from dataset import NATURAL_IMAGES, DataError, epoch_batches, load_dataset, random_hflip, to_model_range
from evaluate import fid_of, reference_data
from fid import EvalError
from noise_scheduler import make_scheduler
from samplers import DEFAULT_GUIDANCE, FID_SAMPLER
from sampling import Pipeline, generate, model_config
from training_options import options_parser, resolve_config
from unet import UNet
from visualize import save_grid

# The one source of truth for defaults.  Everything here is saved in the checkpoint.
# Batch 64: on real MNIST a step of 64 taught about what 128 did, in half the time (docs/experiments.md, Batch 64);
# lr 2e-3 beat 1e-3 after 15 minutes on real MNIST and Fashion-MNIST (docs/experiments.md, Learning rate 2e-3).
# min_snr_gamma is 20, not Hang et al.'s 5: the few-step samplers gained with either, but with 5 the 1000-step DDPM
# came out 29% worse on Fashion-MNIST, with 20 within 7% of the paper's objective (docs/experiments.md, Min-SNR-20).
DEFAULTS = dict(
    dataset="mnist", epochs=20, batch_size=64, lr=2e-3, warmup_steps=50, seed=0,
    image_size=None, base_channels=32, channel_mults=None, num_res_blocks=1, dropout=0.0,
    schedule="linear", num_timesteps=1000, ema_decay=0.9995, lr_schedule="constant", loss="min-snr", min_snr_gamma=20.0,
    timestep_sampling="uniform", prediction="eps", conditional=None, label_dropout=0.1, preview_samples=100,
    preview_steps=20, adam_beta2=0.999,
)
# conditional None: class-conditional when the training images have labels (MNIST, Fashion-MNIST, CIFAR-10, a folder
# of class sub-folders), the paper's unconditional model otherwise (docs/experiments.md, Class labels, measures both).
# What a checkpoint written before these options existed was trained with.
LEGACY_CONFIG = dict(lr_schedule="constant", loss="plain", min_snr_gamma=5.0, prediction="eps",
                     timestep_sampling="uniform", adam_beta2=0.999, conditional=False)
# Options that define the run: on --resume they must agree with the checkpoint.
RUN_KEYS = ("dataset", "image_size", "batch_size", "lr", "warmup_steps", "seed", "base_channels", "channel_mults",
            "num_res_blocks", "dropout", "schedule", "num_timesteps", "ema_decay", "conditional", "label_dropout",
            "lr_schedule", "loss", "min_snr_gamma", "prediction", "timestep_sampling", "adam_beta2")
PREVIEW_SHARE = 30           # an epoch's sample grid waits until training has taken 30x the time the last grid took
STEP_LOG_EVERY = 50          # loss_steps.csv gets the mean loss of every 50 steps: a curve even for short runs
# One save of the default model's checkpoint (18 MB, with the fsyncs) took 0.08 s (median of 20, at most 0.12 s) on a
# 2-core AMD EPYC (docs/experiments.md, Speed and memory): every 5 minutes is 0.03% of the run; SIGKILL loses 5 at most.
SAVE_EVERY_MINUTES = 5.0
# --fid-every: FID of FID_SAMPLES images drawn by samplers.FID_SAMPLER from the EMA weights in fp32 with seed FID_SEED,
# against the test split, with the self-trained classifier's features: what `evaluate.py --sampler restart --steps
# 20 --precision fp32 --features classifier` prints for the checkpoint.  Its time is not training time (the deadline
# of --max-minutes moves on by it), but it lengthens the run and needs a test split: off by default
# (docs/experiments.md, FID during training, has its cost).
FID_SAMPLES, FID_SEED = 1000, 0


# ---- algorithm 1 ------------------------------------------------------------------------------------------
def diffusion_loss(net, scheduler, x0, labels=None, *, generator=None, precision="fp32", label_dropout=0.0,
                   null_label=None, min_snr_gamma=None, t_probs=None, stratified=False):
    """Algorithm 1, lines 3-5, for a batch x_0: the simple objective
        || eps - eps_theta(sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, t) ||^2,
    or the same with the network predicting v or x_0 instead of eps (scheduler.target); or, with min_snr_gamma,
    each sample's term weighted so that it equals min(SNR(t), gamma) || x_0 - x_0-hat ||^2, where
    SNR(t) = alpha-bar_t / (1 - alpha-bar_t) (Min-SNR-gamma, Hang et al., 2023, eq. 4; for eps that weight is
    min(SNR, gamma) / SNR, section 3.4): the nearly noise-free timesteps, whose noise is hard to see and whose
    images hardly need denoising, stop dominating the gradient.  gamma = inf is the simple objective for eps.
    A conditional model's labels are replaced by the "no label" token `null_label` with probability
    `label_dropout`, so that one network learns both halves of classifier-free guidance.  t_probs: t drawn from
    this distribution over the timesteps instead of uniformly (NoiseScheduler.timestep_probs, --timestep-sampling);
    stratified: uniform t spread evenly over the batch (NoiseScheduler.sample_timesteps, --timestep-sampling)."""
    device = x0.device
    t = scheduler.sample_timesteps(len(x0), generator, device, t_probs, stratified)   # t ~ U{0..T-1}  (line 3, 0-based)
    noise = torch.randn(x0.shape, generator=generator, device=device)       # eps ~ N(0, I)    (line 4)
    x_t = scheduler.add_noise(x0, noise, t)
    if labels is not None:
        drop = torch.rand(len(x0), generator=generator, device=device) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    with hardware.autocast(device, precision):
        output = net(scheduler.model_input(x_t, t), t, labels)                # (c_in x_t for edm)
    target = scheduler.target(x0, noise, t)
    if min_snr_gamma is None:
        return F.mse_loss(output.float(), target)                           # (line 5)
    weight = scheduler.snr[t].clamp(max=min_snr_gamma) / scheduler.x0_loss_weight(t)    # (B,)
    return (weight * (output.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()


def loss_gamma(config):
    """The min_snr_gamma that diffusion_loss takes for a run's configuration: --min-snr-gamma for --loss min-snr,
    None (the paper's objective) for --loss plain."""
    return config["min_snr_gamma"] if config["loss"] == "min-snr" else None


def learning_rate(config, step, total_steps):
    """The rate of optimizer step number `step` (0-based) of a run of `total_steps` steps: a linear warm-up
    over --warmup-steps, then either constant or, for --lr-schedule linear, a straight line down to zero at
    the run's last step (budget-aware linear decay, Li et al., 2020, "Budgeted training")."""
    rate = config["lr"] * min(1.0, (step + 1) / max(1, config["warmup_steps"]))
    if config["lr_schedule"] == "linear":
        last = total_steps - 1
        rate = min(rate, config["lr"] * max(0.0, last - step) / max(1, last - config["warmup_steps"]))
    return rate


@torch.no_grad()
def ema_update(ema, model, step, max_decay):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, with decay warming up as (1 + n) / (10 + n),
    so a short run's EMA follows its recent weights and a long run's averages over ~1 / (1 - max_decay) steps."""
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


# ---- the run ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunState:
    """Where a run is: the counters that change as it trains.  The checkpoint holds them under these names
    (checkpoint.py), and a resumed run takes them back, so it goes on exactly where it stopped."""
    epoch: int = 0              # the epoch in progress, 0-based
    batch_in_epoch: int = 0     # batches of it done
    step: int = 0               # optimizer steps taken
    loss_sum: float = 0.0       # the running loss of the epoch in progress
    loss_count: int = 0
    window_sum: float = 0.0     # the running loss of loss_steps.csv's row in progress
    window_count: int = 0
    fid_seconds: float = 0.0    # --fid-every: seconds of training since the last FID measurement (or the start)
    launch_seconds: float = 0.0  # seconds this launch has trained, over its torchrun restarts: --max-minutes' budget

    def to_checkpoint(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt):
        """(A checkpoint written before the running losses were saved starts them at zero.)"""
        return cls(**{field.name: ckpt.get(field.name, field.default) for field in dataclasses.fields(cls)})


class Stop(Exception):
    """Leaves the training loop after a step, mid-epoch: a signal (Ctrl-C, SIGTERM) came, or --max-minutes ran out."""

    def __init__(self, by_signal):
        super().__init__("stopped by a signal" if by_signal else "out of time")
        self.by_signal = by_signal


class Run:
    """A training run, set up in the phases that main() calls first: __init__, load_data, build, restore, start.
    What it is made of is set once; the counters that change as it trains are self.state, which save() writes into
    the checkpoint and restore() takes back."""

    def __init__(self, args, parser):
        """Set up the run: the processes and the device, the output folder (checked and locked), the checkpoint
        to continue on --resume or on a torchrun restart, and the run's configuration (checked against that
        checkpoint).  A refused run changes no file in the folder."""
        if args.resume and args.overwrite:
            parser.error("--resume and --overwrite exclude each other")
        try:
            self.rank, self.world, self.device = hardware.setup_distributed(args.device, args.dist_timeout)
        except ValueError as e:
            parser.error(str(e))
        self.args, self.parser, self.master = args, parser, self.rank == 0
        self.ckpt_path = run_folder.take_run_folder(args.out_dir, args.resume, self.master)   # one run per folder
        # The other processes wait for rank 0 to hold the folder, and take its launch id.
        self.launch = hardware.from_rank_0([hardware.launch_id()], self.world)[0]
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))    # torchrun's attempt: 0, 1, ...
        self.ckpt, self.restarted = run_folder.checkpoint_to_continue(self.ckpt_path, args.resume, args.overwrite,
                                                                       self.restart, self.launch)
        self.config = resolve_config(args, parser, self.ckpt, DEFAULTS, LEGACY_CONFIG, RUN_KEYS)
        if self.config["batch_size"] % self.world:
            parser.error(f"--batch-size {self.config['batch_size']} does not divide over {self.world} processes")
        if self.master:
            run_folder.claim_run_folder()                       # the run goes ahead: its PID goes into the lock file
        self.state = RunState()

    def load_data(self):
        """The training images that x_0 ~ q(x_0) draws from (uint8, in memory or streamed from a folder) and their
        labels.  A new run takes the model's shape from them; a resumed one must find the shape it trained on."""
        args, config = self.args, self.config
        try:
            images, labels = load_dataset(config["dataset"], args.data_dir, train=True, download=self.master,
                                          image_size=config["image_size"], stream=args.stream or None,
                                          workers=args.workers)
        except DataError as e:
            fail(str(e))
        if self.ckpt is None:
            if config["image_size"] not in (None, images.shape[2]):
                self.parser.error(f"--image-size {config['image_size']}: {config['dataset']} images are "
                                  f"{images.shape[2]}x{images.shape[3]}; --image-size is for --dataset folder")
            if config["conditional"] and labels is None:
                fail(f"--conditional needs labels, but the images in {args.data_dir} are not in class sub-folders")
            if config["conditional"] is None:
                config["conditional"] = labels is not None
            config.update(model_shape(images.shape[1], images.shape[2], config["channel_mults"]),
                          num_classes=int(labels.max()) + 1 if config["conditional"] else None,
                          hflip=config["dataset"] in NATURAL_IMAGES)
            if config["prediction"] == "edm":
                config["sigma_data"] = data_std(images)
        elif tuple(images.shape[1:]) != (config["in_channels"], config["image_size"], config["image_size"]):
            fail(f"the data in {args.data_dir} has images of shape {tuple(images.shape[1:])}, but the checkpoint "
                 f"was trained on {config['in_channels']}x{config['image_size']}x{config['image_size']}")
        self.images, self.labels = hardware.on_device(images, labels, self.device)   # on a GPU, the whole dataset
        if args.fid_every and self.master:       # --fid-every needs the test split: fail now, not after an epoch
            try:
                reference_data(config["dataset"], args.data_dir)
            except (EvalError, DataError) as e:
                fail(f"--fid-every: {e}")

    def build(self):
        """epsilon_theta (the U-Net, in the fastest precision and layout for training), its EMA, AdamW, the noise
        schedule, and this process's random generator of t, eps and the flips."""
        config, device = self.config, self.device
        torch.manual_seed(config["seed"])
        try:
            self.model = UNet(**model_config(config)).to(device)
        except ValueError as e:
            self.parser.error(str(e))
        self.precision, layout, self.speed_note = hardware.training_speed(self.model, device, self.args.precision,
                                                                          config, self.master, self.world)
        self.model.to(memory_format=layout)
        config.update(precision=self.precision, memory_format=hardware.LAYOUT_NAMES[layout])
        self.ema = copy.deepcopy(self.model).to(memory_format=hardware.memory_format(device)).eval()
        self.ema.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config["lr"], betas=(0.9, config["adam_beta2"]),
                                           weight_decay=0.0)
        self.scheduler = make_scheduler(config["schedule"], config["num_timesteps"], config["prediction"],
                                        config.get("sigma_data")).to(device)
        self.t_probs = self.scheduler.timestep_probs(config["timestep_sampling"])     # None: uniform, as the paper
        self.generator = torch.Generator(device=device).manual_seed(config["seed"] * 1000 + self.rank)

    def restore(self):
        """On --resume: the weights, the EMA, the optimizer, the counters and the random states as they were
        saved, so that the run goes on bit for bit."""
        ckpt, self.ckpt = self.ckpt, None          # the checkpoint's memory goes with this call
        if ckpt is None:
            if self.master and os.path.exists(self.ckpt_path):
                print(f"note: --overwrite: {self.ckpt_path} will be replaced when the first epoch ends")
            return
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = s = RunState.from_checkpoint(ckpt)
        if not self.restarted:
            s.launch_seconds = 0.0     # --resume --max-minutes M trains M minutes more; a torchrun restart, the rest
        states = ckpt.get("rng", [])
        if len(states) == self.world:
            set_rng_state(states[self.rank], self.generator)
        elif self.master:
            print(f"note: the checkpoint's random states are for {len(states)} process(es), this run has "
                  f"{self.world}; the run continues, but not bit for bit")
        if self.master:
            restart = f"torchrun restart {self.restart}: " if self.restarted else ""
            mine = f", which this launch saved after {s.launch_seconds:.1f} s of training" if self.restarted else ""
            print(f"{restart}resuming {self.ckpt_path}{mine}: epoch {s.epoch + 1}, batch {s.batch_in_epoch}, "
                  f"step {s.step}")
            run_folder.resume_logs(self.args.out_dir, s.step)   # rows after the checkpoint go; old logs get new columns

    def start(self):
        """Wrap the model for training (DDP, torch.compile), take over Ctrl-C and SIGTERM, plan the run (its
        epochs, or its minutes, and the timed saves) and say what it is."""
        args, config = self.args, self.config
        self.train_model = hardware.wrap_for_training(self.model, self.device, self.world, args.compile)
        self.stop_request = hardware.StopRequest()
        self.batches_per_epoch = self.images.shape[0] // config["batch_size"]
        if self.batches_per_epoch == 0:
            fail(f"the dataset has {self.images.shape[0]} images, fewer than one batch of {config['batch_size']}")
        # --max-minutes alone sets the length of the run; the epochs then count only with --epochs given.
        self.last_epoch = math.inf if args.max_minutes and args.epochs is None else config["epochs"]
        self.epoch_steps, self.first_step = self.last_epoch * self.batches_per_epoch, self.state.step
        self.total_steps, self.started = self.epoch_steps, time.monotonic()
        self.launch_seconds = self.state.launch_seconds     # spent by this launch's earlier attempts
        self.deadline = self.started + 60 * args.max_minutes - self.launch_seconds if args.max_minutes else None
        self.save_every = 60 * args.save_every_minutes or None        # seconds between timed mid-epoch saves
        self.next_save = self.started + self.save_every if self.save_every else None
        if self.master:
            n_params = sum(p.numel() for p in self.model.parameters())
            length = f"epochs {self.state.epoch + 1}..{self.last_epoch}" if self.last_epoch < math.inf \
                else f"{args.max_minutes:g} minutes"
            print(f"training on {self.images.shape[0]} {config['dataset']} images, {self.device.type} in "
                  f"{self.precision}, {config['memory_format']} ({self.speed_note}), {self.world} process(es), "
                  f"{n_params / 1e6:.2f} M parameters, {length}")
            if config["prediction"] == "edm":
                print(f"edm preconditioning with sigma_data {config['sigma_data']:g}, the training pixels' std")
        self.preview_seconds, self.last_preview = 0.0, time.monotonic()
        self.fid_clock = time.monotonic()        # state.fid_seconds counts the training time from here
        if args.fid_every and self.master:
            print(f"--fid-every {args.fid_every:g}: the FID at N = {args.fid_samples} ({FID_SAMPLER[1]}-step "
                  f"{FID_SAMPLER[0]}, classifier features) goes into {run_folder.LOSS_LOG_NAME} at the first epoch "
                  f"end after every {args.fid_every:g} minutes of training and at the last")

    def save(self):
        """Gather every process's random state; rank 0 writes the checkpoint, once the weights are known finite,
        with this launch's id and training time, and keeps the one before as OUT_DIR/ddpm_ckpt.prev.pth."""
        states = hardware.from_every_rank(rng_state(self.generator), self.world)
        self.state.launch_seconds = self.launch_seconds + time.monotonic() - self.started

        hardware.on_rank_0(lambda: run_folder.write_checkpoint(self.ckpt_path, dict(
            format=CHECKPOINT_FORMAT, config=self.config, model=self.model.state_dict(), ema=self.ema.state_dict(),
            optimizer=self.optimizer.state_dict(), rng=states, launch_id=self.launch, **self.state.to_checkpoint())))


class Trainer(Run):
    """The loop of algorithm 1 over the run: epochs of steps (train_epoch, train_step, record), a stop or a timed
    save after a step (after_step), and at each epoch's end loss_log.csv, the checkpoint and, when due, the FID and a
    grid of samples from the EMA weights (end_epoch, fid_if_due, preview_if_due); stop() or finish() ends it."""

    def train_epoch(self):
        """Algorithm 1 over the rest of this epoch's batches.  Returns the seconds it took and the images per
        second; raises Stop after a step when a signal came or --max-minutes ran out."""
        s, config = self.state, self.config
        # The epoch's order depends only on (seed, epoch): the same after a resume, and shared by all processes.
        order = torch.randperm(self.images.shape[0],
                               generator=torch.Generator().manual_seed(config["seed"] * 100003 + s.epoch))
        self.epoch_started = start_time, start_batch = time.perf_counter(), s.batch_in_epoch
        epochs = f"/{self.last_epoch}" if self.last_epoch < math.inf else ""
        with tqdm(total=self.batches_per_epoch * config["batch_size"], initial=s.batch_in_epoch * config["batch_size"],
                  unit="img", unit_scale=True, desc=f"epoch {s.epoch + 1}{epochs}", disable=not self.master,
                  dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
            self.train_model.train()
            for x0_uint8, y in epoch_batches(self.images, self.labels if config["conditional"] else None, order,
                                             s.batch_in_epoch, self.batches_per_epoch, config["batch_size"],
                                             self.rank, self.world, self.device):
                loss = self.train_step(x0_uint8, y)
                self.record(loss)
                bar.update(config["batch_size"])
                if s.step % 10 == 0 or s.batch_in_epoch == self.batches_per_epoch:
                    bar.set_postfix(loss=f"{loss:.4f}")
                self.after_step()
        seconds = time.perf_counter() - start_time
        return seconds, (s.batch_in_epoch - start_batch) * config["batch_size"] / seconds

    def train_step(self, x0_uint8, y):
        """One step of algorithm 1 on a batch of uint8 images (and labels): returns its loss."""
        config, step = self.config, self.state.step
        x0 = to_model_range(x0_uint8)                                       # x_0 ~ q(x_0)     (line 2)
        if config["hflip"]:
            x0 = random_hflip(x0, self.generator)
        loss = diffusion_loss(self.train_model, self.scheduler, x0, y, generator=self.generator,   # lines 3-5
                              precision=self.precision, label_dropout=config["label_dropout"],
                              null_label=self.model.num_classes,
                              min_snr_gamma=loss_gamma(config), t_probs=self.t_probs,
                              stratified=config["timestep_sampling"] == "stratified")
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()                                                     # gradient step (line 5)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            fail(f"the loss became {loss_value} at step {step + 1} (epoch {self.state.epoch + 1}); training stopped "
                 f"and the last good checkpoint {self.ckpt_path} is kept. Try a lower --lr")
        self.optimizer.step()
        self.state.step += 1
        ema_update(self.ema, self.model, self.state.step, config["ema_decay"])
        return loss_value

    def record(self, loss):
        """Count a step's loss into the epoch's mean and into loss_steps.csv's row, written every 50 steps."""
        s = self.state
        s.batch_in_epoch += 1
        s.loss_sum, s.loss_count = s.loss_sum + loss, s.loss_count + 1
        s.window_sum, s.window_count = s.window_sum + loss, s.window_count + 1
        if s.step % STEP_LOG_EVERY == 0:
            if self.master:                                                   # lr: the rate of this step
                run_folder.log_steps(self.args.out_dir, s.step, s.epoch + 1, s.window_sum / s.window_count,
                          self.optimizer.param_groups[0]["lr"])
            s.window_sum, s.window_count = 0.0, 0

    def after_step(self):
        """Stop (raise Stop: a signal, or --max-minutes) or save (--save-every-minutes) after this step, every
        process at the same step and with the same plan of the run's length, which is estimated again."""
        step, now = self.state.step, time.monotonic()
        by_signal, out_of_time = self.stop_request.signum is not None, self.deadline is not None and now > self.deadline
        save_due = self.next_save is not None and now >= self.next_save
        self.total_steps = planned_steps(self.epoch_steps, step, self.deadline, self.started, step - self.first_step)
        if self.world > 1:
            flags = hardware.max_over_ranks([by_signal, out_of_time, save_due, -self.total_steps], self.device)
            by_signal, out_of_time, save_due = (bool(flag) for flag in flags[:3])
            self.total_steps = int(-flags[3])
        if by_signal or out_of_time:
            raise Stop(by_signal)
        if save_due and self.state.batch_in_epoch < self.batches_per_epoch:   # (the epoch's last batch saves anyway)
            self.save()                                               # --save-every-minutes: mid-epoch, silently
            self.next_save = time.monotonic() + self.save_every

    def end_epoch(self, seconds, images_per_s):
        """After the epoch's last batch: the next epoch's counters, on rank 0 a row of loss_log.csv, the checkpoint,
        and on rank 0 a line of progress and, from time to time, a grid of samples (the others wait for it)."""
        s = self.state
        mean_loss = s.loss_sum / max(1, s.loss_count)
        s.epoch, s.batch_in_epoch, s.loss_sum, s.loss_count = s.epoch + 1, 0, 0.0, 0
        fid = self.fid_if_due()
        if self.master:     # the row before the save: after a kill between them, --resume drops it and writes it again
            run_folder.log_epoch(self.args.out_dir, s.epoch, s.step, mean_loss, images_per_s, seconds, fid)
        self.save()
        if self.save_every:
            self.next_save = time.monotonic() + self.save_every
        grid = hardware.on_rank_0(self.preview_if_due)
        if self.master:
            print(f"epoch {s.epoch}: loss {mean_loss:.4f}, {images_per_s:.0f} img/s"
                  + ("" if fid is None else f", FID {fid:.2f}") + f", saved {self.ckpt_path}"
                  + (f" and {grid}" if grid else ""))

    def fid_if_due(self, last=False):
        """--fid-every: after the first epoch that ends once that many minutes of training have passed since the
        last measurement, and at the run's end (its last epoch, or `last`: --max-minutes ran out), rank 0 measures
        the FID of the EMA weights (evaluate.fid_of) while the other processes wait.  The training's random state
        is left untouched (the sampler has its own seeded generator), so a run with measurements trains bit for bit
        as one without, and its time is not counted against --max-minutes.  Returns it, or None."""
        s, args, now = self.state, self.args, time.monotonic()
        s.fid_seconds, self.fid_clock = s.fid_seconds + now - self.fid_clock, now
        if not args.fid_every:
            return None
        due = s.fid_seconds >= 60 * args.fid_every or s.epoch == self.last_epoch or last
        if not hardware.from_rank_0([due], self.world)[0]:    # rank 0's clock decides; the others wait for its FID
            return None

        def measure():
            start = time.monotonic()
            pipeline = Pipeline(self.ema, self.scheduler, self.device, "fp32", self.config)
            devices = [self.device] if self.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices):
                    fid = fid_of(pipeline, self.config["dataset"], args.data_dir, args.fid_samples, *FID_SAMPLER,
                                 FID_SEED, features="classifier", log=print, progress=False)
            except (EvalError, DataError) as e:
                fail(f"--fid-every: {e}")
            print(f"FID {fid:.2f} at N = {args.fid_samples} at step {s.step}, measured in "
                  f"{time.monotonic() - start:.1f} s")
            return fid
        measuring = time.monotonic()
        fid = hardware.on_rank_0(measure)
        # The measurement is not training: the run's clock (its pace, its deadline, the launch's minutes spent)
        # moves on by what it took, so --max-minutes M trains M minutes with or without --fid-every.
        measured = time.monotonic() - measuring
        self.started += measured
        if self.deadline is not None:
            self.deadline += measured
        s.fid_seconds, self.fid_clock = 0.0, time.monotonic()
        return fid

    def preview_if_due(self):
        """A grid of samples after the first and the last epoch, and after any other once the training since the
        last grid took PREVIEW_SHARE times what drawing it took: on small datasets, whose epochs take seconds,
        grids would otherwise eat the time budget.  Returns its path, or None."""
        if not self.config["preview_samples"] or not (
                self.state.epoch == self.last_epoch
                or time.monotonic() - self.last_preview >= PREVIEW_SHARE * self.preview_seconds):
            return None
        grid = os.path.join(self.args.out_dir, "samples", f"epoch_{self.state.epoch:03d}.png")
        preview_start = time.monotonic()
        preview(self.ema, self.scheduler, self.config, self.device, self.precision, grid)
        self.last_preview = time.monotonic()
        self.preview_seconds = self.last_preview - preview_start
        return grid

    def stop(self, by_signal):
        """Save the position inside the epoch and say how to continue.  Returns the exit code: 128 + the signal's
        number after a signal (130 for Ctrl-C, 143 for SIGTERM), 0 when --max-minutes ran out."""
        s = self.state
        if not by_signal and self.args.fid_every:    # the run's end: its FID, in a row for the epoch so far
            self.log_partial_epoch()
        self.save()
        if self.master:
            reason = "stopped by a signal" if by_signal else f"--max-minutes {self.args.max_minutes:g} reached"
            print(f"{reason}: saved {self.ckpt_path} at epoch {s.epoch + 1}, batch {s.batch_in_epoch}/"
                  f"{self.batches_per_epoch} (step {s.step}); continue with: python training.py --resume --out-dir "
                  f"{self.args.out_dir}", file=sys.stderr if by_signal else sys.stdout)
        if by_signal:
            self.stop_request.ignore_further()
            return self.stop_request.exit_code()
        hardware.leave_process_group(self.world)
        return 0

    def log_partial_epoch(self):
        """--fid-every when --max-minutes ends the run mid-epoch: the FID of the run's end, in a row of loss_log.csv
        for the batches of the epoch in progress, its epoch a fraction (5.43: 43% of the sixth).  The epoch's own
        row follows when --resume completes it."""
        s = self.state
        started, first_batch = self.epoch_started
        seconds = time.perf_counter() - started                      # the training's time, before the measurement
        fid = self.fid_if_due(last=True)
        if self.master and s.loss_count:
            run_folder.log_epoch(self.args.out_dir, f"{s.epoch + s.batch_in_epoch / self.batches_per_epoch:.2f}",
                                 s.step, s.loss_sum / s.loss_count,
                                 (s.batch_in_epoch - first_batch) * self.config["batch_size"] / seconds, seconds, fid)

    def finish(self):
        """The run's epochs are done: say so, and leave torchrun's process group."""
        if self.master:
            print(f"done: {self.state.epoch} epochs, {self.state.step} steps. Sample with: python sampling.py "
                  f"--ckpt {self.ckpt_path}")
        hardware.leave_process_group(self.world)


def main(argv=None):
    """Algorithm 1 until the run's epochs or minutes are spent: repeat { x_0 ~ q(x_0); t ~ U{0..T-1};
    eps ~ N(0, I); a gradient step on w(t) ||eps - eps_theta(sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps, t)||^2
    }, with w(t) = min(SNR(t), gamma) / SNR(t) by default (--loss min-snr, gamma = --min-snr-gamma), or 1, the
    paper's objective (--loss plain)."""
    show_log()
    parser = build_parser()
    trainer = Trainer(parser.parse_args(argv), parser)    # processes, device, the locked output folder, the config
    trainer.load_data()                                   # the training images
    trainer.build()                                       # epsilon_theta, its EMA, AdamW, the noise schedule
    trainer.restore()                                     # --resume: weights, optimizer, counters, random states
    trainer.start()                                       # Ctrl-C and SIGTERM taken over; the plan and the clock
    if trainer.deadline is not None and trainer.deadline <= trainer.started:    # a torchrun restart after the end
        trainer.finish()
        return
    try:
        while trainer.state.epoch < trainer.last_epoch:
            seconds, images_per_s = trainer.train_epoch()
            trainer.end_epoch(seconds, images_per_s)      # checkpoint, loss_log.csv, now and then a sample grid
    except Stop as stop:                                  # saved mid-epoch; --resume goes on from there
        code = trainer.stop(stop.by_signal)
        if code:
            sys.exit(code)                                # 130 after Ctrl-C, 143 after SIGTERM
        return
    trainer.finish()


# ---- the options, the model's shape -----------------------------------------------------------------------
def build_parser():
    """training.py's options (training_options.py), their help quoting DEFAULTS and the defaults above."""
    return options_parser(DEFAULTS, FID_SAMPLER, FID_SAMPLES, SAVE_EVERY_MINUTES)


def data_std(images, limit=10_000):
    """sigma_data of the edm prediction: the standard deviation of the training pixels in [-1, 1], over up to
    `limit` images (a fixed draw, so that the same data gives the same value)."""
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:limit]
    return round(float(to_model_range(images[pick]).double().std()), 4)


def model_shape(in_channels, image_size, channel_mults=None):
    """The U-Net's shape for images of this size: resolution levels down to about 4-8 pixels, and
    self-attention only at the low resolutions (at most 8x8, or a quarter of the image side)."""
    if channel_mults is None:
        channel_mults = [1, 2, 2] if image_size <= 28 else [1, 2, 2, 2] if image_size <= 64 else [1, 1, 2, 2, 4]
    resolutions = [image_size // 2 ** i for i in range(len(channel_mults))]
    attention = [r for r in resolutions if r <= max(8, image_size // 4)] or [resolutions[-1]]
    return dict(in_channels=in_channels, image_size=image_size, channel_mults=list(channel_mults),
                attention_resolutions=attention, num_heads=4)


# ---- the run's length, the sample grids -------------------------------------------------------------------
def planned_steps(epoch_steps, steps_done, deadline, started, steps_here):
    """How many steps the run will take in all: --epochs' count or, when --max-minutes ends the run first, the
    steps done plus those that fit before the deadline at this process's pace so far (re-estimated every step)."""
    if deadline is None or steps_here == 0:
        return epoch_steps
    now = time.monotonic()
    seconds_per_step = (now - started) / steps_here
    return min(epoch_steps, steps_done + int(max(0.0, deadline - now) / seconds_per_step))


def preview(ema, scheduler, config, device, precision, path):
    """A grid of EMA samples from fixed noise, so epochs can be compared by eye: SDE-DPM-Solver++(2M), the
    sampler with the best FID at 20 steps on a 30-minute CPU model (docs/experiments.md, Timestep spacing)."""
    n = config["preview_samples"]
    images, _ = generate(Pipeline(ema, scheduler, device, precision), n, seed=1234, batch_size=n, sampler="dpm++sde",
                         steps=min(config["preview_steps"], scheduler.num_timesteps), guidance_scale=DEFAULT_GUIDANCE,
                         progress=False)
    save_grid(images, path)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:         # an image of a streamed folder that cannot be read; the last checkpoint is kept
        fail(str(e))
    except KeyboardInterrupt:      # before the training loop took over Ctrl-C: nothing was written yet
        fail("interrupted before training started; nothing was written", code=130)
    except (hardware.PeerLost, RuntimeError) as e:    # torchrun: another process died or hung, this one cannot go on
        if not hardware.peer_lost(e):
            raise
        hardware.exit_peer_lost(e)
