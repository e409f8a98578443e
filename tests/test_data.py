"""Every dataset layout loads from files the test generates; bad data gives one line naming path and layout."""
import gzip
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data as D
from bench.errors import BenchError


def _img(rng, size, mode="RGB"):
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _write_folder(root, classes, n_train, n_test, size=32, ext="png", test_name="test", seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), (test_name, n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = _img(rng, size)
                Image.fromarray(a).save(d / f"{i:03d}.{ext}")
                arrays[(split, c, i)] = a
    return arrays


def test_cifar10_folder_layout_png_roundtrip(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    arrays = _write_folder(tmp_path / "cifar10", classes[::-1], 2, 1)
    ds = D.load_dataset("cifar10", tmp_path)  # a root that holds cifar10/
    assert ds.classes == classes and ds.layout == "folders"
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (10, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.tolist() == [i for i in range(10) for _ in range(2)]
    np.testing.assert_array_equal(ds.train.x[2].permute(1, 2, 0).numpy(), arrays[("train", "automobile", 0)])
    # the test split is in a fixed mixed order, so that its first n images are not all of one class
    assert sorted(ds.test.y.tolist()) == list(range(10)) and ds.test.y.tolist() != list(range(10))
    for x, y in zip(ds.test.x, ds.test.y):
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), arrays[("test", classes[y], 0)])
    # the dataset's own folder works too
    assert torch.equal(D.load_dataset("cifar10", tmp_path / "cifar10").test.x, ds.test.x)


def _write_cifar_pickles(base, variant, n=4, seed=0):
    rng = np.random.default_rng(seed)
    base.mkdir(parents=True)
    k = 10 if variant == "cifar10" else 100
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if variant == "cifar10" else ["train", "test"]
    out = {}
    for f in files:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key.encode(): [int(v) for v in rng.integers(0, k, n)]}
        with open(base / f, "wb") as fh:
            pickle.dump(d, fh, protocol=2)
        out[f] = d
    names = [f"name{i:03d}".encode() for i in range(k)]
    meta = {b"label_names": names} if variant == "cifar10" else {b"fine_label_names": names}
    with open(base / ("batches.meta" if variant == "cifar10" else "meta"), "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return out


@pytest.mark.parametrize("variant,sub", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_python_pickle_layouts(tmp_path, variant, sub):
    raw = _write_cifar_pickles(tmp_path / sub, variant)
    ds = D.load_dataset(variant, tmp_path)
    assert ds.layout == "python-pickle" and ds.num_classes == (10 if variant == "cifar10" else 100)
    first = raw["data_batch_1" if variant == "cifar10" else "train"]
    np.testing.assert_array_equal(ds.train.x[0].numpy().reshape(-1), first[b"data"][0])
    assert ds.classes[5] == "name005"
    assert len(ds.train) == (20 if variant == "cifar10" else 4) and len(ds.test) == 4


def test_a_malicious_pickle_is_refused_and_not_executed(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    _write_cifar_pickles(base, "cifar10")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    with open(base / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh, protocol=2)
    with pytest.raises(BenchError, match="refusing to unpickle"):
        D.load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def _write_tiny(root, rng, wnids, val):
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        Image.fromarray(_img(rng, 64)).save(d / f"{w}_0.JPEG", quality=95)
    lines = []
    for i, w in enumerate(val):
        Image.fromarray(_img(rng, 64)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tinyimagenet_official_layout(tmp_path):
    wnids = [f"n{i:08d}" for i in range(200)][::-1]
    _write_tiny(tmp_path / "tiny-imagenet-200", np.random.default_rng(0), wnids,
                ["n00000007", "n00000199", "n00000000"])
    ds = D.load_dataset("tinyimagenet", tmp_path)
    assert ds.num_classes == 200 and ds.image_size == 64 and ds.classes == sorted(wnids)
    assert ds.train.x.shape == (200, 3, 64, 64)
    assert ds.test.y.tolist() == [7, 199, 0]


def _write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    xtr, ytr = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    xte, yte = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    for name, a in (("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                    ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)):
        _write_idx(tmp_path / (name + sfx), a, gz)
    ds = D.load_dataset("fashion-mnist", tmp_path)
    assert ds.channels == 1 and ds.image_size == 28 and ds.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.train.x[:, 0].numpy(), xtr)
    assert ds.test.y.tolist() == yte.tolist()


def test_imagefolder_with_val_split_and_any_size(tmp_path):
    _write_folder(tmp_path, ["b", "a", "c"], 2, 1, size=40, ext="jpg", test_name="val")
    ds = D.load_dataset("imagefolder", tmp_path)
    assert ds.classes == ["a", "b", "c"] and ds.image_size == 40 and len(ds.test) == 3


def test_an_archive_as_data_dir_is_unpacked_once(tmp_path):
    src = tmp_path / "src"
    _write_folder(src / "cifar10", [f"c{i}" for i in range(10)], 1, 1)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "cifar10", arcname="cifar10")
    ds = D.load_dataset("cifar10", archive)
    assert len(ds.train) == 10
    assert len(list((D.default_cache_dir() / "extracted").iterdir())) == 1


def test_a_zip_archive_as_data_dir_is_unpacked_once(tmp_path):
    """tiny-imagenet-200.zip as cs231n serves it (its files under tiny-imagenet-200/), given as --data-dir."""
    import zipfile

    src = tmp_path / "src"
    wnids = [f"n{i:08d}" for i in range(200)]
    _write_tiny(src / "tiny-imagenet-200", np.random.default_rng(0), wnids, ["n00000003", "n00000150"])
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    ds = D.load_dataset("tinyimagenet", archive)
    assert ds.num_classes == 200 and ds.train.x.shape == (200, 3, 64, 64) and ds.test.y.tolist() == [3, 150]
    unpacked = lambda: list((D.default_cache_dir() / "extracted").glob("tiny-imagenet-200-*"))  # noqa: E731
    assert len(unpacked()) == 1 and (unpacked()[0] / "tiny-imagenet-200" / "wnids.txt").is_file()
    again = D.load_dataset("tinyimagenet", archive)  # unpacked once: the second load reads what is there
    assert torch.equal(again.test.x, ds.test.x) and len(unpacked()) == 1


@pytest.mark.parametrize("member,why", [("../../escaped.txt", "a '..' component"),
                                        ("/tmp/escaped.txt", "an absolute path"),
                                        ("cifar10/link", "a symbolic link")])
def test_a_zip_that_would_write_outside_the_cache_is_refused(tmp_path, member, why):
    import stat
    import zipfile

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cifar10/ok.txt", b"fine")
        info = zipfile.ZipInfo(member)
        if why == "a symbolic link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, b"/etc/passwd")
        else:
            zf.writestr(info, b"owned")
    with pytest.raises(BenchError, match=f"cannot unpack .*evil.zip .*{why}; refused") as e:
        D.load_dataset("cifar10", archive)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.parent.rglob("escaped.txt")) and not list(D.default_cache_dir().rglob("link"))
    assert not list(D.default_cache_dir().rglob("ok.txt"))  # nothing of a refused archive is unpacked


def test_decoded_once_then_served_from_the_cache(tmp_path, monkeypatch):
    _write_folder(tmp_path / "cifar10", [f"c{i}" for i in range(10)], 1, 1)
    first = D.load_dataset("cifar10", tmp_path)

    def no_decode(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(D, "_decode_many", no_decode)
    second = D.load_dataset("cifar10", tmp_path)
    assert torch.equal(first.train.x, second.train.x) and first.classes == second.classes
    # touching a source file changes the key: decoded again
    f = next((tmp_path / "cifar10" / "train" / "c0").iterdir())
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    with pytest.raises(AssertionError, match="decoded again"):
        D.load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"--data-dir .*missing does not exist; cifar10 expects cifar-10-batches-py/"),
    ("empty", r"no cifar10 data under .*empty: expected cifar-10-batches-py/.*or train/<class>/.*--download"),
    ("wrong-size", r"is 16×16; .*expects 32×32"),
    ("wrong-classes", r"holds 3 classes; cifar10 has 10"),
    ("not-an-archive", r"is a file but not an archive \(accepted: .*\.tar\.gz.*\.zip\) or a folder"),
])
def test_bad_data_dirs_give_one_line(tmp_path, case, pattern):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case == "wrong-size":
        _write_folder(target, [f"c{i}" for i in range(10)], 1, 1, size=16)
    elif case == "wrong-classes":
        _write_folder(target, ["a", "b", "c"], 1, 1)
    elif case == "not-an-archive":
        target.write_text("hello")
    with pytest.raises(BenchError, match=pattern) as e:
        D.load_dataset("cifar10", target)
    assert "\n" not in str(e.value)


def test_unknown_dataset_lists_the_accepted():
    with pytest.raises(BenchError, match="unknown dataset 'cifar11'; accepted: cifar10, cifar100, fashion-mnist"):
        D.load_dataset("cifar11")


def test_synthetic_is_deterministic_learnable_shape(synthetic):
    again = D.load_dataset("synthetic")
    assert torch.equal(synthetic.train.x, again.train.x) and torch.equal(synthetic.test.y, again.test.y)
    assert synthetic.train.x.shape == (10000, 3, 32, 32) and synthetic.num_classes == 10
    assert torch.bincount(synthetic.train.y).tolist() == [1000] * 10
    other = D.make_synthetic(10, seed=5)
    assert not torch.equal(other.x, D.make_synthetic(10, seed=6).x)
    assert not torch.equal(synthetic.train.x[:100], synthetic.test.x[:100])


def test_per_class_subset_keeps_order(synthetic):
    sub = synthetic.train.per_class(3)
    assert torch.bincount(sub.y).tolist() == [3] * 10
    first = (synthetic.train.y == sub.y[0]).nonzero()[0, 0]
    assert torch.equal(sub.x[0], synthetic.train.x[first])


def test_an_archive_that_would_write_outside_the_cache_is_refused(tmp_path):
    import io

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"owned"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(BenchError, match="cannot unpack"):
        D.load_dataset("cifar10", archive)
    assert not list(tmp_path.parent.rglob("escaped.txt"))
    assert not list(D.default_cache_dir().rglob("escaped.txt"))
