"""Transforms of a step function; each file is one transform."""
from sharded.transforms.accumulate import accumulate as accumulate
from sharded.transforms.data_parallel import data_parallel as data_parallel
from sharded.transforms.mixed_precision import mixed_precision as mixed_precision
from sharded.transforms.pipeline import pipeline as pipeline
from sharded.transforms.shard_zero import shard_zero as shard_zero

#: Every transform, by name: generic property tests run over this registry.
REGISTRY = {"data_parallel": data_parallel, "accumulate": accumulate, "shard_zero": shard_zero, "mixed_precision": mixed_precision, "pipeline": pipeline}
