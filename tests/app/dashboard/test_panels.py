"""The panels without a browser: run comparison (what differs, difference maps, relative depth) and
report pages served only from inside the runs directory."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from attnlab.analyses.result import Result
from attnlab.app.dashboard import compare, create_app, work
from attnlab.probe import RunStore


def _scores(root, name, scores, model="smollm2-135m", **params):
    heads = pd.DataFrame({"layer": np.repeat([0, 1], 2), "head": np.tile([0, 1], 2), "score": scores,
                          "rank": [0, 1, 2, 3]})
    res = Result("retrieval", tables={"heads": heads}, params={"model": model, **params})
    return res.save(RunStore(root), name=name).name


def test_same_model_comparison_is_second_minus_first_and_lists_what_differs(tmp_path):
    runs = work.RunCache(tmp_path)
    a = runs.run(_scores(tmp_path, "a", [0.1, 0.2, 0.3, 0.4], lengths=[256]))
    b = runs.run(_scores(tmp_path, "b", [0.5, 0.2, 0.0, 0.4], lengths=[512]))
    table, figs = compare.compare_figures(a, b)
    assert len(figs) == 1 and "difference" in figs[0].layout.title.text
    np.testing.assert_allclose(np.asarray(figs[0].data[0].z, dtype=float), [[0.4, 0.0], [-0.3, 0.0]], atol=1e-12)
    assert figs[0].data[0].zmid == 0 and figs[0].data[0].zmin == -figs[0].data[0].zmax  # centred at 0
    rows = {r["what"]: (r["first"], r["second"]) for r in table.to_dict("records")}
    assert rows["parameter lengths"] == ("[256]", "[512]") and rows["model"] == ("smollm2-135m", "smollm2-135m")
    assert "parameter model" not in rows  # equal facts are not listed


def test_different_models_sit_side_by_side_on_relative_depth():
    first = (np.arange(6.0).reshape(3, 2), [0, 1, 2], [0, 1])  # 3 layers
    second = (np.arange(10.0).reshape(5, 2), [0, 1, 2, 3, 4], [0, 1])  # 5 layers
    fig = compare.side_by_side(first, second, "score", ("a", "b"))
    assert list(fig.data[0].y) == [0.0, 0.5, 1.0] and list(fig.data[1].y) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fig.data[0].zmin == fig.data[1].zmin == 0 and fig.data[0].zmax == fig.data[1].zmax == 9


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "runs"
    app = create_app(root)
    store = RunStore(root)
    store.write("report", {"name": "smollm2-135m"}, files={"report.html": "<html><body>the report</body></html>"},
                name="rep")
    _scores(root, "scores", [0.1, 0.2, 0.3, 0.4])
    (tmp_path / "secret.html").write_text("SECRET-7f3a")
    return app.server.test_client(), root, tmp_path


def test_a_report_page_is_served_and_nothing_outside_the_runs_directory(served):
    client, root, outside = served
    resp = client.get("/report/rep")
    assert resp.status_code == 200 and b"the report" in resp.data and resp.mimetype == "text/html"
    # a run that is not a report, a missing one, and every way out of the runs directory: 404, no path said
    os.symlink(outside, root / "link")  # a run name that is a symlink leaving the directory
    for url in ["/report/scores", "/report/missing", "/report/..", "/report/link", "/report/%2e%2e", "/report/.rep"]:
        resp = client.get(url)
        assert resp.status_code == 404 and b"SECRET-7f3a" not in resp.data and str(root).encode() not in resp.data, url
    for url in ["/report/..%2Fsecret.html", "/report/rep/../../secret.html", "/report/rep%2F..%2F..%2Fsecret.html"]:
        resp = client.get(url)  # not a run name: the route does not match, and Dash answers with its own page
        assert b"SECRET-7f3a" not in resp.data and b"the report" not in resp.data, url
