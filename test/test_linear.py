"""The GPT's linear layers (oneDNN products on CPU) and the decoder's row products compute ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F

from transformer.decoding import RowLinear
from transformer.linear import ONEDNN, Linear, linear, uses_onednn

needs_onednn = pytest.mark.skipif(not ONEDNN, reason="PyTorch built without oneDNN")


def _operands(shape: tuple[int, ...], bias: bool) -> list[torch.Tensor | None]:
    torch.manual_seed(0)
    x = torch.randn(*shape, 6)
    weight, b = torch.randn(5, 6), torch.randn(5) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b)]


@needs_onednn
@pytest.mark.parametrize("shape", [(), (4,), (3, 7), (2, 3, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_gives_the_values_and_gradients_of_f_linear(shape, bias):
    ours = _operands(shape, bias)
    theirs = [t.detach().clone().requires_grad_() if t is not None else None for t in ours]
    y = linear(*ours)
    expected = F.linear(*theirs)
    assert uses_onednn(ours[0], ours[1]) == (len(shape) > 0)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    for a, b in zip(ours, theirs):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)


@needs_onednn
def test_onednn_linear_takes_strided_inputs_and_only_the_gradients_asked_for():
    torch.manual_seed(0)
    x = torch.randn(6, 8).t()  # [8, 6], not contiguous
    weight = torch.randn(6, 5).t().requires_grad_()  # [5, 6], not contiguous
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    linear(x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(8, 5).t() @ x)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight))


def test_other_dtypes_and_cpu_autocast_take_f_linear(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a), raising=False)
    x, weight = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    layer = Linear(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 4)).dtype == torch.bfloat16
    assert calls == []


def test_linear_module_keeps_the_state_dict_of_nn_linear():
    layer = Linear(4, 3)
    plain = torch.nn.Linear(4, 3)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), plain(x))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_row_linear_applies_gelu_and_residual_like_the_modules(bias, gelu, residual):
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 5, bias=bias)
    rows = RowLinear(module, 4)
    assert rows.packed == ONEDNN
    x, skip = torch.randn(4, 6), torch.randn(4, 5)
    expected = module(x)
    expected = F.gelu(expected) if gelu else expected
    expected = expected + skip if residual else expected
    with torch.no_grad():
        y = rows(x, gelu=gelu, residual=skip if residual else None)
    torch.testing.assert_close(y, expected.detach())


@needs_onednn
def test_benchmark_flop_counter_counts_the_onednn_products():
    from benchmarks.timing import count_flops

    x, weight = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    assert count_flops(lambda: linear(x, weight).sum().backward()) == 3 * 2 * 4 * 6 * 5  # forward, two gradients
    rows = RowLinear(torch.nn.Linear(6, 5), 4)
    with torch.no_grad():
        assert count_flops(lambda: rows(x, residual=torch.zeros(4, 5))) == 2 * 4 * 6 * 5


def test_a_compiled_gpt_traces_f_linear_and_gives_the_eager_logits():
    from transformer import GPT

    torch.manual_seed(0)
    gpt = GPT(10, 8, 2, 2, 16, dropout=0.0, positions="learned")
    idx = torch.randint(10, (3, 8))
    compiled = torch.compile(gpt, backend="aot_eager")
    torch.testing.assert_close(compiled(idx)[0], gpt(idx)[0], atol=1e-5, rtol=0)
