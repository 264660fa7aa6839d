"""shard_zero(update_in_backward=True): each group's update runs as backward reduces its
grads. Equal to the plain step over drawn models, stages, ranks, micro-batches and
nesting orders; the step contract it needs (one value_and_grad, its grads handed to
apply_gradients as they are, the update not skipped) is enforced, and what cannot
compose with it is refused with what to write instead."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharded
from sharded.testing import assert_step_equivalent, get_pool
from sharded.testing.models import ToyConfig, ToyLM, make_train_step
from sharded.testing.strategies import nested_in_drawn_order

CFG = ToyConfig(vocab=11, width=8, hidden=12, depth=2, tied=True)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@settings(max_examples=14, **SETTINGS)
@given(data=st.data())
def test_the_update_in_backward_equals_the_plain_step(data):
    """Every stage on 1-4 ranks, with 1-3 micro-batches, remat or not, tied or untied,
    a fused and a pure optimizer, buckets of a leaf or of everything."""
    draw = data.draw
    stage = draw(st.integers(1, 3))
    extra = {"prefetch": draw(st.integers(0, 2)), "reshard_after_forward": draw(st.booleans())} if stage == 3 else {}
    layers = [sharded.shard_zero(stage=stage, bucket_mb=draw(st.sampled_from([1e-4, 25.0])), update_in_backward=True, **extra)]
    steps = draw(st.integers(1, 3))
    if steps > 1:
        layers.append(sharded.accumulate(steps=steps))
    if draw(st.booleans()):
        layers.append(sharded.remat())
    cfg = ToyConfig(vocab=draw(st.integers(3, 13)), width=draw(st.integers(3, 7)), hidden=draw(st.integers(1, 9)),
                    depth=draw(st.integers(1, 3)), tied=draw(st.booleans()), seed=draw(st.integers(0, 99)))
    model = sharded.trace(ToyLM(cfg).double())
    train_step = make_train_step(model)
    step = nested_in_drawn_order(draw, layers, train_step, loss_scaler=False)
    dp = draw(st.integers(1, 4))
    rows = dp * steps * draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    seq = draw(st.integers(1, 4))
    batches = [(torch.randint(0, cfg.vocab, (rows, seq), generator=g), torch.randint(0, cfg.vocab, (rows, seq), generator=g)) for _ in range(3)]
    tx = draw(st.sampled_from([sharded.optim.adamw(1e-2, weight_decay=0.1), sharded.optim.sgd(0.1, momentum=0.9)]))
    assert_step_equivalent(step, train_step, sharded.TrainState.create(model.params, tx), batches, world_size=dp, rtol=1e-7, atol=1e-9)


def _params_change_inside_value_and_grad(stage, on):
    """Whether this rank's params (stage 3: its chunks) changed between the start of
    value_and_grad and its return, in the second step."""
    model = sharded.trace(ToyLM(CFG).double())
    seen = []

    def train_step(state, batch):
        before = [x.clone() for x in sharded.tree.leaves(state.params)]
        value, grads = sharded.value_and_grad(lambda p, b: torch.nn.functional.cross_entropy(model.apply(p, b[0]).flatten(0, 1), b[1].flatten()))(state.params, batch)
        seen.append(any(not torch.equal(a, b) for a, b in zip(before, sharded.tree.leaves(state.params))))
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.shard_zero(stage=stage, update_in_backward=on)(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    for seed in range(2):
        state, _ = step(state, _batch(seed))
    return seen


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_params_are_updated_before_value_and_grad_returns(stage, world):
    for on in (True, False):
        for seen in get_pool(world).run(_params_change_inside_value_and_grad, stage, on):
            assert seen == [on, on]


def _batch(seed, rows=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab, (rows, 3), generator=g), torch.randint(0, CFG.vocab, (rows, 3), generator=g)


def _misuse(stage, misuse):
    """A step that breaks the contract in one way (`misuse`); the error the rank saw."""
    model = sharded.trace(ToyLM(CFG).double())

    def loss(p, b):
        return torch.nn.functional.cross_entropy(model.apply(p, b[0]).flatten(0, 1), b[1].flatten())

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        if misuse == "scaled grads":
            grads = sharded.tree.map(lambda g: g * 0.5, grads)
        if misuse == "grads written":
            for g in sharded.tree.leaves(grads):
                g.mul_(0.5)
        if misuse == "two value_and_grads":
            sharded.value_and_grad(loss)(state.params, batch)
        if misuse == "skipped update" and batch[0].sum() >= 0:
            return state, {"loss": value}
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.shard_zero(stage=stage, bucket_mb=1e-4, update_in_backward=True)(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    try:
        for seed in range(2):
            state, _ = step(state, _batch(seed))
    except RuntimeError as err:
        return str(err)
    return None


@pytest.mark.parametrize("misuse,words", [
    ("scaled grads", "apply_gradients got other grads"),
    ("grads written", "apply_gradients got other grads"),
    ("two value_and_grads", "a second value_and_grad in one step"),
    ("skipped update", "never reached apply_gradients"),
])
@pytest.mark.parametrize("stage", [2, 3])
def test_a_step_that_breaks_the_contract_is_refused(stage, misuse, words):
    for err in get_pool(2).run(_misuse, stage, misuse):
        assert err is not None and words in err and "update_in_backward" in err


def test_what_cannot_compose_is_refused_with_what_to_write():
    with pytest.raises(ValueError, match="reduce_every_microbatch sums them after"):
        sharded.shard_zero(stage=2, update_in_backward=True, reduce_every_microbatch=True)
    with pytest.raises(ValueError, match="hybrid sharding sums them"):
        sharded.shard_zero(stage=3, update_in_backward=True, hybrid=2)
    model = sharded.trace(ToyLM(CFG))
    zero = sharded.shard_zero(stage=2, update_in_backward=True)
    with pytest.raises(ValueError, match="use update_in_backward=False with it"):
        sharded.mixed_precision("fp16")(zero(make_train_step(model)))
    with pytest.raises(ValueError, match="use update_in_backward=False with it"):
        sharded.offload("cpu")(sharded.shard_zero(stage=2, update_in_backward=True)(make_train_step(model)))


def _clipped():
    model = sharded.trace(ToyLM(CFG).double())
    step = sharded.shard_zero(stage=2, update_in_backward=True)(make_train_step(model))
    tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(1e-2))
    try:
        step.init(sharded.TrainState.create(model.params, tx))
    except ValueError as err:
        return str(err)


def test_a_clip_that_reads_every_grad_is_refused_at_init():
    for err in get_pool(2).run(_clipped):
        assert err is not None and "leafwise" in err and "drop the clip" in err
