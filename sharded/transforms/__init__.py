"""Transforms of a step function; each file is one transform, each a line in REGISTRY."""
from sharded.transforms.accumulate import accumulate
from sharded.transforms.compile import compile  # noqa: A004
from sharded.transforms.compress_grads import compress_grads
from sharded.transforms.data_parallel import data_parallel
from sharded.transforms.mixed_precision import mixed_precision
from sharded.transforms.offload import offload
from sharded.transforms.pipeline import pipeline
from sharded.transforms.remat import remat
from sharded.transforms.shard_zero import shard_zero
from sharded.transforms.tensor_parallel import tensor_parallel

#: Every transform, by name: `sharded` exports each, and the property tests run over all of them.
REGISTRY = {
    "data_parallel": data_parallel,
    "accumulate": accumulate,
    "shard_zero": shard_zero,
    "mixed_precision": mixed_precision,
    "pipeline": pipeline,
    "remat": remat,
    "compress_grads": compress_grads,
    "compile": compile,
    "offload": offload,
    "tensor_parallel": tensor_parallel,
}

__all__ = ["REGISTRY", *REGISTRY]
