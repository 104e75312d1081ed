"""Data-parallel training under torchrun: two CPU processes (gloo)."""
import csv
import math
import shutil

import torch

from conftest import TINY_MODEL, run_script
from test_scripts import load


def torchrun(*args, check=True):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, check=check)


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
