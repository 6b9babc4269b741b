"""The GPT's linear layers (oneDNN products on CPU) and the decoder's row products compute ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F

from transformer.decoding import RowLinear
from transformer.linear import ONEDNN_BUILT, Linear, linear, uses_onednn

needs_onednn = pytest.mark.skipif(not ONEDNN_BUILT, reason="PyTorch built without oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Counts the oneDNN products (each recorded by its input's shape) while passing them through."""
    calls: list[tuple[int, ...]] = []
    if not ONEDNN_BUILT:
        return calls
    product = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, x, *args):
            calls.append(tuple(x.shape))
            return product(x, *args)

        def binary(self, x, *args):
            calls.append(tuple(x.shape))
            return product.binary(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    return calls


def _operands(shape: tuple[int, ...], bias: bool) -> list[torch.Tensor | None]:
    torch.manual_seed(0)
    x = torch.randn(*shape, 6)
    weight, b = torch.randn(5, 6), torch.randn(5) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b)]


@needs_onednn
@pytest.mark.parametrize("shape", [(4,), (3, 7), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_gives_the_values_and_gradients_of_f_linear(shape, bias, onednn_calls):
    ours = _operands(shape, bias)
    theirs = [t.detach().clone().requires_grad_() if t is not None else None for t in ours]
    y = linear(*ours)
    expected = F.linear(*theirs)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)
    rows = y.numel() // 5
    assert onednn_calls == [(rows, 6), (rows, 5), (5, rows)]  # forward, input gradient, weight gradient


@needs_onednn
def test_onednn_linear_takes_strided_inputs_and_computes_only_the_gradients_asked_for(onednn_calls):
    torch.manual_seed(0)
    x = torch.randn(6, 8).t()  # [8, 6], not contiguous
    weight = torch.randn(6, 5).t().requires_grad_()  # [5, 6], not contiguous
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(8, 5).t() @ x)
    assert len(onednn_calls) == 3  # two forwards, the weight gradient only
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    assert len(onednn_calls) == 4


def test_f_linear_wherever_onednn_does_not_apply(onednn_calls, monkeypatch):
    double = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(linear(*double), F.linear(*double))
    vector, weight = torch.randn(4), torch.randn(2, 4)
    torch.testing.assert_close(linear(vector, weight), F.linear(vector, weight))
    empty = torch.randn(0, 4)
    assert linear(empty, weight).shape == (0, 2)
    assert not uses_onednn(torch.randn(3, 4), weight, torch.randn(2, dtype=torch.float64))
    layer = Linear(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 4)).dtype == torch.bfloat16
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    layer(torch.randn(3, 4))
    assert onednn_calls == []


def test_linear_module_keeps_the_state_dict_of_nn_linear():
    layer = Linear(4, 3)
    plain = torch.nn.Linear(4, 3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), plain(x))


def test_torch_compile_traces_f_linear_and_gives_the_eager_logits():
    from transformer import GPT

    torch.manual_seed(0)
    gpt = GPT(10, 8, 2, 2, 16, dropout=0.0, positions="learned")
    idx = torch.randint(10, (3, 8))
    traced = []

    def backend(graph_module, example_inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch.testing.assert_close(torch.compile(gpt, backend=backend)(idx)[0], gpt(idx)[0])
    assert any("linear" in target for target in traced)
    assert not any("mkldnn" in target for target in traced)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_row_linear_applies_gelu_and_residual_like_the_modules(bias, gelu, residual, onednn_calls):
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 5, bias=bias)
    rows = RowLinear(module, 4)
    assert (rows.packed is not None) == ONEDNN_BUILT
    x, skip = torch.randn(4, 6), torch.randn(4, 5)
    expected = module(x)
    expected = F.gelu(expected) if gelu else expected
    expected = expected + skip if residual else expected
    with torch.no_grad():
        y = rows(x, gelu=gelu, residual=skip if residual else None)
    torch.testing.assert_close(y, expected.detach())
    assert len(onednn_calls) == ONEDNN_BUILT


def test_row_linear_under_cpu_autocast_takes_the_module_path():
    module = torch.nn.Linear(6, 5)
    rows = RowLinear(module, 4)
    x = torch.randn(4, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = rows(x, residual=torch.zeros(4, 5))
        expected = module(x)
    torch.testing.assert_close(y.float(), expected.float(), atol=1e-2, rtol=1e-2)


@needs_onednn
def test_benchmark_flop_counter_counts_the_onednn_products():
    from benchmarks.timing import count_flops

    x, weight = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    assert count_flops(lambda: linear(x, weight).sum().backward()) == 3 * 2 * 4 * 6 * 5  # forward, two gradients
    rows = RowLinear(torch.nn.Linear(6, 5), 4)
    with torch.no_grad():
        assert count_flops(lambda: rows(x, residual=torch.zeros(4, 5))) == 2 * 4 * 6 * 5
