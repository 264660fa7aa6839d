"""data_parallel, shard_zero, accumulate and their compositions == the single-process step."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharded
from sharded.testing import assert_step_equivalent
from sharded.testing.models import ToyConfig, ToyLM, make_train_step
from sharded.testing.strategies import toy_configs, token_batches, transform_stacks, world_sizes
from sharded.transforms import REGISTRY

OPTIMIZERS = {
    "sgd": lambda: sharded.optim.sgd(0.1, momentum=0.9),
    "adamw": lambda: sharded.optim.adamw(1e-2, weight_decay=0.1),
    "clipped_adamw": lambda: sharded.optim.chain(sharded.optim.clip_by_global_norm(0.5), sharded.optim.adamw(1e-2)),
}


def build(stack, fn):
    for name, options in reversed(stack):
        fn = REGISTRY[name](**options)(fn)
    return fn


def micro_batches(stack):
    return math.prod(o.get("steps", 1) for _, o in stack)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    cfg=toy_configs,
    stack=transform_stacks(),
    world=world_sizes,
    rows_per_part=st.integers(1, 2),
    opt=st.sampled_from(sorted(OPTIMIZERS)),
    data=st.data(),
)
def test_stack_matches_single_process(cfg, stack, world, rows_per_part, opt, data):
    """In float64: random toy models can be ill-conditioned (LayerNorm over 2 features
    amplifies rounding 300x a step), and the claim is exact algebra, not rounding."""
    model = sharded.trace(ToyLM(cfg).double())
    train_step = make_train_step(model)
    rows = world * micro_batches(stack) * rows_per_part
    batches = data.draw(token_batches(cfg.vocab, rows, steps=3))
    state = sharded.TrainState.create(model.params, OPTIMIZERS[opt]())
    step = build(stack, train_step)
    assert_step_equivalent(step, train_step, state, batches, world_size=world, rtol=1e-7, atol=1e-9)


def test_composition_order_is_free():
    """data_parallel(accumulate(f)) and accumulate(data_parallel(f)) both equal f."""
    model = sharded.trace(ToyLM(ToyConfig(tied=True, depth=3)))
    train_step = make_train_step(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (8, 5), generator=g), torch.randint(0, 11, (8, 5), generator=g)) for _ in range(3)]
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2))
    for step in (
        sharded.data_parallel(sharded.accumulate(steps=2)(train_step)),
        sharded.accumulate(steps=2)(sharded.data_parallel(train_step)),
        sharded.data_parallel(bucket_mb=1e-4)(train_step),
    ):
        assert_step_equivalent(step, train_step, state, batches, world_size=2, rtol=2e-4, atol=2e-5)


def test_accumulate_in_one_process_equals_full_batch():
    model = sharded.trace(ToyLM(ToyConfig()))
    train_step = make_train_step(model)
    batch = (torch.randint(0, 11, (6, 4)), torch.randint(0, 11, (6, 4)))
    s0 = sharded.TrainState.create(model.params, sharded.optim.sgd(0.5))
    ref, ref_m = train_step(sharded.tree.map(torch.clone, s0), batch)
    step = sharded.accumulate(steps=3)(train_step)
    got, m = step(step.init(sharded.tree.map(torch.clone, s0)), batch)
    for k in ref.params:
        torch.testing.assert_close(got.params[k], ref.params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["loss"], ref_m["loss"])


def _fail_on_bad_batch(rows):
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.data_parallel(sharded.accumulate(steps=2)(make_train_step(model)))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    step(state, (torch.zeros(rows, 3, dtype=torch.long), torch.zeros(rows, 3, dtype=torch.long)))


def test_batch_not_divisible_by_ranks_times_microbatches():
    pool = sharded.testing.get_pool(2)
    with pytest.raises(sharded.RankError, match="do not split into 2 equal parts.*ranks × micro-batches"):
        pool.run(_fail_on_bad_batch, 6)  # 6 rows -> 3 per rank -> not 2 micro-batches


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="positive int number of micro-batches"):
        sharded.accumulate(steps=0)
    with pytest.raises(ValueError, match="positive int"):
        sharded.accumulate(lambda s, b: (s, {}))
    with pytest.raises(ValueError, match="data_parallel appears twice"):
        sharded.data_parallel(sharded.data_parallel(lambda s, b: (s, {})))


def _explain_on_rank():
    model = sharded.trace(ToyLM(ToyConfig(depth=3)))
    step = sharded.data_parallel(bucket_mb=1e-3)(sharded.accumulate(steps=4)(make_train_step(model)))
    step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    e = step.explain()
    return str(e), e.data


def test_explain_shows_collectives_and_overlap():
    text, data = sharded.testing.get_pool(2).run(_explain_on_rank)[0]
    assert "rank 0:" in text and "rank 1:" in text
    assert "repeat 4x" in text
    assert "all_reduce bucket 0" in text and "overlaps the last micro-batch's backward" in text
    collectives = [op for op in data[0] if op["kind"] == "collective"]
    assert sum(op.get("nbytes", 0) for op in collectives) == 4 * sum(
        p.numel() for p in sharded.trace(ToyLM(ToyConfig(depth=3))).params.values()
    )


def test_explain_needs_init():
    with pytest.raises(RuntimeError, match="call step.init"):
        sharded.data_parallel(lambda s, b: (s, {})).explain()


def _filled_when_first_bucket_starts(steps):
    from sharded.transforms._reduce import GradReducer as Reducer

    seen = []
    original = Reducer._start_ready

    def spy(self):
        before = self.started
        original(self)
        if before == 0 and self.started:
            seen.append(len(self.filled) / len(self.where))

    Reducer._start_ready = spy
    try:
        model = sharded.trace(ToyLM(ToyConfig(depth=6, tied=True)))
        step = sharded.data_parallel(bucket_mb=1e-4)(make_train_step(model))
        state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
        for _ in range(steps):
            state, _ = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    finally:
        Reducer._start_ready = original
    return seen


def test_all_reduce_starts_while_backward_runs():
    """From the second step (once the grads' arrival order is learned), the first bucket
    is reduced when its own grads are ready, not after the whole backward."""
    seen = sharded.testing.get_pool(2).run(_filled_when_first_bucket_starts, 2)[0]
    assert seen[-1] < 0.5, seen
