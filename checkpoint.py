"""Checkpoints that survive crashes: atomic writes, a SHA-256 of every byte, and loads that explain what is wrong.

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
    launch_seconds   the seconds this launch has trained, over its torchrun restarts (--max-minutes' budget)
    launch_id     the torchrun launch that wrote it (training.launch_id; None outside torchrun)
(epoch to launch_seconds: training.RunState, saved and restored under these names.)
The file is torch.save's zip with an archive comment at its end, b"ddpm-sha256:" and the SHA-256 (64 hex digits) of
every byte before it, so that any changed byte is found on loading: torch.load does not check the zip's CRC-32s.
Zip readers, torch.load among them, read past the comment.  The save before the latest is kept beside it
(previous_path), so a damaged checkpoint is not the end of a run.
Loading uses torch.load(weights_only=True), so a file can never run code when it is read.
"""
import hashlib
import io
import os
import pickle
import re
import sys
import threading
import warnings

import torch

from cli import atomic_write, first_line

CHECKPOINT_FORMAT = "ddpm-checkpoint-v2"
# Written before checkpoints carried their SHA-256: they load, with a note that they cannot be verified.
UNVERIFIED_FORMATS = ("ddpm-checkpoint-v1",)
REQUIRED_KEYS = ("format", "config", "model", "ema", "optimizer", "epoch", "batch_in_epoch", "step")
HASH_TAG = b"ddpm-sha256:"
TRAILER = re.compile(rb"ddpm-sha256:([0-9a-f]{64})\Z")
TRAILER_LENGTH = len(HASH_TAG) + 64
END_OF_ZIP = b"PK\x05\x06"        # the signature of the zip's last record (22 bytes, ending in the comment's length)


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; the message is one sentence for the user."""


def previous_path(path):
    """Where save_checkpoint keeps the save before the latest one: ddpm_ckpt.pth -> ddpm_ckpt.prev.pth."""
    root, extension = os.path.splitext(path)
    return root + ".prev" + extension


def seal(data):
    """torch.save's bytes with the SHA-256 trailer: the zip's comment length (its last two bytes, zero as torch
    writes it) set to the trailer's, then b"ddpm-sha256:" and the hex SHA-256 of everything before it."""
    if len(data) < 22 or data[-22:-18] != END_OF_ZIP or data[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end its file with a zip record without a comment")
    body = bytes(data[:-2]) + TRAILER_LENGTH.to_bytes(2, "little")
    return body + HASH_TAG + hashlib.sha256(body).hexdigest().encode()


def save_checkpoint(state, path, keep_previous=True):
    """Write `state` to `path` with its SHA-256 (seal), atomically (cli.atomic_write: a temporary file in the same
    folder, flushed and fsynced, then renamed over the old checkpoint), the old checkpoint kept as
    previous_path(path) by the same rename dance (unless keep_previous is False: sampling.store_fit adds to the
    same save, which is no new one).  On any failure both files are untouched and the temporary file is removed."""
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = seal(buffer.getbuffer())
        del buffer
        atomic_write(path, lambda f: f.write(data), binary=True,
                     previous=previous_path(path) if keep_previous else None)
    except (OSError, RuntimeError, pickle.PicklingError) as e:
        reason = getattr(e, "strerror", None) or first_line(e)
        raise CheckpointError(f"could not write the checkpoint {path} ({reason}); "
                              f"the previous checkpoint, if any, is unchanged") from None


_noted = set()          # the unverifiable files this process has already said so about


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by training.py, or raise CheckpointError saying why it cannot be used.  The file
    is read once; its SHA-256 is computed in a second thread while torch.load parses the same bytes (so the check
    costs little more than reading the file), and nothing parsed is returned unless the two agree.  A file of
    before the SHA-256 loads with a one-line note on stderr, once per process."""
    state, verified = _read(path, map_location, hint=True)
    if not verified and path not in _noted and int(os.environ.get("RANK", 0)) == 0:
        _noted.add(path)
        print(f"note: {path} was written before checkpoints carried a SHA-256 of their content, so it cannot be "
              f"verified", file=sys.stderr)
    return state


def _read(path, map_location, hint):
    """(state, whether its SHA-256 was verified) of a checkpoint, or CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"there is no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint {path} ({e.strerror})") from None
    if not data:
        raise CheckpointError(f"the checkpoint {path} is empty (0 bytes)")
    trailer = TRAILER.search(data, max(0, len(data) - TRAILER_LENGTH))
    hashed = {}
    if trailer:            # hashlib lets go of the GIL on large buffers: the hash runs beside the parsing
        body = memoryview(data)[:len(data) - TRAILER_LENGTH]
        thread = threading.Thread(target=lambda: hashed.update(digest=hashlib.sha256(body).hexdigest()))
        thread.start()
    elif data.startswith(b"PK\x03\x04") and (data[-22:-18] != END_OF_ZIP or data[-2:] != b"\0\0"):
        # a zip (what torch.save writes) that does not end as torch.save ends one, nor with the trailer
        raise _damaged(path, "it does not end as a checkpoint ends (it was cut short, or its last bytes, which hold "
                             "the SHA-256 it was saved with, changed)", hint)
    error = None
    try:
        with warnings.catch_warnings():      # torch warns about what it refuses; the error below says it once
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        error = CheckpointError(f"{path} holds objects other than tensors and plain values, so it was not loaded "
                                f"(it is not a checkpoint of this repository, and loading it could run code)")
    except Exception as e:    # a damaged or foreign file fails in many ways (RuntimeError, EOFError, IndexError, ...)
        error = CheckpointError(f"{path} is not a readable PyTorch checkpoint; it may be truncated or "
                                f"another kind of file ({type(e).__name__})")
    if trailer:
        thread.join()
        if hashed.get("digest") != trailer.group(1).decode():
            raise _damaged(path, "its content does not match the SHA-256 it was saved with", hint)
    if error is not None:
        raise error
    formats = (CHECKPOINT_FORMAT,) + UNVERIFIED_FORMATS
    if not isinstance(state, dict) or state.get("format") not in formats:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint written by this repository's "
                              f"training.py")
    if not trailer and state["format"] not in UNVERIFIED_FORMATS:
        raise _damaged(path, "the SHA-256 it was saved with is missing from its end", hint)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"the checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    wrong = [k for k in ("config", "model", "ema", "optimizer") if not isinstance(state[k], dict)]
    if wrong:
        raise CheckpointError(f"the checkpoint {path} is damaged: {', '.join(wrong)} should be a dictionary")
    return state, bool(trailer)


def _damaged(path, what, hint):
    """The CheckpointError of a damaged checkpoint; with `hint`, it says how to go on from the previous save when
    that one is intact (its SHA-256 verified)."""
    message = f"{path} is damaged: {what}"
    previous = previous_path(path)
    if hint and os.path.isfile(previous):
        try:
            state, verified = _read(previous, "cpu", hint=False)
            if verified:
                message += (f"; the previous save {previous} (step {state['step']}) is intact: move it onto {path} "
                            f"to continue from it")
        except CheckpointError:
            pass
    return CheckpointError(message)


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
