"""Few-row products inside compiled decode steps (`leantune.decode.gemv`): traced as reductions, equal to F.linear up
to summation order, and only where they pay (few rows, CPU float weights, no autocast, only while compiling)."""

import pytest
import torch
import torch.nn.functional as F
from method_cases import EVERY_METHOD, tiny_args

from leantune.decode.compile import greedy_decode_step, reduction_linears
from leantune.decode.gemv import GEMV_ROWS
from leantune.methods import apply_method
from leantune.models.decoder.config import Config
from leantune.models.decoder.model import GPT
from tests.test_generate import CONFIGS


def traced(fn, *args):
    """fn(*args) through dynamo (no C++ compile: the captured graph runs as is) -> (result, the graph's targets)."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, targets


def step(layer, x):
    with reduction_linears():
        return layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, GEMV_ROWS, GEMV_ROWS + 1])
def test_few_rows_are_traced_as_reductions_equal_to_linear(dtype, rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40).to(dtype)
    x = torch.randn(rows, 1, 96, dtype=dtype)  # (sequences, one position, in): a decode step's input
    with torch.no_grad():
        got, targets = traced(step, layer, x)
        want = F.linear(x.float(), layer.weight.float(), layer.bias.float())  # fp32 accumulation, as both do
    reduced = F.linear not in targets
    assert reduced == (rows <= GEMV_ROWS), targets
    assert got.dtype == dtype and got.shape == (rows, 1, 40)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8  # bf16: the output's rounding
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


def test_autocast_and_eager_calls_keep_linear():
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(1, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, targets = traced(step, layer, x)
    assert F.linear in targets  # under autocast the product is autocast's bf16 GEMM, as elsewhere
    with reduction_linears():  # eager: no mode is entered, F.linear runs as ever
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("method", [None, *EVERY_METHOD])
def test_the_decode_step_under_the_mode_stays_cacheable(method):
    """Under a TorchFunctionMode dynamo records Python-level tensor methods (Tensor.split) as calls that AOT autograd's
    on-disk cache refuses, so a new process would trace and compile the step again: every node of every method's
    traced step must pass the cache's own check (tests/test_compile_cache.py covers the disk round trip for LoRA)."""
    check_node_safe = pytest.importorskip("torch._functorch._aot_autograd.autograd_cache").check_node_safe
    torch.manual_seed(0)
    model = GPT(Config(vocab_size=97, block_size=64, **CONFIGS["llama-gqa"])).eval()
    if method:
        apply_method(model, method, tiny_args(method))
        model.eval()
    refused = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            try:
                check_node_safe(node)
            except Exception as e:  # BypassAOTAutogradCache
                refused.append(str(e).splitlines()[0])
        return gm.forward

    model.set_kv_cache(1, 64, static=True)
    try:
        with torch.inference_mode():
            model.decode(torch.tensor([[1, 2, 3]]), torch.arange(3), return_hidden=True)
            torch._dynamo.reset()
            step = torch.compile(greedy_decode_step, backend=backend)  # some methods break the graph: each part is checked
            token = step(model, torch.tensor([[4]]), torch.tensor([3]))
    finally:
        model.clear_kv_cache()
    assert token.shape == (1,)
    assert not refused, refused
