"""Datasets beyond MNIST (folders of colour images, Fashion-MNIST, CIFAR-10) and the pictures."""
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import ROOT, make_digits, run_script, write_idx
from dataset import DataError, FolderImages, load_dataset
from test_scripts import assert_same_tensors, load


def write_image_folder(root, n_per_class=12):
    """Two classes in sub-folders, PNG and JPEG, of different sizes and modes (RGB, grayscale, RGBA)."""
    rng = np.random.default_rng(0)
    for c, (name, colour) in enumerate((("reds", (220, 30, 30)), ("blues", (30, 30, 220)))):
        os.makedirs(root / name, exist_ok=True)
        for i in range(n_per_class):
            size = (40, 30) if i % 2 else (24, 36)
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            if i % 3 == 0:
                img.save(root / name / f"img{i}.jpg", quality=90)
            elif i % 3 == 1:
                img.convert("RGBA").save(root / name / f"img{i}.png")
            else:
                img.convert("L").save(root / name / f"img{i}.png")
    return root


def test_folder_dataset_reads_png_and_jpeg_with_labels_from_subfolders(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "notes.txt").write_text("not an image")
    images, labels = load_dataset("folder", str(root), image_size=16)
    assert images.shape == (24, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 12 + [1] * 12                      # blues, reds: sorted folder names
    assert images[labels == 0, 2].float().mean() > images[labels == 0, 0].float().mean() + 50   # blue is blue


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    images, labels = load_dataset("folder", str(tmp_path), image_size=8)
    assert images.shape == (3, 3, 8, 8) and labels is None


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", str(tmp_path / "nope"), image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no PNG or JPEG"):
        load_dataset("folder", str(tmp_path / "empty"), image_size=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("folder", str(tmp_path / "bad"), image_size=8)


def test_a_folder_too_large_for_memory_is_streamed_and_decodes_the_same_images(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "imgs")
    in_memory, labels = load_dataset("folder", str(root), image_size=16)
    monkeypatch.setattr(dataset, "IN_MEMORY_BYTES", 24 * 3 * 16 * 16 - 1)         # one byte short of the folder
    streamed, streamed_labels = load_dataset("folder", str(root), image_size=16, workers=2)
    assert isinstance(streamed, FolderImages) and streamed.shape == in_memory.shape and len(streamed) == 24
    assert torch.equal(streamed_labels, labels)
    idx = torch.tensor([5, 0, 23, 5])
    assert torch.equal(streamed[idx], in_memory[idx]) and torch.equal(streamed[7], in_memory[7])
    batches = list(streamed.batches([torch.tensor([1, 2]), torch.tensor([20])]))
    assert [b.shape[0] for b in batches] == [2, 1] and torch.equal(batches[1], in_memory[[20]])


@pytest.mark.slow
def test_streamed_folder_stops_resumes_and_trains_bit_for_bit_like_the_folder_in_memory(tmp_path):
    """--stream: DataLoader workers decode each batch.  Ctrl-C (to the whole process group, workers included)
    saves mid-epoch; the resumed run equals a run on the folder held in memory; a file that turns unreadable
    later ends the run with one sentence and leaves the checkpoint alone."""
    root = write_image_folder(tmp_path / "imgs")            # 24 images, 3 steps of 8 per epoch
    common = ["--dataset", "folder", "--data-dir", root, "--image-size", "16", "--batch-size", "8", "--conditional",
              "--preview-samples", "0", "--channels", "8", "--channel-mults", "1,2", "--num-timesteps", "20"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "training.py", *map(str, common), "--out-dir", str(stopped),
                             "--epochs", "1000", "--stream", "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("training on"):
            break
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)                        # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    state = load(stopped / "ddpm_ckpt.pth")
    assert 0 < state["step"] < 3000 and state["step"] == 3 * state["epoch"] + state["batch_in_epoch"]
    epochs = str(state["epoch"] + 2)
    run_script("training.py", *common, "--out-dir", stopped, "--epochs", epochs, "--resume", "--stream",
               "--workers", "2")
    run_script("training.py", *common, "--out-dir", tmp_path / "memory", "--epochs", epochs)
    a, b = load(stopped / "ddpm_ckpt.pth"), load(tmp_path / "memory" / "ddpm_ckpt.pth")
    for key in ("model", "ema", "optimizer", "step", "epoch"):
        assert_same_tensors(a[key], b[key])

    before = (stopped / "ddpm_ckpt.pth").read_bytes()
    (root / "blues" / "img4.png").write_bytes(b"\x89PNG truncated")
    broken = run_script("training.py", *common, "--out-dir", stopped, "--epochs", str(int(epochs) + 1), "--resume",
                        "--stream", check=False)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert broken.stderr.strip().splitlines()[-1].startswith("error: the image file") and "img4.png" in broken.stderr
    assert (stopped / "ddpm_ckpt.pth").read_bytes() == before


def test_fashion_mnist_from_gz_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(tmp_path / "plain", "train", *make_digits(20, 0))
    write_idx(tmp_path / "plain", "t10k", *make_digits(10, 1))
    raw.mkdir(parents=True)
    for f in os.listdir(tmp_path / "plain"):
        with open(tmp_path / "plain" / f, "rb") as src, gzip.open(raw / (f + ".gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    images, labels = load_dataset("fashion-mnist", str(tmp_path), download=False)
    assert images.shape == (20, 1, 28, 28) and len(labels) == 20


@pytest.mark.slow
def test_cifar10_not_found_says_where_to_put_it(tmp_path):
    result = run_script("training.py", "--dataset", "cifar10", "--data-dir", tmp_path, "--out-dir", tmp_path / "o",
                        check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cifar-10-batches-py" in result.stderr and str(tmp_path) in result.stderr


@pytest.mark.slow
def test_rgb_folder_model_trains_resumes_and_samples_without_flags(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    common = ["training.py", "--dataset", "folder", "--data-dir", root, "--image-size", "16", "--out-dir", out,
              "--batch-size", "8", "--preview-samples", "4", "--preview-steps", "2", "--channels", "8",
              "--num-timesteps", "20", "--conditional"]
    run_script(*common, "--epochs", "1")
    state = load(out / "ddpm_ckpt.pth")
    cfg = state["config"]
    assert (cfg["in_channels"], cfg["image_size"], cfg["num_classes"], cfg["hflip"]) == (3, 16, 2, True)
    assert cfg["channel_mults"] == [1, 2, 2] and cfg["attention_resolutions"] == [8, 4]      # 16, 8, 4 px
    assert Image.open(out / "samples" / "epoch_001.png").mode == "RGB"
    run_script(*common, "--epochs", "2", "--resume")
    assert load(out / "ddpm_ckpt.pth")["epoch"] == 2
    run_script("sampling.py", "--ckpt", out / "ddpm_ckpt.pth", "--out-dir", tmp_path / "s", "--num-samples", "20",
               "--gif")
    grid = Image.open(tmp_path / "s" / "x0_0.png")
    assert grid.mode == "RGB" and grid.size == (10 * 18 + 2, 2 * 18 + 2)
    gif = Image.open(tmp_path / "s" / "reverse.gif")
    assert gif.size == grid.size and gif.n_frames > 10


@pytest.mark.slow
def test_label_on_unconditional_model_is_an_error(train_tiny, tmp_path):
    train_tiny(tmp_path / "run", "--epochs", "1", "--unconditional")
    result = run_script("sampling.py", "--ckpt", tmp_path / "run" / "ddpm_ckpt.pth", "--label", "3",
                        "--out-dir", tmp_path / "s", check=False)
    assert result.returncode == 2 and "unconditional" in result.stderr


@pytest.mark.slow
def test_visualize_writes_each_picture(data_dir, train_tiny, tmp_path):
    run_script("visualize.py", "schedule", "--out", tmp_path / "schedule.png")
    assert Image.open(tmp_path / "schedule.png").size == (1600, 304)
    run_script("visualize.py", "forward", "--data-dir", data_dir, "--out", tmp_path / "forward.png")
    assert Image.open(tmp_path / "forward.png").size == (12 * 30 + 2, 6 * 30 + 2)   # 12 timesteps x 6 images
    train_tiny(tmp_path / "run", "--epochs", "2")
    run_script("visualize.py", "loss", "--log", tmp_path / "run" / "loss_log.csv", "--out", tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (480, 320)
    missing = run_script("visualize.py", "loss", "--log", tmp_path / "nope.csv", check=False)
    assert missing.returncode == 1 and "no loss log" in missing.stderr


def test_forward_grid_columns_follow_the_closed_form():
    from noise_scheduler import LinearNoiseScheduler
    from visualize import forward_grid
    sched = LinearNoiseScheduler()
    images = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    grid = forward_grid(images, sched, [0, 500, 999], seed=3).reshape(2, 3, 1, 4, 4)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    for column, t in enumerate((0, 500, 999)):
        expected = sched.add_noise(torch.ones(2, 1, 4, 4), noise, torch.full((2,), t))
        assert torch.allclose(grid[:, column], expected, atol=1e-6), t
    assert torch.allclose(grid[:, 0], torch.ones(2, 1, 4, 4), atol=0.05)           # t = 0: almost the image


@pytest.mark.slow
def test_visualize_fid_draws_each_run_against_its_minutes_of_training(tmp_path):
    """The minutes are the running sum of the epochs' training seconds; epochs without a FID add their time."""
    from visualize import plot_fid
    logs = []
    for name, rows in {"a": [(60, ""), (60, "40.0"), (30, "20.0")], "b": [(120, "30.0")]}.items():
        (tmp_path / name).mkdir()
        log = tmp_path / name / "loss_log.csv"
        log.write_text("epoch,step,loss,images_per_s,seconds,fid\n"
                       + "".join(f"{i + 1},{i + 1},0.1,100,{s},{f}\n" for i, (s, f) in enumerate(rows)))
        logs.append(str(log))
    curves = plot_fid(logs, ["a", "b"], tmp_path / "fid.png")
    assert curves == {"a": [(2.0, 40.0), (2.5, 20.0)], "b": [(2.0, 30.0)]}
    assert Image.open(tmp_path / "fid.png").size == (680, 320)             # 8.5 x 4 inches at 80 dpi, legend beside
    run_script("visualize.py", "fid", "--logs", *logs, "--out", tmp_path / "cli.png")
    assert Image.open(tmp_path / "cli.png").size == (680, 320)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "loss_log.csv").write_text("epoch,step,loss,images_per_s,seconds,fid\n1,1,0.1,100,60,\n")
    no_fid = run_script("visualize.py", "fid", "--logs", tmp_path / "c" / "loss_log.csv", "--out", tmp_path / "x.png",
                        check=False)
    assert no_fid.returncode == 1 and "--fid-every" in no_fid.stderr and "Traceback" not in no_fid.stderr
