"""A model split by a device_map (`attnlab.probe.placement`) gives the numbers of the unsplit model.

On the CPU: the tiny random-init Llama with its second layer offloaded to disk (an offload_folder in
tmp_path; accelerate reads the layer's weights in for each forward), and SmolLM2 from the cache with
half its layers on disk. Capture, logits, an edit, an ablation, greedy generation with step
statistics, head outputs and W_O agree with the model loaded with device="cpu" to <= 1e-6."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.probe import AttentionEdit, AttnlabError, FirstToken, LogitBias, MassTransfer, RunStore, attach, load
from attnlab.probe.fast_path import CaptureSession

TEXTS = ["The harbour was quiet.", "Two boats came in at dusk, and the gulls followed them to the quay."]
STATS = ["received", "entropy", "top_key", "sink_mass(1)", "pooled(4)", "distance(8)"]
TOL = 1e-6


def _split_map(n_layers: int, on_disk: range) -> dict[str, str]:
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": ("disk" if i in on_disk else "cpu") for i in range(n_layers)})
    return dm


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    whole = tiny_models("tiny-llama")
    split = load("tiny-llama", device_map=_split_map(2, range(1, 2)),
                 offload_folder=tmp_path_factory.mktemp("offload"))
    return whole, split


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, NaN (pads) where both are NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan())
    return float((a - b).nan_to_num().abs().max())


def _real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask]


def test_split_probe_knows_its_placement(pair):
    whole, split = pair
    assert split.split and not whole.split
    assert split.placement["model.layers.1"] == "disk" and split.placement["model.layers.0"] == "cpu"
    # a disk-offloaded layer holds meta tensors: it computes on the CPU, which is what the capture reads
    assert next(split.model.model.layers[1].parameters()).device.type == "meta"
    assert {str(d) for d in split.layer_devices.values()} == {"cpu"}
    assert "split: cpu" in repr(split) and "disk" in repr(split)
    assert whole.placement is None


def test_capture_and_logits_equal_the_unsplit_model(pair):
    whole, split = pair
    mask = whole.tokenize(TEXTS).attention_mask
    la, ca = whole.run(TEXTS, stats=STATS)
    lb, cb = split.run(TEXTS, stats=STATS)
    assert _close(_real(la, mask), _real(lb, mask)) <= TOL
    assert set(ca.stats) == set(cb.stats)
    for name in ca.stats:
        assert _close(ca[name], cb[name]) <= TOL, name
    # the statistics come back on the host in layer order, like the unsplit capture's
    assert cb.layers == [0, 1] and all(t.device.type == "cpu" for t in cb.stats.values())
    assert not torch.equal(ca["received"][:, 0], ca["received"][:, 1])  # the layers differ: order is tested


def test_edit_and_ablation_equal_the_unsplit_model(pair):
    whole, split = pair
    mask = whole.tokenize(TEXTS).attention_mask
    plain = whole.run(TEXTS).logits
    for edit in (AttentionEdit(FirstToken(), LogitBias(3.0)), AttentionEdit(FirstToken(), MassTransfer(0.4), layers=[1])):
        with whole.intervene(edit):
            la, ca = whole.run(TEXTS, stats=["received"])
        with split.intervene(edit):
            lb, cb = split.run(TEXTS, stats=["received"])
        assert _close(_real(la, mask), _real(lb, mask)) <= TOL
        assert _close(ca["received"], cb["received"]) <= TOL
        assert _close(_real(la, mask), _real(plain, mask)) > 1e-3  # the edit did something
    for mode in ("zero", "bos", "uniform", "mean"):
        with whole.ablate([(1, 0), (0, 3)], mode=mode):
            la = whole.run(TEXTS).logits
        with split.ablate([(1, 0), (0, 3)], mode=mode):
            lb = split.run(TEXTS).logits
        assert _close(_real(la, mask), _real(lb, mask)) <= TOL, mode


def test_greedy_generation_equals_the_unsplit_model(pair):
    whole, split = pair
    ga = whole.generate(TEXTS, max_new_tokens=6, stop_at_newline=False, step_stats=["top_key", "entropy"])
    gb = split.generate(TEXTS, max_new_tokens=6, stop_at_newline=False, step_stats=["top_key", "entropy"])
    assert ga.new_ids == gb.new_ids and ga.texts == gb.texts
    assert len(ga.steps) == len(gb.steps) == 6
    for sa, sb in zip(ga.steps, gb.steps):
        for name in sa:
            assert _close(sa[name], sb[name]) <= TOL


def test_weights_of_an_offloaded_layer_are_read_in(pair):
    whole, split = pair
    assert torch.equal(whole.output_weights(1), split.output_weights(1))
    ids = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert _close(whole.head_outputs(ids, pooling="both"), split.head_outputs(ids, pooling="both")) <= TOL


def test_placement_goes_into_the_capture_manifest(pair, tmp_path):
    _, split = pair
    path = RunStore(tmp_path).save_capture(split.capture(TEXTS[0]), split)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"]["placement"] == split.placement
    assert manifest["model"]["placement"]["model.layers.1"] == "disk"
    assert manifest["model"]["layer_devices"] == {"0": "cpu", "1": "cpu"}  # a disk layer computes on the CPU
    RunStore(tmp_path).load(path)  # the schema accepts it


def test_hooked_path_of_a_split_model(pair):
    """Layers on one device (weights on disk included): the bridge loads its own instance with the same
    placement and passes the hooked path's check (transformers' eager logits); its patterns are the
    unsplit model's."""
    whole, split = pair
    ids = whole.tokenize(TEXTS[1]).input_ids
    _, cache = split.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    _, want = whole.bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    for name in want:
        assert _close(cache[name], want[name]) <= TOL
    assert split.bridge.cfg.n_layers == 2


def test_hooked_path_refuses_layers_on_several_devices(pair, monkeypatch):
    _, split = pair
    monkeypatch.setattr(split, "layer_devices", {0: torch.device("cuda:0"), 1: torch.device("cuda:1")})
    monkeypatch.setattr(split, "_bridge", None)
    with pytest.raises(AttnlabError, match=r"layers compute on several devices \(cuda:0, cuda:1: a device_map split\); "
                                           r"the hooked path"):
        split.bridge


def test_a_placement_on_one_device_is_an_ordinary_probe(tiny_models):
    whole = tiny_models("tiny-llama")
    dm = _split_map(2, range(0))  # every module named, all on the CPU: two CPU placements, one device
    probe = load("tiny-llama", device_map=dm)
    assert not probe.split and probe.placement == dm
    la, ca = whole.run(TEXTS, stats=["received"])
    lb, cb = probe.run(TEXTS, stats=["received"])
    assert torch.equal(la, lb) and _close(ca["received"], cb["received"]) == 0


def test_one_device_as_the_device_map(tiny_models):
    whole = tiny_models("tiny-llama")
    probe = load("tiny-llama", device_map="cpu")  # transformers' form for "all on this device"
    assert not probe.split and probe.device == "cpu"
    assert torch.equal(whole.run(TEXTS).logits, probe.run(TEXTS).logits)


def test_auto_with_offload_folder(tiny_models, tmp_path):
    """max_memory too small for the whole model, with an offload folder: accelerate puts the rest on
    disk and the numbers still equal the unsplit model's."""
    whole = tiny_models("tiny-llama")
    probe = load("tiny-llama", device_map="auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path)
    assert "disk" in probe.placement.values()
    la, ca = whole.run(TEXTS, stats=["received", "entropy"])
    lb, cb = probe.run(TEXTS, stats=["received", "entropy"])
    mask = whole.tokenize(TEXTS).attention_mask
    assert _close(_real(la, mask), _real(lb, mask)) <= TOL
    assert _close(ca["entropy"], cb["entropy"]) <= TOL


def test_attach_serves_a_split_model(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    whole = tiny_models("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(whole.folder, device_map=_split_map(2, range(1, 2)),
                                                 offload_folder=tmp_path)
    before = model(whole.tokenize(TEXTS[0]).input_ids).logits
    with attach(model, whole.tokenizer) as probe:
        assert probe.split
        lb, cb = probe.run(TEXTS, stats=["received"])
    la, ca = whole.run(TEXTS, stats=["received"])
    mask = whole.tokenize(TEXTS).attention_mask
    assert _close(_real(la, mask), _real(lb, mask)) <= 1e-5  # SDPA vs attnlab's kernel on the attached side
    assert _close(ca["received"], cb["received"]) <= TOL
    assert torch.equal(model(whole.tokenize(TEXTS[0]).input_ids).logits, before)  # left as it was


def test_attach_refuses_weights_nothing_reads_in(tiny_models):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    whole = tiny_models("tiny-llama")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(whole.folder))
    with pytest.raises(Exception, match=r"^model: \d+ weight\(s\) are on the meta device with no accelerate offload"):
        with attach(model, whole.tokenizer):
            pass


def test_capture_waits_for_every_gpu_holding_a_layer(monkeypatch):
    """The offloaded host copies are queued on each layer's own device: synchronise each, not only the
    current one (the capture offload waited for one GPU before the device_map work)."""
    waited = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(str(device)))
    session = CaptureSession({0, 1, 2}, None, None, offload=True,
                             devices=(torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu"),
                                      torch.device("cuda:1")))
    session.synchronize()
    assert waited == ["cuda:0", "cuda:1"]


def test_smollm2_half_on_disk_equals_smollm2(smollm2, english_64, tmp_path):
    n = smollm2.info.n_layers
    split = load("smollm2-135m", device_map=_split_map(n, range(n // 2, n)), offload_folder=tmp_path)
    assert split.split and sum(v == "disk" for v in split.placement.values()) == n - n // 2
    la, ca = smollm2.run(english_64, stats=["received", "entropy"], layers=[0, n // 2, n - 1])
    lb, cb = split.run(english_64, stats=["received", "entropy"], layers=[0, n // 2, n - 1])
    assert _close(la, lb) <= 1e-5 * max(1.0, float(la.abs().max()))
    assert _close(ca["received"], cb["received"]) <= TOL and _close(ca["entropy"], cb["entropy"]) <= TOL


def test_eager_backend_and_a_gpt2_split(tiny_models, tmp_path):
    """transformers' own eager attention on a split model, and GPT-2's layout (Conv1D W_O, its own module
    names), with the first block on disk."""
    whole = tiny_models("tiny-gpt2")
    dm = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk", "transformer.h.1": "cpu",
          "transformer.ln_f": "cpu", "lm_head": "cpu"}
    split = load("tiny-gpt2", device_map=dm, offload_folder=tmp_path)
    assert split.split
    mask = whole.tokenize(TEXTS).attention_mask
    for backend in ("eager", "chunked"):
        la, ca = whole.run(TEXTS, stats=["received", "entropy"], backend=backend)
        lb, cb = split.run(TEXTS, stats=["received", "entropy"], backend=backend)
        assert _close(_real(la, mask), _real(lb, mask)) <= TOL
        assert _close(ca["received"], cb["received"]) <= TOL and _close(ca["entropy"], cb["entropy"]) <= TOL
    assert torch.equal(whole.output_weights(0), split.output_weights(0))
    assert whole.generate(TEXTS, max_new_tokens=4).new_ids == split.generate(TEXTS, max_new_tokens=4).new_ids


def test_length_buckets_on_a_split_model(pair):
    whole, split = pair
    texts = TEXTS + ["A third text, the longest of them all by a fair margin, about harbours and boats."]
    want = whole.capture(texts, stats=["received", "entropy"])
    got = split.capture(texts, stats=["received", "entropy"], max_batch_tokens=100)
    assert got.batching["batches"] >= 2
    for name in want.stats:
        assert _close(want[name], got[name]) <= TOL
