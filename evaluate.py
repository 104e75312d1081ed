"""Measure sample quality: FID against the real test split, and what a classifier makes of the samples.

    python evaluate.py                                          # 1000 samples from default/ddpm_ckpt.pth, all T steps
    python evaluate.py --sampler ddim --steps 50 --num-samples 10000           # any of sampling.py's samplers
    python evaluate.py --samples default/samples/individual --dataset mnist    # score a folder of PNGs instead
    python evaluate.py --json                                                  # one JSON object on stdout

FID (Heusel et al., 2017) is the Frechet distance between Gaussians fitted to features of real and
of generated images:  ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)),  lower is better (fid.py).

Features.  For small grayscale images (MNIST, Fashion-MNIST): the 128-d penultimate layer of a small
CNN that this script trains on the dataset's own training split the first time (a few minutes on a
CPU) and caches, as is common for MNIST.  For colour images: the 2048-d pool features of the
Inception-v3 that FID papers use (TensorFlow's graph of 2015-12-05), from torch-fidelity rather than
pytorch-fid because torch-fidelity resizes and scales the pixels as TensorFlow did, so its FIDs match
TensorFlow's to float precision, and it needs no package beyond ours.  Its weights are downloaded
once into torch.hub's checkpoints folder; where they cannot be had, auto uses the classifier with a
note, and --features inception stops with one sentence saying where to put the file.  Every FID
printed names its features: only Inception FIDs compare with papers' figures (at the same N, against
the same reference images); classifier FIDs compare only with each other.  The classifier also
reports its confidence on the samples, how evenly they cover the classes, and, for a conditional
model, how often it agrees with the requested label.

The reference statistics cover the whole test split; they and the classifier are cached in the data
folder (--cache-dir) and rebuilt when the data changes.  The real-vs-real floor scores as many
training images as there are samples against the same statistics: about what a perfect model would get.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from checkpoint import CheckpointError
from cli import add_device_options, atomic_write, int_list, positive_int, show_log
from dataset import DATASETS, DataError, load_dataset
from fid import (
    SEED,
    EvalError,
    Features,
    choose_features,
    extract,
    frechet_distance,
    gaussian_stats,
    get_classifier,
    get_test_stats,
)
from hardware import describe_device
from run_folder import DEFAULT_CKPT
from samplers import (
    DEFAULT_GUIDANCE,
    SAMPLERS,
    STEPS_SAMPLER,
    STUDENT_STEPS,
    sampler_label,
    sampler_timesteps,
    walk_of,
)
from sampling import (
    NoStudent,
    Pipeline,
    check_sampling_options,
    check_walk,
    choose_precision,
    generate,
    read_model,
    sampler_for,
)


# ---- the images to score -------------------------------------------------------------------------
def sampler_text(args, pipeline):
    text = sampler_label(args.sampler, args.steps, pipeline.scheduler.num_timesteps, args.eta)
    return text + (f", guidance {args.guidance_scale:g}" if pipeline.model.num_classes else "")


def draw(pipeline, num_samples, log, *, seed, batch_size, sampler, steps, eta, guidance_scale, progress=True):
    """uint8 images (N, C, H, W) drawn by sampling.generate with the options given, the labels asked for (None if
    unconditional), and the seconds it took: the images that `sampling.py --individual` writes with those options.
    What is fitted to the model (UniPC's walk, the fitted sampler's timesteps), made once per model, is not counted
    in the seconds."""
    fit, start = pipeline.fit, time.perf_counter()
    walk_of(pipeline, sampler, steps, progress)
    if pipeline.fit is not fit:
        log(f"fitted the timesteps to the model in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    images, requested = generate(pipeline, num_samples, seed=seed, batch_size=batch_size, sampler=sampler,
                                 steps=steps, eta=eta, guidance_scale=guidance_scale, progress=progress)
    seconds = time.perf_counter() - start
    log(f"sampled {num_samples} images in {seconds:.0f} s on {pipeline.device.type} ({pipeline.precision})")
    return images, requested, seconds


def read_png_folder(folder, dataset, channels, image_size, limit=None):
    """uint8 images (N, C, H, W) from the PNGs in a folder, in name order, read as grayscale or RGB to
    match the dataset; the first `limit` of them if given."""
    if not os.path.isdir(folder):
        raise EvalError(f"there is no folder {folder}" if not os.path.exists(folder) else f"{folder} is not a folder")
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(".png"))
    if not names:
        raise EvalError(f"{folder} holds no PNG files")
    if len(names) == 1:
        raise EvalError(f"{folder} holds a single PNG, and FID needs at least 2 images")
    if limit is not None and len(names) < limit:
        raise EvalError(f"--num-samples {limit} asks for more images than the {len(names)} PNGs in {folder}")
    arrays = []
    for name in names[:limit]:
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
        except (OSError, ValueError):
            raise EvalError(f"{path} is not a readable PNG image") from None
        if img.size != (image_size, image_size):
            raise EvalError(f"{path} is {img.size[0]}x{img.size[1]} pixels, but {dataset} images are "
                            f"{image_size}x{image_size}")
        arrays.append(np.asarray(img))
    images = torch.from_numpy(np.stack(arrays))                        # (N, H, W) or (N, H, W, 3)
    return images.unsqueeze(1) if channels == 1 else images.permute(0, 3, 1, 2).contiguous()


def check_splits(dataset, train, test):
    """The classifier learns the labels, and the samples are compared with images held out from training."""
    if train[1] is None or test[1] is None:
        raise EvalError(f"the {dataset} images have no labels, and evaluate.py needs a labelled dataset "
                        f"(its classifier learns them)")
    if train[0].shape == test[0].shape and torch.equal(train[0], test[0]):
        raise EvalError(f"the {dataset} data has no test split apart from its training images to compare with")


def real_slice(train_images, n):
    """n training images chosen with a fixed seed (all of them when there are fewer)."""
    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(SEED))
    return train_images[order[:n]]


# ---- scores --------------------------------------------------------------------------------------
def classifier_summary(probs, requested=None):
    """The classifier's mean confidence (top probability), how evenly it spreads the images over the
    classes (entropy of the predicted-class histogram / log K: 1 is perfectly even), the shares of
    the rarest and commonest class, and its agreement with the requested labels."""
    num_classes = probs.shape[1]
    predicted = probs.argmax(1)
    share = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
    seen = share[share > 0]
    summary = {"confidence": float(probs.max(1).values.mean()),
               "class_balance": max(0.0, float(-(seen * seen.log()).sum() / math.log(num_classes))),
               "rarest_class_share": float(share.min()), "commonest_class_share": float(share.max())}
    if requested is not None:
        summary["label_agreement"] = float((predicted == requested).double().mean())
    return summary


def score(images, requested, features, classifier, test_stats, device):
    """FID of uint8 images against the test statistics, and the classifier's view of them."""
    feats, probs = extract(features.network, images, device, features.batch_size)
    if probs is None:
        _, probs = extract(classifier.network, images, device, classifier.batch_size)
    return {"fid": frechet_distance(*gaussian_stats(feats), *test_stats), **classifier_summary(probs, requested)}


def load_pipeline(args, parser):
    """--ckpt as a sampling.Pipeline, with the sampling options checked against it before the speed probe
    (sampling.choose_precision) sets its precision and layout."""
    pipeline = read_model(args.ckpt, args.device)
    try:
        args.sampler, args.steps = sampler_for(pipeline, args.sampler, args.steps)
    except NoStudent as e:
        parser.exit(2, f"error: {e}\n")
    T, trained_on = pipeline.scheduler.num_timesteps, pipeline.config["dataset"]
    if args.sampler != "ddpm" and args.steps > T:
        parser.error(f"--steps {args.steps} is more than the {T} timesteps the model was trained with")
    if args.sampler != "ddpm":
        check_walk(pipeline.scheduler, args.sampler, args.steps, parser)
    if args.dataset is not None and args.dataset != trained_on:
        parser.error(f"--dataset {args.dataset} contradicts {args.ckpt}, which was trained on {trained_on}")
    return choose_precision(pipeline, args.precision, batch_size=min(args.batch_size, args.num_samples))


@dataclasses.dataclass
class Reference:
    """What every score needs: the model to sample (None for --samples) or the images to score, the data, the
    classifier and its test accuracy, the FID features and the test split's statistics."""
    pipeline: "Pipeline | None"
    images: "torch.Tensor | None"
    train: tuple
    test: tuple
    classifier: Features
    accuracy: float
    features: Features
    test_stats: tuple


def reference(args, parser, log):
    """Everything a score needs, before anything is sampled (nothing is sampled in vain): the model (None for
    --samples), the test data's classifier, features and statistics, and the images to score for --samples."""
    pipeline = images = None
    if args.samples is None:
        pipeline = load_pipeline(args, parser)
        args.dataset = pipeline.config["dataset"]
    if args.dataset == "folder":
        raise EvalError("the folder dataset has no test split apart from its training images to compare with")
    train, test = reference_data(args.dataset, args.data_dir)
    channels, image_size = test[0].shape[1], test[0].shape[2]
    if pipeline is None:          # read the PNGs first, so that a wrong folder fails before anything slow
        images = read_png_folder(args.samples, args.dataset, channels, image_size, args.num_samples)
    elif (pipeline.model.in_channels, pipeline.model.image_size) != (channels, image_size):
        side = pipeline.model.image_size
        raise EvalError(f"{args.ckpt} makes {pipeline.model.in_channels}x{side}x{side} images, but the "
                        f"{args.dataset} data in {args.data_dir} is {channels}x{image_size}x{image_size}")
    classifier, accuracy, features, test_stats = reference_features(
        args.dataset, train, test, args.cache_dir or args.data_dir, args.features, args.classifier_epochs, args.device,
        log)
    return Reference(pipeline, images, train, test, classifier, accuracy, features, test_stats)


def reference_data(dataset, data_dir):
    """The dataset's training and test splits, (images, labels) each, checked to be usable as a reference."""
    train, test = (load_dataset(dataset, data_dir, train=split) for split in (True, False))
    check_splits(dataset, train, test)
    return train, test


def reference_features(dataset, train, test, cache_dir, wanted, classifier_epochs, device, log):
    """The classifier's Features and its test accuracy, the FID features (`wanted`: auto, classifier or inception)
    and the test split's statistics under them, each taken from the caches in cache_dir or made (and cached)."""
    channels, image_size = test[0].shape[1], test[0].shape[2]
    inception = choose_features(channels, image_size, wanted, device, log)    # fails before any training
    classifier, accuracy = get_classifier(dataset, train, test, cache_dir, classifier_epochs, device, log)
    features = inception if inception is not None else classifier
    return classifier, accuracy, features, get_test_stats(dataset, test[0], features, cache_dir, device, log)


def fid_of(pipeline, dataset, data_dir, num_samples, sampler, steps, seed, *, batch_size=100, eta=0.0,
           guidance_scale=DEFAULT_GUIDANCE, features="auto", classifier_epochs=2, cache_dir=None, log=print,
           progress=True):
    """The FID of num_samples images that the pipeline draws (sampling.generate with these options) against the
    dataset's test split: the "generated" FID that `evaluate.py --ckpt ... --json` prints for the same options,
    by the same steps (reference_data, reference_features, draw, score).  training.py --fid-every calls it."""
    train, test = reference_data(dataset, data_dir)
    classifier, _, feats, test_stats = reference_features(dataset, train, test, cache_dir or data_dir, features,
                                                          classifier_epochs, pipeline.device, log)
    images, requested, _ = draw(pipeline, num_samples, log, seed=seed, batch_size=batch_size, sampler=sampler,
                                steps=steps, eta=eta, guidance_scale=guidance_scale, progress=progress)
    return score(images, requested, feats, classifier, test_stats, pipeline.device)["fid"]


def sampling_options(args):
    """draw()'s options, from the command line."""
    return dict(seed=args.seed, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps, eta=args.eta,
                guidance_scale=args.guidance_scale)


def evaluate(args, parser, log):
    """The reference first, then the images to score, their FID and the real-vs-real floor.  Returns a dict."""
    ref = reference(args, parser, log)
    if ref.pipeline is None:
        images, requested, source = ref.images, None, args.samples
    else:
        images, requested, _ = draw(ref.pipeline, args.num_samples, log, **sampling_options(args))
        source = f"{args.ckpt} ({sampler_text(args, ref.pipeline)})"
    floor = real_slice(ref.train[0], len(images))
    scored = functools.partial(score, features=ref.features, classifier=ref.classifier, test_stats=ref.test_stats,
                               device=args.device)
    return {"dataset": args.dataset, "source": source, "num_images": len(images),
            "num_test_images": len(ref.test[0]), "features": ref.features.name, "classifier": ref.classifier.name,
            "classifier_test_accuracy": ref.accuracy,
            "generated": scored(images, requested),
            "real_floor": {"num_images": len(floor), **scored(floor, None)}}


SWEEP = [("ddim", 0.0), ("ddim", 1.0), ("dpm++", 0.0), ("dpm++sde", 0.0), ("unipc", 0.0), ("restart", 0.0),
         ("fitted", 0.0)]
ODE_LIMIT_STEPS = 50        # DPM-Solver++(2M) at this many steps: the model's probability-flow ODE, solved closely


def sweep(args, parser, log):
    """FID at N = --num-samples of each few-step sampler at each of --sweep-steps and of the 1000-step DDPM, with the
    seconds 100 samples took.  Each point is written to the JSON file as soon as it is measured, and a file
    from an earlier sweep of the same checkpoint, N, seed and guidance lends its points, so an interrupted
    sweep goes on where it stopped.  Writes SWEEP.json, SWEEP.png (FID against seconds) and prints a table."""
    import visualize
    ref = reference(args, parser, log)
    T = ref.pipeline.scheduler.num_timesteps
    json_path = args.sweep_out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "sweep.json")
    # the weights' digest, not the file's size and time: storing the fitted sampler's fit rewrites the checkpoint
    identity = {"ckpt": os.path.abspath(args.ckpt), "weights": ref.pipeline.weights,
                "num_samples": args.num_samples, "seed": args.seed, "guidance_scale": args.guidance_scale}
    results = {**identity, "points": []}
    if os.path.isfile(json_path):
        try:
            with open(json_path) as f:
                earlier = json.load(f)
            if all(earlier.get(k) == v for k, v in identity.items()):
                results = earlier
                log(f"reusing {len(earlier['points'])} points of {json_path}")
        except (OSError, ValueError, KeyError):
            log(f"{json_path} is unreadable; it will be replaced")
    floor = real_slice(ref.train[0], args.num_samples)
    results.update(floor_fid=score(floor, None, ref.features, ref.classifier, ref.test_stats, args.device)["fid"],
                   features=ref.features.name, machine=describe_device(args.device))
    runs = [(sampler, eta, steps, None) for steps in args.sweep_steps for sampler, eta in SWEEP
            if sampler in args.sweep_samplers]
    # How far the model's ODE is from its stochastic sampler: the deterministic solver at many steps (the ODE's limit,
    # which every fast deterministic sampler approaches) beside the T-step DDPM.
    ode_steps = min(ODE_LIMIT_STEPS, T)
    if "dpm++" in args.sweep_samplers:
        runs.append(("dpm++", 0.0, ode_steps, f"ODE limit ({ode_steps}-step DPM-Solver++(2M))"))
    runs += [("ddpm", 0.0, T, f"DDPM ({T} steps)")] if "ddpm" in args.sweep_samplers else []
    if "student" in args.sweep_samplers and ref.pipeline.student is None:
        log(f"sweep: no student ({ref.pipeline.no_student})")
    elif "student" in args.sweep_samplers:      # the distilled student, at each step count it serves
        runs += [("student", 0.0, steps, None) for steps in STUDENT_STEPS]
    for sampler, eta, steps, label in runs:
        name = sampler_label(sampler, steps, T, eta)
        label = label or name.split("-step ", 1)[1]
        if any(p["label"] == label and p["steps"] == steps for p in results["points"]):
            continue
        try:
            sampler_timesteps(ref.pipeline.scheduler, sampler, steps)
        except ValueError as e:
            log(f"sweep: no {name}: {e}")
            continue
        log(f"sweep: {name}")
        images, requested, seconds = draw(ref.pipeline, args.num_samples, log, **{
            **sampling_options(args), "sampler": sampler, "steps": steps, "eta": eta})
        scored = score(images, requested, ref.features, ref.classifier, ref.test_stats, args.device)
        results["points"].append({"label": label, "sampler": sampler, "eta": eta, "steps": steps,
                                  "fid": scored["fid"], "seconds_per_100": 100 * seconds / args.num_samples,
                                  "confidence": scored["confidence"]})
        atomic_write(json_path, lambda f: json.dump(results, f, indent=1))
    png_path = os.path.splitext(json_path)[0] + ".png"
    visualize.plot_sweep(results, png_path)
    lines = [f"| sampler | steps | FID (N = {args.num_samples}) | seconds for 100 samples |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {p['label']} | {p['steps']} | {p['fid']:.1f} | {p['seconds_per_100']:.1f} |"
              for p in sorted(results["points"], key=lambda p: (p["label"], p["steps"]))]
    lines += [f"| real images (floor) | | {results['floor_fid']:.1f} | |",
              f"features: {results['features']}; {results['machine']}; wrote {json_path} and {png_path}"]
    return "\n".join(lines)


def format_table(results):
    """The results as a small table: the generated images next to the real-vs-real floor."""
    generated, floor = results["generated"], results["real_floor"]
    share = lambda r: f"{r['rarest_class_share']:.1%} / {r['commonest_class_share']:.1%}"   # noqa: E731
    number = lambda key: (f"{generated[key]:.3f}", f"{floor[key]:.3f}")                    # noqa: E731
    rows = [(f"FID (features: {results['features']})", *number("fid")),
            ("classifier confidence (mean top probability)", *number("confidence")),
            ("class balance (entropy / log K; 1 = even)", *number("class_balance")),
            ("rarest / commonest class", share(generated), share(floor))]
    if "label_agreement" in generated:
        rows.append(("classifier agrees with the requested label", f"{generated['label_agreement']:.1%}", "-"))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{results['dataset']}: {results['num_images']} images from {results['source']}, "
             f"against the {results['num_test_images']} test images",
             f"{'':{width}}  {'generated':>15}  {'real (floor)':>15}"]
    lines += [f"{name:{width}}  {a:>15}  {b:>15}" for name, a, b in rows]
    lines += [f"classifier: {results['classifier']}, {results['classifier_test_accuracy']:.1%} test accuracy",
              f"real (floor): {floor['num_images']} training images scored the same way, about what a perfect model "
              f"would get; FID grows as N shrinks, so compare only FIDs over the same number of images"]
    return "\n".join(lines)


def sampler_list(text):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SAMPLERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: name samplers among {', '.join(SAMPLERS)}")
    return names


def build_parser():
    p = argparse.ArgumentParser(description="Measure sample quality: FID against the test split, and a "
                                            "classifier's view.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default=None, help="checkpoint to sample from (default default/ddpm_ckpt.pth)")
    source.add_argument("--samples", metavar="DIR", help="score the PNGs in DIR instead (what sampling.py --individual "
                                                         "writes); needs --dataset")
    p.add_argument("--dataset", choices=DATASETS, help="the reference data for --samples (--ckpt: the checkpoint's)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="images to generate (default 1000); with --samples, score only the first N PNGs")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images denoised at once (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the samples (default 0, as sampling.py)")
    add_device_options(p, "sampling precision; auto = the faster of bf16 and fp32, timed on this device at start-up")
    p.add_argument("--sampler", default=None, choices=SAMPLERS, help="as sampling.py: ddpm (all T steps, the "
                   f"default without --steps; with --steps, {STEPS_SAMPLER}), "
                   "fitted, ddim, dpm++, dpm++sde, unipc or restart")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="network evaluations of the few-step samplers (default 50 for ddim, 10 for fitted, 20 for the "
                   "others)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance for conditional models (default {DEFAULT_GUIDANCE})")
    p.add_argument("--features", default="auto", choices=["auto", "classifier", "inception"],
                   help="FID features; auto: the self-trained classifier for small grayscale images, else the "
                        "Inception-v3 of FID papers (its weights are downloaded once)")
    p.add_argument("--classifier-epochs", type=positive_int, default=2,
                   help="training epochs of the classifier (default 2)")
    p.add_argument("--data-dir", default="data", help="dataset folder (default data)")
    p.add_argument("--cache-dir", default=None,
                   help="where the classifier and test statistics are cached (default: --data-dir)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object (progress goes to stderr)")
    p.add_argument("--sweep", action="store_true", help="FID of DDIM (eta 0 and 1), DPM-Solver++, its SDE form, "
                   "UniPC, Restart and the fitted sampler at each of --sweep-steps, of the ODE's limit (50-step "
                   "DPM-Solver++) and of the 1000-step DDPM: a table, SWEEP.json and a picture SWEEP.png")
    p.add_argument("--sweep-steps", type=int_list, default=[5, 10, 20, 50],
                   help="step counts of --sweep (default 5,10,20,50)")
    p.add_argument("--sweep-samplers", type=sampler_list, default=list(SAMPLERS), help="the samplers of --sweep "
                   "(default all: ddpm,ddim,dpm++,dpm++sde,restart,fitted,unipc); ddpm is the 1000-step point")
    p.add_argument("--sweep-out", default=None, metavar="SWEEP.json",
                   help="where --sweep writes its points (default: sweep.json beside the checkpoint; the picture "
                   "beside it)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.samples is not None and args.dataset is None:
        p.error("--samples needs --dataset, the data whose test split the images are compared with")
    if args.samples is None:
        args.ckpt = args.ckpt or DEFAULT_CKPT
        args.num_samples = args.num_samples or 1000
    if args.num_samples is not None and args.num_samples < 2:
        p.error("--num-samples must be at least 2: FID needs a covariance")
    if args.sweep and args.samples is not None:
        p.error("--sweep samples from a checkpoint; it cannot score --samples")
    check_sampling_options(args, p)
    if isinstance(args.steps, list):      # check_sampling_options fills in the sampler's default as a list
        args.steps = args.steps[0]
    return args, p


def main(argv=None):
    show_log()
    args, parser = parse_args(argv)
    log = functools.partial(print, file=sys.stderr if args.json else sys.stdout, flush=True)
    try:
        if args.sweep:
            print(sweep(args, parser, log))
            return
        results = evaluate(args, parser, log)
    except (EvalError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(results) if args.json else format_table(results))


if __name__ == "__main__":
    main()
