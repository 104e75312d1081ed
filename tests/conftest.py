"""Shared fixtures: tiny MNIST-format IDX files written by the tests, and a runner for the scripts."""
import os
import struct
import subprocess
import sys
import tempfile

# pytest.ini runs the tests in pytest-xdist workers, one per core (at most 4).  Each worker and every script it
# starts gets its share of the cores, set before numpy and torch start their thread pools: two torch processes that
# each spin OpenMP threads on all cores slow each other ten times and more.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = str(max(1, len(os.sched_getaffinity(0)) // WORKERS))
os.environ["OMP_NUM_THREADS"] = THREADS

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The speed probe's verdicts (hardware.choose_speed) are kept here for the whole session, not in the user's ~/.cache:
# every script the tests run on one machine then agrees on the precision, whatever the machine's load.
os.environ.setdefault("DDPM_CACHE_DIR", tempfile.mkdtemp(prefix="ddpm-speed-probe-"))

# A tiny model and schedule, so that every script runs in seconds on two cores.
TINY_MODEL = ["--channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--num-timesteps", "50"]


def write_idx(folder, prefix, images, labels):
    """Write images (N, 28, 28) uint8 and labels (N,) in the IDX format MNIST ships in."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, len(images), 28, 28))
        f.write(images.astype(np.uint8).tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x00000801, len(labels)))
        f.write(labels.astype(np.uint8).tobytes())


def make_digits(n, seed):
    """n images of bright bars whose position encodes a label 0..9 (easy structure, like digits)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * label
        images[i, row:row + 3, 4:24] = 255
        images[i] += rng.integers(0, 30, (28, 28), dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder holding a tiny MNIST (256 training and 64 test images) in data/MNIST/raw/."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    write_idx(raw, "train", *make_digits(256, 0))
    write_idx(raw, "t10k", *make_digits(64, 1))
    return str(root)


def run_script(*args, check=True, timeout=600):
    """Run a script as a user would, from the repository root, offline: returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",          # OMP_NUM_THREADS: set above, for every script
               # no downloads in tests, even on a machine with internet
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="")
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture
def train_tiny(data_dir):
    """train_tiny(out_dir, *extra) trains the tiny model on the tiny data."""
    def train(out_dir, *extra, check=True):
        return run_script("training.py", "--data-dir", data_dir, "--out-dir", out_dir, "--batch-size", "32",
                          "--preview-samples", "4", "--preview-steps", "2", *TINY_MODEL, *extra, check=check)
    return train


@pytest.fixture(scope="session")
def good_checkpoint(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("good")
    run_script("training.py", "--data-dir", data_dir, "--out-dir", out, "--batch-size", "64", "--epochs", "1",
               "--preview-samples", "0", *TINY_MODEL)
    return out / "ddpm_ckpt.pth"
