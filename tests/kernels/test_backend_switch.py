"""ONEREC_KERNELS: one environment switch for the backend of every kernel op.

Dispatch is checked on `_backend.pick` directly, with a stand-in for a CUDA tensor so that the
case where "auto" would choose Triton runs on a CPU machine too, and through every public op:
spies on each package's reference and triton modules record which one actually ran.
The precedence under test (see kernels/_backend.py): the variable replaces "auto" only, an
explicit backend argument wins, and a bad value is an error on every call.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from onerec.kernels import _backend, constrained_beam, moe_routing
from onerec.kernels.constrained_beam import reference as beam_reference
from onerec.kernels.moe_routing import reference as routing_reference

ENV = _backend.ENV_VAR
PACKAGES = [(moe_routing.__name__, routing_reference), (constrained_beam.__name__, beam_reference)]
# Public ops and the function each one ends up calling in its package's backend module.
ROUTING_FUNCTIONS = ("topk_softmax_routing", "topk_softmax_routing_with_counts", "permute", "unpermute")
BEAM_FUNCTIONS = ("constrained_beam_step",)

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at import: tests/conftest.py
# sets it before anything imports the kernels, so only its value at that time counts.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_runnable_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 at import"
)


class CudaLike:
    """Stands in for a CUDA tensor: pick() looks at nothing but `.is_cuda`."""

    is_cuda = True


def stub_triton_module(package: str) -> types.ModuleType:
    """A module standing in for `<package>.triton`, so dispatch tests need no Triton install."""
    return types.ModuleType(f"{package}.triton")


@pytest.fixture
def stubbed_triton(monkeypatch):
    """{package: stub} installed where pick() finds its triton modules."""
    stubs = {package: stub_triton_module(package) for package, _ in PACKAGES}
    for package, stub in stubs.items():
        monkeypatch.setitem(_backend._triton_modules, package, stub)
    return stubs


def record_calls(monkeypatch, module: types.ModuleType, names: tuple[str, ...], calls: list[str]) -> None:
    """Wrap module.<name> so that every call appends '<module name>.<name>' to `calls`."""
    for name in names:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(f"{module.__name__}.{_name}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


def run_every_op(device: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each public op once, with its default backend ("auto"), on small random inputs."""
    g = torch.Generator().manual_seed(11)
    T, E, K, D = 9, 5, 2, 8
    logits = (torch.randperm(T * E, generator=g).float().reshape(T, E) / 7).to(device)  # no ties
    x = torch.randn(T, D, generator=g).to(device)
    weights, indices = moe_routing.topk_softmax_routing(logits, K)
    counted = moe_routing.topk_softmax_routing_with_counts(logits, K)
    x_perm, ids, per_expert = moe_routing.permute(x, indices, E)
    y = moe_routing.unpermute(x_perm, ids, weights, T)
    # A two-level trie over codes in [0, 4): root -> {0, 2}, node 1 -> {1, 3}, node 2 -> {0}.
    child_tokens = torch.tensor([[0, 2], [1, 3], [0, -1], [-1, -1], [-1, -1], [-1, -1]], device=device)
    child_nodes = torch.tensor([[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]], device=device)
    beam_logits = torch.randn(4, 4, generator=g).to(device)
    states = torch.tensor([1, 2, 0, -1], device=device)
    scores = torch.zeros(4, device=device)
    step = constrained_beam.constrained_beam_step(beam_logits, scores, states, child_tokens, child_nodes, 2)
    return {
        "topk_softmax_routing": (weights, indices),
        "topk_softmax_routing_with_counts": counted,
        "permute": (x_perm, ids, per_expert),
        "unpermute": (y,),
        "constrained_beam_step": step,
    }


# ------------------------------------------------------------------------------ pick()
@pytest.mark.parametrize("value", [None, "", "auto", " AUTO "])
def test_unset_or_auto_keeps_todays_dispatch(monkeypatch, stubbed_triton, value):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    for package, reference in PACKAGES:
        assert _backend.pick("auto", torch.zeros(2), package, reference) is reference
        assert _backend.pick("auto", CudaLike(), package, reference) is stubbed_triton[package]


def test_reference_forces_the_reference_for_cpu_and_cuda_inputs(monkeypatch, stubbed_triton):
    monkeypatch.setenv(ENV, "reference")
    for package, reference in PACKAGES:
        assert _backend.pick("auto", torch.zeros(2), package, reference) is reference
        # the input auto would hand to Triton
        assert _backend.pick("auto", CudaLike(), package, reference) is reference


def test_triton_forces_triton_for_cpu_inputs(monkeypatch, stubbed_triton):
    monkeypatch.setenv(ENV, "triton")
    for package, reference in PACKAGES:
        assert _backend.pick("auto", torch.zeros(2), package, reference) is stubbed_triton[package]
        assert _backend.pick("auto", CudaLike(), package, reference) is stubbed_triton[package]


def test_an_explicit_backend_argument_wins_over_the_variable(monkeypatch, stubbed_triton):
    for package, reference in PACKAGES:
        monkeypatch.setenv(ENV, "reference")
        assert _backend.pick("triton", torch.zeros(2), package, reference) is stubbed_triton[package]
        monkeypatch.setenv(ENV, "triton")
        assert _backend.pick("reference", CudaLike(), package, reference) is reference


def test_the_variable_is_read_at_call_time(monkeypatch, stubbed_triton):
    package, reference = PACKAGES[0]
    monkeypatch.setenv(ENV, "triton")
    assert _backend.pick("auto", torch.zeros(2), package, reference) is stubbed_triton[package]
    monkeypatch.setenv(ENV, "reference")
    assert _backend.pick("auto", CudaLike(), package, reference) is reference
    monkeypatch.delenv(ENV)
    assert _backend.pick("auto", CudaLike(), package, reference) is stubbed_triton[package]


@pytest.mark.parametrize("value", ["cuda", "ref", "torch", "1"])
def test_a_bad_value_is_a_value_error_naming_the_variable_and_the_choices(monkeypatch, stubbed_triton, value):
    monkeypatch.setenv(ENV, value)
    package, reference = PACKAGES[0]
    for backend in ("auto", "reference", "triton"):  # a typo never passes unnoticed
        with pytest.raises(ValueError) as excinfo:
            _backend.pick(backend, torch.zeros(2), package, reference)
        message = str(excinfo.value)
        assert ENV in message and repr(value) in message
        assert all(choice in message for choice in ("auto", "reference", "triton")), message
    with pytest.raises(ValueError, match=ENV):
        moe_routing.topk_softmax_routing(torch.randn(3, 4), 2)


def test_forcing_triton_without_triton_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "triton")
    package, reference = PACKAGES[0]
    monkeypatch.setitem(_backend._triton_modules, package, None)  # what an ImportError leaves
    with pytest.raises(RuntimeError, match=f"{ENV}=triton"):
        _backend.pick("auto", torch.zeros(2), package, reference)


def test_a_bad_backend_argument_is_still_a_value_error(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match="backend"):
        _backend.pick("cuda", torch.zeros(2), *PACKAGES[0])


# ------------------------------------------------------------------------------ every public op
def test_reference_runs_every_op_on_the_reference_under_triton_interpret(monkeypatch, stubbed_triton):
    """With the interpreter on (Triton could run on CPU) the switch still keeps Triton out."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, "reference")
    calls: list[str] = []
    record_calls(monkeypatch, routing_reference, ("topk_softmax_routing", "permute", "unpermute"), calls)
    record_calls(monkeypatch, beam_reference, BEAM_FUNCTIONS, calls)
    run_every_op("cpu")  # a stub triton module has no functions: reaching one would raise
    assert calls == [
        f"{routing_reference.__name__}.topk_softmax_routing",
        f"{routing_reference.__name__}.topk_softmax_routing",  # _with_counts: the reference + a bincount
        f"{routing_reference.__name__}.permute",
        f"{routing_reference.__name__}.unpermute",
        f"{beam_reference.__name__}.constrained_beam_step",
    ]


@needs_runnable_triton
def test_triton_runs_every_op_on_the_kernels_and_they_agree_with_the_reference(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(ENV, "reference")
    expected = run_every_op(DEVICE)

    monkeypatch.setenv(ENV, "triton")
    routing_triton = _backend._triton_module(moe_routing.__name__)
    beam_triton = _backend._triton_module(constrained_beam.__name__)
    assert routing_triton is not None and beam_triton is not None
    calls: list[str] = []
    record_calls(monkeypatch, routing_triton, ROUTING_FUNCTIONS, calls)
    record_calls(monkeypatch, beam_triton, BEAM_FUNCTIONS, calls)
    record_calls(monkeypatch, routing_reference, ("topk_softmax_routing", "permute", "unpermute"), calls)
    record_calls(monkeypatch, beam_reference, BEAM_FUNCTIONS, calls)
    got = run_every_op(DEVICE)
    # Every op reached its kernel (a kernel may call a sibling, hence a set) and none the reference.
    expected_calls = {f"{routing_triton.__name__}.{name}" for name in ROUTING_FUNCTIONS}
    expected_calls.add(f"{beam_triton.__name__}.constrained_beam_step")
    assert set(calls) == expected_calls, calls
    for op, outputs in expected.items():
        for ours, ref in zip(got[op], outputs):
            if ref.dtype.is_floating_point:
                torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=op)
            else:
                assert torch.equal(ours, ref), op
