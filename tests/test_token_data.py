"""Users' data: text and token files train; over an epoch every window is seen once,
and no two ranks see the same window in a step."""
import numpy as np
import pytest
import torch

from sharded.token_data import TokenData
from sharded.train import TrainConfig, main
from sharded.transforms._batch import rank_rows


def _text(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(("the cat sat on the mat. the dog ate the log. " * 400).strip())
    return path


def test_a_text_file_trains(tmp_path):
    out = tmp_path / "run"
    summary = main(TrainConfig(data=str(_text(tmp_path)), nproc=2, steps=30, batch_size=8, seq_len=32, log_every=10, out=str(out)))
    assert summary["final_train_loss"] < 0.5 * np.log(256) and summary["learned"]


def test_a_token_file_trains(tmp_path):
    path = tmp_path / "train.bin"
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 50, 64, dtype=np.uint16)
    np.tile(pattern, 300).tofile(path)  # nanoGPT's format: raw uint16
    summary = main(TrainConfig(data=str(path), nproc=2, steps=30, batch_size=8, seq_len=32, log_every=10, out=str(tmp_path / "run")))
    assert summary["learned"]


@pytest.mark.parametrize("ranks", [2, 4])
def test_over_an_epoch_each_window_once_and_ranks_never_share_a_step(tmp_path, ranks):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(1000, dtype=np.int64) % 97)
    data = TokenData.from_path(path)
    seq, batch = 10, 4 * ranks
    windows = data.windows("train", seq)
    seen = []
    it = data.batches("train", batch, seq, seed=3)
    for _ in range(windows // batch):
        x, _ = next(it)
        starts_per_rank = [set((rank_rows((x,), ranks, r, who="test")[0][:, 0]).tolist()) for r in range(ranks)]
        assert sum(map(len, starts_per_rank)) == len(set().union(*starts_per_rank)) == batch  # disjoint in the step
        seen += [s for rank in starts_per_rank for s in rank]
    firsts = set(data.tokens("train")[torch.arange(windows) * seq].tolist())  # a window's first token names it here
    assert len(firsts) == windows and len(set(seen)) == len(seen) == windows // batch * batch and set(seen) <= firsts


@pytest.mark.parametrize("content, words", [(b"", "the file is empty"), (np.array([1, 2, 300, 4, 5, 6], dtype=np.uint16).tobytes(), "token id 300 is outside the vocab of 40")])
def test_bad_data_is_named(tmp_path, content, words):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words):
        TokenData.from_path(path, vocab_size=40)


def test_a_uint32_bin_file_reads_with_its_dtype(tmp_path):
    """`--data-dtype uint32` reads a .bin of 32-bit ids (read as nanoGPT's uint16 they
    would be other ids); the flag reaches the data through the CLI's config."""
    from sharded.cli import build_parser
    from sharded.train import _data

    ids = np.arange(70_000, 70_300, dtype=np.uint32)
    ids.tofile(tmp_path / "tokens.bin")
    args = build_parser().parse_args(["train", "--data", str(tmp_path / "tokens.bin"), "--data-dtype", "uint32"])
    data = _data(TrainConfig(data=args.data, data_dtype=args.data_dtype))
    assert data.vocab_size == 70_300
    assert torch.equal(torch.cat([data.tokens("train"), data.tokens("val")]), torch.from_numpy(ids.astype(np.int64)))
