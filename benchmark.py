"""How fast are training and sampling on this machine, and how close to its peak?

    python benchmark.py                      # the default model, on the default device
    python benchmark.py --channels 64 --json # another width, as one JSON object
    python benchmark.py --device cuda --compile

Prints: training images/s; 100 samples x T DDPM steps (timed over --ddpm-steps steps and scaled
to T, as the label says) and 100 samples with 50 DDIM steps (timed in full); forward FLOPs per
image; the FLOP/s that training reaches; this device's own bf16 and float32 matmul peak measured
in the same run and the fraction of it reached; and peak memory (RSS on the CPU, allocated on a GPU).
Training FLOPs are counted as 3x the forward pass (forward + backward).
"""
import argparse
import json
import resource
import sys
import time

import torch

from noise_scheduler import make_scheduler
from sampling import int_list, positive_int, sample
from training import DEFAULTS, diffusion_loss, model_shape
from unet import UNet, autocast, compile_for_sampling, count_flops, memory_format, pick_device, resolve_precision


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, seconds=1.0):
    """FLOP/s of a large square matmul: the practical peak of this device for that dtype."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10:
            continue
        synchronize(device)
    synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def train_throughput(model, scheduler, device, precision, batch_size, steps, compile_):
    """Images per second of algorithm 1, steady state (after warm-up steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    net = torch.compile(model) if compile_ else model
    x0 = torch.rand(batch_size, model.in_channels, model.image_size, model.image_size, device=device) * 2 - 1

    def step():
        loss = diffusion_loss(net, scheduler, x0, precision=precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


@torch.no_grad()
def ddpm_seconds(model, scheduler, device, precision, n, steps):
    """Seconds for the first `steps` ancestral steps (algorithm 2) on n images."""
    x = torch.randn(n, model.in_channels, model.image_size, model.image_size, device=device)
    with autocast(device, precision):
        for _ in range(3):                                                     # warm-up (compiling, CUDA graphs)
            model(x, torch.zeros(n, dtype=torch.long, device=device))
        synchronize(device)
        start = time.perf_counter()
        for t in scheduler.timesteps()[:steps]:
            eps = model(x, torch.full((n,), t, dtype=torch.long, device=device)).float()
            x, _ = scheduler.step(eps, t, x)
        synchronize(device)
    return time.perf_counter() - start


def ddim_seconds(model, scheduler, device, precision, n, steps):
    """Seconds for a whole DDIM run of `steps` steps on n images."""
    synchronize(device)
    start = time.perf_counter()
    sample(model, scheduler, n, device=device, precision=precision, sampler="ddim", steps=steps, progress=False)
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux reports KiB


def build_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(description="Benchmark DDPM training and sampling on one device.")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="training batch")
    p.add_argument("--train-steps", type=positive_int, default=10, help="timed training steps")
    p.add_argument("--num-samples", type=positive_int, default=100)
    p.add_argument("--ddpm-steps", type=positive_int, default=50, help="DDPM steps timed, then scaled to T")
    p.add_argument("--channels", type=positive_int, default=d["base_channels"])
    p.add_argument("--channel-mults", type=int_list, default=None, help="default: as training.py picks for the image size")
    p.add_argument("--num-res-blocks", type=positive_int, default=d["num_res_blocks"])
    p.add_argument("--in-channels", type=positive_int, default=1)
    p.add_argument("--image-size", type=positive_int, default=28)
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    shape = model_shape(args.in_channels, args.image_size, args.channel_mults)
    args.channel_mults = shape["channel_mults"]
    try:
        model = UNet(**shape, base_channels=args.channels, num_res_blocks=args.num_res_blocks)
        model.to(device, memory_format=memory_format(device, training=True))
    except ValueError as e:
        p.error(str(e))
    scheduler = make_scheduler("linear", 1000).to(device)
    T = scheduler.num_timesteps

    flops = count_flops(model)
    peak_bf16 = matmul_peak(device, torch.bfloat16)
    peak_fp32 = matmul_peak(device, torch.float32)
    train_ips = train_throughput(model, scheduler, device, precision, args.batch_size, args.train_steps, args.compile)
    model.to(memory_format=memory_format(device, training=False)).eval()
    if args.compile:
        model = compile_for_sampling(model, device)
    ddpm_part = ddpm_seconds(model, scheduler, device, precision, args.num_samples, args.ddpm_steps)
    ddim50 = ddim_seconds(model, scheduler, device, precision, args.num_samples, 50)
    peak = peak_bf16 if precision == "bf16" else peak_fp32
    result = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "precision": precision, "torch": torch.__version__,
        "model": {"base_channels": args.channels, "channel_mults": args.channel_mults,
                  "num_res_blocks": args.num_res_blocks, "image": [args.in_channels, args.image_size, args.image_size],
                  "parameters": sum(q.numel() for q in model.parameters())},
        "forward_gflops_per_image": flops / 1e9,
        "train_batch_size": args.batch_size,
        "train_images_per_s": train_ips,
        "train_tflops_per_s": 3 * flops * train_ips / 1e12,
        "matmul_peak_bf16_tflops": peak_bf16 / 1e12,
        "matmul_peak_fp32_tflops": peak_fp32 / 1e12,
        "train_fraction_of_peak": 3 * flops * train_ips / peak,
        "ddpm_1000_steps_seconds": ddpm_part * T / args.ddpm_steps,
        "ddpm_steps_timed": args.ddpm_steps,
        "ddim_50_steps_seconds": ddim50,
        "num_samples": args.num_samples,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "allocated" if device.type == "cuda" else "RSS",
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    r = result
    print(f"device {r['device']} ({r['device_name']}, {r['threads']} threads), {precision}, torch {r['torch']}")
    print(f"model: {args.channels} channels x {args.channel_mults}, {args.num_res_blocks} res blocks/level, "
          f"{r['model']['parameters'] / 1e6:.2f} M parameters, image {args.in_channels}x{args.image_size}x{args.image_size}")
    rows = [
        ("forward FLOPs per image", f"{flops / 1e9:.3f} GFLOP"),
        ("matmul peak bf16 / fp32 (measured now)", f"{peak_bf16 / 1e12:.3f} / {peak_fp32 / 1e12:.3f} TFLOP/s"),
        (f"training, batch {args.batch_size}", f"{train_ips:.0f} images/s"),
        ("training FLOP/s (3 x forward)", f"{r['train_tflops_per_s']:.3f} TFLOP/s = "
                                          f"{100 * r['train_fraction_of_peak']:.0f}% of the {precision} matmul peak"),
        (f"{args.num_samples} samples x {T} DDPM steps", f"{r['ddpm_1000_steps_seconds']:.1f} s "
                                                         f"(timed over {args.ddpm_steps} steps, scaled to {T})"),
        (f"{args.num_samples} samples x 50 DDIM steps", f"{ddim50:.1f} s"),
        (f"peak memory ({r['peak_memory_kind']})", f"{r['peak_memory_mb']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
