"""training.py's logs: the lr column of loss_steps.csv, the fid column of loss_log.csv (--fid-every), logs of older
runs brought up to date on --resume, and visualize.py loss drawing them."""
import csv
import json
import re
import shutil

import pytest

from conftest import run_script
from samplers import FID_SAMPLER
from test_scripts import assert_same_tensors, load
from training import DEFAULTS, learning_rate


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def own_data(data_dir, tmp_path):
    """A copy of the tiny data: --fid-every caches its classifier and test statistics in the data folder."""
    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    return folder


@pytest.mark.slow
def test_the_lr_column_is_the_rate_of_each_logged_step_across_a_resume_of_an_old_log(train_tiny, tmp_path):
    """Batches of 8 on 256 images: 32 steps an epoch, rows at steps 50 and 100.  The first run plans 2 epochs (64
    steps), the resumed one 4 (128): a linear decay is redrawn, and each row holds the rate its step used."""
    out, recipe = tmp_path / "run", ["--batch-size", "8", "--lr-schedule", "linear", "--warmup-steps", "60"]
    train_tiny(out, "--epochs", "2", *recipe)
    step_log, loss_log = out / "loss_steps.csv", out / "loss_log.csv"
    first = rows(step_log)
    assert [r["step"] for r in first] == ["50"] and list(first[0]) == ["step", "epoch", "loss", "lr"]
    # Make the logs look as a run of the previous version left them: no lr, no fid column.
    old_steps = [[r["step"], r["epoch"], r["loss"]] for r in first]
    with open(step_log, "w", newline="") as f:
        csv.writer(f).writerows([["step", "epoch", "loss"], *old_steps])
    old_epochs = [[r[k] for k in ("epoch", "step", "loss", "images_per_s", "seconds")] for r in rows(loss_log)]
    with open(loss_log, "w", newline="") as f:
        csv.writer(f).writerows([["epoch", "step", "loss", "images_per_s", "seconds"], *old_epochs])

    train_tiny(out, "--epochs", "4", "--resume", "--batch-size", "8")
    after = rows(step_log)
    assert [r["step"] for r in after] == ["50", "100"]
    assert [after[0]["step"], after[0]["epoch"], after[0]["loss"], after[0]["lr"]] == old_steps[0] + [""]
    config = {**DEFAULTS, "lr_schedule": "linear", "warmup_steps": 60}
    assert float(after[1]["lr"]) == learning_rate(config, 100 - 1, 4 * 32)
    epochs = rows(loss_log)
    assert [[r[k] for k in ("epoch", "step", "loss", "images_per_s", "seconds")] for r in epochs[:2]] == old_epochs
    assert [r["fid"] for r in epochs] == ["", "", "", ""] and [r["epoch"] for r in epochs] == ["1", "2", "3", "4"]

    # A run without a resume: every row's rate is learning_rate() of its step in a run of 128 steps.
    train_tiny(tmp_path / "straight", "--epochs", "4", *recipe)
    straight = rows(tmp_path / "straight" / "loss_steps.csv")
    assert [float(r["lr"]) for r in straight] == [learning_rate(config, s - 1, 128) for s in (50, 100)]
    assert float(straight[0]["lr"]) < config["lr"] and float(straight[1]["lr"]) < float(straight[0]["lr"])

    run_script("visualize.py", "loss", "--log", loss_log, "--out", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


FID_OPTIONS = ["--fid-samples", "20"]
SAMPLER = ["--sampler", FID_SAMPLER[0], "--steps", str(FID_SAMPLER[1])]       # what --fid-every samples with


@pytest.mark.slow
def test_fid_every_measures_at_the_last_epoch_and_equals_evaluate_py(train_tiny, own_data, tmp_path):
    out = tmp_path / "run"
    result = train_tiny(out, "--epochs", "2", "--fid-every", "1000", *FID_OPTIONS, "--data-dir", own_data)
    assert "classifier: training a small CNN" in result.stdout          # the first time: trained, and it says so
    log = rows(out / "loss_log.csv")
    assert [r["epoch"] for r in log] == ["1", "2"] and log[0]["fid"] == "" and float(log[1]["fid"]) > 0
    evaluated = json.loads(run_script(
        "evaluate.py", "--ckpt", out / "ddpm_ckpt.pth", *SAMPLER, "--num-samples", "20",
        "--seed", "0", "--precision", "fp32", "--features", "classifier", "--data-dir", own_data, "--json").stdout)
    assert log[1]["fid"] == f"{evaluated['generated']['fid']:.6f}"

    exported = tmp_path / "model.safetensors"
    run_script("export.py", "--ckpt", out / "ddpm_ckpt.pth", "--out", exported)
    from_file = json.loads(run_script(
        "evaluate.py", "--ckpt", exported, *SAMPLER, "--num-samples", "20",
        "--seed", "0", "--precision", "fp32", "--features", "classifier", "--data-dir", own_data, "--json").stdout)
    assert from_file["generated"] == evaluated["generated"]

    run_script("visualize.py", "loss", "--log", out / "loss_log.csv", "--out", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0

    # --max-minutes ends the run after its first step, mid-epoch (8 steps an epoch): the run's end is measured
    # all the same, in a row for the part of the epoch done; --resume completes the epoch and writes its own row.
    cut = tmp_path / "cut"
    train_tiny(cut, "--max-minutes", "0.000001", "--fid-every", "1000", *FID_OPTIONS, "--data-dir", own_data)
    log = rows(cut / "loss_log.csv")
    assert [(r["epoch"], r["step"]) for r in log] == [("0.12", "1")] and float(log[0]["fid"]) > 0
    assert load(cut / "ddpm_ckpt.pth")["fid_seconds"] == 0.0      # the interval starts again from this measurement
    train_tiny(cut, "--epochs", "1", "--resume", "--data-dir", own_data)
    assert [(r["epoch"], r["step"]) for r in rows(cut / "loss_log.csv")] == [("0.12", "1"), ("1", "8")]


@pytest.mark.slow
def test_fid_every_epoch_resumes_bit_exactly(train_tiny, own_data, tmp_path):
    """An interval shorter than any epoch: a measurement after every epoch.  Measuring leaves the training's random
    state alone, so a run stopped after 2 epochs and resumed ends as the straight run, FIDs included."""
    every = ["--fid-every", "0.000001", *FID_OPTIONS, "--data-dir", own_data, "--dropout", "0.1"]
    train_tiny(tmp_path / "straight", "--epochs", "3", *every)
    train_tiny(tmp_path / "stopped", "--epochs", "2", *every)
    train_tiny(tmp_path / "stopped", "--epochs", "3", "--resume", *every[:-2])
    a, b = load(tmp_path / "straight" / "ddpm_ckpt.pth"), load(tmp_path / "stopped" / "ddpm_ckpt.pth")
    for key in ("model", "ema", "optimizer", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])
    fids = [[r["fid"] for r in rows(tmp_path / name / "loss_log.csv")] for name in ("straight", "stopped")]
    assert fids[0] == fids[1] and all(float(f) > 0 for f in fids[0]) and len(fids[0]) == 3

    without = tmp_path / "without"                        # and the weights are those of a run that never measures
    train_tiny(without, "--epochs", "3", "--data-dir", own_data, "--dropout", "0.1")
    assert_same_tensors(load(without / "ddpm_ckpt.pth")["ema"], a["ema"])
    assert [r["fid"] for r in rows(without / "loss_log.csv")] == ["", "", ""]


@pytest.mark.slow
def test_fid_every_does_not_count_against_max_minutes(train_tiny, own_data, tmp_path):
    """A measurement after every epoch of a 3-second run: the epochs' own seconds still add up to the 3 seconds,
    however long the measurements took between them (here the first trains the classifier)."""
    out = tmp_path / "run"
    result = train_tiny(out, "--max-minutes", "0.05", "--fid-every", "0.000001", *FID_OPTIONS, "--data-dir", own_data)
    measured = sum(float(s) for s in re.findall(r"measured in ([0-9.]+) s", result.stdout))
    trained = sum(float(r["seconds"]) for r in rows(out / "loss_log.csv"))
    assert measured > 1.5, measured         # without the fix the epochs would have had 3 - measured seconds
    assert 2.5 < trained < 4.0, (trained, measured)
    assert 2.9 < load(out / "ddpm_ckpt.pth")["launch_seconds"] < 4.0


@pytest.mark.slow
def test_fid_every_needs_a_test_split(train_tiny, tmp_path):
    result = train_tiny(tmp_path / "run", "--fid-every", "5", "--data-dir", tmp_path / "nothing", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
