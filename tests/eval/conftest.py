"""Session fixtures for the evaluation tests: tiny random HF models with a locally trained tokenizer."""

import pytest

from tests.eval.tiny_eval_models import save_model


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """{"a": dir, "b": dir}: two tiny random models (different seeds) sharing one tokenizer."""
    root = tmp_path_factory.mktemp("eval_models")
    return {"a": save_model(root / "a", seed=0), "b": save_model(root / "b", seed=1)}


@pytest.fixture(scope="session")
def tokenizer(eval_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(eval_models["a"]))
