"""DenseStepper: the dense forward's layer inputs one layer at a time, from a helper thread."""

import threading

import pytest
import torch
from torch import nn

from fxprune.errors import FxpruneError
from fxprune.passes.lockstep import DenseStepper


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def _inputs_by_hooks(model: nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    got = {}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, args, p=p: got.setdefault(p, args[0].reshape(-1, args[0].shape[-1]).float())) for p in paths]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


def test_inputs_arrive_one_layer_at_a_time_equal_to_a_plain_forward():
    model, x = _model(), torch.randn(3, 7, 4)
    paths = ["0", "2", "4"]
    want = _inputs_by_hooks(model, x, paths)
    with DenseStepper(model, paths, {}, x) as dense:
        for p in paths:
            got, stream = dense.inputs(p)
            assert stream is None  # no residual tap asked for
            assert torch.equal(got, want[p])
            assert not got.requires_grad  # the helper thread runs under no_grad
    assert not any(t.name == "fxprune-dense" for t in threading.enumerate())


def test_closing_early_ends_the_helper_thread_and_leaves_no_hooks():
    model, x = _model(), torch.randn(2, 4)
    dense = DenseStepper(model, ["0", "2", "4"], {}, x)
    dense.inputs("0")
    dense.close()
    assert not any(t.name == "fxprune-dense" for t in threading.enumerate())
    assert all(not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(FxpruneError, match="already ended"):
        dense.inputs("2")


def test_asking_out_of_execution_order_is_a_clear_error():
    model, x = _model(), torch.randn(2, 4)
    with DenseStepper(model, ["0", "2", "4"], {}, x) as dense:
        with pytest.raises(FxpruneError, match="called 0 where 2 was expected"):
            dense.inputs("2")


def test_a_layer_the_forward_never_calls_is_named():
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.unused = _model(), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    with DenseStepper(WithSpare(), ["body.0", "unused"], {}, torch.randn(2, 4)) as dense:
        dense.inputs("body.0")
        with pytest.raises(FxpruneError, match="did not call unused"):
            dense.inputs("unused")


def test_an_error_in_the_dense_forward_reaches_the_caller():
    model = _model()
    with DenseStepper(model, ["0", "2"], {}, torch.randn(2, 9)) as dense:  # wrong width for layer 0's matmul
        dense.inputs("0")  # its pre-hook runs before the matmul
        with pytest.raises(RuntimeError):
            dense.inputs("2")
        assert not any(t.name == "fxprune-dense" for t in threading.enumerate())
