"""Aspect-ratio buckets and crop geometry.

Training at one fixed square crops away the top of every portrait and the sides of every
landscape. Buckets are a small set of (width, height) sizes of about the same area; each image
goes to the bucket whose aspect ratio is nearest and a batch only ever holds one bucket, so
tensors stack without padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: Size, min_reso: int, max_reso: int, step: int) -> list[Size]:
    """All (w, h) with sides multiples of `step` in [min_reso, max_reso] and the largest height
    that keeps w*h within the resolution's area, sorted by aspect ratio (w/h) then area."""
    area = resolution[0] * resolution[1]
    buckets: set[Size] = set()
    for w in range(min_reso, max_reso + 1, step):
        h = min(max_reso, (area // w) // step * step)
        if h >= min_reso:
            buckets.add((w, h))
    # the target resolution itself is always a bucket, even if not step-aligned
    if min_reso <= min(resolution) and max(resolution) <= max_reso:
        buckets.add(resolution)
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket nearest in aspect ratio, measured as |log(w/h)| difference so that 2:1 and 1:2
    are treated symmetrically. Ties go to the larger bucket (less upscaling), then the wider."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 12), -b[0] * b[1], -b[0]))


def cover_size(size: Size, target: Size) -> Size:
    """The smallest scaling of `size` (w, h), keeping its aspect, that covers `target`."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return (max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale)))


def no_upscale_bucket(size: Size, step: int) -> Size:
    """A bucket for an image too small to fill any regular bucket without upscaling: its own size
    rounded down to the step, so it is only ever cropped by less than one step."""
    return (max(step, size[0] // step * step), max(step, size[1] // step * step))


@dataclass(frozen=True)
class BucketSpec:
    """How one dataset's images are assigned to sizes."""

    resolution: Size
    enable_bucket: bool = True
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False

    def buckets(self) -> list[Size]:
        if not self.enable_bucket:
            return [self.resolution]
        return make_buckets(self.resolution, self.min_reso, self.max_reso, self.step)

    def assign(self, size: Size, buckets: list[Size] | None = None) -> Size:
        """The bucket for an image of `size` (w, h, after EXIF orientation).

        With `no_upscale` (bucketing only), an image that the nearest bucket would have to enlarge
        gets its own step-aligned bucket instead (see `no_upscale_bucket`), with each side clamped
        to [min_reso, max_reso]: buckets respect the configured limits whatever the image, so a
        20000x20 strip gets at most max_reso wide (and is cropped) and a side shorter than
        min_reso is enlarged to it (the least enlarging the limits allow). Strips so extreme that
        the crop would keep almost nothing are skipped by the scan (`MIN_CROP_SHARE`).
        """
        buckets = buckets if buckets is not None else self.buckets()
        bucket = nearest_bucket(size, buckets)
        if self.enable_bucket and self.no_upscale and max(bucket[0] / size[0], bucket[1] / size[1]) > 1.0:
            own = no_upscale_bucket(size, self.step)
            bucket = (min(max(own[0], self.min_reso), self.max_reso), min(max(own[1], self.min_reso), self.max_reso))
        return bucket


#: An image is skipped when the crop to its bucket would keep less than this share of it (after
#: resizing to cover the bucket). Only extreme aspect ratios get there (a 1000:1 strip in a
#: 2:1 bucket); besides teaching almost nothing, resizing such a strip to cover the bucket makes
#: an image hundreds of times the bucket's size, which can exhaust memory in a DataLoader worker.
MIN_CROP_SHARE = 1 / 16


def crop_share(size: Size, bucket: Size) -> float:
    """The share of an image of `size` (w, h) that its crop to `bucket` keeps (1.0: nothing is
    cut away), measured after the resize that covers the bucket."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return min(1.0, (bucket[0] / (size[0] * scale)) * (bucket[1] / (size[1] * scale)))


@dataclass(frozen=True)
class CropPlan:
    """Where one image's training pixels come from, in the terms SDXL's time ids use."""

    original_size: Size  # (w, h) of the decoded, EXIF-oriented image
    resized: Size  # (w, h) after scaling to cover the bucket
    bucket: Size  # (w, h) of the crop = training size
    top: int
    left: int

    def flipped_left(self) -> int:
        """`left` measured in the mirrored image, which is what the model sees after a flip."""
        return self.resized[0] - self.bucket[0] - self.left


def plan_crop(size: Size, bucket: Size, *, random_crop: bool = False,
              rng: np.random.Generator | None = None) -> CropPlan:
    """Resize-to-cover then crop: centred, or uniformly random over the spare pixels."""
    resized = cover_size(size, bucket)
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        top = int(rng.integers(0, spare_h + 1))
        left = int(rng.integers(0, spare_w + 1))
    else:
        top, left = spare_h // 2, spare_w // 2
    return CropPlan(original_size=size, resized=resized, bucket=bucket, top=top, left=left)
