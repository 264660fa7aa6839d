"""The main job: `sharded train` with a pipeline learns and writes its outputs."""
import json
import subprocess
import sys

from sharded.train import TrainConfig, main


def test_train_with_a_pipeline_learns_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    summary = main(TrainConfig(pp=2, nproc=2, steps=25, accumulate=2, batch_size=8, seq_len=32, log_every=5, out=str(out)))
    assert summary["final_train_loss"] < 2.6 and summary["learned"]  # the first steps sit near 4.3 nats
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert (out / "model.safetensors").exists() and (out / "loss.png").exists()


def test_train_with_zero3_and_remat_learns(tmp_path):
    summary = main(TrainConfig(zero=3, remat="full", nproc=2, steps=25, batch_size=8, seq_len=32, log_every=5, out=str(tmp_path / "run")))
    assert summary["final_train_loss"] < 2.6 and summary["learned"]


def test_train_help_names_the_pipeline_flag():
    text = subprocess.run([sys.executable, "-m", "sharded", "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--pp" in text and "--zero" in text and "--remat" in text
