"""Attention edits on the real model: the two primitives, both paths, prefill and decode."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttentionEdit, AttnlabError, FirstToken, LogitBias, MassTransfer, Positions

TEXT = "The harbour was quiet that morning. Two boats came in with fish, and the gulls followed them."


def patterns(probe, text=TEXT, backend="chunked", layers=(2, 20)):
    return probe.capture(text, stats=["pooled(1)"], layers=list(layers), backend=backend)["pooled"][0]


def test_logit_bias_multiplies_the_weight_and_renormalises(smollm2):
    # Edit layer 20 only: later layers would see a changed residual stream, earlier ones nothing.
    base = patterns(smollm2)
    with smollm2.intervene(AttentionEdit(FirstToken(), LogitBias(3.0), layers=[20], heads=[1, 5])):
        edited = patterns(smollm2)
    assert torch.equal(edited[0], base[0]), "layer 2 comes before the edit"
    a, e = base[1:, [1, 5]], edited[1:, [1, 5]]
    a0 = a[..., 0]
    torch.testing.assert_close(e[..., 0], 3 * a0 / (3 * a0 + 1 - a0), atol=1e-5, rtol=1e-4)
    rest = a[..., 1:] / (3 * a0 + 1 - a0)[..., None]
    torch.testing.assert_close(e[..., 1:], rest, atol=1e-5, rtol=1e-4)
    # heads that were not selected are untouched
    torch.testing.assert_close(edited[1:, [0, 2, 3]], base[1:, [0, 2, 3]], atol=1e-6, rtol=0)


def test_bias_zero_removes_the_keys(smollm2):
    tokens = smollm2.tokenize(TEXT)
    span = Positions.substring(tokens, 0, "Two boats")
    with smollm2.intervene(AttentionEdit(span, LogitBias(0.0))):
        edited = patterns(smollm2)
    cols = [p for p in span.positions]
    assert edited[..., cols].abs().max() == 0
    torch.testing.assert_close(edited.sum(-1), torch.ones(edited.shape[:-1]), atol=1e-5, rtol=0)


def test_mass_transfer_keeps_a_share_and_rows_sum_to_one(smollm2):
    base = patterns(smollm2, layers=(20,))
    with smollm2.intervene(AttentionEdit(FirstToken(), MassTransfer(0.4), layers=[20])):
        edited = patterns(smollm2, layers=(20,))
    rows = slice(1, None)  # the first query sees only the first token: nowhere to send mass
    torch.testing.assert_close(edited[..., rows, 0], 0.4 * base[..., rows, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited.sum(-1), torch.ones(edited.shape[:-1]), atol=1e-5, rtol=0)
    freed = 0.6 * base[..., rows, 0]
    gain = edited[..., rows, 1:].sum(-1) - base[..., rows, 1:].sum(-1)
    torch.testing.assert_close(gain, freed, atol=1e-5, rtol=1e-4)


def test_fast_and_hooked_paths_apply_the_same_edit(smollm2):
    edit = AttentionEdit(FirstToken(), MassTransfer(0.4), layers=range(2, 28))
    with smollm2.intervene(edit):
        chunked = patterns(smollm2, layers=(5, 20))
        eager = patterns(smollm2, backend="eager", layers=(5, 20))
    torch.testing.assert_close(eager, chunked, atol=2e-5, rtol=1e-4)


def test_edits_hold_at_decode_steps_with_left_padding(smollm2):
    edit = AttentionEdit(FirstToken(), LogitBias(2.0), layers=range(0, 15))
    prompts = ["The capital of France is", "A short one:"]
    with smollm2.intervene(edit):
        gen = smollm2.generate(prompts, max_new_tokens=4, stop_at_newline=False)
        # the last step's next-token choice equals a full forward of the same sequence, edited
        seq = torch.cat([gen.prompt.input_ids[0], torch.tensor(gen.new_ids[0][:-1])])
        mask = torch.cat([gen.prompt.attention_mask[0], torch.ones(len(gen.new_ids[0]) - 1, dtype=torch.bool)])
        full = smollm2.to_tokens(seq[mask][None], prepend_bos=False)
        logits = smollm2.forward(full).logits[0, -1]
    assert int(logits.argmax()) == gen.new_ids[0][-1]
    plain = smollm2.generate(prompts, max_new_tokens=4, stop_at_newline=False)
    assert plain.texts[0].startswith(" Paris")


def test_bad_edits_are_clear_errors(smollm2):
    tokens = smollm2.tokenize(TEXT)
    with pytest.raises(AttnlabError, match="not in the text"):
        Positions.substring(tokens, 0, "submarine")
    with pytest.raises(AttnlabError, match="not inside the text"):
        Positions.span(tokens, 0, 5, 10_000)
    with pytest.raises(AttnlabError, match="c >= 0"):
        LogitBias(-1.0)
    with pytest.raises(AttnlabError, match="0 <= keep <= 1"):
        MassTransfer(1.5)
    with pytest.raises(AttnlabError, match="edit layer 99"):
        with smollm2.intervene(AttentionEdit(FirstToken(), LogitBias(2.0), layers=[99])):
            pass


# ----- VAR's per-(head, query) gate, both paths, prefill and decode -----
from attnlab.probe import RowPositions, SpanGate  # noqa: E402
from attnlab.probe.edits import bridge_hooks  # noqa: E402
from attnlab.probe.generate import cache_argument, returned_cache  # noqa: E402

SPAN = "Two boats came in with fish"


def test_span_gate_moves_mass_only_in_the_rows_that_pass_the_rule(smollm2):
    tokens = smollm2.tokenize(TEXT)
    span = Positions.substring(tokens, 0, SPAN)
    gate = SpanGate(span, min_mass=0.05, max_share=0.5)  # a lower bar than VAR's 0.2: both kinds of rows occur
    edit = AttentionEdit(FirstToken(), MassTransfer(0.6, to=span), layers=[20], gate=gate)
    base = patterns(smollm2, layers=(20,))[0]  # [H, N, N]
    with smollm2.intervene(edit):
        edited = patterns(smollm2, layers=(20,))[0]
    R = list(span.positions)
    mass = base[..., R].sum(-1)  # [H, N]; BOS (the sink) is outside the span: its share is 0
    after = torch.arange(tokens.length) > max(R)
    rule = (mass >= 0.05) & after[None]
    assert rule.any() and (~rule[:, after]).any(), "the text has heads on both sides of the bar"
    assert torch.equal(edited[~rule], base[~rule]), "rows the gate closes are bit-identical"
    torch.testing.assert_close(edited[rule][:, 0], 0.6 * base[rule][:, 0], atol=1e-6, rtol=1e-5)
    freed = 0.4 * base[rule][:, 0]
    gain = edited[rule][:, R] - base[rule][:, R]
    torch.testing.assert_close(gain, freed[:, None] * base[rule][:, R] / mass[rule][:, None], atol=1e-6, rtol=1e-4)
    others = [i for i in range(1, tokens.length) if i not in R]
    assert torch.equal(edited[rule][:, others], base[rule][:, others]), "keys outside sink and span keep their weight"
    torch.testing.assert_close(edited.sum(-1), torch.ones(edited.shape[:-1]), atol=1e-5, rtol=0)


def edit_set(tokens):
    """ZeroTuning-, ACT- and VAR-shaped edits at once (composable), on a left-padded batch."""
    spans = [Positions.substring(tokens, b, "boats").positions for b in range(tokens.batch_size)]
    span = RowPositions(spans)
    return [
        AttentionEdit(FirstToken(), LogitBias(2.5), layers=range(0, 10), heads=[1, 5]),
        AttentionEdit(Positions([2]), MassTransfer(0.4), layers=range(10, 20)),
        AttentionEdit(FirstToken(), MassTransfer(0.6, to=span), layers=range(2, 29), gate=SpanGate(span, 0.02)),
    ]


BATCH = [TEXT, "Two boats came in with fish, and the gulls"]


def test_the_same_edits_give_the_same_logits_on_the_hooked_and_fast_paths(smollm2):
    tokens = smollm2.tokenize(BATCH)
    edits = edit_set(tokens)
    plain = smollm2.forward(tokens).logits
    with smollm2.intervene(*edits):
        fast = smollm2.forward(tokens).logits
    with torch.no_grad():
        hooked = smollm2.bridge.run_with_hooks(
            tokens.input_ids, attention_mask=tokens.attention_mask.long(), position_ids=tokens.position_ids(),
            fwd_hooks=bridge_hooks(smollm2, edits, tokens), return_type="logits")
    real = tokens.attention_mask
    torch.testing.assert_close(hooked[real].float(), fast[real].float(), atol=1e-4, rtol=1e-4)
    assert (fast[real] - plain[real]).abs().max() > 1e-2, "the edits change the logits"


def test_decode_steps_with_edits_match_the_edited_prefill(smollm2):
    tokens = smollm2.tokenize(BATCH)
    edits = edit_set(tokens)
    ids, mask, pos = tokens.input_ids, tokens.attention_mask.long(), tokens.position_ids()
    with smollm2.intervene(*edits), torch.no_grad():
        full = smollm2.forward(tokens).logits[:, -2:]
        cache_name = cache_argument(smollm2.model)
        past = returned_cache(smollm2.model(input_ids=ids[:, :-2], attention_mask=mask[:, :-2],
                                            position_ids=pos[:, :-2], use_cache=True))
        steps = []
        for t in (-2, -1):  # two one-token decode steps, the edits resolved at each
            end = mask.shape[1] + t + 1
            res = smollm2.model(input_ids=ids[:, end - 1:end], attention_mask=mask[:, :end],
                                position_ids=pos[:, end - 1:end], use_cache=True, **{cache_name: past})
            past = returned_cache(res)
            steps.append(res.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_bad_gates_are_clear_errors(smollm2):
    tokens = smollm2.tokenize(TEXT)
    span = Positions.substring(tokens, 0, SPAN)
    with pytest.raises(AttnlabError, match="min_mass"):
        SpanGate(span, min_mass=2.0)
    with pytest.raises(AttnlabError, match="gate must be a SpanGate"):
        AttentionEdit(FirstToken(), MassTransfer(0.6), gate=0.2)
