"""SAE circuit discovery: scores on hand-computed cases, patching, the planted induction circuit found
by both methods, and the published GPT-2 circuit plumbing (exact head outputs: tests/probe/test_head_outputs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.analyses import sae_circuits as S
from attnlab.analyses import toy_circuits as T
from attnlab.probe import AttnlabError
from attnlab.probe.tasks import circuits as C

# ----- node and edge scores (METHODS.md section 5), by hand -----
CODES = np.array([[1, 5, 4], [2, 5, 4], [9, 6, 4], [1, 6, 4], [3, 7, 4]])
POSITIVE = np.array([True, True, True, False, False])


def test_node_score_counts_codes_seen_on_positives_and_never_on_negatives():
    # head 0: {1, 2, 9} - {1, 3} = {2, 9}; head 1: {5, 6} - {6, 7} = {5}; head 2: {4} - {4} = {}
    assert S.node_scores(CODES, POSITIVE).tolist() == [2, 1, 0]


def test_edge_score_counts_code_pairs_unique_to_positives():
    # (0,1): {(1,5),(2,5),(9,6)} - {(1,6),(3,7)} -> 3; (0,2): {(2,4),(9,4)} -> 2; (1,2): {(5,4)} -> 1
    assert S.edge_scores(CODES, POSITIVE).tolist() == [[0, 3, 2], [3, 0, 1], [2, 1, 0]]


def test_edges_see_combinations_that_nodes_cannot():
    codes = np.array([[1, 1], [2, 2], [2, 1], [1, 2]])
    positive = np.array([True, True, False, False])
    assert S.node_scores(codes, positive).tolist() == [0, 0]
    assert S.edge_scores(codes, positive)[0, 1] == 2


def test_scores_need_both_labels_and_matching_shapes():
    with pytest.raises(AttnlabError, match="positive and negative"):
        S.node_scores(CODES, np.ones(5, bool))
    with pytest.raises(AttnlabError, match="examples, heads"):
        S.edge_scores(CODES, POSITIVE[:3])


# ----- ROC and precision/recall on constructed rankings -----
def test_roc_auc_hand_values_and_ties():
    truth = np.array([True, False, True, False])
    assert S.roc_auc([3, 2, 1, 0], truth) == 0.75  # 3 of 4 (in, out) pairs ordered right
    assert S.roc_auc([3, 1, 2, 0], truth) == 1.0
    assert S.roc_auc([0, 1, 0, 1], truth) == 0.0
    assert S.roc_auc([1, 1, 0], [True, False, False]) == 0.75  # a tie counts half
    with pytest.raises(AttnlabError, match="one head in and one out"):
        S.roc_auc([1, 2], [True, True])


def test_roc_curve_steps_through_every_threshold():
    fpr, tpr = S.roc_curve([3, 2, 1, 0], [True, False, True, False])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]


def test_precision_recall_at_k_is_the_expectation_over_ties_at_the_cut():
    # top 2 of [5, 3, 3, 3, 1]: the 5 (a hit) and one of three tied 3s (one of them a hit)
    p, r = S.precision_recall_at_k([5, 3, 3, 3, 1], [True, True, False, False, True], 2)
    assert p == pytest.approx((1 + 1 / 3) / 2) and r == pytest.approx((1 + 1 / 3) / 3)
    assert S.precision_recall_at_k([4, 3, 2, 1], [True, True, False, False], 2) == (1.0, 1.0)
    with pytest.raises(AttnlabError, match="k must be"):
        S.precision_recall_at_k([1, 2], [True, False], 3)


# ----- the SAE -----
def test_sae_training_lowers_the_loss_and_keeps_decoder_atoms_unit_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) * 3 + torch.randn(16, generator=g)
    sae = S.DiscreteSAE(16, 32, torch.Generator().manual_seed(1))
    losses = sae.fit(x, lam=0.02, epochs=200)
    assert losses[-1] < 0.5 * losses[0]
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(32))
    codes = sae.codes(x.view(8, 8, 16))
    assert codes.shape == (8, 8) and codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < 32
    again = S.DiscreteSAE(16, 32, torch.Generator().manual_seed(1))
    again.fit(x, lam=0.02, epochs=200)
    assert torch.equal(again.codes(x), sae.codes(x)), "seeded: the same codes"


# ----- activation patching -----
def test_patching_a_negative_identical_to_the_positive_changes_nothing(tiny_models):
    probe = tiny_models("tiny-llama")
    pairs = C.candidates(probe.tokenizer, "induction", 6, vocab=list(range(97, 123)), length=5)
    same = C.CircuitTask("induction", [C.CircuitPair(p.positive, p.positive, p.correct, p.wrong) for p in pairs], 6, 6)
    res = S.activation_patching(probe, same, batch_size=4, progress=False)
    assert (res.tables["heads"]["effect"] == 0).all()
    moved = S.activation_patching(probe, C.CircuitTask("induction", pairs, 6, 6), batch_size=4, progress=False)
    assert (moved.tables["heads"]["effect"] != 0).any()
    assert len(moved.tables["heads"]) == probe.info.n_layers * probe.info.n_heads


def test_evaluate_checks_its_reference_and_training_size(tiny_models):
    probe = tiny_models("tiny-llama")
    task = C.make_task(probe, "induction", n=6, solved_only=False, vocab=list(range(97, 123)), length=5)
    with pytest.raises(AttnlabError, match="outside"):
        S.evaluate(probe, task, reference=[(5, 0)], patching=False, seeds=1, epochs=2, progress=False)
    with pytest.raises(AttnlabError, match="n_train"):
        S.sae_scores(probe, task, n_train=100, seeds=1, progress=False)
    with pytest.raises(AttnlabError, match="patching baseline is the reference"):
        S.evaluate(probe, task, patching=False, progress=False)


def test_evaluate_saves_as_a_run_and_draws_its_figures(tiny_models, tmp_path):
    from attnlab.analyses.result import Result
    from attnlab.probe import RunStore

    probe = tiny_models("tiny-llama")
    task = C.make_task(probe, "induction", n=6, solved_only=False, vocab=list(range(97, 123)), length=5)
    res = S.evaluate(probe, task, reference=[(0, 1), (1, 2)], reference_edges=[((0, 1), (1, 2))], seeds=2,
                     epochs=5, pooling="both", progress=False)
    heads = res.tables["heads"]
    assert heads["reference"].sum() == 2 and {"sae_node", "sae_edge", "patching_effect"} <= set(heads)
    assert set(res.tables["seeds"].seed) == {0, 1} and "edge_pair_auc" in res.tables["seeds"]
    back = Result.load(RunStore(tmp_path).load(res.save(RunStore(tmp_path), probe)))
    assert back.tables["heads"][["layer", "head", "reference"]].equals(heads[["layer", "head", "reference"]])
    assert back.params["reference_heads"] == [[0, 1], [1, 2]] and back.tensors["node"].shape == (2, 2, 4)
    heat = res.figures["heatmaps"]
    assert [t.type for t in heat.data].count("heatmap") == 2, "SAE and patching side by side"
    roc = res.figures["roc"]
    assert {t.name for t in roc.data} == {"SAE node", "SAE edge", "patching", "chance"}
    graph = res.figures["circuit"]
    assert len(graph.data) == min(30, len(res.tables["edges"])) + 1  # one line per edge, then the heads


# ----- the planted induction circuit -----
@pytest.fixture(scope="module")
def planted():
    return T.train_planted(T.PlantedConfig(), T.TrainConfig(), progress=False)


@pytest.mark.slow
def test_planted_heads_take_the_roles_they_were_built_for(planted):
    roles = planted.roles.set_index(["layer", "head"])
    assert roles.prev_token.idxmax() == planted.config.prev_token_head and roles.prev_token.max() > 0.9
    assert roles.induction.idxmax() == planted.config.induction_head and roles.induction.max() > 0.8
    assert roles.bos_no_match[planted.config.induction_head] > 0.5, "where nothing matches it parks on BOS"
    assert planted.history.induction_loss.iloc[-3:].mean() < 1.0, "the model does induction"


@pytest.mark.slow
def test_the_induction_head_is_a_no_op_where_nothing_matches(planted):
    """At the last token a positive's induction head copies the answer; a negative's has nothing to copy."""
    task = T.induction_task(planted, n=32)
    k = planted.config.induction_head[0] * planted.config.n_heads + planted.config.induction_head[1]
    copy = planted.probe.head_outputs([p.positive for p in task.pairs], "last")[:, k].norm(dim=-1).mean()
    idle = planted.probe.head_outputs([p.negative for p in task.pairs], "last")[:, k].norm(dim=-1).mean()
    assert idle < 0.4 * copy, (float(idle), float(copy))  # measured 0.22 vs 1.05 (seed 0); 27 vs 10 without
    # the no-op cost, when it wrote a large constant from BOS


@pytest.mark.slow
def test_the_papers_mean_pooling_and_patching_rank_the_planted_circuit_first(planted):
    res = T.evaluate_planted(planted, n=64, seeds=5, pooling="mean", progress=False)
    scores = res.tables["scores"].set_index(["method", "metric"])["mean"]
    assert scores["sae", "node_auc"] >= 0.95, res.summary  # measured 1.000 +/- 0.000 (seed 0)
    assert scores["sae", "edge_auc"] >= 0.85, res.summary  # measured 1.000 +/- 0.000
    assert scores["patching", "auc"] >= 0.95 and scores["patching", "recall_at_k"] == 1.0
    assert 0 <= scores["sae", "edge_pair_auc"] <= 1  # the planted edge among all pairs: reported, ~1.0
    assert set(res.figures) == {"heatmaps", "roc", "circuit"}


# ----- the published GPT-2 circuits -----
def test_published_lists_have_the_typos_corrected():
    ioi = S.published_circuit("ioi")
    assert len(ioi) == 26 and len(set(ioi)) == 26 and (9, 0) in ioi and (11, 3) not in ioi
    assert sorted(S.published_circuit("greater_than")) == [(0, 1), (0, 3), (0, 5), (5, 5), (6, 1), (6, 9),
                                                           (7, 10), (8, 11), (9, 1)]
    doc = S.published_circuit("docstring")
    assert (1, 2) in doc and (1, 0) not in doc
    with pytest.raises(AttnlabError, match="no published circuit"):
        S.published_circuit("sorting")


def _word_tokenizer():
    """A GPT-2-like tokenizer (byte-level pre-tokenisation, one token per word) covering the IOI task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = set()
    fill = {"A": "Mary", "B": "John", "C": "Anne", "PLACE": "store", "OBJECT": "ring"}
    for t in C.IOI_TEMPLATES:
        words.update(w for w, _ in pre.pre_tokenize_str(t.format(**fill)))
    for w in list(C.NAMES) + list(C.PLACES) + list(C.OBJECTS):
        words.add("Ġ" + w)
    vocab = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_one_call_scores_a_gpt2_shaped_folder_against_the_published_ioi_circuit(tmp_path, tiny_models):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _word_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=48, n_layer=12, n_head=12, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    res = S.evaluate_gpt2(tmp_path, "ioi", n=8, seeds=2, epochs=20, solved_only=False, device="cpu", progress=False)
    assert res.params["reference"] == "given" and len(res.params["reference_heads"]) == 26
    assert res.tables["heads"]["reference"].sum() == 26 and len(res.tables["heads"]) == 144
    scores = res.tables["scores"].set_index(["method", "metric"])["mean"]
    assert 0 <= scores["sae", "node_auc"] <= 1 and 0 <= scores["sae", "edge_auc"] <= 1
    with pytest.raises(AttnlabError, match="GPT-2 small"):
        S.evaluate_gpt2(tiny_models("tiny-gpt2").folder, "ioi", n=2, progress=False)
