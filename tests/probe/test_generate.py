"""Greedy decoding with per-step capture."""

from __future__ import annotations

import torch


def test_greedy_generation_is_the_models_argmax(smollm2):
    gen = smollm2.generate("The capital of France is", max_new_tokens=3)
    assert gen.texts[0].startswith(" Paris")


def test_step_top_keys_equal_a_full_capture_of_the_same_sequence(smollm2):
    prompts = ["The capital of France is", "Once upon a time, there was a"]  # left-padded batch
    gen = smollm2.generate(prompts, max_new_tokens=6, step_stats=["top_key", "rows(-1)"], layers=[0, 17, 29],
                           stop_at_newline=False)
    assert len(gen.steps) == 6 and gen.steps[0]["top_key"].shape == (2, 3, 9, 1)
    for b in range(2):
        real = gen.prompt.attention_mask[b]
        pad = int((~real).sum())
        seq = torch.cat([gen.prompt.input_ids[b][real], torch.tensor(gen.new_ids[b])])
        full = smollm2.capture(seq[None], stats=["top_key", "pooled(1)"], layers=[0, 17, 29], prepend_bos=False)
        n = int(real.sum())
        for t in range(len(gen.new_ids[b])):
            # step t processed position n - 1 + t and produced new_ids[b][t]
            # top_key is a position in the row's own tokens (prompt ids + generated ids), not the padded axis
            assert torch.equal(gen.steps[t]["top_key"][b, ..., 0], full["top_key"][0, ..., n - 1 + t])
        last = len(gen.new_ids[b]) - 1
        row = gen.steps[last]["rows"][b, :, :, 0, pad:pad + n + last]
        # pooled(1) is the pattern: its row n - 1 + last is the row the last step saw
        torch.testing.assert_close(row, full["pooled"][0, :, :, n - 1 + last, :n + last], atol=2e-5, rtol=1e-4)


def test_generation_stops_at_newline(smollm2):
    gen = smollm2.generate("List two colours, one per line:\n1.", max_new_tokens=30)
    assert "\n" not in gen.texts[0] and len(gen.new_ids[0]) < 30
