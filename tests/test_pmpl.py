"""PMPL: hypergradients, stopping rules, deadlines, genotypes, state."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import metapool  # noqa: F401
from metapool.genotype import Genotype
from metapool.pmpl import PMPLConfig, ProgressiveMetaPooling, SearchPhase
from tests.helpers import TinySearchNet

SMOOTH = ("skip", "avg_pool_3x3", "strip_pool")  # differentiable everywhere: fair FD check


def _search(model, **cfg) -> ProgressiveMetaPooling:
    return ProgressiveMetaPooling(model, PMPLConfig(**cfg), F.cross_entropy)


def _support_grad(search, support):
    x, y = support
    loss = F.cross_entropy(search.net(x), y)
    return list(torch.autograd.grad(loss, search.weights, allow_unused=True))


def test_second_order_finite_difference_matches_exact_autograd(tiny_batches):
    torch.manual_seed(0)
    net = TinySearchNet(candidates=SMOOTH).double()
    with torch.no_grad():
        for _, m in [("a", net.enh1), ("b", net.enh2)]:
            m.alpha.normal_(0, 0.5)
    support, query = [(x.double(), y) for x, y in tiny_batches]
    fd = _search(net, inner_lr=0.1, order="second", fd_eps=1e-4)
    g_w = [g if g is not None else torch.zeros_like(p)
           for g, p in zip(_support_grad(fd, support), fd.weights, strict=True)]
    state = copy.deepcopy(net.state_dict())
    approx = torch.cat([g.reshape(-1) for g in fd.hypergradient(support, query, g_w)])
    net.load_state_dict(state)
    exact_search = _search(net, inner_lr=0.1, order="second", second_order_method="exact")
    exact = torch.cat([g.reshape(-1) for g in exact_search.hypergradient(support, query, g_w)])
    first = _search(net, inner_lr=0.1, order="first")
    first_order = torch.cat([g.reshape(-1) for g in first.hypergradient(support, query, g_w)])
    rel = (approx - exact).norm() / exact.norm()
    assert rel < 1e-3, f"relative error {rel:.2e}"
    # and the second-order term is not negligible, so the check has teeth
    assert (first_order - exact).norm() / exact.norm() > 1e-2


@pytest.mark.parametrize("cfg", [{"inner_steps": 3}, {"order": "second"},
                                 {"order": "second", "second_order_method": "exact",
                                  "inner_steps": 2}])
def test_lookahead_restores_weights(tiny_net, tiny_batches, cfg):
    support, query = tiny_batches
    search = _search(tiny_net, inner_lr=0.5, **cfg)
    before = [p.detach().clone() for p in search.weights]
    g_w = [torch.zeros_like(p) if g is None else g for g, p in
           zip(_support_grad(search, support), search.weights, strict=True)]
    search.hypergradient(support, query, g_w)
    for b, p in zip(before, search.weights, strict=True):
        assert torch.equal(p, b)  # restored bit for bit, not w + d - d


def test_inner_lr_changes_the_alpha_update(tiny_batches):
    support, query = tiny_batches
    alphas = []
    for inner_lr in (0.0, 1.0):
        torch.manual_seed(0)
        net = TinySearchNet()
        search = _search(net, inner_lr=inner_lr, alpha_lr=0.1)
        search.step(support, query, epoch=0)
        alphas.append(torch.cat([a.detach().reshape(-1) for a in search.alphas]))
    assert not torch.allclose(alphas[0], alphas[1])


@pytest.mark.parametrize("cfg", [
    {"inner_lr": 0.0}, {"inner_lr": 0.5}, {"inner_lr": 0.5, "inner_steps": 3},
    {"inner_lr": 0.5, "order": "second"},
    {"inner_lr": 0.5, "order": "second", "second_order_method": "exact", "inner_steps": 2}])
def test_step_reuses_the_support_gradient_for_the_weight_update(tiny_net, tiny_batches, cfg):
    """The hypergradient never writes p.grad: after the step the weights hold exactly the
    support gradient (in every mode), which the recipe's optimizer then applies."""
    support, query = tiny_batches
    search = _search(tiny_net, **cfg)
    reference = copy.deepcopy(tiny_net)
    loss = F.cross_entropy(reference(support[0]), support[1])
    loss.backward()
    alpha_before = [a.detach().clone() for a in search.alphas]
    search.step(support, query, epoch=0)
    named_ref = dict(reference.named_parameters())
    for name, p in zip(search.weight_names, search.weights, strict=True):
        expected = named_ref[name].grad
        if expected is None:
            assert p.grad is None or not p.grad.any()
        else:
            assert torch.equal(p.grad, expected)  # the same pass: the same numbers
    assert all(a.grad is None for a in search.alphas)
    assert any(not torch.equal(a, b) for a, b in zip(search.alphas, alpha_before, strict=True))


def _set_probs(module, leader: int, strength: float = 5.0) -> None:
    with torch.no_grad():
        module.alpha.zero_()
        module.alpha[leader] = strength


def test_margin_rule_freezes_to_the_leading_candidate(tiny_net):
    search = _search(tiny_net, threshold=0.3)
    _set_probs(tiny_net.enh1, leader=3)
    events = search.after_step(epoch=0)
    assert [(e.layer, e.ops, e.reason) for e in events] == [("enh1", [3], "margin")]
    assert tiny_net.enh1.chosen == [3] and not tiny_net.enh2.frozen


def test_reference_code_rule_always_picks_candidate_one():
    torch.manual_seed(0)
    net = TinySearchNet(candidates=("skip", "strip_pool", "max_pool_3x3", "avg_pool_3x3"))
    search = _search(net, threshold=0.3, stop_rule="reference_code")
    _set_probs(net.enh1, leader=2)
    events = search.after_step(epoch=0)
    assert events[0].ops == [1]
    assert net.enh1.candidates[net.enh1.chosen[0]] == "strip_pool"


def test_below_threshold_nothing_freezes(tiny_net):
    search = _search(tiny_net, threshold=0.3)
    _set_probs(tiny_net.enh1, leader=0, strength=0.5)  # margin about 0.2
    assert search.after_step(epoch=0) == []


def test_stop_rule_none_waits_for_the_deadline(tiny_net):
    search = _search(tiny_net, stop_rule="none", deadline_epoch=3, deadline_policy="argmax")
    _set_probs(tiny_net.enh1, leader=2, strength=20)
    assert search.after_step(epoch=0) == [] and search.on_epoch_start(2) == []
    events = search.on_epoch_start(3)
    assert len(events) == 2 and tiny_net.enh1.chosen == [2]
    assert all(e.reason == "deadline" for e in events) and not search.active


@pytest.mark.parametrize("policy,expected", [("top2", [1, 3]), ("argmax", [3])])
def test_deadline_policies(tiny_net, policy, expected):
    search = _search(tiny_net, deadline_epoch=5, deadline_policy=policy, threshold=1.0)
    with torch.no_grad():
        tiny_net.enh1.alpha.copy_(torch.tensor([0.0, 0.4, 0.1, 0.5]))
    search.on_epoch_start(5)
    assert tiny_net.enh1.chosen == expected


def test_no_alpha_step_once_every_layer_is_frozen(tiny_net, tiny_batches):
    support, _ = tiny_batches
    search = _search(tiny_net, alpha_lr=0.1)
    search.finalize(epoch=0)
    alphas = [a.detach().clone() for a in search.alphas]
    search.step(support, None, epoch=1)  # no query batch needed any more
    assert not search.active and search.alpha_optimizer.state == {}
    for a, b in zip(search.alphas, alphas, strict=True):
        assert torch.equal(a, b)


def test_genotype_round_trip(tmp_path, tiny_net):
    search = _search(tiny_net, threshold=0.3)
    _set_probs(tiny_net.enh1, leader=1)
    search.after_step(epoch=0)
    search.finalize(epoch=4)
    geno = search.genotype()
    path = tmp_path / "genotype.json"
    geno.save(path)
    loaded = Genotype.load(path)
    assert loaded == geno
    assert [c.reason for c in loaded.layers] == ["margin", "end_of_training"]
    assert loaded.layers[0].ops == ["max_pool_3x3"] and loaded.layers[1].epoch == 4


def test_state_dict_round_trip(tiny_batches):
    support, query = tiny_batches
    torch.manual_seed(0)
    net = TinySearchNet()
    search = _search(net, history_every=1)
    for _ in range(3):
        search.step(support, query, epoch=0)
        search.after_step(epoch=0)
    state = copy.deepcopy(search.state_dict())
    model_state = copy.deepcopy(net.state_dict())
    torch.manual_seed(0)
    net2 = TinySearchNet()
    net2.load_state_dict(model_state)
    search2 = _search(net2, history_every=1)
    search2.load_state_dict(state)
    for s in (search, search2):
        s.step(support, query, epoch=0)
    for a, b in zip(search.alphas, search2.alphas, strict=True):
        assert torch.equal(a, b)  # a restored search takes exactly the same step
    assert search2.history.steps == [1, 2, 3]  # every step (history_every=1)


def test_full_search_step_on_mobilenetv2():
    torch.manual_seed(0)
    model = timm.create_model("metapool_mobilenetv2_100", num_classes=10)
    search = _search(model, inner_lr=0.001, alpha_lr=0.01)
    opt = torch.optim.SGD(search.weight_parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    before = [a.detach().clone() for a in search.alphas]
    loss = search.step((x, y), (x.flip(3), y), epoch=0)
    opt.step()
    search.after_step(epoch=0)
    assert torch.isfinite(loss)
    assert len(search.alphas) == 16
    assert all(not torch.equal(a, b) for a, b in zip(search.alphas, before, strict=True))
    assert [n for n, _ in search.layers][0] == "blocks.1.0"


def test_nan_alpha_stops_with_a_clear_message(tiny_net, tiny_batches):
    support, query = tiny_batches
    search = _search(tiny_net)
    with torch.no_grad():
        tiny_net.enh2.alpha[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"alpha of enh\d became NaN/inf at step 0 \(epoch 0\): lower"):
        search.step(support, query, epoch=0)


@pytest.mark.parametrize("kwargs,field", [
    ({"inner_lr": -0.1}, "inner_lr"),
    ({"threshold": 0.0}, "threshold"),
    ({"stop_rule": "magic"}, "stop_rule"),
    ({"candidates": ["skip", "max_pool_9x9"]}, "unknown candidate op 'max_pool_9x9'"),
    ({"order": "second", "inner_steps": 2}, "needs inner_steps=1"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        PMPLConfig(**kwargs)


class _Queries:
    """A re-iterable of batches that records the epochs it was positioned at."""

    def __init__(self, batches) -> None:
        self.batches, self.positions = batches, []

    def set_epoch(self, epoch: int) -> None:
        self.positions.append(epoch)

    def __iter__(self):
        return iter(self.batches)


def test_search_phase_cycles_queries_and_reports_what_froze(tiny_net, tiny_batches):
    support, query = tiny_batches
    queries = _Queries([query, query])
    phase = SearchPhase(_search(tiny_net, alpha_lr=0.1, threshold=1.0, deadline_epoch=2), queries)
    assert not phase.start_epoch(0) and phase.active
    for _ in range(5):
        phase.step(support, epoch=0)
        assert not phase.after_step(epoch=0)
    assert queries.positions == [0, 1, 2]  # three laps over two batches, in (epoch, lap) order
    assert not phase.start_epoch(1)
    phase.step(support, epoch=1)
    assert queries.positions[-1] == 1000  # epoch 1, lap 0
    assert phase.unused_parameters() == []
    assert phase.start_epoch(2) and not phase.active  # the deadline froze both layers
    rows = phase.search.freeze_table()
    assert [(r["layer"], r["reason"], r["step"]) for r in rows] == [
        ("enh1", "deadline", 6), ("enh2", "deadline", 6)]
    assert all(len(r["ops"].split("+")) == 2 and 0 <= r["margin"] < 1 for r in rows)
    unused = {id(p) for p in phase.unused_parameters()}
    assert {id(a) for a in phase.search.alphas} <= unused
    tiny_net.zero_grad(set_to_none=True)
    tiny_net(support[0]).sum().backward()
    assert unused == {id(p) for p in tiny_net.parameters() if p.grad is None}
    assert not phase.finish(epoch=2)  # nothing left to fix


def test_a_frozen_alpha_never_moves_again(tiny_batches):
    """Frozen layers get no alpha gradient (None), so Adam's momentum and weight decay cannot
    move them: bit-identical afterwards, while the searching layer keeps learning."""
    support, query = tiny_batches
    torch.manual_seed(0)
    net = TinySearchNet()
    search = _search(net, alpha_lr=0.1, threshold=0.3, alpha_weight_decay=0.1)
    for _ in range(2):  # Adam state for both layers
        search.step(support, query, epoch=0)
    _set_probs(net.enh1, leader=2)
    assert [e.layer for e in search.after_step(epoch=0)] == ["enh1"]
    frozen, searching = net.enh1.alpha.detach().clone(), net.enh2.alpha.detach().clone()
    for _ in range(3):
        search.step(support, query, epoch=0)
    assert torch.equal(net.enh1.alpha, frozen)
    assert not torch.equal(net.enh2.alpha, searching)


def test_finite_differences_match_exact_second_order_with_dropout(tiny_batches):
    """The w+ and w- passes replay the support pass's dropout masks (as the exact unrolled
    graph does), so the approximation stays within 1e-3 of autograd's exact hypergradient."""
    from metapool.pmpl import rng_state

    support, query = [(x.double(), y) for x, y in tiny_batches]
    torch.manual_seed(0)
    net = TinySearchNet(candidates=SMOOTH, dropout=0.3).double()
    with torch.no_grad():
        for m in (net.enh1, net.enh2):
            m.alpha.normal_(0, 0.5)
    state = copy.deepcopy(net.state_dict())

    def hypergradient(**cfg):
        net.load_state_dict(state)
        search = _search(net, **{"inner_lr": 0.1, "order": "second", "fd_eps": 1e-4, **cfg})
        torch.manual_seed(5)
        masks = rng_state(torch.device("cpu"))
        g_w = [g if g is not None else torch.zeros_like(p)
               for g, p in zip(_support_grad(search, support), search.weights, strict=True)]
        grads = search.hypergradient(support, query, g_w, masks)
        return torch.cat([g.reshape(-1) for g in grads])

    exact = hypergradient(second_order_method="exact")
    approx = hypergradient()
    first = hypergradient(order="first")
    assert (approx - exact).norm() / exact.norm() < 1e-3
    assert (first - exact).norm() / exact.norm() > 1e-2  # the second-order term matters


@pytest.mark.parametrize("cfg", [{"inner_lr": 0.0}, {"inner_lr": 0.5, "inner_steps": 2},
                                 {"inner_lr": 0.5, "order": "second"},
                                 {"inner_lr": 0.5, "order": "second",
                                  "second_order_method": "exact"}])
def test_only_the_real_support_pass_moves_batchnorm_statistics(tiny_net, tiny_batches, cfg):
    support, query = tiny_batches
    reference = copy.deepcopy(tiny_net)
    reference(support[0])  # the support pass alone
    _search(tiny_net, **cfg).step(support, query, epoch=0)
    for (name, a), b in zip(tiny_net.named_buffers(), reference.buffers(), strict=True):
        if "running" in name or "num_batches" in name:
            assert torch.equal(a, b), name
