"""Every weight file of the project, written so that it survives crashes and read so that a damaged one is never
loaded: training's checkpoints, export.py's safetensors files, their SHA-256 seals, and the readers of their older
formats.

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
    launch_id     the torchrun launch that wrote it (hardware.launch_id; None outside torchrun)
    fit           what the few-step samplers fitted to the EMA weights (samplers.walk_of; store_fit), if anything
(epoch to launch_seconds: training.RunState, saved and restored under these names.)
The file is torch.save's zip with an archive comment at its end, b"ddpm-sha256:" and the SHA-256 (64 hex digits) of
every byte before it, so that any changed byte is found on loading: torch.load does not check the zip's CRC-32s.
Zip readers, torch.load among them, read past the comment.  The save before the latest is kept beside it
(previous_path), so a damaged checkpoint is not the end of a run.
Loading uses torch.load(weights_only=True), so a file can never run code when it is read.

An export (export.py) is a safetensors file of the EMA weights, with the configuration and its own SHA-256 in its
metadata (seal_safetensors).  read_weights reads either kind.
"""
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import re
import threading
import warnings

import torch

from cli import atomic_write, first_line, logger

CHECKPOINT_FORMAT = "ddpm-checkpoint-v2"
# Written before checkpoints carried their SHA-256: they load, with a note that they cannot be verified.
UNVERIFIED_FORMATS = ("ddpm-checkpoint-v1",)
REQUIRED_KEYS = ("format", "config", "model", "ema", "optimizer", "epoch", "batch_in_epoch", "step")
HASH_TAG = b"ddpm-sha256:"
TRAILER = re.compile(rb"ddpm-sha256:([0-9a-f]{64})\Z")
TRAILER_LENGTH = len(HASH_TAG) + 64
END_OF_ZIP = b"PK\x05\x06"        # the signature of the zip's last record (22 bytes, ending in the comment's length)

log = logger(__name__)


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
    previous_path(path) by the same rename dance (unless keep_previous is False: store_fit adds to the
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
        log.warning(f"note: {path} was written before checkpoints carried a SHA-256 of their content, so it cannot "
                    f"be verified")
    return state


def _read(path, map_location, hint, kind=None):
    """(state, whether its SHA-256 was verified) of a checkpoint (or of a student: kind STUDENT), or
    CheckpointError."""
    formats, required, dicts, writer = kind or ((CHECKPOINT_FORMAT,) + UNVERIFIED_FORMATS, REQUIRED_KEYS,
                                                ("config", "model", "ema", "optimizer"), "training.py")
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
                             "the SHA-256 it was saved with, changed)", hint, kind)
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
            raise _damaged(path, "its content does not match the SHA-256 it was saved with", hint, kind)
    if error is not None:
        raise error
    if not isinstance(state, dict) or state.get("format") not in formats:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint written by this repository's "
                              f"{writer}")
    if not trailer and state["format"] not in UNVERIFIED_FORMATS:
        raise _damaged(path, "the SHA-256 it was saved with is missing from its end", hint, kind)
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"the checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    wrong = [k for k in dicts if not isinstance(state[k], dict)]
    if wrong:
        raise CheckpointError(f"the checkpoint {path} is damaged: {', '.join(wrong)} should be a dictionary")
    return state, bool(trailer)


def _damaged(path, what, hint, kind=None):
    """The CheckpointError of a damaged checkpoint; with `hint`, it says how to go on from the previous save when
    that one is intact (its SHA-256 verified)."""
    message = f"{path} is damaged: {what}"
    previous = previous_path(path)
    if hint and os.path.isfile(previous):
        try:
            state, verified = _read(previous, "cpu", hint=False, kind=kind)
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


# ---- a distilled student (distill.py) ---------------------------------------------------------------------
# A student is a checkpoint of its own, STUDENT_NAME beside the checkpoint of its teacher, sealed as checkpoints are:
#     format      STUDENT_FORMAT
#     config      the teacher's training configuration (the student is its U-Net with jump=True)
#     student     the student's state dict
#     teacher     weights_digest of the teacher's EMA weights it was distilled from: used with no other weights
#     distill     how it was distilled: steps, alpha_min, guidance_scale, seed, ... (distill.py)
#     optimizer, step, seconds, rng     to continue the distillation (distill.py --resume)
STUDENT_NAME = "student.pth"
STUDENT_FORMAT = "ddpm-student-v1"
STUDENT = ((STUDENT_FORMAT,), ("format", "config", "student", "teacher", "distill", "optimizer", "step", "seconds"),
           ("config", "student", "distill", "optimizer"), "distill.py")
STUDENT_PREFIX = "student."       # the student's tensors in an export, beside the teacher's


def student_path(path):
    """Where the student of the model in `path` is kept: STUDENT_NAME in the same folder."""
    return os.path.join(os.path.dirname(path), STUDENT_NAME)


def load_student(path):
    """A student written by distill.py (its dict, as above), or CheckpointError saying why it cannot be used."""
    state = _read(path, "cpu", hint=True, kind=STUDENT)[0]
    if not isinstance(state["teacher"], str) or not all_finite(state["student"]):
        raise CheckpointError(f"the student in {path} is damaged: its weights are not finite or its teacher unnamed")
    return state


# ---- the exported weights: safetensors ------------------------------------------------------------------------
SAFETENSORS_FORMAT = "ddpm-ema-v2"      # metadata["format"] of the files export.py writes
# Written before exports carried their SHA-256: they load, with a note that they cannot be verified.
UNVERIFIED_SAFETENSORS_FORMATS = ("ddpm-ema-v1",)
HASH_KEY = "ddpm_sha256"                # metadata[HASH_KEY]: the SHA-256 of the file, with these 64 digits as zeros


def is_safetensors(path):
    """Whether `path` is meant as a safetensors file: its name ends in .safetensors, or it begins as one does (an
    8-byte little-endian header length, then the JSON header's '{'), where a checkpoint is a zip or a pickle."""
    if os.fspath(path).endswith(".safetensors"):          # (a str or a pathlib.Path)
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False             # load_checkpoint says what is wrong with the path
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path)


def _hash_field(digest):
    """How the header's JSON holds metadata[HASH_KEY] (safetensors writes it compact: no spaces)."""
    return b'"%s":"%s"' % (HASH_KEY.encode(), digest)


def seal_safetensors(data):
    """The bytes of safetensors.torch.save, whose metadata holds HASH_KEY as 64 zeros, with the zeros replaced by the
    SHA-256 of those bytes: the header keeps its length and stays valid JSON, and every byte of the file (header,
    padding and tensors) is covered."""
    header = data[8:8 + int.from_bytes(data[:8], "little")]
    field = _hash_field(b"0" * 64)
    if header.count(field) != 1:
        raise ValueError(f"the header does not hold {HASH_KEY} as 64 zeros once")
    at = 8 + header.index(field) + len(field) - 65
    return data[:at] + hashlib.sha256(data).hexdigest().encode() + data[at + 64:]


def write_safetensors(weights, metadata, path):
    """Write weights with string metadata as a safetensors file sealed with its SHA-256 (seal_safetensors),
    atomically; OSError if it cannot be written."""
    from safetensors.torch import save
    # contiguous copies on the CPU: safetensors stores dense row-major tensors and refuses shared memory
    weights = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in weights.items()}
    data = seal_safetensors(save(weights, metadata={**metadata, "format": SAFETENSORS_FORMAT, HASH_KEY: "0" * 64}))
    atomic_write(path, lambda f: f.write(data), binary=True)


def read_safetensors(path, with_metadata=False):
    """(EMA state dict, training configuration) of a file written by export.py, or CheckpointError in one
    sentence: a missing, truncated, damaged (its SHA-256 does not match) or foreign file.  A file written before
    exports carried their SHA-256 loads with a one-line note on stderr, once per process."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    if not os.path.isfile(path):
        raise CheckpointError(f"there is no safetensors file at {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from None
    unreadable = f"{path} is not a readable safetensors file; it may be truncated or another kind of file"
    try:
        length = int.from_bytes(data[:8], "little")
        if len(data) < 10 or not 2 <= length <= len(data) - 8:
            raise ValueError("its header length does not fit the file")
        metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("its metadata is not a dictionary")
    except (ValueError, AttributeError) as e:        # (json's errors are ValueErrors)
        raise CheckpointError(f"{unreadable} ({first_line(e)})") from None
    digest = metadata.get(HASH_KEY)
    if digest is not None:
        field = _hash_field(str(digest).encode())
        header = data[8:8 + length]
        if len(str(digest)) != 64 or header.count(field) != 1:
            raise CheckpointError(f"{path} is damaged: the SHA-256 it was saved with is unreadable")
        at = 8 + header.index(field) + len(field) - 65
        if hashlib.sha256(data[:at] + b"0" * 64 + data[at + 64:]).hexdigest() != digest:
            raise CheckpointError(f"{path} is damaged: its content does not match the SHA-256 it was saved with")
    elif metadata.get("format") == SAFETENSORS_FORMAT:
        raise CheckpointError(f"{path} is damaged: the SHA-256 it was saved with is missing from its metadata")
    try:
        weights = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{unreadable} ({first_line(e)})") from None
    if metadata.get("format") not in (SAFETENSORS_FORMAT,) + UNVERIFIED_SAFETENSORS_FORMATS:
        raise CheckpointError(f"{path} is a safetensors file but not one written by this repository's export.py "
                              f"(its metadata has no format {SAFETENSORS_FORMAT!r})")
    try:
        config = json.loads(metadata["config"])
        assert isinstance(config, dict)
    except (KeyError, TypeError, ValueError, AssertionError):
        raise CheckpointError(f"{path} was written by export.py but its configuration is missing or damaged") from None
    if digest is None and path not in _noted and int(os.environ.get("RANK", 0)) == 0:
        _noted.add(path)
        log.warning(f"note: {path} was written before exports carried a SHA-256 of their content, so it cannot be "
                    f"verified")
    return (weights, config, metadata) if with_metadata else (weights, config)


# ---- any weight file, and what is fitted to its weights ------------------------------------------------
def read_weights(path):
    """(EMA state dict, training configuration, the fit stored with them or None) of a checkpoint or of the
    safetensors file export.py makes of one; CheckpointError with one sentence if the file cannot be used or its
    weights are not finite."""
    if is_safetensors(path):
        weights, config, metadata = read_safetensors(path, with_metadata=True)
        weights = {name: value for name, value in weights.items() if not name.startswith(STUDENT_PREFIX)}
        stored = metadata.get("fit")
    else:
        ckpt = load_checkpoint(path)
        weights, config, stored = ckpt["ema"], ckpt["config"], ckpt.get("fit")
    if not all_finite(weights):
        raise CheckpointError(f"the weights in {path} are not finite (NaN or inf), so they cannot produce images")
    return weights, config, stored


def read_student(path):
    """The student distilled from the model in `path` (load_student's dict), or None if it has none: for a
    checkpoint the student file beside it (student_path), for an export the student's tensors and metadata in the
    same file (export.py).  CheckpointError if the student is damaged.  Whose student it is, is the caller's check."""
    if not is_safetensors(path):
        return load_student(student_path(path)) if os.path.exists(student_path(path)) else None
    weights, _, metadata = read_safetensors(path, with_metadata=True)
    if "student" not in metadata:
        return None
    try:
        state = json.loads(metadata["student"])
        assert isinstance(state, dict) and isinstance(state["teacher"], str) and isinstance(state["distill"], dict)
    except (ValueError, TypeError, KeyError, AssertionError):
        raise CheckpointError(f"the student stored in {path} is damaged; export the checkpoint again") from None
    state["student"] = {name[len(STUDENT_PREFIX):]: value for name, value in weights.items()
                        if name.startswith(STUDENT_PREFIX)}
    if not state["student"] or not all_finite(state["student"]):
        raise CheckpointError(f"the student stored in {path} is damaged: its weights are missing or not finite")
    return state


def weights_digest(weights):
    """SHA-256 of a state dict's names, dtypes, shapes and values: which weights a stored fit belongs to."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checked_fit(stored, weights_sha, path):
    """The fit stored in `path` (a dict, or its JSON in an export), if it belongs to the weights with this digest;
    None if there is none or it belongs to other weights (it is then made again when needed, never used).  A stored
    fit that is not what store_fit writes raises CheckpointError."""
    if stored is None:
        return None
    try:
        fit = json.loads(stored) if isinstance(stored, str) else stored
        assert isinstance(fit, dict) and isinstance(fit["weights"], str) and ("grid" in fit or "walk_power" in fit)
        if "grid" in fit:                                                              # fit_costs
            n = len(fit["grid"])
            assert n >= 2 and all(isinstance(t, int) for t in fit["grid"]) and fit["grid"] == sorted(fit["grid"])[::-1]
            assert len(fit["cost"]) == n and all(len(row) == n for row in fit["cost"]) and len(fit["cost_afs"]) == n
            assert all(math.isfinite(v) for row in fit["cost"] + [fit["cost_afs"]] for v in row)
        for steps, power in fit.get("walk_power", {}).items():                        # walk_power
            assert steps.isdigit() and int(steps) >= 1
            assert power == "karras" or (isinstance(power, float) and 0 < power <= 10)
    except (ValueError, TypeError, KeyError, AssertionError):
        raise CheckpointError(f"the fitted timesteps stored in {path} are damaged; export the checkpoint again or "
                              f"sample from the checkpoint itself") from None
    if fit["weights"] != weights_sha:
        log.warning(f"note: the timesteps fitted in {path} belong to other weights; they are fitted again when needed")
        return None
    return fit


def store_fit(path, fit, weights_sha, lock=None):
    """Keep a new fit with the weights of the file at `path` whose digest is weights_sha: in its checkpoint (without
    making it a new save: the previous one stays the previous) or in its safetensors file, rewritten atomically with
    the same weights.  Not while a training run holds the checkpoint's folder (it will write new weights, whose fit
    is another: `lock`, the lock file of the run folder that holds `path`, is then held), nor if the file no longer
    holds the weights the fit was made on; a fit that cannot be stored is used all the same, and made again next
    time."""
    if path is None or weights_sha is None:          # a pipeline built in memory (training's previews)
        return
    try:
        with open(lock, "a") if lock is not None and os.path.exists(lock) else contextlib.nullcontext() as held:
            if held is not None:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)     # released when the file closes
            if is_safetensors(path):
                weights, config, metadata = read_safetensors(path, with_metadata=True)
                if weights_digest(weights) != weights_sha:
                    return
                write_safetensors(weights, {**metadata, "fit": json.dumps(fit)}, path)
            else:
                state = load_checkpoint(path)
                if weights_digest(state["ema"]) != weights_sha:
                    return
                save_checkpoint({**state, "fit": fit}, path, keep_previous=False)
    except BlockingIOError:
        log.warning(f"note: a training run holds {os.path.dirname(path) or '.'}, so the fitted timesteps are not "
                    f"stored in {path}")
    except (OSError, CheckpointError) as e:
        log.warning(f"note: the fitted timesteps could not be stored in {path} ({first_line(e)})")
