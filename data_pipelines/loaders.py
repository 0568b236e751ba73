"""Training and validation loaders: FFCV (the fast path) and torchvision (the reference path).

Both yield ``(images, labels)`` with images as normalised float tensors ``N x 3 x S x S`` on the
target device. Semantics are the same: train = random resized crop + horizontal flip; val =
centre crop of ``val_ratio`` (224/256) of the shorter side, resized to ``S``.

FFCV pitfalls handled here (libffcv/ffcv issue numbers): its random crop and flip ignore the
loader seed (#392, #300), so ``SeededRandomResizedCropFlip`` reseeds numba's RNG per sample from
(seed, the batch's indices, the sample index): identical across runs and threads, different each
epoch because the (seeded) order is. Normalisation happens in torch after the loader, never as a
jitted op after ``ToTorchImage`` (that order hangs, #396), which also needs no cupy on the GPU.
``import ffcv`` and every epoch reset torch's thread count: ``DataStream`` restores it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoaderConfig:
    img_size: int = 224
    batch_size: int = 256
    workers: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    val_ratio: float = 224 / 256
    seed: int = 0
    distributed: bool = False
    channels_last: bool = False
    device: str = "cpu"


def _seeded_decoder_class():
    from ffcv.fields.rgb_image import (
        IMAGE_MODES,
        RandomResizedCropRGBImageDecoder,
        get_random_crop,
        imdecode,
        resize_crop,
    )
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropFlip(RandomResizedCropRGBImageDecoder):
        """RandomResizedCrop + horizontal flip with per-sample seeding (FFCV #392)."""

        def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed: int = 0,
                     flip_prob: float = 0.5):
            super().__init__(output_size, scale, ratio)
            self.seed = int(seed) % (2**31)
            self.flip_prob = flip_prob

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            scale, ratio = np.array(self.scale), np.array(self.ratio)
            seed, flip_prob = self.seed, self.flip_prob

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                batch_key = 0
                for k in range(len(batch_indices)):
                    batch_key = (batch_key * 1000003 + batch_indices[k] + 1) % 2147483647
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    np.random.seed((seed * 7919 + batch_key * 104729 + source_ix) % 2147483647)
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        selected = 3 * height * width
                        temp_buffer = temp_buffer.reshape(-1)[:selected].reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                    if np.random.rand() < flip_prob:
                        destination[dst_ix] = destination[dst_ix][:, ::-1].copy()
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return SeededRandomResizedCropFlip


class DataStream:
    """Iterates a loader as normalised float batches on the target device."""

    def __init__(self, loader, cfg: LoaderConfig, num_samples: int, backend: str,
                 threads: int) -> None:
        self.loader = loader
        self.cfg = cfg
        self.num_samples = num_samples
        self.backend = backend
        self.epoch = 0
        device = torch.device(cfg.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self._threads = threads

    def set_epoch(self, epoch: int) -> None:
        """Position the loader at ``epoch`` (seeded order: a resumed run sees the same data)."""
        self.epoch = epoch
        if self.backend == "ffcv":
            self.loader.next_epoch = epoch
        elif hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)
        elif self.loader.generator is not None:
            self.loader.generator.manual_seed(self.cfg.seed * 1000 + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.set_epoch(self.epoch)
        iterator = iter(self.loader)
        torch.set_num_threads(self._threads)  # FFCV resets it to its worker count
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        for images, labels in iterator:
            images = images.to(self.cfg.device, non_blocking=True)
            labels = labels.to(self.cfg.device, non_blocking=True).long().view(-1)
            if self.backend == "ffcv":  # uint8 0..255
                images = (images.float() - self.mean) / self.std
            images = images.contiguous(memory_format=fmt)
            yield images, labels
        self.epoch += 1


def ffcv_stream(path: str, train: bool, cfg: LoaderConfig, drop_last: bool | None = None) -> DataStream:
    """An FFCV loader over a .beton file."""
    threads = torch.get_num_threads()  # before `import ffcv`, which sets it to 1
    import ffcv  # noqa: F401
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    size = (cfg.img_size, cfg.img_size)
    if train:
        decoder = _seeded_decoder_class()(size, tuple(cfg.scale), tuple(cfg.ratio), seed=cfg.seed)
    else:
        decoder = CenterCropRGBImageDecoder(size, ratio=cfg.val_ratio)
    pipelines = {
        "image": [decoder, ToTensor(), ToTorchImage(channels_last=False)],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
    }
    loader = Loader(
        path, batch_size=cfg.batch_size, num_workers=max(1, cfg.workers),
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        distributed=cfg.distributed, seed=cfg.seed, pipelines=pipelines,
        drop_last=train if drop_last is None else drop_last,
        os_cache=True,
    )
    torch.set_num_threads(threads)
    return DataStream(loader, cfg, loader.reader.num_samples, "ffcv", threads)


class ManifestDataset(torch.utils.data.Dataset):
    """torchvision path: images of a manifest split, decoded with PIL."""

    def __init__(self, records, transform) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from data_pipelines.betons import load_rgb

        r = self.records[i]
        return self.transform(load_rgb(r.path)), r.label


def torchvision_stream(records, train: bool, cfg: LoaderConfig,
                       drop_last: bool | None = None) -> DataStream:
    """The same semantics as ``ffcv_stream`` with torchvision transforms over manifest records."""
    from torchvision import transforms as T

    if train:
        tf = T.Compose([T.RandomResizedCrop(cfg.img_size, scale=tuple(cfg.scale),
                                            ratio=tuple(cfg.ratio)),
                        T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    else:
        tf = T.Compose([T.Resize(int(round(cfg.img_size / cfg.val_ratio))),
                        T.CenterCrop(cfg.img_size), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = ManifestDataset(records, tf)
    sampler = None
    generator = torch.Generator().manual_seed(cfg.seed * 1000)
    if cfg.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=cfg.workers, drop_last=train if drop_last is None else drop_last,
        generator=generator, pin_memory=cfg.device.startswith("cuda"),
        persistent_workers=cfg.workers > 0)
    return DataStream(loader, cfg, len(dataset), "torchvision", torch.get_num_threads())
