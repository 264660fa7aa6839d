"""remat: what a block keeps through the forward, counted from live tensors."""
import gc

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import sharded
from sharded.testing.models import ToyConfig, ToyLM

ROWS, SEQ, WIDTH, HIDDEN = 4, 6, 8, 64


class _Outputs(TorchDispatchMode):
    """Every storage an op creates while active, by weak reference (its lifetime, not ours)."""

    def __init__(self):
        super().__init__()
        self.storages: list[tuple[StorageWeakRef, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in sharded.tree.leaves(out):
            if isinstance(x, torch.Tensor) and x.device.type != "meta":
                s = x.untyped_storage()
                self.storages.append((StorageWeakRef(s), s.nbytes()))
        return out

    def live_bytes(self, params: dict) -> int:
        """Bytes of the live storages created here, each once, params' own left out (an
        op's output may be a view of a param: a transposed weight)."""
        own = {StorageWeakRef(p.untyped_storage()).cdata for p in params.values()}
        live = {ref.cdata: n for ref, n in self.storages if not ref.expired() and ref.cdata not in own}
        return sum(live.values())


def _activations_after_forward(depth: int, policy: str | None) -> int:
    """Bytes of the tensors the forward created that are still alive when it ends."""
    model = sharded.trace(ToyLM(ToyConfig(vocab=11, width=WIDTH, hidden=HIDDEN, depth=depth)).double())
    seen = {}

    def loss_fn(params, batch):
        tokens, targets = batch
        with _Outputs() as outputs:
            logits = model.apply(params, tokens)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        gc.collect()
        seen["bytes"] = outputs.live_bytes(params)
        return loss

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss_fn)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.remat(policy=policy)(train_step) if policy else sharded.Step(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    batch = (torch.randint(0, 11, (ROWS, SEQ)), torch.randint(0, 11, (ROWS, SEQ)))
    step(state, batch)
    return seen["bytes"]


def test_full_remat_keeps_only_each_blocks_input():
    """Each extra block adds exactly its input (one hidden state) to what the forward
    holds under remat("full"); without remat it adds its internals too (here, over 8x)."""
    hidden_state = ROWS * SEQ * WIDTH * 8
    plain = {d: _activations_after_forward(d, None) for d in (1, 3)}
    full = {d: _activations_after_forward(d, "full") for d in (1, 3)}
    assert full[3] - full[1] == 2 * hidden_state, (full, hidden_state)
    assert plain[3] - plain[1] > 2 * 8 * hidden_state, (plain, hidden_state)
    assert full[3] < plain[3]


def test_selective_remat_keeps_matmul_outputs_between_full_and_none():
    plain, selective, full = (_activations_after_forward(3, p) for p in (None, "selective", "full"))
    assert full < selective < plain, (full, selective, plain)


def test_a_predicate_picks_the_blocks():
    every, none_ = _activations_after_forward(3, "full"), _activations_after_forward(3, None)
    picked = _activations_after_forward(3, lambda name: name == "blocks.1")
    assert every < picked < none_


def test_bad_policy_names_the_choices():
    with pytest.raises(ValueError, match="'full', 'selective' or a predicate"):
        sharded.remat(policy="half")
