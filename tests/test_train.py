"""The main job: `sharded train` with a pipeline learns and writes its outputs."""
import json
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("args, words", [
    (["--accumulate", "0"], "argument --accumulate: 0 must be at least 1"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--pp", "3", "--nproc", "2"], "--pp 3 does not divide the 2 ranks"),
    (["--batch-size", "30", "--accumulate", "4"], "--batch-size 30 does not split into 2 data-parallel ranks x 4 micro-batches"),
])
def test_a_users_mistake_is_one_line_and_exit_status_2(args, words):
    done = subprocess.run([sys.executable, "-m", "sharded", "train", *args], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("sharded train: error: ") and words in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
