"""trace/apply == module forward; blocks; tied weights; value_and_grad == autograd."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sharded
from sharded.testing.models import ToyLM
from sharded.testing.strategies import pytrees, toy_configs


@settings(max_examples=25, deadline=None)
@given(cfg=toy_configs, rows=st.integers(1, 4), seq=st.integers(1, 6))
def test_apply_equals_forward(cfg, rows, seq):
    module = ToyLM(cfg)
    model = sharded.trace(module)
    tokens = torch.randint(0, cfg.vocab, (rows, seq))
    torch.testing.assert_close(model.apply(model.params, tokens), module(tokens), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(cfg=toy_configs)
def test_blocks_cover_every_param_once_in_order(cfg):
    model = sharded.trace(ToyLM(cfg))
    names = [n for b in model.blocks for n in b.params]
    assert names == list(model.params)
    assert [b.name for b in model.blocks] == ["<embed>"] + [f"blocks.{i}" for i in range(cfg.depth)] + ["<head>"] * (
        not cfg.tied
    )


def test_tied_weights_stay_tied():
    cfg = sharded.testing.models.ToyConfig(tied=True)
    model = sharded.trace(ToyLM(cfg))
    assert model.tied == {"head.weight": "embed.weight"}
    assert "head.weight" not in model.params
    params = dict(model.params, **{"embed.weight": torch.zeros_like(model.params["embed.weight"])})
    logits = model.apply(params, torch.tensor([[1, 2]]))
    assert torch.count_nonzero(logits) == 0  # the head used the replaced embedding


@settings(max_examples=20, deadline=None)
@given(cfg=toy_configs, seed=st.integers(0, 100))
def test_value_and_grad_equals_autograd(cfg, seed):
    module = ToyLM(cfg)
    model = sharded.trace(module)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab, (3, 4), generator=g)

    def loss_fn(params, tokens):
        return model.apply(params, tokens).square().mean()

    loss, grads = sharded.value_and_grad(loss_fn)(model.params, tokens)
    module.zero_grad()
    want = module(tokens).square().mean()
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


@settings(max_examples=25, deadline=None)
@given(tree=pytrees())
def test_grad_keeps_structure(tree):
    def f(t):
        return sum((x * x).sum() for x in sharded.tree.leaves(t))

    grads = sharded.grad(f)(tree)
    assert sharded.tree.structure(grads) == sharded.tree.structure(tree)
    for g, x in zip(sharded.tree.leaves(grads), sharded.tree.leaves(tree)):
        torch.testing.assert_close(g, 2 * x)


def test_value_and_grad_needs_scalar_loss():
    with pytest.raises(TypeError, match="has_aux=True"):
        sharded.value_and_grad(lambda p: (p["w"].sum(), 1))({"w": torch.ones(2)})


def test_unknown_block_name_is_clear():
    with pytest.raises(ValueError, match=r"'blocks\.9'.*module paths such as"):
        sharded.trace(ToyLM(sharded.testing.models.ToyConfig()), blocks=["blocks.9"])


def test_named_blocks_and_sequential():
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = sharded.trace(seq)
    assert [b.name for b in model.blocks] == ["0", "2"]
    model = sharded.trace(ToyLM(sharded.testing.models.ToyConfig(depth=3)), blocks=["blocks.0", "blocks.2"])
    assert [b.name for b in model.blocks] == ["<embed>", "blocks.0", "blocks.2", "<head>"]
    assert "blocks.1.up.weight" in model.blocks[1].params  # params between named units join the previous one


def test_apply_does_not_touch_module_state():
    module = ToyLM(sharded.testing.models.ToyConfig())
    model = sharded.trace(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = sharded.tree.map(torch.zeros_like, model.params)
    model.apply(params, torch.tensor([[0, 1]]))
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k])
