"""Multi-rank test harness: live pools of ranks for property tests."""
from sharded.testing.pool import RankPool as RankPool
from sharded.testing.pool import get_pool as get_pool
