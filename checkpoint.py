"""Checkpoints that survive crashes: atomic writes, and loads that explain what is wrong.

A checkpoint is one file, written by training.py, holding everything needed to continue a run
or to sample from it:
    format        CHECKPOINT_FORMAT
    config        the resolved training configuration (plain values; `model_config` rebuilds the UNet)
    model, ema    state dicts of the plain (never compiled or DDP-wrapped) model and of its EMA
    optimizer     the AdamW state
    epoch         the epoch in progress (0-based); batch_in_epoch batches of it are done
    step          optimizer steps taken so far
    rng           random number generator states, one entry per process (rng_state, set_rng_state)
    loss_sum, loss_count   the running loss of the epoch in progress
    window_sum, window_count   the running loss of loss_steps.csv's row in progress
    fid_seconds   the training time since the last --fid-every measurement
(epoch to fid_seconds: training.RunState, saved and restored under these names.)
Loading uses torch.load(weights_only=True), so a file can never run code when it is read.
"""
import os
import pickle
import warnings

import torch

from cli import atomic_write, first_line

CHECKPOINT_FORMAT = "ddpm-checkpoint-v1"
REQUIRED_KEYS = ("format", "config", "model", "ema", "optimizer", "epoch", "batch_in_epoch", "step")


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; the message is one sentence for the user."""


def save_checkpoint(state, path):
    """Write `state` to `path` atomically (cli.atomic_write: a temporary file in the same folder, flushed and
    fsynced, then renamed over the old checkpoint).  On any failure the old file is untouched and the
    temporary file is removed."""
    try:
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
    except (OSError, RuntimeError, pickle.PicklingError) as e:
        reason = getattr(e, "strerror", None) or first_line(e)
        raise CheckpointError(f"could not write the checkpoint {path} ({reason}); "
                              f"the previous checkpoint, if any, is unchanged") from None


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by training.py, or raise CheckpointError saying why it cannot be used."""
    if not os.path.exists(path):
        raise CheckpointError(f"there is no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"the checkpoint {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():      # torch warns about what it refuses; the error below says it once
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects other than tensors and plain values, so it was not loaded "
                              f"(it is not a checkpoint of this repository, and loading it could run code)") from None
    except Exception as e:    # a damaged or foreign file fails in many ways (RuntimeError, EOFError, IndexError, ...)
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint; it may be truncated or "
                              f"another kind of file ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint written by this repository's "
                              f"training.py")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"the checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    wrong = [k for k in ("config", "model", "ema", "optimizer") if not isinstance(state[k], dict)]
    if wrong:
        raise CheckpointError(f"the checkpoint {path} is damaged: {', '.join(wrong)} should be a dictionary")
    return state


def all_finite(state_dict):
    """True when every floating-point tensor in a state dict is finite."""
    return all(torch.isfinite(v).all() for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())


def rng_state(generator):
    """This process's random states, for the checkpoint: torch's global one (weights, dropout), `generator`'s
    (t, eps, flips) and, on a GPU, CUDA's."""
    state = {"torch": torch.get_rng_state(), "noise": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    """Back to the random states rng_state() returned, so that a resumed run draws what the stopped one would have."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
