"""Augmentation: real transforms, a pure function of (seed, epoch, index, image), training split only."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cotune.config import AugmentConfig, load_config
from cotune.data.augment import Augmenter
from cotune.data.batching import LengthGroupedBatchSampler
from cotune.data.build import build_data
from cotune.data.dataset import SFTDataset, encode_samples
from cotune.data.records import load_samples
from cotune.models.families import MLLAMA

ON = AugmentConfig(enabled=True, blur=0.5, noise=0.5)
NOTHING = AugmentConfig(
    enabled=True, crop_scale_min=1.0, rotate=0, brightness=0, contrast=0, saturation=0, hue=0, blur=0, noise=0
)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def arr(image):
    return np.asarray(image)


def test_same_key_same_image_other_key_other_image(picture):
    aug = Augmenter(ON, seed=7)
    first = arr(aug(picture, index=3, epoch=1))
    for i in range(5):  # whatever was drawn in between
        aug(picture, index=i, epoch=0)
    assert np.array_equal(arr(aug(picture, index=3, epoch=1)), first)
    fresh = pickle.loads(pickle.dumps(Augmenter(ON, seed=7)))  # a DataLoader worker, a resumed run
    assert np.array_equal(arr(fresh(picture, index=3, epoch=1)), first)
    others = [
        aug(picture, 3, 2),
        aug(picture, 4, 1),
        aug(picture, 3, 1, k=1),
        Augmenter(ON, 8)(picture, 3, 1),
    ]
    assert all(not np.array_equal(arr(o), first) for o in others)
    assert first.shape == arr(picture).shape  # same size: the processor's tiling is unchanged
    assert np.abs(first.astype(int) - arr(picture)).mean() > 5  # a real change


def test_each_setting_off_means_untouched_and_flip_only_when_asked(picture):
    assert np.array_equal(arr(Augmenter(NOTHING, 0)(picture, 0)), arr(picture))
    flip = Augmenter(dataclasses.replace(NOTHING, hflip=1.0), 0)(picture, 0)
    assert np.array_equal(arr(flip), arr(picture)[:, ::-1])
    assert AugmentConfig().hflip == 0 and not AugmentConfig().enabled  # off by default
    rotated = Augmenter(dataclasses.replace(NOTHING, rotate=20), 0)
    diffs = [np.abs(arr(rotated(picture, i)).astype(int) - arr(picture)).mean() for i in range(4)]
    assert min(diffs) > 1


def test_training_split_only_and_epoch_reaches_persistent_workers(processor, shapes):
    cfg = load_config(
        None,
        [
            ("dataset", str(shapes["train"])),
            ("data.augment.enabled", "True"),
            ("num_workers_dataloader", "1"),
        ],
    )
    bundle = build_data(cfg, processor, MLLAMA, log=lambda s: None)
    assert isinstance(bundle.train.dataset.augment, Augmenter)
    assert bundle.val is not None and bundle.val.dataset.augment is None
    assert any("augmentation of training images" in line for line in bundle.report)

    samples, _ = load_samples(shapes["train"])
    encoded, _, _ = encode_samples(samples[:4], processor, MLLAMA, max_seq_len=1024)
    ds = SFTDataset(encoded, processor, MLLAMA, augment=Augmenter(ON, seed=5))
    sampler = LengthGroupedBatchSampler(ds.lengths, 2, seed=1, keys=True)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=lambda items: items, num_workers=1, persistent_workers=True
    )
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for keys, items in zip(list(sampler), loader):
            for key, item in zip(keys, items):
                assert key.epoch == epoch
                seen[(epoch, key.index)] = item["pixel_values"]
    for (epoch, index), pixels in seen.items():  # the worker used the epoch the sampler was set to
        direct = ds[(index, epoch)]["pixel_values"]
        assert torch.equal(pixels, direct)
    assert not torch.equal(seen[(0, 0)], seen[(1, 0)])  # a new draw each epoch
