"""Evaluation throughput on CPU: batched vs one sample at a time.

A ~100M-parameter random Qwen2-style model (built here, saved as an HF directory with a byte-level
BPE tokenizer trained here; nothing downloaded):

1. the RULER-style suite (niah_single_1, niah_multikey_2, niah_multikey_3, vt, cwe, fwe) at
   ``--length`` tokens: batched KV-cached greedy generation (``--batch-size`` prompts together)
   vs one prompt at a time, each task with RULER's generation budget (a random model never stops
   early, so every sample generates its full budget). Both modes run the same code
   (HFModel.generate: each prompt prefilled alone, the decode steps batched); the script also
   times the prefills alone on one prompt per task, which batching cannot speed up, and prints the
   speed-up batching could reach at most if its decode steps cost nothing;
2. the distance probe's teacher-forced scoring of all candidates: the prompt once with the
   candidates batched over its KV cache (one long forward per prompt) vs one full forward per
   candidate.

    python bench/eval_throughput.py [--length 4096] [--samples-per-task 6] [--batch-size 6] [--threads 2]

Prints samples/s in wall time and in process CPU time (all threads; robust to other jobs on a
shared machine) and the speed-ups. Results are recorded in BENCHMARKS.md ("Evaluation throughput").
"""

from __future__ import annotations

import argparse
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
    from megatron_exact.eval import probe, ruler, suites
    from megatron_exact.eval.backend import ForwardScorer, HFModel
    from megatron_exact.eval.spec import default_spec

    directory = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    parameters = build_model(directory, args.vocab_size)
    model = HFModel(directory)
    print(f"model: {parameters / 1e6:.1f}M parameters (vocab {model.tokenizer.vocab_size}), "
          f"torch threads {torch.get_num_threads()}, length {args.length}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    if not args.skip_ruler:
        samples = suites.ruler_samples(model, ruler.DEFAULT_TASKS, [args.length], num_samples=args.samples_per_task,
                                       seed=0, spec=None, haystack_text=None)
        new_tokens = sum(s.max_new_tokens for s in samples)
        print(f"ruler: {len(samples)} samples ({', '.join(ruler.DEFAULT_TASKS)}), "
              f"{sum(len(s.prompt_ids) for s in samples)} prompt tokens, up to {new_tokens} generated", flush=True)
        rates = {}
        for name, batch in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
            records, wall, cpu = timed(lambda: suites.generate_and_score(model, samples, batch_size=batch))
            rates[batch] = (len(samples) / wall, len(samples) / cpu)
            print(f"  {name:>14}: {wall:7.1f} s wall, {cpu:7.1f} s CPU -> {rates[batch][0]:.3f} samples/s wall, "
                  f"{rates[batch][1]:.3f} samples/s CPU", flush=True)
        print(f"  speed-up batched / one at a time: {rates[args.batch_size][0] / rates[1][0]:.2f}x wall, "
              f"{rates[args.batch_size][1] / rates[1][1]:.2f}x CPU", flush=True)
        # The prefills (one forward of each prompt alone, as both modes run them), timed on the first
        # sample of each task and scaled by prompt tokens to the whole suite: the part batching
        # cannot speed up.
        firsts = [next(s for s in samples if s.task == task) for task in ruler.DEFAULT_TASKS]
        with torch.inference_mode():
            _, wall, cpu = timed(lambda: [model.model(input_ids=torch.tensor([s.prompt_ids]), logits_to_keep=1)
                                          for s in firsts])
        scale = sum(len(s.prompt_ids) for s in samples) / sum(len(s.prompt_ids) for s in firsts)
        single_wall, single_cpu = len(samples) / rates[1][0], len(samples) / rates[1][1]
        print(f"  prefills alone ({len(firsts)} prompts, scaled x{scale:.2f} to the suite): {wall * scale:.1f} s wall, "
              f"{cpu * scale:.1f} s CPU = {wall * scale / single_wall:.0%} wall, {cpu * scale / single_cpu:.0%} CPU "
              f"of one at a time; batching's ceiling (decode steps free): {single_wall / (wall * scale):.2f}x wall, "
              f"{single_cpu / (cpu * scale):.2f}x CPU", flush=True)

    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    spec = default_spec()
    samples = probe.distance_sweep(spec, model, length=args.length, distances=[args.length // 4],
                                   num_samples=args.probe_samples)
    prompts = 2 * len(samples)  # evidence present and ablated
    print(f"probe: {prompts} prompts x {spec.num_candidates} candidates at {args.length} tokens", flush=True)
    rates = {}
    for name, scorer in (("one forward per candidate", ForwardScorer(model.logits)),
                         ("prompt once, candidates batched", model)):
        records, wall, cpu = timed(lambda: probe.score_samples(scorer, samples))
        rates[name] = (prompts / wall, prompts / cpu, records)
        print(f"  {name:>31}: {wall:7.1f} s wall, {cpu:7.1f} s CPU -> {prompts / wall:.3f} prompts/s wall, "
              f"{prompts / cpu:.3f} prompts/s CPU", flush=True)
    slow, fast = rates["one forward per candidate"], rates["prompt once, candidates batched"]
    difference = max(abs(a - b) for ra, rb in zip(slow[2], fast[2]) for v in ("present", "ablated")
                     for a, b in zip(ra[v]["logprobs"], rb[v]["logprobs"]))
    print(f"  speed-up: {fast[0] / slow[0]:.2f}x wall, {fast[1] / slow[1]:.2f}x CPU; "
          f"largest log-prob difference between the two {difference:.2e}", flush=True)


if __name__ == "__main__":
    main()
