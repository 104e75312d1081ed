"""Pictures of the diffusion process.

    python visualize.py schedule                 # default/schedule.png: the linear and cosine schedules against t
    python visualize.py forward                  # default/forward.png: training images noised at t = 0 ... 999
    python visualize.py forward --dataset fashion-mnist --schedule cosine
    python visualize.py loss                     # default/loss.png: the loss curve from default/loss_log.csv
                                                 # (and loss_steps.csv beside it), with the FID and the
                                                 # learning rate where the logs have them
    python visualize.py fid --logs A/loss_log.csv B/loss_log.csv
                                                 # default/fid.png: the FID of --fid-every against minutes of
                                                 # training, one line per run

(The reverse process as an animation: python sampling.py --gif.)  From Python, grids of images and animations:
save_grid(images, "grid.png"), grid_frame and save_gif, which sampling.py and training.py use.
"""
import argparse
import csv
import math
import os

import torch

from cli import fail, positive_int, show_log
from dataset import DATASETS, DataError, load_dataset, to_model_range, to_uint8
from noise_scheduler import SCHEDULES, make_scheduler
from run_folder import DEFAULT_OUT_DIR, LOSS_LOG_NAME, STEP_LOG_NAME

FORWARD_TIMESTEPS = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)


# ---- grids of images, and animations -------------------------------------------------------------------
def grid_frame(x, nrow=10, padding=2):
    """A PIL image of a batch of images (B, C, H, W), floats in [-1, 1] or uint8: `nrow` images per row,
    `padding` white pixels around each; grayscale for one channel, RGB for three."""
    from PIL import Image
    images = (x if x.dtype == torch.uint8 else to_uint8(x)).cpu()
    b, c, h, w = images.shape
    columns = min(nrow, b)
    rows = math.ceil(b / columns)
    grid = torch.full((c, padding + rows * (h + padding), padding + columns * (w + padding)), 255, dtype=torch.uint8)
    for i in range(b):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    pixels = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)


def save_grid(x, path, nrow=10, padding=2):
    """Save images (floats in [-1, 1], or uint8) as one grid PNG, `nrow` images per row."""
    grid_frame(x, nrow, padding).save(path)


def save_gif(frames, path, seconds=4.0):
    """An animated GIF that plays the frames in `seconds` and holds the last one."""
    duration = max(20, int(1000 * seconds / max(1, len(frames))))
    frames[0].save(path, save_all=True, append_images=frames[1:] + [frames[-1]] * 10, duration=duration, loop=0)


# ---- plots ----------------------------------------------------------------------------------------------
def plot_schedule(path, num_timesteps=1000):
    """betas, alpha-bar, sqrt(alpha-bar), sqrt(1 - alpha-bar) and the SNR against t, for each schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    t = torch.arange(num_timesteps)
    for name in SCHEDULES:
        s = make_scheduler(name, num_timesteps)
        snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
        curves = [("beta_t", s.betas), ("alpha-bar_t", s.alphas_cumprod),
                  ("sqrt(alpha-bar_t): signal scale", s.sqrt_alphas_cumprod),
                  ("sqrt(1 - alpha-bar_t): noise scale", s.sqrt_one_minus_alphas_cumprod),
                  ("SNR = alpha-bar / (1 - alpha-bar)", snr)]
        for ax, (title, values) in zip(axes, curves):
            ax.plot(t, values, label=name)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("t")
    axes[0].set_yscale("log")
    axes[4].set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"Noise schedules, T = {num_timesteps}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def forward_grid(images, scheduler, timesteps, seed=0):
    """Rows of images noised by q(x_t | x_0) at each t in `timesteps` (one column per t), same noise per row."""
    x0 = to_model_range(images)                                             # (N, C, H, W)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    columns = [scheduler.add_noise(x0, noise, torch.full((len(x0),), t)) for t in timesteps]
    return torch.stack(columns, dim=1).flatten(0, 1)                       # (N * len(timesteps), C, H, W)


def step_log_of(log_path):
    """training.py writes loss_steps.csv (the mean of every 50 steps) beside loss_log.csv (one row an epoch)."""
    return os.path.join(os.path.dirname(log_path), STEP_LOG_NAME)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def plot_loss(log_path, path):
    """The training loss against the optimizer step: the mean of every 50 steps from loss_steps.csv
    (beside the log, when the run has one) and the mean of each epoch from loss_log.csv; the FID of the epochs
    that --fid-every measured on a second axis, and the learning rate of loss_steps.csv's lr column in a panel
    below, when the logs have them (logs of older runs do not)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    step_log = step_log_of(log_path)
    epochs = read_csv(log_path) if os.path.isfile(log_path) else []         # none before the first epoch ends
    steps = read_csv(step_log) if os.path.isfile(step_log) else []
    if not epochs and not steps:
        raise ValueError(f"{log_path} has no epochs yet")
    fids = [(int(r["step"]), float(r["fid"])) for r in epochs if r.get("fid")]
    rates = [(int(r["step"]), float(r["lr"])) for r in steps if r.get("lr")]
    if rates:
        fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    if steps:
        ax.plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps], lw=1, label="mean of 50 steps")
    if epochs:
        ax.plot([int(r["step"]) for r in epochs], [float(r["loss"]) for r in epochs], "o-", label="mean of the epoch")
    ax.set_ylabel("loss (the --loss objective)")
    ax.set_yscale("log")
    ax.set_title("Training loss" + (" and FID" if fids else ""))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if fids:
        fid_ax = ax.twinx()
        fid_ax.plot(*zip(*fids), "s--", color="tab:red", label="FID (--fid-every)")
        fid_ax.set_ylabel("FID", color="tab:red")
        more = fid_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    if rates:
        lr_ax.plot(*zip(*rates), lw=1, color="tab:green")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(True, alpha=0.3)
        lr_ax.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fid_against_minutes(log_path):
    """[(minutes of training, FID)] of the epochs of a loss log that --fid-every measured: the minutes are the
    running sum of the log's `seconds` column, the training time of each epoch (measurements not counted)."""
    points, seconds = [], 0.0
    for row in read_csv(log_path):
        seconds += float(row["seconds"])
        if row.get("fid"):
            points.append((seconds / 60, float(row["fid"])))
    if not points:
        raise ValueError("no FID in it: train with --fid-every")
    return points


def plot_fid(log_paths, labels, path):
    """FID against minutes of training, one line per run: how fast each recipe gets how good."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 4))
    curves = {}
    for log_path, label in zip(log_paths, labels):
        curves[label] = fid_against_minutes(log_path)
        ax.plot(*zip(*curves[label]), "o-", label=label)
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("FID (--fid-every)")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):       # 4, 6, 10, 20 rather than 4e0
        axis(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title("FID against training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)   # beside, not over, the curves
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return curves


def plot_sweep(results, path):
    """FID against the seconds that 100 samples take, one line per sampler (its step counts marked), the
    1000-step DDPM and the ODE's limit as points with a line across, and the real-vs-real floor as a dashed line:
    what `evaluate.py --sweep` measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for point in results["points"]:
        lines.setdefault(point["label"], []).append(point)
    for label, points in lines.items():
        points.sort(key=lambda p: p["seconds_per_100"])
        xs, ys = [p["seconds_per_100"] for p in points], [p["fid"] for p in points]
        line = ax.plot(xs, ys, "o-" if len(points) > 1 else "s", label=label)[0]
        if label.startswith(("ODE limit", "DDPM")):     # the two references every fast sampler is measured against
            ax.axhline(ys[0], color=line.get_color(), ls=":" if label.startswith("ODE") else "-.", lw=1)
        for p in points:
            ax.annotate(str(p["steps"]), (p["seconds_per_100"], p["fid"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.axhline(results["floor_fid"], color="gray", ls="--", label=f"real images (floor), N = {results['num_samples']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds for 100 samples ({results['machine']})")
    ax.set_ylabel(f"FID, N = {results['num_samples']} ({results['features']})")
    ax.set_title("Sample quality against sampling time (numbers: network evaluations)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser():
    p = argparse.ArgumentParser(description="Pictures of the noise schedule, the forward process, the loss, and the "
                                "FID against minutes of training.")
    p.add_argument("what", choices=["schedule", "forward", "loss", "fid"])
    p.add_argument("--out", help="output PNG (default default/<what>.png)")
    p.add_argument("--num-timesteps", type=positive_int, default=1000, help="T of the schedules (schedule, forward)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="linear", help="for forward")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="for forward")
    p.add_argument("--data-dir", default="data", help="for forward")
    p.add_argument("--image-size", type=positive_int, default=32, help="for forward with --dataset folder")
    p.add_argument("--num-images", type=positive_int, default=6, help="for forward: rows")
    p.add_argument("--log", default=os.path.join(DEFAULT_OUT_DIR, LOSS_LOG_NAME), help="for loss")
    p.add_argument("--logs", nargs="+", metavar="LOG", help="for fid: the loss logs of runs with --fid-every "
                   "(default: --log)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="for fid: a name for each log (default: its folder)")
    return p


def main(argv=None):
    show_log()
    p = build_parser()
    args = p.parse_args(argv)
    out = args.out or os.path.join(DEFAULT_OUT_DIR, f"{args.what}.png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if args.what == "schedule":
        plot_schedule(out, args.num_timesteps)
    elif args.what == "forward":
        try:
            images, _ = load_dataset(args.dataset, args.data_dir, train=True, image_size=args.image_size)
        except DataError as e:
            fail(e)
        scheduler = make_scheduler(args.schedule, args.num_timesteps)
        timesteps = [t for t in FORWARD_TIMESTEPS if t < args.num_timesteps]
        rows = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.num_images]]
        save_grid(forward_grid(rows, scheduler, timesteps), out, nrow=len(timesteps))
        print(f"columns: t = {', '.join(map(str, timesteps))}")
    elif args.what == "fid":
        logs = args.logs or [args.log]
        labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(log))) for log in logs]
        if len(labels) != len(logs):
            p.error(f"--labels names {len(labels)} runs, --logs {len(logs)}")
        for log in logs:
            if not os.path.isfile(log):
                fail(f"there is no loss log at {log}; train with --fid-every first")
        try:
            plot_fid(logs, labels, out)
        except (ValueError, KeyError) as e:
            fail(f"one of {', '.join(logs)} has no FID to draw ({e})")
    else:
        if not os.path.isfile(args.log) and not os.path.isfile(step_log_of(args.log)):
            fail(f"there is no loss log at {args.log} (nor {STEP_LOG_NAME} beside it); train first, or pass --log")
        try:
            plot_loss(args.log, out)
        except (ValueError, KeyError) as e:
            fail(f"{args.log} is not a loss log written by training.py ({e})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
