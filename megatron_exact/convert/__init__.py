"""HF <-> Megatron-Core checkpoint conversion on CPU (the dense families of ``model/families.py``).

- :mod:`.hf_mapping`: parameter names and fused layouts (QKV per query group, gate/up, padded vocabulary).
- :mod:`.importer`: ``import_hf`` (HF directory -> ``torch_dist`` checkpoint).
- :mod:`.exporter`: ``export_hf`` (``torch_dist`` checkpoint at any TP/PP -> HF directory).
- :mod:`.verify`: logits of both sides on the same random tokens.
- :mod:`.megatron_checkpoint`: building a model that matches a checkpoint and loading its weights.
"""
