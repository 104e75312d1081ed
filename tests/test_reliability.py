"""Nothing lost: interrupted runs, atomic and failed checkpoint writes, damaged files, non-finite values."""
import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as checkpoint_module
import cli
from checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, previous_path, save_checkpoint
from conftest import ROOT, TINY_MODEL, run_script
from run_folder import CKPT_NAME, PREV_CKPT_NAME
from test_scripts import assert_same_tensors, load


def start_training(data_dir, out_dir, *extra):
    cmd = [sys.executable, "training.py", "--data-dir", data_dir, "--out-dir", str(out_dir), "--batch-size", "8",
           "--preview-samples", "0", *TINY_MODEL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,   # threads as in
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))   # run_script (conftest sets them): same sums


def wait_for_training_to_start(proc):
    for line in proc.stdout:
        if line.startswith("training on"):
            return
    raise AssertionError(f"training never started: {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_mid_epoch_and_resume_is_bit_exact(data_dir, tmp_path, signum, code):
    run_script("training.py", "--data-dir", data_dir, "--out-dir", tmp_path / "straight", "--batch-size", "8",
               "--preview-samples", "0", "--epochs", "2", "--lr-schedule", "linear", "--loss", "min-snr", *TINY_MODEL)
    with open(tmp_path / "straight" / "loss_steps.csv") as f:     # 64 steps: one row of the mean of steps 1..50
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["epoch"]) for r in rows] == [("50", "2")] and 0 < float(rows[0]["loss"]) < 10
    proc = start_training(data_dir, tmp_path / "stopped", "--epochs", "2", "--lr-schedule", "linear",
                          "--loss", "min-snr")
    wait_for_training_to_start(proc)
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "--resume" in err
    state = load(tmp_path / "stopped" / "ddpm_ckpt.pth")
    assert state["step"] < 2 * 256 // 8, "the run finished before the signal arrived"
    assert state["step"] == state["epoch"] * (256 // 8) + state["batch_in_epoch"]
    run_script("training.py", "--out-dir", tmp_path / "stopped", "--data-dir", data_dir, "--resume")
    a, b = load(tmp_path / "straight" / "ddpm_ckpt.pth"), load(tmp_path / "stopped" / "ddpm_ckpt.pth")
    for key in ("model", "ema", "optimizer", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])


@pytest.mark.slow
def test_second_ctrl_c_while_saving_does_not_corrupt(data_dir, tmp_path):
    proc = start_training(data_dir, tmp_path, "--epochs", "50")
    wait_for_training_to_start(proc)
    time.sleep(0.5)
    while proc.poll() is None:        # Ctrl-C held down: during the step, the save and the interpreter's shutdown
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert load_checkpoint(str(tmp_path / "ddpm_ckpt.pth"))["step"] > 0


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_dir, train_tiny, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "1")                   # 8 steps
    before = (out / "ddpm_ckpt.pth").read_bytes()
    import training
    import unet
    calls = {"n": 0}
    real_forward = unet.UNet.forward

    def forward_with_nan(self, x, t, y=None):           # a NaN in the prediction of the 3rd step after resuming
        calls["n"] += 1
        eps = real_forward(self, x, t, y)
        return eps * float("nan") if calls["n"] == 3 else eps

    monkeypatch.setattr(unet.UNet, "forward", forward_with_nan)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}   # main() installs its own
    try:
        with pytest.raises(SystemExit) as exit_info:
            training.main(["--out-dir", str(out), "--data-dir", data_dir, "--resume", "--epochs", "3"])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "at step 11" in err and "nan" in err and "kept" in err
    assert (out / "ddpm_ckpt.pth").read_bytes() == before


@pytest.mark.slow
def test_sampling_refuses_non_finite_weights(train_tiny, tmp_path):
    train_tiny(tmp_path / "run", "--epochs", "1")
    state = load(tmp_path / "run" / "ddpm_ckpt.pth")
    first = next(iter(state["ema"]))
    state["ema"][first] = torch.full_like(state["ema"][first], float("nan"))
    save_checkpoint(state, str(tmp_path / "nan.pth"))
    result = run_script("sampling.py", "--ckpt", tmp_path / "nan.pth", "--out-dir", tmp_path / "s", check=False)
    assert result.returncode == 1 and "not finite" in result.stderr and "Traceback" not in result.stderr


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ddpm_ckpt.pth"
    save_checkpoint({"v": torch.ones(3)}, str(path))
    before = path.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"v": torch.zeros(3)}, str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ddpm_ckpt.pth"]


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ddpm_ckpt.pth"
    save_checkpoint({"v": torch.ones(3)}, str(path))
    before = path.read_bytes()
    script = ("import sys, torch; sys.path.insert(0, %r); from checkpoint import save_checkpoint\n"
              "save_checkpoint({'big': torch.randn(300_000_000 // 4)}, %r)\n" % (ROOT, str(path)))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline and not any(n.endswith(".tmp") for n in os.listdir(tmp_path)):
        time.sleep(0.01)
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path)), "the save never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))


def test_unwritable_output_folder_fails_before_training(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_script("training.py", "--data-dir", data_dir, "--out-dir", blocker / "out", *TINY_MODEL, check=False)
    assert result.returncode == 1 and "cannot be written" in result.stderr and "Traceback" not in result.stderr
    assert "training on" not in result.stdout


@pytest.mark.slow
def test_max_minutes_stops_cleanly_mid_epoch_and_resume_finishes_the_run(data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["training.py", "--data-dir", data_dir, "--out-dir", out, "--batch-size", "8", "--preview-samples", "0",
              "--epochs", "1", *TINY_MODEL]
    result = run_script(*common, "--max-minutes", "0.0001")         # 6 ms: stops after the first step or two
    assert "--max-minutes 0.0001 reached" in result.stdout and "--resume" in result.stdout
    state = load(out / "ddpm_ckpt.pth")
    assert 1 <= state["step"] < 256 // 8 and state["epoch"] == 0
    assert state["step"] == state["batch_in_epoch"]
    run_script(*common, "--resume")
    state = load(out / "ddpm_ckpt.pth")
    assert state["step"] == 256 // 8 and state["epoch"] == 1


def tiny_run(data_dir, out_dir, *extra):
    """The options of start_training, for run_script."""
    return ["training.py", "--data-dir", data_dir, "--out-dir", out_dir, "--batch-size", "8", "--preview-samples", "0",
            *TINY_MODEL, *extra]


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_is_unharmed(data_dir, tmp_path):
    busy = tmp_path / "busy"
    first = start_training(data_dir, busy, "--epochs", "2")
    try:
        wait_for_training_to_start(first)
        first.send_signal(signal.SIGSTOP)          # it holds the folder, however fast it trains
        try:
            # a new run, and a --resume, which must be refused before it looks for a checkpoint (there is none yet)
            for extra in ([], ["--resume"]):
                result = run_script(*tiny_run(data_dir, busy, "--epochs", "2", *extra), check=False)
                lines = result.stderr.strip().splitlines()
                assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), \
                    (extra, result.stderr)
                assert str(busy) in lines[0] and f"PID {first.pid}" in lines[0], lines[0]
                assert "training on" not in result.stdout
            assert (busy / ".lock").read_text().strip() == str(first.pid)
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    run_script(*tiny_run(data_dir, tmp_path / "alone", "--epochs", "2"))
    a, b = load(tmp_path / "alone" / "ddpm_ckpt.pth"), load(busy / "ddpm_ckpt.pth")
    for key in ("model", "ema", "optimizer", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])


def test_the_lock_ends_with_the_run_not_with_a_forked_child(tmp_path, capsys):
    """A run's DataLoader workers are forked children; one that outlives a SIGKILLed run must not hold its folder."""
    import run_folder
    script = ("import os, sys, time; sys.path.insert(0, %r); import run_folder\n"
              "run_folder.lock_run_folder(%r)\n"
              "run_folder.claim_run_folder()\n"
              "ready, told = os.pipe()\n"
              "child = os.fork()\n"                     # the fork's hooks have run in the child once fork returns
              "if child == 0:\n    os.write(told, b'.'); time.sleep(120); os._exit(0)\n"
              "os.read(ready, 1)\n"                     # so wait for the child to run, however busy the machine
              "print(child, flush=True); time.sleep(120)\n" % (ROOT, str(tmp_path)))
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(run.stdout.readline())
        with pytest.raises(SystemExit) as refused:        # the run is alive: its folder is taken
            run_folder.lock_run_folder(str(tmp_path))
        assert refused.value.code == 1 and f"PID {run.pid}" in capsys.readouterr().err
        run.kill()
        run.wait()
        os.kill(child, 0)                                  # the child still lives ...
        run_folder.lock_run_folder(str(tmp_path))          # ... and the folder is free
        run_folder.claim_run_folder()
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        run.kill()
        if child:
            os.kill(child, signal.SIGKILL)
        run_folder._close_lock_file()                      # this test process lets go of the folder


@pytest.mark.slow
def test_sigkill_after_a_timed_save_leaves_no_lock_and_resume_is_bit_exact(data_dir, tmp_path):
    options = ["--epochs", "2", "--save-every-minutes", "0.003"]       # a save every 0.18 s
    killed = tmp_path / "killed"
    ckpt = killed / "ddpm_ckpt.pth"
    proc = start_training(data_dir, killed, *options)
    first_save = None
    try:
        wait_for_training_to_start(proc)
        deadline = time.time() + 300
        while first_save is None and proc.poll() is None and time.time() < deadline:
            state = load(ckpt) if ckpt.exists() else None
            if state is not None and state["step"] > 0:
                first_save = (state["epoch"], state["batch_in_epoch"])
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert first_save is not None and first_save[0] == 0 and first_save[1] > 0, \
        f"the first checkpoint (epoch, batch) {first_save} is not mid-epoch: the timer did not save"
    state = load(ckpt)
    assert 0 < state["step"] < 2 * 256 // 8
    assert (killed / ".lock").read_text().strip() == str(proc.pid)   # the file stays; the lock died with the run
    # The killed run may have logged a step after its last save (and been cut in the middle of the next row):
    # the resumed run writes those steps again, so they must go.
    step_log = killed / "loss_steps.csv"
    if not step_log.exists():
        step_log.write_text("step,epoch,loss\n")
    with open(step_log, "a") as f:
        f.write(f"{state['step'] + 1},{state['epoch'] + 1},9.999999\n{state['step'] + 2},{state['epoch']}")

    run_script(*tiny_run(data_dir, killed, *options, "--resume"))
    run_script(*tiny_run(data_dir, tmp_path / "straight", *options))
    a, b = load(tmp_path / "straight" / "ddpm_ckpt.pth"), load(ckpt)
    for key in ("model", "ema", "optimizer", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])
    assert step_log.read_text() == (tmp_path / "straight" / "loss_steps.csv").read_text()
    epoch_rows = [[(r["epoch"], r["step"], r["loss"]) for r in csv.DictReader(open(d / "loss_log.csv"))]
                  for d in (killed, tmp_path / "straight")]
    assert epoch_rows[0] == epoch_rows[1]


# ---- damaged files: the SHA-256 of checkpoints and exports, and the previous save ------------------------------
def flip_a_byte(data, rng):
    """`data` with the byte at a random position changed to another value."""
    changed = bytearray(data)
    position = rng.randrange(len(changed))
    changed[position] = (changed[position] + rng.randrange(1, 256)) % 256
    return bytes(changed)


def assert_refused_in_one_sentence(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and all(w in lines[0] for w in words), (lines[0], words)


@pytest.mark.slow
def test_a_checkpoint_with_any_one_byte_changed_is_refused_in_one_sentence(good_checkpoint, tmp_path):
    """torch.load does not check the zip's CRC-32s: every byte, the trailer and the zip's records included, is covered
    by the SHA-256 at the end of the file."""
    data, rng = good_checkpoint.read_bytes(), random.Random(32)
    bad = tmp_path / "bad.pth"
    for i in range(100):
        bad.write_bytes(flip_a_byte(data, rng))
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(str(bad))
        assert f"{bad} is damaged: " in str(refused.value) and "\n" not in str(refused.value)
        if i < 2:                          # through the scripts, as a user meets it: one sentence, exit 1
            result = run_script("sampling.py", "--ckpt", bad, "--out-dir", tmp_path / "s", check=False)
            assert_refused_in_one_sentence(result, f"{bad} is damaged")
            assert not (tmp_path / "s").exists()
    result = run_script("export.py", "--ckpt", bad, "--out", tmp_path / "m.safetensors", check=False)
    assert_refused_in_one_sentence(result, f"{bad} is damaged")
    assert not (tmp_path / "m.safetensors").exists()


def files_of(folder):
    """{path: (bytes, mtime)} of every file below `folder`."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_resume_of_a_damaged_checkpoint_changes_no_file_and_says_how_to_go_on_from_the_previous_save(train_tiny,
                                                                                                    tmp_path):
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "2")            # two saves: the second keeps the first as ddpm_ckpt.prev.pth
    ckpt, prev = out / CKPT_NAME, out / PREV_CKPT_NAME
    assert load_checkpoint(str(prev))["step"] == 8 and load_checkpoint(str(ckpt))["step"] == 16
    damaged = bytearray(ckpt.read_bytes())
    damaged[len(damaged) // 3] ^= 0x10
    ckpt.write_bytes(damaged)
    before = files_of(out)
    result = train_tiny(out, "--resume", "--epochs", "3", check=False)
    assert_refused_in_one_sentence(result, "cannot resume: ", f"{ckpt} is damaged: its content does not match the "
                                   f"SHA-256 it was saved with", f"the previous save {prev} (step 8) is intact: "
                                   f"move it onto {ckpt} to continue from it")
    assert "training on" not in result.stdout
    assert files_of(out) == before, "a refused --resume changed a file (the checkpoint, a log, the lock, ...)"
    os.replace(prev, ckpt)                      # as the sentence says
    train_tiny(out, "--resume", "--epochs", "3")
    assert load_checkpoint(str(ckpt))["step"] == 24


def test_each_save_keeps_the_one_before_and_a_save_that_fails_halfway_leaves_both(tmp_path, monkeypatch):
    path, prev = tmp_path / CKPT_NAME, tmp_path / PREV_CKPT_NAME
    assert previous_path(str(path)) == str(prev)          # the name run_folder.py gives it

    def state(step):
        return dict(format=CHECKPOINT_FORMAT, config={}, model={"w": torch.full((3,), float(step))}, ema={},
                    optimizer={}, epoch=0, batch_in_epoch=step, step=step)
    save_checkpoint(state(1), str(path))
    assert not prev.exists()
    save_checkpoint(state(2), str(path))
    assert load_checkpoint(str(prev))["step"] == 1 and load_checkpoint(str(path))["step"] == 2
    kept = {p: p.read_bytes() for p in (path, prev)}

    def dies_in_torch_save(obj, f):
        f.write(b"partial data")
        raise RuntimeError("killed halfway")
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module.torch, "save", dies_in_torch_save)
        with pytest.raises(CheckpointError, match="killed halfway"):
            save_checkpoint(state(3), str(path))
    assert {p: p.read_bytes() for p in (path, prev)} == kept and sorted(os.listdir(tmp_path)) == sorted(
        [CKPT_NAME, PREV_CKPT_NAME])

    real_replace = os.replace

    def dies_at_the_last_rename(src, dst):
        if str(dst) == str(path):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)
    with monkeypatch.context() as m:          # the previous save has moved on, the new one never arrives
        m.setattr(cli.os, "replace", dies_at_the_last_rename)
        with pytest.raises(CheckpointError, match="Input/output error"):
            save_checkpoint(state(3), str(path))
    assert path.read_bytes() == kept[path] and load_checkpoint(str(prev))["step"] == 2
    assert sorted(os.listdir(tmp_path)) == sorted([CKPT_NAME, PREV_CKPT_NAME])

    with monkeypatch.context() as m:          # a file system without hard links: the previous save is copied
        m.setattr(cli.os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
        save_checkpoint(state(4), str(path))
    assert load_checkpoint(str(prev))["step"] == 2 and load_checkpoint(str(path))["step"] == 4
    assert sorted(os.listdir(tmp_path)) == sorted([CKPT_NAME, PREV_CKPT_NAME])


def test_files_of_before_the_sha256_still_load_and_say_once_that_they_cannot_be_verified(good_checkpoint, tmp_path,
                                                                                        caplog):
    """A checkpoint and an export as the code before the SHA-256 wrote them (format v1, torch.save and
    safetensors' save as they come); a file of the new format without its SHA-256 is refused as damaged."""
    from safetensors.torch import save_file

    from checkpoint import read_safetensors
    state = load(good_checkpoint)
    for key in ("launch_id", "launch_seconds"):
        state.pop(key, None)                        # (fields added since)
    state["format"] = "ddpm-checkpoint-v1"
    old_ckpt, old_export = tmp_path / "old.pth", tmp_path / "old.safetensors"
    torch.save(state, old_ckpt)
    save_file({k: v.contiguous() for k, v in state["ema"].items()}, str(old_export),
              metadata={"format": "ddpm-ema-v1", "config": json.dumps(state["config"]), "prediction": "eps"})
    caplog.set_level("INFO", logger="ddpm")
    for _ in range(2):
        assert_same_tensors(load_checkpoint(str(old_ckpt))["ema"], state["ema"])
        weights, config = read_safetensors(str(old_export))
        assert_same_tensors(weights, state["ema"])
        assert config == state["config"]
    notes = [record.getMessage() for record in caplog.records]
    assert notes == [f"note: {old_ckpt} was written before checkpoints carried a SHA-256 of their content, so it "
                   f"cannot be verified", f"note: {old_export} was written before exports carried a SHA-256 of their "
                   f"content, so it cannot be verified"]

    state["format"] = CHECKPOINT_FORMAT           # the new format, its trailer gone
    torch.save(state, old_ckpt)
    with pytest.raises(CheckpointError, match="is damaged: the SHA-256 it was saved with is missing"):
        load_checkpoint(str(old_ckpt))
