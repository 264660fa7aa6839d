"""Checkpoints: independent of the transforms and world size that wrote them, atomic,
and never unpickling arbitrary objects."""
import copy
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sharded
from sharded.testing import get_pool, run_steps
from sharded.testing.models import ToyConfig, ToyLM, make_train_step

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
CFG = ToyConfig(tied=True, width=5, hidden=7, depth=3, vocab=13, seed=1)


def _batches(rows=12, n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 13, (rows, 3), generator=g), torch.randint(0, 13, (rows, 3), generator=g)) for _ in range(n)]


def _setup(stage, hybrid=None):
    model = sharded.trace(ToyLM(CFG).double())
    train_step = make_train_step(model)
    step = sharded.shard_zero(stage=stage, hybrid=hybrid)(train_step) if stage else sharded.Step(train_step)
    tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(1e-2, weight_decay=0.1))
    return step, sharded.TrainState.create(model.params, tx)


def _first_half(stage, path, batches, hybrid=None):
    step, state = _setup(stage, hybrid)
    state, _ = run_steps(step, step.init(state), batches)
    sharded.checkpoint.save(state, path)


def _second_half(stage, path, batches):
    step, state = _setup(stage)
    like = step.init(sharded.tree.map(torch.zeros_like, state))  # values come from the checkpoint
    state = sharded.checkpoint.load(path, like)
    state, metrics = run_steps(step, state, batches)
    return step.gather(state).params, [m["loss"] for m in metrics]


def _run(world, fn, *args):
    return fn(*args) if world == 1 else get_pool(world).run(fn, *args)[0]


@settings(max_examples=8, deadline=None)
@given(
    save=st.tuples(st.integers(1, 3), st.sampled_from([0, 1, 2, 3])),
    load=st.tuples(st.integers(1, 3), st.sampled_from([0, 1, 2, 3])),
)
def test_round_trip_across_stages_and_world_sizes(tmp_path_factory, save, load):
    """Save after 2 steps with one (world, stage), load with another, take 2 more
    steps: params and losses equal 4 plain steps."""
    (w1, s1), (w2, s2) = save, load
    s1, s2 = (s1 if w1 > 1 else 0), (s2 if w2 > 1 else 0)
    path = str(tmp_path_factory.mktemp("ckpt") / "step_2")
    batches = _batches()
    ref_step, ref_state = _setup(0)
    ref_state, ref_metrics = run_steps(ref_step, copy.deepcopy(ref_state), batches)
    _run(w1, _first_half, s1, path, batches[:2])
    params, losses = _run(w2, _second_half, s2, path, batches[2:])
    for k, v in ref_state.params.items():
        torch.testing.assert_close(params[k], v, rtol=1e-9, atol=1e-12, msg=k)
    torch.testing.assert_close(losses, [m["loss"] for m in ref_metrics[2:]], rtol=1e-9, atol=1e-12)


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    step, state = _setup(0)
    path = tmp_path / "ckpt"
    sharded.checkpoint.save(state, path)
    before = {k: v.clone() for k, v in state.params.items()}
    state, _ = run_steps(step, state, _batches(n=1))

    real_save = sharded.checkpoint.dcp.save

    def crash(state_dict, storage_writer):  # some files written, then the process dies
        real_save({k: v for k, v in list(state_dict.items())[:2]}, storage_writer=storage_writer)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(sharded.checkpoint.dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        sharded.checkpoint.save(state, path)
    monkeypatch.undo()
    restored = sharded.checkpoint.load(path, sharded.tree.map(torch.zeros_like, state))
    for k, v in before.items():
        assert torch.equal(restored.params[k], v)
    sharded.checkpoint.save(state, path)  # the stale partial save is cleared, the new one lands
    assert sharded.checkpoint.load(path, sharded.tree.map(torch.zeros_like, state)).params.keys() == before.keys()


def test_another_model_names_the_first_mismatching_key(tmp_path):
    _, state = _setup(0)
    sharded.checkpoint.save(state, tmp_path / "a")
    other = sharded.trace(ToyLM(ToyConfig(tied=True, width=6, hidden=7, depth=3, vocab=13)).double())
    like = sharded.TrainState.create(other.params, state.tx)
    with pytest.raises(ValueError, match=r"params\['blocks.0.down.bias'\].* has 5 elements there, 6 here"):
        sharded.checkpoint.load(tmp_path / "a", like)
    deeper = sharded.trace(ToyLM(ToyConfig(tied=True, width=5, hidden=7, depth=4, vocab=13)).double())
    with pytest.raises(ValueError, match=r"it has no \"params\['blocks.3"):
        sharded.checkpoint.load(tmp_path / "a", sharded.TrainState.create(deeper.params, state.tx))


class _Boom:
    def __reduce__(self):
        return (print, ("this ran during load",))


def test_metadata_that_is_not_dcp_metadata_is_refused(tmp_path):
    _, state = _setup(0)
    sharded.checkpoint.save(state, tmp_path / "a")
    (tmp_path / "a" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(sharded.checkpoint.UnsafeCheckpoint, match="builtins.print"):
        sharded.checkpoint.load(tmp_path / "a", state)


def _export(path):
    step, state = _setup(3)
    state = step.init(state)
    full = step.gather(state).params
    sharded.checkpoint.export_safetensors(full, path)
    return full


def test_export_safetensors_writes_the_whole_params(tmp_path):
    from safetensors.torch import load_file

    full = get_pool(2).run(_export, str(tmp_path / "model.safetensors"))[0]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert loaded.keys() == full.keys()
    for k in full:
        assert torch.equal(loaded[k], full[k])


def test_a_hybrid_sharded_checkpoint_loads_into_one_process(tmp_path):
    """Replicas write the same chunks once; a plain process reads the whole leaves."""
    batches = _batches()
    ref_step, ref_state = _setup(0)
    ref_state, ref_metrics = run_steps(ref_step, copy.deepcopy(ref_state), batches)
    get_pool(4).run(_first_half, 3, str(tmp_path / "c"), batches[:2], 2)
    params, losses = _second_half(0, str(tmp_path / "c"), batches[2:])
    for k, v in ref_state.params.items():
        torch.testing.assert_close(params[k], v, rtol=1e-9, atol=1e-12, msg=k)


def _pipeline_setup(stages):
    model = sharded.trace(ToyLM(CFG).double())
    if stages > 1:
        sharded.Mesh.set_current(sharded.Mesh(pp=stages))
    step = sharded.pipeline(stages=stages, microbatches=2)(make_train_step(model))
    tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(1e-2, weight_decay=0.1))
    return step, sharded.TrainState.create(model.params, tx)


def _pipeline_first_half(path, batches):
    step, state = _pipeline_setup(2)
    state, _ = run_steps(step, step.init(state), batches)
    sharded.checkpoint.save(state, path)


def test_a_pipeline_checkpoint_loads_into_one_process(tmp_path):
    """Each pp rank writes its stage's params (the tied weight from both holders, once);
    a plain single-process state loads them and continues exactly."""
    batches = _batches()
    path = str(tmp_path / "ckpt")
    get_pool(2).run(_pipeline_first_half, path, batches[:2])
    step, state = _setup(0)
    want, _ = run_steps(step, copy.deepcopy(state), batches)
    state = sharded.checkpoint.load(path, sharded.tree.map(torch.zeros_like, state))
    got, _ = run_steps(step, state, batches[2:])
    for name in want.params:
        torch.testing.assert_close(got.params[name], want.params[name], rtol=1e-9, atol=1e-11)


class _RankStamp(sharded.Transform):
    """Adds a buffer whose value is each rank's own, and declares it so (per_rank)."""

    name = "rank_stamp"

    def init(self, state):
        from sharded.placement import Placement

        stamp = torch.full((3,), float(sharded.distributed.rank()))
        return state.replace(
            extra={**state.extra, "stamp": stamp},
            placements=state.placements.update({"extra['stamp']": Placement(stamp.shape, per_rank=True)}),
        )


def _stamped_state():
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.transform(_RankStamp)()(sharded.shard_zero(stage=3)(make_train_step(model)))
    return step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))


def _save_stamps(path):
    sharded.checkpoint.save(_stamped_state(), path)


def _load_stamps(path):
    state = _stamped_state()
    state.extra["stamp"].fill_(-1.0)
    sharded.checkpoint.load(path, like=state)
    return state.extra["stamp"].tolist()


def test_per_rank_buffers_are_saved_and_restored_per_rank(tmp_path):
    """A buffer a transform declares per_rank (error feedback, say) comes back to the rank
    that saved it; a job whose ranks do not match is told so by name."""
    get_pool(2).run(_save_stamps, tmp_path / "ckpt")
    assert get_pool(2).run(_load_stamps, tmp_path / "ckpt") == [[0.0] * 3, [1.0] * 3]
    with pytest.raises(Exception, match=r"stamp'\]@rank2.*per-rank buffer"):
        get_pool(3).run(_load_stamps, tmp_path / "ckpt")


def _placements_of_zero(stage):
    model = sharded.trace(ToyLM(ToyConfig()))
    step = sharded.shard_zero(stage=stage)(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    cut = {path: [(c.axis, c.ranks, c.rank) for c in p.cuts] for path, p in state.placements.items()}
    return cut, step.gather(state).placements.entries


@pytest.mark.parametrize("stage", [1, 3])
def test_placements_say_which_leaves_are_cut(stage):
    """ZeRO writes a dp cut for each leaf it chunks (the params too at stage 3) and
    gather removes them; nothing else is recorded."""
    (cut, after), _ = get_pool(2).run(_placements_of_zero, stage)
    model = sharded.trace(ToyLM(ToyConfig()))
    params = {f"params['{n}']" for n in model.params}
    moments = {p for p in cut if p.startswith("opt_state")}
    assert len(moments) == 2 * len(params)  # AdamW's mu and nu
    assert (params <= set(cut)) == (stage == 3)
    assert all(c == [("dp", 2, 0)] for c in cut.values())
    assert after == ()
