"""Hypothesis strategies: pytrees of tensors, small models, batches, transform stacks."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from sharded.testing.models import ToyConfig

__all__ = ["shapes", "tensors", "pytrees", "toy_configs", "token_batches", "transform_stacks", "world_sizes", "nested_in_drawn_order"]

shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)
world_sizes = st.integers(1, 4)


@st.composite
def tensors(draw, shape=shapes, dtype=torch.float32):
    shape = draw(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def pytrees(leaf=tensors(), max_leaves: int = 6):
    """Nested dicts/lists/tuples of tensors."""
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from("abcdefgh"), children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.tuples(children, children),
        ),
        max_leaves=max_leaves,
    )


toy_configs = st.builds(
    ToyConfig,
    vocab=st.integers(3, 17),
    width=st.integers(3, 9),  # LayerNorm over 2 features is constant: zero grads, pure noise
    hidden=st.integers(1, 15),
    depth=st.integers(1, 3),
    tied=st.booleans(),
    seed=st.integers(0, 1000),
)


@st.composite
def token_batches(draw, vocab: int, rows: int, steps: int, seq=st.integers(1, 5)):
    """`steps` batches of (tokens, targets), each (rows, T), from one drawn seed."""
    t = draw(seq)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return [
        (torch.randint(0, vocab, (rows, t), generator=g), torch.randint(0, vocab, (rows, t), generator=g))
        for _ in range(steps)
    ]


@st.composite
def transform_stacks(draw, max_accumulate: int = 4):
    """A list of (name, options), outermost first, drawn from the registered transforms:
    data_parallel or shard_zero(stage=1..3) over dp, with accumulate inside or outside
    (stage 3 only inside: it provides the params that are differentiated)."""
    bucket_mb = draw(st.sampled_from([1e-4, 1e-3, 25.0]))
    if draw(st.booleans()):
        dp = ("data_parallel", {"bucket_mb": bucket_mb})
    else:
        stage = draw(st.integers(1, 3))
        options = {"stage": stage, "bucket_mb": bucket_mb}
        if stage == 3:
            options.update(prefetch=draw(st.integers(0, 2)), reshard_after_forward=draw(st.booleans()))
        dp = ("shard_zero", options)
    stack = []
    if dp[1].get("stage") != 3 and draw(st.booleans()):
        stack.append(("accumulate", {"steps": draw(st.integers(1, max_accumulate))}))
    stack.append(dp)
    if draw(st.booleans()):
        stack.append(("accumulate", {"steps": draw(st.integers(1, max_accumulate))}))
    return stack


def nested_in_drawn_order(draw, layers: list, fn, loss_scaler: bool = True):
    """`fn` under `layers` and, half the time (where `loss_scaler`), a float64 loss scaler
    with a drawn initial scale, nested in a drawn order (every order is one program:
    protocol v2)."""
    import sharded

    if loss_scaler and draw(st.booleans()):
        layers = [*layers, sharded.mixed_precision(compute=torch.float64, loss_scale=True, init_scale=2.0 ** draw(st.integers(0, 8)))]
    for layer in draw(st.permutations(layers)):
        fn = layer(fn)
    return fn
