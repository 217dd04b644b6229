"""Compare attnlab's decode loop (probe/generate.py) with transformers' model.generate on the same settings.

Greedy and seeded sampling, token for token, on tiny-llama and SmolLM2-135M; then per-step statistics
(top_key) captured through the probe's session during generate's forwards vs the loop's. The measured answer is
in probe/generate.py's docstring. Run: python bench/generate_vs_transformers.py [model ...]"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from attnlab.probe import load

torch.set_num_threads(2)
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "List two colours, one per line:\n1."]
N_NEW = int(os.environ.get("N_NEW", 24))


def hf_generate(probe, tokens, *, do_sample, temperature=1.0, top_p=1.0, seed=None, R=1, processors=None,
                output_logits=False):
    cfg = GenerationConfig(max_new_tokens=N_NEW, do_sample=do_sample, temperature=temperature if do_sample else None,
                           top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
                           num_return_sequences=R, eos_token_id=probe.tokenizer.eos_token_id,
                           pad_token_id=probe.tokenizer.pad_token_id or probe.tokenizer.eos_token_id,
                           return_dict_in_generate=True, output_logits=output_logits)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = probe.model.generate(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                                   generation_config=cfg, logits_processor=LogitsProcessorList(processors or []))
    new = out.sequences[:, tokens.length:]
    rows = []
    eos = probe.tokenizer.eos_token_id
    for r in new.tolist():
        rows.append(r[:r.index(eos)] if eos in r else r)
    return rows, out


def compare(name, label, ours, theirs):
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"{name} {label}: {same}/{len(ours)} rows identical")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"   row {i}: first difference at token {k} (ours {a[k:k + 3]}, generate {b[k:k + 3]}, "
                  f"lengths {len(a)}/{len(b)})")
    return same == len(ours)


def greedy_logit_gap(probe, tokens):
    """Max |logit difference| between the loop's step logits and generate's, per step (greedy, same tokens)."""
    steps = []

    class Grab(LogitsProcessor):
        def __call__(self, input_ids, scores):
            steps.append(scores.detach().clone())
            return scores

    hf_generate(probe, tokens, do_sample=False, processors=[Grab()])
    # the loop: prefill minus the last token, then one token per step (what generate.py does)
    from attnlab.probe.generate import _prefill, cache_argument, returned_cache

    ids, mask, pos = tokens.input_ids, tokens.attention_mask.long(), tokens.position_ids()
    gaps, flips = [], 0
    with torch.no_grad():
        past = _prefill(probe, ids, mask, pos, False)
        step_input, step_pos = ids[:, -1:], pos[:, -1:]
        for t in range(len(steps)):
            res = probe.model(input_ids=step_input, attention_mask=mask, position_ids=step_pos, use_cache=True,
                              **{cache_argument(probe.model): past})
            past = returned_cache(res)
            ours = res.logits[:, -1].float()
            gaps.append(float((ours - steps[t].float()).abs().max()))
            flips += int((ours.argmax(-1) != steps[t].argmax(-1)).sum())
            nxt = steps[t].argmax(-1)  # follow generate's tokens so both see the same inputs
            step_input = nxt[:, None]
            step_pos = step_pos + 1
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
    return max(gaps), gaps[0], flips


def stats_via_generate(probe, tokens, stat="top_key"):
    """top_key of the last query row at every step, captured by the probe's session around generate's forwards."""
    from attnlab.probe import stats as catalogue

    stat_list = catalogue.parse([stat])
    layers = list(range(probe.info.n_layers))
    records = []
    model = probe.model
    original = model.forward

    def forward(*args, **kw):
        B = kw["input_ids"].shape[0]
        session = probe._capture_session(stat_list, layers, "chunked", B, None)
        with probe.state.capturing(session):
            res = original(*args, **kw)
        records.append({l: session.records[l][0][stat].cpu() for l in layers})
        return res

    model.forward = forward
    try:
        rows, _ = hf_generate(probe, tokens, do_sample=False)
    finally:
        del model.forward
    return rows, records


def main(name):
    probe = load(name, device="cpu")
    tokens = probe.to_tokens(PROMPTS)
    print(f"== {name}: {len(PROMPTS)} prompts (left-padded to {tokens.length}), {N_NEW} new tokens, no newline stop")
    ours = probe.generate(PROMPTS, max_new_tokens=N_NEW, stop_at_newline=False)
    theirs, _ = hf_generate(probe, tokens, do_sample=False)
    compare(name, "greedy", ours.new_ids, theirs)
    gap, first, flips = greedy_logit_gap(probe, tokens)
    print(f"   greedy step logits, loop vs generate: max |diff| {gap:.3g} (step 0: {first:.3g}), argmax flips {flips}")
    for seed in (0, 1, 2):
        for R in (1, 3):
            ours = probe.generate(PROMPTS, max_new_tokens=N_NEW, stop_at_newline=False, temperature=0.6, top_p=0.95,
                                  seed=seed, num_samples=R)
            theirs, _ = hf_generate(probe, tokens, do_sample=True, temperature=0.6, top_p=0.95, seed=seed, R=R)
            compare(name, f"sampled T=0.6 top_p=0.95 seed={seed} R={R}", ours.new_ids, theirs)
    # the cause of any sampled difference: the loop drops finished rows from the batch when sampling (fewer rows
    # draw from the RNG afterwards); step statistics switch that compaction off
    for seed in (0, 1, 2):
        ours = probe.generate(PROMPTS, max_new_tokens=N_NEW, stop_at_newline=False, temperature=0.6, top_p=0.95,
                              seed=seed, num_samples=3, step_stats=["top_key"], backend="chunked")
        theirs, _ = hf_generate(probe, tokens, do_sample=True, temperature=0.6, top_p=0.95, seed=seed, R=3)
        compare(name, f"sampled seed={seed} R=3, loop without row compaction", ours.new_ids, theirs)
    # one prompt alone (no padding, one row): the RNG streams line up if the nucleus and draws match
    single = probe.to_tokens(PROMPTS[:1])
    for seed in (0, 1):
        ours = probe.generate(PROMPTS[:1], max_new_tokens=N_NEW, stop_at_newline=False, temperature=0.6, top_p=0.95,
                              seed=seed)
        theirs, _ = hf_generate(probe, single, do_sample=True, temperature=0.6, top_p=0.95, seed=seed)
        compare(name, f"sampled one prompt seed={seed}", ours.new_ids, theirs)
    # per-step statistics
    ours = probe.generate(PROMPTS, max_new_tokens=N_NEW, stop_at_newline=False, step_stats=["top_key"],
                          backend="chunked")
    rows, records = stats_via_generate(probe, tokens)
    print(f"   step statistics: loop has {len(ours.steps)} steps of top_key {tuple(ours.steps[0]['top_key'].shape)}; "
          f"generate's forwards: {len(records)}, the first over {records[0][0].shape} (the whole prompt: the "
          f"prefill is captured too)")
    same = 0
    for t in range(1, min(len(ours.steps), len(records))):
        ref = ours.steps[t]["top_key"]  # [B, L, H, ...]
        got = torch.stack([records[t][l] for l in range(probe.info.n_layers)], 1)
        same += int(torch.equal(ref.reshape(got.shape) if ref.numel() == got.numel() else ref, got))
    print(f"   top_key equal at {same} of {min(len(ours.steps), len(records)) - 1} later steps "
          f"(raw top_key from the kernel; the loop re-indexes it into each row's own tokens)")


if __name__ == "__main__":
    for n in sys.argv[1:] or ["tiny-llama", "smollm2-135m"]:
        main(n)
