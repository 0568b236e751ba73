"""The fast enhancer ops compute what PyTorch's plain ops compute, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metapool.deploy import ChannelAffine, DeployedEnhancer, deployable, fold_batchnorm
from metapool.enhancer import FixedEnhancer, MetaPoolEnhancer, weighted_sum
from metapool.models import BACKBONES, build_model
from metapool.ops import box_mean, build_op, candidate_outputs, max_pool

LAYOUTS = [torch.contiguous_format, torch.channels_last]
SHAPES = [(2, 5, 9, 7), (1, 3, 2, 2), (2, 4, 1, 1), (3, 6, 16, 16)]


def _input(shape, fmt, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() \
        .contiguous(memory_format=fmt).requires_grad_(True)


def _grads(fn, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(upstream)
    return y.detach(), x.grad


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_max_pool_is_torch_max_pool_exactly(k, shape, fmt):
    x = _input(shape, fmt)
    g = _input(shape, fmt, seed=1).detach()
    y, gx = _grads(lambda t: max_pool(t, k), x, g)
    y0, gx0 = _grads(lambda t: F.max_pool2d(t, k, 1, k // 2), x, g)
    assert torch.equal(y, y0)
    # distinct inputs: every window has the same argmax, so the gradient lands on the same
    # elements; an element that wins several windows sums their gradients in another order
    assert torch.equal(gx != 0, gx0 != 0)
    torch.testing.assert_close(gx, gx0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [3, 5, 7])
def test_box_mean_is_avg_pool_counting_padding(k, shape, fmt):
    x = _input(shape, fmt)
    g = _input(shape, fmt, seed=1).detach()
    y, gx = _grads(lambda t: box_mean(t, k), x, g)
    y0, gx0 = _grads(lambda t: F.avg_pool2d(t, k, 1, k // 2, count_include_pad=True), x, g)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx0, rtol=1e-5, atol=1e-6)
    assert gx.abs().sum() > 0


def test_box_mean_backward_is_the_adjoint_in_float64():
    # <A x, g> = <x, A^T g>: the custom backward is exact, not an approximation
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_mean(t, 5), (x,))


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_shared_max_pools_equal_direct_ones(fmt):
    ops = [nn.Identity(), *(build_op(n, 6) for n in
                            ("max_pool_7x7", "avg_pool_5x5", "max_pool_3x3", "max_pool_5x5"))]
    direct = [lambda t: t, lambda t: F.max_pool2d(t, 7, 1, 3),
              lambda t: F.avg_pool2d(t, 5, 1, 2), lambda t: F.max_pool2d(t, 3, 1, 1),
              lambda t: F.max_pool2d(t, 5, 1, 2)]
    x = _input((2, 6, 11, 9), fmt)
    weights = torch.randn(len(ops))
    ones = torch.ones(2, 6, 11, 9)
    y, gx = _grads(lambda t: sum(w * o for w, o in
                                 zip(weights, candidate_outputs(t, ops), strict=True)), x, ones)
    y0, gx0 = _grads(lambda t: sum(w * f(t) for w, f in zip(weights, direct, strict=True)), x,
                     ones)
    refs = [f(x.detach()) for f in direct]
    for out, ref in zip(candidate_outputs(x.detach(), ops), refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gx, gx0)


def test_shared_max_pools_on_tied_inputs_keep_the_forward_exact():
    # after a ReLU6 many activations tie at 0 and 6: the maximum is still the same
    x = torch.randint(-2, 9, (2, 4, 12, 12)).float().clamp(0, 6)
    ops = [build_op(n, 4) for n in ("max_pool_3x3", "max_pool_7x7")]
    m3, m7 = candidate_outputs(x, ops)
    assert torch.equal(m3, F.max_pool2d(x, 3, 1, 1)) and torch.equal(m7, F.max_pool2d(x, 7, 1, 3))


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("grad_fmt", LAYOUTS)
def test_weighted_sum_matches_the_python_sum(fmt, grad_fmt):
    ys = [_input((2, 3, 5, 4), fmt, seed=i) for i in range(4)]
    a = torch.randn(4, requires_grad=True)
    g = torch.randn(2, 3, 5, 4).contiguous(memory_format=grad_fmt)
    out = weighted_sum(F.softmax(a, 0), ys)
    out.backward(g)
    grads = [y.grad.clone() for y in ys] + [a.grad.clone()]
    for t in [*ys, a]:
        t.grad = None
    w = F.softmax(a, 0)
    ref = w[0] * ys[0] + w[1] * ys[1] + w[2] * ys[2] + w[3] * ys[3]
    ref.backward(g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, [y.grad for y in ys] + [a.grad], strict=False):
        torch.testing.assert_close(got, want)
    assert a.grad.abs().sum() > 0


class _PlainEnhancer(nn.Module):
    """The enhancer as first written: torch's pooling modules and a Python weighted sum."""

    def __init__(self, enh: MetaPoolEnhancer) -> None:
        super().__init__()
        self.enh = enh
        plain = {"max_pool": lambda k: nn.MaxPool2d(k, 1, k // 2),
                 "avg_pool": lambda k: nn.AvgPool2d(k, 1, k // 2, count_include_pad=True)}
        self.plain_ops = [plain[n[:8]](int(n[-1])) if n[:8] in plain else op
                          for n, op in zip(enh.candidates, enh.ops, strict=False)]

    def forward(self, x):
        w = F.softmax(self.enh.alpha, 0)
        out = w[0] * self.plain_ops[0](x)
        for wi, op in zip(w[1:], self.plain_ops[1:], strict=False):
            out = out + wi * op(x)
        return self.enh.act(self.enh.bn(out))


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_searchable_enhancer_equals_the_plain_one_forward_and_backward(fmt):
    torch.manual_seed(0)
    enh = MetaPoolEnhancer(16)
    with torch.no_grad():
        enh.alpha.normal_()
    plain = _PlainEnhancer(enh)
    x = _input((4, 16, 10, 10), fmt)
    results = []
    for module in (enh, plain):
        enh.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        y = module(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in enh.parameters()])
    for got, want in zip(*results, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert results[0][-1].abs().sum() > 0  # BN's bias got a gradient


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_fold_batchnorm_keeps_the_eval_outputs(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, "fixed", fixed_op="max_pool_3x3", num_classes=10)
    for m in model.modules():  # non-trivial statistics, so folding does something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        n_enhancers = sum(isinstance(m, FixedEnhancer) for m in model.modules())
        got = deployable(model)(x.contiguous(memory_format=torch.channels_last))
        exported = deployable(model, export=True)(x)
    assert sum(isinstance(m, DeployedEnhancer) for m in deployable(model).modules()) == n_enhancers
    folded = fold_batchnorm(model)
    assert n_enhancers > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == n_enhancers
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    torch.testing.assert_close(exported, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_fold_batchnorm_refuses_a_training_model():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(build_model("mobilenetv2_100", "none", num_classes=10))
