"""offload("cpu"): the optimizer state in host memory, the update run there. Equality
with the plain step, alone and in every pair and drawn triple, is in test_registry.py;
params=True (which needs ZeRO-3) is drawn here, with where the state lives, what
checkpoints and gather make of it, and bad input."""
import errno
import os
import sys
import zlib

import pytest
import torch

import sharded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded.placement import Tier, state_leaves
from sharded.testing import assert_step_equivalent, get_pool
from sharded.testing.models import ToyConfig, ToyLM, make_train_step
from sharded.testing.strategies import nested_in_drawn_order

CFG = ToyConfig(vocab=11, width=8, hidden=12, depth=2, tied=True)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab, (4, 3), generator=g), torch.randint(0, CFG.vocab, (4, 3), generator=g)


def _step(stage, dtype=torch.float64, params=False, update="host"):
    model = sharded.trace(ToyLM(CFG).to(dtype))
    step = sharded.offload("cpu", params=params, update=update)(sharded.shard_zero(stage=stage, bucket_mb=1e-4)(make_train_step(model)))
    return model, step


def _placed(stage, params, update):
    model, step = _step(stage, torch.float32, params, update)  # the formula counts fp32 optimizer state
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    moved = ("opt_state", "params") if params else ("opt_state",)
    tiers = {path: state.placements.get(path).tier for path, x in state_leaves(state) if path.startswith(moved)}
    (offload,) = [t for t in step.transforms if t.name == "offload"]
    live = [x for path, x in state_leaves(state) if path.startswith(moved) and x.ndim]  # the counts are 0-d
    staged = [x for buffers in offload._buffers.values() for x in buffers]  # the update's host copies (or the host leaves themselves)
    live += [x for x in staged if not any(x is y for y in live)]
    host_bytes = sum(x.numel() * x.element_size() for x in live)
    est = sharded.estimate_memory(model, stage=stage, world_size=2, optimizer="adamw", offload="cpu", offload_params=params, offload_update=update)
    on_device = sum(  # the model state left on the device between steps (the placements say where each leaf is)
        x.numel() * x.element_size() for path, x in state_leaves(state)
        if path.startswith(("params", "opt_state")) and x.ndim and (state.placements.get(path) is None or state.placements.get(path).tier is Tier.DEVICE)
    )
    full = step.gather(state)
    back = [full.placements.get(path) for path, _ in state_leaves(full) if path.startswith(moved)]
    return tiers, host_bytes, est, back, on_device


@pytest.mark.parametrize("stage,params,update", [(1, False, "host"), (3, False, "host"), (3, True, "host"), (3, True, "device")])
def test_the_offloaded_state_is_placed_on_the_host_and_gathered_back(stage, params, update):
    for tiers, host_bytes, est, back, on_device in get_pool(2).run(_placed, stage, params, update):
        assert tiers and set(tiers.values()) == {Tier.HOST}  # every tensor of it, moments and counts (and param chunks)
        assert est.optimizer == 0 and host_bytes == est.host  # this rank's chunks and the update's host copies; none on the device
        assert on_device == est.params  # the device keeps the params (stage 1: whole; stage 3: its chunks; params=True: none)
        assert (est.params == 0) == params
        assert (est.grads == 0) == (params and update == "host")  # streamed through the device, the grads stay there
        assert all(p is None or p.tier is Tier.DEVICE for p in back)  # gathered: on the device, whole


def _equals_the_plain_step(draw, layers, worlds, tx, piped=False, microbatches=st.integers(1, 2), loss_scaler=True):
    """`layers` with accumulate (or, `piped`, a 2-stage pipeline on its own mesh axis) and
    a loss scaler drawn in, nested in a drawn order, on a drawn number of dp ranks
    (`worlds`) over a drawn toy model and batches: the plain step's params and optimizer
    state."""
    cfg = ToyConfig(vocab=draw(st.integers(3, 13)), width=draw(st.integers(3, 7)), hidden=draw(st.integers(1, 9)),
                    depth=draw(st.integers(2 if piped else 1, 3)), tied=draw(st.booleans()), seed=draw(st.integers(0, 99)))
    model = sharded.trace(ToyLM(cfg).double())
    train_step = make_train_step(model)
    steps = draw(microbatches)
    if piped:
        layers.append(sharded.pipeline(stages=2, microbatches=steps, schedule=draw(st.sampled_from(["1f1b", "gpipe"]))))
    elif steps > 1:
        layers.append(sharded.accumulate(steps=steps))
    step = nested_in_drawn_order(draw, layers, train_step, loss_scaler)
    dp = draw(worlds)
    rows = dp * steps * draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    seq = draw(st.integers(1, 4))
    batches = [(torch.randint(0, cfg.vocab, (rows, seq), generator=g), torch.randint(0, cfg.vocab, (rows, seq), generator=g)) for _ in range(3)]
    world, mesh = (2 * dp, dict(pp=2, dp=dp)) if piped else (dp, None)
    assert_step_equivalent(step, train_step, sharded.TrainState.create(model.params, tx), batches, world_size=world, rtol=1e-7, atol=1e-9, mesh=mesh)


OPTIMIZERS = [
    sharded.optim.adamw(1e-2, weight_decay=0.1),  # fused
    sharded.optim.sgd(0.1, momentum=0.9),  # pure
    sharded.optim.chain(sharded.optim.clip_by_global_norm(0.05), sharded.optim.adamw(1e-2)),  # a head that reads every leaf, then parts
]


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_params_off_the_device_under_zero3_equal_the_plain_step(tmp_path, data):
    """offload(params=True) over ZeRO-3, the params in host memory (the update started
    during backward where nothing drawn rewrites the grads) or in the nvme tier's swap
    file beside the moments (buffers small enough to cut leaves into pieces), on 1-4
    ranks (one: ZeRO-Infinity on one GPU, each block fetched whole), or 2 dp ranks of a
    2-stage pipeline."""
    zero = sharded.shard_zero(stage=3, prefetch=data.draw(st.integers(0, 2)), reshard_after_forward=data.draw(st.booleans()))
    piped = data.draw(st.booleans())
    disk = data.draw(st.booleans())
    tier = sharded.offload("nvme", path=str(tmp_path), host_buffer_gb=data.draw(st.sampled_from([64, 4096])) / 2**20, params=True) if disk else sharded.offload("cpu", params=True)
    layers = [tier, zero]
    _equals_the_plain_step(data.draw, layers, st.just(2) if piped else st.integers(1, 4), data.draw(st.sampled_from(OPTIMIZERS)), piped)


@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_the_update_streamed_through_the_device_equals_the_plain_step(data):
    """offload(params=True, update="device") over ZeRO-3 on 1-4 ranks, with 1-3
    micro-batches: each block's param chunks and moments copied to the grads' device (on
    CPU ranks, CPU copies), updated there as the last backward reduces the block, and
    copied back; no loss scaler and a leafwise optimizer, as it needs."""
    zero = sharded.shard_zero(stage=3, prefetch=data.draw(st.integers(0, 2)), reshard_after_forward=data.draw(st.booleans()))
    layers = [sharded.offload("cpu", params=True, update="device"), zero]
    _equals_the_plain_step(data.draw, layers, st.integers(1, 4), data.draw(st.sampled_from(OPTIMIZERS[:2])), microbatches=st.integers(1, 3), loss_scaler=False)


@pytest.mark.parametrize("update", ["host", "device"])
def test_explain_says_where_the_update_runs_and_what_crosses(update):
    model = sharded.trace(ToyLM(CFG))
    step = sharded.offload("cpu", params=True, update=update)(sharded.shard_zero(stage=3)(make_train_step(model)))
    step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    text = str(step.explain(rank=0))
    crossing = ["params and moments to the device", "update on the device", "params and moments back to the host"]
    assert all((line in text) == (update == "device") for line in crossing)
    assert ("grads to the host" in text) == (update == "host")


def _estimate(*flags):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "sharded", "estimate", "--preset", "125m", "--zero", "3", "--world-size", "2", *flags], capture_output=True, text=True)
    return done.returncode, {line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines() if line.endswith(" GiB")}, done.stderr


def test_sharded_estimate_counts_the_streamed_updates_grads_on_the_device():
    _, host, _ = _estimate("--offload", "cpu", "--offload-params")
    _, device, _ = _estimate("--offload", "cpu", "--offload-params", "--offload-update", "device")
    assert host["grads"] == 0 < device["grads"] and device["host"] < host["host"]  # no host copies of the grads
    code, _, err = _estimate("--offload-update", "device")
    assert code == 2 and err.strip().splitlines()[-1].startswith("sharded estimate: error: estimate_memory(offload_update='device')")


def _reduced_every_micro_batch():
    model = sharded.trace(ToyLM(CFG).double())
    zero = sharded.shard_zero(stage=3, reduce_every_microbatch=True)
    step = sharded.offload("cpu", params=True, update="device")(zero(sharded.accumulate(steps=2)(make_train_step(model))))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    with pytest.raises(ValueError, match=r"update='device'.*reduce_every_microbatch=True.*use update='host'"):
        step(state, _batch(0))
    return True


def test_the_streamed_update_refuses_grads_that_are_summed_after_their_reduction():
    """shard_zero(reduce_every_microbatch=True) adds each micro-batch's reduction to the
    last: no reduction is final, so the update cannot start during backward, and
    update='device' says so rather than running on the host."""
    assert all(get_pool(2).run(_reduced_every_micro_batch))


def test_a_chunk_fetched_twice_in_a_step_is_kept_once_for_its_update():
    """[Note: the param a regather already fetched]: the second fetch's copy, once; a new
    step starts counting again."""
    from sharded.transforms._host_update import Refetches

    kept, (a, b), step = Refetches(), (torch.zeros(2), torch.zeros(3)), object()
    forward, backward = [torch.ones(2), torch.ones(3)], [torch.ones(2)]
    kept.fetched(step, [a, b], forward)
    assert kept.take(a) is None  # fetched once: the update sends it up itself
    kept.fetched(step, [a], backward)
    assert kept.take(a) is backward[0] and kept.take(a) is None and kept.take(b) is None
    kept.fetched(object(), [b], [torch.ones(3)])
    assert kept.take(b) is None  # the next step's first fetch


def _resumed(tmp):
    model, step = _step(2)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    sharded.checkpoint.save(state, tmp)
    fresh = step.init(sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.adamw(1e-2)))
    loaded = sharded.checkpoint.load(tmp, like=fresh)
    a, _ = step(state, _batch(1))
    b, _ = step(loaded, _batch(1))
    return all(torch.equal(x, y) for x, y in zip(sharded.tree.leaves((a.params, a.opt_state)), sharded.tree.leaves((b.params, b.opt_state))))


def test_a_checkpoint_of_offloaded_state_continues_identically(tmp_path):
    assert all(get_pool(2).run(_resumed, str(tmp_path / "c")))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown tier; use tier='cpu'"):
        sharded.offload(tier="gpu")
    with pytest.raises(ValueError, match="update='gpu'.*runs on the 'host'.*or the 'device'"):
        sharded.offload(params=True, update="gpu")
    for wrong in (dict(), dict(tier="nvme", path="."), dict(where=lambda name, x: True)):
        with pytest.raises(ValueError, match=r"update='device'.*built for offload\('cpu', params=True\)"):
            sharded.offload(update="device", **wrong)
    model = sharded.trace(ToyLM(CFG))
    device_site = sharded.offload("cpu", params=True, update="device")
    with pytest.raises(ValueError, match=r"update='device'.*mixed_precision\(float16, dynamic loss scale\) changes them after.*use update='host'"):
        device_site(sharded.shard_zero(stage=3)(sharded.mixed_precision("fp16")(make_train_step(model)))).init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    clipped = sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(1e-2))
    with pytest.raises(ValueError, match=r"update='device'.*needs a leafwise optimizer.*drop the clip"):
        device_site(sharded.shard_zero(stage=3)(make_train_step(model))).init(sharded.TrainState.create(model.params, clipped))
    with pytest.raises(ValueError, match="offload_update='device'.*with offload='cpu' and offload_params=True"):
        sharded.estimate_memory(sharded.trace(ToyLM(CFG)), stage=3, world_size=2, offload="cpu", offload_update="device")
    with pytest.raises(ValueError, match="params=.... is True"):
        sharded.offload(params="yes")
    with pytest.raises(ValueError, match=r"where=\.\.\.\) is a predicate"):
        sharded.offload(where="blocks")
    with pytest.raises(ValueError, match="where=.*built for tier='cpu' without params=True"):
        sharded.offload(params=True, where=lambda name, x: True)
    model = sharded.trace(ToyLM(CFG))
    for step in (sharded.offload(params=True)(make_train_step(model)), sharded.offload(params=True)(sharded.shard_zero(stage=2)(make_train_step(model)))):
        with pytest.raises(ValueError, match=r"params=True.*needs shard_zero\(stage=3\)"):
            step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    with pytest.raises(ValueError, match="offload_params=True.*needs offload='cpu' or 'nvme' and stage=3"):
        sharded.estimate_memory(model, stage=2, world_size=2, offload="cpu", offload_params=True)


def _short_of_host_memory():
    module = sys.modules["sharded.transforms.offload"]
    available, module._available_host_bytes = module._available_host_bytes, lambda: 1024
    try:  # this rank process serves later tests too
        model = sharded.trace(ToyLM(CFG))
        step = sharded.offload("cpu", params=True)(sharded.shard_zero(stage=3)(make_train_step(model)))
        with pytest.raises(ValueError, match=r"moving this rank's state .* needs .* GiB of host memory, and its share .* is 0.00 GiB"):
            step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    finally:
        module._available_host_bytes = available
    return True


def test_too_little_host_memory_is_named_before_the_first_step():
    """What moving allocates (here the param chunks, pinned copies beside a GPU; the
    optimizer state made on the host already stays) against this rank's share."""
    assert get_pool(1).run(_short_of_host_memory) == [True]


def _made_on_the_host():
    model = sharded.trace(ToyLM(CFG))
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2), opt_device="cpu")
    moments = [x for x in sharded.tree.leaves(state.opt_state) if x.ndim]
    laid_out = sharded.offload("cpu")(make_train_step(model)).init(state)
    return all(x.device.type == "cpu" for x in moments) and all(
        any(y is x for x in moments) for y in sharded.tree.leaves(laid_out.opt_state) if y.ndim
    )


def test_an_optimizer_state_made_on_the_host_stays_where_it_is():
    """TrainState.create(..., opt_device="cpu"): the moments never touch the device, and
    offload keeps those very tensors (no second copy in host memory)."""
    assert _made_on_the_host()


def test_the_host_update_takes_this_ranks_share_of_the_cores(monkeypatch):
    module = sys.modules["sharded.transforms.offload"]
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert module._host_threads() == 7  # 16 cores, 2 ranks on the host, one core each for its own thread
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert module._host_threads() == 1  # never none
    before = torch.get_num_threads()
    with module._threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# -- tier="nvme": the moments in a swap file, the update through bounded host buffers --

@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_the_nvme_tier_equals_the_plain_step(tmp_path, data):
    """offload('nvme') alone or over ZeRO 1-3, on 1-3 ranks or a 2-stage pipeline's dp
    ranks, its buffers small enough for many groups (64 KiB: one leaf per group, each
    leaf's four tensors taking 16 KiB aligned), with AdamW (fused), momentum SGD (pure)
    or a global-norm clip before AdamW (run whole on the device's grads, then the rest in
    parts)."""
    draw = data.draw
    buffer_kib = draw(st.sampled_from([64, 160, 4096]))
    layers = [sharded.offload("nvme", path=str(tmp_path), host_buffer_gb=buffer_kib / 2**20)]
    stage = draw(st.integers(0, 3))
    if stage:
        layers.append(sharded.shard_zero(stage=stage))
    tx = draw(st.sampled_from(OPTIMIZERS))
    piped = draw(st.booleans())  # a 2-stage pipeline on its own axis (ZeRO beside it needs 2 dp ranks)
    worlds = (st.just(2) if stage else st.integers(1, 2)) if piped else (st.integers(1, 3) if stage else st.just(1))
    _equals_the_plain_step(draw, layers, worlds, tx, piped)


def _some(seed):
    """A predicate choosing about half the params, by a hash of `seed` and the name."""
    return lambda name, x: zlib.crc32(f"{seed}:{name}".encode()) % 2 == 0


@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_offloading_the_params_a_predicate_chooses_equals_the_plain_step(data):
    """offload('cpu', where=...): the chosen leaves' update on the host, the rest on the
    device, alone or over ZeRO 1-3, on 1-3 ranks or a 2-stage pipeline's dp ranks."""
    draw = data.draw
    layers = [sharded.offload("cpu", where=_some(draw(st.integers(0, 99))))]
    stage = draw(st.integers(0, 3))
    if stage:
        layers.append(sharded.shard_zero(stage=stage))
    piped = draw(st.booleans())
    worlds = (st.just(2) if stage else st.integers(1, 2)) if piped else (st.integers(1, 3) if stage else st.just(1))
    _equals_the_plain_step(draw, layers, worlds, draw(st.sampled_from(OPTIMIZERS)), piped)


def test_where_moves_the_chosen_params_state_and_leaves_the_rest():
    model = sharded.trace(ToyLM(CFG))
    blocks = lambda name, x: name.startswith("blocks.")  # noqa: E731
    step = sharded.offload("cpu", where=blocks)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    for path, x in state_leaves(state):
        if path.startswith("opt_state"):
            host = "['blocks." in path
            assert (x.device.type == "cpu" and state.placements.get(path) is not None and state.placements.get(path).tier is Tier.HOST) == host, path
    assert step.transforms[0].describe() == "offload('cpu', where=<lambda>)"
    elsewhere = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2), opt_device="meta")  # not beside the params
    with pytest.raises(ValueError, match="must be there too; make the state beside the params"):
        sharded.offload("cpu", where=blocks)(make_train_step(model)).init(elsewhere)


def test_a_leaf_larger_than_the_nvme_buffers_goes_through_them_in_pieces(tmp_path):
    """A leaf whose moments, grad and param exceed half of host_buffer_gb (as GPT-6.7B's
    embedding's 3.1 GiB exceed half of 4 GB) is stored and updated in pieces: equal to
    the plain step on one rank and under ZeRO-2 on two."""
    model = sharded.trace(ToyLM(ToyConfig(vocab=40, width=64, hidden=96, depth=1, tied=False)).double())
    buffer_gb = 64 / 2**20  # 32 KiB a set: 512 float64s a piece, four tensors of 4 KiB each
    tx = sharded.optim.adamw(1e-2, weight_decay=0.1)
    step = sharded.offload("nvme", path=str(tmp_path), host_buffer_gb=buffer_gb)(make_train_step(model))
    step.init(sharded.TrainState.create(model.params, tx))  # writes the moments to the swap file
    (offload,) = step.transforms
    leaves = sharded.tree.leaves(model.params)
    assert len(offload._disk.stores[0]._slots) == 2 * sum(-(-x.numel() // 512) for x in leaves)  # each moment in 512-element pieces
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 40, (4, 3), generator=g), torch.randint(0, 40, (4, 3), generator=g)) for _ in range(2)]
    for stage, world in [(0, 1), (2, 2)]:
        layers = sharded.offload("nvme", path=str(tmp_path), host_buffer_gb=buffer_gb)
        step = layers(sharded.shard_zero(stage=stage)(make_train_step(model))) if stage else layers(make_train_step(model))
        assert_step_equivalent(step, make_train_step(model), sharded.TrainState.create(model.params, tx), batches, world_size=world, rtol=1e-7, atol=1e-9)


def _on_disk(tmp, buffer_gb):
    model = sharded.trace(ToyLM(CFG))
    step = sharded.offload("nvme", path=tmp, host_buffer_gb=buffer_gb)(sharded.shard_zero(stage=3)(make_train_step(model)))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, metrics = step(state, _batch(0))
    tiers = {path: state.placements.get(path).tier for path, x in state_leaves(state) if path.startswith("opt_state")}
    moments = sum(x.numel() * x.element_size() for path, x in state_leaves(state) if path.startswith("opt_state") and x.ndim)
    (offload,) = [t for t in step.transforms if t.name == "offload"]
    arenas = sum(x.numel() * x.element_size() for x in offload._disk.arenas)
    files = [s.file for s in offload._disk.stores]
    est = sharded.estimate_memory(model, stage=3, world_size=2, optimizer="adamw", offload="nvme", host_buffer_gb=buffer_gb)
    sizes = [os.path.getsize(f) for f in files]
    full = step.gather(state)
    back = [full.placements.get(path) for path, _ in state_leaves(full) if path.startswith("opt_state")]
    swapped = (round(metrics["swap_read_gb"] * 1e9), round(metrics["swap_write_gb"] * 1e9))
    return tiers, moments, arenas, sizes, est, back, len(sharded.tree.leaves(state.params)), swapped


def test_the_nvme_tier_keeps_the_moments_on_disk_and_its_buffers_bounded(tmp_path):
    for tiers, moments, arenas, sizes, est, back, leaves, swapped in get_pool(2).run(_on_disk, str(tmp_path), 1e-4):
        assert swapped == (moments, moments)  # the step's metrics: every moment read and written back once
        assert {t for t in tiers.values()} == {Tier.DISK, Tier.HOST}  # the moments on disk, the counts in memory
        assert sum(t is Tier.DISK for t in tiers.values()) == 2 * leaves  # both moments of every leaf
        assert arenas == int(1e-4 * 2**30) // 2 * 2  # two sets, whatever the state's size
        assert len(sizes) == 1 and sizes[0] >= moments  # this rank's chunks of both moments, 4096-aligned slots
        assert est.disk == moments and est.optimizer == 0 and est.host == arenas
        assert all(p is None or p.tier is Tier.DEVICE for p in back)  # gathered: read back from the file, whole


def _params_on_disk(tmp):
    model = sharded.trace(ToyLM(CFG))
    step = sharded.offload("nvme", path=tmp, host_buffer_gb=1e-4, params=True)(sharded.shard_zero(stage=3)(make_train_step(model)))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    tiers = {path: state.placements.get(path).tier for path, x in state_leaves(state) if path.startswith("params") and x.numel()}
    on_disk = sum(x.numel() * x.element_size() for path, x in state_leaves(state) if path.startswith(("params", "opt_state")) and x.ndim and x.numel())
    est = sharded.estimate_memory(model, stage=3, world_size=2, optimizer="adamw", offload="nvme", offload_params=True, host_buffer_gb=1e-4)
    full = step.gather(state)
    whole = [x.shape for x in sharded.tree.leaves(full.params)] == [x.shape for x in sharded.tree.leaves(model.params)]
    return set(tiers.values()), on_disk, est, whole


def test_the_nvme_tier_with_params_keeps_the_param_chunks_in_the_swap_file(tmp_path):
    for tiers, on_disk, est, gathered in get_pool(2).run(_params_on_disk, str(tmp_path)):
        assert tiers == {Tier.DISK}  # every param chunk, mapped from the file
        assert est.disk == on_disk and est.params == 0  # the formula: moments and params on disk, nothing between steps on the device
        assert gathered  # whole params again, read back through the mapping


def _nvme_resumed(tmp):
    model = sharded.trace(ToyLM(CFG).double())
    step = sharded.offload("nvme", path=tmp, host_buffer_gb=1e-4)(sharded.shard_zero(stage=2)(make_train_step(model)))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    sharded.checkpoint.save(state, f"{tmp}/ckpt")
    fresh = step.init(sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.adamw(1e-2)))
    loaded = sharded.checkpoint.load(f"{tmp}/ckpt", like=fresh)
    a, _ = step(state, _batch(1))
    b, _ = step(loaded, _batch(1))
    return all(torch.equal(x, y) for x, y in zip(sharded.tree.leaves((a.params, a.opt_state)), sharded.tree.leaves((b.params, b.opt_state))))


def test_a_checkpoint_of_state_on_disk_continues_identically(tmp_path):
    assert all(get_pool(2).run(_nvme_resumed, str(tmp_path)))


def test_bad_nvme_input_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs path="):
        sharded.offload("nvme")
    with pytest.raises(ValueError, match="no such directory"):
        sharded.offload("nvme", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="takes neither"):
        sharded.offload("cpu", host_buffer_gb=1)
    with pytest.raises(ValueError, match="a number > 0"):
        sharded.offload("nvme", path=str(tmp_path), host_buffer_gb=0)
    monkeypatch.setattr(sys.modules["sharded.transforms.offload"].os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="not writable"):
        sharded.offload("nvme", path=str(tmp_path))
    monkeypatch.undo()
    model = sharded.trace(ToyLM(CFG))
    step = sharded.offload("nvme", path=str(tmp_path))(make_train_step(model))
    clipped_last = sharded.optim.chain(sharded.optim.adamw(1e-2), sharded.optim.clip_by_global_norm(1.0))
    with pytest.raises(ValueError, match="group by group.*cannot run in parts"):
        step.init(sharded.TrainState.create(model.params, clipped_last))
    small = sharded.offload("nvme", path=str(tmp_path), host_buffer_gb=1e-6)(make_train_step(model))
    state = small.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    with pytest.raises(ValueError, match="raise host_buffer_gb to at least"):
        small(state, _batch(0))
    Usage = type("Usage", (), {"free": 1024, "total": 1 << 40, "used": 0})
    monkeypatch.setattr(sys.modules["sharded.swap"].shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ValueError, match="disk"):
        sharded.offload("nvme", path=str(tmp_path))(make_train_step(model)).init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))


def test_a_full_disk_mid_run_is_named_and_the_last_checkpoint_loads(tmp_path, monkeypatch):
    model = sharded.trace(ToyLM(CFG).double())
    step = sharded.offload("nvme", path=str(tmp_path))(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    sharded.checkpoint.save(state, tmp_path / "ckpt")
    saved = [x.clone() for x in sharded.tree.leaves(state.opt_state)]

    def full(fd, buffers, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys.modules["sharded.swap"].os, "pwritev", full)
    with pytest.raises(RuntimeError, match="ENOSPC"):
        step(state, _batch(1))
    monkeypatch.undo()
    fresh = step.init(sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.adamw(1e-2)))
    loaded = sharded.checkpoint.load(tmp_path / "ckpt", like=fresh)
    assert all(torch.equal(a, b) for a, b in zip(sharded.tree.leaves(loaded.opt_state), saved))



def _retried_after_a_failure():
    model = sharded.trace(ToyLM(CFG).double())
    fails = [True]

    def loss(params, batch):
        logits = model.apply(params, batch[0])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        if fails[0]:  # backward ran, its grads streamed to the host and updated there; the step fails before its update
            fails[0] = False
            raise RuntimeError("the user's step failed")
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.offload("cpu", params=True)(sharded.shard_zero(stage=3)(train_step))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    with pytest.raises(RuntimeError, match="the user's step failed"):
        step(state, _batch(0))
    with pytest.raises(RuntimeError, match="partly updated, so restore them from a checkpoint"):
        step(state, _batch(0))
    return True


def test_a_step_retried_after_its_host_update_began_is_refused():
    """offload(params=True) updates on the host during backward: a step that fails after
    that leaves the state partly updated, and training on from it is an error, not a
    silent wrong answer."""
    assert all(get_pool(2).run(_retried_after_a_failure))
