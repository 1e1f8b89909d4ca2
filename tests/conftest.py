"""Fixtures shared by test files in several directories."""

import pytest


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
