"""megatron_exact: effective-context-weighted continued pretraining on Megatron-Core.

Pipeline: data (preprocessing, packed dataset) -> exact (bucket math) ->
model (presets, packed attention) -> training -> convert -> eval.
"""

__version__ = "0.1.0"
