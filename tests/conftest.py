"""Fixtures shared by test files in several directories; the suite's device decision."""

import pytest

from tests.launch import hide_cuda_from_tests

# Before any test imports torch: the suite runs on the CPU backend, forced, not assumed
# (tests/launch.py; MEGATRON_EXACT_TEST_DEVICE=cuda gives the multi-process jobs the GPUs).
hide_cuda_from_tests()


@pytest.fixture(scope="module")
def single_process_group():
    """Megatron's parallel state for one process (TP=PP=CP=1), without a launcher."""
    import torch.distributed as dist

    from megatron_exact.platform.distributed import destroy_model_parallel, initialize_model_parallel

    started_here = not dist.is_initialized()
    initialize_model_parallel(1, 1, 1)
    yield
    if started_here:
        destroy_model_parallel()
