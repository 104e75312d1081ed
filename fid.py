"""FID (Heusel et al., 2017): the Frechet distance between Gaussians fitted to features of real and of generated
images, ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), and the networks whose features it is measured in.

    python -c "import fid, torch; s = fid.gaussian_stats(torch.randn(500, 8)); print(fid.frechet_distance(*s, *s))"

Features.  For small grayscale images (MNIST, Fashion-MNIST): the 128-d penultimate layer of a small CNN
(Classifier) trained on the dataset's own training split the first time and cached, as is common for MNIST.  For
colour images: the 2048-d pool features of the Inception-v3 that FID papers use, from torch-fidelity
(load_inception).  evaluate.py scores samples with them; the walk fit of the few-step samplers
(samplers.fit_walk_power) uses the Frechet distance in the network's own features.
"""
import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import atomic_write, first_line
from dataset import to_model_range
from hardware import autocast, resolve_precision

CLASSIFIER_VERSION = 1      # raise it when Classifier or train_classifier changes: cached classifiers are retrained
FEATURE_DIM = 128
CLASSIFIER_BATCH, CLASSIFIER_LR = 128, 5e-3
SEED = 0                    # classifier training and evaluate.py's real-vs-real slice


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
