"""Session fixtures for the evaluation tests: tiny random HF models with a locally trained tokenizer."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.eval.tiny_eval_models import save_model  # noqa: E402


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """{"a": dir, "b": dir}: two tiny random models (different seeds) sharing one tokenizer."""
    root = tmp_path_factory.mktemp("eval_models")
    return {"a": save_model(root / "a", seed=0), "b": save_model(root / "b", seed=1)}


@pytest.fixture(scope="session")
def tokenizer(eval_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(eval_models["a"]))
