"""Every registered intervention follows scikit-learn's estimator contract, and the registry feeds
every surface (the CLI, run_method, compare, the report and the dashboard)."""

from __future__ import annotations

import inspect

import pytest
from sklearn.base import BaseEstimator, clone

from attnlab.interventions import METHODS, Intervention
from attnlab.interventions.methods import Method, register
from attnlab.probe import AttentionEdit, AttnlabError
from attnlab.probe.tasks import span_qa
from attnlab.probe.tasks.classification import Example, from_examples

# Small fits on the real model: few units, two tuning examples. A method registered later without
# an entry here is still checked, with its own defaults and n=2.
QUICK = {
    "zerotuning": {"grid": (1.0, 2.0)},
    "act": {"candidates": [(2, 0), (5, 3)], "beta": 0.3},
    "pasta": {"k": 1, "unit": "head_index"},
    "var": {"p": 0.5},
}
REVIEWS = ["a wonderful, moving film", "dull and far too long", "the best movie of the year",
           "a tedious mess", "charming and funny", "i hated every minute", "a delight", "boring"]


@pytest.fixture(scope="module")
def tasks():
    plain = from_examples("tiny", [Example(i, t, int(i % 2 == 0)) for i, t in enumerate(REVIEWS * 2)],
                          [" negative", " positive"], instruction="Positive or negative?",
                          template="Review: {text}\nSentiment:", sizes={"calibration": 4, "dev": 4, "test": 4})
    return {"classification": plain, "span": span_qa(n=60, sizes={"calibration": 4, "dev": 4, "test": 4})}


def quick(name: str) -> dict:
    spec = METHODS[name]
    params = dict(QUICK.get(name, {}))
    known = spec.estimator().get_params()
    params.update({k: v for k, v in (("n", 2), ("batch_size", 2)) if k in known})
    return params


def test_the_registry_names_every_published_method_once():
    assert list(METHODS) == ["zerotuning", "act", "pasta", "var"]
    for name, spec in METHODS.items():
        assert isinstance(spec, Method) and spec.name == name and spec.estimator.name == name
        assert issubclass(spec.estimator, Intervention) and issubclass(spec.estimator, BaseEstimator)
        assert spec.description and spec.citation and spec.task in ("classification", "span")
        assert spec.needs_spans == spec.estimator.needs_spans
    assert [m for m, s in METHODS.items() if s.needs_spans] == ["pasta", "var"]
    assert {m: s.tuning_split for m, s in METHODS.items()} == {"zerotuning": "dev", "act": "calibration",
                                                               "pasta": "dev", "var": None}
    with pytest.raises(ValueError, match="registered twice"):
        register(METHODS["act"])
    with pytest.raises(AttnlabError, match="has no hyperparameter 'gama'"):
        METHODS["zerotuning"].make(gama=2.0)


@pytest.mark.parametrize("name", list(METHODS))
def test_hyperparameters_live_in_init_and_are_stored_unchanged(name):
    cls = METHODS[name].estimator
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in params), "keyword hyperparameters"
    assert not [p.name for p in params if p.name.endswith("_")], "no learned state among the hyperparameters"
    est = cls()
    assert est.get_params() == {p.name: p.default for p in params}
    # stored as given, the very objects (no validation or derived state in __init__)
    odd = {p.name: object() for p in params}
    assert all(v is odd[k] for k, v in cls(**odd).get_params().items())
    assert not [k for k in vars(est) if k not in odd], "__init__ sets nothing but its hyperparameters"
    assert repr(est).startswith(cls.__name__)


@pytest.mark.parametrize("name", list(METHODS))
def test_fit_returns_self_learned_attributes_end_in_underscore_and_clone_is_unfitted(name, smollm2, tasks):
    spec = METHODS[name]
    task = tasks[spec.task]
    est = spec.make(**quick(name))
    params = est.get_params()
    example = task.split("test", 1)
    tokens = smollm2.tokenize(task.prompt(example[0]))
    with pytest.raises(AttnlabError, match="call fit"):
        est.edits(tokens)
    with pytest.raises(AttnlabError, match="call fit"):
        est.evaluate(smollm2, task, n=2)

    assert est.fit(smollm2, task) is est
    learned = [k for k in vars(est) if k not in params and not k.startswith("_")]
    assert learned and all(k.endswith("_") for k in learned), learned
    assert "tuned_ids_" in learned and not set(est.tuned_ids_) & {e.id for e in task.split("test")}
    assert est.get_params() == params, "fit leaves the hyperparameters alone"

    copy = clone(est)
    assert type(copy) is type(est) and copy.get_params() == params
    assert not [k for k in vars(copy) if k not in params], "clone drops the fitted state and the caches"
    with pytest.raises(AttnlabError, match="call fit"):
        copy.edits(tokens)

    # the fitted estimator builds the edits with its own values (what compare shows)
    edits = est.edit_fn(task, example)(tokens)
    assert all(isinstance(e, AttentionEdit) for e in edits)
    chosen = est.chosen()
    assert chosen["tuned_on"] == spec.tuning_split
    if name == "act" and est.heads_:
        assert {e.op.keep for e in edits} <= {0.3} and {(e.layers[0], h) for e in edits for h in e.heads} <= \
            set(est.heads_)
    if name == "var":
        assert edits and {e.op.keep for e in edits} == {0.5}
    if name == "zerotuning":
        assert chosen["gamma"] in (1.0, 2.0) and (edits == []) == (est.gamma_ == 1.0)


def test_sizes_are_checked_against_the_registrys_tuning_split(tasks):
    from attnlab.interventions.run import check_sizes, check_task

    plain, spans = tasks["classification"], tasks["span"]
    check_sizes(spans, "var", 4, 10**6)  # VAR tunes nothing: --n-tune is not checked
    with pytest.raises(AttnlabError, match="--n-tune 5: the calibration split of tiny has 4"):
        check_sizes(plain, "act", 4, 5)
    with pytest.raises(AttnlabError, match="--n-tune 5: the dev split"):
        check_sizes(plain, "zerotuning", 4, 5)
    with pytest.raises(AttnlabError, match="use a task with spans"):
        check_task(plain, "pasta")
    with pytest.raises(AttnlabError, match="unknown method 'magic'"):
        check_sizes(plain, "magic", 1, 1)
