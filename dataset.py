"""Training data: the whole dataset held in memory as one uint8 tensor, batched by indexing.

    python dataset.py mnist                            # checks that MNIST is in data/ and prints its size
    python dataset.py folder --data-dir photos --image-size 64

mnist, fashion-mnist   torchvision reads the four IDX files from <data-dir>/MNIST/raw/ (or
                       <data-dir>/FashionMNIST/raw/) and downloads them when they are missing.
cifar10                torchvision reads <data-dir>/cifar-10-batches-py/ (or downloads it).
folder                 every PNG / JPEG below <data-dir>, converted to RGB, the shorter side resized
                       to --image-size and centre-cropped; labels come from the sub-folder names
                       when the images sit in sub-folders (<data-dir>/cats/..., <data-dir>/dogs/...).
Images are scaled to [-1, 1], the range the reverse process ends in.
"""
import gzip
import os
import shutil
import sys

import torch

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Where Debian's package dataset-fashion-mnist puts the Fashion-MNIST files (apt-get install dataset-fashion-mnist).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")
NATURAL_IMAGES = ("cifar10", "folder")      # these get random horizontal flips; digits and clothes do not


class DataError(Exception):
    """The dataset cannot be found, downloaded or read; the message says what to do."""


def _torchvision_class(name):
    from torchvision import datasets
    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]


CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def raw_folder(name, data_dir):
    return os.path.join(data_dir, _torchvision_class(name).__name__, "raw")


def _unpack_gz_files(raw, sources):
    """Gunzip IDX files given as .gz (in the raw folder itself, or in a system folder) into the raw folder."""
    for base in IDX_FILES:
        target = os.path.join(raw, base)
        if os.path.exists(target):
            continue
        for folder in sources:
            gz = os.path.join(folder, base + ".gz")
            if os.path.isfile(gz):
                os.makedirs(raw, exist_ok=True)
                with gzip.open(gz, "rb") as src, open(target + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(target + ".part", target)
                break


def load_dataset(name, data_dir="data", train=True, download=True, image_size=None):
    """Return (images, labels): images uint8 (N, C, H, W), labels int64 (N,), or None for unlabelled folders.

    Raises DataError with a message that names the folder where the files belong.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "folder":
        return load_folder(data_dir, image_size or 32)
    if name == "cifar10":
        return load_cifar10(data_dir, train, download)
    raw = raw_folder(name, data_dir)
    sources = [raw] + ([DEBIAN_FASHION_MNIST] if name == "fashion-mnist" else [])
    try:
        _unpack_gz_files(raw, sources)
    except (OSError, EOFError) as e:
        raise DataError(f"could not unpack the {name} files into {raw}: {e}") from None
    have_files = all(os.path.exists(os.path.join(raw, f)) for f in IDX_FILES)
    help_text = (f"put the four IDX files ({', '.join(IDX_FILES)}, or the same names ending in .gz) "
                 f"in {raw}{os.sep} and run again")
    try:
        ds = _torchvision_class(name)(data_dir, train=train, download=download and not have_files)
    except Exception as e:   # torchvision raises RuntimeError, URLError, OSError, ... depending on what failed
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if have_files:
            raise DataError(f"the {name} files in {raw} cannot be read ({reason}); replace them: {help_text}") from None
        raise DataError(f"{name} is not in {raw} and could not be downloaded ({reason}); {help_text}") from None
    images = ds.data
    if images.ndim == 3:                     # (N, H, W) -> (N, 1, H, W)
        images = images.unsqueeze(1)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    if images.dtype != torch.uint8 or len(images) == 0 or len(images) != len(labels):
        raise DataError(f"the {name} files in {raw} hold no usable images; {help_text}")
    return images.contiguous(), labels


def load_cifar10(data_dir, train, download):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    help_text = (f"put the CIFAR-10 python version (the folder cifar-10-batches-py, or cifar-10-python.tar.gz) "
                 f"in {data_dir}{os.sep} and run again")
    try:
        ds = _torchvision_class("cifar10")(data_dir, train=train, download=download and not os.path.isdir(folder))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if os.path.isdir(folder):
            raise DataError(f"the CIFAR-10 files in {folder} cannot be read ({reason}); {help_text}") from None
        raise DataError(f"CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}); {help_text}") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()       # (N, H, W, 3) -> (N, 3, H, W)
    return images, torch.as_tensor(ds.targets, dtype=torch.long)


def find_images(root):
    """Sorted paths of every PNG / JPEG below root, and their class folders ('' for images at the top)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(folder, f)
                relative = os.path.relpath(path, root)
                found.append((path, relative.split(os.sep)[0] if os.sep in relative else ""))
    return found


def load_folder(root, image_size):
    """Every image below root as RGB, shorter side resized to image_size and centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF
    if not os.path.isdir(root):
        raise DataError(f"the image folder {root} does not exist; pass the folder that holds your images as --data-dir")
    found = find_images(root)
    if not found:
        raise DataError(f"the image folder {root} holds no PNG or JPEG images")
    classes = sorted({c for _, c in found})
    labelled = "" not in classes
    images = torch.empty(len(found), 3, image_size, image_size, dtype=torch.uint8)
    for i, (path, _) in enumerate(found):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"the image file {path} cannot be read ({type(e).__name__}); remove or replace it") from None
        img = TF.center_crop(TF.resize(img, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), image_size)
        images[i] = TF.pil_to_tensor(img)
    labels = torch.tensor([classes.index(c) for _, c in found]) if labelled else None
    return images, labels


def class_names(name, data_dir=None):
    """Names of the classes, for labelled datasets."""
    if name == "folder":
        return sorted({c for _, c in find_images(data_dir)} - {""})
    return CLASS_NAMES[name]


def random_hflip(x, generator):
    """Flip each image (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def to_model_range(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Check that a dataset can be loaded.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    try:
        imgs, labs = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"{args.dataset}: {tuple(imgs.shape)} uint8 images, "
          + (f"{int(labs.max()) + 1} classes" if labs is not None else "no labels"))
