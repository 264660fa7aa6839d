"""mixed_precision: tracks fp32, skips overflowing fp16 steps untouched, composes."""
import copy
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import sharded
from sharded.data import Corpus
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.testing import assert_step_equivalent, run_steps
from sharded.testing.models import ToyConfig, ToyLM, make_train_step

STEPS = 50


def _gpt_losses(compute):
    corpus = Corpus(seed=0)
    torch.manual_seed(0)
    model = sharded.trace(GPT(GPTConfig.preset("tiny", vocab_size=corpus.tokenizer.vocab_size, seq_len=32, n_layers=2, d_model=64)))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.mixed_precision(compute)(train_step) if compute else sharded.Step(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(3e-3, weight_decay=0.0)))
    batches = corpus.batches("train", 8, 32, seed=0)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, next(batches))
        losses.append(metrics["loss"].item())
    return losses, metrics


@pytest.mark.parametrize("compute", ["bf16", "fp16"])
def test_low_precision_tracks_fp32(compute):
    """Documented tolerance: the mean loss of the last 10 of 50 steps within 3% of fp32's."""
    ref, _ = _gpt_losses(None)
    got, metrics = _gpt_losses(compute)
    tail = lambda xs: sum(xs[-10:]) / 10  # noqa: E731
    assert tail(got) == pytest.approx(tail(ref), rel=0.03)
    assert tail(got) < 0.8 * got[0]  # and it learned
    if compute == "fp16":
        assert metrics["skipped_steps"].item() < STEPS // 5


def test_an_fp16_overflow_skips_the_step_and_backs_off():
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.mixed_precision("fp16", init_scale=2.0**100, hysteresis=1)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    before = copy.deepcopy((state.params, state.opt_state))
    state, metrics = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    for a, b in zip(sharded.tree.leaves((state.params, state.opt_state)), sharded.tree.leaves(before)):
        assert torch.equal(a, b)  # bitwise untouched
    assert metrics["skipped_steps"].item() == 1 and metrics["loss_scale"].item() == 2.0**99


def test_the_scale_grows_after_clean_steps():
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.mixed_precision("fp16", init_scale=4.0, growth_interval=2)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    scales = []
    for _ in range(4):
        state, metrics = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
        scales.append(metrics["loss_scale"].item())
    assert scales == [4.0, 8.0, 8.0, 16.0]


STACKS = {
    "dp": lambda f: sharded.data_parallel(sharded.mixed_precision("fp16", init_scale=2.0**8)(f)),
    "zero2+acc": lambda f: sharded.shard_zero(stage=2)(sharded.accumulate(steps=2)(sharded.mixed_precision("fp16", init_scale=2.0**8)(f))),
    "zero3": lambda f: sharded.shard_zero(stage=3)(sharded.mixed_precision("bf16")(f)),
    "zero3 no autocast": lambda f: sharded.shard_zero(stage=3)(sharded.mixed_precision("bf16", autocast=False)(f)),
    "zero1 no autocast": lambda f: sharded.shard_zero(stage=1)(sharded.mixed_precision("bf16", autocast=False)(f)),
}
REFERENCES = {
    "dp": lambda f: sharded.mixed_precision("fp16", init_scale=2.0**8)(f),
    "zero2+acc": lambda f: sharded.mixed_precision("fp16", init_scale=2.0**8)(f),
    "zero3": lambda f: sharded.mixed_precision("bf16")(f),
    "zero3 no autocast": lambda f: sharded.mixed_precision("bf16", autocast=False)(f),
    "zero1 no autocast": lambda f: sharded.mixed_precision("bf16", autocast=False)(f),
}


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_composes_with_data_parallel_zero_and_accumulate(stack):
    model = sharded.trace(ToyLM(ToyConfig(width=8, hidden=12, tied=True)))
    train_step = make_train_step(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (8, 4), generator=g), torch.randint(0, 11, (8, 4), generator=g)) for _ in range(3)]
    state = sharded.TrainState.create(model.params, sharded.optim.sgd(0.1, momentum=0.9))
    # low-precision forwards on half batches round differently: equal to a few bf16 ulps
    assert_step_equivalent(STACKS[stack](train_step), REFERENCES[stack](train_step), state, batches, world_size=2, rtol=2e-2, atol=2e-3)


def _cast_step(model, dtype):
    """The reference of autocast=False, written plainly: every floating param cast (a
    differentiable cast, so the grads come back in fp32) and the model run as it is."""

    def loss(params, batch):
        logits = model.apply({n: p.to(dtype) if p.is_floating_point() else p for n, p in params.items()}, batch[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    return step


def test_without_autocast_the_forward_runs_on_cast_params_as_written():
    model = sharded.trace(ToyLM(ToyConfig(width=8, hidden=12, tied=True)))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (4, 5), generator=g)) for _ in range(3)]
    make = lambda: sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.adamw(1e-2))  # noqa: E731
    step = sharded.mixed_precision("bf16", autocast=False)(make_train_step(model))
    got, got_metrics = run_steps(step, step.init(make()), batches)
    want, want_metrics = run_steps(_cast_step(model, torch.bfloat16), make(), batches)
    for a, b in zip(sharded.tree.leaves(got.params), sharded.tree.leaves(want.params)):
        assert a.dtype == torch.float32 and torch.equal(a, b)  # fp32 masters, the same arithmetic
    assert [m["loss"].item() for m in got_metrics] == [m["loss"].item() for m in want_metrics]
    autocast = sharded.mixed_precision("bf16")(make_train_step(model))  # the default differs: norms in fp32 under autocast
    other, _ = run_steps(autocast, autocast.init(make()), batches)
    assert any(not torch.equal(a, b) for a, b in zip(sharded.tree.leaves(other.params), sharded.tree.leaves(want.params)))


def test_bad_input_is_named(monkeypatch):
    with pytest.raises(ValueError, match="unknown dtype; use one of bf16"):
        sharded.mixed_precision("fp8")
    with pytest.raises(ValueError, match="autocast=...\\) must be True"):
        sharded.mixed_precision("bf16", autocast="off")
    model = sharded.trace(ToyLM(ToyConfig()))
    module = sys.modules["sharded.transforms.mixed_precision"]  # the attribute is the transform itself
    monkeypatch.setattr(module, "_supports", lambda dtype, device: False)
    step = sharded.mixed_precision("fp16")(make_train_step(model))
    with pytest.raises(ValueError, match="float16 is not supported on cpu; use compute='bf16'"):
        step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))


def test_a_policy_that_keeps_nothing_warns():
    model = sharded.trace(ToyLM(ToyConfig()))

    def keep_layer_norms(name, p):
        return "ln_" in name  # ToyLM calls them "norm": matches nothing

    step = sharded.mixed_precision("bf16", keep_fp32=keep_layer_norms)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    with pytest.warns(UserWarning, match="keep_fp32=keep_layer_norms\\) matched no param"):
        step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharded.mixed_precision("bf16")(make_train_step(model))  # the default policy does not warn


def test_the_loss_scale_is_checkpointed(tmp_path):
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.mixed_precision("fp16", init_scale=2.0**100, hysteresis=1)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    state, _ = run_steps(step, state, [(torch.randint(0, 11, (4, 3)),) * 2])
    sharded.checkpoint.save(state, tmp_path / "c")
    fresh = step.init(sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.sgd(0.1)))
    loaded = sharded.checkpoint.load(tmp_path / "c", fresh)
    assert loaded.extra["loss_scale"]["scale"].item() == 2.0**99
    assert loaded.extra["loss_scale"]["skipped_steps"].item() == 1


def _wire_dtypes():
    model = sharded.trace(ToyLM(ToyConfig(width=8, hidden=12, depth=2)))
    step = sharded.shard_zero(stage=3)(sharded.mixed_precision("bf16")(make_train_step(model)))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3)))
    with sharded.comm.recording() as ops:
        state, _ = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    by_name = {}
    for op in ops:
        by_name.setdefault(op.name, set()).add(str(op.dtype))
    return by_name, {str(x.dtype) for x in sharded.tree.leaves(state.params)}


def test_zero3_gathers_in_bf16_and_reduces_to_fp32_masters():
    wire, masters = sharded.testing.get_pool(2).run(_wire_dtypes)[0]
    assert wire["all_gather"] == {"torch.bfloat16"}  # half the bytes of fp32
    assert wire["reduce_scatter"] == {"torch.float32"}
    assert masters == {"torch.float32"}
