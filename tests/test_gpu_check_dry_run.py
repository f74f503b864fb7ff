"""bench/gpu_check.sh, the one-call GPU round, walked on the CPU (`--dry-run`), so that the script
cannot rot while no GPU is lent: every step runs (tiny sizes, the Triton interpreter, no
sanitizer: its case script runs on the CPU kernels instead) and must return 0, and what comes back
in $OUT must fit the device tool's limits (at most 8 files, each under 16 MiB).

The step list is read from the script itself (ALL_STEPS), so a step added there is checked here.
"""
import os
import re
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
SANITIZE = os.path.join(ROOT, "bench", "sanitize_small.py")


def _all_steps():
    with open(SCRIPT) as f:
        m = re.search(r"^ALL_STEPS=([\w,]+)$", f.read(), re.M)
    assert m, "ALL_STEPS= line not found in bench/gpu_check.sh"
    return m.group(1).split(",")


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable)
    for k in ("GPU_CHECK_STEPS", "GPU_CHECK_BUDGET", "GPU_CHECK_BUILD", "BENCH_ARGS", "PYTEST_ARGS",
              "BENCH_N", "BENCH_BIG_N", "KEEP_WORK", "OUT"):
        env.pop(k, None)
    env.update(extra)
    return env


def test_script_parses_and_has_help():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    p = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "--dry-run" in p.stdout and "bench_compile" in p.stdout
    p = subprocess.run(["bash", SCRIPT, "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2


def test_sanitize_case_finds_both_engines():
    p = subprocess.run([sys.executable, SANITIZE, "--device", "cpu", "--list"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    for name in ("multi_similarity_loss", "circle_loss", "soft_triple_loss", "proxy_circle_loss"):
        assert name in p.stdout


def test_dry_run_walks_every_step(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    p = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=_env(OUT=str(out)),
                       capture_output=True, text=True, timeout=900)
    wall = time.time() - t0
    tail = (p.stdout + p.stderr)[-6000:]
    print(f"gpu_check.sh --dry-run: {wall:.0f} s, rc {p.returncode}\n{tail}")
    assert p.returncode == 0, tail

    summary = (out / "summary.txt").read_text()
    status = {}
    for line in summary.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            status.setdefault(parts[0], parts[1])
    optional = set()
    if not os.path.exists(os.path.join(ROOT, "csrc", "cuda", "sanitize_case.py")):
        optional.add("memcheck_full")  # the script skips it without that file
    for name in _all_steps():
        if name in optional:
            continue
        assert status.get(name) in ("OK", "dry"), f"step {name}: {status.get(name)}\n{summary}"
    assert status.get("warm_compile") == "bg", summary
    assert re.search(r"^total \d+s; 0 step\(s\) not OK", summary, re.M), summary

    files = sorted(os.listdir(out))
    assert len(files) <= 8, files
    for f in files:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", f), f
        assert (out / f).stat().st_size < 16 * 2**20, f
    with tarfile.open(out / "results.tgz") as t:
        names = t.getnames()
    for tag in ("bfloat16_D32", "bfloat16_D32_N128", "bfloat16_D32_compile"):
        assert f"bench/results/cpu-dryrun/{tag}_results.csv" in names, names
    with tarfile.open(out / "logs.tgz") as t:
        logs = t.getnames()
    for name in set(_all_steps()) - optional:
        assert f"logs/{name}.log" in logs, logs


def test_dry_run_reports_a_skipped_step_as_failure(tmp_path):
    """A budget too small for a step: it is SKIPPED, and the exit code is 1."""
    out = tmp_path / "out"
    p = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT,
                       env=_env(OUT=str(out), GPU_CHECK_STEPS="tests_triton_dev", GPU_CHECK_BUDGET="20"),
                       capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert p.returncode == 1, summary
    assert re.search(r"^tests_triton_dev\s+SKIPPED", summary, re.M), summary
