"""Models to evaluate: HF checkpoint directories on transformers (or vLLM when installed and asked for).

Two operations, both batched:

- :meth:`HFModel.generate`: greedy decoding with the KV cache: each prompt prefilled alone, the decode
  steps batched over the left-padded caches, finished rows leaving the batch;
- :meth:`HFModel.score_prompts`: teacher-forced log-probabilities of candidate continuations:
  each prompt runs once, its KV cache is shared by all its candidates, which run together in one
  batched forward over it. :class:`ForwardScorer` does the same from any ``tokens -> logits``
  function (the trainer's Megatron model), one full forward per candidate.

Both scorers return, per candidate, the sum of its tokens' log-probabilities.

Prefix reuse: the prompts of one call are prefilled in lexicographic token order, and each reuses
the KV cache of the one before for the tokens the two share from the start, so only the rest runs
(a cache entry depends on the tokens before it only). A probe sweep's prompts are one filler with
the fact moved, so at one sample index they share all but the fact-to-question stretch; RULER's
noise-haystack prompts share the haystack up to the needle. A prefix is reused only when it is at
least :data:`REUSE_MIN_FRACTION` of the prompt: the rest then runs against the cache through the
masked attention kernel instead of the causal one, which costs more than the tokens saved when
the prefix is short (``bench/eval_throughput.py`` measures it). Both modes give the same numbers
up to floating-point rounding (``prefix_reuse=False`` prefills every prompt from its first token).
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
# The shortest shared prefix, as a fraction of the prompt, whose KV cache a prefill reuses. On CPU
# (a 4071-token prompt, 96M model; two runs), a cached prefix of 1/64 of the prompt made its
# prefill 1.55x / 1.24x the cost of running it from the first token, 1/4 1.09x / 0.91x, 1/2
# 0.77x / 0.68x, 7/8 0.21x / 0.15x: the rest runs through the masked kernel (no causal shortcut)
# over every cached key (BENCHMARKS.md, "Prefix reuse").
REUSE_MIN_FRACTION = 0.5


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


class CandidateScorer:
    """What the probe scores with: :meth:`score_prompts` over many prompts at once (the order is the
    scorer's), :meth:`score_candidates` for one."""

    def score_prompts(self, items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                      done: Optional[Callable[[int], None]] = None) -> list[list[float]]:
        """For each ``(prompt, candidates)``, the candidates' log-probabilities given the prompt;
        ``done(i)`` is called when item ``i`` is scored."""
        raise NotImplementedError

    def score_candidates(self, prompt: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        return self.score_prompts([(prompt, candidates)])[0]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class HFModel(TokenizerCodec, CandidateScorer):
    """An HF causal LM for evaluation (inference mode, eval(), one device)."""

    backend = "transformers"

    def __init__(self, model_dir: Union[str, Path], *, device: str = "cpu", dtype: str = "auto",
                 flag: str = "--model", prefix_reuse: bool = True):
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
        self.prefix_reuse = prefix_reuse

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id if self.model.generation_config else None,
                       self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    # -- prefill -------------------------------------------------------------------------
    def _prefill(self, prompt: Sequence[int], previous=None):
        """One prompt's forward alone: (logits at its last position, its KV cache).

        ``previous`` is ``(tokens, cache)`` of a prompt prefilled before: the positions the two share
        from the start are taken from its cache (views; it is not modified) and only the rest runs.
        At least the last token always runs, for its logits."""
        shared, arguments = 0, {}
        if previous is not None and self.prefix_reuse:
            tokens, cache = previous
            shared = min(common_prefix_length(tokens, prompt), len(prompt) - 1)
            layers = self._layers(cache)
            if shared < REUSE_MIN_FRACTION * len(prompt) or any(k.shape[2] != len(tokens) for k, _ in layers):
                shared = 0  # too short to pay, or not a full cache (a sliding-window layer)
            if shared:
                arguments[self._cache_argument] = _cache_of((k[:, :, :shared], v[:, :, :shared]) for k, v in layers)
        ids = torch.tensor([list(prompt[shared:])], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **arguments)
        return out.logits[0, -1], getattr(out, self._cache_argument)

    def _layers(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``cache``'s keys and values ``[batch, heads, T, dim]``, layer by layer."""
        return [_layer_states(cache, layer) for layer in range(self.model.config.get_text_config().num_hidden_layers)]

    # -- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of ``prompts``, KV-cached; each row stops at EOS.

        Each prompt's prefill runs alone (no padding rows, no mask: the causal kernel; in
        lexicographic order, reusing the prefix it shares with the one before); the caches are then
        left-padded into one batch and the decode steps run batched, a row leaving the batch when it
        reaches EOS. One prompt goes through the same code with a batch of one."""
        width = max(len(p) for p in prompts)
        rows = len(prompts)
        caches: list = [None] * rows
        tokens: list = [None] * rows
        previous = None
        for row in _prefill_order(prompts):
            logits, caches[row] = self._prefill(prompts[row], previous)
            tokens[row] = int(logits.argmax())
            previous = (prompts[row], caches[row])
        del previous
        per_prompt = [self._layers(c) for c in caches]
        cache = _cache_of((torch.cat([_left_pad(layers[layer][0], width) for layers in per_prompt]),
                           torch.cat([_left_pad(layers[layer][1], width) for layers in per_prompt]))
                          for layer in range(len(per_prompt[0])))
        del caches, per_prompt
        mask = torch.zeros((rows, width + max_new_tokens), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            mask[row, width - len(prompt): width] = 1
        positions = torch.tensor([[len(p)] for p in prompts], dtype=torch.long, device=self.device)
        continuations: list[list[int]] = [[] for _ in prompts]
        active = list(range(rows))  # original row of each batch row
        last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        for step in range(max_new_tokens):
            keep = []
            for index, row in enumerate(active):
                token = int(last[index])
                if token in self.eos_ids:
                    continue
                continuations[row].append(token)
                keep.append(index)
            if step == max_new_tokens - 1 or not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch
                select = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(select)
                mask, positions, last = mask[select], positions[select], last[select]
                active = [active[i] for i in keep]
            mask[:, width + step] = 1
            out = self.model(input_ids=last[:, None], attention_mask=mask[:, : width + step + 1],
                             position_ids=positions, **{self._cache_argument: cache}, use_cache=True)
            last = out.logits[:, -1].argmax(-1)
            positions = positions + 1
        return continuations

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- teacher-forced scoring ------------------------------------------------------------
    @torch.inference_mode()
    def score_prompts(self, items, done=None):
        """Each prompt once (in lexicographic order, reusing the prefix shared with the one before),
        then all its candidates in one batched forward over its (repeated) KV cache."""
        scores: list = [None] * len(items)
        previous = None
        for i in _prefill_order([prompt for prompt, _ in items]):
            prompt, candidates = items[i]
            logits, cache = self._prefill(prompt, previous)
            scores[i] = self._candidate_scores(logits, cache, len(prompt), candidates)
            previous = (prompt, cache)
            if done is not None:
                done(i)
        return scores

    def _candidate_scores(self, logits: torch.Tensor, prompt_cache, prompt_length: int,
                          candidates: Sequence[Sequence[int]]) -> list[float]:
        first = torch.log_softmax(logits.float(), dim=-1)  # predicts every candidate's first token
        scores = [first[c[0]].item() for c in candidates]
        longest = max(len(c) for c in candidates)
        if longest == 1:
            return scores
        # The prompt's cache repeated per candidate (the prompt's own is kept for the next prefill).
        cache = _cache_of((k.repeat_interleave(len(candidates), dim=0), v.repeat_interleave(len(candidates), dim=0))
                          for k, v in self._layers(prompt_cache))
        rest = torch.full((len(candidates), longest - 1), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(candidates), prompt_length + longest - 1), dtype=torch.long)
        mask[:, :prompt_length] = 1
        for row, candidate in enumerate(candidates):
            rest[row, : len(candidate) - 1] = torch.tensor(candidate[:-1], dtype=torch.long)
            mask[row, prompt_length: prompt_length + len(candidate) - 1] = 1
        out = self.model(input_ids=rest.to(self.device), attention_mask=mask.to(self.device),
                         **{self._cache_argument: cache}, use_cache=True)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        for row, candidate in enumerate(candidates):
            for position, token in enumerate(candidate[1:]):
                scores[row] += logprobs[row, position, token].item()
        return scores

    def logits(self, tokens: torch.Tensor, last: int) -> torch.Tensor:
        """Logits at the ``last`` final positions of ``tokens`` ``[1, T]``, for :class:`ForwardScorer`."""
        with torch.inference_mode():
            return self.model(input_ids=tokens.to(self.device), logits_to_keep=last).logits


def _layer_states(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's cached keys and values ``[1, heads, T, dim]`` (transformers >= 4.56 keeps them in
    ``cache.layers``, older versions in ``key_cache`` / ``value_cache``)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _cache_of(layers):
    """A transformers ``DynamicCache`` holding ``layers`` (keys, values per layer) as given, no copy."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer)
    return cache


def _prefill_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Prompt indices in lexicographic token order: each prompt follows the one it shares the longest
    prefix with, which its prefill reuses."""
    return sorted(range(len(prompts)), key=lambda i: list(prompts[i]))


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(states, (0, 0, width - states.shape[2], 0))


class ForwardScorer(CandidateScorer):
    """Teacher-forced candidate scoring from a ``logits_fn(tokens [1, T], last) -> logits [1, last, V]``
    function (the logits at the ``last`` final positions, over the real vocabulary): one forward of
    prompt + candidate per candidate. The trainer's ``--eval-probe`` scores its Megatron model
    through this; :meth:`HFModel.score_prompts` gives the same numbers with each prompt run once."""

    def __init__(self, logits_fn: Callable[[torch.Tensor, int], torch.Tensor]):
        self.logits_fn = logits_fn

    def score_prompts(self, items, done=None):
        scores = []
        for i, (prompt, candidates) in enumerate(items):
            scores.append(self._score(prompt, candidates))
            if done is not None:
                done(i)
        return scores

    def _score(self, prompt: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
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
