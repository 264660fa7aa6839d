"""`sharded train --model DIR`: a Hugging Face causal LM from a local directory trains
and exports back to a directory that `from_pretrained` loads."""
import math

import pytest
import torch

from sharded.train import TrainConfig, main

transformers = pytest.importorskip("transformers")


def _small(name):
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_hugging_face_directory_trains_and_exports_back(tmp_path, name):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    module = _small(name)
    module.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    summary = main(TrainConfig(model=str(tmp_path / "model"), nproc=2, steps=8, batch_size=8, accumulate=1, seq_len=16, log_every=4, out=str(out)))
    assert summary["world_size"] == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    trained = _small(name).eval()
    missing, unexpected = trained.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if name == "gpt2" else set())  # a tied weight is stored once
    x = torch.randint(0, 29, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, trained(x).logits)
        assert not torch.allclose(loaded(x).logits, module.eval()(x).logits)  # it trained


def test_a_directory_without_a_config_is_named(tmp_path):
    with pytest.raises(ValueError, match="no config.json there"):
        main(TrainConfig(model=str(tmp_path), nproc=1, steps=1, out=str(tmp_path / "run")))


def test_resume_restores_the_rng_that_dropout_draws_from(tmp_path, capfd):
    """With dropout on, 8 steps straight == 4, then --resume and 4 more, bitwise: each
    rank's RNG states are saved beside the checkpoint and restored. Without them (the
    rng folder removed) the resumed run draws other masks and ends elsewhere."""
    import shutil

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    common = dict(model=str(tmp_path / "model"), steps=8, batch_size=4, accumulate=1, seq_len=16, log_every=4, nproc=1)
    main(TrainConfig(**common, out=str(tmp_path / "straight")))
    main(TrainConfig(**common, stop_at=4, out=str(tmp_path / "first")))
    main(TrainConfig(**common, resume=str(tmp_path / "first" / "checkpoint"), out=str(tmp_path / "resumed")))
    shutil.rmtree(tmp_path / "first" / "checkpoint" / "rng")
    capfd.readouterr()
    main(TrainConfig(**common, resume=str(tmp_path / "first" / "checkpoint"), out=str(tmp_path / "without_rng")))
    assert "RNG states of 0 rank(s) for 1; not restored" in "".join(capfd.readouterr())  # the rank's warning, relayed
    from safetensors.torch import load_file

    straight, resumed, without = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "resumed", "without_rng"))
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())
    assert not all(torch.equal(without[k], v) for k, v in straight.items())


def test_llama_trains_under_selective_remat(tmp_path):
    """A Hugging Face model's KV cache is off in training (hf.training_kwargs): left on,
    Llama's cache changes between a block's forward and its recomputation, and torch's
    selective checkpoint refuses the step."""
    torch.manual_seed(0)
    _small("llama").save_pretrained(tmp_path / "model")
    summary = main(TrainConfig(model=str(tmp_path / "model"), nproc=1, steps=2, batch_size=4, accumulate=1, seq_len=16, log_every=1, remat="selective", out=str(tmp_path / "run")))
    assert math.isfinite(summary["val_loss"])
