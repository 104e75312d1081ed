"""What the scripts share on the command line and on disk: argument types, the --device and --precision
options, the one-sentence error, the modules' log, and the atomic file write.

    python -c "import cli; print(cli.positive_int('3'))"
"""
import argparse
import logging
import os
import shutil
import sys
import tempfile


# ---- argument types (argparse names each in its message: "invalid positive_float value") ------------------
def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def add_device_options(parser, precision_help, precisions=("auto", "bf16", "fp32")):
    """--device and --precision (hardware.pick_device and hardware.choose_speed read them)."""
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default="auto", choices=list(precisions), help=precision_help)


# ---- errors ------------------------------------------------------------------------------------------------
def fail(message, code=1):
    """One clear sentence on stderr, 'error: ...', and a non-zero exit; under torchrun from rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def first_line(exc):
    """An exception's message as it goes into an error sentence: its first line, or its type's name if it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- what the modules have to say -------------------------------------------------------------------------
# Every module logs through its own logger under "ddpm" (logger(__name__): "ddpm.sampling", "ddpm.checkpoint", ...).
# Used from Python, the modules are quiet, as a library is: "ddpm" has a NullHandler, so nothing reaches stderr
# unless the program configures logging (logging.basicConfig() shows the warnings; show_log() everything, as the
# scripts do).
LOG_NAME = "ddpm"
logging.getLogger(LOG_NAME).addHandler(logging.NullHandler())


def logger(module_name):
    """The logger of a module: logger(__name__)."""
    return logging.getLogger(f"{LOG_NAME}.{module_name}")


class _StderrHandler(logging.StreamHandler):
    """Plain lines on whatever sys.stderr is when a record comes (pytest and notebooks replace it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def show_log(level=logging.INFO):
    """Show what the modules log, from `level` up, on stderr as plain lines: what the scripts print besides their
    own output ("sampling on cpu in fp32 ...", notes about the files they read).  Called by each script's main()."""
    root = logging.getLogger(LOG_NAME)
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        root.addHandler(_StderrHandler())
    root.setLevel(level)


# ---- files -------------------------------------------------------------------------------------------------
def atomic_write(path, write, binary=False, previous=None):
    """Write a file whole or not at all: write(f) fills a hidden temporary file beside `path` (ending in .tmp),
    which is flushed to disk and renamed over `path`, and then the rename itself is made durable.  On any error
    the file at `path` is as it was, the temporary file is removed, and the error is raised.
    With `previous`, the file that was at `path` is kept under that name: just before the new file's rename, it is
    hard-linked to a temporary name (copied where the file system has no hard links) that is renamed onto
    `previous`.  At every moment both names hold a complete file, so a write that dies halfway leaves both."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.isfile(path):
            _keep_as(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)              # make the renames durable
    finally:
        os.close(dir_fd)


def _keep_as(path, previous):
    """Put the file at `path` also under the name `previous`, atomically: a hard link (or, where links are not
    possible, a copy flushed to disk) under a hidden temporary name, renamed onto `previous`."""
    folder = os.path.dirname(os.path.abspath(previous))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(previous) + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.remove(tmp)                # os.link wants a free name
        try:
            os.link(path, tmp)
        except OSError:               # no hard links here (some network and FUSE file systems, ...)
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, previous)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
