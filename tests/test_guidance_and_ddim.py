"""Few-step and guided generation: classifier-free guidance, DDIM through the scripts, the EMA, model shapes."""
import pytest
import torch
from PIL import Image

from conftest import run_script
from samplers import predict_noise
from test_scripts import load
from training import ema_update, model_shape
from unet import SelfAttention, UNet


@pytest.fixture(scope="module")
def conditional_model():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,), num_classes=10).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)       # starts at zero; give it a visible output
    for p in model.label_embedding.parameters():
        torch.nn.init.normal_(p, std=1.0)
    return model


def test_guidance_scale_1_is_conditional_and_0_is_unconditional(conditional_model):
    model = conditional_model
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([5, 200, 600, 999]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
        assert not torch.allclose(cond, uncond, atol=1e-4)               # the label matters at all
        assert torch.allclose(predict_noise(model, x, t, y, 1.0), cond, atol=1e-5)
        assert torch.allclose(predict_noise(model, x, t, y, 0.0), uncond, atol=1e-5)


def test_batched_guidance_equals_two_separate_passes(conditional_model):
    model = conditional_model
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10, 500, 900]), torch.tensor([1, 4, 8])
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            guided = predict_noise(model, x, t, y, 3.0)
    finally:
        handle.remove()
    assert calls == [6], "one forward pass over [conditional; unconditional]"
    with torch.no_grad():
        eps_c, eps_u = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert torch.allclose(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-4)


def test_ema_warms_up_then_reaches_its_decay():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.fill_(0.0)
    model.weight.data.fill_(1.0)
    ema_update(ema, model, step=1, max_decay=0.9999)         # decay (1 + 1) / (10 + 1): mostly the new weights
    assert ema.weight.item() == pytest.approx(1 - 2 / 11)
    ema.weight.data.fill_(0.0)
    ema_update(ema, model, step=10 ** 7, max_decay=0.9999)    # long run: the full decay
    assert ema.weight.item() == pytest.approx(1e-4)


@pytest.mark.parametrize("size", [28, 32, 64, 128])
def test_model_shape_scales_with_the_image_size(size):
    shape = model_shape(3, size)
    lowest = size // 2 ** (len(shape["channel_mults"]) - 1)
    assert 4 <= lowest <= 8, "the U-Net goes down to a few pixels, whatever the size"
    assert shape["attention_resolutions"] and max(shape["attention_resolutions"]) <= max(8, size // 4)
    model = UNet(base_channels=8, **shape)
    assert any(isinstance(m, SelfAttention) for m in model.modules())
    x = torch.randn(1, 3, size, size)
    assert model(x, torch.tensor([3])).shape == x.shape


@pytest.mark.slow
def test_conditional_run_resumes_and_samples_per_class_grids_and_ddim_lists(train_tiny, tmp_path):
    out = tmp_path / "run"
    train_tiny(out, "--epochs", "1", "--conditional")
    train_tiny(out, "--epochs", "2", "--resume")
    ckpt = out / "ddpm_ckpt.pth"
    config = load(ckpt)["config"]
    assert config["conditional"] and config["num_classes"] == 10 and load(ckpt)["epoch"] == 2

    result = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "s", "--num-samples", "20",
                        "--sampler", "ddim", "--steps", "5,10")
    for steps in (5, 10):
        assert Image.open(tmp_path / "s" / f"ddim_{steps}.png").size == (10 * 30 + 2, 2 * 30 + 2)
        assert f"{steps}-step DDIM" in result.stdout
    run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "one", "--num-samples", "10", "--label", "3",
               "--sampler", "ddim", "--steps", "5")
    assert Image.open(tmp_path / "one" / "x0_0.png").size == (10 * 30 + 2, 30 + 2)
    bad = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "bad", "--label", "10", check=False)
    assert bad.returncode == 2 and "outside the model's classes 0..9" in bad.stderr
    too_many = run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "bad", "--sampler", "ddim",
                          "--steps", "51", check=False)
    assert too_many.returncode == 2 and "more than the 50 timesteps" in too_many.stderr
    assert not (tmp_path / "bad").exists()
