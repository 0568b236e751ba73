"""Training and validation loaders: FFCV (the fast path) and torchvision (the reference path).

Both yield ``(images, labels)`` with images as normalised float tensors ``N x 3 x S x S`` on the
target device. Semantics are the same: train = random resized crop + horizontal flip; val =
centre crop of ``VAL_RATIO`` (224/256) of the shorter side, resized to ``S``.

FFCV pitfalls handled here (libffcv/ffcv issue numbers): its random crop and flip ignore the
loader seed (#392, #300), so ``SeededRandomResizedCropFlip`` reseeds numba's RNG per sample from
(the batch's indices, the sample index): identical across runs and threads, different each epoch
and seed because the order is, which ``SeededOrder`` draws from (seed, epoch) - FFCV's own RANDOM
order uses seed + epoch, so seed 1 would replay seed 0's orders one epoch late. Nothing in the
loader depends on the seed at compile time, so a stream is reseeded for the next run of the same
process without compiling its pipeline again (``Streams.reseed``). Normalisation happens in torch
after the loader, never as a jitted op after ``ToTorchImage`` (that order hangs, #396), which
also needs no cupy on the GPU; the loader thread runs no torch op at all (``ToTorchImage`` returns
a view): one that did made libgomp count more threads than cores and throttle its spin-wait,
which cost training 40% on 2 cores. ``import ffcv`` and every epoch reset torch's thread count:
``DataStream`` restores it. ``build_streams`` is the one place that picks the backend and the
splits of a training run.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_pipelines.config import DataConfig
from data_pipelines.prepared import MANIFEST, beton_path, load_rgb, read_manifest, read_report

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


RATIO = (3 / 4, 4 / 3)  # the random-resized crop's aspect ratios (torchvision's, timm's)
VAL_RATIO = 224 / 256  # evaluation's centre crop: this share of the shorter side


@dataclass(frozen=True)
class LoaderConfig:
    """One stream's settings, every one explicit: ``build_streams`` derives them from the data
    config and the recipe, so that no loader runs on defaults of its own."""

    img_size: int
    batch_size: int  # per process
    workers: int
    scale: tuple[float, float]
    seed: int
    distributed: bool
    channels_last: bool
    device: str
    interpolation: str  # bilinear | bicubic (PIL's antialiased filters)
    randaugment: str  # timm's RandAugment string ("" for none); train streams only


class StreamRecipe(Protocol):
    """What ``build_streams`` reads of a recipe (``experiments.config.Recipe`` is one)."""

    img_size: int
    batch_size: int  # global: split over the processes
    scale: tuple[float, float]
    interpolation: str
    randaugment: str


def _decoder_classes():
    """FFCV decoders that crop and resize with PIL's filters (``data_pipelines.resize``): the
    seeded RandomResizedCrop + flip of training and the centre crop of evaluation."""
    from ffcv.fields.rgb_image import (
        IMAGE_MODES,
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
        get_center_crop,
        get_random_crop,
        imdecode,
    )
    from ffcv.pipeline.compiler import Compiler

    from data_pipelines.resize import INTERPOLATIONS, place_crop

    def generate(self, train: bool):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        # both take (height, width, scale, ratio); the centre crop ignores scale
        get_crop_c = Compiler.compile(get_random_crop if train else get_center_crop)
        scale = np.array(self.scale) if train else np.zeros(2)
        ratio = np.array(self.ratio) if train else self.ratio
        flip_prob, kernel = self.flip_prob, self.kernel

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            batch_key = 0
            for k in range(len(batch_indices)):
                batch_key = (batch_key * 1000003 + batch_indices[k] + 1) % 2147483647
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                np.random.seed((batch_key * 104729 + source_ix) % 2147483647)
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                pixels = image_data
                if field["mode"] == jpg:
                    pixels = temp_storage[dst_ix]
                    imdecode_c(image_data, pixels, height, width, height, width,
                               0, 0, 1, 1, False, False)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                place_crop(pixels, height, width, i, j, h, w, destination[dst_ix], kernel,
                           flip_prob)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode

    class SeededRandomResizedCropFlip(RandomResizedCropRGBImageDecoder):
        """RandomResizedCrop + horizontal flip with per-sample seeding (FFCV #392)."""

        def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                     flip_prob: float = 0.5, interpolation: str = "bilinear"):
            super().__init__(output_size, scale, ratio)
            self.flip_prob = flip_prob
            self.kernel = INTERPOLATIONS[interpolation]

        def generate_code(self):
            return generate(self, train=True)

    class CenterCropResize(CenterCropRGBImageDecoder):
        """Centre crop of ``ratio`` of the shorter side, resized with PIL's filter."""

        def __init__(self, output_size, ratio: float, interpolation: str = "bilinear"):
            super().__init__(output_size, ratio)
            self.flip_prob = 0.0
            self.kernel = INTERPOLATIONS[interpolation]

        def generate_code(self):
            return generate(self, train=False)

    return SeededRandomResizedCropFlip, CenterCropResize


def _seeded_order_class():
    from ffcv.traversal_order.base import TraversalOrder
    from torch.utils.data import DistributedSampler

    class SeededOrder(TraversalOrder):
        """A random order drawn from (seed, epoch), reseedable; distributed as FFCV's RANDOM
        (torch's DistributedSampler with this seed)."""

        def sample_order(self, epoch: int):
            if not self.distributed:
                return np.random.default_rng([self.seed, epoch]).permutation(self.indices)
            sampler = DistributedSampler(self.indices, shuffle=True, seed=self.seed,
                                         drop_last=False)
            sampler.set_epoch(epoch)
            return self.indices[np.array(list(sampler))]

    return SeededOrder


class DataStream:
    """Iterates a loader as normalised float batches on the target device; ``set_epoch`` fixes
    the order (seeded: a resumed run sees the same data). One subclass per backend."""

    def __init__(self, loader, cfg: LoaderConfig, num_samples: int, threads: int) -> None:
        self.loader = loader
        self.cfg = cfg
        self.num_samples = num_samples
        self.epoch = 0
        self._threads = threads

    def set_epoch(self, epoch: int) -> None:
        """Position the loader at ``epoch``."""
        self.epoch = epoch
        self._position(epoch)

    def reseed(self, seed: int) -> None:
        """The same stream for another run: its order and augmentation drawn from ``seed``."""
        self.cfg = replace(self.cfg, seed=seed)
        self._reseed(seed)
        self.set_epoch(0)

    def _reseed(self, seed: int) -> None:
        raise NotImplementedError

    def _position(self, epoch: int) -> None:
        raise NotImplementedError

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return images

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
            images = self._normalise(images).contiguous(memory_format=fmt)
            yield images, labels
        self.epoch += 1


class FFCVStream(DataStream):
    """FFCV yields uint8 0..255 images: normalised here, in torch (never a jitted op after
    ``ToTorchImage``, which hangs, #396)."""

    def __init__(self, *args, randaugment: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = torch.device(self.cfg.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.randaugment = None
        if randaugment:
            from data_pipelines.randaugment import BatchRandAugment

            # per image, on the batch, on its device (the GPU in training): not in the loader
            self.randaugment = BatchRandAugment(randaugment, self.cfg.interpolation)
            self.generator = torch.Generator(device=device)

    def _reseed(self, seed: int) -> None:
        self.loader.seed = self.loader.traversal_order.seed = seed

    def _position(self, epoch: int) -> None:
        self.loader.next_epoch = epoch
        if self.randaugment is not None:  # the augmentation of an epoch is fixed by (seed, epoch)
            self.generator.manual_seed((self.cfg.seed * 1000003 + epoch) % 2**63)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        if self.randaugment is not None:
            images = self.randaugment(images, self.generator)
        return (images.float() - self.mean) / self.std


class TorchvisionStream(DataStream):
    """torchvision's transforms already normalise; the order comes from the sampler."""

    def _reseed(self, seed: int) -> None:
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.seed = seed  # the generator is reseeded by every _position

    def _position(self, epoch: int) -> None:
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)
        elif self.loader.generator is not None:
            self.loader.generator.manual_seed(self.cfg.seed * 1000 + epoch)


def _single_thread_numba() -> None:
    # With one worker FFCV compiles nothing parallel, yet numba's default (OpenMP) threading
    # layer, once FFCV initialises it, halves CPU training speed: its idle threads spin
    # against torch's (measured 496 -> 837 images/s, MobileNetV2 at 40 px on 2 cores). The
    # workqueue layer sleeps. It is not safe for parallel kernels launched from several
    # threads, which only happens with more than one worker, so those keep numba's default.
    import numba

    numba.config.THREADING_LAYER = "workqueue"


def ffcv_stream(path: str, train: bool, cfg: LoaderConfig,
                drop_last: bool | None = None) -> FFCVStream:
    """An FFCV loader over a .beton file."""
    threads = torch.get_num_threads()  # before `import ffcv`, which sets it to 1
    if cfg.workers <= 1:
        _single_thread_numba()
    import ffcv  # noqa: F401
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    size = (cfg.img_size, cfg.img_size)
    crop_flip, centre_crop = _decoder_classes()
    if train:
        decoder = crop_flip(size, tuple(cfg.scale), RATIO,
                            interpolation=cfg.interpolation)
    else:
        decoder = centre_crop(size, ratio=VAL_RATIO, interpolation=cfg.interpolation)
    pipelines = {
        "image": [decoder, ToTensor(), ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
    }
    loader = Loader(
        path, batch_size=cfg.batch_size, num_workers=max(1, cfg.workers),
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        distributed=cfg.distributed, seed=cfg.seed, pipelines=pipelines,
        drop_last=train if drop_last is None else drop_last,
        os_cache=True,
    )
    if train:  # FFCV takes no order class (Loader's isinstance check refuses one): set it after
        loader.traversal_order = _seeded_order_class()(loader)
        loader.first_traversal_order = loader.next_traversal_order()
    torch.set_num_threads(threads)
    return FFCVStream(loader, cfg, loader.reader.num_samples, threads,
                      randaugment=cfg.randaugment if train else "")


def eval_stream(path: str, img_size: int, interpolation: str, batch_size: int) -> FFCVStream:
    """The evaluation stream of a .beton as a training run's recipe evaluates it (centre crop
    of ``VAL_RATIO``, ``interpolation``), on the CPU, one worker: for analyses of trained
    models (the report's receptive fields)."""
    return ffcv_stream(path, False, LoaderConfig(
        img_size=img_size, batch_size=batch_size, workers=1, scale=(1.0, 1.0), seed=0,
        distributed=False, channels_last=False, device="cpu", interpolation=interpolation,
        randaugment=""))


class ManifestDataset(torch.utils.data.Dataset):
    """torchvision path: images of a manifest split, decoded with PIL."""

    def __init__(self, records, transform) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        return self.transform(load_rgb(r.path)), r.label


def torchvision_stream(records, train: bool, cfg: LoaderConfig,
                       drop_last: bool | None = None) -> TorchvisionStream:
    """The same semantics as ``ffcv_stream``, by timm's transforms (``create_transform``: its
    RandomResizedCropAndInterpolation, flip and RandAugment in PIL) over manifest records."""
    from timm.data import create_transform

    if train:
        tf = create_transform(cfg.img_size, is_training=True, scale=tuple(cfg.scale),
                              ratio=RATIO, hflip=0.5, color_jitter=None,
                              auto_augment=cfg.randaugment or None,
                              interpolation=cfg.interpolation, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD)
    else:
        tf = create_transform(cfg.img_size, is_training=False, interpolation=cfg.interpolation,
                              crop_pct=VAL_RATIO, mean=IMAGENET_MEAN, std=IMAGENET_STD)
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
    return TorchvisionStream(loader, cfg, len(dataset), torch.get_num_threads())


META_SEED_OFFSET = 7919  # the query stream's seed is the run's plus this


@dataclass
class Streams:
    """The streams of one training run and the prepared dataset's ``report.json``; ``key`` is
    what they were built from but the seed: a later run of the same process with the same key
    reuses the streams (``reseed``) instead of compiling new loaders."""

    train: DataStream
    val: DataStream
    meta: DataStream | None
    report: dict
    key: dict

    def reseed(self, seed: int) -> None:
        """Streams for a run seeded ``seed`` (val's order is fixed)."""
        self.train.reseed(seed)
        if self.meta is not None:
            self.meta.reseed(seed + META_SEED_OFFSET)


def streams_key(data: DataConfig, cfg: LoaderConfig, meta_source: str | None) -> dict:
    """What a run's streams are built from, but the seed (``Streams.key``)."""
    return {"data": data.model_dump(mode="json"), "loader": asdict(replace(cfg, seed=0)),
            "meta_source": meta_source}


def build_streams(data: DataConfig, recipe: StreamRecipe, *, seed: int, world_size: int = 1,
                  device: str = "cpu", channels_last: bool = False,
                  meta_source: str | None = None, reuse: Streams | None = None) -> Streams:
    """Train, val and (for PMPL) query streams over ``data.out_dir`` with ``data.loader``'s
    backend, set from the recipe: its global ``batch_size`` is split over ``world_size``
    processes, and ``world_size > 1`` shards every stream (validation too: rank r sees images
    r, r + world, ...). ``meta_source``: None (no query stream), ``heldout`` (the meta split) or
    ``val`` (the reference code's leak). Query batches are never larger than the meta split
    allows and always hold at least 2 images (a batch of one cannot train BatchNorm).
    ``reuse``: streams of an earlier run of this process, reseeded and returned when they were
    built from the same settings."""
    cfg = LoaderConfig(img_size=recipe.img_size, batch_size=recipe.batch_size // world_size,
                       workers=data.loader.workers, scale=tuple(recipe.scale), seed=seed,
                       distributed=world_size > 1, channels_last=channels_last, device=device,
                       interpolation=recipe.interpolation, randaugment=recipe.randaugment)
    data_dir = Path(data.out_dir)
    report = read_report(data_dir)
    key = {**streams_key(data, cfg, meta_source), "data_id": report.get("data_id")}
    if reuse is not None and reuse.key == key:
        reuse.reseed(seed)
        return reuse
    meta_split = "val" if meta_source == "val" else "meta"
    meta_cfg = None
    if meta_source is not None:
        per_process = report["images"][meta_split] // world_size
        if per_process < 2:
            raise ValueError(f"the {meta_split} split has {per_process} images per process, too "
                             "few for a query batch: raise data.meta_split or use more images")
        meta_cfg = replace(cfg, seed=seed + META_SEED_OFFSET,
                           batch_size=max(2, min(cfg.batch_size, per_process)))
    if data.loader.backend == "ffcv":
        def stream(split, train, cfg, drop_last=None):
            return ffcv_stream(str(beton_path(data_dir, split)), train, cfg, drop_last)
    else:
        records = read_manifest(data_dir / MANIFEST)

        def stream(split, train, cfg, drop_last=None):
            return torchvision_stream([r for r in records if r.split == split], train, cfg,
                                      drop_last)
    train = stream("train", True, cfg)
    val = stream("val", False, cfg)
    meta = stream(meta_split, True, meta_cfg, drop_last=True) if meta_cfg else None
    return Streams(train, val, meta, report, key)
