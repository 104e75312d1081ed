"""The U-Net: shapes, conditioning on t (and on labels), configurations, devices."""
import pytest
import torch

from hardware import autocast, memory_format, pick_device, resolve_precision
from unet import UNet, count_flops


def randomize_output(model):
    """The last conv starts at zero ("predict no noise"); give it weights so inputs can show in the output."""
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    return model


@pytest.mark.parametrize("channels,size,mults", [(1, 28, (1, 2, 2)), (3, 32, (1, 2, 2, 2)), (3, 16, (1, 2))])
def test_output_has_the_input_shape(channels, size, mults):
    model = UNet(in_channels=channels, image_size=size, base_channels=8, channel_mults=mults,
                 attention_resolutions=(size // 2 ** (len(mults) - 1),))
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_timestep_changes_the_output():
    torch.manual_seed(0)
    model = randomize_output(UNet(base_channels=8)).eval()
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([10, 900]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_label_changes_the_output_and_none_means_no_label():
    torch.manual_seed(0)
    model = randomize_output(UNet(base_channels=8, num_classes=10)).eval()
    x, t = torch.randn(1, 1, 28, 28).repeat(3, 1, 1, 1), torch.tensor([500, 500, 500])
    out = model(x, t, torch.tensor([3, 7, 10]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert torch.allclose(model(x, t)[2], out[2], atol=1e-6)      # y=None is the "no label" token 10


def test_attention_only_at_listed_resolutions():
    model = UNet(base_channels=8, channel_mults=(1, 2, 2), attention_resolutions=(7,))
    from unet import SelfAttention
    n_attn = sum(isinstance(m, SelfAttention) for m in model.modules())
    # 7x7 level: 2 encoder blocks (num_res_blocks=2) + 3 decoder blocks, and one in the middle
    assert n_attn == 2 + 3 + 1


@pytest.mark.parametrize("channels,size,mults", [(1, 28, (1, 2, 2)), (3, 32, (1, 2, 2, 2))])
def test_channels_last_weights_give_the_same_prediction_in_nhwc(channels, size, mults):
    """What the NHWC candidate of the speed probe (unet.choose_speed) relies on: NHWC weights alone turn the
    activations NHWC, and nothing else changes."""
    torch.manual_seed(0)
    model = randomize_output(UNet(in_channels=channels, image_size=size, base_channels=8, channel_mults=mults,
                                  attention_resolutions=(size // 4,), num_classes=10)).eval()
    x, t, y = torch.randn(3, channels, size, size), torch.tensor([0, 400, 999]), torch.tensor([1, 2, 10])
    seen = []                                  # the decoder's last activations, (3, 8, size, size)
    model.conv_out.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        ref = model(x, t, y)
        model.to(memory_format=torch.channels_last)
        out = model(x, t, y)
    assert seen[0].is_contiguous() and not seen[0].is_contiguous(memory_format=torch.channels_last)
    assert seen[1].is_contiguous(memory_format=torch.channels_last) and not seen[1].is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_image_size_must_divide_by_the_downsampling():
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=30, channel_mults=(1, 2, 2))


def test_bf16_autocast_runs_and_stays_close_to_float32():
    torch.manual_seed(0)
    model = randomize_output(UNet(base_channels=8)).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model(x, t)
        with autocast(torch.device("cpu"), "bf16"):
            low = model(x, t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_flop_count_is_positive_and_scales_with_width():
    assert 0 < count_flops(UNet(base_channels=8)) < count_flops(UNet(base_channels=16))


def test_device_selection():
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_recomputing_the_normalized_maps_keeps_the_gradients_and_saves_memory(monkeypatch):
    """norm_silu recomputes GroupNorm's output in the backward pass on the CPU: the same gradients, less kept."""
    import unet
    torch.manual_seed(0)
    model = randomize_output(UNet(base_channels=8))
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([1, 250, 500, 999])

    def gradients_and_saved_bytes():
        saved = {}

        def keep(tensor):
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor
        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(x, t).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved.values())

    recomputed, recomputed_bytes = gradients_and_saved_bytes()
    monkeypatch.setattr(unet, "norm_silu", lambda norm, h: torch.nn.functional.silu(norm(h)))
    kept, kept_bytes = gradients_and_saved_bytes()
    for a, b in zip(recomputed, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert recomputed_bytes < 0.8 * kept_bytes


def test_the_unmeasured_layout_is_nhwc_on_a_gpu_and_nchw_elsewhere():
    """The layout used where nothing is timed: a forced precision, or a CUDA GPU with bf16."""
    assert memory_format(torch.device("cuda")) == torch.channels_last
    assert memory_format(torch.device("cpu")) == torch.contiguous_format
