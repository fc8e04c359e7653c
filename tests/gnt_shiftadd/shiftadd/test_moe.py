"""Mult/Shift mixture of experts: balance loss maths, dispatch exactness, sync-freedom, the latency-aware
routing behaviour, and the cached latency measurement."""
from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gnt_shiftadd.models.transformers import FeedForward
from gnt_shiftadd.evaluation import latency as latency_module
from gnt_shiftadd.evaluation.latency import measure_expert_latency, measure_module_latency
from gnt_shiftadd.shiftadd.moe import (
    MoEFeedForward,
    cv_squared,
    latency_aware_balance_loss,
    moe_modules,
    total_auxiliary_loss,
)

DIM, HIDDEN = 8, 16
DISPATCHES = ("sorted", "gather")


def power_of_two_copy(ff: nn.Module, rounding: str = "nearest") -> nn.Module:
    """A 'shift-like' expert: every weight and bias replaced by sign(w) * 2^k (k from log2|w|)."""
    shifted = copy.deepcopy(ff)
    round_fn = {"nearest": torch.round, "up": torch.ceil}[rounding]
    with torch.no_grad():
        for param in shifted.parameters():
            param.copy_(torch.sign(param) * torch.exp2(round_fn(torch.log2(param.abs().clamp_min(1e-12)))))
    return shifted


def three_experts(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    dense = FeedForward(DIM, HIDDEN)
    return [dense, power_of_two_copy(dense), FeedForward(DIM, HIDDEN)]


def make_moe(dispatch: str, noisy: bool = True, gate_scaling: str = "straight_through", seed: int = 0,
             **kwargs) -> MoEFeedForward:
    """Three experts and a random (not zero) router and noise layer, so tokens spread over the experts."""
    moe = MoEFeedForward(three_experts(seed), DIM, noisy=noisy, dispatch=dispatch, gate_scaling=gate_scaling,
                         **kwargs)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)
        moe.router.bias.normal_(0.0, 0.3)
        if moe.noise is not None:
            moe.noise.weight.normal_(0.0, 0.3)
    return moe


def per_token_reference(moe: MoEFeedForward, x: torch.Tensor, noise_seed: int | None) -> torch.Tensor:
    """The definition, one token at a time: g * experts[argmax(noisy logits)](token)."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ moe.router.weight.T + moe.router.bias
    if noise_seed is not None:
        torch.manual_seed(noise_seed)
        std = F.softplus(tokens @ moe.noise.weight.T + moe.noise.bias) + 1e-2
        logits = logits + torch.randn(logits.shape) * std
    rows = []
    for i in range(tokens.shape[0]):
        probabilities = torch.softmax(logits[i], dim=-1)
        chosen = int(probabilities.argmax())
        p = probabilities[chosen]
        gate = p / p.detach() if moe.gate_scaling == "straight_through" else p
        rows.append(gate * moe.experts[chosen](tokens[i:i + 1])[0])
    return torch.stack(rows).reshape(*x.shape[:-1], -1) if rows else x.new_zeros(x.shape)


# --- balance loss maths ------------------------------------------------------------------------------------

def test_cv_squared_by_hand():
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0.0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0  # a single element
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)  # population var 1 / mean^2 4
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx((2 / 3) / 4)
    assert cv_squared(torch.tensor([0.0, 0.0])).item() == 0.0  # eps: no 0/0


def test_balance_loss_gradient_matches_hand_formula():
    """d cv^2(w)/dw_i = 2 (w_i - m) / (E m^2) - 2 v / (E m^3), chained through w = x * l / mean(l)."""
    importance = torch.tensor([3.0, 1.0, 2.5, 0.5], dtype=torch.float64, requires_grad=True)
    load = torch.tensor([1.0, 4.0, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    latency = torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    loss = latency_aware_balance_loss(importance, load, latency)
    loss.backward()

    def hand_gradient(x: torch.Tensor) -> torch.Tensor:
        scale = latency / latency.mean()
        w = x.detach() * scale
        m, v, e = w.mean(), w.var(unbiased=False), w.numel()
        return (2 * (w - m) / (e * m**2) - 2 * v / (e * m**3)) * scale

    torch.testing.assert_close(importance.grad, hand_gradient(importance).float(), rtol=1e-5, atol=1e-7,
                               check_dtype=False)
    torch.testing.assert_close(load.grad, hand_gradient(load).float(), rtol=1e-5, atol=1e-7, check_dtype=False)


def test_latency_weighting_moves_the_minimiser_to_the_faster_expert():
    latency = torch.tensor([2.0, 1.0])  # expert 1 is twice as fast
    equal, faster_gets_more = torch.tensor([0.5, 0.5]), torch.tensor([1 / 3, 2 / 3])
    weighted = lambda x: latency_aware_balance_loss(x, x, latency).item()  # noqa: E731
    plain = lambda x: latency_aware_balance_loss(x, x, None).item()  # noqa: E731
    assert weighted(faster_gets_more) == pytest.approx(0.0, abs=1e-6) and weighted(equal) > 0.2
    assert plain(equal) == 0.0 and plain(faster_gets_more) > 0.2


# --- dispatch exactness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("gate_scaling", ["straight_through", "probability"])
@pytest.mark.parametrize("training", [True, False], ids=["train_noisy", "eval"])
def test_dispatch_equals_per_token_loop(dispatch, gate_scaling, training):
    moe = make_moe(dispatch, gate_scaling=gate_scaling).train(training)
    x = torch.randn(4, 5, DIM)  # [R, S, C]
    torch.manual_seed(123)
    out = moe(x)
    reference = per_token_reference(moe, x, noise_seed=123 if training else None)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    counts = moe.last_tokens_per_expert
    assert int(counts.sum()) == 20 and int((counts > 0).sum()) >= 2  # the test really mixes experts

    # the router's gradient (through the gate) matches the loop's too
    weights = torch.randn_like(out)
    torch.manual_seed(123)
    (moe(x) * weights).sum().backward()
    moe_grad = moe.router.weight.grad.clone()
    moe.zero_grad()
    (per_token_reference(moe, x, noise_seed=123 if training else None) * weights).sum().backward()
    torch.testing.assert_close(moe_grad, moe.router.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_straight_through_gate_is_exactly_one_and_empty_experts_work(dispatch):
    """Every token to expert 0 (the others empty): the output is bit-identical to expert 0 alone."""
    moe = make_moe(dispatch, noisy=False)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([10.0, -10.0, -10.0]))
    x = torch.randn(2, 7, DIM)
    for training in (True, False):
        moe.train(training)
        out = moe(x)
        assert torch.equal(out, moe.experts[0](x))
        assert moe.last_tokens_per_expert.tolist() == [14.0, 0.0, 0.0]
    out.sum().backward()  # empty experts still take part in the graph (DDP needs their grads, zero here)
    assert moe.router.weight.grad is not None
    assert all(p.grad is not None for p in moe.experts[1].parameters())
    assert all(float(p.grad.abs().sum()) == 0.0 for p in moe.experts[1].parameters())


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_one_token_and_no_tokens(dispatch):
    moe = make_moe(dispatch).eval()
    one = torch.randn(1, DIM)
    torch.testing.assert_close(moe(one), per_token_reference(moe, one, None), rtol=1e-6, atol=1e-7)
    assert moe(torch.randn(0, DIM)).shape == (0, DIM)
    moe.train()
    assert moe(torch.randn(0, 3, DIM)).shape == (0, 3, DIM)
    assert torch.isfinite(moe.auxiliary_loss())


def test_gradient_reaches_the_router_through_the_gate():
    moe = MoEFeedForward(three_experts(), DIM, noisy=False, balance_coef=0.0)  # zero router, as converted
    x = torch.randn(32, DIM)
    moe(x).pow(2).sum().backward()
    grad = moe.router.weight.grad
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0


def test_balance_loss_trains_the_noise_layer():
    """With noise the load is a smooth function (normal CDF), so the balance loss alone reaches the noise std."""
    moe = make_moe("sorted", balance_coef=1.0, expert_latency=[1.0, 0.5, 2.0]).train()
    moe(torch.randn(64, DIM))
    moe.auxiliary_loss().backward()
    assert float(moe.noise.weight.grad.abs().sum()) > 0


# --- no host synchronisation in "sorted" dispatch -----------------------------------------------------------

def data_dependent_nodes(module: nn.Module, x: torch.Tensor) -> list[str]:
    """Compile `module` as one graph and list the nodes whose values or shapes depend on tensor data.

    fullgraph=True raises on any graph break; newer torch traces .item()/nonzero/boolean masks into the graph
    as unbacked symbols instead of breaking, so those are looked for explicitly: each one is a host sync on GPU.
    """
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found: list[str] = []

    def inspecting_backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            value = node.meta.get("example_value")
            for item in value if isinstance(value, (tuple, list)) else [value]:
                if item is not None and free_unbacked_symbols(item):
                    found.append(str(node.target))
        return graph_module.forward

    torch._dynamo.reset()
    try:
        torch.compile(module, fullgraph=True, backend=inspecting_backend)(x)
    finally:
        torch._dynamo.reset()
    return found


class HostSyncRecorder(TorchDispatchMode):
    """Eager check, forward and backward: records aten ops that read tensor data on the host or whose output
    shape depends on it (item/bool/tolist, nonzero, masked_select, boolean-mask indexing)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "bincount"}

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in self.SYNCING or boolean_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False], ids=["train_noisy", "eval"])
def test_sorted_dispatch_compiles_to_one_sync_free_graph(training):
    moe = make_moe("sorted", balance_coef=0.5, expert_latency=[1.0, 0.4, 2.0]).train(training)
    x = torch.randn(3, 6, DIM)
    assert data_dependent_nodes(moe, x) == []

    compiled = torch.compile(moe, fullgraph=True, backend="eager")
    torch.manual_seed(7)
    out = compiled(x)
    loss = moe.auxiliary_loss()  # set inside the compiled graph
    torch.manual_seed(7)
    torch.testing.assert_close(out, moe(x), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, moe.auxiliary_loss(), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_sorted_dispatch_has_no_host_sync_forward_or_backward():
    moe = make_moe("sorted", balance_coef=0.5).train()
    with HostSyncRecorder() as recorder:
        out = moe(torch.randn(2, 9, DIM))
        (out.sum() + moe.auxiliary_loss()).backward()
    assert recorder.syncs == []


def test_the_sync_instruments_do_catch_gather_dispatch():
    moe = make_moe("gather").eval()
    with HostSyncRecorder() as recorder:
        moe(torch.randn(5, DIM))
    assert "nonzero" in recorder.syncs
    try:
        flagged = data_dependent_nodes(moe, torch.randn(5, DIM))
    except Exception:  # older torch: fullgraph refuses the data-dependent nonzero outright
        flagged = ["graph break"]
    assert flagged


# --- losses, bookkeeping ---------------------------------------------------------------------------------------

def test_auxiliary_loss_and_total_over_a_model():
    first = make_moe("sorted", noisy=False, balance_coef=0.5, expert_latency=[1.0, 0.4, 2.0])
    second = make_moe("gather", noisy=False, balance_coef=0.25, seed=1, latency_weighting=False)
    model = nn.Sequential(first, nn.ReLU(), second)
    assert first.auxiliary_loss().item() == 0.0 and first.routing_fractions().tolist() == [0.0] * 3
    assert moe_modules(model) == [first, second]
    assert total_auxiliary_loss(nn.Sequential(nn.Linear(2, 2))) == 0.0

    x = torch.randn(40, DIM)
    model(x)
    probabilities = torch.softmax(first.router(x), dim=-1)
    counts = F.one_hot(probabilities.argmax(-1), 3).sum(0).float()
    expected = 0.5 * latency_aware_balance_loss(probabilities.sum(0), counts, torch.tensor([1.0, 0.4, 2.0]))
    torch.testing.assert_close(first.auxiliary_loss(), expected)
    torch.testing.assert_close(first.last_tokens_per_expert, counts)
    torch.testing.assert_close(first.routing_fractions(), counts / 40)
    total = total_auxiliary_loss(model)
    torch.testing.assert_close(total, first.auxiliary_loss() + second.auxiliary_loss())
    assert total.requires_grad
    assert "dispatch='sorted'" in repr(first) and "latency_weighting=False" in repr(second)

    copied = copy.deepcopy(model)  # the stored loss holds a graph; copying/pickling must still work
    pickle.loads(pickle.dumps(first))
    assert moe_modules(copied)[0].auxiliary_loss().item() == 0.0


def test_expert_latency_buffer_is_validated_and_saved():
    moe = MoEFeedForward(three_experts(), DIM, expert_latency=None)
    assert moe.expert_latency.tolist() == [1.0, 1.0, 1.0]
    moe.set_expert_latency([1.0, 0.5, 2.0])
    rebuilt = MoEFeedForward(three_experts(), DIM)
    rebuilt.load_state_dict(moe.state_dict())
    assert rebuilt.expert_latency.tolist() == [1.0, 0.5, 2.0]
    with pytest.raises(ValueError):
        moe.set_expert_latency([1.0, 2.0])
    with pytest.raises(ValueError):
        moe.set_expert_latency([1.0, 0.0, 2.0])
    with pytest.raises(ValueError):
        MoEFeedForward(three_experts(), DIM, dispatch="scatter")
    assert "noise.weight" not in MoEFeedForward(three_experts(), DIM, noisy=False).state_dict()


# --- the method's key behaviour -----------------------------------------------------------------------------

def train_router(balance_coef: float, latency_weighting: bool, steps: int = 150, seed: int = 0) -> tuple[float, float]:
    """(shift fraction of routed tokens over the last 50 training steps, mean eval shift probability).

    Experts: a dense MLP (mult) and its power-of-two copy (shift), frozen; only the router and noise layer
    learn, on MSE to the dense MLP's outputs + the balance loss with latency [mult 1.0, shift 0.4].
    The shift copy rounds magnitudes *up* (2^ceil(log2|w|)), so its outputs overshoot and the task clearly
    prefers the mult expert: with a straight-through top-1 gate the task gradient only says whether scaling
    the chosen expert's output up or down would help, so with nearest rounding its preference is seed-dependent.
    """
    torch.manual_seed(seed)
    dense = FeedForward(DIM, 32)
    shift = power_of_two_copy(dense, rounding="up")
    for param in [*dense.parameters(), *shift.parameters()]:
        param.requires_grad_(False)
    moe = MoEFeedForward([dense, shift], DIM, noisy=True, balance_coef=balance_coef, expert_latency=[1.0, 0.4],
                         latency_weighting=latency_weighting, dispatch="gather")
    optimizer = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=0.05)
    data = torch.Generator().manual_seed(seed + 1)
    shift_fractions = []
    for step in range(steps):
        x = torch.randn(256, DIM, generator=data)
        loss = F.mse_loss(moe(x), dense(x)) + moe.auxiliary_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= steps - 50:
            shift_fractions.append(float(moe.routing_fractions()[1]))
    with torch.no_grad():
        shift_probability = float(torch.softmax(moe.router(torch.randn(2048, DIM, generator=data)), -1)[:, 1].mean())
    return sum(shift_fractions) / len(shift_fractions), shift_probability


def test_latency_aware_balancing_sends_more_tokens_to_the_faster_shift_expert():
    task_only, _ = train_router(0.0, latency_weighting=True)
    weighted, weighted_probability = train_router(1.0, latency_weighting=True)
    unweighted, unweighted_probability = train_router(1.0, latency_weighting=False)
    print(f"shift fraction: coef 0 {task_only:.3f}, coef 1 weighted {weighted:.3f}, "
          f"coef 1 unweighted {unweighted:.3f}")
    assert weighted - task_only >= 0.1
    assert weighted - unweighted >= 0.1
    # the minimiser: importance ~ 1 / latency, i.e. shift share 2.5 / 3.5 ~ 0.71; unweighted: 50/50
    assert weighted_probability == pytest.approx(1 / 0.4 / (1 + 1 / 0.4), abs=0.05)
    assert unweighted == pytest.approx(0.5, abs=0.05) and unweighted_probability == pytest.approx(0.5, abs=0.05)


# --- latency measurement --------------------------------------------------------------------------------------

def test_measure_module_latency_is_positive_and_leaves_the_module_alone():
    ff = FeedForward(DIM, HIDDEN, dropout=0.5).train()
    seconds = measure_module_latency(ff, DIM, tokens=64, repeats=3, warmup=1)
    assert math.isfinite(seconds) and seconds > 0
    assert ff.training and ff.fc1.weight.dtype == torch.float32


def test_measure_expert_latency_caches_and_survives_a_corrupt_file(tmp_path, monkeypatch):
    calls = []

    def fake_timing(module, dim, tokens=4096, device=None, dtype=torch.float32, **kwargs):
        calls.append(type(module).__name__)
        return 1e-6 * len(calls)

    monkeypatch.setattr(latency_module, "measure_module_latency", fake_timing)
    experts = [FeedForward(DIM, HIDDEN), power_of_two_copy(FeedForward(DIM, HIDDEN))]
    first = measure_expert_latency(experts, DIM, tokens=128, cache_dir=tmp_path)
    assert first == [1e-6, 2e-6] and len(calls) == 2
    assert measure_expert_latency(experts, DIM, tokens=128, cache_dir=tmp_path) == first
    assert len(calls) == 2  # read from the cache file
    cache = json.loads((tmp_path / "latency.json").read_text())
    assert list(cache.values()) == [first] and "torch=" in next(iter(cache)) and "FeedForward" in next(iter(cache))

    measure_expert_latency(experts, DIM, tokens=256, cache_dir=tmp_path)  # another key: measured again
    assert len(calls) == 4 and len(json.loads((tmp_path / "latency.json").read_text())) == 2

    (tmp_path / "latency.json").write_text("{not json")
    with pytest.warns(UserWarning, match="latency cache"):
        again = measure_expert_latency(experts, DIM, tokens=128, cache_dir=tmp_path)
    assert len(calls) == 6 and again == pytest.approx([5e-6, 6e-6])
    assert list(json.loads((tmp_path / "latency.json").read_text()).values()) == [again]  # rewritten
    assert [p.name for p in tmp_path.iterdir()] == ["latency.json"]  # no temp files left behind
