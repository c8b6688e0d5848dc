"""Visual augmentation of training images, built on albumentations, reproducible across resumes.

Why albumentations: it is maintained, runs on numpy/OpenCV (no torchvision, whose PyPI wheels
require a matching torch build), and its ``Compose`` takes a seed, so every image's transform is a
pure function of (seed, epoch, sample index, image index). A resumed run therefore sees exactly
the augmentations an uninterrupted one would, whichever DataLoader worker decodes the image.

The transforms (each off when its setting is 0): random resized crop (area ``crop_scale_min`` ..
``crop_scale_max``, aspect ratio within 10% of the image's own, resized back to the original size),
a small rotation (white corners, as transparency is composited on white), colour jitter
(brightness, contrast, saturation, hue), Gaussian blur, Gaussian noise, and a horizontal flip that
is off unless asked, because flips break text and left/right questions.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from PIL import Image

_INSTALL = "pip install 'albumentations>=2.0' (it brings opencv-python-headless)"


def _albumentations():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it would look for a newer version online
    try:
        import albumentations as A
        import cv2
    except ImportError as e:  # pragma: no cover - a dependency of cotune
        raise ImportError(f"data.augment.enabled needs albumentations: {_INSTALL} ({e})") from None
    return A, cv2


def augment_seed(seed: int, epoch: int, index: int, k: int = 0) -> int:
    """A 32-bit seed mixing (run seed, epoch, sample index, image index) with no collisions in practice."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, k]).generate_state(1)[0])


class Augmenter:
    """Callable ``(image, index, epoch, k) -> image`` that ``SFTDataset`` applies to training images.

    Args:
        cfg: the ``data.augment`` section (``AugmentConfig``).
        seed: the run's seed.

    Example:
        >>> aug = Augmenter(cfg.data.augment, seed=42)
        >>> out = aug(Image.open("cat.png").convert("RGB"), index=7, epoch=1)
    """

    def __init__(self, cfg: Any, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self._pipelines: dict[tuple[int, int], Any] = {}

    def __getstate__(self) -> dict:  # workers rebuild pipelines instead of pickling OpenCV objects
        return {"cfg": self.cfg, "seed": self.seed, "_pipelines": {}}

    def _transforms(self, height: int, width: int) -> list:
        A, cv2 = _albumentations()
        c = self.cfg
        out = []
        if c.crop_scale_min < 1.0:
            r = width / height
            out.append(
                A.RandomResizedCrop(
                    size=(height, width),
                    scale=(c.crop_scale_min, c.crop_scale_max),
                    ratio=(r * 0.9, r / 0.9),
                    p=1.0,
                )
            )
        if c.rotate > 0:
            out.append(A.Rotate(limit=c.rotate, border_mode=cv2.BORDER_CONSTANT, fill=255, p=1.0))
        if any((c.brightness, c.contrast, c.saturation, c.hue)):
            out.append(
                A.ColorJitter(
                    brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue, p=1.0
                )
            )
        if c.blur > 0:
            out.append(A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.3, 1.5), p=c.blur))
        if c.noise > 0:
            out.append(A.GaussNoise(std_range=(0.02, 0.06), p=c.noise))
        if c.hflip > 0:
            out.append(A.HorizontalFlip(p=c.hflip))
        return out

    def pipeline(self, height: int, width: int) -> Any:
        """The seeded albumentations ``Compose`` for images of this size (built once per size)."""
        key = (height, width)
        if key not in self._pipelines:
            A, _ = _albumentations()
            self._pipelines[key] = A.Compose(self._transforms(height, width), seed=self.seed)
        return self._pipelines[key]

    def __call__(self, image: Image.Image, index: int, epoch: int = 0, k: int = 0) -> Image.Image:
        """Augments one RGB image; the result depends only on (seed, epoch, index, k) and the image."""
        array = np.asarray(image.convert("RGB"))
        pipeline = self.pipeline(*array.shape[:2])
        pipeline.set_random_seed(augment_seed(self.seed, epoch, index, k))
        return Image.fromarray(pipeline(image=array)["image"])


def build_augmenter(cfg: Any) -> Augmenter | None:
    """The training augmenter of a ``TrainConfig``, or None when ``data.augment.enabled`` is off."""
    aug = cfg.data.augment
    return Augmenter(aug, cfg.seed) if aug.enabled else None


# A hue shift within +-0.02 of the colour circle (7 degrees) keeps a named colour; beyond it, orange
# turns red or yellow (they are 20-30 degrees apart) and the answer to "what colour is it?" changes.
SAFE_HUE = 0.02
_COLOUR_WORDS = re.compile(
    r"\b(colou?rs?|hue|red|orange|yellow|green|blue|purple|violet|pink|brown|cyan|magenta)\b", re.I
)
_SIDE_WORDS = re.compile(r"\b(left|right)\b", re.I)


def _conversation_text(sample: Any) -> str:
    return " ".join(
        item.get("text", "")
        for message in sample.messages
        for item in (message["content"] if isinstance(message["content"], list) else [])
        if isinstance(item, dict)
    )


# bit of ``mention_flags`` per setting whose check looks for words in the conversation
_MENTION_BITS = {"hue": 1, "hflip": 2}


def mention_flags(sample: Any) -> int:
    """Which of the words ``augment_conflicts`` looks for the sample's conversation holds, as bits
    (the data cache keeps them so that the check needs no text)."""
    text = _conversation_text(sample)
    return (1 if _COLOUR_WORDS.search(text) else 0) | (2 if _SIDE_WORDS.search(text) else 0)


def augment_conflicts(aug: Any, samples: list, flags: Any = None) -> list[str]:
    """Augmentation settings that change what the data's questions ask about, each as a sentence.

    A hue jitter over ``SAFE_HUE`` recolours the picture under a question about colour; a horizontal
    flip swaps left and right under a question about sides. The label then contradicts the image the
    model sees, and the model learns to ignore the picture.

    Args:
        aug: the ``data.augment`` section (``AugmentConfig``); nothing is reported when it is off.
        samples: the training samples (``records.Sample``).
        flags: their ``mention_flags``, when the samples carry no text (from the data cache).

    Returns:
        One sentence per conflicting setting, with the number of samples it touches and the first.
    """
    if not aug.enabled:
        return []
    checks = []
    if aug.hue > SAFE_HUE:
        checks.append(("hue", aug.hue, _COLOUR_WORDS, "colours", f"set it to at most {SAFE_HUE}"))
    if aug.hflip > 0:
        checks.append(("hflip", aug.hflip, _SIDE_WORDS, "left and right", "set it to 0"))
    out = []
    for name, value, words, what, fix in checks:
        if flags is None:
            hits = [s for s in samples if words.search(_conversation_text(s))]
        else:
            hits = [s for s, f in zip(samples, flags) if int(f) & _MENTION_BITS[name]]
        if hits:
            out.append(
                f"data.augment.{name} {value:g} changes {what} in the picture, and {len(hits)} of "
                f"{len(samples)} samples talk about {what} (first: {hits[0].where}): their labels would "
                f"contradict the augmented image; {fix}"
            )
    return out
