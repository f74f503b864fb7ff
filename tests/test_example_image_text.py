"""examples/train_image_text.py for a few steps with each loss: the fused run trains the same model as
open_clip's (the same losses step by step), and the loss goes down."""
import importlib.util
from pathlib import Path

import pytest

from image_text_kit import open_clip_loss

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_image_text.py"
FEW = ["--steps", "6", "--batch-size", "64", "--eval-size", "128"]


def load_example():
    spec = importlib.util.spec_from_file_location("train_image_text_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_fused_trains_as_open_clip(loss, capsys):
    open_clip_loss()  # skips without open-clip-torch
    train = load_example()
    fused = train.main(["--loss", loss, "--impl", "fused", *FEW])
    theirs = train.main(["--loss", loss, "--impl", "open_clip", *FEW])
    assert len(fused) == 6
    for a, b in zip(fused, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["logit_scale"] == pytest.approx(b["logit_scale"], rel=1e-5)
    assert fused[-1]["loss"] < fused[0]["loss"]
    assert "top-1" in capsys.readouterr().out
