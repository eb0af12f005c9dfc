"""The benchmark harness and the generated Performance page (the benchmarks themselves are not run
here: `make bench` records them; these check that the machinery measures and reports truthfully)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import perf_page  # noqa: E402
from benchmarks import cases, harness  # noqa: E402


def test_max_differences_absolute_and_relative():
    a = [torch.tensor([1.0, 2.0]), torch.tensor(0.0)]
    b = [torch.tensor([1.0, 2.2]), torch.tensor(0.0)]
    abs_, rel = harness.max_differences(a, b)
    assert abs_ == pytest.approx(0.2) and rel == pytest.approx(0.2 / 2.2)
    with pytest.raises(ValueError, match="shapes"):
        harness.max_differences([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="values"):
        harness.max_differences([torch.zeros(2)], [])


@pytest.mark.skipif(not harness.cpu_peak_supported(), reason="no /proc/self/clear_refs here")
def test_cpu_peak_memory_sees_a_temporary_in_a_process_set_up_as_the_runner_does():
    """As in `benchmarks.run`'s memory pass: a fresh process with glibc's mmap threshold fixed (in a
    long-lived test process, freed but still resident memory can hide an allocation)."""
    import os
    import subprocess
    code = ("import torch; from benchmarks import harness; "
            "print(harness.peak_memory(lambda: torch.ones(1 << 22).sum(), torch.device('cpu')))")
    env = dict(os.environ, **{harness.MMAP_ENV: harness.MMAP_BYTES})
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    peak, n = int(out.stdout.split()[-1]), 4 << 22          # 16 MiB of float32
    assert 0.95 * n <= peak <= 1.2 * n


def test_measure_checks_agreement_and_times_both_sides():
    case = next(cases.classification_cases(torch.device("cpu"), quick=True))
    assert case.same_definition and case.name.startswith("comp-sum, tau=1")
    rec = harness.measure(case, torch.device("cpu"), min_run_time=0.01)
    assert rec["max_rel_diff"] < 1e-12                              # comp-sum at tau=1 is cross-entropy
    assert rec["ours"]["median_s"] > 0 and rec["theirs"]["median_s"] > 0
    assert rec["time_ratio"] == pytest.approx(rec["ours"]["median_s"] / rec["theirs"]["median_s"])
    json.dumps(rec)                                                 # recordable as is


def test_measure_reports_a_disagreement():
    def build(dev, dtype):
        x = torch.ones(3, dtype=dtype, device=dev)
        return (harness.Impl("a", lambda: x.sum(), lambda: [x.sum()]),
                harness.Impl("b", lambda: x.sum(), lambda: [x.sum() * 1.01]))
    rec = harness.measure(harness.Case("t", "off by 1 %", {"n": 3}, build, peer="b", same_definition=True),
                          torch.device("cpu"), min_run_time=0.01)
    assert rec["max_rel_diff"] == pytest.approx(0.01 / 1.01)


@pytest.mark.parametrize("suite", ["mfac", "optimizers"])
def test_quick_cases_run_and_agree(suite):
    for case in cases.SUITES[suite](torch.device("cpu"), quick=True):
        ours, peer = case.build(torch.device("cpu"), torch.float64)
        ours.fn()
        peer.fn()
        if case.same_definition:
            assert harness.max_differences(ours.values(), peer.values())[1] < 1e-8, case.key


@pytest.mark.parametrize("suite,peer", [("contrastive", "pytorch_metric_learning"), ("metric", "pytorch_metric_learning"),
                                        ("unpg", "pytorch_metric_learning"), ("isogclr", "libauc")])
def test_quick_peer_cases_agree(suite, peer):
    pytest.importorskip(peer)          # the bench extra; not installed by `make test`
    for case in cases.SUITES[suite](torch.device("cpu"), quick=True):
        ours, theirs = case.build(torch.device("cpu"), torch.float64)
        if case.same_definition:
            assert harness.max_differences(ours.values(), theirs.values())[1] < 1e-8, case.key
        else:
            ours.fn()
            theirs.fn()


def _doc(records, hardware="Test CPU, 2 threads"):
    return {"hardware": hardware, "device": "cpu", "date": "2026-12-02", "commit": "abc123", "torch": "2.13.0",
            "threads": 2, "peers": {"pytorch-metric-learning": "2.9.0", "libauc": None}, "records": records}


def _rec(name, ours_s, theirs_s, n, why=None, suite="contrastive"):
    r = {"suite": suite, "name": name, "sizes": {"N": n, "D": 128}, "peer": "peer X",
         "ours": {"median_s": ours_s, "peak_bytes": 3 << 20}, "theirs": {"median_s": theirs_s, "peak_bytes": 1 << 20},
         "time_ratio": ours_s / theirs_s, "memory_ratio": 3.0, "max_rel_diff": 1e-15}
    if why:
        r["why"] = why
    return r


def test_page_is_generated_from_the_results(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    oom = _rec("InfoNCE", 0.05, 1.0, 4096)
    oom["theirs"] = {"label": "peer", "error": "out of memory"}
    oom["time_ratio"] = oom["memory_ratio"] = None
    recs = [_rec("InfoNCE", 0.002, 0.004, 256), _rec("InfoNCE", 0.010, 0.005, 1024, why="because of Y"), oom]
    (res / "cpu.json").write_text(json.dumps(_doc(recs)))
    text = perf_page.page("# P\n\n" + perf_page.MARKER + "\n", res, tmp_path / "figures")
    assert perf_page.MARKER not in text and "## Test CPU, 2 threads" in text and "2026-12-02" in text
    assert "| InfoNCE | N=256, D=128 | 2 ms / 4 ms | 0.50× | 3.0 MiB / 1.0 MiB | **3.00×** | 1e-15 |" in text
    assert "Compared with peer X." in text
    assert "| **2.00×** |" in text and "**3.00×**" in text                       # over 1.2: bold
    assert "because of Y" in text and "1e-15" in text
    assert "| InfoNCE | N=4,096, D=128 | 50 ms / out of memory | – |" in text
    assert (tmp_path / "figures" / "performance-cpu.png").stat().st_size > 10_000
    assert "figures/performance-cpu.png" in text


def test_page_without_results_says_so_and_needs_its_marker(tmp_path):
    assert "make bench" in perf_page.render(tmp_path)
    with pytest.raises(ValueError, match="marker|must contain"):
        perf_page.page("# no marker", tmp_path)
    (tmp_path / "cpu.json").write_text(json.dumps({"hardware": "x"}))
    with pytest.raises(ValueError, match="date"):
        perf_page.load(tmp_path)


def test_recorded_results_load_and_every_slow_case_is_explained():
    docs = perf_page.load()
    for doc in docs:
        for r in doc["records"]:
            if (r.get("time_ratio") or 0) > perf_page.SLOW and r.get("same_definition"):
                assert r.get("why"), f"{r['name']} {r['sizes']}: slower than its peer with no recorded reason"
