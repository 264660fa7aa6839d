"""torch.func over `model.apply` in a step's own code (per-sample grads, jvp) under every
registered transform: equal to the plain step, or a clear error where a transform
cannot run a whole forward on one rank (a pipeline stage holds only its blocks)."""
import pytest
import torch
import torch.nn.functional as F

import sharded
from sharded.testing import assert_step_equivalent, get_pool
from sharded.testing.models import ToyConfig, ToyLM
from sharded.transforms import REGISTRY

OPTIONS = {
    "data_parallel": {},
    "accumulate": {"steps": 2},
    "shard_zero": {"stage": 3},
    "mixed_precision": {"compute": torch.float64, "loss_scale": True},
    "remat": {"policy": "full"},
    "compress_grads": {"method": "onebit"},
    "compile": {"backend": "aot_eager"},  # blocks under torch.func's transforms run eagerly; the step's own grad compiled
    "offload": {"tier": "cpu"},
}
CFG = ToyConfig(vocab=7, width=5, hidden=6, depth=2, tied=True, seed=3)


def make_step(model):
    """A step that reports per-sample grad norms (vmap of grad) and a jvp, then trains."""

    def sample_loss(params, tokens, targets):
        logits = model.apply(params, tokens[None])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def loss_fn(params, batch):
        tokens, targets = batch
        logits = model.apply(params, tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def train_step(state, batch):
        tokens, targets = batch
        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(state.params, tokens, targets)
        squares = sum(g.flatten(1).square().sum(1) for g in sharded.tree.leaves(per_sample))
        norms = sharded.sharding.sum_over_shards(squares).sqrt()
        tangents = sharded.tree.map(torch.ones_like, state.params)
        _, directional = torch.func.jvp(lambda p: model.apply(p, tokens), (state.params,), (tangents,))
        loss, grads = sharded.value_and_grad(loss_fn)(state.params, batch)
        return state.apply_gradients(grads), {"loss": loss, "per_sample_grad_norm": norms, "jvp_sum": directional.sum()}

    return train_step


def _batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, CFG.vocab, (4, 3), generator=g), torch.randint(0, CFG.vocab, (4, 3), generator=g)) for _ in range(2)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_per_sample_grads_and_jvp_under_every_zero_stage(stage):
    model = sharded.trace(ToyLM(CFG).double())
    train_step = make_step(model)
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2))
    step = sharded.shard_zero(stage=stage)(train_step)
    assert_step_equivalent(step, train_step, state, _batches(), world_size=2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(set(OPTIONS) - {"shard_zero"}))
def test_per_sample_grads_and_jvp_under_each_transform(name):
    model = sharded.trace(ToyLM(CFG).double())
    train_step = make_step(model)
    tx = sharded.optim.adamw(1e-2)
    step = REGISTRY[name](**OPTIONS[name])(train_step)
    if name == "compress_grads":  # it needs a reducer and 1-bit Adam; two steps in its warmup
        step, tx = sharded.compress_grads()(sharded.data_parallel(train_step)), sharded.optim.onebit_adam(1e-2, warmup_steps=2)
    state = sharded.TrainState.create(model.params, tx)
    assert_step_equivalent(step, train_step, state, _batches(), world_size=2, rtol=1e-7, atol=1e-9)


def _under_a_pipeline():
    sharded.Mesh.set_current(sharded.Mesh(pp=2))
    model = sharded.trace(ToyLM(CFG).double())
    step = sharded.pipeline(stages=2)(make_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    step(state, _batches()[0])


def test_a_pipeline_names_what_to_do_instead():
    with pytest.raises(Exception, match=r"torch.func over the model.*gather_params"):
        get_pool(2).run(_under_a_pipeline)


def _under_tensor_parallelism():
    sharded.Mesh.set_current(sharded.Mesh(tp=2))
    model = sharded.trace(ToyLM(ToyConfig(vocab=8, width=5, hidden=6, depth=2, seed=3)).double())
    plan = {"embed": "vocab_embedding", "head": "vocab_head", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
    step = sharded.tensor_parallel(plan=plan, sequence_parallel=False)(make_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    step(state, _batches()[0])


def test_tensor_parallelism_names_what_to_do_instead():
    with pytest.raises(Exception, match=r"torch.func over the model.*gather_params"):
        get_pool(2).run(_under_tensor_parallelism)


def test_every_registered_transform_is_covered():
    assert set(REGISTRY) == set(OPTIONS) | {"pipeline", "tensor_parallel"}
