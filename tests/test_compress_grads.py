"""compress_grads("onebit"): plain Adam during warmup, then a compressed exchange equal
to a plain single-process simulation of N workers running the same 1-bit algorithm."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import sharded
from sharded import comm
from sharded.optim import ScaleByFrozenAdamState
from sharded.testing import assert_step_equivalent, get_pool
from sharded.testing.models import ToyConfig, ToyLM, make_train_step

CFG = ToyConfig(vocab=9, width=6, hidden=7, depth=2, tied=True, seed=4)
STACKS = {
    "data_parallel": lambda f, block=256: sharded.compress_grads(method="onebit", block=block)(sharded.data_parallel(bucket_mb=1e-4)(f)),
    "zero1": lambda f, block=256: sharded.shard_zero(stage=1)(sharded.compress_grads(method="onebit", block=block)(f)),
    "zero2": lambda f, block=256: sharded.compress_grads(method="onebit", block=block)(sharded.shard_zero(stage=2, bucket_mb=1e-4)(f)),
    "zero3": lambda f, block=256: sharded.compress_grads(method="onebit", block=block)(sharded.shard_zero(stage=3)(f)),
}


def _batches(rows, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, CFG.vocab, (rows, 3), generator=g), torch.randint(0, CFG.vocab, (rows, 3), generator=g)) for _ in range(steps)]


def _loss(model, params, batch):
    tokens, targets = batch
    logits = model.apply(params, tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _frozen_adam(state):
    return sharded.optim.states_of(state.opt_state, ScaleByFrozenAdamState)[0]


def reference_step(model, workers: int, warmup: int, block: int = 256, b1: float = 0.9, eps: float = 1e-8):
    """1-bit Adam's exchange of the momentum in units of d = sqrt(v) + eps, written
    plainly: `workers` simulated ranks, each on its rows, worker i's carry c_i (its error
    plus b1·m/(N·d)) and server r's error f_r."""
    carry, server, started = {}, {}, [False]

    def rms_sign(x, live):
        """x's live elements as their RMS times their signs; the others 0."""
        s = x[live].norm() / math.sqrt(max(1, int(live.sum())))
        return s * torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * live

    def step(state, batch):
        rows = batch[0].shape[0] // workers
        parts = [tuple(x[i * rows : (i + 1) * rows] for x in batch) for i in range(workers)]
        local = [sharded.grad(lambda p, b: _loss(model, p, b))(state.params, part) for part in parts]
        loss = torch.stack([_loss(model, state.params, part) for part in parts]).mean()
        if int(state.step) < warmup:
            grads = {n: sum(g[n] for g in local) / workers for n in state.params}
            return state.apply_gradients(grads), {"loss": loss}
        mu, nu = _frozen_adam(state).mu, _frozen_adam(state).nu
        momentum = {}
        for name, p in state.params.items():
            n, c = p.numel(), math.ceil(p.numel() / workers)
            d = nu[name].reshape(-1).sqrt() + eps
            live = nu[name].reshape(-1) > 0  # an element with no grad in warmup does not travel
            new = torch.zeros(n, dtype=p.dtype, device=p.device)
            for r in range(workers):  # chunk r of the leaf, its server rank r
                for lo in range(r * c, min((r + 1) * c, n), block):  # one scale per block of the chunk
                    hi = min(lo + block, (r + 1) * c, n)
                    y = torch.zeros(hi - lo, dtype=p.dtype, device=p.device)
                    for i in range(workers):
                        e = carry.setdefault((i, name), torch.zeros(n, dtype=p.dtype, device=p.device))
                        x = (e[lo:hi] + (1 - b1) * local[i][name].reshape(-1)[lo:hi] / workers / d[lo:hi]) * live[lo:hi]
                        e[lo:hi] = x - rms_sign(x, live[lo:hi])
                        y += rms_sign(x, live[lo:hi])
                    if not started[0]:  # the first exchange starts from warmup's momentum
                        y += b1 * mu[name].reshape(-1)[lo:hi] / d[lo:hi]
                    f = server.setdefault((r, name), torch.zeros(c, dtype=p.dtype, device=p.device))[lo - r * c : hi - r * c]
                    y += f
                    y *= live[lo:hi]
                    f.copy_(y - rms_sign(y, live[lo:hi]))
                    new[lo:hi] = rms_sign(y, live[lo:hi])
            for i in range(workers):
                carry[(i, name)] += b1 * new / workers
            momentum[name] = (new * d).view(p.shape)
        started[0] = True
        grads = {name: (momentum[name] - b1 * mu[name]) / (1 - b1) for name in state.params}
        state = state.apply_gradients(grads)
        for name, m in _frozen_adam(state).mu.items():  # the optimizer now holds the exchanged momentum
            torch.testing.assert_close(m, momentum[name], rtol=1e-12, atol=1e-14)
        return state, {"loss": loss}

    return step


def _state(model, warmup):
    return sharded.TrainState.create(model.params, sharded.optim.onebit_adam(1e-2, warmup_steps=warmup, weight_decay=0.1))


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_during_warmup_the_step_is_plain_adamw(stack):
    model = sharded.trace(ToyLM(CFG).double())
    train_step = make_train_step(model)
    state = _state(model, warmup=3)
    reference = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2, weight_decay=0.1))
    got = get_pool(2).run(_params_after, STACKS[stack], train_step, state, _batches(4, steps=3))[0]
    want = reference
    for batch in _batches(4, steps=3):
        want, _ = train_step(want, batch)
    for name, p in want.params.items():
        torch.testing.assert_close(got[name], p, rtol=1e-7, atol=1e-9)


def _params_after(build, train_step, state, batches):
    step = build(train_step)
    state = step.init(state)
    for batch in batches:
        state, _ = step(state, batch)
    return step.gather_params(state)


@pytest.mark.parametrize("block", [4, 256])  # several scales per chunk, or one
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_after_warmup_the_exchange_is_the_one_bit_algorithm(stack, world, block):
    model = sharded.trace(ToyLM(CFG).double())
    step = STACKS[stack](make_train_step(model), block)
    reference = reference_step(model, world, warmup=1, block=block)
    assert_step_equivalent(step, reference, _state(model, warmup=1), _batches(2 * world), world_size=world, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("stack", ["data_parallel", "zero2", "zero3"])
def test_elements_with_no_grad_in_warmup_do_not_travel(stack):
    """[Note: elements that never had a grad]: embedding rows no token uses (v = 0) are
    left out of the exchange and only decay, as under plain Adam, where a sign code would
    move them by their block's scale; the rest is still the reference algorithm."""
    cfg = ToyConfig(vocab=12, width=6, hidden=7, depth=2, tied=False, seed=4)
    model = sharded.trace(ToyLM(cfg).double())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 5, (4, 3), generator=g), torch.randint(0, cfg.vocab, (4, 3), generator=g)) for _ in range(4)]
    state = _state(model, warmup=1)
    step = STACKS[stack](make_train_step(model), 4)  # blocks of 4 straddle used and unused rows
    assert_step_equivalent(step, reference_step(model, 2, warmup=1, block=4), state, batches, world_size=2, rtol=1e-7, atol=1e-9)
    got = get_pool(2).run(_params_after, lambda f: STACKS[stack](f, 4), make_train_step(model), state, batches)[0]
    unused = model.params["embed.weight"][5:]
    torch.testing.assert_close(got["embed.weight"][5:], unused * (1 - 1e-2 * 0.1) ** len(batches), rtol=1e-12, atol=0)


def _save_and_continue(path, stack, split):
    model = sharded.trace(ToyLM(CFG).double())
    step = STACKS[stack](make_train_step(model))
    state = step.init(_state(model, warmup=1))
    batches = _batches(4, steps=5)
    for batch in batches[:split]:
        state, _ = step(state, batch)
    sharded.checkpoint.save(state, path)
    straight = copy.deepcopy(state)
    for batch in batches[split:]:
        straight, _ = step(straight, batch)
    resumed = step.init(_state(sharded.trace(ToyLM(CFG).double()), warmup=1))
    resumed = sharded.checkpoint.load(path, like=resumed)
    for batch in batches[split:]:
        resumed, _ = step(resumed, batch)
    return [torch.equal(a, b) for a, b in zip(sharded.tree.leaves(straight), sharded.tree.leaves(resumed))]


@pytest.mark.parametrize("stack", ["data_parallel", "zero2"])
def test_a_checkpoint_mid_run_continues_identically(tmp_path, stack):
    """Each rank's error buffers are saved and restored per rank (per_rank placements)."""
    same = get_pool(2).run(_save_and_continue, tmp_path / "ckpt", stack, 3)
    assert all(all(rank) for rank in same)


def _bytes_per_step(stack):
    """Bytes of the grads' exchange this rank sends in the warmup step (fp32) and in a
    compressed step after the first, as the comm recorder tags them (ZeRO's all-gathers of params are
    not grads, and the same in both)."""
    from sharded.models import GPT, GPTConfig, loss_fn

    torch.manual_seed(0)
    model = sharded.trace(GPT(GPTConfig(vocab_size=512, seq_len=16, n_layers=2, d_model=128, n_heads=4)))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = STACKS[stack](train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.onebit_adam(1e-3, warmup_steps=1)))
    batch = (torch.randint(0, 512, (4, 16)),) * 2
    sent = []
    for _ in range(3):
        with comm.recording() as ops:
            state, _ = step(state, batch)
        sent.append(sum(op.nbytes for op in ops if op.tag in ("reduce_grads", "compress_grads")))
    return sent[0], sent[2]  # the first compressed step also all-gathers sqrt(v) + eps under ZeRO, once


@pytest.mark.parametrize("stack", ["data_parallel", "zero2", "zero3"])
def test_after_warmup_a_step_moves_16x_fewer_bytes_than_fp32(stack):
    """Each rank's input to every collective of the grads' exchange, signs and scales
    included; against bf16 (half of fp32's bytes) at least 8x."""
    for plain, compressed in get_pool(2).run(_bytes_per_step, stack):
        assert compressed > 0 and plain >= 16 * compressed, (plain, compressed)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="warmup_steps"):
        sharded.compress_grads(method="onebit", warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        sharded.optim.onebit_adam(1e-3, warmup_steps=0)
    with pytest.raises(ValueError, match="decision 35"):
        sharded.compress_grads(method="zeroone")
    model = sharded.trace(ToyLM(CFG))
    f = make_train_step(model)
    with pytest.raises(ValueError, match="loss scaling"):
        sharded.compress_grads()(sharded.data_parallel(sharded.mixed_precision("fp16", loss_scale=False)(f)))
    step = sharded.compress_grads()(f)  # nothing reduces the grads
    with pytest.raises(ValueError, match=r"compress_grads\(method='onebit'\)\(shard_zero"):
        step.init(_state(model, warmup=2))
    step = sharded.compress_grads()(sharded.data_parallel(f))
    with pytest.raises(ValueError, match="onebit_adam"):
        step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3)))
    with pytest.warns(UserWarning, match="nothing to compress"):
        step.init(_state(model, warmup=2))


def test_a_loss_scale_is_divided_out_before_the_exchange():
    """A loss scale (2^16, exact in float64) changes nothing: the exchange divides it out
    and multiplies it back into the grads the update unscales (Transform.grad_scale)."""
    model = sharded.trace(ToyLM(CFG).double())
    scaled = sharded.mixed_precision(torch.float64, keep_fp32=lambda name, p: False, loss_scale=True)
    step = STACKS["zero2"](scaled(make_train_step(model)))
    reference = reference_step(model, 2, warmup=1)
    assert_step_equivalent(step, reference, _state(model, warmup=1), _batches(4), world_size=2, rtol=1e-7, atol=1e-9)


def _overflow_keeps_the_exchange_state(partial, reducer):
    """A compressed step that overflows: on rank 1's rows (every bucket), or in one leaf
    only (`partial`: one bucket of many, the others exchanged with finite momentum)."""
    model = sharded.trace(ToyLM(CFG).double())
    first = next(iter(model.params))

    def train_step(state, batch):
        def loss(params, b):
            tokens, targets, weight, spike = b
            logits = model.apply(params, tokens)
            per_row = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
            return (per_row * weight).mean() + spike * params[first].sum()  # spike = inf: only that leaf's grad is inf

        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    scaled = sharded.mixed_precision(torch.float64, keep_fp32=lambda name, p: False, loss_scale=True)
    step = sharded.compress_grads()(reducer(bucket_mb=1e-4)(scaled(train_step)))
    state = step.init(_state(model, warmup=1))
    (tokens, targets), ones, zero = _batches(4, steps=1)[0], torch.ones(4, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for _ in range(2):  # warmup, then a compressed step
        state, _ = step(state, (tokens, targets, ones, zero))
    before = copy.deepcopy((state.params, state.extra["compress_grads"], state.opt_state))
    if partial:
        bad = (tokens, targets, ones, torch.tensor(float("inf"), dtype=torch.float64))
    else:  # rank 1's rows weigh inf
        bad = (tokens, targets, torch.tensor([1.0, 1.0, float("inf"), 1.0], dtype=torch.float64), zero)
    state, metrics = step(state, bad)
    after = (state.params, state.extra["compress_grads"], state.opt_state)
    return int(metrics["skipped_steps"]), all(torch.equal(a, b) for a, b in zip(sharded.tree.leaves(before), sharded.tree.leaves(after)))


@pytest.mark.parametrize("reducer", [sharded.data_parallel, functools.partial(sharded.shard_zero, stage=2)], ids=["data_parallel", "zero2"])
@pytest.mark.parametrize("partial", [False, True], ids=["every bucket", "one bucket of many"])
def test_an_overflowing_step_leaves_the_exchange_state_as_it_was(partial, reducer):
    """Under ZeRO-2 the update runs whole on a stand-in state, which a skipped step must
    not keep (its momentum is zero)."""
    for skipped, unchanged in get_pool(2).run(_overflow_keeps_the_exchange_state, partial, reducer):
        assert skipped == 1 and unchanged


def _gathers_and_replicas(stack):
    """After warmup under ZeRO-1/2: the untagged all-gathers a compressed step issues (the
    params' gather after the update, gone), and every rank's params, to compare."""
    model = sharded.trace(ToyLM(CFG).double())
    step = STACKS[stack](make_train_step(model))
    state = step.init(_state(model, warmup=1))
    gathers = []
    for batch in _batches(4, steps=4):
        with comm.recording() as ops:
            state, _ = step(state, batch)
        gathers.append(sum(op.name == "all_gather" and op.tag not in ("reduce_grads", "compress_grads") for op in ops))
    mine = torch.cat([p.reshape(-1) for p in state.params.values()])
    everyone = comm.gathered(mine, torch.distributed.group.WORLD)
    return gathers, all(torch.equal(everyone[0], x) for x in everyone)


@pytest.mark.parametrize("stack", ["zero1", "zero2"])
def test_after_warmup_zero_updates_whole_params_on_every_rank_without_a_gather(stack):
    """[Note: an update every rank runs whole]: the params stay bitwise equal on every rank
    (the equality with the reference is test_after_warmup_the_exchange_is_the_one_bit_algorithm)."""
    for gathers, equal in get_pool(2).run(_gathers_and_replicas, stack):
        assert gathers[0] > 0 and gathers[2:] == [0, 0], gathers
        assert equal


def _compressed_steps_after_a_skipped_warmup_step():
    """warmup_steps=2 and the first step overflows: which steps exchange compressed."""
    model = sharded.trace(ToyLM(CFG).double())

    def train_step(state, batch):
        def loss(params, b):
            tokens, targets, weight = b
            per_row = F.cross_entropy(model.apply(params, tokens).transpose(1, 2), targets, reduction="none").mean(1)
            return (per_row * weight).mean()

        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    scaled = sharded.mixed_precision(torch.float64, keep_fp32=lambda name, p: False, loss_scale=True)
    step = sharded.compress_grads()(sharded.shard_zero(stage=2, bucket_mb=1e-4)(scaled(train_step)))
    state = step.init(_state(model, warmup=2))
    (tokens, targets), ones = _batches(4, steps=1)[0], torch.ones(4, dtype=torch.float64)
    weights = [torch.tensor([1.0, 1.0, float("inf"), 1.0], dtype=torch.float64)] + [ones] * 4
    compressed = []
    for w in weights:
        with comm.recording() as ops:
            state, _ = step(state, (tokens, targets, w))
        compressed.append(any(op.tag == "compress_grads" for op in ops))
    return compressed, int(_frozen_adam(state).count)


def test_a_step_skipped_in_warmup_does_not_count_toward_it():
    """The variance freezes after warmup_steps updates of the optimizer; a step the loss
    scaler skipped is not one (as in DeepSpeed), so compression starts a step later."""
    for compressed, count in get_pool(2).run(_compressed_steps_after_a_skipped_warmup_step):
        assert compressed == [False, False, False, True, True] and count == 4, (compressed, count)
