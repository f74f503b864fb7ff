"""bench/image_text.py end to end at a tiny size, timing only (the memory points are one fresh
process each: slow to start): every provider runs, the fused values equal open_clip's, and the
CSV / JSON are written."""
import json
import os
import subprocess
import sys
from pathlib import Path

from image_text_kit import open_clip_loss

ROOT = Path(__file__).resolve().parents[1]


def test_bench_image_text_tiny(tmp_path):
    open_clip_loss()  # skips without open-clip-torch
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "image_text.py"), "--b", "48", "--d", "8", "--reps", "1",
                        "--threads", "1", "--no-memory", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((tmp_path / "image_text_D8_float32_1t.json").read_text())
    rows = {r["provider"]: r for r in data["rows"]}
    assert set(rows) == {"matmul", "clip_fused", "clip_chunked", "clip_open_clip", "siglip_fused",
                         "siglip_chunked", "siglip_open_clip"}
    for kind in ("clip", "siglip"):
        fused = rows[f"{kind}_fused"]
        assert fused["value_rel_diff"] < 1e-5 and fused["total_ms"] > 0
    for kind in ("clip", "siglip"):
        theirs = rows[f"{kind}_open_clip"]["value"]
        assert abs(rows[f"{kind}_chunked"]["value"] - theirs) < 1e-5 * theirs
    assert (tmp_path / "image_text_D8_float32_1t.csv").exists()


def test_distributed_step_image_text_tiny(tmp_path):
    """bench/distributed_step.py's image-text path on 2 gloo ranks at a tiny size (SigLIP: its ring
    exchanges; ClipLoss differs only in its constructor there): every point runs, ours and
    open_clip's rank losses agree (the same mode), and the results are written."""
    open_clip_loss()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = ["--loss", "siglip", "--rank-threads", str(os.cpu_count()), "--n", "32", "--d", "8", "--pml-max-n", "32",
            "--warmup", "1", "--reps", "1", "--min-reps", "1", "--dist-reps", "1", "--out", str(tmp_path)]
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "distributed_step.py"), *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads((tmp_path / "distributed_step_W2_D8.json").read_text())["rows"]
    for loss in ("siglip",):
        by = {(r["impl"], r["mode"]): r for r in rows if r["loss"] == loss}
        assert {("fused", "distributed"), ("pml", "distributed"), ("fused", "single"), ("pml", "single")} <= set(by)
        for mode in ("distributed", "single"):
            ours, theirs = by[("fused", mode)]["first_value"], by[("pml", mode)]["first_value"]
            assert abs(ours - theirs) <= 1e-5 * abs(theirs), (loss, mode, ours, theirs)
