"""Smoke test of the benchmark harness (bench/run.py) on a tiny sweep: it must write valid CSV and
JSON (with the run's metadata) and PNG plots, measure a plausible peak memory, and record a
provider that fails, exceeds the memory cap or the timeout as ERROR / OOM / TIMEOUT (skipping the
larger N of that provider) instead of crashing."""
import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    # appended, not prepended: the `bench` package comes from the tree, fused_pairloss from the
    # installed wheel (the tree has no built library; spawned workers inherit this sys.path)
    sys.path.append(ROOT)

from bench import run as bench_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(prefix):
    with open(prefix + "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(prefix + "results.json") as f:
        data = json.load(f)
    return rows, data


def _by(rows, **kw):
    return [r for r in rows if all(str(r[k]) == str(v) for k, v in kw.items())]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--loss", "ms", "softtriple", "--provider", "matmul", "reference", "_fail", "_oom",
            "--n", "128", "512", "--d", "32", "--repeats", "2", "--warmup", "1",
            "--mem-cap-mib", "128", "--timeout", "120", "--out", str(out), "--tag", "tiny",
            "--device", "cpu", "--centers-per-class", "2"]
    rc = bench_run.main(argv)
    return rc, str(out / "tiny_"), argv


def test_writes_csv_json_png(sweep):
    rc, prefix, argv = sweep
    assert rc == 0
    rows, data = _read(prefix)
    # 2 losses x 2 N x 4 providers, every one recorded
    assert len(rows) == 16 and len(data["records"]) == 16
    assert list(rows[0].keys()) == bench_run.CSV_FIELDS
    meta = data["meta"]
    for key in ("device_name", "torch", "triton", "fused_pairloss", "date", "command", "dtype"):
        assert key in meta, key
    assert meta["command"].endswith(" ".join(argv))
    assert meta["device"] == "cpu" and meta["d"] == 32
    for name in ("time.png", "memory.png"):
        with open(prefix + name, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_ok_points_have_times_memory_and_ratios(sweep):
    _, prefix, _ = sweep
    rows, _ = _read(prefix)
    for r in _by(rows, provider="matmul") + _by(rows, provider="reference"):
        assert r["status"] == "OK", r
        fwd, bwd, tot = float(r["fwd_ms"]), float(r["bwd_ms"]), float(r["fwdbwd_ms"])
        assert fwd > 0 and bwd > 0 and tot > 0
        assert float(r["fwdbwd_x_matmul"]) > 0
        assert r["provider"] != "reference" or r["loss_value"] != ""
    for r in _by(rows, provider="matmul"):
        assert float(r["fwdbwd_x_matmul"]) == pytest.approx(1.0)
    # the matmul's peak holds its N x M fp32 output (fresh process per point, RSS growth)
    mm = _by(rows, provider="matmul", loss="ms", n=512)[0]
    assert float(mm["mem_mib"]) >= 0.9 * 512 * 512 * 4 / 2**20
    assert float(mm["mem_mib"]) < 64
    # softtriple: M = C*K columns with C*K ~ N (K = 2)
    st = _by(rows, provider="matmul", loss="softtriple", n=128)[0]
    assert int(st["m"]) == 128


def test_failures_are_recorded_not_raised(sweep):
    _, prefix, _ = sweep
    rows, _ = _read(prefix)
    for loss in ("ms", "softtriple"):
        fail = _by(rows, provider="_fail", loss=loss)
        assert [r["status"] for r in fail] == ["ERROR", "ERROR"]
        assert "forced failure" in fail[0]["note"]
        oom = sorted(_by(rows, provider="_oom", loss=loss), key=lambda r: int(r["n"]))
        assert [r["status"] for r in oom] == ["OOM", "OOM"]
        assert "not run" in oom[1]["note"]  # larger N skipped after the OOM
        assert oom[0]["fwdbwd_ms"] == "" or oom[0]["note"]


def test_timeout_and_crash_are_recorded(tmp_path):
    rc = bench_run.main(["--loss", "ms", "--provider", "_sleep", "_crash", "matmul", "--n", "64", "128",
                         "--d", "16", "--repeats", "1", "--timeout", "3", "--out", str(tmp_path),
                         "--tag", "to", "--device", "cpu", "--no-plots"])
    assert rc == 0
    rows, _ = _read(str(tmp_path / "to_"))
    sl = sorted(_by(rows, provider="_sleep"), key=lambda r: int(r["n"]))
    assert [r["status"] for r in sl] == ["TIMEOUT", "TIMEOUT"]
    assert "timeout" in sl[0]["note"] and "not run" in sl[1]["note"]
    assert all(r["status"] == "OK" for r in _by(rows, provider="matmul"))
    # a worker that dies (segfault) is an ERROR for that point only; the sweep goes on
    cr = _by(rows, provider="_crash")
    assert [r["status"] for r in cr] == ["ERROR", "ERROR"] and "SIGSEGV" in cr[0]["note"]


def test_table_and_ratios_pure():
    recs = [
        dict(id=0, loss="ms", provider="matmul", n=8, m=8, status="OK", fwd_ms=1.0, bwd_ms=1.0,
             fwdbwd_ms=2.0, mem_mib=4.0, note="", loss_value=None),
        dict(id=1, loss="ms", provider="reference", n=8, m=8, status="OK", fwd_ms=3.0, bwd_ms=5.0,
             fwdbwd_ms=8.0, mem_mib=10.0, note="", loss_value=1.0),
        dict(id=2, loss="ms", provider="cpu", n=8, m=8, status="OK", fwd_ms=1.0, bwd_ms=2.0,
             fwdbwd_ms=3.0, mem_mib=1.0, note="", loss_value=1.5),
        dict(id=3, loss="ms", provider="pml", n=8, m=8, status="OOM", fwd_ms=None, bwd_ms=None,
             fwdbwd_ms=None, mem_mib=None, note="boom", loss_value=None),
    ]
    bench_run.add_ratios(recs)
    assert recs[1]["fwdbwd_x_matmul"] == 4.0 and recs[1]["fwd_x_matmul"] == 1.5
    assert recs[2]["mem_x_matmul"] == 0.25 and recs[3]["fwdbwd_x_matmul"] is None
    warn = bench_run.check_agreement(recs, "float32")
    assert len(warn) == 1 and "cpu" in warn[0] and "reference" in recs[2]["note"]
    table = bench_run.format_table(recs)
    assert "== ms ==" in table and "OOM" in table and "boom" in table


def test_readme_tables_from_results():
    """bench/tables.py: each provider's time, the fused / matmul ratio, and where the numbers come from."""
    from bench import tables

    meta = {"device": "cpu", "device_name": "Some CPU", "cpu_count": 2, "torch_threads": 2,
            "cpu_isa": "avx2", "mkl_enable_instructions": "AVX2", "torch": "2.x", "dtype": "float32",
            "d": 128, "date": "2026-12-01T00:00:00", "git_commit": "abcdef123", "command": "bench/run.py --n 8",
            "providers": ["cpu", "matmul"]}
    rec = dict(loss="ms", n=8, m=8, status="OK")
    records = [dict(rec, provider="cpu", fwdbwd_ms=30.0, mem_mib=2.0),
               dict(rec, provider="matmul", fwdbwd_ms=20.0, mem_mib=4.0),
               dict(rec, loss="circle", provider="cpu", status="TIMEOUT")]
    text = tables.table(meta, records)
    ms_row = next(line for line in text.splitlines() if line.startswith("| MS |"))
    assert "30 ms" in ms_row and "20 ms" in ms_row and "**1.50x**" in ms_row and "2 / 4 MiB" in ms_row
    assert "TIMEOUT" in next(line for line in text.splitlines() if line.startswith("| Circle |"))
    plain = tables.table(meta, records, ["cpu"], plain=True)
    assert "30 ms / 2 MiB" in plain and "x**" not in plain
    src = tables.source_line(meta)
    assert "CPU kernels avx2" in src and "MKL_ENABLE_INSTRUCTIONS=AVX2" in src and "bench/run.py --n 8" in src
