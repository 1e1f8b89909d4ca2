"""Data: tokenizers, JSONL -> Megatron indexed format, packed dataset with exact
document boundaries, effective-context statistics. See each module's docstring."""
