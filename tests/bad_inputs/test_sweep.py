"""Bad sweep specs: each is one SpecError (an AttnlabError) naming the spec file, the key and the fix,
raised by `load_spec` before anything runs (no Ray, no model); on the command line, one line on
stderr and exit code 2, with nothing written in the store."""

from __future__ import annotations

import sys
import textwrap

import pytest

import attnlab.probe
from attnlab.app import cli, sweep
from attnlab.probe import AttnlabError

GOOD = """\
models: [tiny-llama]
inputs: [{text: "The cat sat on the mat."}]
analyses: [{name: sinks}]
"""

# (id, spec text (YAML unless the id ends in .toml/.json), the key the message names, a fragment of the fix)
CASES = [
    ("empty", "", None, "is empty"),
    ("a list", "- tiny-llama\n", None, "not a mapping"),
    ("unknown top-level key", GOOD + "modles: [tiny-llama]\n", "'modles'", "not a sweep spec key"),
    ("no models", "inputs: [{text: a}]\nanalyses: [{name: sinks}]\n", "'models'", "is missing"),
    ("empty models", GOOD.replace("[tiny-llama]", "[]"), "'models'", "is empty"),
    ("unknown model", GOOD.replace("tiny-llama", "gpt-17"), "'models[0]'", "unknown model 'gpt-17'"),
    ("a model twice", GOOD.replace("[tiny-llama]", "[tiny-llama, tiny-llama]"), "'models'", "twice"),
    ("no job", "models: [tiny-llama]\ninputs: [{text: a}]\n", "'analyses'", "at least one of"),
    ("unknown analysis", GOOD.replace("sinks", "sinkz"), "'analyses[0].name'", "no registered analysis"),
    ("unknown parameter", GOOD.replace("{name: sinks}", "{name: sinks, params: {epsilon: 0.3}}"),
     "'analyses[0].params.epsilon'", "no parameter of sinks"),
    ("out of range", GOOD.replace("{name: sinks}", "{name: sinks, params: {eps: 1.5}}"),
     "'analyses[0].params.eps'", "out of range"),
    ("wrong type in a grid", GOOD.replace("{name: sinks}", "{name: sinks, grid: {T: [32, many]}}"),
     "'analyses[0].grid.T[1]'", "whole number"),
    ("empty grid axis", GOOD.replace("{name: sinks}", "{name: sinks, grid: {eps: []}}"),
     "'analyses[0].grid.eps'", "non-empty list"),
    ("a key in params and grid", GOOD.replace("{name: sinks}", "{name: sinks, params: {eps: 0.3}, grid: {eps: [0.5]}}"),
     "'analyses[0].grid.eps'", "in one place"),
    ("no text for a text analysis", GOOD.replace('[{text: "The cat sat on the mat."}]', "[{task: sst2}]"),
     "'inputs'", "no text input"),
    ("a missing file", GOOD.replace('{text: "The cat sat on the mat."}', "{file: nowhere.txt}"),
     "'inputs[0].file'", "relative to the spec file"),
    ("two kinds in one input", GOOD.replace('{text: "The cat sat on the mat."}', '{text: a, file: b.txt}'),
     "'inputs[0]'", "exactly one of"),
    ("unknown task", GOOD.replace('{text: "The cat sat on the mat."}', "{task: poetry}"),
     "'inputs[0].task'", "no known task"),
    ("an input name twice",
     GOOD.replace('[{text: "The cat sat on the mat."}]', "[{name: a, text: x}, {name: a, text: y}]"),
     "'inputs'", "twice"),
    ("unknown hyperparameter", "models: [tiny-llama]\ninputs: [{task: span_qa}]\n"
                               "methods: [{name: zerotuning, params: {gama: 2}}]\n",
     "'methods[0].params.gama'", "no option of zerotuning"),
    ("a span method without a span task", "models: [tiny-llama]\ninputs: [{task: sst2}]\nmethods: [{name: pasta}]\n",
     "'inputs'", "span_qa"),
    ("a bad run option", "models: [tiny-llama]\ninputs: [{task: span_qa}]\nmethods: [{name: var, params: {n: 0}}]\n",
     "'methods[0].params.n'", "at least 1"),
    ("a bad run option in a grid", "models: [tiny-llama]\ninputs: [{task: span_qa}]\n"
                                   "methods: [{name: var, grid: {seed: [0, 1, -1]}}]\n",
     "'methods[0].grid.seed[2]'", "at least 0"),
    ("a bad capture option in a grid", GOOD.replace("analyses: [{name: sinks}]",
                                                    "captures: [{grid: {backend: [auto, fast]}}]"),
     "'captures[0].grid.backend[1]'", "choose from"),
    ("a zero token budget for a capture",
     GOOD.replace("analyses: [{name: sinks}]", "captures: [{max_batch_tokens: 0}]"),
     "'captures[0].max_batch_tokens'", "whole number of at least 1 (got 0): the padded tokens"),
    ("a capture batch size that is no number", GOOD.replace("analyses: [{name: sinks}]",
                                                            "captures: [{grid: {batch_size: [4, true]}}]"),
     "'captures[0].grid.batch_size[1]'", "whole number of at least 1 (got True): the texts one batch"),
    ("unknown statistic", GOOD.replace("analyses: [{name: sinks}]", "captures: [{stats: [recieved]}]"),
     "'captures[0].stats'", "unknown statistic"),
    ("a bad sweep name", "name: my sweep\n" + GOOD, "'name'", "cannot name a sweep"),
    ("a missing plugin", "plugins: [nowhere.py]\n" + GOOD, "'plugins[0]'", "no file"),
    ("bad YAML", GOOD + "analyses: [{name: sinks\n", None, "not valid YAML at line"),
    ("bad TOML.toml", 'models = ["tiny-llama"\n', None, "not valid TOML"),
    ("another format.json", '{"models": ["tiny-llama"]}', None, "write the spec as .yaml, .yml or .toml"),
]


def write(tmp_path, case_id: str, text: str):
    suffix = ".toml" if case_id.endswith(".toml") else ".json" if case_id.endswith(".json") else ".yaml"
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: pytest.fail("a model was loaded for a spec check"))


@pytest.mark.parametrize("case_id, text, key, fragment", CASES, ids=[c[0] for c in CASES])
def test_a_bad_spec_is_one_error_naming_the_key(tmp_path, no_model_load, case_id, text, key, fragment):
    path = write(tmp_path, case_id, text)
    with pytest.raises(AttnlabError) as raised:
        sweep.load_spec(path)
    message = str(raised.value)
    assert message.startswith(str(path)) or str(path) in message
    if key is not None:
        assert f"key {key}" in message, message
    assert fragment in message, message
    assert "\n" not in message


def test_the_same_spec_in_toml_and_in_yaml_plans_the_same_cells(tmp_path):
    yaml_spec = tmp_path / "grid.yaml"
    yaml_spec.write_text(GOOD + "captures: [{stats: [received, entropy]}]\n")
    toml_spec = tmp_path / "grid.toml"
    toml_spec.write_text(textwrap.dedent("""\
        models = ["tiny-llama"]
        inputs = [{text = "The cat sat on the mat."}]
        analyses = [{name = "sinks"}]
        captures = [{stats = ["received", "entropy"]}]
        """))
    a, b = sweep.load_spec(yaml_spec), sweep.load_spec(toml_spec)
    assert [c.id for c in a.cells] == [c.id for c in b.cells] and len(a.cells) == 2


def test_a_cell_id_follows_the_input_content_and_the_full_parameters(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(GOOD)
    base = sweep.load_spec(spec).cells[0].id
    spec.write_text(GOOD.replace("{name: sinks}", "{name: sinks, params: {eps: 0.3}}"))  # the default, spelled out
    assert sweep.load_spec(spec).cells[0].id == base
    spec.write_text(GOOD.replace("{name: sinks}", "{name: sinks, params: {eps: 0.4}}"))
    assert sweep.load_spec(spec).cells[0].id != base
    spec.write_text(GOOD.replace("mat.", "hat."))
    assert sweep.load_spec(spec).cells[0].id != base


def test_batch_options_enter_a_cell_id_only_where_the_spec_gives_them(tmp_path):
    spec = tmp_path / "ids.yaml"
    plain = GOOD.replace("[{name: sinks}]", "[{name: sinks, params: {T: 32}}]") + \
        "captures: [{stats: [received, entropy]}]\n"
    spec.write_text(plain)
    # the ids these cells had before sinks' batch_size and the capture's batch options existed
    assert [c.id for c in sweep.load_spec(spec).cells] == ["25716a54dc20827a", "fc2a8884474b98b2"]
    assert "batch_size" not in sweep.load_spec(spec).cells[0].params
    spec.write_text(plain.replace("T: 32}", "T: 32, batch_size: 2}").replace("entropy]", "entropy], batch_size: 2"))
    given = sweep.load_spec(spec).cells
    assert [c.params["batch_size"] for c in given] == [2, 2]
    assert "25716a54dc20827a" != given[0].id and "fc2a8884474b98b2" != given[1].id
    spec.write_text(plain.replace("entropy]", "entropy], max_batch_tokens: 4096"))
    assert sweep.load_spec(spec).cells[1].params["max_batch_tokens"] == 4096


# ----- the command line -----
def run_main(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["attnlab", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: ["sweep", str(tmp / "missing.yaml")], "does not exist"),
    (lambda tmp: ["sweep", str(tmp)], "is a directory"),
    (lambda tmp: ["sweep", str(tmp / "bad.yaml")], "key 'analyses[0].name'"),
    (lambda tmp: ["sweep", str(tmp / "good.yaml"), "--workers", "0"], "--workers must be at least 1"),
    (lambda tmp: ["sweep", str(tmp / "good.yaml"), "--store", str(tmp / "a_file")], "is a file, not a folder"),
])
def test_a_bad_sweep_command_fails_in_one_line(monkeypatch, capsys, tmp_path, no_model_load, make_args, fragment):
    (tmp_path / "bad.yaml").write_text(GOOD.replace("sinks", "sinkz"))
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setattr(sweep, "_ray", lambda: pytest.fail("Ray was started for a bad command"))
    code, out, err = run_main(monkeypatch, capsys, make_args(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_sweep_without_ray_names_the_extra_to_install(monkeypatch, capsys, tmp_path, no_model_load):
    (tmp_path / "good.yaml").write_text(GOOD)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, out, err = run_main(monkeypatch, capsys, ["sweep", str(tmp_path / "good.yaml"), "--store",
                                                     str(tmp_path / "runs")])
    assert code == 2 and "pip install 'attnlab[sweep]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_address_without_a_ray_cluster_is_one_line(monkeypatch, capsys, tmp_path, no_model_load):
    ray = pytest.importorskip("ray")

    def no_cluster(*args, **kwargs):  # what ray.init raises where no cluster answers (without waiting for it)
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    (tmp_path / "good.yaml").write_text(GOOD)
    code, out, err = run_main(monkeypatch, capsys, ["sweep", str(tmp_path / "good.yaml"), "--store",
                                                     str(tmp_path / "runs"), "--address", "auto"])
    assert code == 2 and "Ray could not start at --address auto" in err and len(err.strip().splitlines()) == 1, err
