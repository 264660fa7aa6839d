"""The built-in GPT, the corpus, and tracing HuggingFace GPT-2 / Llama."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sharded
from sharded.data import Corpus
from sharded.models import GPT, PRESETS, GPTConfig, flops_per_token, loss_fn

small_gpts = st.builds(
    GPTConfig,
    vocab_size=st.integers(5, 40),
    seq_len=st.integers(4, 16),
    n_layers=st.integers(1, 3),
    d_model=st.sampled_from([8, 16, 24]),
    n_heads=st.sampled_from([1, 2, 4]),
    bias=st.booleans(),
    tied=st.booleans(),
)


@settings(max_examples=15, deadline=None)
@given(cfg=small_gpts, rows=st.integers(1, 3), seed=st.integers(0, 1000))
def test_traced_gpt_apply_equals_forward(cfg, rows, seed):
    torch.manual_seed(seed)
    module = GPT(cfg)
    model = sharded.trace(module)
    x = torch.randint(0, cfg.vocab_size, (rows, cfg.seq_len))
    torch.testing.assert_close(model.apply(model.params, x), module(x))
    assert [b.name for b in model.blocks][1:-1] == [f"blocks.{i}" for i in range(cfg.n_layers)]
    assert ("head.weight" in model.tied) == cfg.tied


def test_tied_gpt_trains_exactly_like_the_module():
    cfg = GPTConfig.preset("tiny", vocab_size=29, seq_len=16, n_layers=2, d_model=32)
    torch.manual_seed(0)
    module = GPT(cfg)
    model = sharded.trace(copy.deepcopy(module))
    # SGD, not Adam: Adam turns the rounding noise in the key bias's (exactly zero)
    # gradient into ±lr steps, which no two implementations agree on.
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    state = sharded.TrainState.create(model.params, sharded.optim.sgd(0.5, momentum=0.9))

    def loss(params, batch):
        return loss_fn(model.apply(params, batch[0]), batch[1])

    batches = Corpus(seed=1).batches("train", 4, 16, seed=0)
    for _ in range(5):
        x, y = next(batches)
        opt.zero_grad()
        loss_fn(module(x), y).backward()
        opt.step()
        _, grads = sharded.value_and_grad(loss)(state.params, (x, y))
        state = state.apply_gradients(grads)
    assert module.head.weight is module.wte.weight
    for name, p in module.state_dict().items():
        want = state.params.get(name, state.params.get(model.tied.get(name, name)))
        torch.testing.assert_close(want, p, rtol=1e-5, atol=1e-6, msg=name)


def test_presets_have_their_advertised_sizes():
    expected = {"125m": 124e6, "350m": 354e6, "760m": 757e6, "1.3b": 1.31e9, "2.7b": 2.65e9, "6.7b": 6.66e9, "13b": 12.85e9, "20b": 20.24e9}
    for name, n in expected.items():
        cfg = PRESETS[name]
        d, L, V, T = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.seq_len
        count = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d  # tied head
        assert abs(count - n) / n < 0.03, (name, count)
        with torch.device("meta"):
            assert sum(p.numel() for p in GPT(cfg).parameters()) == count
    assert flops_per_token(PRESETS["125m"]) == pytest.approx(6 * 124e6 + 12 * 12 * 768 * 2048, rel=0.05)


def test_gpt_bad_config_and_input_are_named():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="unknown GPT preset 'huge'"):
        GPTConfig.preset("huge")
    with pytest.raises(ValueError, match="longer than seq_len=8"):
        GPT(GPTConfig(vocab_size=5, seq_len=8, n_layers=1, d_model=8, n_heads=2))(torch.zeros(1, 9, dtype=torch.long))


def test_corpus_is_deterministic_and_learnable():
    a, b = Corpus(seed=3), Corpus(seed=3)
    assert torch.equal(a.tokens("train"), b.tokens("train"))
    xa, ya = next(a.batches("val", 4, 32, seed=7))
    xb, yb = next(b.batches("val", 4, 32, seed=7))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 32)
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    assert 1.0 < a.unigram_entropy("val") < torch.log(torch.tensor(float(a.tokenizer.vocab_size)))
    text = a.tokenizer.decode(a.tokens("train")[:200])
    assert a.tokenizer.encode(text).tolist() == a.tokens("train")[:200].tolist()
    with pytest.raises(ValueError, match="unknown split 'test'"):
        a.tokens("test")


def _hf_models():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        )
    )
    return {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_trace_huggingface_models(name):
    module = _hf_models()[name].eval()
    model = sharded.trace(module)
    assert len(model.blocks) == 2 + 2  # embed, two decoder layers, head
    x = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(model.apply(model.params, x).logits, module(x).logits)
    if name == "gpt2":  # GPT-2 ties lm_head to wte
        assert model.tied == {"lm_head.weight": "transformer.wte.weight"}

    def loss(params, x):
        return model.apply(params, x, labels=x).loss

    value, grads = sharded.value_and_grad(loss)(model.params, x)
    module.zero_grad()
    module(x, labels=x).loss.backward()
    torch.testing.assert_close(value, module(x, labels=x).loss.detach())
    for k, p in module.named_parameters(remove_duplicate=True):
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)
