"""A small byte-level BPE tokenizer trained here on English-like text, and tiny random HF models using it.

Imported as ``tests.eval.tiny_eval_models``. Byte-level, so any text (digits, UUIDs, the
RULER-style templates) encodes; trained on words of the evaluation's own vocabulary so that
prompts take a realistic number of tokens per word. It prepends BOS like LLaMA's tokenizers.
"""

import random

from tests.convert.tiny_hf_models import build_hf_model, hf_config

VOCAB_SIZE = 2048
MAX_POSITIONS = 2048


def _training_text():
    from wonderwords import RandomWord

    from megatron_exact.eval.spec import default_spec

    spec = default_spec()
    words = RandomWord().filter(include_categories=["noun", "adjective", "verb"])
    rng = random.Random(0)
    lines = [" ".join(rng.sample(words, 12)) for _ in range(3000)]
    lines += list(spec.filler.sentences) + [spec.fact, spec.question, spec.preamble] + list(spec.keys)
    lines += [" ".join(str(rng.randint(0, 10**7)) for _ in range(10)) for _ in range(50)]
    lines += ["The special magic number for x is: 1234. What are all the special magic numbers? VAR ABCDE = 12345."]
    return lines


def save_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_training_text(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(directory))
    return fast


def save_model(directory, seed=0, max_positions=MAX_POSITIONS, **changes):
    """A tiny random Qwen2 (tied embeddings, GQA) over the tokenizer above, saved with it."""
    config = hf_config("qwen2-tied", vocab_size=VOCAB_SIZE, max_position_embeddings=max_positions,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, **changes)
    model = build_hf_model(config, seed=seed)
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory
