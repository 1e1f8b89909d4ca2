"""Evaluation throughput on CPU: batched vs one sample at a time.

A ~100M-parameter random Qwen2-style model (built here, saved as an HF directory with a byte-level
BPE tokenizer trained here; nothing downloaded):

1. the RULER-style suite (niah_single_1, niah_multikey_2, niah_multikey_3, vt, cwe, fwe) at
   ``--length`` tokens: batched KV-cached greedy generation (``--batch-size`` prompts together),
   without and with prefix reuse, vs one prompt at a time, each task with RULER's generation
   budget (a random model never stops early, so every sample generates its full budget). All
   modes run the same code (HFModel.generate: each prompt prefilled alone, the decode steps
   batched); the script also times the prefills alone on one prompt per task, which batching
   cannot speed up, and prints the speed-up batching could reach at most if its decode steps cost
   nothing, and how many prompt tokens prefix reuse left to run;
2. the distance probe's teacher-forced scoring of all candidates: the prompt once with the
   candidates batched over its KV cache (one long forward per prompt) vs one full forward per
   candidate (both without prefix reuse);
3. a whole distance sweep at one sample index (``default_distances(--length)``, evidence present
   and ablated): every prompt prefilled from its first token vs prefix reuse;
4. one ``--length``-token prefill from its first token vs the same prompt with a prefix of 1/64,
   1/4, 1/2 and 7/8 of it taken from a cache (what sets ``backend.REUSE_MIN_FRACTION``).

    python bench/eval_throughput.py [--length 4096] [--samples-per-task 6] [--batch-size 6] [--threads 2]
                                    [--skip-ruler]

Prints samples/s in wall time and in process CPU time (all threads; robust to other jobs on a
shared machine) and the speed-ups. Results are recorded in BENCHMARKS.md ("Evaluation throughput").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build_model(directory: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from wonderwords import RandomWord

    words = RandomWord().filter(include_categories=["noun", "adjective", "verb"])
    rng = random.Random(0)
    text = [" ".join(rng.sample(words, 16)) for _ in range(6000)]
    text += [" ".join(str(rng.randint(0, 10**7)) for _ in range(12)) for _ in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(directory))
    config = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=768, intermediate_size=2560,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                         max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    return sum(p.numel() for p in model.parameters())


def timed(function):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples-per-task", type=int, default=6,
                        help="samples per task: a batch holds samples of one task (one generation budget)")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--probe-samples", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed for both modes)")
    parser.add_argument("--skip-ruler", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as scratch:
        run(args, Path(scratch))


def run(args, directory: Path) -> None:
    from megatron_exact.eval import probe, ruler, suites
    from megatron_exact.eval.backend import ForwardScorer, HFModel
    from megatron_exact.eval.spec import default_spec

    parameters = build_model(directory, args.vocab_size)
    model = HFModel(directory)
    print(f"model: {parameters / 1e6:.1f}M parameters (vocab {model.tokenizer.vocab_size}), "
          f"torch threads {torch.get_num_threads()}, length {args.length}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    if not args.skip_ruler:
        samples = suites.ruler_samples(model, ruler.DEFAULT_TASKS, [args.length], num_samples=args.samples_per_task,
                                       seed=0, spec=None, haystack_text=None)
        new_tokens = sum(s.max_new_tokens for s in samples)
        prompt_tokens = sum(len(s.prompt_ids) for s in samples)
        print(f"ruler: {len(samples)} samples ({', '.join(ruler.DEFAULT_TASKS)}), "
              f"{prompt_tokens} prompt tokens, up to {new_tokens} generated", flush=True)
        rates, outputs = {}, {}
        for name, batch, reuse in (("one at a time", 1, False), (f"batched ({args.batch_size})", args.batch_size, False),
                                   (f"batched ({args.batch_size}), prefix reuse", args.batch_size, True)):
            model.prefix_reuse = reuse
            with count_prefill_tokens(model) as prefilled:
                records, wall, cpu = timed(lambda: suites.generate_and_score(model, samples, batch_size=batch))
            rates[name] = (len(samples) / wall, len(samples) / cpu)
            outputs[name] = [r["prediction"] for r in records]
            print(f"  {name:>28}: {wall:7.1f} s wall, {cpu:7.1f} s CPU -> {rates[name][0]:.3f} samples/s wall, "
                  f"{rates[name][1]:.3f} samples/s CPU; prefilled {sum(prefilled)} of {prompt_tokens} prompt tokens",
                  flush=True)
        single = rates["one at a time"]
        for name in list(rates)[1:]:
            same = sum(a == b for a, b in zip(outputs[name], outputs["one at a time"]))
            print(f"  speed-up {name} / one at a time: {rates[name][0] / single[0]:.2f}x wall, "
                  f"{rates[name][1] / single[1]:.2f}x CPU ({same}/{len(samples)} predictions identical)", flush=True)
        # The prefills (one forward of each prompt alone, as every mode runs them), timed on the first
        # sample of each task and scaled by prompt tokens to the whole suite: the part batching
        # cannot speed up.
        firsts = [next(s for s in samples if s.task == task) for task in ruler.DEFAULT_TASKS]
        with torch.inference_mode():
            _, wall, cpu = timed(lambda: [model.model(input_ids=torch.tensor([s.prompt_ids]), logits_to_keep=1)
                                          for s in firsts])
        scale = prompt_tokens / sum(len(s.prompt_ids) for s in firsts)
        single_wall, single_cpu = len(samples) / single[0], len(samples) / single[1]
        print(f"  prefills alone ({len(firsts)} prompts, scaled x{scale:.2f} to the suite): {wall * scale:.1f} s wall, "
              f"{cpu * scale:.1f} s CPU = {wall * scale / single_wall:.0%} wall, {cpu * scale / single_cpu:.0%} CPU "
              f"of one at a time; batching's ceiling (decode steps free, no prefix reuse): "
              f"{single_wall / (wall * scale):.2f}x wall, {single_cpu / (cpu * scale):.2f}x CPU", flush=True)

    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    spec = default_spec()
    model.prefix_reuse = False
    samples = probe.distance_sweep(spec, model, length=args.length, distances=[args.length // 4],
                                   num_samples=args.probe_samples)
    prompts = 2 * len(samples)  # evidence present and ablated
    print(f"probe: {prompts} prompts x {spec.num_candidates} candidates at {args.length} tokens", flush=True)
    compare_probe(samples, prompts, "one forward per candidate", ForwardScorer(model.logits),
                         "prompt once, candidates batched", model)

    distances = probe.default_distances(args.length)
    samples = probe.distance_sweep(spec, model, length=args.length, distances=distances, num_samples=1)
    distinct = {tuple(p) for s in samples for p in (s.present, s.ablated)}
    print(f"probe sweep at {args.length} tokens, distances {distances}, one index: {len(distinct)} distinct prompts",
          flush=True)
    reusing = HFModel(directory)
    with count_prefill_tokens(reusing) as prefilled:
        compare_probe(samples, 2 * len(samples), "every prompt from its first token", model, "prefix reuse", reusing)
    print(f"  prefix reuse prefilled {sum(prefilled)} tokens (distinct prompts hold {sum(map(len, distinct))})",
          flush=True)
    reuse_break_even(model, samples[0].ablated)


def reuse_break_even(model, prompt) -> None:
    """The prefill of ``prompt`` from its first token vs with its first P tokens' KV cache given."""
    from megatron_exact.eval.backend import _cache_of

    with torch.inference_mode():
        out, _, full = timed(lambda: model.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1))
        cache = getattr(out, model._cache_argument)
        print(f"prefill of {len(prompt)} tokens from its first token: {full:.1f} s CPU; with a cached prefix of", flush=True)
        for shared in (len(prompt) // 64, len(prompt) // 4, len(prompt) // 2, 7 * len(prompt) // 8):
            reused = _cache_of((k[:, :, :shared], v[:, :, :shared]) for k, v in model._layers(cache))
            _, _, cpu = timed(lambda: model.model(input_ids=torch.tensor([prompt[shared:]]), use_cache=True,
                                                  logits_to_keep=1, **{model._cache_argument: reused}))
            print(f"  {shared:6d} tokens ({shared / len(prompt):.3f} of it): {cpu:.1f} s CPU = {cpu / full:.2f}x", flush=True)


def compare_probe(samples, prompts, slow_name, slow_scorer, fast_name, fast_scorer):
    from megatron_exact.eval import probe

    rates = {}
    for name, scorer in ((slow_name, slow_scorer), (fast_name, fast_scorer)):
        records, wall, cpu = timed(lambda: probe.score_samples(scorer, samples))
        rates[name] = (prompts / wall, prompts / cpu, records)
        print(f"  {name:>33}: {wall:7.1f} s wall, {cpu:7.1f} s CPU -> {prompts / wall:.3f} prompts/s wall, "
              f"{prompts / cpu:.3f} prompts/s CPU", flush=True)
    slow, fast = rates[slow_name], rates[fast_name]
    difference = max(abs(a - b) for ra, rb in zip(slow[2], fast[2]) for v in ("present", "ablated")
                     for a, b in zip(ra[v]["logprobs"], rb[v]["logprobs"]))
    print(f"  speed-up: {fast[0] / slow[0]:.2f}x wall, {fast[1] / slow[1]:.2f}x CPU; "
          f"largest log-prob difference between the two {difference:.2e}", flush=True)


@contextlib.contextmanager
def count_prefill_tokens(model):
    """The prompt tokens each prefill forward runs (the forwards asking for the last logits only)."""
    counted = []

    def hook(module, args, kwargs):
        if kwargs.get("logits_to_keep") == 1:
            counted.append(kwargs["input_ids"].shape[1])

    handle = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counted
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
