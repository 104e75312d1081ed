"""The time-conditioned U-Net that predicts the noise, epsilon_theta(x_t, t) (Ho et al., 2020, appendix B).

    python unet.py          # prints the default model's size and FLOPs per image

A PixelCNN++-style U-Net: a sinusoidal embedding of t through an MLP, residual blocks with
GroupNorm into which the time embedding is added, skip connections from every block of the
encoder to the decoder, and self-attention only at the low resolutions.  The constructor takes
plain values (`UNet(**config)`), so the configuration stored in a checkpoint rebuilds the model.
Where and how it runs (device, precision, memory layout, the speed probe) is `hardware.py`'s business.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class GroupNorm(nn.GroupNorm):
    """GroupNorm in the activations' dtype: under bf16 autocast it stays in bf16 (PyTorch's kernel
    accumulates the statistics in float32) instead of casting every activation to float32 and back."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def group_norm(channels):
    """GroupNorm with up to 32 groups of at least 4 channels each."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels)


def norm_silu(norm, x):
    """SiLU(GroupNorm(x)).  When training off a GPU, where memory is the scarce resource, the normalized map
    in between is recomputed in the backward pass instead of kept: 28% less activation memory (662 -> 478 MiB
    at batch 128 for the default model), the same gradients, and no time cost that could be measured."""
    if x.device.type == "cuda" or not torch.is_grad_enabled():
        return F.silu(norm(x))
    return checkpoint(lambda h: F.silu(norm(h)), x, use_reentrant=False)


class SinusoidalTimeEmbedding(nn.Module):
    """t -> [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (d/2)) (the Transformer's position encoding)."""

    def __init__(self, dim):
        super().__init__()
        assert dim % 2 == 0
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False)

    def forward(self, t):                                   # (B,) -> (B, dim)
        angles = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected time embedding, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):                              # x: (B, C, H, W), emb: (B, emb_dim)
        h = self.conv1(norm_silu(self.norm1, x))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels, num_heads):
        super().__init__()
        assert channels % num_heads == 0, "attention channels must divide into heads"
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)          # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)         # (B, heads, H*W, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Block(nn.Module):
    """A residual block, followed by self-attention at the resolutions that have it."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, attention, num_heads):
        super().__init__()
        self.res = ResidualBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = SelfAttention(out_ch, num_heads) if attention else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """epsilon_theta(x_t, t[, y]) with the same shape as x_t.

    in_channels:        1 for grayscale, 3 for colour
    image_size:         height = width; must be divisible by 2 ** (len(channel_mults) - 1)
    base_channels:      width of the first level; level i has base_channels * channel_mults[i]
    channel_mults:      one entry per resolution level, each level halves the resolution
    num_res_blocks:     residual blocks per level in the encoder (the decoder has one more)
    attention_resolutions: feature-map sizes (e.g. 7 for a 28x28 input) that get self-attention
    num_classes:        None for an unconditional model; otherwise labels 0..num_classes-1, and
                        label num_classes is the "no label" token used for classifier-free guidance
    jump:               a student of distill.py: it is also told the timestep s its step lands on (s = -1: the
                        clean image), embedded as t is and added to the time embedding (zero at first, so that
                        the student starts as its teacher)
    """

    def __init__(self, in_channels=1, image_size=28, base_channels=64, channel_mults=(1, 2, 2),
                 num_res_blocks=2, attention_resolutions=(7,), dropout=0.0, num_heads=4, num_classes=None,
                 jump=False):
        super().__init__()
        levels = len(channel_mults)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image size {image_size} is not divisible by 2^{levels - 1}, "
                             f"which {levels} resolution levels need")
        if base_channels % 4:
            raise ValueError(f"base_channels must be a multiple of 4, got {base_channels}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        emb_dim = 4 * base_channels
        self.time_embedding = nn.Sequential(
            SinusoidalTimeEmbedding(base_channels), nn.Linear(base_channels, emb_dim), nn.SiLU(),
            nn.Linear(emb_dim, emb_dim))
        self.label_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.jump_embedding = None
        if jump:
            self.jump_embedding = nn.Sequential(
                SinusoidalTimeEmbedding(base_channels), nn.Linear(base_channels, emb_dim), nn.SiLU(),
                nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.jump_embedding[-1].weight)
            nn.init.zeros_(self.jump_embedding[-1].bias)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(Block(ch, base_channels * mult, emb_dim, dropout, res in attention_resolutions,
                                       num_heads))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))     # downsample
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList([Block(ch, ch, emb_dim, dropout, True, num_heads),
                                  Block(ch, ch, emb_dim, dropout, False, num_heads)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(Block(ch + skip_channels.pop(), base_channels * mult, emb_dim, dropout,
                                     res in attention_resolutions, num_heads))
                ch = base_channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))   # upsample
                res *= 2
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)      # start as "predict zero noise"
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, y=None, s=None):
        """x: (B, C, H, W) noisy images x_t; t: (B,) integer timesteps; y: (B,) labels or None; s: (B,) the
        timesteps a student's step lands on (jump=True only; default -1, the clean image)."""
        assert x.shape[1:] == (self.in_channels, self.image_size, self.image_size), \
            f"expected images of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), " \
            f"got {tuple(x.shape)}"
        emb = self.time_embedding(t)                                           # (B, 4 * base)
        if self.label_embedding is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)                       # "no label"
            emb = emb + self.label_embedding(y)
        if self.jump_embedding is not None:
            emb = emb + self.jump_embedding((s if s is not None else torch.full_like(t, -1)) + 1)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            if isinstance(layer, Block):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(norm_silu(self.norm_out, h))

    def features(self, x, t, y=None):
        """The network's own description of images x at timestep t, (B, D): the output of every block of the down
        path and of the middle, each averaged over the image and divided by the square root of its channels so that
        every level weighs alike, side by side.  The up path is not run.  samplers.fit_walk_power compares images
        with it, as FID compares them with an Inception network's."""
        emb = self.time_embedding(t)
        if self.label_embedding is not None:
            emb = emb + self.label_embedding(torch.full_like(t, self.num_classes) if y is None else y)
        h, pooled = self.conv_in(x), []
        for layer in [*self.down, *self.mid]:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            if isinstance(layer, Block):
                pooled.append(h.float().mean((2, 3)) / h.shape[1] ** 0.5)
        return torch.cat(pooled, dim=1)


def count_flops(model, batch_size=1):
    """Forward-pass FLOPs per image (a multiply-add counts as 2), from PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, model.in_channels, model.image_size, model.image_size, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops() / batch_size


if __name__ == "__main__":
    net = UNet()
    print(f"default UNet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
          f"{count_flops(net) / 1e9:.3f} GFLOPs per 28x28 image (forward)")
