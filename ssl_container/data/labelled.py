"""Labelled streams with training augmentation, for the probes that train on a backbone's outputs
(DINO's linear protocol: RandomResizedCrop + flip of the frozen backbone's input).

The evaluation stream (resize + centre crop, every sample exactly once) is ``stream.make_eval_loader``;
this one is the training side: endless, shuffled, each rank on its own part of the shards.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2 as T

from ssl_container.data.augment import BadImageError, decode_rgb
from ssl_container.data.sources import image_ext, iter_tar_samples, parse_label

__all__ = ["AugmentedLabelledShards"]


class AugmentedLabelledShards(torch.utils.data.IterableDataset):
    """(image, label) from WebDataset shards with RandomResizedCrop + flip: this rank's shards (or
    every world-th sample when there are fewer shards than ranks x workers), shuffled per epoch with a
    seeded buffer, repeated without end (the caller takes a fixed number of steps)."""

    def __init__(self, urls: list[str], crop: int, scale, rank: int, world: int, num_workers: int, seed: int,
                 epoch: int, mean, std, shuffle_buffer: int = 2000):
        super().__init__()
        self.urls, self.crop, self.scale = urls, crop, scale
        self.rank, self.world, self.num_workers = rank, world, max(1, num_workers)
        self.seed, self.epoch, self.mean, self.std, self.buffer = seed, epoch, mean, std, shuffle_buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        g = self.rank * self.num_workers + (info.id if info is not None else 0)
        G = self.world * self.num_workers
        rng = np.random.default_rng([self.seed, self.epoch, g])
        torch.manual_seed(int(rng.integers(2**31)))
        tf = T.Compose([T.RandomResizedCrop(self.crop, scale=self.scale, interpolation=T.InterpolationMode.BICUBIC,
                                            antialias=True),
                        T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])
        buf: list = []
        while True:
            if len(self.urls) >= G:
                mine, stride = [self.urls[i] for i in rng.permutation(len(self.urls)) if i % G == g], 1
            else:
                mine, stride = list(self.urls), G
            index = 0
            for url in mine:
                for sample in iter_tar_samples(url):
                    index += 1
                    if stride > 1 and (index - 1) % stride != g:
                        continue
                    try:
                        arr = decode_rgb(sample[image_ext(sample)])
                    except BadImageError:
                        continue
                    img = tf(torch.from_numpy(arr).permute(2, 0, 1))
                    buf.append((img, parse_label(sample)))
                    if len(buf) >= self.buffer:
                        yield buf.pop(int(rng.integers(len(buf))))
            if not mine:
                return
