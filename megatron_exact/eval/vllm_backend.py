"""vLLM generation for the RULER-style and NoLiMa-style suites (``--backend vllm``), when vLLM is installed.

Only greedy generation goes through vLLM; the distance probe's teacher-forced scoring stays on
transformers (``--backend transformers``), where the prompt's KV cache is shared by the candidates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

from megatron_exact.errors import BadInputError
from megatron_exact.eval.backend import check_model_dir, load_tokenizer, max_model_length
from megatron_exact.eval.codec import TokenizerCodec


class VLLMModel(TokenizerCodec):
    backend = "vllm"

    def __init__(self, model_dir: Union[str, Path], *, dtype: str = "auto", flag: str = "--model"):
        try:
            import vllm
        except ImportError:
            raise BadInputError("--backend vllm: vLLM is not installed (pip install vllm), "
                                 "or use --backend transformers") from None
        self.path = check_model_dir(model_dir, flag)
        self.tokenizer = load_tokenizer(self.path)
        self.max_length = max_model_length(self.path)
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(self.path), dtype=dtype, max_model_len=self.max_length)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        return [list(out.outputs[0].token_ids) for out in self.llm.generate(inputs, params, use_tqdm=False)]

    def score_prompts(self, items, done=None):
        raise BadInputError("the distance probe scores with transformers: pass --backend transformers")
