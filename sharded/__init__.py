"""sharded: DeepSpeed's training strategies as composable transforms of a pure PyTorch step.

Read first: trace.py (module -> pure function), grad.py, step.py (the transform
protocol), transforms/data_parallel.py, testing/equivalence.py.
"""
from sharded import optim as optim
from sharded import plot as plot
from sharded import sharding as sharding
from sharded import checkpoint as checkpoint
from sharded import deepspeed as deepspeed
from sharded.deepspeed import from_deepspeed_config as from_deepspeed_config
from sharded import distributed as distributed
from sharded import tree as tree
from sharded.grad import grad as grad
from sharded.grad import value_and_grad as value_and_grad
from sharded.launch import RankError as RankError
from sharded.launch import launch as launch
from sharded.memory import estimate_memory as estimate_memory
from sharded.mesh import Mesh as Mesh
from sharded.state import TrainState as TrainState
from sharded.token_data import TokenData as TokenData
from sharded.step import Step as Step
from sharded.step import Capability as Capability
from sharded.step import Level as Level
from sharded.step import Transform as Transform
from sharded.step import transform as transform
from sharded.trace import Model as Model
from sharded.trace import trace as trace
from sharded.transforms import *  # noqa: F403 - every transform in sharded.transforms.REGISTRY

__version__ = "0.1.0"


def __getattr__(name: str):
    """`sharded.testing` on first use (it imports hypothesis, a test dependency)."""
    if name == "testing":
        import importlib

        return importlib.import_module("sharded.testing")
    raise AttributeError(f"module 'sharded' has no attribute {name!r}")
