"""examples/train.py for a few steps: single process (fused and PML give the same run), and two
gloo processes under torchrun (DDP + DistributedLossWrapper give the single-process run)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
FEW = ["--epochs", "2", "--max-steps", "3", "--batch-size", "128", "--no-progress"]


def load_example():
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def finite(history):
    assert len(history) == 2
    for rec in history:
        for k in ("loss", "recall_at_1", "map_at_r", "step_ms", "peak_mib"):
            assert math.isfinite(rec[k]), (k, rec)
        assert 0 <= rec["recall_at_1"] <= 1 and 0 <= rec["map_at_r"] <= 1


@pytest.mark.parametrize("args", [["--loss", "ms"], ["--loss", "ms_mined", "--memory-size", "512"],
                                  ["--loss", "softtriple"]], ids=["ms", "ms_mined_xbm", "softtriple"])
def test_single_process_fused_equals_pml(args, capsys):
    train = load_example()
    fused = train.main(["--impl", "fused", *args, *FEW])
    pml = train.main(["--impl", "pml", *args, *FEW])
    finite(fused)
    for a, b in zip(fused, pml):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["recall_at_1"] == pytest.approx(b["recall_at_1"], abs=0.01)
    out = capsys.readouterr().out
    assert "R@1" in out and "MAP@R" in out and "step" in out and "peak" in out


def test_torchrun_two_processes(tmp_path):
    """The two-process run (global batch 128 split 64 / 64) trains the same model as one process:
    the per-epoch losses agree."""
    train = load_example()
    single = train.main(["--impl", "fused", "--loss", "circle", "--memory-size", "256", *FEW])
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--impl", "fused", "--loss", "circle", "--memory-size", "256", *FEW, "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world=2" in proc.stdout
    ddp = json.loads(out.read_text())["history"]
    finite(ddp)
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["recall_at_1"] == pytest.approx(b["recall_at_1"], abs=0.01)
