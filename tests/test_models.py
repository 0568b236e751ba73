"""Architecture: parameter counts, enhancer placement, fixed/exported models, timm registry."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from timm.layers import create_attn

import metapool  # noqa: F401  (registers metapool_* with timm)
from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer
from metapool.genotype import Genotype, LayerChoice
from metapool.models import build_model, enhancers, export_fixed, slot_names
from metapool.ops import CANDIDATES, DEFAULT_CANDIDATES, build_op


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_baseline_matches_torchvision_parameter_count():
    assert n_params(torchvision.models.mobilenet_v2()) == 3_504_872
    assert n_params(build_model("mobilenetv2_100", "none")) == 3_504_872
    assert n_params(timm.create_model("mobilenetv2_100")) == 3_504_872


@pytest.mark.parametrize("width", [0.5, 0.75, 1.4])
def test_width_multiplier_matches_torchvision(width):
    tv = torchvision.models.mobilenet_v2(width_mult=width, num_classes=100)
    ours = build_model("mobilenetv2_100", "none", width=width, num_classes=100)
    assert n_params(ours) == n_params(tv)


def test_sixteen_enhancers_after_depthwise_conv():
    model = timm.create_model("metapool_mobilenetv2_100")
    found = enhancers(model)
    assert len(found) == 16
    for name, enh in found:
        block = model.get_submodule(name.rpartition(".")[0])
        # the enhancer works on the block's expanded (hidden) channels
        assert enh.channels == block.conv_dw.out_channels == block.conv_pwl.in_channels
        assert enh.alpha.shape == (len(DEFAULT_CANDIDATES),)
    assert "blocks.0.0" not in [n.rpartition(".")[0] for n, _ in found]  # expand ratio 1


def test_enhancer_cost_matches_method_md():
    base = n_params(timm.create_model("mobilenetv2_100"))
    strip = n_params(timm.create_model("metapool_mobilenetv2_100", fixed_op="strip_pool"))
    half = n_params(build_model("mobilenetv2_100", "fixed", fixed_op="strip_pool", split_ratio=0.5))
    pool = n_params(timm.create_model("metapool_mobilenetv2_100", fixed_op="max_pool_3x3"))
    assert 0.44e6 < strip - base < 0.48e6  # METHOD.md: about 0.46M (+13%)
    assert 0.12e6 < half - base < 0.14e6  # about 0.13M (+4%)
    assert pool - base == sum(2 * e.channels for _, e in enhancers(
        timm.create_model("metapool_mobilenetv2_100")))  # pooling adds only the enhancer BN


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_every_candidate_preserves_shape(name):
    x = torch.randn(2, 16, 9, 7)
    assert build_op(name, 16)(x).shape == x.shape


def test_unknown_op_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown candidate op 'max_pool_9x9': choose from skip"):
        build_op("max_pool_9x9", 8)


def test_split_ratio_enhances_half_the_channels():
    enh = MetaPoolEnhancer(16, split_ratio=0.5)
    x = torch.randn(2, 16, 6, 6)
    out = enh(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, 8:], x[:, 8:])
    assert enh.ops[1].conv1.in_channels == 8


def test_frozen_enhancer_equals_its_chosen_op():
    torch.manual_seed(0)
    enh = MetaPoolEnhancer(16).eval()
    x = torch.randn(2, 16, 8, 8)
    enh.freeze([4])  # max_pool_7x7
    expected = enh.act(enh.bn(enh.ops[4](x)))
    torch.testing.assert_close(enh(x), expected)
    fixed = enh.to_fixed().eval()
    assert isinstance(fixed, FixedEnhancer) and fixed.op_names == ("max_pool_7x7",)
    torch.testing.assert_close(fixed(x), expected)


def test_frozen_enhancer_does_not_run_other_candidates():
    enh = MetaPoolEnhancer(8)
    calls = []
    for i, op in enumerate(enh.ops):
        op.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    enh(torch.randn(1, 8, 4, 4))
    # max 5x5 and 7x7 are computed from max 3x3's output, not by their own modules
    assert calls == [0, 1, 2, 5, 6, 7]
    calls.clear()
    enh.freeze([2, 5])
    enh(torch.randn(1, 8, 4, 4))
    assert calls == [2, 5]
    calls.clear()
    enh.freeze([4, 3])  # max 7x7 from max 5x5's output
    enh(torch.randn(1, 8, 4, 4))
    assert calls == [3]


def test_unused_parameters_are_exactly_those_without_gradient_after_freezing():
    enh = MetaPoolEnhancer(8)
    assert enh.unused_parameters() == []  # searching: everything is used
    enh.freeze([0, 3])  # skip + max_pool_5x5: strip_pool's weights and alpha drop out
    enh(torch.randn(2, 8, 4, 4)).sum().backward()
    no_grad = {id(p) for p in enh.parameters() if p.grad is None}
    assert {id(p) for p in enh.unused_parameters()} == no_grad
    assert no_grad == {id(enh.alpha), *(id(p) for p in enh.ops[1].parameters())}


def test_export_fixed_keeps_outputs_and_drops_unused_parameters():
    torch.manual_seed(0)
    model = timm.create_model("metapool_mobilenetv2_100", num_classes=10).eval()
    ops = {}
    for i, (_, enh) in enumerate(enhancers(model)):
        enh.freeze([i % len(DEFAULT_CANDIDATES)])
        ops[enh.layer] = [DEFAULT_CANDIDATES[i % len(DEFAULT_CANDIDATES)]]
    assert list(ops) == slot_names("mobilenetv2_100")
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    export_fixed(model)
    assert not enhancers(model)
    torch.testing.assert_close(model(x), before)
    geno = Genotype([LayerChoice(n, o) for n, o in ops.items()], list(DEFAULT_CANDIDATES))
    rebuilt = timm.create_model("metapool_mobilenetv2_100", genotype=geno, num_classes=10)
    assert n_params(rebuilt) == n_params(model)
    assert not any("alpha" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("attention", ["se", "coord", "cbam", "eca"])
def test_attention_ablation_uses_timm_modules(attention):
    model = timm.create_model("metapool_mobilenetv2_100", attention=attention, num_classes=10)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    slots = [model.get_submodule(name).se for name in slot_names("mobilenetv2_100")]
    assert len(slots) == 16
    for module in slots:  # every slot holds the module timm builds for that name
        assert type(module) is type(create_attn(attention, 32))
    added = n_params(model) - n_params(timm.create_model("mobilenetv2_100", num_classes=10))
    assert added == sum(n_params(m) for m in slots) > 0


@pytest.mark.parametrize("backbone,count", [
    ("mobilenetv3_large_100", 15), ("efficientnet_b0", 16), ("resnet18", 8)])
def test_other_backbones_get_enhancers(backbone, count):
    model = timm.create_model(f"metapool_{backbone}", num_classes=5)
    assert len(enhancers(model)) == count == len(slot_names(backbone))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_unknown_backbone_and_attention_are_clear_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16': choose from"):
        build_model("vgg16")
    with pytest.raises(ValueError, match="unknown attention 'foo'"):
        build_model("mobilenetv2_100", "attention", attention="foo")


def test_coordinate_attention_is_hou_et_al():
    """attn-coord is the CA paper's module (reduction 32, >= 8 channels, biased convs): the
    same module as candidate strip_pool, about 3.95M parameters at 1000 classes."""
    coord = n_params(timm.create_model("metapool_mobilenetv2_100", attention="coord"))
    strip = n_params(timm.create_model("metapool_mobilenetv2_100", fixed_op="strip_pool"))
    bn = sum(2 * e.channels for _, e in enhancers(timm.create_model("metapool_mobilenetv2_100")))
    assert coord == strip - bn  # the enhancer's own BN is the only difference
    assert 3.9e6 < coord < 4.0e6


def test_average_pooling_counts_the_zero_padding():
    out = build_op("avg_pool_3x3", 1)(torch.ones(1, 1, 4, 4))
    assert out[0, 0, 0, 0] == pytest.approx(4 / 9) and out[0, 0, 1, 1] == 1.0


# ------------------------------------------------------------------ the authors' published model
def test_published_model_counts_match_method_md():
    from metapool.profile import count_macs

    model = timm.create_model("metapool_published_mobilenetv2_100")
    assert n_params(model) == 5_181_686
    gates = build_model("mobilenetv2_100", "none", output_gates=True)
    head = build_model("mobilenetv2_100", "none", head="published")
    assert n_params(gates) - 3_504_872 == 37_134  # the 11 gates
    assert n_params(head) - 3_504_872 == 1_639_680  # the 1x1 conv 1280 -> 1280 with bias
    assert count_macs(model, 224) == pytest.approx(302.9e6, rel=0.005)
    assert count_macs(build_model("mobilenetv2_100", "none"), 224) == pytest.approx(300.8e6,
                                                                                     rel=0.001)


def test_published_gates_sit_on_the_output_of_blocks_6_to_16():
    from metapool.models import inverted_residual_blocks

    torch.manual_seed(0)
    model = build_model("mobilenetv2_100", "none", output_gates=True, num_classes=10).eval()
    blocks = inverted_residual_blocks(model)
    assert len(blocks) == 17
    gated = [i for i, b in enumerate(blocks) if isinstance(getattr(b, "bn3", None), torch.nn.Sequential)]
    assert gated == list(range(6, 17))
    for b in blocks[6:]:
        gate = b.bn3[1]
        assert isinstance(gate, type(build_op("strip_pool", 8)))
        assert gate.conv1.out_channels == max(8, b.conv_pwl.out_channels // 32)
        assert all(c.bias is not None for c in (gate.conv1, gate.conv_h, gate.conv_w))
    # a residual block: with the gate's sigmoid path at zero (a = 1/2 everywhere) the block is
    # x + conv(x) / 4, and with the gate removed x + conv(x): the gate sits before the add
    block = blocks[7]  # 64 channels, stride 1: has a residual
    assert block.has_skip
    x = torch.randn(2, 64, 7, 7)
    conv_x = block.bn3[0](block.conv_pwl(block.se(block.aa(block.bn2(block.conv_dw(
        block.bn1(block.conv_pw(x))))))))
    for conv in (block.bn3[1].conv_h, block.bn3[1].conv_w):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + conv_x / 4)
        block.bn3[1].conv_h.bias.fill_(1e4)  # gates saturated at 1: the plain block
        block.bn3[1].conv_w.bias.fill_(1e4)
        torch.testing.assert_close(block(x), x + conv_x)
    # blocks 0-5 are timm's plain blocks
    plain = build_model("mobilenetv2_100", "none", num_classes=10)
    for ours, theirs in zip(blocks[:6], inverted_residual_blocks(plain)[:6], strict=True):
        assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]


def test_published_head_and_its_dropout():
    from metapool.models import PublishedHead

    model = timm.create_model("metapool_published_mobilenetv2_100", drop_rate=0.5,
                              num_classes=10)
    assert isinstance(model.global_pool, PublishedHead)
    assert model.drop_rate == 0.2  # as ran: the authors' model swallowed --drop
    assert build_model("mobilenetv2_100", "none", head="published", head_drop_rate=0.05,
                       drop_rate=0.5).drop_rate == 0.05  # asked for explicitly
    feats = torch.randn(3, 1280, 2, 2)
    head = model.global_pool
    expected = torch.nn.functional.hardswish(head.conv(feats.mean((2, 3), keepdim=True))).flatten(1)
    torch.testing.assert_close(head(feats), expected)
    model.eval()
    torch.testing.assert_close(model.forward_head(feats), model.classifier(expected))
    model.train()
    outs = [model.forward_head(feats) for _ in range(2)]
    assert not torch.equal(*outs)  # dropout before the classifier in training
    with pytest.raises(ValueError, match="mobilenetv2_100 only"):
        build_model("resnet18", "none", head="published")


def test_every_mobilenetv2_has_torchvision_initialisation():
    torch.manual_seed(0)
    ours = build_model("mobilenetv2_100", "none", output_gates=True, head="published")
    tv = torchvision.models.mobilenet_v2()
    # the depthwise 3x3 of the last block: torchvision's fan out counts 9 x 960
    dw = ours.blocks[6][0].conv_dw.weight  # block 16, 320 output channels
    assert dw.std().item() == pytest.approx((2 / (9 * 960)) ** 0.5, rel=0.1)
    assert dw.std().item() == pytest.approx(tv.features[17].conv[1][0].weight.std().item(), rel=0.1)
    head = ours.get_classifier()
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(head.bias) == 0
    gate = ours.blocks[6][0].bn3[1]
    assert torch.count_nonzero(gate.conv1.bias) == 0
    assert gate.conv_h.weight.std().item() == pytest.approx((2 / 320) ** 0.5, rel=0.15)


def test_published_parts_fold_for_deployment():
    from metapool.deploy import fold_batchnorm

    torch.manual_seed(0)
    model = build_model("mobilenetv2_100", "search", output_gates=True, head="published",
                        num_classes=10)
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))  # BatchNorm statistics to fold
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    import copy

    folded = fold_batchnorm(copy.deepcopy(model))
    gated = folded.blocks[3][0].bn3  # block 6: its BN went into the projection, the gate stays
    assert [type(m).__name__ for m in gated] == ["CoordAttn"]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
