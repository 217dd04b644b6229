"""Bad inputs at the public Python API: each is an AttnlabError that names the argument and the fix,
raised before any model work (issue 16). Accepted edge values still work (the end of this file)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.probe import (
    AttentionEdit, AttnlabError, FirstToken, KeyEviction, LogitBias, MassTransfer, Positions, RowPositions, SpanGate, Stat,
    load,
)
from attnlab.probe.stats import SEGMENT_LIMIT, parse

TEXT = "The harbour was quiet. Two boats came in."


@pytest.fixture(scope="module")
def probe(tiny_models):
    return tiny_models("tiny-llama")  # 2 layers x 4 heads, byte vocabulary of 259 ids, context 4096


@pytest.fixture(scope="module")
def tokens(probe):
    return probe.tokenize(TEXT)


def _edit_run(probe, tokens, edit, call="forward"):
    with probe.intervene(edit):
        if call == "forward":
            probe.forward(tokens)
        elif call == "capture":
            probe.capture(tokens, stats=["received"])
        else:
            probe.generate(tokens, max_new_tokens=2)


# (id, action(probe, tokens), pattern the message must match: it names the argument)
CASES = [
    # ----- capture: inputs -----
    ("capture-None", lambda p, t: p.capture(None), r"^inputs: None is of type NoneType; pass a text"),
    ("capture-empty-string", lambda p, t: p.capture(""), r"^inputs\[0\]: the text is empty"),
    ("capture-blank-string", lambda p, t: p.capture("   \n"), r"^inputs\[0\]: the text is empty"),
    ("capture-empty-list", lambda p, t: p.capture([]), r"^inputs: no input; pass at least one"),
    ("capture-list-with-empty", lambda p, t: p.capture(["a text", ""]), r"^inputs\[1\]: the text is empty"),
    ("capture-list-mixed", lambda p, t: p.capture(["a text", 3]), r"^inputs\[1\]: is of type int, not a string"),
    ("capture-float", lambda p, t: p.capture(42.0), r"^inputs: 42.0 is of type float; pass a text"),
    ("capture-too-long", lambda p, t: p.capture("x" * 5000), r"^inputs: the input is 5001 tokens but tiny-llama's context is 4096 tokens; shorten the text"),
    ("ids-float-tensor", lambda p, t: p.capture(torch.tensor([[1.0, 2.0]])), r"^inputs: token ids are float32; pass integer"),
    ("ids-bool-tensor", lambda p, t: p.capture(torch.tensor([True, False])), r"^inputs: token ids are bool; pass integer"),
    ("ids-rank-3", lambda p, t: p.capture(torch.ones(1, 2, 3, dtype=torch.long)), r"^inputs: token ids have shape \(1, 2, 3\)"),
    ("ids-empty-tensor", lambda p, t: p.capture(torch.zeros(0, dtype=torch.long)), r"^inputs: empty token ids"),
    ("ids-out-of-vocab", lambda p, t: p.capture([1, 99999]), r"^inputs: token id 99999 \(row 0\) is outside the vocabulary; tiny-llama takes ids 0-258"),
    ("ids-negative", lambda p, t: p.capture(torch.tensor([[3, -1]])), r"^inputs: token id -1 \(row 0\) is outside the vocabulary"),
    ("ids-float-in-list", lambda p, t: p.capture([1, 2.5]), r"^inputs\[0\]\[1\]: 2.5 is a float, not an integer"),
    ("ids-ragged-float", lambda p, t: p.capture([[1, 2], [3, 4.5]]), r"^inputs\[1\]\[1\]: 4.5 is a float"),
    ("ids-bool-in-list", lambda p, t: p.capture([1, True]), r"^inputs\[0\]\[1\]: True is a bool, not an integer"),
    ("ids-numpy-float", lambda p, t: p.capture(np.array([1.0, 2.0])), r"^inputs: token ids are float64"),
    ("tokens-other-vocab", lambda p, t: p.capture(_with_ids(t, 5000)), r"^inputs: token id 5000 is outside the vocabulary"),
    ("prepend-bos-string", lambda p, t: p.capture("x", prepend_bos="no"), r"^prepend_bos: 'no' is a str, not a bool"),
    ("prepend-bos-int", lambda p, t: p.tokenize("x", prepend_bos=0), r"^prepend_bos: 0 is an int, not a bool"),
    ("tokenize-None", lambda p, t: p.tokenize(None), r"^texts: None is of type NoneType"),
    # ----- capture: stats -----
    ("stats-int", lambda p, t: p.capture("x", stats=42), r"^stats: 42 is of type int; pass a list of catalogue entries"),
    ("stats-None", lambda p, t: p.capture("x", stats=None), r"^stats: None is of type NoneType"),
    ("stats-entry-int", lambda p, t: p.capture("x", stats=["received", 3]), r"^stats\[1\]: 3 is of type int"),
    ("stats-unknown", lambda p, t: p.capture("x", stats=["recieved"]), r"^stats: unknown statistic 'recieved'; choose from received"),
    ("stats-empty", lambda p, t: p.capture("x", stats=[]), r"^stats: no statistics requested; choose from"),
    ("stats-two-sink-mass", lambda p, t: p.capture("x", stats=["sink_mass(1)", "sink_mass(3)"]),
     r"^stats: sink_mass\(1\) and sink_mass\(3\) both asked; one capture holds one sink_mass"),
    ("stats-two-rows", lambda p, t: p.capture("x", stats=[Stat("rows", [0]), "rows(-1)"]), r"^stats: rows\(0\) and rows\(-1\) both asked"),
    ("stats-two-params", lambda p, t: p.capture("x", stats=["pooled(4,8)"]), r"^stats: statistic 'pooled\(4,8\)' takes one integer, got 2; write e.g. pooled\(64\)"),
    ("stats-not-integer", lambda p, t: p.capture("x", stats=["pooled(abc)"]), r"^stats: statistic 'pooled\(abc\)' takes integers; write e.g. pooled\(4\)"),
    ("stats-zero", lambda p, t: p.capture("x", stats=["pooled(0)"]), r"^pooled: 0 is not a positive integer"),
    ("stat-rows-string", lambda p, t: Stat("rows", "abc"), r"^rows: 'abc' is a str; pass a list of query positions"),
    ("stat-rows-float", lambda p, t: Stat("rows", [1.5]), r"^rows\[0\]: 1.5 is a float, not an integer"),
    ("stat-rows-empty", lambda p, t: Stat("rows", []), r"^rows: the list is empty; pass at least one query position"),
    ("stat-rows-outside", lambda p, t: p.capture("x", stats=["rows(40)"]), r"^rows: rows\(40\) is outside the 2 query positions; pass -2..1"),
    ("stat-sink-float", lambda p, t: Stat("sink_mass", 2.0), r"^sink_mass: 2.0 is not a positive integer"),
    ("stat-sink-bool", lambda p, t: Stat("sink_mass", True), r"^sink_mass: True is not a positive integer"),
    ("stat-unknown-name", lambda p, t: Stat("attention"), r"^stats: unknown statistic 'attention'; choose from"),
    ("stat-no-param", lambda p, t: Stat("entropy", 3), r"^entropy: takes no parameter"),
    ("segments-huge-id", lambda p, t: Stat("segments", [0, 10**6]), rf"^segments: id 1000000 makes 1000001 segments, above the limit of 2"),
    ("segments-over-limit", lambda p, t: Stat("segments", list(range(SEGMENT_LIMIT + 1))), rf"^segments: id {SEGMENT_LIMIT} makes {SEGMENT_LIMIT + 1} segments, above the limit of {SEGMENT_LIMIT}"),
    ("segments-float", lambda p, t: Stat("segments", [0.0, 1.0]), r"^segments: ids are float32; pass integer segment ids"),
    ("segments-negative", lambda p, t: Stat("segments", [0, -5]), r"^segments: id -5 is negative"),
    ("segments-missing", lambda p, t: p.capture("x", stats=[Stat("segments")]), r"^segments: needs per-token segment ids"),
    ("segments-length", lambda p, t: p.capture("x", stats=[Stat("segments", [0, 1, 1, 1, 1])]), r"^segments: row 0 has 5 ids for 2 tokens; give one id per token"),
    # ----- capture: layers, heads, backend, progress -----
    ("layers-out-of-range", lambda p, t: p.capture("x", layers=[2]), r"^layers: layer 2 is out of range: tiny-llama has 2 layers; pass 0-1"),
    ("layers-negative", lambda p, t: p.capture("x", layers=-1), r"^layers: layer -1 is out of range"),
    ("layers-bool", lambda p, t: p.capture("x", layers=[True]), r"^layers\[0\]: True is a bool, not an integer"),
    ("layers-float", lambda p, t: p.capture("x", layers=[1.0]), r"^layers\[0\]: 1.0 is a float, not an integer"),
    ("layers-numpy-float", lambda p, t: p.capture("x", layers=np.array([0.0])), r"^layers\[0\]: 0.0 is a float64"),
    ("layers-string", lambda p, t: p.capture("x", layers="01"), r"^layers: '01' is a str; pass a list of integers"),
    ("layers-empty", lambda p, t: p.capture("x", layers=[]), r"^layers: the list is empty; pass at least one index, or None"),
    ("heads-out-of-range", lambda p, t: p.capture("x", heads=[4]), r"^heads: head 4 is out of range: tiny-llama has 4 heads"),
    ("backend-unknown", lambda p, t: p.capture("x", backend="cuda-magic"), r"^backend: unknown backend 'cuda-magic'; choose from auto"),
    ("backend-None", lambda p, t: p.capture("x", backend=None), r"^backend: unknown backend None"),
    ("progress-not-a-progress", lambda p, t: p.capture("x", progress="yes"), r"^progress: 'yes' is not a progress value \(a string is no longer a bar's label"),
    # ----- forward, generate, head_outputs -----
    ("forward-text", lambda p, t: p.forward("a text"), r"^tokens: 'a text' is of type str; pass Tokens from probe.tokenize"),
    ("generate-max-new-0", lambda p, t: p.generate("x", max_new_tokens=0), r"^max_new_tokens: 0 is out of range; pass an integer >= 1"),
    ("generate-max-new-float", lambda p, t: p.generate("x", max_new_tokens=2.5), r"^max_new_tokens: 2.5 is a float"),
    ("generate-temperature", lambda p, t: p.generate("x", temperature=-1), r"^temperature: -1 is out of range; pass a number >= 0"),
    ("generate-temperature-nan", lambda p, t: p.generate("x", temperature=float("nan")), r"^temperature: nan is not finite"),
    ("generate-top-p-0", lambda p, t: p.generate("x", top_p=0), r"^top_p: 0 is out of range; pass a number > 0 and <= 1"),
    ("generate-top-p-big", lambda p, t: p.generate("x", top_p=1.5), r"^top_p: 1.5 is out of range"),
    ("generate-top-p-string", lambda p, t: p.generate("x", top_p="0.9"), r"^top_p: '0.9' is a str, not a number"),
    ("generate-num-samples", lambda p, t: p.generate("x", num_samples=0), r"^num_samples: 0 is out of range"),
    ("generate-seed", lambda p, t: p.generate("x", seed="7"), r"^seed: '7' is a str, not an integer"),
    ("generate-stop", lambda p, t: p.generate("x", stop="\n"), r"^stop: '\\n' is a str, not callable"),
    ("generate-stop-newline", lambda p, t: p.generate("x", stop_at_newline="yes"), r"^stop_at_newline: 'yes' is a str, not a bool"),
    ("generate-step-stats", lambda p, t: p.generate("x", step_stats=[1]), r"^step_stats\[0\]: 1 is of type int"),
    ("generate-backend", lambda p, t: p.generate("x", backend="fast"), r"^backend: unknown backend 'fast'"),
    ("head-outputs-pooling", lambda p, t: p.head_outputs([[1, 2]], pooling="max"), r"^pooling: unknown pooling 'max'"),
    ("head-outputs-batch", lambda p, t: p.head_outputs([[1, 2]], batch_size=0), r"^batch_size: 0 is out of range"),
    # ----- ablate -----
    ("ablate-mode", lambda p, t: p.ablate([(0, 0)], mode="median").__enter__(), r"^mode: unknown ablation mode 'median'; choose from zero, bos, uniform, mean"),
    ("ablate-layer", lambda p, t: p.ablate([(5, 0)]).__enter__(), r"^heads\[0\]: layer 5 is out of range: tiny-llama has 2 layers"),
    ("ablate-head", lambda p, t: p.ablate((0, 4)).__enter__(), r"^heads\[0\]: head 4 is out of range"),
    ("ablate-empty", lambda p, t: p.ablate([]).__enter__(), r"^heads: no \(layer, head\) pairs; pass at least one"),
    ("ablate-float", lambda p, t: p.ablate([(0.0, 1)]).__enter__(), r"^heads\[0\] layer: 0.0 is a float, not an integer"),
    ("ablate-triple", lambda p, t: p.ablate([(0, 1, 2)]).__enter__(), r"^heads\[0\]: \(0, 1, 2\) is not a \(layer, head\) pair"),
    ("ablate-decode-only", lambda p, t: p.ablate([(0, 1)], decode_only="yes").__enter__(), r"^decode_only: 'yes' is a str, not a bool"),
    # ----- edits -----
    ("logit-bias-string", lambda p, t: LogitBias("2"), r"^LogitBias\(c\): '2' is a str, not a number"),
    ("logit-bias-inf", lambda p, t: LogitBias(float("inf")), r"^LogitBias\(c\): inf is not finite"),
    ("logit-bias-nan", lambda p, t: LogitBias(float("nan")), r"^LogitBias\(c\): nan is not finite"),
    ("logit-bias-negative", lambda p, t: LogitBias(-1.0), r"^LogitBias\(c\): -1 is out of range; pass a number >= 0 \(c >= 0"),
    ("mass-transfer-string", lambda p, t: MassTransfer("0.5"), r"^MassTransfer\(keep\): '0.5' is a str, not a number"),
    ("mass-transfer-above-1", lambda p, t: MassTransfer(1.5), r"^MassTransfer\(keep\): 1.5 is out of range.*0 <= keep <= 1"),
    ("mass-transfer-nan", lambda p, t: MassTransfer(float("nan")), r"^MassTransfer\(keep\): nan is not finite"),
    ("mass-transfer-to", lambda p, t: MassTransfer(0.5, to=[1, 2]), r"^MassTransfer\(to\): \[1, 2\] is of type list; pass FirstToken\(\)"),
    ("span-gate-min-mass", lambda p, t: SpanGate(FirstToken(), min_mass=2), r"^SpanGate\(min_mass\): 2 is out of range"),
    ("span-gate-region", lambda p, t: SpanGate("the text"), r"^SpanGate\(region\): 'the text' is of type str"),
    ("positions-empty", lambda p, t: Positions([]), r"^Positions\(positions\): the list is empty"),
    ("positions-negative", lambda p, t: Positions([-1]), r"^Positions\(positions\): -1 is negative"),
    ("positions-float", lambda p, t: Positions([1.5]), r"^Positions\(positions\)\[0\]: 1.5 is a float"),
    ("positions-string", lambda p, t: Positions("12"), r"^Positions\(positions\): '12' is a str"),
    ("row-positions-flat", lambda p, t: RowPositions([1, 2]), r"^RowPositions\(rows\)\[0\]: 1 is not a list"),
    ("row-positions-negative", lambda p, t: RowPositions([[1], [-2]]), r"^RowPositions\(rows\)\[1\]: -2 is out of range"),
    ("substring-missing", lambda p, t: Positions.substring(t, 0, "submarine"), r"^needle: 'submarine' is not in the text of row 0"),
    ("substring-empty", lambda p, t: Positions.substring(t, 0, ""), r"^needle: '' is not a non-empty string"),
    ("substring-row", lambda p, t: Positions.substring(t, 3, "boats"), r"^row: 3 is out of range; pass an integer in 0..0"),
    ("span-outside", lambda p, t: Positions.span(t, 0, 5, 10_000), r"^start_char, end_char: span \[5, 10000\) is not inside the text"),
    ("span-float", lambda p, t: Positions.span(t, 0, 0.5, 3), r"^start_char: 0.5 is a float"),
    ("edit-keys", lambda p, t: AttentionEdit("BOS", LogitBias(2.0)), r"^AttentionEdit\(keys\): 'BOS' is of type str"),
    ("edit-op", lambda p, t: AttentionEdit(FirstToken(), 2.0), r"^AttentionEdit\(op\): op must be LogitBias\(c\) or MassTransfer"),
    ("edit-heads-empty", lambda p, t: AttentionEdit(FirstToken(), LogitBias(2.0), heads=[]), r"^AttentionEdit\(heads\): the list is empty"),
    ("edit-layers-empty", lambda p, t: AttentionEdit(FirstToken(), LogitBias(2.0), layers=range(0)), r"^AttentionEdit\(layers\): the list is empty"),
    ("edit-layers-bool", lambda p, t: AttentionEdit(FirstToken(), LogitBias(2.0), layers=[False]), r"^AttentionEdit\(layers\)\[0\]: False is a bool"),
    ("edit-layer-range", lambda p, t: _edit_run(p, t, AttentionEdit(FirstToken(), LogitBias(2.0), layers=[99])),
     r"^AttentionEdit\(layers\): edit layer 99 is out of range: tiny-llama has 2 layers"),
    ("edit-head-range", lambda p, t: _edit_run(p, t, AttentionEdit(FirstToken(), LogitBias(2.0), heads=[4])),
     r"^AttentionEdit\(heads\): edit head 4 is out of range"),
    ("intervene-not-edit", lambda p, t: p.intervene(LogitBias(2.0)).__enter__(), r"^edits\[0\]: intervene takes AttentionEdit objects"),
    ("intervene-nothing", lambda p, t: p.intervene().__enter__(), r"^edits: intervene needs at least one AttentionEdit"),
    ("key-eviction-float", lambda p, t: KeyEviction(torch.ones(2, 1, 2, 5)),
     r"^KeyEviction\(keep\): got a torch.float32 tensor of shape \(2, 1, 2, 5\); pass a \[layers, batch or 1, kv_heads"),
    ("key-eviction-list", lambda p, t: KeyEviction([[True]]), r"^KeyEviction\(keep\): got list"),
    ("key-eviction-shape", lambda p, t: p.intervene(KeyEviction(torch.ones(1, 1, 1, 5, dtype=torch.bool))).__enter__(),
     r"^KeyEviction\(keep\): shape \(1, 1, 1, 5\), but .* has \d+ layers and \d+ KV heads"),
    ("positions-outside-text", lambda p, t: _edit_run(p, t, AttentionEdit(Positions([999]), LogitBias(2.0))),
     r"^AttentionEdit\(keys\): Positions\(999\) is outside the text, whose shortest row has \d+ tokens"),
    ("positions-outside-capture", lambda p, t: _edit_run(p, t, AttentionEdit(Positions([999]), LogitBias(2.0)), "capture"),
     r"^AttentionEdit\(keys\): Positions\(999\) is outside the text"),
    ("positions-outside-generate", lambda p, t: _edit_run(p, t, AttentionEdit(Positions([999]), LogitBias(2.0)), "generate"),
     r"^AttentionEdit\(keys\): Positions\(999\) is outside the text"),
    ("mass-to-outside-text", lambda p, t: _edit_run(p, t, AttentionEdit(FirstToken(), MassTransfer(0.5, to=Positions([500])))),
     r"^MassTransfer\(to\): Positions\(500\) is outside the text"),
    ("row-positions-rows", lambda p, t: _edit_run(p, t, AttentionEdit(RowPositions([[1], [2]]), LogitBias(2.0))),
     r"^AttentionEdit\(keys\): RowPositions has 2 rows but the batch has 1"),
    ("row-positions-outside", lambda p, t: _edit_run(p, t, AttentionEdit(RowPositions([[1, 300]]), LogitBias(2.0))),
     r"^AttentionEdit\(keys\): RowPositions row 0 has position 300, outside its \d+ tokens"),
    # ----- load: checked before the registry or any weights -----
    ("load-device-tpu", lambda p, t: load("tiny-llama", device="tpu"), r"^device: unknown device 'tpu'; pass 'cpu', 'cuda'"),
    ("load-device-int", lambda p, t: load("tiny-llama", device=0), r"^device: 0 is of type int"),
    ("load-dtype-name", lambda p, t: load("tiny-llama", dtype="int8"), r"^dtype: 'int8' is not a supported model dtype; pass one of float32"),
    ("load-dtype-unknown", lambda p, t: load("tiny-llama", dtype="float99"), r"^dtype: 'float99' is not a supported model dtype"),
    ("load-dtype-int-torch", lambda p, t: load("tiny-llama", dtype=torch.int64), r"^dtype: torch.int64 is not a supported"),
    ("load-name-None", lambda p, t: load(None), r"^name_or_path: None is not a model name or folder"),
    ("load-cache-string", lambda p, t: load("tiny-llama", cache="no"), r"^cache: 'no' is a str, not a bool"),
    # ----- length buckets (attnlab.probe.buckets) -----
    ("buckets-zero", lambda p, t: p.capture(["a", "bb"], max_batch_tokens=0),
     r"^max_batch_tokens: 0 is out of range; pass an integer >= 1 \(the padded tokens"),
    ("buckets-string", lambda p, t: p.capture(["a", "bb"], max_batch_tokens="4k"), r"^max_batch_tokens: '4k' is a str"),
    ("buckets-bool", lambda p, t: p.run(["a", "bb"], max_batch_tokens=True), r"^max_batch_tokens: True is a bool"),
    ("buckets-float", lambda p, t: p.capture(["a", "bb"], max_batch_tokens=512.0), r"^max_batch_tokens: 512.0 is a float"),
    ("buckets-batch-size", lambda p, t: p.capture(["a", "bb"], batch_size=-2), r"^batch_size: -2 is out of range"),
    ("buckets-segments", lambda p, t: p.capture(["ab", "c"], stats=[Stat("segments", [[0, 1, 1], [0, 0]])],
                                                max_batch_tokens=8),
     r"^stats: segments with max_batch_tokens/batch_size is not supported"),
    ("buckets-row-positions", lambda p, t: _edit_run_bucketed(p, AttentionEdit(RowPositions([[1], [1]]), LogitBias(2.0))),
     r"^max_batch_tokens/batch_size: an active edit selects keys per batch row \(RowPositions\)"),
    ("buckets-pattern-too-large", lambda p, t: p.capture(["x" * 4000] * 3, stats=["pattern"], batch_size=1),
     r"^stats: the full pattern here is [\d,]+ values \(limit 268,435,456\); capture statistics instead"),
    ("head-outputs-buckets", lambda p, t: p.head_outputs([[1, 2], [3]], max_batch_tokens=-1),
     r"^max_batch_tokens: -1 is out of range"),
    # ----- load with a device_map (attnlab.probe.placement): checked before any weights are read -----
    ("device-map-and-device", lambda p, t: load("tiny-llama", device="cpu", device_map="auto"),
     r"^device: 'cpu' together with device_map; pass one"),
    ("device-map-unknown-device", lambda p, t: load("tiny-llama", device_map={"": "cuda:99"}),
     r"^device_map\[''\]: 'cuda:99' but this machine has .*; place those modules on a device that exists"),
    ("device-map-unknown-kind", lambda p, t: load("tiny-llama", device_map={"model.layers.0": "tpu"}),
     r"^device_map\['model.layers.0'\]: unknown device 'tpu'; name 'cpu', 'cuda:N'"),
    ("device-map-gpu-index", lambda p, t: load("tiny-llama", device_map={"": 99}),
     r"^device_map\[''\]: 'cuda:99' but this machine has"),
    ("device-map-strategy", lambda p, t: load("tiny-llama", device_map="everywhere"),
     r"^device_map: 'everywhere' is not a placement; pass one of auto, balanced, balanced_low_0, sequential, a "
     r"device that exists here, or a dict"),
    ("device-map-one-missing-gpu", lambda p, t: load("tiny-llama", device_map="cuda:99"),
     r"^device_map: 'cuda:99' is not a placement"),
    ("device-map-bool", lambda p, t: load("tiny-llama", device_map=True), r"^device_map: True is not a placement"),
    ("device-map-empty", lambda p, t: load("tiny-llama", device_map={}), r"^device_map: \{\} is not a placement"),
    ("device-map-disk-no-folder", lambda p, t: load("tiny-llama", device_map={"": "disk"}),
     r"^device_map: modules are placed on 'disk' but no offload_folder is given; pass offload_folder="),
    ("device-map-in-memory", lambda p, t: load("tiny-llama", device_map="auto", cache=False),
     r"^device_map: cache=False builds the model in memory"),
    ("device-map-unknown-module", lambda p, t: load("tiny-llama", device_map={"model.layers.7": "cpu"}),
     r"^device_map: 'model.layers.7' is not a module of LlamaForCausalLM; name its modules"),
    ("device-map-partial", lambda p, t: load("tiny-llama", device_map={"model.layers.0": "cpu"}),
     r"^device_map: \d+ weight\(s\) are placed nowhere \(e.g. model.embed_tokens.weight\); give every module a device"),
    ("max-memory-without-map", lambda p, t: load("tiny-llama", max_memory={"cpu": "1GiB"}),
     r"^max_memory: given without device_map; pass device_map='auto'"),
    ("offload-without-map", lambda p, t: load("tiny-llama", offload_folder="/tmp/x"),
     r"^offload_folder: given without device_map"),
    ("max-memory-size", lambda p, t: load("tiny-llama", device_map="auto", max_memory={"cpu": "lots"}),
     r"^max_memory\['cpu'\]: 'lots' is not a size; pass a positive number of bytes or a string such as '10GiB'"),
    ("max-memory-negative", lambda p, t: load("tiny-llama", device_map="auto", max_memory={"cpu": -5}),
     r"^max_memory\['cpu'\]: -5 is not a size"),
    ("max-memory-device", lambda p, t: load("tiny-llama", device_map="auto", max_memory={"cuda:99": "1GiB"}),
     r"^max_memory key 'cuda:99': 'cuda:99' but this machine has"),
    ("max-memory-does-not-fit", lambda p, t: load("tiny-llama", device_map="auto", max_memory={"cpu": 10_000}),
     r"^max_memory: max_memory \{'cpu': 10000\} does not fit the model \(\d+ module\(s\) would go to disk.*raise "
     r"max_memory, or pass offload_folder= to allow disk offload"),
]


def _edit_run_bucketed(probe, edit):
    with probe.intervene(edit):
        probe.capture(["a text", "another one"], stats=["received"], max_batch_tokens=64)


def _with_ids(tokens, bad_id):
    """The same Tokens with one id replaced (as if made for a model with a larger vocabulary)."""
    from dataclasses import replace

    ids = tokens.input_ids.clone()
    ids[0, -1] = bad_id
    return replace(tokens, input_ids=ids)


@pytest.mark.parametrize("action, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(probe, tokens, action, pattern):
    with pytest.raises(AttnlabError, match=pattern) as info:
        action(probe, tokens)
    message = str(info.value)
    assert "\n" not in message and "; " in message  # one line, "<argument>: <problem>; <fix>"


def test_cuda_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(AttnlabError, match=r"^device: 'cuda' but no CUDA GPU is available here; use device='cpu'"):
        load("tiny-llama", device="cuda")


def test_bad_input_runs_no_model_work(probe, monkeypatch):
    """Refusals come before the forward: a model that must not be called is never called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran on a bad input")

    monkeypatch.setattr(probe.model, "forward", forbidden)
    for kwargs in (dict(stats=["sink_mass(1)", "sink_mass(3)"]), dict(layers=[True]), dict(prepend_bos="no"),
                   dict(stats=[Stat("rows", [0]), Stat("rows", [1])])):
        with pytest.raises(AttnlabError):
            probe.capture("The cat sat.", **kwargs)
    with pytest.raises(AttnlabError):
        probe.generate("The cat", max_new_tokens=-3)


# ----- accepted edge values still work, with the same numbers -----

def test_numpy_integers_are_integers(probe):
    plain = probe.capture(TEXT, stats=["received", "sink_mass(2)", Stat("rows", [-1])], layers=[1], heads=[0, 3])
    numpy = probe.capture(TEXT, stats=["received", Stat("sink_mass", np.int64(2)), Stat("rows", np.array([-1]))],
                          layers=np.array([1]), heads=[np.int32(0), np.int64(3)])
    assert numpy.layers == [1] and numpy.heads == [0, 3] and numpy.params == plain.params
    for name in ("received", "sink_mass", "rows"):
        torch.testing.assert_close(numpy[name], plain[name], equal_nan=True)
    one = probe.capture(TEXT, stats=["entropy"], layers=np.int64(0))
    assert one.layers == [0]


def test_token_ids_in_every_accepted_form_give_the_same_tokens(probe, tokens):
    ids = tokens.input_ids[0].tolist()
    forms = [ids, [ids], torch.tensor(ids), torch.tensor([ids]), np.array(ids), np.array([ids], dtype=np.int32),
             [np.array(ids)], [[np.int64(i) for i in ids]]]
    for form in forms:
        got = probe.to_tokens(form, prepend_bos=False)
        assert torch.equal(got.input_ids, tokens.input_ids), type(form)
    assert probe.to_tokens(tokens) is tokens


def test_identical_duplicate_stats_count_once(probe):
    cap = probe.capture(TEXT, stats=["sink_mass(2)", Stat("sink_mass", 2), "entropy", "entropy"])
    assert cap.params == {"sink_mass": 2}
    assert [s.label() for s in parse(["received", "received", "sink_mass"])] == ["received", "sink_mass(1)"]


def test_edge_strengths_are_accepted(probe, tokens):
    """LogitBias(0) removes the keys; MassTransfer(0) and (1) and integer strengths are numbers too."""
    assert LogitBias(2).c == 2.0 and isinstance(LogitBias(np.float32(0.5)).c, float)
    assert LogitBias(torch.tensor(2.0)).c == 2.0  # a 0-d tensor is a number
    assert AttentionEdit(FirstToken(), LogitBias(2), heads=torch.tensor([2, 0])).heads == (2, 0)
    base = probe.forward(tokens).logits
    with probe.intervene(AttentionEdit(FirstToken(), LogitBias(1))):
        same = probe.forward(tokens).logits
    torch.testing.assert_close(same, base)  # c = 1 is the identity
    with probe.intervene(AttentionEdit(FirstToken(), LogitBias(0), heads=np.array([0, 1]))):
        removed = probe.forward(tokens).logits
    assert torch.isfinite(removed).all() and not torch.allclose(removed, base)
    for keep in (0, 1, np.float64(0.25)):
        with probe.intervene(AttentionEdit(FirstToken(), MassTransfer(keep), layers=np.int64(1))):
            out = probe.forward(tokens).logits
        assert torch.isfinite(out).all()
    last = tokens.length - 1
    with probe.intervene(AttentionEdit(Positions([last]), LogitBias(2.0)),
                         AttentionEdit(RowPositions([[0, last]]), MassTransfer(0.5, to=Positions([1])))):
        assert torch.isfinite(probe.forward(tokens).logits).all()


def test_segments_at_the_limit_and_numpy_ids(probe):
    tokens = probe.tokenize("Ab. Cd.")
    n = tokens.length
    ids = np.arange(n)  # one segment per token: the most this text allows
    cap = probe.capture(tokens, stats=[Stat("segments", ids)], layers=[0])
    assert cap["segments"].shape[-1] == n == cap.params["segments"]
    with pytest.raises(AttnlabError, match=rf"above the limit of {n}"):
        Stat("segments", np.arange(n) + 1)


def test_generate_edge_values(probe):
    gen = probe.generate("The cat", max_new_tokens=np.int64(2), top_p=1, temperature=0, stop_at_newline=False,
                         layers=np.array([0]))
    assert len(gen.new_ids[0]) <= 2
    sampled = probe.generate("The cat", max_new_tokens=2, temperature=0.7, top_p=0.5, seed=np.int64(3),
                             stop_at_newline=False)
    again = probe.generate("The cat", max_new_tokens=2, temperature=0.7, top_p=0.5, seed=3, stop_at_newline=False)
    assert sampled.new_ids == again.new_ids


def test_load_accepts_dtype_names_and_devices():
    probe = load("tiny-llama", device="cpu", dtype="bfloat16", cache=False)
    assert probe.dtype == torch.bfloat16
    probe = load("tiny-llama", device=torch.device("cpu"), dtype=torch.float32, cache=False)
    assert probe.dtype == torch.float32
