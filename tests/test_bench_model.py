"""benchmarks/bench_model.py's driver without TensorFlow workers: the memory
guard on a real subprocess, the skip of a configuration predicted above the
limit, and --merge adding a size to saved results (RESULTS.md section and the
README table rendered from them)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


@pytest.fixture
def bm(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_model

    return bench_model


def test_guard_kills_a_worker_passing_the_limit(bm):
    code = "import time; a = bytearray(300 * 2**20); a[::4096] = b'x' * len(a[::4096]); time.sleep(60)"
    r = bm.run_guarded([sys.executable, "-c", code], limit=100 * 2**20, timeout=50)
    assert "killed by the memory guard" in r["error"] and "passed the limit" in r["error"], r
    assert r["returncode"] < 0 and r["max_rss_seen"] > 100 * 2**20


def test_guard_records_a_death_by_signal_and_returns_results(bm):
    r = bm.run_guarded([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert r["error"].startswith("died of SIGKILL") and "OOM" in r["error"], r
    r = bm.run_guarded([sys.executable, "-c", "import sys; print('RESULT {\"x\": 1}'); sys.exit(3)"])
    assert r["error"].startswith("exit code 3"), r
    assert bm.run_guarded([sys.executable, "-c", "print('RESULT {\"x\": 1}')"]) == {"x": 1}


def fake_entry(config, n, per_row):
    """A worker's result on a line: 0.9 GB fixed + ``per_row`` bytes a row in fit, 770 bytes a row at creation."""
    return dict(config=config, rows=n, ms_per_step=1e-3 * n / per_row * 100, peak_fit=0.9e9 + per_row * n,
                peak_init=0.8e9 + 770 * n, state_bytes=n * 10, warmup=2, steps=6)


PER_ROW = {"keras_adam+keras_emb": 1650, "csadam+ks_emb": 1140, "csadam_b0+ks_emb": 470}


def saved_run(tmp_path):
    fit = [fake_entry(c, n, b) for n in (1_000_000, 4_000_000) for c, b in PER_ROW.items()]
    machine = dict(cpu="test cpu", cores=2, load_average=[3.0, 2.0, 1.0], python="3", tensorflow="t", keras="k",
                   numpy="n", fused_op_loaded=True)
    res = dict(machine=machine, sizes=[1_000_000, 4_000_000], warmup=2, steps=6, command="python first", fit=fit,
               build={"csadam": {"after": {"state_bytes": 1, "build_peak_growth": 1}}}, build_rows=2)
    (tmp_path / "bench_model.json").write_text(json.dumps(res))
    return res


def test_run_fit_skips_a_configuration_predicted_above_the_limit(bm, tmp_path, monkeypatch):
    known = saved_run(tmp_path)["fit"]
    monkeypatch.setattr(bm, "run_sub", lambda *a, **k: pytest.fail("a skipped configuration was run"))
    r = bm.run_fit("keras_adam+keras_emb", 16_000_000, 2, 6, known=known, limit=20 * GIB)
    pred = (0.9e9 + 1650 * 16_000_000)
    assert r["predicted"]["peak_fit"] == pytest.approx(pred) and r["predicted"]["from_rows"] == [1_000_000, 4_000_000]
    assert r["skipped"] == f"does not fit: predicted {pred / GIB:.1f} GiB > limit 20 GiB" and "ms_per_step" not in r


def test_merge_adds_a_size_and_renders_all_three(bm, tmp_path, monkeypatch):
    common = bm.common
    old = saved_run(tmp_path)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n\n<!-- bench_model_table:start -->\nold table\n"
                      "<!-- bench_model_table:end -->\n\nafter\n")
    monkeypatch.setattr(bm, "README", readme)
    monkeypatch.setattr(common, "machine_info", lambda: dict(old["machine"], load_average=[5.0, 4.0, 3.0]))
    monkeypatch.setattr(bm, "mem_available", lambda: 30 * GIB)
    monkeypatch.setattr(bm, "mem_total", lambda: 24 * GIB)
    ran = []

    def run_sub(args, limit=None, **kw):
        config, n = args[1], int(args[2])
        ran.append((config, n))
        return fake_entry(config, n, PER_ROW[config] * 1.01)

    monkeypatch.setattr(bm, "run_sub", run_sub)
    with pytest.raises(SystemExit, match="--warmup 2 --steps 3 differ"):
        bm.main(["--sizes", "16000000", "--merge", "--steps", "3"])
    res = bm.main(["--sizes", "16000000", "--merge", "--limit-gib", "20", "--configs", ",".join(PER_ROW),
                   "--note", "other agents running"])
    assert ran == [("csadam+ks_emb", 16_000_000), ("csadam_b0+ks_emb", 16_000_000)]
    saved = json.loads((tmp_path / "bench_model.json").read_text())
    assert saved["sizes"] == [1_000_000, 4_000_000, 16_000_000] == res["sizes"]
    assert [r for r in saved["fit"] if r["rows"] < 16_000_000] == old["fit"] and saved["build"] == old["build"]
    [base] = [r for r in saved["fit"] if r["rows"] == 16_000_000 and r["config"] == "keras_adam+keras_emb"]
    assert base["skipped"].startswith("does not fit: predicted 25.") and [r["command"] for r in saved["runs"]][0] == \
        "python first"
    md = (tmp_path / "RESULTS.md").read_text()
    assert all(f"N = {n:,} rows" in md for n in saved["sizes"]) and "other agents running" in md
    assert "ratios here are against **CSAdam() + keras_sketch Embedding**" in md
    assert "not run (does not fit: predicted 25." in md and "(predicted)" in md
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- bench_model_table:start -->\n") and text.endswith(
        "<!-- bench_model_table:end -->\n\nafter\n") and "old table" not in text
    flat = " ".join(text.split())  # the sentence is wrapped
    assert "N=16M: ms/step (speed-up)" in text and "ratios at N=16M are against CSAdam() + our Embedding" in flat
    [row] = [ln for ln in text.splitlines() if ln.startswith("| CSAdam() + our Embedding |")]
    assert row.endswith(f"(1.0x) | {(0.9e9 + 1140 * 1.01 * 16_000_000) / GIB:.2f} (1.00x) |"), row
    [row] = [ln for ln in text.splitlines() if ln.startswith("| Keras Adam + Keras Embedding |")]
    assert "not run (pred." in row and "pred. 25." in row
    # merging the same size again replaces its entries rather than adding copies
    bm.main(["--sizes", "16000000", "--merge", "--limit-gib", "20", "--configs", "csadam_b0+ks_emb"])
    saved = json.loads((tmp_path / "bench_model.json").read_text())
    assert sum(r["rows"] == 16_000_000 for r in saved["fit"]) == 3 and len(saved["runs"]) == 3
