"""The benchmark suite and the examples, run tiny so they cannot rot.

Runs ``benchmarks/run_all.py --quick`` and each example with tiny flags in
this process (one TensorFlow start-up), writing only to temporary or
``*_quick`` outputs.  About a minute or two on 2 cores.
"""

import importlib
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def script(monkeypatch):
    """Imports ``benchmarks/<name>.py`` or ``examples/<name>.py`` as ``python <file>`` would see it:
    its own folder first on the path (for the benchmarks' sibling ``common``), for this test only."""

    def load(folder, name):
        monkeypatch.syspath_prepend(str(ROOT / folder))
        return importlib.import_module(name)

    return load


def test_run_all_quick(tmp_path, monkeypatch, script):
    common = script("benchmarks", "common")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    run_all = script("benchmarks", "run_all")
    monkeypatch.setattr(run_all, "PLOTS", tmp_path / "plots")
    out = run_all.main(["--quick", "--markdown"])
    mem, qual, speed = out["memory"], out["quality"], out["speed"]
    adam = mem["state"]["0.2"]["Adam (keras)"]
    # Sketched state is smaller than Adam's, and smaller again at c=0.05.
    for name in ("CSAdam-MV (sketched m and v)", "CSAdam-V (exact m, sketched v)"):
        assert mem["state"]["0.2"][name] < adam
        assert mem["state"]["0.05"][name] < mem["state"]["0.2"][name]
    assert all(v and v["bytes"] > 0 for v in mem["peak_rss"].values())
    for runs in qual["runs"].values():
        assert runs and all(math.isfinite(r["test_ppl"]) for r in runs.values())
    for case in ("sparse", "dense"):
        assert speed[case]["Adam (keras)"] > 0 and len(speed[case]) >= 6
    text = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- run_all:start -->" in text and "### Speed" in text
    assert {p.name for p in out["plots"]} == {"memory_quick.png", "quality_quick.png", "speed_quick.png"}
    for s in ("memory", "quality", "speed"):
        json.loads((tmp_path / "tmp" / f"{s}_quick.json").read_text())


def test_defaults_study_quick(tmp_path, script):
    study = script("benchmarks", "defaults_study")
    res = study.main(["--quick", "--out", str(tmp_path / "ds.json"), "--no-markdown"])
    assert set(res["runs"]) == {"adam", "default"}
    assert "mv" in res["dense"]["configs"]


def test_adaptive_rates_walks_to_the_best(script):
    study = script("benchmarks", "defaults_study")
    calls = []

    def f(lr):
        calls.append(lr)
        return abs(math.log(lr / 4e-3))

    res = study.adaptive_rates(f, [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], (8e-3, 1.6e-2))
    assert min(res, key=res.get) == 4e-3 and calls == [8e-3, 1.6e-2, 4e-3, 2e-3]


def test_lm_example_tiny(tmp_path, script):
    ex = script("examples", "lm_wikitext2")
    res = ex.main(["--layers", "1", "--hidden", "16", "--epochs", "1", "--max-tokens", "6000", "--vocab", "300",
                   "--optimizers", "adam,csadam", "--min-rows", "100", "--verbose", "2", "--batch", "10",
                   "--output", str(tmp_path / "lm")])
    assert [r["optimizer"] for r in res] == ["adam", "csadam"]
    assert res[1]["state_bytes"] < res[0]["state_bytes"]
    assert (tmp_path / "lm.png").exists()


def test_extreme_classification_tiny(tmp_path, script):
    ex = script("examples", "extreme_classification")
    res = ex.main(["--classes", "3000", "--features", "2000", "--train-examples", "2000", "--test-examples", "300",
                   "--num-sampled", "32", "--dim", "16", "--epochs", "1", "--min-rows", "1000", "--verbose", "2",
                   "--optimizers", "adam,csadam-v0@0.05", "--output", str(tmp_path / "xc")])
    assert res[1]["state_bytes"] < res[0]["state_bytes"]
    assert res[1]["max_batch_in_budget"] > res[0]["max_batch_in_budget"]
    assert (tmp_path / "xc.png").exists()


def test_image_example_tiny(tmp_path, script):
    pytest.importorskip("sklearn")
    ex = script("examples", "image_classification")
    res = ex.main(["--epochs", "1", "--max-train", "256", "--optimizers", "rmsprop,csrmsprop", "--verbose", "2",
                   "--output", str(tmp_path / "img")])
    assert res[1]["state_bytes"] < res[0]["state_bytes"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in res)
    assert (tmp_path / "img.png").exists()


def test_bench_communication_tasks_build_and_grid_sizes_keep_the_budget(script):
    """The LM task's imports resolve (its `lm_data` module had moved, breaking
    `--task lm`), and the `--rows`/`--kdiv` variants keep every sketch config at
    its bytes budget (a loop variable once shadowed `rows`)."""
    import argparse

    from keras_sketch.optimizers.sketched_sgd import DEFAULT_ROWS, P_CANDIDATES

    bench = script("benchmarks", "bench_communication")
    args = argparse.Namespace(steps=2, batch=4, lr=None)
    for name in ("lm", "embedding"):
        task = bench.TASKS[name](args)
        assert task["make_model"]().count_params() > 1000
    d = 218_832
    for rows, kdiv, p in ((None, None, None), (1, None, None), (1, 2, None), (3, 1, None), (5, 4, 8), (1, 0.5, 2), (1, None, 4)):
        for name, ratio, kw in bench.configs(d, 2, rows, kdiv, p):
            if ratio is None or kw["mode"] == "local_topk":
                continue
            from keras_sketch.optimizers.sketched_sgd import sketch_sizes

            r, c, k = sketch_sizes(d, kw["compression"], kw["mode"], kw.get("rows"), kw.get("columns"), kw.get("k"))
            assert r == (rows or DEFAULT_ROWS), name
            floats = r * c + ((p or P_CANDIDATES) * k if kw["mode"] == "two_round" else 0)
            assert 0.9 * ratio <= d / floats <= 1.1 * ratio, (name, r, c, k)
    # RESULTS.md's `_rows5_kc4(_P8)` lines are the earlier rule's shapes (5 x 1094, k 273; 5 x 781, k 195) ...
    old = {n: kw for n, _, kw in bench.configs(d, 2, 5, 4, 8)}
    assert (old["fetchsgd_40x_rows5_kc4"]["columns"], old["fetchsgd_40x_rows5_kc4"]["k"]) == (1094, 273)
    assert (old["two_round_40x_rows5_kc4_P8"]["columns"], old["two_round_40x_rows5_kc4_P8"]["k"]) == (781, 195)
    # ... and the current rule's 40x is what the `_rows1_kc2` (`_P2`) lines ran.
    named = {n: kw for n, _, kw in bench.configs(d, 2, 1, 2, 2)}
    for mode, name in (("fetchsgd", "fetchsgd_40x_rows1_kc2"), ("two_round", "two_round_40x_rows1_kc2_P2")):
        assert sketch_sizes(d, 40, mode) == (1, named[name]["columns"], named[name]["k"]), mode


def test_lazy_study_quick_runs_and_catch_up_tracks_dense_adam(tmp_path, monkeypatch):
    """benchmarks/lazy_study.py at tiny size: every config trains through
    budget_study's loop, and catch-up (flushed before each evaluation) lands
    next to dense Adam, nearer than a loose bound."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import lazy_study

    out = str(tmp_path / "lazy.json")
    results = lazy_study.main(["--quick", "--configs", "dense,lazy,catchup", "--lrs", "0.03", "--out", out])
    runs = results["tasks"]["recsys"]["runs"]
    score = {name: runs[name]["0.03"]["0"]["score"] for name in ("dense", "lazy", "catchup")}
    assert all(math.isfinite(v) for v in score.values()), score
    assert abs(score["catchup"] - score["dense"]) <= 0.01 * score["dense"], score
