"""shard_zero beyond equivalence (tests/test_transforms.py has that): the memory it
holds, the just-in-time gathers of stage 3, and its errors."""
import pytest
import torch

import sharded
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.step import Transform
from sharded.testing import get_pool
from sharded.testing.models import ToyConfig, ToyLM, make_train_step
from sharded.transforms import _stage3


def live_bytes(tree) -> int:
    """Bytes of the distinct storages behind a tree's tensors (views count once, whole)."""
    storages = {}
    for x in sharded.tree.leaves(tree):
        if isinstance(x, torch.Tensor):
            s = x.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


class UpdateProbe(Transform):
    """Innermost transform that records, at each update, the bytes of the grads the
    optimizer receives and of every tensor Python can reach."""

    name = "update_probe"

    def __init__(self):
        self.grads, self.reachable = [], []
        self.handlers = {"update": self._update}

    def _update(self, next_, tx, grads, opt_state, params):
        import gc

        self.grads.append(live_bytes(grads))
        self.reachable.append(live_bytes([o for o in gc.get_objects() if _is_real_tensor(o)]))
        return next_(tx, grads, opt_state, params)


def _is_real_tensor(o) -> bool:
    """A tensor with memory: not meta, and not a subclass without storage (the fake
    tensors torch.compile keeps from an earlier test in this rank); `type`, since
    `isinstance` raises on a dead weakref.proxy."""
    return type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type != "meta"


def _gpt(seed=0):
    torch.manual_seed(seed)  # odd vocab and widths: most leaves need padding
    return sharded.trace(GPT(GPTConfig(vocab_size=61, seq_len=8, n_layers=2, d_model=36, n_heads=3)))


def _gpt_train_step(model):
    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    return train_step


def _model_state_on_rank(stage):
    model = _gpt()
    train_step = sharded.transform(UpdateProbe)()(_gpt_train_step(model))
    step = sharded.shard_zero(stage=stage)(train_step)
    probe = next(t for t in step.transforms if isinstance(t, UpdateProbe))  # this step's own runtime
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3)))
    batch = (torch.randint(0, 61, (4 * sharded.distributed.world_size(), 8)),) * 2
    state, _ = step(state, batch)
    counts = [x for x in sharded.tree.leaves(state.opt_state) if x.ndim == 0]
    return {
        "rank": sharded.distributed.rank(),
        "params": live_bytes(state.params),
        "grads": probe.grads[0],
        "optimizer": live_bytes(state.opt_state) - sum(c.nbytes for c in counts),
    }


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_model_state_per_rank_is_the_zero_formula(stage, world):
    want = sharded.estimate_memory(_gpt(), stage=stage, world_size=world, optimizer="adamw")
    full = sharded.estimate_memory(_gpt(), stage=0, world_size=1, optimizer="adamw")
    for got in get_pool(world).run(_model_state_on_rank, stage):
        for part in ("params", "grads", "optimizer"):
            formula = getattr(want, part)
            if got["rank"] == 0:  # rank 0 holds a full chunk of every leaf: the estimate exactly
                assert got[part] == formula, (part, got, want)
            # every rank within 1% of the ideal 1/N split, plus padding
            ideal = getattr(full, part) / (world if (part, stage) in _SHARDED else 1)
            assert got[part] <= max(formula, ideal * 1.01), (part, got)
    assert want.model_state < full.model_state


_SHARDED = {("optimizer", 1), ("optimizer", 2), ("grads", 2), ("optimizer", 3), ("grads", 3), ("params", 3)}


def _count_gathered_blocks(prefetch):
    model = sharded.trace(ToyLM(ToyConfig(depth=5, width=6, hidden=9)))
    live = []
    for i, block in enumerate(model.module.blocks):
        def probe(mod, args, out, i=i):
            g = _stage3.current()
            held = [u for u in range(len(g.units)) if g.is_block[u] and g.units[u] is not None and (g.gathered[u] or u in g.inflight)]
            live.append(len(held))

        block.down.register_forward_hook(probe)  # inside the block's forward: while it is gathered
    step = sharded.shard_zero(stage=3, prefetch=prefetch)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    state, _ = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    return live


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_stage3_holds_one_block_plus_prefetch(prefetch):
    """At each block's forward: that block gathered, the next `prefetch` on their way, no others."""
    live = get_pool(2).run(_count_gathered_blocks, prefetch)[0]
    assert len(live) == 5
    assert max(live) == 1 + prefetch and live[-1] == 1  # the last block prefetches nothing


def _gather_is_identity(stage):
    model = sharded.trace(ToyLM(ToyConfig(tied=True, width=5, hidden=7)))
    step = sharded.shard_zero(stage=stage)(make_train_step(model))
    state = sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.adamw(1e-3))
    full = step.gather(step.init(sharded.tree.map(torch.clone, state)))
    return all(torch.equal(a, b) for a, b in zip(sharded.tree.leaves(full), sharded.tree.leaves(state)))


@pytest.mark.parametrize("stage", [1, 3])
def test_gather_inverts_init(stage):
    assert all(get_pool(3).run(_gather_is_identity, stage))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="must be 1, 2 or 3"):
        sharded.shard_zero(stage=4)
    with pytest.raises(ValueError, match="must be 1, 2 or 3"):
        sharded.shard_zero(lambda s, b: (s, {}))
    with pytest.raises(ValueError, match="drop data_parallel"):
        sharded.shard_zero(stage=2)(sharded.data_parallel(lambda s, b: (s, {})))
    with pytest.raises(ValueError, match=r"stage=\.\.\.\) must be 0"):
        sharded.estimate_memory(_gpt(), stage=5)


def _zero_on_a_mesh_without_dp():
    sharded.Mesh.set_current(sharded.Mesh(dp=1, tp=2))
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.shard_zero(stage=1)(make_train_step(model))
    step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))


def test_a_mesh_without_a_dp_axis_is_named():
    with pytest.raises(sharded.RankError, match=r"'dp' axis, which has size 1.*sharded.Mesh\(dp=2\)"):
        get_pool(2).run(_zero_on_a_mesh_without_dp)


def _state_is_freed_with_the_step(stage):
    import gc
    import time
    import weakref

    model = sharded.trace(ToyLM(ToyConfig(depth=2)))
    step = sharded.shard_zero(stage=stage)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3)))
    state, _ = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    owned = (state.opt_state, state.params) if stage == 3 else state.opt_state  # stages 1-2: params are the module's
    refs = [weakref.ref(x) for x in sharded.tree.leaves(owned)]
    del step, state, owned
    # Under CPU contention, stage 3's last references are sometimes dropped by another
    # thread a moment after the step returns (gone within milliseconds, never held):
    # poll briefly, so only a reference that stays (the cycles this guards) fails.
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()
        alive = sum(r() is not None for r in refs)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nothing_keeps_the_state_alive(stage):
    """A benchmark that builds several steps in turn must get each one's memory back."""
    assert get_pool(2).run(_state_is_freed_with_the_step, stage) == [0, 0]


def _live_at_update(stage):
    model = _gpt()
    train_step = sharded.transform(UpdateProbe)()(_gpt_train_step(model))
    step = sharded.shard_zero(stage=stage)(train_step) if stage else sharded.data_parallel(train_step)
    probe = next(t for t in step.transforms if isinstance(t, UpdateProbe))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3)))
    batch = (torch.randint(0, 61, (8, 8)),) * 2
    for _ in range(3):
        state, _ = step(state, batch)
    held = live_bytes((state, batch, model.module.state_dict()))
    return [total - held - grads for total, grads in zip(probe.reachable, probe.grads)]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_no_buffer_outlives_its_step(stage):
    """At each update, nothing but the state, the batch and the grads is alive: no
    bucket of an earlier step waits for the cyclic garbage collector."""
    for extra in get_pool(2).run(_live_at_update, stage):
        assert max(extra) <= 4096, extra


def _reductions_in(stage, dtype):
    model = sharded.trace(ToyLM(ToyConfig(width=6, hidden=9)))
    step = sharded.shard_zero(stage=stage, reduce_dtype=dtype)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    with sharded.comm.recording() as ops:
        state, metrics = step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    grads_ops = [op for op in ops if op.name in ("all_reduce", "reduce_scatter") and op.shape[0] > 8]
    return sorted({str(op.dtype) for op in grads_ops}), metrics["loss"].item()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_reduce_dtype_sets_the_bytes_on_the_wire(stage):
    pool = get_pool(2)
    (wire32, loss32), _ = pool.run(_reductions_in, stage, None)
    (wire16, loss16), _ = pool.run(_reductions_in, stage, torch.bfloat16)
    assert wire32 == ["torch.float32"] and wire16 == ["torch.bfloat16"]
    assert loss16 == pytest.approx(loss32, rel=1e-6)  # the loss is computed before any reduction


def test_bad_reduce_dtype_is_named():
    with pytest.raises(ValueError, match="reduce_dtype=...\\) must be a floating torch.dtype"):
        sharded.shard_zero(stage=2, reduce_dtype="bf16")


def _most_reduce_buffers_alive(stage):
    from sharded.transforms._reduce import GradReducer

    most = [0]
    original = GradReducer._input

    def counting(self, g):
        out = original(self, g)
        most[0] = max(most[0], sum(x is not None for x in self.inputs))
        return out

    GradReducer._input = counting
    try:
        model = sharded.trace(ToyLM(ToyConfig(depth=6)))
        step = sharded.shard_zero(stage=stage, bucket_mb=1e-4)(make_train_step(model))
        state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
        state, _ = step(state, (torch.randint(0, 11, (4, 3)),) * 2)  # learns the order grads arrive in
        most[0] = 0
        step(state, (torch.randint(0, 11, (4, 3)),) * 2)
    finally:
        GradReducer._input = original
    return most[0]


@pytest.mark.parametrize("stage", [2, 3])
def test_scattered_reductions_free_their_buffers_as_they_go(stage):
    """Stages 2-3 never hold the full-size reduce buffers of more than a few groups
    (once the first step has taught the buckets the order grads arrive in)."""
    from sharded.transforms._reduce import GradReducer

    assert max(get_pool(2).run(_most_reduce_buffers_alive, stage)) <= GradReducer.IN_FLIGHT + 1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_hybrid_sharding_matches_the_single_process_step(stage):
    """HSDP / ZeRO++ hpZ: shard within pairs of the 4 dp ranks, replicate across them."""
    model = sharded.trace(ToyLM(ToyConfig(tied=True, width=5, hidden=7, depth=3)).double())
    train_step = make_train_step(model)
    g = torch.Generator().manual_seed(stage)
    batches = [(torch.randint(0, 11, (8, 3), generator=g), torch.randint(0, 11, (8, 3), generator=g)) for _ in range(3)]
    tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(0.5), sharded.optim.adamw(1e-2))
    state = sharded.TrainState.create(model.params, tx)
    step = sharded.shard_zero(stage=stage, hybrid=2)(sharded.accumulate(steps=2)(train_step))
    sharded.testing.assert_step_equivalent(step, train_step, state, batches, world_size=4, rtol=1e-7, atol=1e-9)


def _hybrid_chunk_sizes():
    model = sharded.trace(ToyLM(ToyConfig(width=8, hidden=8)))
    step = sharded.shard_zero(stage=3, hybrid=2)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    return sum(x.numel() for x in state.params.values())


def test_hybrid_chunks_are_half_the_params_on_4_ranks():
    for chunk in get_pool(4).run(_hybrid_chunk_sizes):
        full = sum(p.numel() for p in sharded.trace(ToyLM(ToyConfig(width=8, hidden=8))).params.values())
        assert full / 2 <= chunk <= full / 2 + 16  # half of each leaf, rounded up


def test_hybrid_must_divide_the_dp_axis():
    with pytest.raises(sharded.RankError, match=r"hybrid=3\) needs the dp size \(4\) to be a multiple of 3"):
        get_pool(4).run(_hybrid_of, 3)
    with pytest.raises(ValueError, match="groups of k dp ranks"):
        sharded.shard_zero(stage=3, hybrid=0)


def _hybrid_of(k):
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.shard_zero(stage=3, hybrid=k)(make_train_step(model))
    step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))


@pytest.mark.parametrize("stage", [2, 3])
def test_reducing_every_microbatch_matches_and_keeps_no_whole_grads(stage):
    model = sharded.trace(ToyLM(ToyConfig(tied=True, width=5, hidden=7, depth=3)).double())
    train_step = make_train_step(model)
    g = torch.Generator().manual_seed(stage)
    batches = [(torch.randint(0, 11, (12, 3), generator=g), torch.randint(0, 11, (12, 3), generator=g)) for _ in range(3)]
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2))
    step = sharded.shard_zero(stage=stage, reduce_every_microbatch=True)(sharded.accumulate(steps=3)(train_step))
    sharded.testing.assert_step_equivalent(step, train_step, state, batches, world_size=2, rtol=1e-7, atol=1e-9)
    assert max(get_pool(2).run(_whole_grads_between_microbatches, stage)) == 0


def _whole_grads_between_microbatches(stage):
    """Bytes of leaf grads alive when each micro-batch's forward starts."""
    model = sharded.trace(ToyLM(ToyConfig(depth=2)))
    alive = []

    def loss(params, batch):
        from sharded.grad import _current

        gp = _current.get()
        alive.append(sum(x.grad.numel() for x in gp.leaves if x.grad is not None))
        logits = model.apply(params, batch[0])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.shard_zero(stage=stage, reduce_every_microbatch=True)(sharded.accumulate(steps=3)(train_step))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    step(state, (torch.randint(0, 11, (6, 3)),) * 2)
    return max(alive)


def test_reducing_every_microbatch_needs_stage_2_or_3():
    with pytest.raises(ValueError, match="reduce_every_microbatch saves nothing"):
        sharded.shard_zero(stage=1, reduce_every_microbatch=True)


def _l2_through_dtensors(stage):
    model = sharded.trace(ToyLM(ToyConfig(width=5, hidden=7)).double())  # sizes that need padding over 2 ranks
    step = sharded.shard_zero(stage=stage)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, (torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(0)),) * 2)
    view = sharded.sharding.as_dtensors(state)
    l2 = lambda tree: sum((x**2).sum() for x in sharded.tree.leaves(tree))  # noqa: E731
    got = [l2(view.params), l2(view.opt_state[0].mu)]
    got = [x.full_tensor() if hasattr(x, "full_tensor") else x for x in got]
    full = step.gather(state)
    return [float(x) for x in got], [float(l2(full.params)), float(l2(full.opt_state[0].mu))]


@pytest.mark.parametrize("stage", [2, 3])
def test_user_code_over_the_state_sees_global_values_through_dtensors(stage):
    """An L2 term over (sharded) params and optimizer moments equals the unsharded one."""
    for got, want in get_pool(2).run(_l2_through_dtensors, stage):
        assert got == pytest.approx(want, rel=1e-12)


def _one_rank_bf16(stage):
    """Losses and params after two bf16 steps, with and without shard_zero, on one rank."""
    out = []
    for zero in (False, True):
        model = _gpt()
        step = sharded.mixed_precision("bf16", autocast=False)(_gpt_train_step(model))
        step = sharded.shard_zero(stage=stage)(step) if zero else step
        state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
        losses = []
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            state, m = step(state, (torch.randint(0, 61, (4, 8), generator=g),) * 2)
            losses.append(m["loss"])
        out.append((losses, step.gather(state).params))
    return out


@pytest.mark.parametrize("stage", [1, 3])
def test_one_rank_computes_in_the_cast_dtype_under_every_stage(stage):
    """mixed_precision leaves stage 3's params to its gathers to cast; on one rank, where
    there is nothing to gather, they still run, so the step computes in bf16 as asked."""
    ((plain_losses, plain), (losses, params)), = get_pool(1).run(_one_rank_bf16, stage)
    torch.testing.assert_close(losses, plain_losses, rtol=0, atol=0)
    for k in plain:
        torch.testing.assert_close(params[k], plain[k], rtol=0, atol=0)


def _one_rank_collectives_in_place():
    """(collective, whether its input was its output) for each gather and reduction of two
    bf16 ZeRO-3 steps on one rank."""
    from sharded import comm

    seen, originals = [], (comm.all_gather_into_tensor, comm.reduce_scatter_tensor)

    def watching(name, collective):
        def run(out, inp, *args, **kwargs):
            seen.append((name, out.data_ptr() == inp.data_ptr()))
            return collective(out, inp, *args, **kwargs)
        return run

    comm.all_gather_into_tensor, comm.reduce_scatter_tensor = watching("all_gather", originals[0]), watching("reduce_scatter", originals[1])
    try:
        _one_rank_bf16(3)
    finally:
        comm.all_gather_into_tensor, comm.reduce_scatter_tensor = originals
    return seen


def test_one_rank_gathers_and_reduces_in_place():
    """On one rank stage 3's gathers only cast, and its reductions only scale: each
    collective's input is its output, so neither copies its buffer once more."""
    seen, = get_pool(1).run(_one_rank_collectives_in_place)
    assert {name for name, _ in seen} == {"all_gather", "reduce_scatter"}
    assert all(in_place for _, in_place in seen), [name for name, in_place in seen if not in_place]
