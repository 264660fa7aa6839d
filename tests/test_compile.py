"""sharded.compile: the whole forward as one graph where nothing else works inside it,
else each block's forward compiled whole, everything else's block work around it. Equality with the plain step under every transform and pair of transforms is
in test_registry.py (backend "aot_eager"); here: what is compiled, and what is refused."""
import warnings

import pytest
import torch
from torch import nn

import sharded
from sharded.models import GPT, GPTConfig, loss_fn
from sharded.testing.models import ToyConfig, ToyLM, make_train_step


class Graphs:
    """A torch.compile backend that counts the graphs it is given and runs them as they are."""

    def __init__(self):
        self.nodes: list[int] = []

    def __call__(self, gm, example_inputs):
        self.nodes.append(len(gm.graph.nodes))
        return gm.forward


def _gpt_step(model):
    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    return train_step


def _compiled_and_eager(backend, remat: bool):
    """The same GPT step compiled and eager, under a float64 loss scaler, with or without remat."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = sharded.trace(GPT(GPTConfig(vocab_size=64, seq_len=16, n_layers=3, d_model=32, n_heads=4, dropout=0.0)).double())

    def stack(compiled: bool):
        step = sharded.compile(backend=backend, loss=False)(_gpt_step(model)) if compiled else _gpt_step(model)
        step = sharded.mixed_precision(compute=torch.float64, loss_scale=True)(step)
        return sharded.remat("full")(step) if remat else step

    compiled = stack(True)
    _trains_as_eager(compiled, stack(False), model, steps=3)
    return str(compiled.explain())


def _trains_as_eager(compiled, eager, model, steps):
    """`compiled` and `eager` from the same params and batch: equal losses and params."""
    mine = compiled.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    theirs = eager.init(sharded.TrainState.create({k: v.clone() for k, v in model.params.items()}, sharded.optim.adamw(1e-2)))
    x = torch.randint(0, 64, (4, 16))
    for _ in range(steps):
        mine, m = compiled(mine, (x, x))
        theirs, want = eager(theirs, (x, x))
    torch.testing.assert_close(m["loss"], want["loss"], rtol=0, atol=0)
    for k in mine.params:
        assert mine.params[k].dtype == theirs.params[k].dtype
        torch.testing.assert_close(mine.params[k], theirs.params[k], rtol=0, atol=0)


def test_alone_with_a_cast_the_whole_forward_is_one_graph_and_trains_as_eager():
    """[Note: whole or by block]: nothing else works inside the forward, so embedding,
    blocks and head are one graph, compiled once; by blocks (remat recomputing them),
    the three blocks share one graph of one block."""
    whole, by_block = Graphs(), Graphs()
    assert "the whole forward compiled as one graph" in _compiled_and_eager(whole, remat=False)
    assert "each block's forward compiled whole" in _compiled_and_eager(by_block, remat=True)
    assert len(whole.nodes) == 1 and len(by_block.nodes) == 1  # compiled once each
    assert whole.nodes[0] > 3 * by_block.nodes[0]  # three blocks and the rest, against one block


def test_the_loss_compiles_as_a_graph_of_its_own_around_the_model():
    """[Note: the loss compiled too]: model.apply is a graph break in the function given
    to value_and_grad, so what the step computes from the logits (GPT's upcast and
    cross-entropy) is a graph of its own beside the model's, and the step trains as the
    eager step does; loss=False leaves it eager."""
    torch.manual_seed(0)
    model = sharded.trace(GPT(GPTConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, dropout=0.0)).double())
    for loss in (True, False):
        torch.compiler.reset()
        ops: list[set[str]] = []

        def backend(gm, example_inputs):
            ops.append({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"})
            return gm.forward

        _trains_as_eager(sharded.compile(backend=backend, loss=loss)(_gpt_step(model)), sharded.Step(_gpt_step(model)), model, steps=2)
        losses = [g for g in ops if "cross_entropy" in g]
        assert len(losses) == (1 if loss else 0) and all("embedding" not in g for g in losses)
        assert sum("embedding" in g for g in ops) == 1  # the whole model, compiled once either way


def test_a_new_loss_closure_each_step_compiles_once_and_is_not_kept():
    """The step's fn goes through one compiled trampoline: a step that makes a new lambda
    each call reuses the first one's graph, and the old lambdas are freed."""
    import gc
    import weakref

    torch.compiler.reset()
    model = sharded.trace(GPT(GPTConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, dropout=0.0)))
    made, graphs = [], Graphs()

    def train_step(state, batch):
        fn = lambda p, b: loss_fn(model.apply(p, b[0]), b[1])  # noqa: E731
        made.append(weakref.ref(fn))
        value, grads = sharded.value_and_grad(fn)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.compile(backend=graphs)(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        state, _ = step(state, (x, x))
    gc.collect()
    assert len(graphs.nodes) == 2  # the whole model and the loss, each once
    assert sum(ref() is not None for ref in made) <= 1  # nothing holds on to past steps' lambdas


def test_compile_loss_takes_a_bool():
    with pytest.raises(ValueError, match=r"compile\(loss='yes'\): True compiles the function given to value_and_grad"):
        sharded.compile(loss="yes")


class _Chatty(nn.Module):
    """A block whose forward reads a tensor's value on the host: no single graph."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if self.lin.weight.sum().item() > 1e9:
            return x
        return self.lin(x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Chatty(), _Chatty()])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_a_block_that_breaks_the_graph_is_named():
    torch.compiler.reset()
    model = sharded.trace(_Net())  # its ModuleList: two blocks

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: model.apply(p, b).square().mean())(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.compile(backend="aot_eager")(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    # the whole model breaks the graph, so compile falls back to blocks, and the first block breaks it too
    with pytest.warns(UserWarning, match=r"_Net does not compile as one graph .*block by block"):
        with pytest.raises(ValueError, match=r"block 'blocks.0' does not compile as one graph.*leave compile out"):
            step(state, torch.randn(2, 8))


def test_an_unknown_backend_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"not a torch.compile backend here; choose from .*inductor"):
        sharded.compile(backend="inductr")


def test_compile_composes_with_zero3_and_remat_on_two_ranks():
    """ZeRO-3's gathers and remat's recompute around compiled blocks, against the plain step."""
    cfg = ToyConfig(depth=3)
    torch.manual_seed(0)
    model = sharded.trace(ToyLM(cfg).double())
    step = sharded.shard_zero(stage=3)(sharded.remat("full")(sharded.compile(backend="aot_eager")(make_train_step(model))))
    batches = [(torch.randint(0, cfg.vocab, (4, 3)),) * 2 for _ in range(3)]
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2))
    sharded.testing.assert_step_equivalent(step, make_train_step(model), state, batches, world_size=2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, whole", [("llama", True), ("gpt2", False)])
def test_hugging_face_models_compile_whole_or_fall_back_to_blocks(kind, whole):
    """Alone, Llama's forward is one graph; GPT-2's logs from inside its forward, which
    breaks the whole graph, so it falls back to its blocks with a warning. Both train as
    eager does."""
    transformers = pytest.importorskip("transformers")
    torch.compiler.reset()
    torch.manual_seed(0)
    if kind == "llama":
        module = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    else:
        module = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = sharded.trace(module.double())

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: model.apply(p, b[0], labels=b[1]).loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    graphs = Graphs()
    steps = [sharded.compile(backend=graphs)(train_step), sharded.Step(train_step)]
    states = [s.init(sharded.TrainState.create({k: v.clone() for k, v in model.params.items()}, sharded.optim.adamw(1e-2))) for s in steps]
    x = torch.randint(0, 48, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            (states[0], got), (states[1], want) = (s(st, (x, x)) for s, st in zip(steps, states))
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-12, atol=1e-12)
    fell_back = [w for w in caught if "does not compile as one graph" in str(w.message)]
    assert len(fell_back) == (0 if whole else 1)
    assert len(graphs.nodes) == 1 if whole else len(set(graphs.nodes)) == 1  # the whole model, or its blocks' graphs (one per layer index here)


def test_the_whole_graph_casts_the_params_itself():
    """Alone with mixed_precision("bf16"), the params' casts to bf16 and their grads'
    casts back to fp32 are the graph's (mixed_precision's `param_cast`), not eager ops
    around it: one graph that takes the fp32 params, a tied head included, and trains
    as the eager step does."""
    torch.compiler.reset()
    torch.manual_seed(0)
    model = sharded.trace(GPT(GPTConfig(vocab_size=64, seq_len=16, n_layers=2, d_model=32, n_heads=4, dropout=0.0, tied=True)))
    graphs = Graphs()
    inputs: list[torch.dtype] = []

    def counting(gm, example_inputs):
        inputs.extend(x.dtype for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 64)
        return graphs(gm, example_inputs)

    def stack(compiled: bool):
        step = sharded.compile(backend=counting, loss=False)(_gpt_step(model)) if compiled else _gpt_step(model)
        return sharded.mixed_precision("bf16", autocast=False)(step)

    _trains_as_eager(stack(True), stack(False), model, steps=2)
    assert len(graphs.nodes) == 1 and inputs == [torch.float32]  # the embedding (and tied head) enters in fp32
