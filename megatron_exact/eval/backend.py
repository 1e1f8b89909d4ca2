"""Models to evaluate: HF checkpoint directories on transformers (or vLLM when installed and asked for).

Two operations, both batched:

- :meth:`HFModel.generate`: greedy decoding with the KV cache, prompts left-padded into one batch;
- :meth:`HFModel.score_candidates`: teacher-forced log-probabilities of candidate continuations:
  the prompt runs once, its KV cache is shared by all candidates, which run together in one
  batched forward over it. :class:`ForwardScorer` does the same from any ``tokens -> logits``
  function (the trainer's Megatron model), one full forward per candidate.

Both scorers return, per candidate, the sum of its tokens' log-probabilities.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from megatron_exact.errors import BadInputError
from megatron_exact.eval.codec import TokenizerCodec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "tokenizer_config.json")
LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_model_dir(model_dir: Union[str, Path], flag: str = "--model") -> Path:
    """The directory holds an HF config and tokenizer; errors say which is missing."""
    path = Path(model_dir)
    if not path.is_dir():
        raise BadInputError(f"{flag} {path}: not a directory (evaluation takes an HF checkpoint directory; "
                             "convert a Megatron checkpoint with tools/convert_checkpoint.py export-hf)")
    if not (path / "config.json").is_file():
        raise BadInputError(f"{flag} {path}: no config.json (not an HF checkpoint directory; "
                             "convert with tools/convert_checkpoint.py export-hf)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise BadInputError(f"{flag} {path}: no tokenizer ({', '.join(TOKENIZER_FILES)} all missing); "
                             "export with --tokenizer-dir or copy the tokenizer files into the directory")
    return path


def max_model_length(model_dir: Union[str, Path]) -> Optional[int]:
    """The longest context the checkpoint's config.json declares (None if it declares none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    for section in (config, config.get("text_config") or {}):
        for field in LENGTH_FIELDS:
            if isinstance(section.get(field), int):
                return section[field]
    return None


def check_lengths(model_dir: Union[str, Path], lengths: Sequence[int], allow_extrapolation: bool,
                  flag: str = "--lengths") -> None:
    limit = max_model_length(model_dir)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long and not allow_extrapolation:
        raise BadInputError(
            f"{flag} {' '.join(map(str, too_long))}: longer than the model's limit of {limit} tokens "
            f"(max_position_embeddings in {Path(model_dir) / 'config.json'}); pass --allow-extrapolation "
            "to evaluate beyond it")


def load_tokenizer(model_dir: Union[str, Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


class HFModel(TokenizerCodec):
    """An HF causal LM for evaluation (inference mode, eval(), one device)."""

    backend = "transformers"

    def __init__(self, model_dir: Union[str, Path], *, device: str = "cpu", dtype: str = "auto",
                 flag: str = "--model"):
        from transformers import AutoModelForCausalLM

        self.path = check_model_dir(model_dir, flag)
        self.tokenizer = load_tokenizer(self.path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch_dtype).to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_model_length(self.path)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = pad
        self.eos_ids = self._eos_ids()
        # transformers renamed the cache argument (past_key_values -> cache); use what this version takes.
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id if self.model.generation_config else None,
                       self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    # -- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of left-padded ``prompts`` (one batch), KV-cached; stops at EOS."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt):] = 1
        output = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None, use_cache=True,
        )
        continuations = []
        for row in output[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            continuations.append(row[:cut])
        return continuations

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- teacher-forced scoring ------------------------------------------------------------
    @torch.inference_mode()
    def score_candidates(self, prompt: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        """Sum of log p(candidate tokens | prompt) for each candidate: the prompt once, then all
        candidates in one batched forward over its (repeated) KV cache."""
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = [first[c[0]].item() for c in candidates]
        longest = max(len(c) for c in candidates)
        if longest == 1:
            return scores
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(candidates))
        rest = torch.full((len(candidates), longest - 1), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(candidates), len(prompt) + longest - 1), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for row, candidate in enumerate(candidates):
            rest[row, : len(candidate) - 1] = torch.tensor(candidate[:-1], dtype=torch.long)
            mask[row, len(prompt): len(prompt) + len(candidate) - 1] = 1
        logits = self.model(input_ids=rest.to(self.device), attention_mask=mask.to(self.device),
                            **{self._cache_argument: cache}, use_cache=True).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, candidate in enumerate(candidates):
            for position, token in enumerate(candidate[1:]):
                scores[row] += logprobs[row, position, token].item()
        return scores

    def logits(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """Logits at the ``last`` final positions of ``tokens`` ``[1, T]``, for :class:`ForwardScorer`."""
        with torch.inference_mode():
            return self.model(input_ids=tokens.to(self.device)).logits[:, -last:]


class ForwardScorer:
    """Teacher-forced candidate scoring from a ``logits_fn(tokens [1, T], last) -> logits [1, last, V]``
    function (the logits at the ``last`` final positions, over the real vocabulary): one forward of
    prompt + candidate per candidate. The trainer's ``--eval-probe`` scores its Megatron model
    through this; :class:`HFModel.score_candidates` gives the same numbers with the prompt run once."""

    def __init__(self, logits_fn: Callable[[torch.Tensor, int], torch.Tensor]):
        self.logits_fn = logits_fn

    def score_candidates(self, prompt: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        scores = []
        for candidate in candidates:
            # The logits at the prompt's last token and at every candidate token but the last
            # predict the candidate's tokens.
            tokens = torch.tensor([list(prompt) + list(candidate[:-1])], dtype=torch.long)
            logprobs = torch.log_softmax(self.logits_fn(tokens, len(candidate))[0].float(), dim=-1)
            scores.append(float(sum(logprobs[i, t].item() for i, t in enumerate(candidate))))
        return scores


def load_model(model_dir: Union[str, Path], *, backend: str = "transformers", device: str = "cpu",
               dtype: str = "auto", flag: str = "--model"):
    if backend == "transformers":
        return HFModel(model_dir, device=device, dtype=dtype, flag=flag)
    if backend == "vllm":
        from megatron_exact.eval.vllm_backend import VLLMModel

        return VLLMModel(model_dir, dtype=dtype, flag=flag)
    raise BadInputError(f"--backend {backend}: unknown (choose transformers or vllm)")
