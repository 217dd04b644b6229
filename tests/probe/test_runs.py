"""Runs on disk: round trip, atomic writes, no pickle."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from attnlab.analyses import Result
from attnlab.probe import AttnlabError, RunStore


@pytest.fixture(scope="module")
def capture(smollm2):
    return smollm2.capture(["A first text, a bit longer.", "Second."], stats=["received", "entropy", "pooled(4)", "top_key"])


def test_capture_round_trip(tmp_path, smollm2, capture):
    store = RunStore(tmp_path)
    path = store.save_capture(capture, smollm2)
    run = store.load(path)
    m = run.manifest
    assert m["kind"] == "capture" and m["prepend_bos"] is True
    assert m["model"]["name"] == "smollm2-135m" and len(m["model"]["weights_sha256"]) == 64
    assert m["tokenizer"]["bos_token"] == "<|im_start|>"
    assert m["versions"]["torch"].startswith("2.")
    assert m["tensors"]["received"]["dims"] == ["batch", "layer", "head", "key"]
    assert m["parameters"] == {"pooled": 4}
    back = run.capture()
    assert back.layers == capture.layers and back.heads == capture.heads and back.kv_heads == capture.kv_heads
    assert torch.equal(back.tokens.input_ids, capture.tokens.input_ids)
    assert torch.equal(back.tokens.attention_mask, capture.tokens.attention_mask)
    assert back.tokens.strings == capture.tokens.strings and back.tokens.texts == capture.tokens.texts
    for name, t in capture.stats.items():
        assert torch.equal(torch.isnan(back[name].float()), torch.isnan(t.float())), name
        torch.testing.assert_close(back[name], t, equal_nan=True)
    pd.testing.assert_frame_equal(run.tables["heads"], capture.head_summary())


def test_the_tokens_table_is_one_row_per_batch_and_position_as_the_row_by_row_definition(tiny_models):
    from attnlab.probe.runs import TOKEN_COLUMNS, tokens_table

    probe = tiny_models("tiny-llama")
    tok = probe.tokenize(["A first text, a bit longer than the next.", "Second.", "Third one here."])
    assert tok.padded  # pads: '' strings, (-1, -1) offsets, real False
    B, N = tok.input_ids.shape
    rows = [(b, i, int(tok.input_ids[b, i]), tok.strings[b][i], bool(tok.attention_mask[b, i]),
             int(tok.offsets[b][i][0]), int(tok.offsets[b][i][1])) for b in range(B) for i in range(N)]
    want = pd.DataFrame(rows, columns=list(TOKEN_COLUMNS))
    pd.testing.assert_frame_equal(tokens_table(tok), want, check_exact=True)

    tok.strings[1] = tok.strings[1][:-1]  # a row short of strings is refused, never shifted
    with pytest.raises(AttnlabError, match=r"row 1 has .* strings"):
        tokens_table(tok)


def test_run_files_are_plain_formats_only(tmp_path, smollm2, capture):
    path = RunStore(tmp_path).save_capture(capture, smollm2)
    suffixes = {p.suffix for p in path.iterdir()}
    assert suffixes <= {".json", ".parquet", ".safetensors"}
    json.loads((path / "manifest.json").read_text())


def test_interrupted_write_leaves_nothing(tmp_path, smollm2, capture, monkeypatch):
    store = RunStore(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("attnlab.probe.runs.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save_capture(capture, smollm2)
    assert list(tmp_path.iterdir()) == [], "no run directory and no temporary left behind"
    assert store.list().empty


def test_result_round_trip_and_listing(tmp_path, smollm2):
    res = Result("demo", tables={"heads": pd.DataFrame({"layer": [0, 1], "head": [2, 3], "score": [0.5, 0.25]})},
                 tensors={"map": torch.arange(6.0).view(2, 3)}, tensor_dims={"map": ("layer", "head")},
                 params={"eps": 0.3}, summary="two heads", prepend_bos=True)
    store = RunStore(tmp_path)
    path = res.save(store, smollm2)
    back = Result.load(store.load(path.name))
    assert back.analysis == "demo" and back.params == {"eps": 0.3} and back.summary == "two heads"
    pd.testing.assert_frame_equal(back.tables["heads"], res.tables["heads"])
    assert torch.equal(back.tensors["map"], res.tensors["map"]) and back.tensor_dims["map"] == ("layer", "head")
    listing = store.list()
    assert listing["name"].tolist() == [path.name] and listing["kind"].tolist() == ["demo"]


def test_loading_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(AttnlabError, match="not a run directory"):
        RunStore(tmp_path).load(tmp_path)
