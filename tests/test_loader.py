"""Device loader: whole epochs, determinism from (seed, epoch), on-device crop + flip, resume inside an epoch."""
import torch
import torch.nn.functional as F

from bench.data import Split
from bench.loader import DeviceLoader, augment


def _split(n=50):
    x = torch.arange(n * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 8, 8)
    return Split(x, torch.arange(n) % 10)


def test_each_epoch_visits_every_image_once_and_drops_a_batch_of_one():
    loader = DeviceLoader(_split(50), 16, augment=False)
    idx = torch.cat([b.idx for b in loader.epoch(0)])
    assert len(loader) == 4 and sorted(idx.tolist()) == list(range(50))  # 16+16+16+2
    loader = DeviceLoader(_split(49), 16, augment=False)
    assert len(loader) == 3  # the last batch of one image would break BatchNorm: dropped


def test_batches_are_a_function_of_seed_and_epoch():
    s = _split()
    a = [b.x for b in DeviceLoader(s, 16, seed=3).epoch(2)]
    b = [b.x for b in DeviceLoader(s, 16, seed=3).epoch(2)]
    c = [b.x for b in DeviceLoader(s, 16, seed=3).epoch(3)]
    d = [b.x for b in DeviceLoader(s, 16, seed=4).epoch(2)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_resuming_inside_an_epoch_gives_the_same_later_batches():
    loader = DeviceLoader(_split(), 8, seed=1)
    full = list(loader.epoch(5))
    tail = list(loader.epoch(5, start_step=3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(u.x, v.x) and torch.equal(u.idx, v.idx) for u, v in zip(full[3:], tail))


def test_labels_and_indices_match_images():
    s = _split()
    for b in DeviceLoader(s, 16, augment=False, seed=0).epoch(0):
        assert torch.equal(b.y, s.y[b.idx])
        assert torch.equal(b.x, s.x[b.idx].float() / 255)


def test_crop_is_a_window_of_the_zero_padded_image_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment(x, g, pad=2, flip=False)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(64):
        windows = [padded[i, :, a:a + 8, b:b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not all(torch.equal(out[i], x[i]) for i in range(64))
    flipped = augment(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(flipped[i], x[i].flip(2)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
