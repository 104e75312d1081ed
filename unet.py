"""The time-conditioned U-Net that predicts the noise, epsilon_theta(x_t, t) (Ho et al., 2020, appendix B).

    python unet.py          # prints the default model's size and FLOPs per image

A PixelCNN++-style U-Net: a sinusoidal embedding of t through an MLP, residual blocks with
GroupNorm into which the time embedding is added, skip connections from every block of the
encoder to the decoder, and self-attention only at the low resolutions.  The constructor takes
plain values (`UNet(**config)`), so the configuration stored in a checkpoint rebuilds the model.

Also here: the device, precision and memory-format helpers shared by the scripts (`pick_device`, `autocast`,
`memory_format`).
"""
import contextlib
import json
import math
import os
import time

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
    """

    def __init__(self, in_channels=1, image_size=28, base_channels=64, channel_mults=(1, 2, 2),
                 num_res_blocks=2, attention_resolutions=(7,), dropout=0.0, num_heads=4, num_classes=None):
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

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(Block(ch, base_channels * mult, emb_dim, dropout, res in attention_resolutions, num_heads))
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

    def forward(self, x, t, y=None):
        """x: (B, C, H, W) noisy images x_t; t: (B,) integer timesteps; y: (B,) labels or None."""
        assert x.shape[1:] == (self.in_channels, self.image_size, self.image_size), \
            f"expected images of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
        emb = self.time_embedding(t)                                           # (B, 4 * base)
        if self.label_embedding is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)                       # "no label"
            emb = emb + self.label_embedding(y)
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


# ---- devices and precision ---------------------------------------------------------------------
def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else must be available or it raises ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for, but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def describe_device(device):
    """'Intel(R) Xeon(R) Processor, 2 threads' on a CPU, the GPU's name on CUDA: the machine a figure was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = device.type
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def bf16_supported(device):
    """Whether bfloat16 autocast is fast on this device (native bf16 matrix instructions)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_precision(precision, device):
    """The precision of a task that is not timed by `choose_speed`: a forced one as given; 'auto' -> bf16 where
    the device has native bf16 matrix instructions, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    return precision


def autocast(device, precision):
    """bf16 autocast for the network; the diffusion math around it stays in float32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device):
    """The layout of the activations when it is not measured (`choose_speed` measures it on a CPU): NHWC
    ("channels_last") on a GPU, whose tensor cores read it natively, else NCHW.  Converting the weights is
    enough: a convolution with NHWC weights returns NHWC activations, and the layers after it keep them."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


LAYOUT_NAMES = {torch.contiguous_format: "NCHW", torch.channels_last: "NHWC"}
LAYOUT_NAMES_INV = {name: layout for layout, name in LAYOUT_NAMES.items()}


def fastest(seconds):
    """The candidate that took the least time, from {candidate: seconds}."""
    return min(seconds, key=seconds.get)


def time_candidates(run, candidates, repeats=1):
    """{candidate: seconds of one run(candidate)}: the least of `repeats` timed calls after an untimed warm-up,
    the candidates taking turns so that a slow moment of a busy machine hits all of them alike."""
    best = {c: math.inf for c in candidates}
    for attempt in range(repeats + 1):
        for c in candidates:
            start = time.perf_counter()
            run(c)
            if attempt:
                best[c] = min(best[c], time.perf_counter() - start)
    return best


def probe_cache_path():
    """Where verdicts of the speed probe are kept: $DDPM_CACHE_DIR, else ~/.cache/minimal-ddpm."""
    folder = os.environ.get("DDPM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "minimal-ddpm")
    return os.path.join(folder, "speed_probe.json")


def _read_probe_cache(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_probe_cache(path, cache):
    """Best effort: a cache that cannot be written costs a probe next time, nothing more."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError:
        pass


PROBE_BATCH = {True: 16, False: 32}      # images per timed pass, training and sampling: the probe stays near 1 s


def choose_speed(model, device, precision="auto", training=False, batch_size=100, use_cache=True):
    """(precision, memory format, note): the fastest way to run `model` for this task on this device.

    A forced precision ('bf16', 'fp32') is used as given, with the default layout, and nothing is timed.
    'auto' times the real model on the real device for the real task: a forward pass (sampling) or a forward
    and backward pass (training) at up to PROBE_BATCH images, in fp32 and bf16 autocast (where the device has
    native bf16) and in NCHW and NHWC on a CPU, and picks the fastest.  A CPU's bf16 flag does not tell: on one
    Xeon with AVX-512 BF16 it sampled 2.2 times slower than fp32, on another with AMX it trained 1.7 times
    faster.  A CUDA GPU with bf16 is not timed: bf16 tensor cores in NHWC are the fast path there, and the probe
    would cost compilation and warm-up that few runs recover.  The verdict is kept in probe_cache_path(), per
    machine, threads, torch version, task, batch and model shape, so later runs start at once and two runs on
    one machine always agree; the random state of the caller is left as it was.
    """
    layout = memory_format(device)
    if precision != "auto":
        return resolve_precision(precision, device), layout, "forced"
    if device.type == "cuda" and bf16_supported(device):
        return "bf16", layout, "not timed: bf16 tensor cores"
    precisions = ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]
    layouts = [torch.contiguous_format, torch.channels_last] if device.type == "cpu" else [layout]
    candidates = [(p, f) for p in precisions for f in layouts]
    if len(candidates) == 1:
        return precisions[0], layout, "the only candidate here"
    batch = min(batch_size, PROBE_BATCH[training])
    key = json.dumps([describe_device(device), torch.__version__, "training" if training else "sampling", batch,
                      type(model).__name__, [list(p.shape) for p in model.parameters()]])
    path = probe_cache_path()
    cache = _read_probe_cache(path) if use_cache else {}
    if key in cache:
        seconds = {(c[0], LAYOUT_NAMES_INV[c[1]]): t for c, t in cache[key]}
        where = f"probe cached in {path}"
    else:
        start = time.perf_counter()
        seconds = _probe(model, device, training, batch, candidates)
        where = f"probe took {time.perf_counter() - start:.1f} s"
        if use_cache:
            cache[key] = [[(p, LAYOUT_NAMES[f]), t] for (p, f), t in seconds.items()]
            _write_probe_cache(path, cache)
    best = fastest(seconds)
    others = ", ".join(f"{p} {LAYOUT_NAMES[f]} {seconds[best] / t:.2f}x" for (p, f), t in seconds.items() if (p, f) != best)
    return best[0], best[1], f"measured: {others} as fast here; {where}"


def _probe(model, device, training, batch, candidates):
    """Seconds per pass of each (precision, layout) candidate; the model ends in its original layout, without gradients."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        was_training = model.training
        model.train(training)

        def run(candidate):
            precision, layout = candidate
            model.to(memory_format=layout)
            with torch.set_grad_enabled(training), autocast(device, precision):
                out = model(x.contiguous(memory_format=layout), t)
            if training:
                out.float().square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        try:
            return time_candidates(run, candidates)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            model.to(memory_format=torch.contiguous_format)


def compile_for_sampling(model, device):
    """torch.compile for the reverse process: on a GPU with CUDA graphs ("reduce-overhead"), so that the
    T small sequential steps are not bound by kernel launches.  The module's attributes stay reachable."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


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
