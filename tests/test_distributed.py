"""Data-parallel training under torchrun: two CPU processes (gloo); killed, stopped and restarted processes."""
import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import ROOT, TINY_MODEL, run_script
from test_scripts import assert_same_tensors, load


def torchrun(*args, check=True):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, check=check)


@pytest.mark.slow
def test_torchrun_trains_resumes_and_the_checkpoint_samples(data_dir, tmp_path):
    out = tmp_path / "ddp"
    common = ["training.py", "--data-dir", data_dir, "--out-dir", out, "--batch-size", "32",
              "--preview-samples", "4", "--preview-steps", "2", *TINY_MODEL]
    first = torchrun(*common, "--epochs", "1")
    assert first.stdout.count("training on") == 1, "only rank 0 prints"
    assert "2 process(es)" in first.stdout
    state = load(out / "ddpm_ckpt.pth")
    assert state["step"] == 256 // 32 and len(state["rng"]) == 2          # one random state per process
    assert not any(k.startswith("module.") for k in state["model"]), "the plain model is saved, not the DDP wrapper"
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"]))

    torchrun(*common, "--epochs", "2", "--resume")
    assert load(out / "ddpm_ckpt.pth")["step"] == 2 * (256 // 32)
    run_script("sampling.py", "--ckpt", out / "ddpm_ckpt.pth", "--out-dir", tmp_path / "s", "--num-samples", "4")
    assert (tmp_path / "s" / "x0_0.png").exists()


@pytest.mark.slow
def test_torchrun_with_fid_every_measures_once_on_rank_0(data_dir, tmp_path):
    """--fid-every under torchrun: rank 0 measures (and says so once) while rank 1 waits at the barrier; both go on
    to save and exit 0, and the row holds the figure."""
    own = tmp_path / "data"                         # the FID's classifier and test statistics are cached here
    shutil.copytree(data_dir, own)
    out = tmp_path / "ddp"
    result = torchrun("training.py", "--data-dir", own, "--out-dir", out, "--batch-size", "32", "--preview-samples",
                      "0", *TINY_MODEL, "--epochs", "1", "--fid-every", "1000", "--fid-samples", "20")
    assert result.stdout.count("measured in") == 1
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert len(rows) == 1 and float(rows[0]["fid"]) > 0 and load(out / "ddpm_ckpt.pth")["step"] == 256 // 32


def test_each_process_sees_its_own_shard_of_every_batch():
    from dataset import shard
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    for batch in (0, 7):
        whole = shard(order, batch, 64, 0, 1)
        parts = [shard(order, batch, 64, rank, 4) for rank in range(4)]
        assert all(len(p) == 16 for p in parts)
        assert torch.equal(torch.cat(parts), whole)                      # disjoint, and together the batch
        assert torch.equal(whole, order[batch * 64:(batch + 1) * 64])


# ---- faults under torchrun: killed and stopped processes --------------------------------------------------------
class Launch:
    """A torchrun launch of 2 processes in the background, its output (stdout and stderr) collected line by line."""

    def __init__(self, *args, max_restarts=0, env=None):
        self.lines, self.times = [], []         # each line, and when it came
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             f"--max-restarts={max_restarts}", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {})))
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            self.times.append(time.monotonic())
            self.lines.append(line)

    def wait_for(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"{what} never came:\n{self.output()}"
            time.sleep(0.01)

    def said(self, text):
        return any(text in line for line in list(self.lines))

    def line(self, text):
        """(when, line) of the first line that holds `text`."""
        return next((when, line) for when, line in zip(self.times, self.lines) if text in line)

    def output(self):
        return "".join(self.lines)

    def workers(self):
        """{rank: pid} of the processes torchrun runs now: its children, by their RANK."""
        found = {}
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != self.proc.pid:
                        continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
                found[int(env[b"RANK"])] = int(entry)
            except (OSError, ValueError, IndexError, KeyError):
                continue
        return found

    def signal_rank(self, rank, signum):
        self.wait_for(lambda: rank in self.workers(), f"process {rank}")
        os.kill(self.workers()[rank], signum)

    def finish(self, timeout=300):
        """torchrun's exit code, once it ends."""
        self.proc.wait(timeout)
        time.sleep(0.1)                         # the last lines
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Whatever happened, nothing of the launch is left running (its processes are in their own session)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# Test-only: a disk that turns slow under the checkpoint's temporary file while the file FLAG exists, so that a
# process can be killed in the middle of a save.  Python imports sitecustomize from PYTHONPATH at start-up.
SLOW_DISK = """import os, time
_fsync, _flag = os.fsync, os.environ["DDPM_TEST_SLOW_DISK"]
def fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if ".ddpm_ckpt.pth." in name and os.path.exists(_flag):
        time.sleep(5)
    return _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.slow
def test_torchrun_restarts_a_run_killed_three_times_and_it_ends_as_planned(data_dir, tmp_path):
    """torchrun --max-restarts 3 and one process SIGKILLed three times: right after a timed save, in the middle
    of training, and in the middle of a save.  Each restart resumes the checkpoint of its own launch; the run ends
    with the planned steps, bit for bit the run that was never killed, and its logs have each row once."""
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SLOW_DISK)
    flag = tmp_path / "slow_disk"
    options = ["training.py", "--data-dir", data_dir, "--batch-size", "8", "--preview-samples", "0", *TINY_MODEL,
               "--epochs", "4", "--save-every-minutes", "0.005"]           # 32 steps an epoch, a save every 0.3 s
    out = tmp_path / "killed"
    ckpt = out / "ddpm_ckpt.pth"
    # (--dist-timeout: when process 0 dies in the middle of a save, process 1 waits that long for it, or until
    # torchrun's SIGKILL 30 s after its SIGTERM)
    with Launch(*options, "--out-dir", out, "--dist-timeout", "0.1", max_restarts=3,
                env=dict(PYTHONPATH=str(tmp_path / "shim"), DDPM_TEST_SLOW_DISK=str(flag))) as run:
        run.wait_for(lambda: ckpt.exists() and load(ckpt)["step"] > 0, "a timed save")
        run.signal_rank(1, signal.SIGKILL)                              # 1: right after a save
        run.wait_for(lambda: run.said("torchrun restart 1: resuming"), "the first restart")
        time.sleep(1.0)
        run.signal_rank(0, signal.SIGKILL)                              # 2: in the middle of training
        run.wait_for(lambda: run.said("torchrun restart 2: resuming"), "the second restart")
        flag.touch()                                                    # 3: in the middle of a save
        writing = lambda: [n for n in os.listdir(out) if n.startswith(".ddpm_ckpt.pth.")]  # noqa: E731
        run.wait_for(writing, "a save")
        run.signal_rank(0, signal.SIGKILL)
        time.sleep(0.5)
        assert writing(), "the save had ended before the kill"
        flag.unlink()
        load_checkpoint(str(ckpt))                                      # the last complete save is intact
        assert run.finish() == 0, run.output()
    assert run.said("torchrun restart 3: resuming") and run.output().count("training on") == 4
    assert "already holds a training run" not in run.output()
    straight = tmp_path / "straight"
    with Launch(*options, "--out-dir", straight) as alone:
        assert alone.finish() == 0, alone.output()
    a, b = load_checkpoint(str(ckpt)), load_checkpoint(str(straight / "ddpm_ckpt.pth"))
    assert a["step"] == 4 * 32 and a["epoch"] == 4
    for key in ("model", "ema", "optimizer", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])
    assert [row["step"] for row in csv.DictReader(open(out / "loss_steps.csv"))] == ["50", "100"]
    assert (out / "loss_steps.csv").read_text() == (straight / "loss_steps.csv").read_text()
    epochs = [[(r["epoch"], r["step"], r["loss"]) for r in csv.DictReader(open(d / "loss_log.csv"))]
              for d in (out, straight)]
    assert epochs[0] == epochs[1] and [e[:2] for e in epochs[0]] == [(str(e), str(32 * e)) for e in range(1, 5)]
    assert load_checkpoint(str(out / "ddpm_ckpt.prev.pth"))["step"] < a["step"]


@pytest.mark.slow
def test_a_torchrun_restart_trains_the_rest_of_the_max_minutes_not_all_of_them_again(data_dir, tmp_path):
    """--max-minutes over a restart: the checkpoint carries the seconds its launch trained, and the restarted
    attempt trains what is left of them (a manual --resume --max-minutes M would train M more)."""
    out = tmp_path / "run"
    ckpt = out / "ddpm_ckpt.pth"
    with Launch("training.py", "--data-dir", data_dir, "--out-dir", out, "--batch-size", "8", "--preview-samples",
                "0", *TINY_MODEL, "--max-minutes", "0.15", "--save-every-minutes", "0.01", max_restarts=1) as run:
        run.wait_for(lambda: ckpt.exists() and load(ckpt)["launch_seconds"] > 3, "a save 3 s into the run")
        run.signal_rank(1, signal.SIGKILL)
        assert run.finish() == 0, run.output()
    resumed, line = run.line("torchrun restart 1: resuming")
    spent = float(line.split("which this launch saved after ")[1].split()[0])   # by the first attempt, at its save
    ended, _ = run.line("--max-minutes 0.15 reached")
    # (the save waited for had launch_seconds > 3; the line prints it to 0.1 s, so 3.04 s reads "3.0")
    assert spent >= 3 and ended - resumed < 9 - spent + 1.5, (spent, ended - resumed)    # the rest of the 9 s
    state = load_checkpoint(str(ckpt))
    assert 9 <= state["launch_seconds"] < 10.5 and run.output().count("--max-minutes 0.15 reached") == 1
    assert state["step"] == state["epoch"] * 32 + state["batch_in_epoch"]


@pytest.mark.slow
def test_a_stopped_process_makes_the_run_fail_within_the_dist_timeout(data_dir, tmp_path):
    """A SIGSTOPped process does not die, so torchrun sees nothing; the other one gives up after --dist-timeout
    (15 s here), with one sentence and exit 1, and torchrun, with no restart left, ends the run non-zero."""
    with Launch("training.py", "--data-dir", data_dir, "--out-dir", tmp_path / "run", "--batch-size", "8",
                "--preview-samples", "0", *TINY_MODEL, "--epochs", "50", "--dist-timeout", "0.25") as run:
        run.wait_for(lambda: (tmp_path / "run" / "ddpm_ckpt.pth").exists(), "the first epoch")
        run.signal_rank(1, signal.SIGSTOP)
        stopped = time.monotonic()
        lost = "error: process 0 lost the run's other processes (Timed out waiting 15000ms"
        run.wait_for(lambda: run.said(lost), "process 0's error", timeout=60)
        waited = time.monotonic() - stopped
        run.signal_rank(1, signal.SIGCONT)     # (else torchrun's SIGTERM waits for it 30 s before its SIGKILL)
        assert run.finish(timeout=60) != 0
    assert 14 < waited < 25, waited
    assert time.monotonic() - stopped < 120
    assert [line for line in run.lines if line.startswith("error: process 0")][0].endswith(
        "it exits 1, so that torchrun --max-restarts can restart the run from its last checkpoint\n")


@pytest.mark.slow
def test_the_others_wait_for_rank_0_alone_as_long_as_it_lives(tmp_path):
    """hardware.on_rank_0: rank 0's work (an FID measurement, a sample grid, a checkpoint write) may take longer
    than the timeout, and the others wait; when rank 0 stops in the middle of it, they give up after the timeout."""
    script = tmp_path / "rank0.py"
    script.write_text(f"""import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import hardware
rank, world, device = hardware.setup_distributed("cpu", 0.05)          # 3 s
print(rank, "slept:", hardware.on_rank_0(lambda: time.sleep(6) or "yes"), flush=True)
start = time.monotonic()
try:
    hardware.on_rank_0(lambda: os.kill(os.getpid(), signal.SIGSTOP))
except hardware.PeerLost as e:
    print(rank, "gave up after", round(time.monotonic() - start, 1), "s:", e, flush=True)
    sys.exit(3)
""")
    with Launch(script) as run:
        run.wait_for(lambda: run.said("1 gave up after"), "process 1 giving up", timeout=60)
        run.signal_rank(0, signal.SIGKILL)
        run.finish(timeout=60)
    assert run.said("0 slept: yes") and run.said("1 slept: None"), run.output()
    line = next(line for line in run.lines if line.startswith("1 gave up after"))
    assert 3 <= float(line.split()[4]) < 6 and "process 0 has not been heard from for 0.05 minutes" in line, line
