"""How fast are training and sampling on this machine, and how close to its peak?

    python benchmark.py                      # the default model, on the default device
    python benchmark.py --precision both     # bf16 and fp32 one after the other
    python benchmark.py --channels 64 --json # another width, as one JSON object
    python benchmark.py --num-classes 0      # the paper's unconditional model
    python benchmark.py --device cuda --compile

Prints: forward FLOPs per image; this device's own bf16 and float32 matmul peak, measured in the same run;
then for each --precision option: the precision and memory layout chosen for training and for sampling
(with --precision auto, timed by the same start-up probe as training.py and sampling.py, whose cost is
printed), training images/s and the fraction of the better of the two matmul peaks it reaches (training
FLOPs are counted as 3x the forward pass), and the seconds for --num-samples images with T DDPM steps
(timed over --ddpm-steps steps and scaled to T, as the label says), 50 DDIM steps and 20 DPM-Solver++ steps
(timed in full), the fit of the 5-step walk to the model (samplers.walk_of), what `sampling.py --steps 5` and
`--steps 10` draw (samplers.STEPS_SAMPLER) and a distilled student (distill.py) at 1, 2 and 4 evaluations; and
peak memory (RSS on the CPU, allocated on a GPU).
"""
import argparse
import json
import resource
import sys
import time

import torch

from cli import add_device_options, int_list, non_negative_int, positive_int, show_log
from hardware import (
    LAYOUT_NAMES,
    autocast,
    choose_speed,
    compile_for_sampling,
    describe_device,
    pick_device,
    synchronize,
)
from noise_scheduler import make_scheduler
from samplers import DEFAULT_GUIDANCE, STEPS_SAMPLER, STUDENT_ALPHA_MIN, STUDENT_STEPS, predict_noise, walk_of
from sampling import Pipeline, generate, sample
from training import DEFAULTS, diffusion_loss, loss_gamma, model_shape
from unet import UNet, count_flops


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


def class_labels(model, n, device):
    """Labels 0, 1, ..., in turn for a conditional model (as generate asks for them), None for an unconditional one."""
    return torch.arange(n, device=device) % model.num_classes if model.num_classes else None


def train_throughput(model, scheduler, device, precision, batch_size, steps, compile_):
    """Images per second of algorithm 1, steady state (after warm-up steps)."""
    labels = class_labels(model, batch_size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, DEFAULTS["adam_beta2"]))
    net = torch.compile(model) if compile_ else model
    x0 = torch.rand(batch_size, model.in_channels, model.image_size, model.image_size, device=device) * 2 - 1
    t_probs = scheduler.timestep_probs(DEFAULTS["timestep_sampling"])        # training's default distribution of t

    def step():
        loss = diffusion_loss(net, scheduler, x0, labels, precision=precision, min_snr_gamma=loss_gamma(DEFAULTS),
                              label_dropout=DEFAULTS["label_dropout"], null_label=model.num_classes, t_probs=t_probs,
                              stratified=DEFAULTS["timestep_sampling"] == "stratified")
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


@torch.inference_mode()
def ddpm_seconds(model, scheduler, device, precision, n, steps):
    """Seconds for the first `steps` ancestral steps (algorithm 2) on n images (a conditional model's classes in
    turn, with sampling.py's guidance)."""
    x = torch.randn(n, model.in_channels, model.image_size, model.image_size, device=device)
    labels = class_labels(model, n, device)
    with autocast(device, precision):
        for _ in range(3):                                                     # warm-up (compiling, CUDA graphs)
            model(x, torch.zeros(n, dtype=torch.long, device=device))
        synchronize(device)
        start = time.perf_counter()
        for t in scheduler.timesteps()[:steps]:
            eps = predict_noise(model, x, torch.full((n,), t, dtype=torch.long, device=device), labels,
                                DEFAULT_GUIDANCE)
            x, _ = scheduler.step(eps, t, x)
        synchronize(device)
    return time.perf_counter() - start


def sampler_seconds(model, scheduler, device, precision, n, sampler, steps):
    """Seconds for a whole run of a few-step sampler (DDIM, DPM-Solver++) of `steps` steps on n images (a
    conditional model's classes in turn, with sampling.py's guidance)."""
    labels = class_labels(model, n, device)
    synchronize(device)
    start = time.perf_counter()
    sample(model, scheduler, n, device=device, precision=precision, sampler=sampler, steps=steps, labels=labels,
           guidance_scale=DEFAULT_GUIDANCE, progress=False)
    synchronize(device)
    return time.perf_counter() - start


def few_step_seconds(model, scheduler, device, precision, n):
    """(seconds of fitting the 5-step walk to this model, {steps: seconds for n images}) at 5 and 10 network
    evaluations with the sampler that `--steps` alone picks (samplers.walk_of, then generate)."""
    pipeline = Pipeline(model, scheduler, device, precision)
    synchronize(device)
    start = time.perf_counter()
    walk_of(pipeline, STEPS_SAMPLER, 5)
    synchronize(device)
    fit = time.perf_counter() - start
    runs = {}
    for steps in (5, 10):
        synchronize(device)
        start = time.perf_counter()
        generate(pipeline, n, batch_size=n, steps=steps, progress=False)
        synchronize(device)
        runs[steps] = time.perf_counter() - start
    return fit, runs


def student_seconds(model, model_kwargs, scheduler, device, precision, layout, n):
    """{steps: seconds for n images} of a student (distill.py) of this model at each step count it is distilled for:
    the model's weights with the jump input added (unet.UNet(jump=True)), drawn by generate as `sampling.py --sampler
    student --steps N` draws them, after one untimed run."""
    student = UNet(**model_kwargs, jump=True).to(device)
    student.load_state_dict(model.state_dict(), strict=False)
    student.to(memory_format=layout).eval()
    pipeline = Pipeline(model, scheduler, device, precision, student=student,
                        distill={"guidance_scale": DEFAULT_GUIDANCE, "alpha_min": STUDENT_ALPHA_MIN})
    runs = {}
    for steps in STUDENT_STEPS:
        generate(pipeline, n, batch_size=n, sampler="student", steps=steps, progress=False)
        synchronize(device)
        start = time.perf_counter()
        generate(pipeline, n, batch_size=n, sampler="student", steps=steps, progress=False)
        synchronize(device)
        runs[steps] = time.perf_counter() - start
    return runs


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux reports KiB


def build_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(description="Benchmark DDPM training and sampling on one device.")
    add_device_options(p, "auto: what training.py and sampling.py choose (timed at start-up, the probe's cost is "
                       "printed); bf16 or fp32: forced; both: bf16 and fp32 one after the other",
                       precisions=("auto", "bf16", "fp32", "both"))
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"], help="training batch")
    p.add_argument("--train-steps", type=positive_int, default=10, help="timed training steps")
    p.add_argument("--num-samples", type=positive_int, default=100, help="images sampled at once (default 100)")
    p.add_argument("--ddpm-steps", type=positive_int, default=50, help="DDPM steps timed, then scaled to T")
    p.add_argument("--channels", type=positive_int, default=d["base_channels"], help="U-Net width")
    p.add_argument("--channel-mults", type=int_list, default=None,
                   help="default: as training.py picks for the image size")
    p.add_argument("--num-res-blocks", type=positive_int, default=d["num_res_blocks"],
                   help="residual blocks per level")
    p.add_argument("--in-channels", type=positive_int, default=1, help="image channels (1 grayscale, 3 colour)")
    p.add_argument("--num-classes", type=non_negative_int, default=10, help="classes of a conditional model, as "
                   f"training.py makes for MNIST (its samplers are timed with sampling.py's guidance, "
                   f"{DEFAULT_GUIDANCE:g}); 0 for the paper's unconditional model (default 10)")
    p.add_argument("--image-size", type=positive_int, default=28, help="image side in pixels")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training and sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def measure(model, scheduler, device, precision_option, args):
    """Training images/s and the samplers' seconds with one --precision option (auto, bf16 or fp32): each task
    in the precision and layout that training.py and sampling.py would choose for it."""
    T = scheduler.num_timesteps
    start = time.perf_counter()
    train_precision, train_layout, train_note = choose_speed(model, device, precision_option, training=True,
                                                             batch_size=args.batch_size, use_cache=False)
    probe = time.perf_counter() - start
    model.to(memory_format=train_layout).train()
    train_ips = train_throughput(model, scheduler, device, train_precision, args.batch_size, args.train_steps,
                                 args.compile)
    start = time.perf_counter()
    precision, layout, note = choose_speed(model, device, precision_option, training=False,
                                           batch_size=args.num_samples, use_cache=False)
    probe += time.perf_counter() - start
    net = model.to(memory_format=layout).eval()
    if args.compile:
        net = compile_for_sampling(model, device)
    fit, few = few_step_seconds(net, scheduler, device, precision, args.num_samples)
    return {"train_precision": train_precision, "train_layout": LAYOUT_NAMES[train_layout],
            "train_choice": train_note,
            "train_images_per_s": train_ips, "sample_precision": precision, "sample_layout": LAYOUT_NAMES[layout],
            "sample_choice": note, "probe_seconds": probe,
            "ddpm_1000_steps_seconds": ddpm_seconds(net, scheduler, device, precision, args.num_samples,
                                                    args.ddpm_steps) * T / args.ddpm_steps,
            "ddim_50_steps_seconds": sampler_seconds(net, scheduler, device, precision, args.num_samples, "ddim", 50),
            "dpm_20_steps_seconds": sampler_seconds(net, scheduler, device, precision, args.num_samples, "dpm++", 20),
            "fit_seconds": fit, "steps_5_seconds": few[5], "steps_10_seconds": few[10],
            "student_seconds": student_seconds(model, args.model_kwargs, scheduler, device, precision, layout,
                                               args.num_samples)}


def main(argv=None):
    show_log()
    p = build_parser()
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    torch.manual_seed(0)
    shape = model_shape(args.in_channels, args.image_size, args.channel_mults)
    args.channel_mults = shape["channel_mults"]
    args.model_kwargs = dict(**shape, base_channels=args.channels, num_res_blocks=args.num_res_blocks,
                             num_classes=args.num_classes or None)
    try:
        model = UNet(**args.model_kwargs).to(device)
    except ValueError as e:
        p.error(str(e))
    scheduler = make_scheduler("linear", 1000).to(device)
    T = scheduler.num_timesteps

    flops = count_flops(model)
    peak_bf16 = matmul_peak(device, torch.bfloat16)
    peak_fp32 = matmul_peak(device, torch.float32)
    peak = max(peak_bf16, peak_fp32)
    options = ["bf16", "fp32"] if args.precision == "both" else [args.precision]
    runs = {option: measure(model, scheduler, device, option, args) for option in options}
    for r in runs.values():
        r["train_tflops_per_s"] = 3 * flops * r["train_images_per_s"] / 1e12
        r["train_fraction_of_best_peak"] = 3 * flops * r["train_images_per_s"] / peak
    result = {
        "device": str(device), "device_name": describe_device(device), "torch": torch.__version__,
        "model": {"base_channels": args.channels, "channel_mults": args.channel_mults,
                  "num_res_blocks": args.num_res_blocks, "image": [args.in_channels, args.image_size, args.image_size],
                  "num_classes": args.num_classes, "guidance_scale": DEFAULT_GUIDANCE if args.num_classes else None,
                  "parameters": sum(q.numel() for q in model.parameters())},
        "forward_gflops_per_image": flops / 1e9,
        "train_batch_size": args.batch_size,
        "matmul_peak_bf16_tflops": peak_bf16 / 1e12,
        "matmul_peak_fp32_tflops": peak_fp32 / 1e12,
        "num_samples": args.num_samples,
        "ddpm_steps_timed": args.ddpm_steps,
        "runs": runs,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "allocated" if device.type == "cuda" else "RSS",
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result, args, T, flops, peak_bf16, peak_fp32)
    return result


def print_table(result, args, T, flops, peak_bf16, peak_fp32):
    """The benchmark's figures as a table, one block for each --precision option."""
    runs = result["runs"]
    print(f"device {result['device']} ({result['device_name']}), torch {result['torch']}")
    print(f"model: {args.channels} channels x {args.channel_mults}, {args.num_res_blocks} res blocks/level, "
          f"{result['model']['parameters'] / 1e6:.2f} M parameters, "
          f"image {args.in_channels}x{args.image_size}x{args.image_size}, " + (
              f"{args.num_classes} classes, sampled with guidance {DEFAULT_GUIDANCE:g}" if args.num_classes
              else "unconditional"))
    print(f"  forward FLOPs per image: {flops / 1e9:.3f} GFLOP; matmul peak measured now: "
          f"bf16 {peak_bf16 / 1e12:.3f}, fp32 {peak_fp32 / 1e12:.3f} TFLOP/s")
    for option, r in runs.items():
        rows = [
            ("precision and layout chosen", f"training {r['train_precision']} {r['train_layout']}, sampling "
                                            f"{r['sample_precision']} {r['sample_layout']}"),
            ("why", f"training: {r['train_choice']}; sampling: {r['sample_choice']}"),
            ("speed probe (both tasks)", f"{r['probe_seconds']:.2f} s"),
            (f"training, batch {args.batch_size}", f"{r['train_images_per_s']:.0f} images/s = "
                                                   f"{r['train_tflops_per_s']:.3f} TFLOP/s (3 x forward) = "
                                                   f"{100 * r['train_fraction_of_best_peak']:.0f}% of the best "
                                                   f"matmul peak"),
            (f"{args.num_samples} samples x {T} DDPM steps", f"{r['ddpm_1000_steps_seconds']:.1f} s "
                                                             f"(timed over {args.ddpm_steps} steps, scaled to {T})"),
            (f"{args.num_samples} samples x 50 DDIM steps", f"{r['ddim_50_steps_seconds']:.1f} s"),
            (f"{args.num_samples} samples x 20 DPM-Solver++ steps", f"{r['dpm_20_steps_seconds']:.1f} s"),
            (f"fitting {STEPS_SAMPLER}'s 5-step walk to the model", f"{r['fit_seconds']:.1f} s (once per model)"),
            (f"{args.num_samples} samples, --steps 5 ({STEPS_SAMPLER})", f"{r['steps_5_seconds']:.2f} s"),
            (f"{args.num_samples} samples, --steps 10 ({STEPS_SAMPLER})", f"{r['steps_10_seconds']:.2f} s"),
            *[(f"{args.num_samples} samples, a distilled student, {k} evaluation{'s' * (k > 1)}", f"{seconds:.3f} s")
              for k, seconds in r["student_seconds"].items()],
        ]
        print(f"--precision {option}")
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    print(f"  peak memory ({result['peak_memory_kind']}): {result['peak_memory_mb']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
