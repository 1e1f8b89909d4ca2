"""Evaluation of HF checkpoint directories: ``python -m megatron_exact.eval <suite> --model DIR ...``.

- :mod:`.spec`: task specifications (the language a probe is written in), shipped default in ``data/``;
- :mod:`.probe`: the distance-resolved evidence probe (teacher-forced, present vs ablated);
- :mod:`.backend`: loading checkpoints, batched KV-cached greedy generation, candidate scoring.
"""
