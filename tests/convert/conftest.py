"""Session fixtures for the conversion tests: tiny HF models saved to disk and their TP=1 imports."""

import pytest

from tests.convert.tiny_hf_models import MODELS, build_hf_model, hf_config, save_tokenizer


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> directory of a saved tiny HF model (with tokenizer files)."""
    root = tmp_path_factory.mktemp("hf_models")
    dirs = {}
    for name, (_, _, dtype, shard) in MODELS.items():
        model = build_hf_model(hf_config(name)).to(dtype)
        out = root / name
        model.save_pretrained(str(out), **({"max_shard_size": shard} if shard else {}))
        save_tokenizer(out)
        dirs[name] = out
    return dirs


@pytest.fixture(scope="session")
def imported(hf_models, tmp_path_factory):
    """name -> TP=1 checkpoint directory imported from ``hf_models[name]``."""
    from megatron_exact.convert.importer import import_hf

    root = tmp_path_factory.mktemp("imported")
    return {name: import_hf(path, root / name).parent for name, path in hf_models.items()}


@pytest.fixture(scope="module", autouse=True)
def _parallel_state(single_process_group):
    """Megatron's one-process parallel state for every conversion test module, set up by the module
    itself: the in-process trainer tests (test_checkpoint_faults.py) tear it down when they finish."""
