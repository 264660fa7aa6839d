"""Testing tools for steps and transforms, ours and users'.

- `assert_step_equivalent(step, reference_step, state, batches, world_size=N)`: the
  transformed step on N gloo ranks == the plain step in this process;
- `strategies`: hypothesis strategies for pytrees, small models, batches, stacks;
- `models`: small models with uneven shapes, tied weights and buffers;
- `get_pool(N)`: a live pool of N ranks reused across tests (fast property tests).
"""
from sharded.testing import models as models
from sharded.testing import strategies as strategies
from sharded.testing.equivalence import assert_step_equivalent as assert_step_equivalent
from sharded.testing.equivalence import run_steps as run_steps
from sharded.testing.pool import RankPool as RankPool
from sharded.testing.pool import get_pool as get_pool
