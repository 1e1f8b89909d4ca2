"""Running a suite on one model: samples in, per-sample records out (predictions, scores, metadata)."""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_exact.eval import metrics, probe, ruler
from megatron_exact.eval.spec import ProbeSpec


def generate_and_score(model, samples: Sequence, *, batch_size: int, progress=None) -> list[dict]:
    """Greedy generation in batches of samples with the same generation budget, then scoring;
    records come back in the samples' order. Within a budget, samples are ordered by requested
    length (prompts of one length differ by at most a haystack unit: little padding), then by
    their tokens, so that prompts sharing a prefix share a batch (the model reuses it)."""
    order = sorted(range(len(samples)),
                   key=lambda i: (samples[i].max_new_tokens, samples[i].length, list(samples[i].prompt_ids)))
    predictions: dict = {}
    start = 0
    while start < len(order):
        budget = samples[order[start]].max_new_tokens
        batch = [order[start]]
        while (start + len(batch) < len(order) and len(batch) < batch_size
               and samples[order[start + len(batch)]].max_new_tokens == budget):
            batch.append(order[start + len(batch)])
        outputs = model.generate([samples[i].prompt_ids for i in batch], budget)
        for i, ids in zip(batch, outputs):
            predictions[i] = model.decode(ids)
        if progress is not None:
            progress(len(batch))
        start += len(batch)
    records = []
    for i, sample in enumerate(samples):
        prediction = predictions[i]
        records.append(sample_record(sample, prediction))
    return records


def sample_record(sample, prediction: str) -> dict:
    return {
        "task": sample.task, "length": sample.length, "index": sample.index, "metric": sample.metric,
        "references": sample.references, "prediction": prediction,
        "score": metrics.score(sample.metric, prediction, sample.references),
        "prompt_tokens": len(sample.prompt_ids), "max_new_tokens": sample.max_new_tokens,
        "metadata": sample.metadata,
    }


def ruler_samples(model, tasks: Sequence[str], lengths: Sequence[int], *, num_samples: int, seed: int,
                  spec: Optional[ProbeSpec], haystack_text: Optional[str],
                  max_new_tokens: Optional[int] = None) -> list:
    return [s for task in tasks for length in lengths
            for s in ruler.generate_samples(task, model, length=length, num_samples=num_samples, seed=seed,
                                            spec=spec, haystack_text=haystack_text, max_new_tokens=max_new_tokens)]


def probe_samples(model, spec: ProbeSpec, *, length: int, distances: Sequence[int], mirror_distance: Optional[int],
                  mirror_lengths: Sequence[int], num_samples: int, seed: int) -> list:
    samples = probe.distance_sweep(spec, model, length=length, distances=distances, num_samples=num_samples,
                                   seed=seed)
    if mirror_distance is not None:
        samples += probe.length_sweep(spec, model, distance=mirror_distance, lengths=mirror_lengths,
                                      num_samples=num_samples, seed=seed)
    return samples
