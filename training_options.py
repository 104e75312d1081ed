"""training.py's command line: its options (options_parser) and the configuration they make with a checkpoint's
(resolve_config).

training.py holds the defaults, the one source of truth (training.DEFAULTS, saved in the checkpoint, with
LEGACY_CONFIG and RUN_KEYS), and passes them in, so that this module imports nothing from training.py: nanoGPT keeps
its command line apart from train.py in the same way (configurator.py), so that the script reads as the training.
The parser's own defaults are None (argument_default=None), so that resolve_config tells an option given from one
left out.
"""
import argparse

from cli import (
    add_device_options,
    fraction,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from dataset import DATASETS
from hardware import DIST_TIMEOUT_MINUTES
from noise_scheduler import P_MEAN, P_STD, PREDICTIONS, SCHEDULES, SPEED_RATIO, TIMESTEP_SAMPLINGS
from run_folder import CKPT_NAME, DEFAULT_OUT_DIR, LOSS_LOG_NAME

LR_SCHEDULES = ("linear", "constant")
LOSSES = ("plain", "min-snr")


def options_parser(d, fid_sampler, fid_samples, save_every_minutes):
    """training.py's options, their help quoting the defaults: `d` is training.DEFAULTS, fid_sampler
    samplers.FID_SAMPLER, fid_samples and save_every_minutes the defaults of --fid-samples and --save-every-minutes."""
    p = argparse.ArgumentParser(description="Train a DDPM (Ho et al., 2020).", argument_default=None)
    a = p.add_argument
    a("--dataset", choices=DATASETS, help=f"training data (default {d['dataset']}); folder: every image below "
      f"--data-dir")
    a("--image-size", type=positive_int, help="side of the square images, for --dataset folder (default 32)")
    a("--epochs", type=positive_int, help=f"total epochs of the run (default {d['epochs']}, unless --max-minutes is "
      f"given alone); raise it with --resume to train longer")
    a("--batch-size", type=positive_int, help=f"images per optimizer step, over all processes (default "
      f"{d['batch_size']})")
    a("--lr", type=positive_float, help=f"AdamW learning rate (default {d['lr']})")
    a("--adam-beta2", type=fraction, help=f"AdamW's beta2, the decay of its average of squared gradients (default "
      f"{d['adam_beta2']})")
    a("--warmup-steps", type=non_negative_int, help=f"linear learning-rate warm-up (default {d['warmup_steps']})")
    a("--lr-schedule", choices=LR_SCHEDULES, help=f"after the warm-up: linear (decay to zero at the end of the run, "
      f"which --epochs or --max-minutes sets) or constant (default {d['lr_schedule']})")
    a("--loss", choices=LOSSES, help=f"min-snr: each timestep's term weighted by min(SNR, gamma) / SNR (Hang et al., "
      f"2023; gamma: --min-snr-gamma); plain: the paper's simple objective (default {d['loss']})")
    a("--prediction", choices=PREDICTIONS, help=f"what the network predicts: eps (the paper's noise), v (the velocity "
      f"alpha_t eps - sigma_t x_0), x0, or edm (Karras et al., 2022's preconditioning, with sigma_data measured on "
      f"the training images; with --loss plain, their loss weighting) (default {d['prediction']})")
    a("--min-snr-gamma", type=positive_float, help=f"gamma of --loss min-snr (default {d['min_snr_gamma']:g})")
    a("--timestep-sampling", choices=TIMESTEP_SAMPLINGS, help=f"how training draws t: uniform (the paper's), "
      f"stratified (uniform, each batch spread evenly over the timesteps: Kingma et al., 2021), speed (SpeeD's "
      f"asymmetric sampling, Wang et al., 2024: the timesteps where x_t is nearly pure noise drawn "
      f"{SPEED_RATIO:g} times less often) or lognormal (EDM's: ln(sigma_t / alpha_t) ~ N({P_MEAN:g}, {P_STD:g}^2)) "
      f"(default {d['timestep_sampling']})")
    a("--seed", type=int, help=f"random seed (default {d['seed']})")
    a("--channels", dest="base_channels", type=positive_int, help=f"U-Net width: channels of the first level "
      f"(default {d['base_channels']})")
    a("--channel-mults", type=int_list, help="width multiplier of each resolution level (default: 1,2,2 "
      "for 28x28 images, 1,2,2,2 up to 64x64, 1,1,2,2,4 above)")
    a("--num-res-blocks", type=positive_int, help=f"residual blocks per level (default {d['num_res_blocks']})")
    a("--dropout", type=fraction, help=f"dropout in the residual blocks (default {d['dropout']})")
    a("--schedule", choices=list(SCHEDULES), help=f"noise schedule (default {d['schedule']})")
    a("--num-timesteps", type=positive_int, help=f"diffusion steps T (default {d['num_timesteps']})")
    a("--ema-decay", type=fraction, help=f"largest EMA decay, reached after warm-up (default {d['ema_decay']})")
    a("--conditional", action="store_const", const=True, help="class-conditional model, for classifier-free guidance "
      "(the default when the training images have labels)")
    a("--unconditional", dest="conditional", action="store_const", const=False, help="the paper's unconditional "
      "model, even when the training images have labels")
    a("--label-dropout", type=fraction, help=f"probability of training with the 'no label' token (default "
      f"{d['label_dropout']})")
    a("--preview-samples", type=non_negative_int, help="images in each epoch's sample grid, 0 for none (default 100)")
    a("--preview-steps", type=positive_int, help="SDE-DPM-Solver++ steps for the epoch grids (default 20)")
    add_device_options(p, "auto: the faster of bf16 and fp32 (and of the NCHW and NHWC layouts), timed on this "
                       "device at start-up; a resumed run keeps the precision it started with")
    a("--compile", action="store_true", help="torch.compile the model (it compiles during the first steps)")
    a("--data-dir", default="data", help="dataset folder (default data)")
    a("--stream", action="store_true", help="--dataset folder: decode the images from disk batch by batch instead of "
      "holding them in memory (the default for folders above 1 GiB of decoded pixels)")
    a("--workers", type=non_negative_int, help="DataLoader processes that decode a folder dataset "
      "(default: the CPU count, at most 8; none for folders under 2,000 images)")
    a("--out-dir", default=DEFAULT_OUT_DIR, help="checkpoint, samples and loss log folder (default default)")
    a("--resume", action="store_true", help=f"continue the run in OUT_DIR/{CKPT_NAME}")
    a("--overwrite", action="store_true", help=f"start a new run even if OUT_DIR/{CKPT_NAME} exists (it is replaced)")
    a("--max-minutes", type=positive_float, help="train for this many minutes, however many epochs that is (with "
      "--epochs too: whichever ends first; with --lr-schedule linear the rate reaches zero at the end); the "
      "checkpoint is saved mid-epoch (exit 0), and --resume --max-minutes M trains M minutes more")
    a("--fid-every", type=non_negative_float, default=0.0, metavar="MINUTES", help="measure the FID (N = "
      f"--fid-samples, {fid_sampler[1]}-step {fid_sampler[0]}, the classifier's features, as evaluate.py) at the first "
      "epoch end after every MINUTES of training and at the end of the run, into the fid column of "
      f"{LOSS_LOG_NAME}; its time does not count against --max-minutes; 0: never (the default)")
    a("--fid-samples", type=positive_int, default=fid_samples, help=f"N of --fid-every (default {fid_samples})")
    a("--save-every-minutes", type=non_negative_float, default=save_every_minutes, help="also save the checkpoint "
      f"mid-epoch every this many minutes, so a crash or SIGKILL loses at most that much training; 0 for only "
      f"at the end of each epoch (default {save_every_minutes:g})")
    a("--dist-timeout", type=positive_float, default=DIST_TIMEOUT_MINUTES, metavar="MINUTES", help="under torchrun: "
      "a process that has waited this long in a collective for another (dead, stopped, hung) fails, so that "
      "torchrun --max-restarts restarts the run from its last checkpoint; inside a collective the processes only "
      "wait for each other's step, and for what rank 0 does alone (the speed probe, a checkpoint write, a sample "
      "grid, an FID measurement) the others wait as long as rank 0 lives (default "
      f"{DIST_TIMEOUT_MINUTES:g}; gloo's own is 30)")
    return p


def resolve_config(args, parser, ckpt, defaults, legacy_config, run_keys):
    """Defaults, then the checkpoint's configuration (on --resume), then the options given: `defaults` is
    training.DEFAULTS, `legacy_config` (training.LEGACY_CONFIG) what a checkpoint written before some options existed
    was trained with, and the options of `run_keys` (training.RUN_KEYS) must agree with the checkpoint."""
    given = {k: v for k, v in vars(args).items() if k in defaults and v is not None}
    if ckpt is None:
        return {**defaults, **given}
    config = {**defaults, **legacy_config, **ckpt["config"]}
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}

    def option(k, value):
        return ("--conditional" if value else "--unconditional") if k == "conditional" else f"{flag[k]} {value}"
    differ = [f"{option(k, given[k])} (checkpoint: "
              f"{option(k, config.get(k)) if k == 'conditional' else config.get(k)})"
              for k in run_keys if k in given and given[k] != config.get(k)]
    if differ:
        parser.error("--resume continues the run in the checkpoint, but these options contradict it: "
                     + "; ".join(differ))
    config.update({k: v for k, v in given.items() if k not in run_keys})    # epochs, previews
    return config
