"""Synthetic long-range corpora for CPU-sized studies (the language, and building a corpus from it)."""

from megatron_exact.synthetic.corpus import SyntheticCorpus, build_corpus, probe_spec
from megatron_exact.synthetic.language import LanguageConfig, SyntheticLanguage

__all__ = ["LanguageConfig", "SyntheticLanguage", "SyntheticCorpus", "build_corpus", "probe_spec"]
