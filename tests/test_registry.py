"""Every registered transform, alone, in every ordered pair and in drawn stacks of three,
equals the plain step in float64 (params, optimizer state, metrics over three steps),
or is refused at construction (or, for what needs the whole stack, at init) with a
ValueError that says what to write instead.

Transforms are sorted into one canonical order whatever the nesting (protocol v2), so
both orders of a pair must agree; the only refusals are a transform applied twice, two
transforms that both average grads over dp, and a micro-batch splitter inside a
pipeline. (`accumulate` twice is allowed: k1·k2 micro-batches.)
"""
import atexit
import functools
import itertools
import math
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sharded
from sharded.testing import assert_step_equivalent
from sharded.testing.models import ToyConfig, ToyLM, make_train_step
from sharded.transforms import REGISTRY

OPTIMIZERS = {
    "adamw": lambda: sharded.optim.adamw(1e-2, weight_decay=0.1),
    "clipped_adamw": lambda: sharded.optim.chain(sharded.optim.clip_by_global_norm(0.05), sharded.optim.adamw(1e-2)),
}


@functools.cache
def _swap_directory() -> str:
    """One directory for this session's nvme draws (each store makes and removes its own
    subdirectory in it); removed at exit."""
    path = tempfile.mkdtemp(prefix="sharded-registry-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def options(name: str, draw) -> dict:
    """A drawn set of options for transform `name` that runs in float64 on CPU."""
    if name == "data_parallel":
        return {"bucket_mb": draw(st.sampled_from([1e-4, 25.0]))}
    if name == "shard_zero":
        stage = draw(st.integers(1, 3))
        extra = {"prefetch": draw(st.integers(0, 2)), "reshard_after_forward": draw(st.sampled_from([None, True, False]))} if stage == 3 else {}
        return {"stage": stage, "bucket_mb": draw(st.sampled_from([1e-4, 25.0])), **extra}
    if name == "accumulate":
        return {"steps": draw(st.integers(1, 3))}
    if name == "mixed_precision":  # float64 compute: the loss scale's algebra, exactly
        return {"compute": torch.float64, "loss_scale": True, "init_scale": 2.0 ** draw(st.integers(0, 8))}
    if name == "pipeline":
        schedule = draw(st.sampled_from(["1f1b", "gpipe", "interleaved"]))
        return {"stages": 2, "schedule": schedule, "microbatches": draw(st.sampled_from([2, 4] if schedule == "interleaved" else [1, 2, 3]))}
    if name == "remat":
        return {"policy": draw(st.sampled_from(["full", "selective", "every other"]))}
    if name == "compress_grads":  # three steps, all in its warmup: the plain step (after it: test_compress_grads.py)
        return {"method": "onebit"}
    if name == "compile":  # AOTAutograd's graphs run eagerly: the compiled path, without inductor's minutes of C++ builds
        return {"backend": "aot_eager"}
    if name == "offload":  # the disk tier with buffers small enough for a group per leaf or two
        tier = draw(st.sampled_from(["cpu", "nvme"]))
        return {"tier": "cpu"} if tier == "cpu" else {"tier": "nvme", "path": _swap_directory(), "host_buffer_gb": 2e-4}
    if name == "tensor_parallel":  # the toy model's layers in Megatron's styles; its widths drawn divisible by tp=2
        return {"plan": TOY_PLAN, "sequence_parallel": False}  # its colwise layers sit in the blocks themselves
    raise AssertionError(f"no option strategy for {name}: add one when registering a transform")


TOY_PLAN = {"embed": "vocab_embedding", "head": "vocab_head", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


def build(stack: list[tuple[str, dict]], fn):
    for name, opts in reversed(stack):
        if name == "remat" and opts["policy"] == "every other":
            opts = {"policy": lambda block: int(block.rsplit(".", 1)[-1]) % 2 == 0}
        fn = REGISTRY[name](**opts)(fn)
    return fn


def refused_at_init(stack: list[tuple[str, dict]]) -> str | None:
    """What init refuses, once the whole stack is known: compression with nothing to compress."""
    names = [n for n, _ in stack]
    if "compress_grads" in names and not {"data_parallel", "shard_zero"} & set(names):
        return "nothing in this step reduces them"
    return None


def refusal(stack: list[tuple[str, dict]]) -> str | None:
    """The words the ValueError must contain when `stack` (outermost first) is refused:
    steps are built from the innermost transform out, so the first rule a growing
    inner part of the stack breaks is the one named."""
    for k in range(1, len(stack) + 1):
        names = [n for n, _ in stack[-k:]]
        once = [n for n in names if n != "accumulate"]  # accumulate twice is k1·k2 micro-batches
        if len(set(once)) < len(once):
            return "appears twice"
        if {"data_parallel", "shard_zero"} <= set(names):
            return "drop data_parallel"
        if "pipeline" in names and "accumulate" in names[names.index("pipeline") :]:
            return "put it outside: accumulate"
    return None


def check(stack: list[tuple[str, dict]], draw) -> None:
    names = [n for n, _ in stack]
    piped = "pipeline" in names
    interleaved = piped and dict(stack)["pipeline"]["schedule"] == "interleaved"
    tp = 2 if "tensor_parallel" in names else 1
    cfg = ToyConfig(
        vocab=tp * draw(st.integers(2, 6)) if tp > 1 else draw(st.integers(3, 13)), width=draw(st.integers(3, 7)),
        hidden=tp * draw(st.integers(1, 4)) if tp > 1 else draw(st.integers(1, 9)),
        depth=draw(st.integers(4 if interleaved else 2, 4)), tied=draw(st.booleans()), seed=draw(st.integers(0, 99)),
    )
    model = sharded.trace(ToyLM(cfg).double())
    train_step = make_train_step(model)
    words = refusal(stack)
    if words is not None:
        event("refused")
        with pytest.raises(ValueError, match=words):
            build(stack, train_step)
        return
    step = build(stack, train_step)
    tx = OPTIMIZERS[draw(st.sampled_from(sorted(OPTIMIZERS)))]()
    if "compress_grads" in names:  # 1-bit Adam's optimizer half; its warmup outlasts the three steps
        tx = sharded.optim.onebit_adam(1e-2, warmup_steps=3, weight_decay=0.1)
    words = refused_at_init(stack)
    if words is not None:
        event("refused at init")
        with pytest.raises(ValueError, match=words):
            step.init(sharded.TrainState.create(model.params, tx))
        return
    event("ran on ranks")
    # ZeRO on a pipeline needs a dp axis of its own (it refuses dp=1 beside pp=2 at init).
    # So does ZeRO beside tp=2; a pipeline of tp=2 stages runs on one dp rank unless ZeRO needs two (8 ranks).
    if piped and tp > 1:
        dp = 2 if "shard_zero" in names else 1
    else:
        dp = (2 if "shard_zero" in names else draw(st.sampled_from([1, 2]))) if piped or tp > 1 else draw(st.integers(1, 4))
    world, mesh = (2 * tp * dp, dict(pp=2, dp=dp, tp=tp)) if piped else (tp * dp, dict(tp=tp, dp=dp) if tp > 1 else None)
    parts = dp * math.prod(o.get("steps", 1) * o.get("microbatches", 1) for _, o in stack)
    rows = parts * draw(st.integers(1, 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    seq = draw(st.integers(1, 4))
    batches = [(torch.randint(0, cfg.vocab, (rows, seq), generator=g), torch.randint(0, cfg.vocab, (rows, seq), generator=g)) for _ in range(3)]
    state = sharded.TrainState.create(model.params, tx)
    assert_step_equivalent(step, train_step, state, batches, world_size=world, rtol=1e-7, atol=1e-9, mesh=mesh)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(REGISTRY))
@settings(max_examples=3, **SETTINGS)
@given(data=st.data())
def test_every_transform_alone_equals_the_plain_step(name, data):
    check([(name, options(name, data.draw))], data.draw)


@pytest.mark.parametrize("outer,inner", list(itertools.permutations(sorted(REGISTRY), 2)))
@settings(max_examples=1, **SETTINGS)
@given(data=st.data())
def test_every_ordered_pair_equals_the_plain_step_or_is_refused(outer, inner, data):
    check([(outer, options(outer, data.draw)), (inner, options(inner, data.draw))], data.draw)


@settings(max_examples=60, **SETTINGS)
@given(
    names=st.one_of(  # mostly three different transforms; sometimes one twice
        st.lists(st.sampled_from(sorted(REGISTRY)), min_size=3, max_size=3, unique=True),
        st.lists(st.sampled_from(sorted(REGISTRY)), min_size=3, max_size=3),
    ),
    data=st.data(),
)
def test_drawn_stacks_of_three_equal_the_plain_step_or_are_refused(names, data):
    check([(n, options(n, data.draw)) for n in names], data.draw)
