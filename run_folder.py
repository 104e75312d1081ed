"""The output folder of a training run (training.py --out-dir, by default `default/`): what is in it, and the
lock that makes it one run's.

    OUT_DIR/ddpm_ckpt.pth              the checkpoint (checkpoint.py), which sampling.py and evaluate.py read
    OUT_DIR/ddpm_ckpt.prev.pth         the save before it (checkpoint.previous_path), kept by every save, so that a
                                       damaged checkpoint is not the end of the run
    OUT_DIR/loss_log.csv               one row an epoch: epoch, step, mean loss, images/s, seconds, and the FID
                                       where --fid-every measured it (empty elsewhere)
    OUT_DIR/loss_steps.csv             the mean loss of every 50 steps: step, epoch, loss, and the learning rate
                                       of the row's last step (lr)
    OUT_DIR/samples/epoch_NNN.png      grids of samples drawn during training
    OUT_DIR/.lock                      flock-ed by the run that owns the folder, with its PID inside (written
                                       once the run goes ahead: a refused --resume leaves every file as it was)

training.py takes the folder with take_run_folder, asks which checkpoint of it a run continues
(checkpoint_to_continue), saves it with write_checkpoint, and writes its logs' rows with log_epoch and log_steps.
Importing this module has no side effects; visualize.py reads the names of the logs from here.
"""
import csv
import fcntl
import os
import tempfile
import time

from checkpoint import CheckpointError, all_finite, load_checkpoint, save_checkpoint
from cli import atomic_write, fail

DEFAULT_OUT_DIR = "default"
CKPT_NAME = "ddpm_ckpt.pth"
PREV_CKPT_NAME = "ddpm_ckpt.prev.pth"       # checkpoint.previous_path(CKPT_NAME)
DEFAULT_CKPT = os.path.join(DEFAULT_OUT_DIR, CKPT_NAME)
LOSS_LOG_NAME = "loss_log.csv"
STEP_LOG_NAME = "loss_steps.csv"
LOCK_NAME = ".lock"
LOSS_LOG_HEADER = ["epoch", "step", "loss", "images_per_s", "seconds", "fid"]
STEP_LOG_HEADER = ["step", "epoch", "loss", "lr"]


def folder_lock(path):
    """The lock file of the run folder that holds the file at `path`."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), LOCK_NAME)


def check_writable(folder):
    """Fail before training, not after the first epoch, if the output folder cannot be written."""
    try:
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        fail(f"the output folder {folder} cannot be written ({e.strerror})")


_folder_lock = None       # the open OUT_DIR/.lock of this process's run, kept open until the process ends
_fork_hook = False        # whether _close_lock_file runs in forked children (registered with the first lock)


def lock_run_folder(folder):
    """One run per output folder: take an exclusive advisory lock (flock) on folder/.lock for the rest of the
    process's life; claim_run_folder() then writes this process's PID into it, once the run goes ahead (until
    then the file, if it was there, is unchanged: a run refused after locking, say for a damaged checkpoint,
    changes no file).  The kernel drops the lock when the process ends, however it ends, so a killed run never
    leaves a stale lock.  If another live run holds it, exit 1 with one sentence naming the folder and that
    run's PID."""
    global _folder_lock, _fork_hook
    _close_lock_file()                    # main() called again in the same process (tests)
    if not _fork_hook:
        os.register_at_fork(after_in_child=_close_lock_file)
        _fork_hook = True
    path = os.path.join(folder, LOCK_NAME)
    try:
        f = open(path, "a+")              # a+: create it, but never erase the PID of a run that holds it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(10):           # the holder writes its PID soon after locking; until then the file may
                f.seek(0)                 # hold the PID of an earlier run, which has ended
                holder = f.read().strip()
                if holder and _alive(holder):
                    break
                holder = ""
                time.sleep(0.05)
            f.close()
            fail(f"the output folder {folder} is in use by another training run (PID {holder or 'unknown'}); "
                 f"wait for it to end or stop it, or pass another --out-dir")
    except OSError as e:
        fail(f"cannot lock the output folder {folder} ({path}: {e.strerror})")
    _folder_lock = f


def _alive(pid):
    """Whether the text `pid` names a live process."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OverflowError):
        return False
    except PermissionError:       # alive, someone else's
        pass
    return True


def claim_run_folder():
    """Write this process's PID into the lock file that lock_run_folder locked, for a second run to name."""
    f = _folder_lock
    if f is not None:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()


def _close_lock_file():
    """Close this process's descriptor of the lock file.  Run in every forked child (DataLoader workers),
    where it does not unlock: flock's lock lives until the last descriptor of the file closes, so the run's
    own process then holds the only one, and the lock ends with it, not with the last of its children."""
    global _folder_lock
    if _folder_lock is not None:
        _folder_lock.close()
        _folder_lock = None


def take_run_folder(folder, resume, master):
    """Make the folder this run's before anything in it is read: one run per folder.  A --resume (`resume`) of a
    folder that does not exist fails (a mistyped folder is not created); rank 0 (`master`) checks that it can write
    there and locks it.  Returns the path of the folder's checkpoint."""
    ckpt_path = os.path.join(folder, CKPT_NAME)
    if resume and not os.path.isdir(folder):
        fail(f"cannot resume: there is no checkpoint at {ckpt_path}")
    if master:
        check_writable(folder)
        lock_run_folder(folder)
    return ckpt_path


def checkpoint_to_continue(ckpt_path, resume, overwrite, restart, launch):
    """(The checkpoint a training run continues, or None for a new run; whether the run is a torchrun restart that
    continues its own launch's checkpoint.)  --resume (`resume`) continues the checkpoint in --out-dir.  A torchrun
    restart (`restart`: TORCHELASTIC_RESTART_COUNT > 0, the same command line as the attempt before) continues the
    checkpoint its own launch saved (`launch`: hardware.launch_id), whatever the options; where its launch saved
    none, it starts as the first attempt did: it never starts over on top of its own run, and resumes a different
    run's checkpoint only with --resume.  Otherwise an existing checkpoint is replaced only with --overwrite."""
    exists = os.path.exists(ckpt_path)
    if not (resume or (restart and exists)):
        if exists and not overwrite:
            fail(f"{ckpt_path} already holds a training run; pass --resume to continue it, "
                 f"--overwrite to replace it, or --out-dir to train somewhere else")
        return None, False
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:
        fail(f"cannot resume: {e}")
    own = launch is not None and ckpt.get("launch_id") == launch
    if resume or own:
        return ckpt, bool(restart) and own
    if not overwrite:
        fail(f"{ckpt_path} already holds a training run, not one of this torchrun launch; pass --resume "
             f"to continue it, --overwrite to replace it, or --out-dir to train somewhere else")
    return None, False


def write_checkpoint(ckpt_path, ckpt):
    """Write a training run's checkpoint (checkpoint.save_checkpoint: atomically, the one before kept as
    ddpm_ckpt.prev.pth), once its weights and EMA are known finite.  If they are not, or the write fails, the run
    ends with one sentence, and the last good checkpoint is kept."""
    if not (all_finite(ckpt["model"]) and all_finite(ckpt["ema"])):
        fail(f"the weights are not finite at step {ckpt['step']}; the last good checkpoint {ckpt_path} is kept")
    try:
        save_checkpoint(ckpt, ckpt_path)
    except CheckpointError as e:
        fail(str(e))


def append_csv(path, header, row):
    """Append a row to a CSV file, writing the header first if the file is new."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)


def drop_log_rows_after(path, step):
    """On --resume from `step` (and on a torchrun restart): remove the rows of a log (loss_steps.csv,
    loss_log.csv) whose step is past the checkpoint's, which the stopped run wrote after its last save (a SIGKILL
    between a row and the next save), since the resumed run writes them again.  A row cut short by the kill goes
    too: a row is kept only if it is as long as the header (in loss_steps.csv 3 columns in a file written before
    the lr column, 4 since).  The file is replaced atomically, and only if a row goes."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    column = rows[0].index("step")

    def kept(row):
        try:
            return len(row) == len(rows[0]) and int(row[column]) <= step
        except ValueError:
            return False
    keep = rows[:1] + [row for row in rows[1:] if kept(row)]
    if len(keep) < len(rows):
        atomic_write(path, lambda f: csv.writer(f).writerows(keep))


def add_missing_columns(path, header):
    """On --resume of a run whose log was written before some of `header`'s columns existed (loss_log.csv without
    fid, loss_steps.csv without lr): rewrite it atomically with those columns, empty in the old rows, so that
    the rows the resumed run appends fit the header.  The old rows keep their values."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] == header:
        return
    old = rows[0]
    if old != header[:len(old)]:
        fail(f"{path} has the columns {','.join(old)}, not those training.py writes ({','.join(header)}); "
             f"move it away to resume")
    padding = [""] * (len(header) - len(old))
    atomic_write(path, lambda f: csv.writer(f).writerows([header] + [row + padding for row in rows[1:]]))


def log_epoch(folder, epoch, step, mean_loss, images_per_s, seconds, fid):
    """A row of loss_log.csv (rank 0); `fid` None leaves its column empty."""
    append_csv(os.path.join(folder, LOSS_LOG_NAME), LOSS_LOG_HEADER,
               [epoch, step, f"{mean_loss:.6f}", f"{images_per_s:.1f}", f"{seconds:.1f}",
                "" if fid is None else f"{fid:.6f}"])


def log_steps(folder, step, epoch, mean_loss, lr):
    """A row of loss_steps.csv (rank 0), every 50 steps: the mean loss of those steps, and the rate of the last."""
    append_csv(os.path.join(folder, STEP_LOG_NAME), STEP_LOG_HEADER, [step, epoch, f"{mean_loss:.6f}", repr(lr)])


def resume_logs(folder, step):
    """On --resume from `step` (and on a torchrun restart): the rows written after the checkpoint go, since the
    resumed run writes them again, and logs of older versions get the columns added since."""
    for log in (STEP_LOG_NAME, LOSS_LOG_NAME):
        drop_log_rows_after(os.path.join(folder, log), step)
    add_missing_columns(os.path.join(folder, STEP_LOG_NAME), STEP_LOG_HEADER)
    add_missing_columns(os.path.join(folder, LOSS_LOG_NAME), LOSS_LOG_HEADER)
