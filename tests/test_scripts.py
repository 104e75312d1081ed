"""training.py and sampling.py end to end, run as a user runs them, on tiny IDX files."""
import csv
import os
import pickle

import pytest
import torch
from PIL import Image

from checkpoint import save_checkpoint
from conftest import run_script


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    """Recursively: every tensor bit-for-bit equal."""
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


@pytest.mark.slow
def test_train_resume_and_sample_end_to_end(train_tiny, tmp_path):
    out = tmp_path / "run"
    first = train_tiny(out, "--epochs", "1")
    ckpt = out / "ddpm_ckpt.pth"
    assert ckpt.exists() and (out / "samples" / "epoch_001.png").exists()
    assert "epoch 1: loss" in first.stdout
    state = load(ckpt)
    assert state["epoch"] == 1 and state["step"] == 256 // 32 and state["config"]["base_channels"] == 8

    train_tiny(out, "--epochs", "2", "--resume")
    state = load(ckpt)
    assert state["epoch"] == 2 and state["step"] == 2 * (256 // 32)
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)

    samples = tmp_path / "samples"
    result = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", samples, "--num-samples", "20",
                        "--batch-size", "8", "--save-every", "10", "--individual")
    grid = Image.open(samples / "x0_0.png")
    assert grid.size == (10 * 30 + 2, 2 * 30 + 2)          # 10 columns of 28 px + 2 px padding, 2 rows
    assert str(samples / "x0_0.png") in result.stdout
    assert sorted(os.listdir(samples / "individual")) == [f"{i:05d}.png" for i in range(20)]
    assert Image.open(samples / "individual" / "00000.png").size == (28, 28)
    for t in (10, 20, 30, 40):                               # T = 50 in the tiny configuration
        assert Image.open(samples / f"x0_{t}.png").size == grid.size


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(train_tiny, tmp_path):
    train_tiny(tmp_path / "run", "--epochs", "1")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_script("sampling.py", "--ckpt", tmp_path / "run" / "ddpm_ckpt.pth", "--out-dir", tmp_path / name,
                   "--num-samples", "10", "--seed", seed, "--precision", "fp32")
    a, b, c = (open(tmp_path / n / "x0_0.png", "rb").read() for n in "abc")
    assert a == b and a != c


@pytest.mark.slow
def test_resume_is_bit_exact(train_tiny, tmp_path):
    """A run of 1 epoch, resumed with --epochs 2, ends with the same weights as a run of 2 epochs, when the
    learning rate does not depend on the run's length (a linear decay restarts when --epochs grows; the
    signal tests of test_reliability.py pin bit-exact resume for it)."""
    train_tiny(tmp_path / "straight", "--epochs", "2", "--dropout", "0.1", "--lr-schedule", "constant")
    train_tiny(tmp_path / "stopped", "--epochs", "1", "--dropout", "0.1", "--lr-schedule", "constant")
    train_tiny(tmp_path / "stopped", "--epochs", "2", "--resume")
    a, b = load(tmp_path / "straight" / "ddpm_ckpt.pth"), load(tmp_path / "stopped" / "ddpm_ckpt.pth")
    for key in ("model", "ema", "optimizer", "rng", "step", "epoch"):
        assert_same_tensors(a[key], b[key])


def test_resume_without_checkpoint_is_an_error(train_tiny, tmp_path):
    result = train_tiny(tmp_path / "empty", "--resume", check=False)
    assert result.returncode != 0 and "cannot resume" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "empty" / "ddpm_ckpt.pth").exists()


@pytest.mark.slow
def test_new_run_does_not_overwrite_an_existing_checkpoint(train_tiny, tmp_path):
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "1")
    before = (out / "ddpm_ckpt.pth").read_bytes()
    result = train_tiny(out, "--epochs", "1", check=False)
    assert result.returncode != 0 and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert (out / "ddpm_ckpt.pth").read_bytes() == before


@pytest.mark.slow
def test_resume_with_contradicting_options_names_them(train_tiny, tmp_path):
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "1")
    before = (out / "ddpm_ckpt.pth").read_bytes()
    result = train_tiny(out, "--epochs", "2", "--resume", "--channels", "16", "--schedule", "cosine",
                        "--dataset", "fashion-mnist", "--image-size", "32", check=False)
    assert result.returncode == 2
    assert ("--channels 16 (checkpoint: 8)" in result.stderr
            and "--schedule cosine (checkpoint: linear)" in result.stderr)
    assert "--dataset fashion-mnist (checkpoint: mnist)" in result.stderr
    assert "--image-size 32 (checkpoint: 28)" in result.stderr
    assert (out / "ddpm_ckpt.pth").read_bytes() == before


def test_missing_data_gives_one_clear_message(tmp_path):
    result = run_script("training.py", "--data-dir", tmp_path / "nodata", "--out-dir", tmp_path / "out",
                        "--epochs", "1", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert os.path.join(str(tmp_path / "nodata"), "MNIST", "raw") in result.stderr
    assert "train-images-idx3-ubyte" in result.stderr
    assert not (tmp_path / "out" / "ddpm_ckpt.pth").exists()


class Evil:
    """A pickle that would create a file if it were ever unpickled with code execution allowed."""
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_checkpoints(folder, good):
    data = good.read_bytes()
    files = {
        "missing": folder / "missing.pth",
        "folder": folder / "a_folder",
        "empty": folder / "empty.pth",
        "text": folder / "text.pth",
        "foreign": folder / "foreign.pth",
        "optimizer_only": folder / "optimizer_only.pth",
        "evil": folder / "evil.pth",
    }
    files["folder"].mkdir()
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, files["foreign"])
    torch.save({"optimizer": load(good)["optimizer"]}, files["optimizer_only"])
    mismatched = load(good)
    mismatched["config"]["base_channels"] *= 2          # weights no longer fit the configuration
    files["mismatched"] = folder / "mismatched.pth"
    save_checkpoint(mismatched, str(files["mismatched"]))     # intact, so that the loader gets to the weights
    Evil.marker = str(folder / "pwned")
    with open(files["evil"], "wb") as f:
        pickle.dump({"format": "ddpm-checkpoint-v1", "model": Evil()}, f)
    for fraction in (0.1, 0.5, 0.99):
        path = folder / f"truncated_{fraction}.pth"
        path.write_bytes(data[: int(len(data) * fraction)])
        files[f"truncated_{fraction}"] = path
    return files


@pytest.mark.slow
def test_bad_checkpoints_give_one_sentence_and_leave_files_alone(good_checkpoint, tmp_path):
    files = bad_checkpoints(tmp_path, good_checkpoint)
    for name, path in files.items():
        before = path.read_bytes() if path.is_file() else None
        result = run_script("sampling.py", "--ckpt", path, "--out-dir", tmp_path / "out", "--num-samples", "2",
                            check=False)
        assert result.returncode != 0, name
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, \
            (name, result.stderr)
        assert (path.read_bytes() if path.is_file() else None) == before, name
    assert not (tmp_path / "pwned").exists(), "unpickling ran code"
    assert not (tmp_path / "out" / "x0_0.png").exists()


def test_resume_from_bad_checkpoint_is_an_error(train_tiny, good_checkpoint, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    data = good_checkpoint.read_bytes()
    (out / "ddpm_ckpt.pth").write_bytes(data[: len(data) // 2])
    result = train_tiny(out, "--resume", "--epochs", "2", check=False)
    assert result.returncode == 1 and "cannot resume" in result.stderr and "Traceback" not in result.stderr
    assert (out / "ddpm_ckpt.pth").read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize("script,args", [
    ("training.py", ["--epochs", "0"]),
    ("training.py", ["--batch-size", "-3"]),
    ("training.py", ["--device", "tpu"]),
    ("sampling.py", ["--num-samples", "0"]),
    ("sampling.py", ["--device", "nonsense"]),
    ("sampling.py", ["--eta", "2"]),
])
@pytest.mark.slow
def test_impossible_options_exit_2(script, args, tmp_path):
    result = run_script(script, *args, "--out-dir", tmp_path / "o", check=False)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_exits_2(tmp_path):
    for script in ("training.py", "sampling.py"):
        result = run_script(script, "--device", "cuda", "--out-dir", tmp_path / "o", check=False)
        assert result.returncode == 2 and "no CUDA GPU" in result.stderr
