"""Training data: the whole dataset held in memory as one uint8 tensor, batched by indexing.

    python dataset.py mnist                            # checks that MNIST is in data/ and prints its size
    python dataset.py folder --data-dir photos --image-size 64

mnist, fashion-mnist   the four IDX files in <data-dir>/MNIST/raw/ (or <data-dir>/FashionMNIST/raw/),
                       read directly; torchvision downloads them when they are missing.
cifar10                torchvision reads <data-dir>/cifar-10-batches-py/ (or downloads it).
folder                 every PNG / JPEG below <data-dir>, converted to RGB, the shorter side resized
                       to --image-size and centre-cropped; labels come from the sub-folder names
                       when the images sit in sub-folders (<data-dir>/cats/..., <data-dir>/dogs/...).
                       Decoded by DataLoader worker processes; a folder whose decoded images would
                       take more than IN_MEMORY_BYTES stays on disk and is decoded batch by batch.
Images are scaled to [-1, 1], the range the reverse process ends in.
"""
import gzip
import math
import os
import shutil

import numpy as np
import torch
from tqdm import tqdm

from cli import atomic_write, fail, first_line

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
# Where Debian's package dataset-fashion-mnist puts the Fashion-MNIST files (apt-get install dataset-fashion-mnist).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")
NATURAL_IMAGES = ("cifar10", "folder")      # these get random horizontal flips; digits and clothes do not
TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}    # where torchvision keeps the raw files
IN_MEMORY_BYTES = 1 << 30    # image folders up to 1 GiB of decoded uint8 pixels are held in memory
SMALL_FOLDER = 2000          # folders with fewer images are decoded without worker processes or a progress bar


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
    return os.path.join(data_dir, TORCHVISION_FOLDER[name], "raw")


def read_idx(path):
    """An IDX file, the format MNIST ships in, as a uint8 array: two zero bytes, the type 0x08 (unsigned
    byte), the number of dimensions, each dimension as a big-endian uint32, then the values."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 3:
        raise ValueError(f"{os.path.basename(path)} is not an IDX file of bytes")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != math.prod(shape):
        raise ValueError(f"{os.path.basename(path)} holds {values.size} values, its header says {math.prod(shape)}")
    return values.reshape(shape)


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
                with gzip.open(gz, "rb") as src:
                    atomic_write(target, lambda dst: shutil.copyfileobj(src, dst), binary=True)
                break


def load_dataset(name, data_dir="data", train=True, download=True, image_size=None, stream=None, workers=None):
    """Return (images, labels): images uint8 (N, C, H, W), labels int64 (N,), or None for unlabelled folders.
    A large image folder (or any, with stream=True) comes as a FolderImages that decodes on demand.

    Raises DataError with a message that names the folder where the files belong.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "folder":
        return load_folder(data_dir, image_size or 32, stream, workers)
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
    if not have_files:
        try:
            if not download:
                raise FileNotFoundError("downloads are off")
            _torchvision_class(name)(data_dir, train=train, download=True)
        except Exception as e:   # torchvision raises RuntimeError, URLError, OSError, ... depending on what failed
            raise DataError(f"{name} is not in {raw} and could not be downloaded ({first_line(e)}); "
                            f"{help_text}") from None
    split = "train" if train else "t10k"
    try:
        images = read_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"))
        labels = read_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"))
    except (OSError, ValueError) as e:
        raise DataError(f"the {name} files in {raw} cannot be read ({e}); replace them: {help_text}") from None
    if images.ndim != 3 or labels.ndim != 1 or len(images) == 0 or len(images) != len(labels):
        raise DataError(f"the {name} files in {raw} hold no usable images; {help_text}")
    images = torch.from_numpy(images.copy()).unsqueeze(1)                    # (N, H, W) -> (N, 1, H, W)
    return images, torch.from_numpy(labels.astype(np.int64))


def load_cifar10(data_dir, train, download):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    help_text = (f"put the CIFAR-10 python version (the folder cifar-10-batches-py, or cifar-10-python.tar.gz) "
                 f"in {data_dir}{os.sep} and run again")
    try:
        ds = _torchvision_class("cifar10")(data_dir, train=train, download=download and not os.path.isdir(folder))
    except Exception as e:
        reason = first_line(e)
        if os.path.isdir(folder):
            raise DataError(f"the CIFAR-10 files in {folder} cannot be read ({reason}); {help_text}") from None
        raise DataError(f"CIFAR-10 is not in {data_dir} and could not be downloaded ({reason}); "
                        f"{help_text}") from None
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


def decode_image(path, image_size):
    """An image file as uint8 (3, image_size, image_size): RGB, the shorter side resized (bicubic, antialiased)
    to image_size, then the centre cropped.  None if the file cannot be read as an image."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    w, h = img.size
    scale = image_size / min(w, h)
    w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    pixels = np.asarray(img.crop((left, top, left + image_size, top + image_size)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


class _DecodedFiles(torch.utils.data.Dataset):
    """What a DataLoader worker does: decode file i; an unreadable file gives a blank image and ok = False,
    so that the main process can name it (an exception raised in a worker would arrive as a traceback)."""

    def __init__(self, paths, image_size):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = decode_image(self.paths[i], self.image_size)
        if image is None:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), False
        return image, True


def _quiet_worker(_):
    """Ctrl-C and SIGTERM are for the training process, which saves and then ends its workers; a worker that
    died on the signal first would turn a clean stop into a 'worker exited unexpectedly' crash."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers():
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class FolderImages:
    """A folder of images too large for memory, used like the uint8 tensor (N, 3, S, S) it stands for:
    len(), .shape, and images[indices] decodes those images.  batches() streams many batches through
    DataLoader worker processes, which decode the next batches while the model trains on this one."""

    def __init__(self, paths, image_size, workers):
        self.paths, self.image_size, self.workers = paths, image_size, workers
        self.shape = torch.Size((len(paths), 3, image_size, image_size))

    def __len__(self):
        return len(self.paths)

    def batches(self, index_lists, pin_memory=False):
        """uint8 batches (B, 3, S, S) of the given index lists, in order."""
        files = _DecodedFiles(self.paths, self.image_size)
        loader = torch.utils.data.DataLoader(files, batch_sampler=[[int(i) for i in idx] for idx in index_lists],
                                             num_workers=self.workers, pin_memory=pin_memory,
                                             worker_init_fn=_quiet_worker if self.workers else None)
        for idx, (images, ok) in zip(index_lists, loader):
            if not ok.all():
                path = self.paths[int(idx[int((~ok).nonzero()[0])])]
                raise DataError(f"the image file {path} cannot be read as an image; remove or replace it")
            yield images

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        batch = next(self.batches([idx.reshape(-1)]))
        return batch[0] if idx.ndim == 0 else batch


def load_folder(root, image_size, stream=None, workers=None):
    """Every image below root as RGB, shorter side resized to image_size and centre-cropped, and the labels
    of their sub-folders (None when the images are not in sub-folders).  The images are one uint8 tensor,
    or, with stream=True or when they would take more than IN_MEMORY_BYTES, a FolderImages."""
    if not os.path.isdir(root):
        raise DataError(f"the image folder {root} does not exist; pass the folder that holds your images as "
                        f"--data-dir")
    found = find_images(root)
    if not found:
        raise DataError(f"the image folder {root} holds no PNG or JPEG images")
    classes = sorted({c for _, c in found})
    labels = torch.tensor([classes.index(c) for _, c in found]) if "" not in classes else None
    paths = [path for path, _ in found]
    if stream is None:
        stream = len(paths) * 3 * image_size ** 2 > IN_MEMORY_BYTES
    if workers is None:
        workers = 0 if len(paths) < SMALL_FOLDER else default_workers()
    folder = FolderImages(paths, image_size, workers)
    if stream:
        return folder, labels
    images = torch.empty(folder.shape, dtype=torch.uint8)
    chunks = torch.arange(len(paths)).split(256)
    with tqdm(total=len(paths), desc=f"decoding {root}", unit="img", disable=len(paths) < SMALL_FOLDER) as bar:
        for chunk, batch in zip(chunks, folder.batches(chunks)):
            images[chunk] = batch
            bar.update(len(chunk))
    return images, labels


def class_names(name, data_dir=None):
    """Names of the classes, for labelled datasets."""
    if name == "folder":
        return sorted({c for _, c in find_images(data_dir)} - {""})
    return CLASS_NAMES[name]


# ---- the batches of a training epoch -------------------------------------------------------------------------
def shard(order, batch, batch_size, rank, world):
    """This process's part of batch number `batch` of an epoch: the global batch of `batch_size`
    images, order[batch * batch_size : (batch + 1) * batch_size], split into `world` disjoint parts."""
    local = batch_size // world
    first = batch * batch_size + rank * local
    return order[first:first + local]


def epoch_batches(images, labels, order, first_batch, batches_per_epoch, batch_size, rank, world, device):
    """(uint8 images, labels) of batches first_batch.. of an epoch, this process's shard of each: indexed
    from the dataset held in memory, or decoded from disk by DataLoader workers for a streamed folder."""
    shards = [shard(order, b, batch_size, rank, world) for b in range(first_batch, batches_per_epoch)]
    if isinstance(images, torch.Tensor):
        batches = (images[idx.to(images.device)] for idx in shards)
    else:
        batches = images.batches(shards, pin_memory=device.type == "cuda")
    for idx, x in zip(shards, batches):
        yield x.to(device, non_blocking=True), None if labels is None else labels[idx.to(labels.device)].to(device)


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
        fail(err)
    print(f"{args.dataset}: {tuple(imgs.shape)} uint8 images, "
          + (f"{int(labs.max()) + 1} classes" if labs is not None else "no labels"))
