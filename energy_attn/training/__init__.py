"""Training harness: byte corpora, the GPT training loop, and the ``train``/``compare`` commands."""

from .corpus import Corpus, CorpusError, load_corpus
from .loop import TrainConfig, train

__all__ = ["Corpus", "CorpusError", "TrainConfig", "load_corpus", "train"]
