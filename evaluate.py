"""Measure sample quality: FID against the real test split, and what a classifier makes of the samples.

    python evaluate.py                                          # 1000 samples from default/ddpm_ckpt.pth, all T steps
    python evaluate.py --sampler ddim --steps 50 --num-samples 10000           # any of sampling.py's samplers
    python evaluate.py --samples default/samples/individual --dataset mnist    # score a folder of PNGs instead
    python evaluate.py --json                                                  # one JSON object on stdout

FID (Heusel et al., 2017) is the Frechet distance between Gaussians fitted to features of real and
of generated images:  ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)),  lower is better.

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
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from checkpoint import CheckpointError
from cli import add_device_options, atomic_write, first_line, int_list, positive_int
from dataset import DATASETS, DataError, load_dataset, to_model_range
from hardware import autocast, describe_device, resolve_precision
from run_folder import DEFAULT_CKPT
from sampling import (
    DEFAULT_GUIDANCE,
    SAMPLERS,
    STEPS_SAMPLER,
    Pipeline,
    check_sampling_options,
    check_walk,
    choose_precision,
    generate,
    read_model,
    sampler_label,
    sampler_timesteps,
    walk_of,
)

CLASSIFIER_VERSION = 1      # raise it when Classifier or train_classifier changes: cached classifiers are retrained
FEATURE_DIM = 128
CLASSIFIER_BATCH, CLASSIFIER_LR = 128, 5e-3
SEED = 0                    # classifier training and the real-vs-real slice


class EvalError(Exception):
    """Something the user has to fix; the message is one sentence."""


# ---- Frechet distance ----------------------------------------------------------------------------
def gaussian_stats(features):
    """Mean (d,) and unbiased covariance (d, d) of features (N, d), in float64."""
    x = torch.as_tensor(features, dtype=torch.float64)
    assert x.ndim == 2 and x.shape[0] >= 2, f"need at least 2 feature vectors, got shape {tuple(x.shape)}"
    mu = x.mean(0)
    centered = x - mu
    return mu, centered.T @ centered / (x.shape[0] - 1)


def sqrtm_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix, from its eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    S1 S2 is not symmetric, but it is similar to M = S1^(1/2) S2 S1^(1/2), which is symmetric and
    positive semi-definite: Tr((S1 S2)^(1/2)) is the sum of the square roots of M's eigenvalues.
    Two symmetric eigendecompositions, exact and stable even for singular covariances.
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, cov1, mu2, cov2))
    root1 = sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    middle = (middle + middle.T) / 2                                  # symmetric up to rounding
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + cov1.trace() + cov2.trace() - 2 * trace_sqrt))


# ---- feature networks ----------------------------------------------------------------------------
class Classifier(nn.Module):
    """A small CNN for 28x28 (or so) images: three 3x3 conv layers with BatchNorm, a 128-d penultimate
    layer (the FID features) and the class logits."""

    def __init__(self, in_channels, num_classes, feature_dim=FEATURE_DIM):
        super().__init__()

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(in_channels, 32), nn.MaxPool2d(2),                                  # 28 -> 14
            *conv(32, 64), nn.MaxPool2d(2),                                           # 14 -> 7
            *conv(64, 128), nn.AdaptiveAvgPool2d(3),                                  # 7 -> 3
            nn.Flatten(), nn.Linear(128 * 3 * 3, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):                  # x (B, C, H, W) in [-1, 1] -> features (B, 128), logits (B, classes)
        features = self.body(x)
        return features, self.head(features)


class InceptionFeatures(nn.Module):
    """The FID Inception-v3's 2048-d pool features of images in [-1, 1].  torch-fidelity's network takes the
    uint8 pixels, as TensorFlow's graph did, and resizes them to 299x299 as TensorFlow 1 did; grayscale is
    repeated to three channels, as reading it as RGB would."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):                  # x (B, C, H, W) in [-1, 1] -> features (B, 2048), no logits
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)     # exact: x came from uint8
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        (features,) = self.net(pixels)
        return features, None


@dataclasses.dataclass
class Features:
    """A feature network and how it is named: in every FID printed, and in the statistics cache."""
    network: nn.Module      # forward(x in [-1, 1]) -> (features (B, d), class logits (B, K) or None)
    name: str               # "self-trained mnist classifier, 128-d"
    tag: str                # part of the statistics cache's file name
    key: str                # changes whenever the network's weights do
    batch_size: int


def load_inception(device):
    """The Inception-v3 of FID papers with its weights, downloaded once into torch.hub's checkpoints folder (a
    progress bar on stderr), or raise EvalError saying where to put the file."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
    except ImportError:
        raise EvalError("the FID Inception-v3 comes from the torch-fidelity package, which is not installed: "
                        "pip install -r requirements.txt") from None
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    file_name = os.path.basename(URL_INCEPTION_V3)
    path = os.path.join(folder, file_name)
    try:
        if not os.path.exists(path):      # torch.hub writes a temporary file and renames it once it is complete
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, path, progress=True)
    except Exception as e:   # no internet: URLError; a folder that cannot be written: OSError; ...
        raise EvalError(f"the FID Inception-v3 weights could not be downloaded ({first_line(e)}): put {file_name} "
                        f"(from {URL_INCEPTION_V3}) in {folder}") from None
    try:
        torch.load(path, map_location="cpu", weights_only=True)   # plain tensors: a file that would run code is refused
        with contextlib.redirect_stdout(sys.stderr):                   # stdout stays clean for --json
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    except Exception as e:   # a truncated or foreign file fails in many ways: RuntimeError, UnpicklingError, ...
        raise EvalError(f"{path} is not a readable copy of the FID Inception-v3 weights ({type(e).__name__}): "
                        f"replace it with {URL_INCEPTION_V3}") from None
    return Features(InceptionFeatures(net).to(device).eval(), "Inception-v3 with the FID weights of papers, 2048-d",
                    "inception", f"torch-fidelity inception-v3-compat 2048 {file_name}", batch_size=50)


def choose_features(channels, image_size, wanted, device, log):
    """The FID features for images of this shape: Inception-v3's Features, or None for the self-trained
    classifier's.  'auto': the classifier for small grayscale images (as is common for MNIST); Inception-v3
    for the others when its weights load, else the classifier (with a note).  'inception' fails instead."""
    if wanted == "classifier" or (wanted == "auto" and channels == 1 and image_size <= 32):
        return None
    try:
        return load_inception(device)
    except EvalError as e:
        if wanted == "inception":
            raise
        log(f"note: {e}; using the self-trained classifier's features instead (such FIDs compare only with "
            f"FIDs from the same features, not with papers)")
        return None


@torch.no_grad()
def extract(network, images, device, batch_size):
    """Features (N, d) in float64 and class probabilities (N, K) (None without a classifier head) of
    uint8 images (N, C, H, W): the network in eval mode, batched, in float32."""
    network.eval()
    features, probs = [], []
    for first in range(0, len(images), batch_size):
        x = to_model_range(images[first:first + batch_size]).to(device)
        f, logits = network(x)
        features.append(f.double().cpu())
        if logits is not None:
            probs.append(logits.float().softmax(1).cpu())
    return torch.cat(features), (torch.cat(probs) if probs else None)


# ---- the classifier: trained once, cached ----------------------------------------------------------
def train_classifier(images, labels, device, epochs):
    """Train the classifier on uint8 images (N, C, H, W), batched from memory like training.py, with a
    fixed seed, Adam and a cosine learning-rate decay, in bf16 autocast where the device supports it."""
    torch.manual_seed(SEED)
    model = Classifier(images.shape[1], int(labels.max()) + 1).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=CLASSIFIER_LR)
    precision = resolve_precision("auto", device)
    generator = torch.Generator().manual_seed(SEED)
    total_steps, step = epochs * math.ceil(len(images) / CLASSIFIER_BATCH), 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(images), CLASSIFIER_BATCH):
            idx = order[first:first + CLASSIFIER_BATCH]
            x, y = to_model_range(images[idx]).to(device), labels[idx].to(device)
            for group in optimizer.param_groups:
                group["lr"] = CLASSIFIER_LR * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            with autocast(device, precision):
                _, logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


def fingerprint(*tensors):
    """A short hash of tensors' shapes, dtypes and bytes: it changes whenever the data does."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def read_cache(path, key):
    """(contents, None) if the cache file at `path` was made for `key`, else (None, why it cannot be used)."""
    if not os.path.exists(path):
        return None, "none is cached yet"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None, f"the cache {path} is unreadable"
    cached_key = state.get("key", {}) if isinstance(state, dict) else {}
    stale = [name for name, value in key.items() if cached_key.get(name) != value]
    if stale:
        return None, f"the {' and the '.join(stale)} changed since it was cached"
    return state, None


def write_cache(path, state, log):
    """Save atomically (cli.atomic_write); a cache that cannot be written is only a note."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f), binary=True)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or first_line(e)
        log(f"note: could not write the cache {path} ({reason}); it will be rebuilt next time")


def get_classifier(dataset, train, test, cache_dir, epochs, device, log):
    """The classifier's Features: the cached classifier if it was trained on exactly this training data
    with this recipe, else a newly trained one (then cached); and its accuracy on the test split."""
    images, labels = train
    key = {"classifier version": CLASSIFIER_VERSION, "training data": fingerprint(images, labels),
           "number of training epochs": epochs}
    path = os.path.join(cache_dir, f"{dataset}_classifier.pth")
    state, why_not = read_cache(path, key)
    if state is not None:
        model = Classifier(images.shape[1], int(labels.max()) + 1)
        model.load_state_dict(state["weights"])
        model.to(device).eval()
        accuracy = state["test_accuracy"]
        log(f"classifier: reusing the cached {path} ({accuracy:.1%} test accuracy)")
    else:
        log(f"classifier: training a small CNN on the {len(images)} {dataset} training images for {epochs} "
            f"epoch(s), once, as {why_not} (a few minutes on a CPU)...")
        start = time.perf_counter()
        model = train_classifier(images, labels, device, epochs)
        _, probs = extract(model, test[0], device, batch_size=1000)
        accuracy = float((probs.argmax(1) == test[1]).double().mean())
        log(f"classifier: trained in {time.perf_counter() - start:.0f} s, {accuracy:.1%} accuracy on the "
            f"{len(test[0])} test images; cached in {path}")
        weights = {k: v.cpu() for k, v in model.state_dict().items()}
        write_cache(path, {"key": key, "weights": weights, "test_accuracy": accuracy}, log)
    weights_key = fingerprint(*model.state_dict().values())
    return Features(model, f"self-trained {dataset} classifier, {FEATURE_DIM}-d", "classifier",
                    f"classifier {weights_key}", batch_size=1000), accuracy


def get_test_stats(dataset, test_images, features, cache_dir, device, log):
    """(mu, cov) of the features of the whole test split, cached; rebuilt when the test data or the
    feature network changes."""
    key = {"feature network": features.key, "test data": fingerprint(test_images)}
    path = os.path.join(cache_dir, f"{dataset}_test_stats_{features.tag}.pth")
    state, why_not = read_cache(path, key)
    if state is not None:
        log(f"test statistics: reusing the cached {path} (features: {features.name})")
        return state["mu"], state["cov"]
    start = time.perf_counter()
    feats, _ = extract(features.network, test_images, device, features.batch_size)
    mu, cov = gaussian_stats(feats)
    log(f"test statistics: {len(test_images)} {dataset} test images in {time.perf_counter() - start:.0f} s "
        f"(features: {features.name}), as {why_not}; cached in {path}")
    write_cache(path, {"key": key, "mu": mu, "cov": cov}, log)
    return mu, cov


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
