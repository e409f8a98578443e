"""Dataset registry: every dataset loads offline from files on disk into uint8 tensors, decoded once and cached.

``--data-dir`` may be a root that holds one folder per dataset (``cifar10/``, ``cifar-10-batches-py/``,
``tiny-imagenet-200/``, ...), the dataset's own folder, or an archive (``.tar``, ``.tar.gz``, ``.tgz``) holding
either; archives are unpacked once into the cache. Nothing is downloaded unless ``download=True`` is asked for.
A decoded dataset is cached as one safetensors file keyed by the names, sizes and times of its source files, so a
second run starts in seconds.

Images are ``uint8`` tensors of shape (N, C, H, W); labels ``int64`` (N,). Class indices follow the sorted class
names (torchvision's ``ImageFolder`` rule), which for CIFAR-10/100 coincides with the official label order.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BenchError
from .registry import Registry

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")  # .zip: tiny-imagenet-200.zip as served


def default_data_dir() -> Path:
    return Path(os.environ.get("AFT_BENCH_DATA", Path.home() / ".cache" / "aft-bench" / "data"))


CACHE_ENV = "AFT_BENCH_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "aft-bench" / "decoded"))


# ---------------------------------------------------------------------------------------------------------------
# containers


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: torch.Tensor) -> "Split":
        return Split(self.x[idx], self.y[idx])

    def head(self, n: int | None) -> "Split":
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])

    def _mask_per_class(self, first: int | None = None, last: int | None = None) -> torch.Tensor:
        keep = torch.zeros(len(self), dtype=torch.bool)
        for c in self.y.unique():
            idx = (self.y == c).nonzero().flatten()
            keep[idx[:first] if first is not None else idx[max(len(idx) - last, 0):]] = True
        return keep

    def per_class(self, n: int) -> "Split":
        """The first ``n`` examples of every class, in their original order."""
        return self.take(self._mask_per_class(first=n).nonzero().flatten())

    def last_per_class(self, n: int) -> "Split":
        """The last ``n`` examples of every class (a held-out slice), in their original order."""
        return self.take(self._mask_per_class(last=n).nonzero().flatten())

    def drop_last_per_class(self, n: int) -> "Split":
        """Everything but :meth:`last_per_class` ``(n)``."""
        return self.take((~self._mask_per_class(last=n)).nonzero().flatten())


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    source: str
    layout: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    @property
    def fingerprint(self) -> str:
        """A digest of the decoded content — every image and label of both splits, the class names — not of where
        it came from: the same images give the same fingerprint from a pickle, a folder or an archive, and a run's
        identity (``RunConfig.data``) changes when its data does. Computed once per dataset, then kept."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            h = hashlib.sha256(b"aft-bench data v1\n")
            h.update(json.dumps(self.classes).encode())
            for split in (self.train, self.test):
                for t in (split.x, split.y):
                    t = t.contiguous()
                    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                    h.update(memoryview(t.numpy()).cast("B"))
            fp = self.__dict__["_fingerprint"] = h.hexdigest()[:16]
        return fp

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (used by ``--normalize``)."""
        x = self.train.x.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


@dataclass
class DatasetSpec:
    name: str
    num_classes: int | None
    channels: int | None
    image_size: int | None
    folder_names: Sequence[str]
    layouts: Sequence[Callable[[Path], "Layout | None"]]
    expected: str
    how_to_get: str
    default_roots: Sequence[Path] = ()
    downloader: Callable[[Path], None] | None = None
    generated: Callable[[], Dataset] | None = None
    description: str = ""
    # training augmentation: random crop of the image padded by `crop_pad` pixels, and horizontal flip
    crop_pad: int = 4
    flip: bool = True


@dataclass
class Layout:
    kind: str
    root: Path
    files: list[Path]  # every source file (for the cache key)
    read: Callable[[], tuple[Split, Split, list[str]]] = field(repr=False)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# ---------------------------------------------------------------------------------------------------------------
# safe readers


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays, dicts, lists and scalars: the CIFAR python batches need nothing more, and a
    malicious pickle cannot reach any other callable."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise BenchError(f"{path} is not a valid CIFAR python batch ({e})") from None
    if not isinstance(d, dict):
        raise BenchError(f"{path} is not a valid CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _decode_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise BenchError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_many(paths: list[Path], channels: int, size: int | None, what: str) -> torch.Tensor:
    from tqdm import tqdm

    if not paths:
        raise BenchError(f"no images found for {what}")
    first = _decode_image(paths[0], channels)
    h, w = first.shape[1:]
    if size is not None and (h, w) != (size, size):
        raise BenchError(f"image {paths[0]} is {w}×{h}; {what} expects {size}×{size}")
    out = np.empty((len(paths), channels, h, w), dtype=np.uint8)
    out[0] = first
    for i, p in enumerate(tqdm(paths[1:], desc=f"decoding {what}", unit="img", leave=False,
                               disable=None, mininterval=2.0), start=1):
        a = _decode_image(p, channels)
        if a.shape[1:] != (h, w):
            raise BenchError(f"image {p} is {a.shape[2]}×{a.shape[1]}; {what} expects {w}×{h} like the others")
        out[i] = a
    return torch.from_numpy(out)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


# ---------------------------------------------------------------------------------------------------------------
# layouts


def folder_layout(channels: int = 3, size: int | None = None, test_names=("test", "val"), name: str = "imagefolder"):
    """``train/<class>/*.jpg|png``, ``test/<class>/...`` (or ``val/<class>/``)."""

    def detect(root: Path) -> Layout | None:
        train = root / "train"
        test = next((root / t for t in test_names if (root / t).is_dir()), None)
        if not train.is_dir() or test is None:
            return None
        classes = sorted(d.name for d in train.iterdir() if d.is_dir())
        if not classes:
            return None
        test_classes = sorted(d.name for d in test.iterdir() if d.is_dir())
        if not test_classes:
            return None
        if set(test_classes) - set(classes):
            raise BenchError(f"{test} has classes {sorted(set(test_classes) - set(classes))[:5]} "
                             f"that {train} does not have")
        files = {s: {c: _images_in(d / c) for c in classes if (d / c).is_dir()}
                 for s, d in (("train", train), ("test", test))}
        all_files = [p for s in files.values() for fs in s.values() for p in fs]

        def read():
            splits = []
            for s in ("train", "test"):
                paths = [p for c in classes for p in files[s].get(c, [])]
                labels = [i for i, c in enumerate(classes) for _ in files[s].get(c, [])]
                x = _decode_many(paths, channels, size, f"{name} {s}")
                splits.append(Split(x, torch.tensor(labels, dtype=torch.int64)))
            # folders list the test images class by class; a fixed pseudo-random order (seed 0) makes the first n
            # test images (--eval-n, the feature-gap probe) cover all classes, as the official CIFAR order does
            test = splits[1].take(torch.randperm(len(splits[1]), generator=torch.Generator().manual_seed(0)))
            return splits[0], test, classes

        return Layout("folders", root, all_files, read)

    return detect


def cifar_pickle_layout(variant: str):
    """torchvision's official python-pickle layout of CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100
    (``cifar-100-python``)."""
    if variant == "cifar10":
        sub, train_files, test_files, meta, names_key, label_key = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
            "label_names", "labels")
    else:
        sub, train_files, test_files, meta, names_key, label_key = (
            "cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels")

    def detect(root: Path) -> Layout | None:
        for base in (root, root / sub):
            if all((base / f).is_file() for f in train_files + test_files):
                break
        else:
            return None
        files = [base / f for f in train_files + test_files] + ([base / meta] if (base / meta).is_file() else [])

        def read():
            def load(names):
                xs, ys = [], []
                for n in names:
                    d = _unpickle(base / n)
                    if "data" not in d or label_key not in d:
                        raise BenchError(f"{base / n} lacks 'data' or '{label_key}': not a {variant} batch")
                    xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    ys.append(np.asarray(d[label_key], dtype=np.int64))
                return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

            train, test = load(train_files), load(test_files)
            n_cls = 10 if variant == "cifar10" else 100
            classes = [f"class_{i}" for i in range(n_cls)]
            if (base / meta).is_file():
                m = _unpickle(base / meta)
                if names_key in m:
                    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in m[names_key]]
            return train, test, classes

        return Layout("python-pickle", base, files, read)

    return detect


def tinyimagenet_layout(root: Path) -> Layout | None:
    """The official ``tiny-imagenet-200`` layout; its labelled ``val`` split is the test split."""
    if not (root / "wnids.txt").is_file() or not (root / "train").is_dir():
        return None
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise BenchError(f"{ann} is missing: the tiny-imagenet-200 layout needs val/val_annotations.txt")
    train_files = {w: _images_in(root / "train" / w / "images") if (root / "train" / w / "images").is_dir() else []
                   for w in wnids}
    missing = [w for w, fs in train_files.items() if not fs]
    if missing:
        raise BenchError(f"{root / 'train'} has no images for {len(missing)} classes, e.g. "
                         f"{missing[0]}/images/*.JPEG")
    val = []
    index = {w: i for i, w in enumerate(wnids)}
    for line in ann.read_text().splitlines():
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            continue
        if parts[1] not in index:
            raise BenchError(f"{ann} names class {parts[1]!r}, which is not in wnids.txt")
        val.append((root / "val" / "images" / parts[0], index[parts[1]]))
    files = [p for fs in train_files.values() for p in fs] + [p for p, _ in val] + [root / "wnids.txt", ann]

    def read():
        paths = [p for w in wnids for p in train_files[w]]
        labels = [index[w] for w in wnids for _ in train_files[w]]
        xtr = _decode_many(paths, 3, 64, "tinyimagenet train")
        xte = _decode_many([p for p, _ in val], 3, 64, "tinyimagenet val")
        return (Split(xtr, torch.tensor(labels)), Split(xte, torch.tensor([c for _, c in val])), wnids)

    return Layout("tiny-imagenet-200", root, files, read)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("bad magic number")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise BenchError(f"{path} is not a valid IDX file ({e})") from None


def idx_layout(root: Path) -> Layout | None:
    """MNIST-style IDX files, plain or gzipped (Debian's ``dataset-fashion-mnist``)."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    found = []
    for n in names:
        p = next((root / (n + s) for s in ("", ".gz") if (root / (n + s)).is_file()), None)
        if p is None:
            return None
        found.append(p)

    def read():
        xs = [_read_idx(found[0]), _read_idx(found[2])]
        ys = [_read_idx(found[1]), _read_idx(found[3])]
        splits = []
        for x, y in zip(xs, ys):
            if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
                raise BenchError(f"IDX files under {root} disagree: images {x.shape}, labels {y.shape}")
            splits.append(Split(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))))
        return splits[0], splits[1], list(FASHION_CLASSES)

    return Layout("idx", root, found, read)


# ---------------------------------------------------------------------------------------------------------------
# synthetic


SYNTHETIC = dict(classes=10, size=32, train_per_class=1000, test_per_class=200, contrast=(0.1, 0.3), background=0.3,
                 noise=0.06, shift=4, template_seed=1234)


def make_synthetic(n_per_class: int, seed: int, classes: int = 10, size: int = 32, contrast=(0.1, 0.3),
                   background: float = 0.3, noise: float = 0.06, shift: int = 4, template_seed: int = 1234) -> Split:
    """Ten classes of 32×32 RGB images: each class is a smooth colour template plus an oriented grating, placed with
    a random shift and contrast on a random low-frequency background with pixel noise. Deterministic in ``seed``.

    A small CNN learns it to ~99 % in a minute on a CPU, and PGD at ε = 8/255 drives a naturally trained model to
    ~0 % while PGD-AT keeps a large part (see tests/test_training.py).
    """
    g = torch.Generator().manual_seed(template_seed)
    lo = torch.rand(classes, 3, 4, 4, generator=g) - 0.5
    tmpl = F.interpolate(lo, size=size, mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    ang = torch.rand(classes, generator=g) * torch.pi
    freq = 2 + torch.rand(classes, generator=g) * 3
    grat = torch.sin(2 * torch.pi * freq[:, None, None] / size
                     * (xx * torch.cos(ang)[:, None, None] + yy * torch.sin(ang)[:, None, None]))
    tmpl = tmpl + 0.3 * grat[:, None]
    tmpl = tmpl / tmpl.abs().amax(dim=(1, 2, 3), keepdim=True)

    g = torch.Generator().manual_seed(seed)
    n = n_per_class * classes
    y = torch.arange(classes).repeat_interleave(n_per_class)[torch.randperm(n, generator=g)]
    dx = torch.randint(-shift, shift + 1, (n,), generator=g)
    dy = torch.randint(-shift, shift + 1, (n,), generator=g)
    iy = (torch.arange(size)[None] - dy[:, None]) % size
    ix = (torch.arange(size)[None] - dx[:, None]) % size
    base = tmpl[y][torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                   iy[:, None, :, None], ix[:, None, None, :]]
    a = contrast[0] + (contrast[1] - contrast[0]) * torch.rand(n, 1, 1, 1, generator=g)
    back = F.interpolate(torch.rand(n, 3, 8, 8, generator=g) - 0.5, size=size, mode="bilinear", align_corners=False)
    x = 0.5 + a * base + background * back + noise * torch.randn(n, 3, size, size, generator=g)
    return Split((x.clamp(0, 1) * 255).round().to(torch.uint8), y)


def _synthetic() -> Dataset:
    s = SYNTHETIC
    kw = {k: s[k] for k in ("classes", "size", "contrast", "background", "noise", "shift", "template_seed")}
    train = make_synthetic(s["train_per_class"], seed=0, **kw)
    test = make_synthetic(s["test_per_class"], seed=1, **kw)
    return Dataset("synthetic", [f"pattern{i}" for i in range(s["classes"])], train, test, "generated", "synthetic")


# ---------------------------------------------------------------------------------------------------------------
# downloads (only on explicit request)


def _torchvision_download(cls_name: str):
    def run(root: Path) -> None:
        import torchvision.datasets as tvd

        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            getattr(tvd, cls_name)(str(root), train=train, download=True)

    return run


def _tiny_download(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive("http://cs231n.stanford.edu/tiny-imagenet-200.zip", str(root))


# ---------------------------------------------------------------------------------------------------------------
# registry

DATASETS.add("synthetic", DatasetSpec(
    "synthetic", 10, 3, 32, (), (), "nothing (generated in code)", "", generated=_synthetic,
    # its generator already shifts every pattern by up to 4 pixels, and a mirror turns one class's grating into
    # another orientation: no crop, no flip
    crop_pad=0, flip=False,
    description="embedded default: 10 classes of generated 32×32 RGB patterns, 1000/200 per class"))
DATASETS.add("cifar10", DatasetSpec(
    "cifar10", 10, 3, 32, ("cifar10", "cifar-10", "CIFAR10", "CIFAR-10", "cifar-10-batches-py"),
    (cifar_pickle_layout("cifar10"), folder_layout(3, 32, name="cifar10")),
    "cifar-10-batches-py/ (data_batch_1..5, test_batch) or train/<class>/*.png|jpg and test/<class>/...",
    "pass --data-dir to a folder or archive holding it, or add --download", downloader=_torchvision_download("CIFAR10"),
    description="CIFAR-10, 50 000 / 10 000 images 32×32, 10 classes"))
DATASETS.add("cifar100", DatasetSpec(
    "cifar100", 100, 3, 32, ("cifar100", "cifar-100", "CIFAR100", "CIFAR-100", "cifar-100-python"),
    (cifar_pickle_layout("cifar100"), folder_layout(3, 32, name="cifar100")),
    "cifar-100-python/ (train, test, meta) or train/<class>/*.png|jpg and test/<class>/...",
    "pass --data-dir to a folder or archive holding it, or add --download", downloader=_torchvision_download("CIFAR100"),
    description="CIFAR-100, 50 000 / 10 000 images 32×32, 100 classes"))
DATASETS.add("tinyimagenet", DatasetSpec(
    "tinyimagenet", 200, 3, 64, ("tiny-imagenet-200", "tinyimagenet", "tiny-imagenet"), (tinyimagenet_layout,),
    "tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)",
    "get tiny-imagenet-200.zip from http://cs231n.stanford.edu/ and pass --data-dir to it (the .zip or its unpacked "
    "folder), or add --download",
    downloader=_tiny_download, description="Tiny-ImageNet, 100 000 / 10 000 (val) images 64×64, 200 classes"))
DATASETS.add("fashion-mnist", DatasetSpec(
    "fashion-mnist", 10, 1, 28, ("fashion-mnist", "FashionMNIST", "fashion_mnist", "FashionMNIST/raw"), (idx_layout,),
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
    "t10k-labels-idx1-ubyte[.gz]",
    "install Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) or add --download",
    default_roots=(Path("/usr/share/datasets/fashion-mnist"),), downloader=_torchvision_download("FashionMNIST"),
    description="Fashion-MNIST, 60 000 / 10 000 images 28×28 grey, 10 classes"))
DATASETS.add("imagefolder", DatasetSpec(
    "imagefolder", None, 3, None, (), (folder_layout(3, None),),
    "train/<class>/*.jpg|png and test/<class>/... (or val/<class>/...), all images the same size",
    "pass --data-dir to your folder", description="any folder-per-class tree of your own"))


# ---------------------------------------------------------------------------------------------------------------
# loading


def _extract_archive(archive: Path, cache_dir: Path) -> Path:
    st = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    name = archive.name
    for s in ARCHIVE_SUFFIXES:
        if name.endswith(s):
            name = name[: -len(s)]
    dest = cache_dir / "extracted" / f"{name}-{key}"
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cannot unpack {archive} into the decoded-data cache {cache_dir} ({e.strerror}); "
                         f"accepted: a writable directory (set {CACHE_ENV} to one)") from None
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, tmp)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")  # refuses absolute paths, '..', links outside, devices
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise BenchError(f"cannot unpack {archive} ({e})") from None
    (tmp / ".complete").write_text("ok\n")
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _extract_zip(archive: Path, dest: Path) -> None:
    """Unpack a zip archive into ``dest`` with the checks tarfile's "data" filter makes: a member with an absolute
    path, a ``..`` component, or that is a symbolic link or anything but a file or folder is refused (the whole
    archive: nothing of it is used)."""
    import stat

    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for m in members:
            name = m.filename
            parts = name.replace("\\", "/").split("/")
            kind = stat.S_IFMT(m.external_attr >> 16)
            why = ("an absolute path" if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") else
                   "a '..' component" if ".." in parts else
                   "a symbolic link" if kind == stat.S_IFLNK else
                   "not a file or folder" if kind not in (0, stat.S_IFREG, stat.S_IFDIR) else None)
            if why is None and not (dest / name).resolve().is_relative_to(dest.resolve()):
                why = "a path outside the destination"
            if why:
                raise zipfile.BadZipFile(f"member {name!r} is {why}; refused")
        for m in members:
            target = dest / m.filename
            if m.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)


def _cache_key(spec: DatasetSpec, layout: Layout) -> str:
    h = hashlib.sha256(f"{spec.name}|{layout.kind}|v2".encode())
    for p in sorted(layout.files):
        st = p.stat()
        h.update(f"{p.relative_to(layout.root) if p.is_relative_to(layout.root) else p}|{st.st_size}|"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _save_cache(path: Path, ds: Dataset) -> None:
    from .checkpoint import write_safetensors

    write_safetensors(path, {"train_x": ds.train.x, "train_y": ds.train.y, "test_x": ds.test.x, "test_y": ds.test.y},
                      {"classes": json.dumps(ds.classes), "source": ds.source, "layout": ds.layout})


def _load_cache(path: Path, name: str) -> Dataset | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return Dataset(name, json.loads(meta["classes"]), Split(t["train_x"], t["train_y"]),
                       Split(t["test_x"], t["test_y"]), meta["source"], meta["layout"])
    except Exception:
        return None  # a damaged cache is rebuilt from the source files


def _candidates(spec: DatasetSpec, root: Path) -> list[Path]:
    out = [root] + [root / n for n in spec.folder_names]
    return [p for p in out if p.is_dir()]


def find_layout(spec: DatasetSpec, root: Path) -> Layout | None:
    for cand in _candidates(spec, root):
        for detect in spec.layouts:
            layout = detect(cand)
            if layout is not None:
                return layout
    return None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a registered dataset from disk (decoding once into the cache). Raises :class:`BenchError` with one line
    naming the path, what was expected there and how to get it."""
    spec = DATASETS.get(name)
    if spec.generated is not None:
        return spec.generated()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache.exists() and not cache.is_dir() or any(a.is_file() for a in cache.parents):
        where = next((a for a in [cache, *cache.parents] if a.is_file()), cache)
        raise BenchError(f"the decoded-data cache {cache} {'is' if where == cache else 'lies under'} a file "
                         f"{'' if where == cache else str(where) + ' '}(set by {CACHE_ENV} or its default); "
                         f"accepted: a directory (set {CACHE_ENV} to one)")
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
        if not roots[0].exists():
            raise BenchError(f"--data-dir {roots[0]} does not exist; {name} expects {spec.expected} there")
    else:
        roots = [r for r in spec.default_roots if r.is_dir()] + [default_data_dir()]
    layout = None
    for root in roots:
        if root.is_file():
            if not root.name.endswith(ARCHIVE_SUFFIXES):
                raise BenchError(f"--data-dir {root} is a file but not an archive (accepted: "
                                 f"{', '.join(ARCHIVE_SUFFIXES)}) or a folder")
            root = _extract_archive(root, cache)
        if root.is_dir():
            layout = find_layout(spec, root)
        if layout is not None:
            break
    if layout is None and download and spec.downloader is not None:
        target = roots[-1] if roots[-1].is_dir() or not roots[-1].exists() else default_data_dir()
        spec.downloader(target)
        layout = find_layout(spec, target)
    if layout is None:
        where = roots[0] if data_dir is not None else " or ".join(str(r) for r in roots)
        raise BenchError(f"no {name} data under {where}: expected {spec.expected}; {spec.how_to_get}")

    cache_file = cache / f"{name}-{layout.kind}-{_cache_key(spec, layout)}.safetensors"
    ds = _load_cache(cache_file, name) if cache_file.is_file() else None
    if ds is None:
        train, test, classes = layout.read()
        ds = Dataset(name, classes, train, test, str(layout.root), layout.kind)
        _validate(spec, ds)
        try:
            _save_cache(cache_file, ds)
        except BenchError:
            pass  # an unwritable cache only costs the next run the decoding time
    _validate(spec, ds)
    return ds


def _validate(spec: DatasetSpec, ds: Dataset) -> None:
    if spec.num_classes is not None and ds.num_classes != spec.num_classes:
        raise BenchError(f"{ds.source} holds {ds.num_classes} classes; {spec.name} has {spec.num_classes}")
    if spec.image_size is not None and ds.image_size != spec.image_size:
        raise BenchError(f"{ds.source} holds {ds.image_size}×{ds.image_size} images; {spec.name} expects "
                         f"{spec.image_size}×{spec.image_size}")
    if spec.channels is not None and ds.channels != spec.channels:
        raise BenchError(f"{ds.source} holds {ds.channels}-channel images; {spec.name} expects {spec.channels}")
    for s, split in (("train", ds.train), ("test", ds.test)):
        if len(split) == 0:
            raise BenchError(f"the {s} split under {ds.source} is empty")
        if int(split.y.min()) < 0 or int(split.y.max()) >= ds.num_classes:
            raise BenchError(f"labels of the {s} split under {ds.source} fall outside 0..{ds.num_classes - 1}")


_GENERATED: dict[str, Dataset] = {}  # the datasets generated in code, once per process


def planned_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """The dataset ``load_dataset(name, data_dir)`` gives, as planning sees it: files on disk are loaded every time
    (from the decoded cache: a fraction of a second for CIFAR-10), so a changed file is seen; a dataset generated in
    code once per process. A missing ``data_dir`` is the one-line error of :func:`load_dataset`."""
    if DATASETS.get(name).generated is None:
        return load_dataset(name, data_dir, download=download)
    if name not in _GENERATED:
        _GENERATED[name] = load_dataset(name)
    return _GENERATED[name]


def data_fingerprint(name: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> str:
    """The fingerprint (:attr:`Dataset.fingerprint`) of :func:`planned_dataset`, also for a run that is done."""
    return planned_dataset(name, data_dir, download).fingerprint


def describe_datasets() -> list[tuple[str, str]]:
    return [(n, DATASETS.get(n).description) for n in DATASETS.names()]


__all__ = ["Dataset", "Split", "DATASETS", "load_dataset", "planned_dataset", "data_fingerprint", "make_synthetic", "describe_datasets"]
