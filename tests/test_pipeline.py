"""pipeline: schedules as data, equivalence with the plain step on pp × dp meshes, memory, errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sharded
from sharded.testing import assert_step_equivalent, get_pool
from sharded.testing.models import ToyConfig, ToyLM, make_train_step
from sharded.transforms._schedules import SCHEDULES, Action, simulate, with_comm


# -- schedules (pure data) ----------------------------------------------------------------


def _in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose forward ran and backward did not, at any point."""
    live, peak = 0, 0
    for a in actions:
        live += {"F": 1, "B": -1}.get(a.kind, 0)
        peak = max(peak, live)
    return peak


@given(p=st.integers(1, 4), m=st.integers(1, 8), name=st.sampled_from(sorted(SCHEDULES)), v=st.integers(2, 3))
@settings(max_examples=150, deadline=None)
def test_schedules_run_to_the_end_with_links_in_order(p, m, name, v):
    if name == "interleaved" and (m % p or p == 1):
        with pytest.raises(ValueError, match="not a multiple|needs stages >= 2"):
            SCHEDULES[name](p, m, v)
        return
    virtual = v if name == "interleaved" else 1
    schedule = SCHEDULES[name](p, m, virtual)
    timeline = simulate(schedule, p * virtual)  # raises on a deadlock or a misordered link
    for rank, actions in enumerate(schedule):
        assert sorted((a.kind, a.mb, a.chunk) for a in actions) == sorted(
            (kind, mb, k) for kind in "FB" for mb in range(m) for k in range(rank, p * virtual, p)
        )
    if name == "1f1b":
        assert timeline.bubble == pytest.approx((p - 1) / (m + p - 1))
        assert max(_in_flight(a) for a in schedule) == min(p, m)
    if name == "gpipe":
        assert max(_in_flight(a) for a in schedule) == m
    if name == "interleaved" and p > 1:
        assert timeline.bubble < simulate(SCHEDULES["1f1b"](p, m), p).bubble


def test_every_receive_has_its_send():
    full = with_comm(SCHEDULES["interleaved"](2, 4, 2), chunks=4)
    sends = sum(a.kind.startswith("send") for r in full for a in r)
    assert sends == sum(a.kind.startswith("recv") for r in full for a in r) == 2 * 4 * 3


# -- equivalence ----------------------------------------------------------------------------


class GatedBlock(nn.Module):
    """A block that takes the hidden states, a padding mask and a learned gate."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h, mask, *, gate):
        return h + torch.tanh(self.lin(h)) * mask * gate


class GatedLM(nn.Module):
    """Blocks pass three tensors: hidden states (grad), a mask (no grad) and a gate made
    from a param before the first block (grad, which flows back to the first stage)."""

    def __init__(self, vocab: int = 11, width: int = 6, depth: int = 4):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, width)
        self.gate = nn.Parameter(torch.randn(width))
        self.blocks = nn.ModuleList(GatedBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        mask = (tokens != 0).to(h.dtype)[..., None]
        gate = torch.sigmoid(self.gate)
        for block in self.blocks:
            h = block(h, mask, gate=gate)
        return self.head(h)


def _case(module: nn.Module, rows: int, steps: int = 2, seed: int = 0, lr: float = 1e-2):
    model = sharded.trace(module.double())
    state = sharded.TrainState.create(model.params, sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(lr)))
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randint(0, 11, (rows, 3), generator=g),) * 2 for _ in range(steps)]
    return model, make_train_step(model), state, batches


_STACKS = {
    "none": lambda s: s,
    "zero1": lambda s: sharded.shard_zero(stage=1)(s),
    "zero2": lambda s: sharded.shard_zero(stage=2)(s),
    "zero3": lambda s: sharded.shard_zero(stage=3)(s),
    "data_parallel": lambda s: sharded.data_parallel(s),
    "zero3_accumulate": lambda s: sharded.shard_zero(stage=3)(sharded.accumulate(steps=2)(s)),
}


@given(
    pp=st.integers(1, 4),
    dp=st.integers(1, 2),
    schedule=st.sampled_from(sorted(SCHEDULES)),
    m=st.integers(1, 4),
    tied=st.booleans(),
    stack=st.sampled_from(sorted(_STACKS)),
    seed=st.integers(0, 3),
)
@settings(max_examples=8, deadline=None)
def test_pipeline_equals_the_plain_step(pp, dp, schedule, m, tied, stack, seed):
    if pp * dp > 4 or (schedule == "interleaved" and (m % pp or pp == 1)):
        return
    if stack != "none" and dp == 1:
        stack = "none"
    virtual = 2 if schedule == "interleaved" else 1
    depth = pp * virtual + seed % 2
    acc = 2 if "accumulate" in stack else 1
    _, train_step, state, batches = _case(ToyLM(ToyConfig(depth=depth, tied=tied, seed=seed)), rows=dp * m * acc * 2, seed=seed)
    step = _STACKS[stack](sharded.pipeline(stages=pp, microbatches=m, schedule=schedule, virtual=virtual)(train_step))
    assert_step_equivalent(step, train_step, state, batches, world_size=pp * dp, mesh=dict(pp=pp, dp=dp), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("stack", ["none", "zero3"])
def test_blocks_that_pass_several_tensors(schedule, stack):
    dp = 2 if stack != "none" else 1
    _, train_step, state, batches = _case(GatedLM(), rows=dp * 4)
    step = _STACKS[stack](sharded.pipeline(stages=2, microbatches=2, schedule=schedule)(train_step))
    assert_step_equivalent(step, train_step, state, batches, world_size=2 * dp, mesh=dict(pp=2, dp=dp), rtol=1e-9, atol=1e-11)


def test_interleaved_with_messages_that_must_meet_their_receiver():
    """Boundary tensors of ~0.8 MB: gloo's send then waits for its receive. With both
    directions of a link on one group, interleaved on 2 ranks deadlocked (see
    [Note: one link per direction])."""
    _, train_step, state, batches = _case(ToyLM(ToyConfig(depth=4, width=256, hidden=8)), rows=512, steps=1)
    step = sharded.pipeline(stages=2, microbatches=4, schedule="interleaved")(train_step)
    assert_step_equivalent(step, train_step, state, batches, world_size=2, mesh=dict(pp=2), rtol=1e-9, atol=1e-11)


def test_a_tied_head_on_four_stages_with_clipping():
    """The tied grad is summed over the first and last stage; the clip norm counts it once."""
    _, train_step, state, batches = _case(ToyLM(ToyConfig(depth=4, tied=True)), rows=8, steps=3, lr=0.5)
    step = sharded.pipeline(stages=4, microbatches=4)(train_step)
    assert_step_equivalent(step, train_step, state, batches, world_size=4, mesh=dict(pp=4), rtol=1e-9, atol=1e-11)


def test_mixed_precision_inside_the_pipeline_tracks_its_plain_step():
    model = sharded.trace(ToyLM(ToyConfig(depth=4, width=8, hidden=16)))
    train_step = make_train_step(model)
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2))
    batches = [(torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(i)),) * 2 for i in range(3)]
    reference = sharded.mixed_precision("bf16")(train_step)
    step = sharded.pipeline(stages=2, microbatches=1)(sharded.mixed_precision("bf16")(train_step))
    # bf16 ops at the boundary round in a different order than in one graph: Adam turns
    # that into differences up to ~1e-4 after 3 steps at lr=1e-2.
    assert_step_equivalent(step, reference, state, batches, world_size=2, mesh=dict(pp=2), rtol=1e-2, atol=1e-3)


# -- memory, explain ------------------------------------------------------------------------


def _peak_held(schedule: str, m: int) -> list[int]:
    sharded.Mesh.set_current(sharded.Mesh(pp=2))
    _, train_step, state, batches = _case(ToyLM(ToyConfig(depth=4)), rows=m)
    step = sharded.pipeline(stages=2, microbatches=m, schedule=schedule)(train_step)
    state = step.init(state)
    step(state, batches[0])
    return step.transforms[0].peak_held


@pytest.mark.parametrize("schedule, bound", [("1f1b", lambda p, m: p), ("gpipe", lambda p, m: m)])
def test_activations_held_per_rank(schedule, bound):
    """1F1B holds at most p micro-batches' activations on a rank; GPipe holds all m."""
    held = get_pool(2).run(_peak_held, schedule, 6)
    assert max(held) == bound(2, 6)
    assert held[1] == 1 or schedule == "gpipe"  # the last stage runs each backward right after its forward


def test_explain_shows_each_ranks_schedule():
    sharded.Mesh.set_current(None)
    model, train_step, state, _ = _case(ToyLM(ToyConfig(depth=2)), rows=2)
    step = sharded.pipeline(stages=1, microbatches=2)(train_step)
    step.init(state)
    text = str(step.explain())
    assert "1f1b schedule, pp rank 0" in text and "F1/c0" in text and "B1/c0" in text


# -- bad input ------------------------------------------------------------------------------


def _init_on_mesh(pp: int, stages: int, depth: int, **options):
    sharded.Mesh.set_current(sharded.Mesh(pp=pp))
    _, train_step, state, batches = _case(ToyLM(ToyConfig(depth=depth)), rows=4)
    step = sharded.pipeline(stages=stages, **options)(train_step)
    state = step.init(state)
    step(state, batches[0])


def test_more_stages_than_blocks_is_named():
    with pytest.raises(sharded.RankError, match=r"pipeline\(stages=2\) needs at least 2 blocks \(one per chunk\); the model has 1"):
        get_pool(2).run(_init_on_mesh, 2, 2, 1)


def test_microbatches_that_do_not_divide_the_batch():
    with pytest.raises(sharded.RankError, match=r"pipeline\(microbatches=3\).*4 rows.*3 equal parts"):
        get_pool(2).run(_init_on_mesh, 2, 2, 2, microbatches=3)


def test_interleaved_needs_microbatches_in_rounds_of_stages():
    with pytest.raises(ValueError, match=r"microbatches=3 is not a multiple of 2"):
        sharded.pipeline(stages=2, microbatches=3, schedule="interleaved")


def test_a_mesh_without_the_pp_axis_is_named():
    with pytest.raises(sharded.RankError, match=r"'pp' axis, which has size 1.*sharded.Mesh\(pp=2"):
        get_pool(2).run(_init_on_mesh, 1, 2, 2)


def test_bad_options():
    with pytest.raises(ValueError, match="schedule='zigzag'"):
        sharded.pipeline(stages=2, schedule="zigzag")
    with pytest.raises(ValueError, match="virtual=2 needs schedule='interleaved'"):
        sharded.pipeline(stages=2, virtual=2)
    with pytest.raises(ValueError, match=r"stages=\.\.\.\) needs a positive int"):
        sharded.pipeline(stages=0)


# -- plots ----------------------------------------------------------------------------------


def test_plot_schedule_draws_every_action_and_the_bubble(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    step = sharded.pipeline(stages=4, microbatches=8, schedule="1f1b")(lambda s, b: (s, {}))
    fig = sharded.plot.schedule(step)
    ax = fig.axes[0]
    assert len(ax.collections) == 4 * 8 * 2  # one box per forward and backward on each rank
    assert f"bubble {3 / 11:.1%}" in ax.get_title()
    fig.savefig(tmp_path / "schedule.png")
    measured = [[(Action("F", 0, 0), 0.0, 1.0), (Action("B", 0, 0), 3.0, 5.0)], [(Action("F", 0, 1), 1.0, 2.0), (Action("B", 0, 1), 2.0, 3.0)]]
    assert "measured: bubble 50.0%" in sharded.plot.schedule(measured).axes[0].get_title()
    with pytest.raises(TypeError, match="Step with a pipeline"):
        sharded.plot.schedule(42)


def test_the_gpt_preset_through_a_pipeline_with_zero3():
    """The built-in GPT (SDPA, positions from the input's device, tied head) on pp=2 × dp=2."""
    from sharded.models import GPT, GPTConfig, loss_fn

    model = sharded.trace(GPT(GPTConfig.preset("tiny", n_layers=4, d_model=32, n_heads=2, vocab_size=64, seq_len=16, tied=True)).double())

    def train_step(state, batch):
        loss, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": loss}

    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3))
    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, model.module.cfg.vocab_size, (8, 16), generator=g) for _ in range(2)) for _ in range(2)]
    step = sharded.shard_zero(stage=3)(sharded.pipeline(stages=2, microbatches=4)(train_step))
    # loss_fn computes the cross entropy in fp32: fp32 tolerances
    assert_step_equivalent(step, train_step, state, batches, world_size=4, mesh=dict(pp=2, dp=2), rtol=1e-5, atol=1e-6)


def _gathers_per_step(m: int) -> int:
    from sharded import comm

    sharded.Mesh.set_current(sharded.Mesh(pp=2, dp=2))
    _, train_step, state, batches = _case(ToyLM(ToyConfig(depth=4)), rows=2 * m)
    step = sharded.shard_zero(stage=3)(sharded.pipeline(stages=2, microbatches=m)(train_step))
    state = step.init(state)
    with comm.recording() as ops:
        step(state, batches[0])
    return sum(op.name == "all_gather" for op in ops)


def test_zero3_keeps_a_stages_params_gathered_across_microbatches():
    """Around a pipeline, stage 3 gathers each of a stage's blocks once per step, not per micro-batch."""
    one, four = get_pool(4).run(_gathers_per_step, 1)[0], get_pool(4).run(_gathers_per_step, 4)[0]
    assert one == four > 0


def test_the_pipelines_view_of_a_model_does_not_replace_it():
    """Transforms look the model up by its param names; a pipeline's per-chunk view (meta
    buffers) must not become what a later step finds."""
    from sharded.trace import model_of

    sharded.Mesh.set_current(None)
    model, train_step, state, batches = _case(ToyLM(ToyConfig(depth=2)), rows=2)
    step = sharded.pipeline(stages=1, microbatches=2)(train_step)
    step(step.init(state), batches[0])
    assert model_of(model.params) is model


class _PassesItsMask(nn.Module):
    """A block that returns a new hidden state and the mask it was given, counting its runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.runs = nn.Linear(4, 6), 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        self.runs += 1
        return self.proj(x) * scale, mask


def test_blocks_before_a_chunk_run_once_per_input_signature_and_keep_passed_tensors():
    """The meta forward of the blocks before a chunk is recorded once per input signature
    and replayed: same structure and shapes, and a tensor the block passes along is the
    caller's current object (later blocks' swapped inputs are found by identity)."""
    from sharded.transforms._shape_replay import ShapeReplay

    block, replay = _PassesItsMask().to("meta"), ShapeReplay()
    run = lambda args, kwargs: block(*args, **kwargs)  # noqa: E731
    for rows in (3, 3, 5, 3):
        x, mask = torch.empty(rows, 4, device="meta"), torch.empty(rows, rows, dtype=torch.bool, device="meta")
        out, passed = replay.call("b", run, (x, mask), {"scale": 2.0})
        assert out.shape == (rows, 6) and out.device.type == "meta" and passed is mask
    assert block.runs == 2  # one per input signature (3 rows, 5 rows)
    replay.call("b", run, (torch.empty(3, 4, device="meta"), torch.empty(3, 3, dtype=torch.bool, device="meta")), {"scale": 0.5})
    assert block.runs == 3  # a different non-tensor argument is another signature


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_compute_partition_balances_block_work_with_the_head_on_the_last_chunk(tied, chunks):
    """partition="compute" gives the contiguous split whose heaviest chunk (block params,
    plus the head's on the last chunk, tied or not) is the lightest possible."""
    import itertools

    from sharded.models import GPT, GPTConfig
    from sharded.transforms._stages import plan_chunks

    with torch.device("meta"):
        model = sharded.trace(GPT(GPTConfig(n_layers=9, d_model=64, n_heads=4, vocab_size=3000, tied=tied)))
    block = sum(p.numel() for n, p in model.params.items() if n.startswith("blocks.0."))
    head = 3000 * 64

    def heaviest(first: tuple[int, ...]) -> int:
        sizes = [b - a for a, b in zip(first, (*first[1:], 9))]
        return max(s * block + (head if c == chunks - 1 else 0) for c, s in enumerate(sizes))

    splits = [(0, *cuts) for cuts in itertools.combinations(range(1, 9), chunks - 1)]
    plan = plan_chunks(model, chunks, "compute", "pipeline(...)")
    assert heaviest(plan.first_block) == min(map(heaviest, splits))
    assert plan.first_block[-1] > plan_chunks(model, chunks, "uniform", "pipeline(...)").first_block[-1]
