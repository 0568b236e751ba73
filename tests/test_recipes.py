"""Every knob of the `paper` and `standard` recipes is live: checked on the training objects
a Trainer builds (a handful of generated images, the CPU), never on the config."""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.loaders import build_streams
from data_pipelines.resize import BICUBIC, BILINEAR
from experiments.config import load_params
from experiments.distributed import Dist, StopSignal
from experiments.runs import resolve_run
from experiments.train import Trainer, autocast_for, grad_scaler_for
from tests.helpers import metapool, write_params

pytestmark = pytest.mark.slow
SMALL = {"img_size": 32, "batch_size": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    params = write_params(root / "params.yaml", root / "data", root / "runs",
                          {"recipes": {"paper": SMALL, "standard": SMALL,
                                       "paper-final": SMALL}})
    metapool("data", "prepare", "--params", str(params), "--out", str(root / "data"))
    return root, params


def trainer(data, recipe: str, variant: str = "baseline", backend: str = "ffcv") -> Trainer:
    root, params = data
    p = load_params(params, [f"recipe={recipe}", f"data.loader.backend={backend}",
                             "data.loader.workers=0" if backend == "torchvision" else "train.threads=2"])
    return Trainer(resolve_run(p, variant, 0, str(root / "runs" / f"{recipe}-{variant}")), Dist())


def lr_at(tr: Trainer, epoch: int) -> float:
    updates = len(tr.data.train)
    if tr.recipe.sched_on_updates:
        tr.scheduler.step_update(num_updates=epoch * updates)
    else:
        tr.scheduler.step(epoch)
    return tr.optimizer.param_groups[0]["lr"]


def first_batch(stream) -> torch.Tensor:
    stream.set_epoch(0)
    return next(iter(stream))[0]


def test_paper_optimizer_and_schedule(data):
    tr = trainer(data, "paper")
    opt = tr.optimizer
    assert type(opt).__name__ == "Lamb" and opt.defaults["eps"] == 1e-6
    base = 6.25e-4 * 8 / 256  # 6.25e-4 at batch 256, linearly scaled to the batch of 8
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    assert lr_at(tr, 0) == pytest.approx(1e-6)  # warm-up from 1e-6 ...
    assert lr_at(tr, 2) == pytest.approx(1e-6 + 2 * (base - 1e-6) / 5)  # ... over 5 epochs

    def cosine(epoch: int) -> float:
        return 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * epoch / 250))

    for epoch in (5, 50, 100, 230, 249):  # outside the noise window (epochs 105-225)
        assert lr_at(tr, epoch) == pytest.approx(cosine(epoch), rel=1e-9)
    noisy = [abs(lr_at(tr, e) / cosine(e) - 1) for e in range(106, 225, 10)]
    assert min(noisy) > 1e-4 and max(noisy) < 0.67  # timm's noise: |noise| < noise_pct
    assert lr_at(tr, 249) < 2e-5  # ends at min_lr 1e-5


def test_paper_loss_clipping_ema_precision_and_model(data):
    tr = trainer(data, "paper")
    assert run_seed(tr) == 666  # --seed 666
    assert tr.loss_plain.label_smoothing == 0.1
    logits, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    assert torch.equal(tr.loss_plain(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
    assert tr.ema is None and isinstance(tr.autocast, nullcontext)  # no EMA, float32
    with warnings.catch_warnings():  # no GPU here: only the choice is checked
        warnings.simplefilter("ignore")
        assert isinstance(autocast_for(False, torch.device("cuda")), nullcontext)
        assert isinstance(autocast_for(True, torch.device("cuda")), torch.autocast)
    for p in tr.net.parameters():
        p.grad = torch.full_like(p, 1e3)
    tr.optimizer_step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.net.parameters()]))
    assert float(norm) == pytest.approx(5.0, rel=1e-4)  # clipped at norm 5
    from timm.layers import DropPath

    assert tr.net.drop_rate == 0.1 and not any(isinstance(m, DropPath) for m in tr.net.modules())
    features = torch.randn(4, tr.net.num_features, 1, 1)
    tr.net.train()
    assert not torch.equal(tr.net.forward_head(features), tr.net.forward_head(features))
    tr.net.eval()
    assert torch.equal(tr.net.forward_head(features), tr.net.forward_head(features))


def run_seed(tr: Trainer) -> int:
    return tr.data.train.cfg.seed  # what the loaders (and every RNG) were seeded with


@pytest.mark.parametrize("backend", ["ffcv", "torchvision"])
def test_paper_augmentation_reaches_the_images(data, backend):
    tr = trainer(data, "paper", backend=backend)
    if backend == "ffcv":
        specs = tr.data.train.loader.pipeline_specs["image"].decoder
        assert specs.kernel == BICUBIC
        assert tr.data.val.loader.pipeline_specs["image"].decoder.kernel == BICUBIC
        assert tr.data.train.randaugment.config == "rand-m9-mstd0.5"
    else:
        from timm.data.auto_augment import _RAND_TRANSFORMS, RandAugment
        from timm.data.transforms import RandomResizedCropAndInterpolation

        tf = tr.data.train.loader.dataset.transform.transforms
        crop = next(t for t in tf if isinstance(t, RandomResizedCropAndInterpolation))
        ra = next(t for t in tf if isinstance(t, RandAugment))
        assert str(crop.interpolation).lower().endswith("bicubic")
        assert sorted(op.name for op in ra.ops) == sorted(_RAND_TRANSFORMS)
        assert ra.num_layers == 2 and {op.prob for op in ra.ops} == {0.5}
        assert {op.magnitude for op in ra.ops} == {9} and \
            {op.magnitude_std for op in ra.ops} == {0.5}
    with_ra = first_batch(tr.data.train)
    if backend == "ffcv":
        # the same order and crops without RandAugment (the decoder's crops are seeded by the
        # batch, RandAugment draws from its own generator): only RandAugment can differ
        plain = build_streams(tr.run.data, tr.recipe.model_copy(update={"randaugment": ""}),
                              seed=run_seed(tr))
        differs = (with_ra != first_batch(plain.train)).flatten(1).any(dim=1)
    else:
        # timm's transforms draw crop, flip and RandAugment from one RNG: reseed it per image
        # and apply the pipeline with and without RandAugment, so crop and flip are the same
        import random

        from torchvision.transforms import Compose

        without_ra = Compose([t for t in tf if not isinstance(t, RandAugment)])
        with_tf = tr.data.train.loader.dataset.transform
        records = tr.data.train.loader.dataset.records[:8]
        from data_pipelines.prepared import load_rgb

        outs = []
        for i, r in enumerate(records):
            pair = []
            for transform in (with_tf, without_ra):
                random.seed(i)
                torch.manual_seed(i)
                pair.append(transform(load_rgb(r.path)))
            outs.append(pair)
        differs = torch.tensor([not torch.equal(a, b) for a, b in outs])
    assert 0 < int(differs.sum())  # RandAugment changed some images, and only it could
    erased = tr.erasing(with_ra.repeat(8, 1, 1, 1))
    assert tr.erasing.probability == 0.2 and tr.erasing.mode == "pixel"
    assert 0 < int((erased != with_ra.repeat(8, 1, 1, 1)).flatten(1).any(dim=1).sum()) < 64


def test_pmpl_search_steps_see_the_erasing(data):
    tr = trainer(data, "paper", variant="pmpl")
    erased, searched = [], []
    real_erasing, real_step = tr.erasing, tr.phase.step
    tr.erasing = lambda x: erased.append(real_erasing(x)) or erased[-1]
    tr.phase.step = lambda batch, epoch: searched.append(batch[0]) or real_step(batch, epoch)
    tr.phase.start_epoch(0)
    stop = StopSignal()
    try:
        tr.train_one_epoch(0, stop)
    finally:
        stop.restore()
    assert searched and all(s is e for s, e in zip(searched, erased, strict=True))


def test_standard_recipe(data):
    tr = trainer(data, "standard")
    opt = tr.optimizer
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["momentum"] == 0.9 and not opt.defaults["nesterov"]
    base = 0.045 * 8 / 256
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 4e-5}
    for epoch in (0, 1, 10, 100):
        assert lr_at(tr, epoch) == pytest.approx(base * 0.98 ** epoch, rel=1e-9)
    assert tr.loss_plain.label_smoothing == 0.0 and tr.ema is None and tr.erasing is None
    assert tr.net.drop_rate == 0.0 and tr.data.train.randaugment is None
    assert tr.data.train.loader.pipeline_specs["image"].decoder.kernel == BILINEAR
    for p in tr.net.parameters():
        p.grad = torch.full_like(p, 1e3)
    tr.optimizer_step()  # no clipping in this recipe
    assert float(torch.stack([p.grad.norm() for p in tr.net.parameters()]).norm()) > 1e3


@pytest.mark.parametrize("recipe", ["paper", "paper-final"])
def test_recipe_card_notes_every_knob_of_the_authors_recipes(data, recipe):
    from experiments.config import Recipe
    from experiments.report import recipe_card, recipe_notes
    from tests.helpers import REPO

    notes = recipe_notes((REPO / "params.yaml").read_text(), recipe)
    values = load_params(REPO / "params.yaml").recipes[recipe].model_dump(mode="json")
    card = recipe_card(recipe, values, notes, device_type="cpu").set_index("knob")
    assert set(card.index) == set(Recipe.model_fields)
    # every knob params.yaml sets for the recipe says what the authors' script said or ran
    assert set(notes) <= set(Recipe.model_fields) and len(notes) >= 28
    assert all(note.startswith(("as ran", "as written", "not in procedure B"))
               for knob, note in notes.items()), notes
    assert card.loc["drop_path_rate", "note (params.yaml)"].startswith("as ran")
    assert card.loc["lr", "value"] == ("0.000625" if recipe == "paper" else "0.005")
    assert card.loc["randaugment", "value"] == "rand-m9-mstd0.5"
    assert "no effect on the CPU" in card.loc["amp", "note (params.yaml)"]
    if recipe == "paper-final":
        assert "GradScaler" in card.loc["amp_dtype", "note (params.yaml)"]
        assert card.loc["mixup", "note (params.yaml)"].startswith("as written")
    default = recipe_card("default", load_params(REPO / "params.yaml").recipes["default"]
                          .model_dump(mode="json")).set_index("knob")
    assert default.loc["randaugment", "value"] == "none"


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_reaches_the_model_and_the_batches_on_the_cpu(data, channels_last):
    root, params = data
    p = load_params(params, [f"train.channels_last={str(channels_last).lower()}"])
    tr = Trainer(resolve_run(p, "pmpl", 0, str(root / "runs" / f"cl-{channels_last}")), Dist())
    fmt = torch.channels_last
    assert tr.net.conv_stem.weight.is_contiguous(memory_format=fmt) == channels_last
    x = first_batch(tr.data.train)
    assert x.is_contiguous(memory_format=fmt) == channels_last and x.shape[2] > 1


# ------------------------------------------------------------------ paper-final (procedure B)
def test_paper_final_optimizer_and_schedule(data):
    tr = trainer(data, "paper-final", variant="published")
    opt = tr.optimizer
    assert type(opt).__name__ == "Lamb" and opt.defaults["eps"] == 1e-6
    base = 5e-3 * 8 / 2048  # --lr 5e-3 for the global batch 2048, here a batch of 8
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    assert lr_at(tr, 0) == pytest.approx(1e-6)
    assert lr_at(tr, 4) == pytest.approx(1e-6 + 4 * (base - 1e-6) / 5)

    def cosine(epoch: int) -> float:
        return 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * epoch / 320))

    for epoch in (5, 100, 300, 319):  # outside the noise window (epochs 134-288)
        assert lr_at(tr, epoch) == pytest.approx(cosine(epoch), rel=1e-9)
    noisy = [abs(lr_at(tr, e) / cosine(e) - 1) for e in range(140, 288, 10)]
    assert min(noisy) > 1e-4 and max(noisy) < 0.67
    assert run_seed(tr) == 666


def test_paper_final_mixup_mixes_and_the_loss_takes_soft_targets(data):
    tr = trainer(data, "paper-final", variant="published")
    mix = tr.mixup
    assert mix.mixup_alpha == 0.15 and mix.cutmix_alpha == 0 and mix.mix_prob == 1.0
    x = first_batch(tr.data.train)
    y = torch.arange(len(x)) % 3
    mixed, target = mix(x.clone(), y)
    # soft targets: lam * smoothed(y) + (1 - lam) * smoothed(y flipped), label smoothing 0.1
    smooth = torch.full((len(y), 3), 0.1 / 3).scatter_(1, y[:, None], 1 - 0.1 + 0.1 / 3)
    lam = float(target[0, y[0]] - smooth.flip(0)[0, y[0]]) / float(
        smooth[0, y[0]] - smooth.flip(0)[0, y[0]]) if y[0] != y.flip(0)[0] else None
    assert lam is not None and 0 < lam < 1
    torch.testing.assert_close(target, lam * smooth + (1 - lam) * smooth.flip(0))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    assert not torch.equal(mixed, x)  # the batch really is mixed
    seen = []
    real = tr.loss_mixup
    tr.loss_mixup = lambda out, t: seen.append(t) or real(out, t)
    tr.net.train()
    tr._plain_step(x, y)
    assert len(seen) == 1 and seen[0].shape == (len(x), 3) and seen[0].dtype.is_floating_point
    assert torch.allclose(seen[0].sum(1), torch.ones(len(x)))
    assert type(real).__name__ == "SoftTargetCrossEntropy"


def test_paper_final_precision_clipping_ema_dropout_and_augmentation(data):
    tr = trainer(data, "paper-final", variant="published")
    assert tr.scaler is None and isinstance(tr.autocast, nullcontext)  # CPU: float32, no scaler
    with warnings.catch_warnings():  # no GPU here: the objects a GPU run would get
        warnings.simplefilter("ignore")
        cuda = torch.device("cuda")
        assert isinstance(grad_scaler_for(True, cuda, "float16"), torch.amp.GradScaler)
        assert grad_scaler_for(True, cuda, "bfloat16") is None
        assert grad_scaler_for(False, cuda, "float16") is None
        assert autocast_for(True, cuda, "float16").fast_dtype == torch.float16
    assert tr.ema is None and tr.recipe.clip_grad == 0
    for p in tr.net.parameters():
        p.grad = torch.full_like(p, 1e3)
    tr.optimizer_step()  # no clipping
    assert float(torch.stack([p.grad.norm() for p in tr.net.parameters()]).norm()) > 1e3
    from timm.layers import DropPath

    assert not any(isinstance(m, DropPath) for m in tr.net.modules())  # drop-path not applied
    assert tr.net.drop_rate == 0.2  # the published head's own dropout, as ran
    assert trainer(data, "paper-final").net.drop_rate == 0.1  # --drop 0.1 on MobileNetV2
    assert tr.data.train.loader.pipeline_specs["image"].decoder.kernel == BICUBIC
    assert tr.data.val.loader.pipeline_specs["image"].decoder.kernel == BICUBIC
    assert tr.data.train.randaugment.config == "rand-m9-mstd0.5"
    assert tr.erasing.probability == 0.2 and tr.erasing.mode == "pixel"


def test_paper_final_search_steps_take_no_mixup(data):
    tr = trainer(data, "paper-final", variant="pmpl-head")
    calls = []
    real = tr.mixup
    tr.mixup = lambda x, y: calls.append(1) or real(x, y)
    tr.phase.start_epoch(0)
    stop = StopSignal()
    try:
        tr.train_one_epoch(0, stop)  # the search lasts the whole (short) epoch here
    finally:
        stop.restore()
    assert tr.phase.active and not calls
