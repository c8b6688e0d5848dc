"""Does a model look at the image? The same samples with their images swapped or blanked.

An adapter can learn the answers' prior (the most common colour, "yes") instead of reading the
picture, and the four-stage format hides it: the answer is well formed either way. Comparing the
answers with the true images against the answers with each sample's images taken from another
sample ("shuffled") or replaced by a plain grey picture ("blank") shows how much of the accuracy
comes from the image. ``cotune eval --image_ablation`` and the demo run these conditions through
``evaluate.evaluate_models``.
"""

from __future__ import annotations

import dataclasses
import random

from PIL import Image

from cotune.data.images import load_image
from cotune.data.records import Sample

# Condition name -> suffix of its keys in eval.json ("accuracy" + suffix, "conclusion_loss" + suffix).
IMAGE_CONDITIONS = {"true": "", "shuffled": "_shuffled_images", "blank": "_blank_images"}
BLANK_GREY = (128, 128, 128)


def derangement(n: int, seed: int = 0) -> list[int]:
    """A random permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one cycle).

    ``perm[i]`` is the sample whose images sample ``i`` receives; for ``n`` < 2 there is none and
    the identity is returned.
    """
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def with_shuffled_images(samples: list[Sample], seed: int = 0) -> list[Sample]:
    """Each sample with images, given the images of another sample with images (never its own).

    A sample that needs more images than its donor has reuses the donor's in turn, so every prompt
    keeps its number of images. Samples without images are returned unchanged.

    Raises:
        ValueError: fewer than two samples have images (nothing to shuffle with).
    """
    with_images = [i for i, s in enumerate(samples) if s.images]
    if len(with_images) < 2:
        raise ValueError("shuffling images across samples needs at least two samples with images")
    donors = derangement(len(with_images), seed)
    out = list(samples)
    for k, i in enumerate(with_images):
        donor = samples[with_images[donors[k]]].images
        images = [donor[m % len(donor)] for m in range(len(samples[i].images))]
        out[i] = dataclasses.replace(samples[i], images=images)
    return out


def blank_image(ref) -> Image.Image:
    """A uniform grey RGB image of the same size as the image ``ref`` names."""
    image = load_image(ref, decode=False)  # the header is enough for the size
    size = image.size
    if not isinstance(ref, Image.Image):
        image.close()  # opened here; a caller's PIL image stays open
    return Image.new("RGB", size, BLANK_GREY)


def with_blank_images(samples: list[Sample]) -> list[Sample]:
    """Each sample with every image replaced by a grey image of the same size."""
    return [
        dataclasses.replace(s, images=[blank_image(r) for r in s.images]) if s.images else s for s in samples
    ]


def ablate_images(samples: list[Sample], condition: str, seed: int = 0) -> list[Sample]:
    """The samples under one of ``IMAGE_CONDITIONS``: unchanged, shuffled or blank."""
    if condition == "true":
        return samples
    if condition == "shuffled":
        return with_shuffled_images(samples, seed)
    if condition == "blank":
        return with_blank_images(samples)
    raise ValueError(f"unknown image condition '{condition}' (one of {', '.join(IMAGE_CONDITIONS)})")
