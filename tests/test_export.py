"""export.py: the EMA weights as safetensors, sampled exactly as the checkpoint; bad files refused in one sentence."""
import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import HASH_KEY, SAFETENSORS_FORMAT, CheckpointError, load_checkpoint, read_safetensors
from conftest import run_script
from sampling import generate, load_model
from test_reliability import assert_refused_in_one_sentence, flip_a_byte


@pytest.fixture(scope="module")
def exported(good_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.safetensors"
    result = run_script("export.py", "--ckpt", good_checkpoint, "--out", out)
    assert f"wrote {out} (" in result.stdout and f"the checkpoint {good_checkpoint}: " in result.stdout
    return out


def test_the_file_holds_the_ema_weights_and_the_configuration(good_checkpoint, exported):
    ckpt = load_checkpoint(good_checkpoint)
    with safe_open(str(exported), framework="pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(ckpt["ema"])
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), ckpt["ema"][name])
    assert metadata["format"] == SAFETENSORS_FORMAT and len(metadata[HASH_KEY]) == 64
    assert json.loads(metadata["config"]) == ckpt["config"]
    assert metadata["prediction"] == ckpt["config"].get("prediction", "eps")
    for key in ("in_channels", "image_size", "base_channels", "channel_mults", "schedule", "num_timesteps",
                "num_classes", "dataset"):
        assert key in json.loads(metadata["config"])
    assert exported.stat().st_size < good_checkpoint.stat().st_size / 2      # no optimizer, no training weights


def test_the_python_api_samples_the_same_images_from_both(good_checkpoint, exported):
    from_ckpt = load_model(str(good_checkpoint), "cpu", "fp32")
    from_file = load_model(str(exported), "cpu", "fp32")
    assert from_file.config == from_ckpt.config
    a, _ = generate(from_ckpt, 6, seed=5, sampler="dpm++sde", steps=4, progress=False)
    b, _ = generate(from_file, 6, seed=5, sampler="dpm++sde", steps=4, progress=False)
    assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sampling.py", "evaluate.py"])
def test_the_scripts_draw_bit_equal_samples_from_both(script, good_checkpoint, exported, data_dir, tmp_path):
    options = ["--sampler", "ddim", "--steps", "5", "--num-samples", "12", "--seed", "7", "--precision", "fp32"]
    if script == "sampling.py":
        for name, ckpt in (("ckpt", good_checkpoint), ("file", exported)):
            run_script(script, "--ckpt", ckpt, *options, "--individual", "--out-dir", tmp_path / name)
        for i in range(12):
            assert (tmp_path / "ckpt" / "individual" / f"{i:05d}.png").read_bytes() == \
                (tmp_path / "file" / "individual" / f"{i:05d}.png").read_bytes()
    else:
        common = ["--data-dir", data_dir, "--cache-dir", tmp_path, "--json"]
        a = json.loads(run_script(script, "--ckpt", good_checkpoint, *options, *common).stdout)
        b = json.loads(run_script(script, "--ckpt", exported, *options, *common).stdout)
        assert a["generated"] == b["generated"] and a["real_floor"] == b["real_floor"]


def truncated(exported, path):
    path.write_bytes(exported.read_bytes()[:1000])


def foreign(exported, path):
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})


def garbage(exported, path):
    path.write_bytes(struct.pack("<Q", 50) + b"{not json" + b" " * 60)


@pytest.mark.parametrize("damage, message", [
    (truncated, "is not a readable safetensors file; it may be truncated or another kind of file"),
    (foreign, "is a safetensors file but not one written by this repository's export.py"),
    (garbage, "is not a readable safetensors file"),
])
def test_a_truncated_or_foreign_file_is_refused_in_one_sentence(damage, message, exported, tmp_path):
    bad = tmp_path / "bad.safetensors"
    damage(exported, bad)
    result = run_script("sampling.py", "--ckpt", bad, "--out-dir", tmp_path / "s", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_safetensors_file_is_recognised_by_its_content_whatever_its_name(exported, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(exported.read_bytes())
    assert load_model(str(renamed), "cpu", "fp32").config == load_model(str(exported), "cpu", "fp32").config


@pytest.mark.slow
def test_export_refuses_a_missing_checkpoint_and_to_overwrite_the_checkpoint(good_checkpoint, tmp_path):
    missing = run_script("export.py", "--ckpt", tmp_path / "none.pth", "--out", tmp_path / "m.safetensors",
                         check=False)
    assert missing.returncode == 1 and missing.stderr == f"error: there is no checkpoint at {tmp_path / 'none.pth'}\n"
    assert not (tmp_path / "m.safetensors").exists()
    itself = run_script("export.py", "--ckpt", good_checkpoint, "--out", good_checkpoint, check=False)
    assert itself.returncode == 1 and "is the checkpoint itself" in itself.stderr
    assert load_checkpoint(good_checkpoint)["format"]                   # untouched


def test_an_export_with_any_one_byte_changed_is_refused_in_one_sentence(exported, data_dir, tmp_path):
    """safetensors has no checksum: the SHA-256 in the metadata covers every byte, header and padding included."""
    data, rng = exported.read_bytes(), random.Random(32)
    bad = tmp_path / "bad.safetensors"
    for i in range(100):
        bad.write_bytes(flip_a_byte(data, rng))
        with pytest.raises(CheckpointError) as refused:
            read_safetensors(str(bad))
        assert str(bad) in str(refused.value) and "\n" not in str(refused.value)
        if i < 2:
            result = run_script("sampling.py", "--ckpt", bad, "--out-dir", tmp_path / "s", check=False)
            assert_refused_in_one_sentence(result, str(bad))
            assert not (tmp_path / "s").exists()
    result = run_script("evaluate.py", "--ckpt", bad, "--data-dir", data_dir, "--cache-dir", tmp_path, check=False)
    assert_refused_in_one_sentence(result, str(bad))


def test_an_export_of_the_new_format_without_its_sha256_is_refused(exported, tmp_path):
    with safe_open(str(exported), framework="pt") as f:
        metadata, weights = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    del metadata[HASH_KEY]
    save_file(weights, str(tmp_path / "stripped.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="is damaged: the SHA-256 it was saved with is missing"):
        read_safetensors(str(tmp_path / "stripped.safetensors"))
