"""Device-resident batches: the whole split is one uint8 tensor on the training device, and random crop (zero
padding of 4 pixels) and horizontal flip are done on the device for a whole batch at once. No per-image Python
work happens in the training loop.

Shuffling and augmentation of epoch ``e`` are drawn from a generator seeded by (seed, e), so they depend only on
the run's seed and the epoch: a resumed run sees exactly the batches the interrupted one would have seen.

Under data parallelism (``dist``, see :mod:`bench.dist`) every rank draws the same permutation and the same crop /
flip numbers for the whole global batch and keeps its own rows of it; the split stays in host memory and each epoch
a rank copies only its shard (its rows of every batch of that epoch) to its device. A rank therefore sees exactly
the images, crops and flips it would see as part of the batch on one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from .data import Split

if TYPE_CHECKING:
    from .dist import Dist, Shard


@dataclass
class Batch:
    x: torch.Tensor  # float in [0, 1], (B, C, H, W)
    y: torch.Tensor  # int64 (B,)
    idx: torch.Tensor  # int64 (B,): indices into the split (for methods with per-example state)
    # under data parallelism: this rank's rows of the global batch, and the split indices of the whole global batch
    shard: "Shard | None" = None
    global_idx: torch.Tensor | None = None

    @property
    def all_idx(self) -> torch.Tensor:
        """Split indices of the whole global batch (``idx`` on one process)."""
        return self.idx if self.global_idx is None else self.global_idx


def window_index(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Advanced-indexing tuple that picks, from every image of ``x`` (B, C, H', W'), the (h, w) window whose top-left
    corner is (``oy``, ``ox``) (per image): ``x[idx]`` reads the crops, ``x[idx] = v`` writes them back."""
    b, c = x.shape[:2]
    rows = oy[:, None] + torch.arange(h, device=x.device)[None]  # (B, h)
    cols = ox[:, None] + torch.arange(w, device=x.device)[None]  # (B, w)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return bi, ci, rows[:, None, :, None], cols[:, None, None, :]


def draw_augment(gen: torch.Generator | None, total: int, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """The crop offsets and flips of one batch of ``total`` images, drawn from ``gen`` (a CPU generator; None: the
    global RNG, as ATAS draws them) in the order :func:`augment` draws them: a (3, total) int64 tensor of rows
    (y offset, x offset, flip 0/1)."""
    oy = torch.randint(0, 2 * pad + 1, (total,), generator=gen) if pad > 0 else torch.zeros(total, dtype=torch.int64)
    ox = torch.randint(0, 2 * pad + 1, (total,), generator=gen) if pad > 0 else torch.zeros(total, dtype=torch.int64)
    f = (torch.rand(total, generator=gen) < 0.5) if flip else torch.zeros(total, dtype=torch.bool)
    return torch.stack([oy, ox, f.long()])


def apply_augment(x: torch.Tensor, draws: torch.Tensor, pad: int = 4, flip: bool = True,
                  padding_mode: str = "constant") -> torch.Tensor:
    """Crop and flip every image of ``x`` (B, C, H, W) by its column of ``draws`` (:func:`draw_augment`, on x's
    device)."""
    _, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x.float() if padding_mode != "constant" else x, (pad, pad, pad, pad), mode=padding_mode)
        xp = xp.to(x.dtype)
        x = xp[window_index(xp, draws[0], draws[1], h, w)]
    if flip:
        x = torch.where(draws[2].bool()[:, None, None, None], x.flip(3), x)
    return x


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True,
            padding_mode: str = "constant", rows: "Shard | None" = None) -> torch.Tensor:
    """Random crop of ``pad``-padded images back to their size, and random horizontal flip, per image.

    Works on uint8 or float tensors of shape (B, C, H, W) on any device; randomness comes from ``gen`` (a CPU
    generator) so the result does not depend on the device. ``rows``: ``x`` holds these rows of a larger batch;
    the numbers are drawn for the whole batch and the rows' own are used.
    """
    total, sel = (x.shape[0], slice(None)) if rows is None else (rows.total, rows.rows)
    return apply_augment(x, draw_augment(gen, total, pad, flip)[:, sel].to(x.device), pad, flip, padding_mode)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``; to a GPU from pinned memory without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DeviceLoader:
    """Iterate over a :class:`Split` held on ``device`` in shuffled, augmented batches of float images in [0, 1]."""

    def __init__(self, split: Split, batch_size: int, device: torch.device | str = "cpu", *, shuffle: bool = True,
                 augment: bool = True, pad: int = 4, flip: bool = True, padding_mode: str = "constant",
                 seed: int = 0, drop_last: bool = False, dist: "Dist | None" = None,
                 dtype: torch.dtype = torch.float32):
        from .dist import SINGLE

        self.dist = dist if dist is not None else SINGLE
        self.device = torch.device(device)
        if self.dist.enabled:  # the split stays on the host; each epoch this rank's shard goes to the device
            self.x, self.y = split.x, split.y
            if self.device.type == "cuda":
                self.x, self.y = self.x.pin_memory(), self.y.pin_memory()
        else:
            self.x = split.x.to(device)
            self.y = split.y.to(device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.pad, self.flip = shuffle, augment, pad, flip
        self.padding_mode = padding_mode
        self.seed = seed
        self.drop_last = drop_last
        self.dtype = dtype  # of the batches' images (float64 for precision fp64)

    def __len__(self) -> int:
        n = self.y.shape[0]
        full, rest = divmod(n, self.batch_size)
        # a last batch of one image would break BatchNorm in train mode: it is dropped; under data parallelism, one
        # that cannot give every rank an image (with synchronised BN) or two (per-rank BN)
        w = self.dist.world
        least = 2 if w == 1 else (w if self.dist.sync_bn else 2 * w)
        return full + (1 if rest >= least and not self.drop_last else 0)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch``, from ``start_step`` on (for resuming inside an epoch).

        The epoch's randomness (the order, then every batch's crops and flips, in that order from one generator) is
        drawn on the host at the start and copied to the device once: no host-device copy or sync per batch."""
        gen = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
        n = self.y.shape[0]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        bs, steps = self.batch_size, len(self)
        sizes = [min(bs, n - s * bs) for s in range(steps)]
        draws = (to_device(torch.cat([draw_augment(gen, m, self.pad, self.flip) for m in sizes], 1), self.device)
                 if self.augment and steps else None)
        if self.dist.enabled:
            yield from self._sharded(order, draws, start_step)
            return
        order = to_device(order, self.device)
        for step in range(start_step, steps):
            idx = order[step * bs:step * bs + sizes[step]]
            xb = self.x[idx]
            if draws is not None:
                xb = apply_augment(xb, draws[:, step * bs:step * bs + sizes[step]], self.pad, self.flip,
                                   self.padding_mode)
            yield Batch(xb.to(self.dtype).div_(255), self.y[idx], idx)

    def _sharded(self, order: torch.Tensor, draws: torch.Tensor | None, start_step: int) -> Iterator[Batch]:
        """This rank's rows of every global batch: the epoch's shard is gathered on the host (from pinned memory
        into pinned memory on a GPU machine) and copied to the device once; crops and flips are drawn for the whole
        global batch (``draws``, on the device) and each rank takes its rows' own."""
        bs, steps = self.batch_size, len(self)
        batches = [order[s * bs:(s + 1) * bs] for s in range(steps)]
        shards = [self.dist.shard(len(b)) for b in batches]
        local = torch.cat([b[s.rows] for b, s in zip(batches, shards)]) if batches else order[:0]
        x_dev, y_dev = to_device(self.x[local], self.device), to_device(self.y[local], self.device)
        local_dev, order_dev = to_device(local, self.device), to_device(order, self.device)
        at = 0
        for step, (b, s) in enumerate(zip(batches, shards)):
            xb, yb, ib = x_dev[at:at + s.size], y_dev[at:at + s.size], local_dev[at:at + s.size]
            at += s.size
            if step < start_step:
                continue
            if draws is not None:
                d = draws[:, step * bs:step * bs + len(b)][:, s.rows]
                xb = apply_augment(xb, d, self.pad, self.flip, self.padding_mode)
            yield Batch(xb.to(self.dtype).div_(255), yb, ib, shard=s,
                        global_idx=order_dev[step * bs:step * bs + len(b)])


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for p in parts:
        h ^= int(p) & 0xFFFFFFFFFFFFFFFF
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def eval_batches(split: Split, batch_size: int, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, unaugmented, as float batches on ``device``."""
    for i in range(0, len(split), batch_size):
        yield (split.x[i:i + batch_size].to(device).float().div_(255), split.y[i:i + batch_size].to(device))
