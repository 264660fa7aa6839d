"""The README's "Write your own transform" example, run as written."""
import pathlib
import re

import torch

import sharded
from sharded.testing import assert_step_equivalent
from sharded.testing.models import ToyConfig, ToyLM, make_train_step

_README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
_SECTION = _README.split("## Write your own transform", 1)[1]
EXAMPLE = re.search(r"```python\n(.*?)```", _SECTION, re.S).group(1)
exec(compile(EXAMPLE, "README.md (Write your own transform)", "exec"))  # defines GradNorms, grad_norms


def _batches(rows):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 11, (rows, 4), generator=g), torch.randint(0, 11, (rows, 4), generator=g)) for _ in range(3)]


def test_the_example_reports_each_blocks_grad_norm():
    model = sharded.trace(ToyLM(ToyConfig(depth=3)).double())
    train_step = make_train_step(model)
    step = grad_norms(depth=2)(train_step)  # noqa: F821 - defined by the README's code
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    batch = _batches(4)[0]
    _, grads = sharded.value_and_grad(lambda p, b: _loss(model, p, b))(state.params, batch)
    _, metrics = step(state, batch)
    want = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for n, g in grads.items() if n.startswith("blocks.1.")]))
    assert set(metrics) >= {"grad_norm/blocks.0", "grad_norm/blocks.1", "grad_norm/blocks.2", "grad_norm/embed.weight", "grad_norm/head.weight"}
    torch.testing.assert_close(metrics["grad_norm/blocks.1"], want)


def _loss(model, params, batch):  # make_train_step's loss
    tokens, targets = batch
    logits = model.apply(params, tokens)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_the_example_under_zero3_equals_it_in_one_process():
    model = sharded.trace(ToyLM(ToyConfig(depth=3, tied=True)).double())
    train_step = make_train_step(model)
    reference = grad_norms()(train_step)  # noqa: F821
    step = sharded.shard_zero(stage=3)(grad_norms()(train_step))  # noqa: F821
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2))
    assert_step_equivalent(step, reference, state, _batches(4), world_size=2, rtol=1e-7, atol=1e-9)
