"""offload("cpu"): the optimizer state in host memory, the update run there. Equality
with the plain step, alone and in every pair and drawn triple, is in test_registry.py;
here: where the state lives, what checkpoints and gather make of it, and bad input."""
import sys

import pytest
import torch

import sharded
from sharded.placement import Tier, state_leaves
from sharded.testing import get_pool
from sharded.testing.models import ToyConfig, ToyLM, make_train_step

CFG = ToyConfig(vocab=11, width=8, hidden=12, depth=2, tied=True)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab, (4, 3), generator=g), torch.randint(0, CFG.vocab, (4, 3), generator=g)


def _step(stage, dtype=torch.float64):
    model = sharded.trace(ToyLM(CFG).to(dtype))
    step = sharded.offload("cpu")(sharded.shard_zero(stage=stage, bucket_mb=1e-4)(make_train_step(model)))
    return model, step


def _placed(stage):
    model, step = _step(stage, torch.float32)  # the formula counts fp32 optimizer state
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    state, _ = step(state, _batch(0))
    tiers = {path: state.placements.get(path).tier for path, x in state_leaves(state) if path.startswith("opt_state")}
    (offload,) = [t for t in step.transforms if t.name == "offload"]
    live = [x for path, x in state_leaves(state) if path.startswith("opt_state") and x.ndim]  # the moments (the counts are 0-d)
    live += [x for buffers in offload._buffers.values() for x in buffers]  # the update's host copies
    host_bytes = sum(x.numel() * x.element_size() for x in live)
    est = sharded.estimate_memory(model, stage=stage, world_size=2, optimizer="adamw", offload="cpu")
    formula = est.host if est.optimizer == 0 else None
    full = step.gather(state)
    back = [full.placements.get(path) for path, _ in state_leaves(full) if path.startswith("opt_state")]
    return tiers, host_bytes, formula, back


@pytest.mark.parametrize("stage", [1, 3])
def test_the_optimizer_state_is_placed_on_the_host_and_gathered_back(stage):
    for tiers, host_bytes, formula, back in get_pool(2).run(_placed, stage):
        assert tiers and set(tiers.values()) == {Tier.HOST}  # every tensor of it, moments and counts
        assert host_bytes == formula  # this rank's chunks of both moments and its grads' and params' copies; none on the device
        assert all(p is None or p.tier is Tier.DEVICE for p in back)  # gathered: on the device, whole


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
    with pytest.raises(ValueError, match="tier='nvme'.*not built yet"):
        sharded.offload(tier="nvme")
    with pytest.raises(ValueError, match="params=True.*not built yet"):
        sharded.offload(params=True)


def test_too_little_host_memory_is_named_before_the_first_step(monkeypatch):
    module = sys.modules["sharded.transforms.offload"]
    monkeypatch.setattr(module, "_available_host_bytes", lambda: 1024)
    model = sharded.trace(ToyLM(CFG))
    step = sharded.offload("cpu")(make_train_step(model))
    with pytest.raises(ValueError, match=r"optimizer state needs .* GiB of host memory, and its share .* is 0.00 GiB"):
        step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))


def test_the_host_update_takes_this_ranks_share_of_the_cores(monkeypatch):
    module = sys.modules["sharded.transforms.offload"]
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert module._host_threads() == 8  # 16 cores, 2 ranks on the host
    before = torch.get_num_threads()
    with module._threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
