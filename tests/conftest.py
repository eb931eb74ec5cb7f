"""Test-wide environment: set before any kernel, DeepSpeed or HF module is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on a CPU machine; DeepSpeed picks its CPU accelerator.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ONEREC_NO_PROGRESS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# Test tensors are tiny: one thread avoids OpenMP stalls when the 2-core machine is shared,
# and keeps float reductions in a fixed order.
torch.set_num_threads(1)


# The bad-input fuzzer (tests/fuzz) runs a fixed, small number of examples per test in CI;
# `--fuzz-examples N` (or ONEREC_FUZZ_EXAMPLES=N) runs N examples of each for a longer search.
# Registered here: a conftest below tests/ would not be loaded early enough to add an option.
FUZZ_EXAMPLES_ENV = "ONEREC_FUZZ_EXAMPLES"


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples", type=int, default=None, metavar="N",
        help=f"examples per test in tests/fuzz (default: each test's CI count; also {FUZZ_EXAMPLES_ENV}=N)",
    )


def pytest_configure(config):
    examples = config.getoption("--fuzz-examples")
    if examples is not None:
        if examples < 1:
            raise pytest.UsageError(f"--fuzz-examples {examples}: expected an integer >= 1")
        os.environ[FUZZ_EXAMPLES_ENV] = str(examples)  # read by tests/fuzz/fuzz_helpers.py


# The serving tests (test_recommender, test_recommend_jsonl, test_serve) read one tiny model
# export (tests/export_helpers.py) and never write to it: written once per session.
@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    from export_helpers import tiny_export

    return tiny_export(tmp_path_factory.mktemp("tiny_export"))


@pytest.fixture(scope="session")
def recommender(export_dir):
    from onerec.inference.recommend import Recommender

    return Recommender.from_pretrained(export_dir, device="cpu")
