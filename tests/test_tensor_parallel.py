"""tensor_parallel: Megatron's tensor parallelism equals the plain step (float64, gloo),
for sharded's GPT over drawn shapes and for Hugging Face Llama-family models; its
slices are what each rank holds; bad input is named."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharded
from sharded.models import GPT, GPTConfig
from sharded.placement import state_leaves
from sharded.testing import assert_step_equivalent, get_pool
from sharded.testing.strategies import nested_in_drawn_order
from sharded.transforms.tensor_parallel import sliced_params

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OPTIMIZERS = [
    lambda: sharded.optim.adamw(1e-2, weight_decay=0.1),
    lambda: sharded.optim.sgd(0.1, momentum=0.9),
    lambda: sharded.optim.chain(sharded.optim.clip_by_global_norm(0.05), sharded.optim.adamw(1e-2)),  # a norm over tp's slices
]


def _gpt_step(cfg: GPTConfig):
    torch.manual_seed(cfg.seq_len)
    model = sharded.trace(GPT(cfg).double())

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: _loss(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    return model, train_step


def _loss(logits, targets):
    """Cross-entropy in the logits' dtype (`models.loss_fn` computes in float32)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _batches(vocab, rows, seq, seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (rows, seq), generator=g), torch.randint(0, vocab, (rows, seq), generator=g)) for _ in range(n)]


@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_gpt_under_tensor_parallelism_equals_the_plain_step(data):
    """tp in {2, 4} alone, or tp=2 beside dp=2 (data_parallel or ZeRO 1-3), with a loss
    scaler or accumulate drawn in, with or without sequence parallelism and a
    vocab-parallel loss, over drawn GPT shapes (tied or not, biases or not)."""
    draw = data.draw
    tp = draw(st.sampled_from([2, 4]))
    sequence, loss_parallel = draw(st.booleans()), draw(st.booleans())
    dp = 1 if tp == 4 else draw(st.sampled_from([1, 2]))
    heads = tp * draw(st.integers(1, 2))
    cfg = GPTConfig(vocab_size=tp * draw(st.integers(3, 8)), seq_len=draw(st.integers(4, 9)), n_layers=draw(st.integers(1, 2)),
                    n_heads=heads, d_model=heads * draw(st.sampled_from([2, 4])), dropout=0.0, tied=draw(st.booleans()), bias=draw(st.booleans()))
    model, train_step = _gpt_step(cfg)
    layers = [sharded.tensor_parallel(sequence_parallel=sequence, loss_parallel=loss_parallel)]
    if dp > 1:
        stage = draw(st.integers(0, 3))
        layers.append(sharded.shard_zero(stage=stage) if stage else sharded.data_parallel())
    steps = draw(st.integers(1, 2))
    if steps > 1:
        layers.append(sharded.accumulate(steps=steps))
    step = nested_in_drawn_order(draw, layers, train_step)
    seq = tp * (cfg.seq_len // tp) if sequence else cfg.seq_len  # the sequence splits over tp
    batches = _batches(cfg.vocab_size, dp * steps * draw(st.integers(1, 2)), seq, draw(st.integers(0, 99)))
    state = sharded.TrainState.create(model.params, draw(st.sampled_from(OPTIMIZERS))())
    assert_step_equivalent(step, train_step, state, batches, world_size=tp * dp, rtol=1e-7, atol=1e-9, mesh=dict(tp=tp, dp=dp))


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=16)
    if kind == "gpt2":  # tied head; no dropout
        common = dict(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config, cls = {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    module = cls(config(**common)).double()
    model = sharded.trace(module)

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: model.apply(p, b[0], labels=b[1], use_cache=False).loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    return model, train_step


@pytest.mark.parametrize("kind, sequence, loss_parallel", [
    ("gpt2", False, False), ("gpt2", True, True), ("llama", False, True), ("llama", True, False), ("mistral", False, False), ("qwen2", True, True),
])
def test_hugging_face_models_under_tensor_parallelism_equal_the_plain_step(kind, sequence, loss_parallel):
    """Their built-in plans (GPT-2: Conv1D layers, fused c_attn, tied head; Llama family:
    grouped-query attention, 4 heads and 2 kv heads over tp=2, Qwen2's q/k/v biases
    split with them), with or without sequence parallelism and their own loss over
    vocab-sharded logits, float64 params; Llama's RMSNorm computes in float32, so the
    tolerance is float32-sized."""
    model, train_step = _hf(kind)
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2, weight_decay=0.1))
    step = sharded.tensor_parallel(sequence_parallel=sequence, loss_parallel=loss_parallel)(train_step)
    assert_step_equivalent(step, train_step, state, _batches(48, 2, 6, 0), world_size=2, rtol=1e-5, atol=1e-6, mesh=dict(tp=2))


@pytest.mark.parametrize("schedule, tied, sequence", [("1f1b", False, True), ("gpipe", True, False), ("interleaved", True, True)])
def test_pipeline_stages_of_tensor_parallel_ranks_equal_the_plain_step(schedule, tied, sequence):
    """3D parallelism's two model axes: pp=2 stages, each of tp=2 ranks holding the
    slices of its stage's params (the tied embedding and head on both ends), the
    activations between stages cut along the sequence under sequence parallelism."""
    model, train_step = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=4, n_heads=4, d_model=16, dropout=0.0, tied=tied))
    step = sharded.tensor_parallel(sequence_parallel=sequence)(sharded.pipeline(stages=2, microbatches=2 if schedule != "interleaved" else 4, schedule=schedule)(train_step))
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2, weight_decay=0.1))
    assert_step_equivalent(step, train_step, state, _batches(16, 4, 6, 0), world_size=4, rtol=1e-7, atol=1e-9, mesh=dict(pp=2, tp=2))


@pytest.mark.parametrize("stage", [1, 3])
def test_3d_parallelism_equals_the_plain_step(stage):
    """dp=2 (ZeRO chunking each tp slice further) x pp=2 x tp=2: eight ranks."""
    model, train_step = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=4, n_heads=4, d_model=16, dropout=0.0, tied=True))
    step = sharded.tensor_parallel()(sharded.shard_zero(stage=stage)(sharded.pipeline(stages=2, microbatches=2)(train_step)))
    state = sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2, weight_decay=0.1))
    assert_step_equivalent(step, train_step, state, _batches(16, 4, 6, 0), world_size=8, rtol=1e-7, atol=1e-9, mesh=dict(pp=2, tp=2, dp=2))


def _on_mesh(**axes):
    """This rank's default mesh set to `axes` (the pool's ranks keep the last test's)."""
    sharded.Mesh.set_current(sharded.Mesh(**axes))


def _held(tp):
    _on_mesh(tp=tp)
    model, train_step = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=2, n_heads=4, d_model=16, dropout=0.0))
    whole = {n: x.numel() * x.element_size() for n, x in model.params.items()}
    step = sharded.tensor_parallel()(train_step) if tp > 1 else sharded.Step(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    params = sum(x.numel() * x.element_size() for x in sharded.tree.leaves(state.params))
    moments = sum(x.numel() * x.element_size() for path, x in state_leaves(state) if path.startswith("opt_state") and x.ndim)
    cut = sum(b for n, b in whole.items() if n.endswith(("qkv.weight", "qkv.bias", "fc.weight", "fc.bias", "proj.weight", "wte.weight", "head.weight")))
    replicated = sum(whole.values()) - cut  # norms, position embeddings, rowwise biases
    cuts = {path: [(c.axis, c.dim, c.blocks) for c in p.cuts] for path, p in state.placements.items()}
    return params, moments, cut, replicated, cuts


def test_each_rank_holds_its_slices_and_the_whole_norms():
    """Model-state bytes per rank at tp=t: 1/t of the split params (and their moments),
    plus the params every rank holds whole (norms, position embeddings, rowwise biases)."""
    (one,) = get_pool(1).run(_held, 1)
    for tp in (2, 4):
        for params, moments, cut, replicated, cuts in get_pool(tp).run(_held, tp):
            assert params == cut // tp + replicated
            assert moments == 2 * params  # AdamW's two moments mirror the slices
            assert cuts["params['blocks.0.attn.qkv.weight']"] == [("tp", 0, 3)]
            assert cuts["params['blocks.0.attn.proj.weight']"] == [("tp", 1, 1)]
            assert "params['blocks.0.ln_1.weight']" not in cuts
    assert one[0] == one[2] + one[3]


def test_the_estimate_divides_what_tp_slices():
    with torch.device("meta"):
        model = sharded.trace(GPT(GPTConfig(vocab_size=64, seq_len=8, n_layers=2, n_heads=4, d_model=32)))
    whole = {n: x.numel() * 4 for n, x in model.params.items()}
    sliced = sliced_params(model)
    assert "blocks.0.ln_1.weight" not in sliced and "blocks.1.attn.qkv.weight" in sliced and "blocks.0.attn.proj.bias" not in sliced
    for tp in (1, 2, 4):
        est = sharded.estimate_memory(model, tp=tp)
        assert est.params == sum(b // (tp if n in sliced else 1) for n, b in whole.items())
    assert sharded.estimate_memory(model, stage=3, world_size=2, tp=2).params == sum(-(-(b // 4 // (2 if n in sliced else 1)) // 2) * 4 for n, b in whole.items())


def _refused(cfg_kwargs, plan, words, tp=2):
    _on_mesh(tp=tp)
    model, train_step = _gpt_step(GPTConfig(**{"vocab_size": 16, "seq_len": 8, "n_layers": 1, "n_heads": 4, "d_model": 16, "dropout": 0.0, **cfg_kwargs}))
    step = sharded.tensor_parallel(plan=plan)(train_step)
    try:
        step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    except ValueError as err:
        return words in str(err), str(err)
    return False, "no error"


@pytest.mark.parametrize("cfg_kwargs, plan, words", [
    ({"n_heads": 3, "d_model": 12}, None, "3 heads, not divisible by tp=2"),
    ({"vocab_size": 15}, None, "pad the vocabulary to a multiple of tp"),
    ({}, {"blocks.*.attn.nothing": "colwise"}, "match no module of the model"),
    ({}, {"blocks.*.ln_1": "colwise"}, "is a LayerNorm; style colwise splits an Linear"),
])
def test_bad_shapes_and_plans_are_named(cfg_kwargs, plan, words):
    for ok, message in get_pool(2).run(_refused, cfg_kwargs, plan, words):
        assert ok, message


def _one_rank_axis():
    return _refused({}, None, "axis has one rank", tp=1)


def _odd_sequence():
    _on_mesh(tp=2)
    model, train_step = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=1, n_heads=4, d_model=16, dropout=0.0))
    step = sharded.tensor_parallel(sequence_parallel=True)(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    try:
        step(state, _batches(16, 2, 5, 0)[0])
    except ValueError as err:
        return "use a length divisible by 2" in str(err), str(err)
    return False, "no error"


def _toy_with_sequence():
    from sharded.testing.models import ToyConfig, ToyLM, make_train_step

    _on_mesh(tp=2)
    model = sharded.trace(ToyLM(ToyConfig(vocab=8, hidden=4)))
    plan = {"embed": "vocab_embedding", "head": "vocab_head", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
    step = sharded.tensor_parallel(plan=plan, sequence_parallel=True)(make_train_step(model))
    try:
        step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    except ValueError as err:
        return "sit in the block itself" in str(err), str(err)
    return False, "no error"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="is True or False"):
        sharded.tensor_parallel(sequence_parallel="yes")
    with pytest.raises(ValueError, match="loss_parallel=.... is True or False"):
        sharded.tensor_parallel(loss_parallel=1)
    for ok, message in get_pool(2).run(_odd_sequence) + get_pool(2).run(_toy_with_sequence):
        assert ok, message
    with pytest.raises(ValueError, match="the styles are"):
        sharded.tensor_parallel(plan={"wte": "diagonal"})
    for ok, message in get_pool(2).run(_one_rank_axis):  # a mesh without a tp axis: every rank on dp
        assert ok, message


def _explained(sequence):
    _on_mesh(tp=2)
    model, train_step = _gpt_step(GPTConfig(vocab_size=24, seq_len=8, n_layers=1, n_heads=4, d_model=16, dropout=0.0))
    step = sharded.tensor_parallel(sequence_parallel=sequence)(train_step)
    step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    return str(step.explain())


def test_explain_names_each_layers_collective_and_its_bytes_per_token():
    (text, _) = get_pool(2).run(_explained, False)
    assert "tensor_parallel(tp=2)" in text
    assert "all_reduce (forward): blocks.0.attn.proj (rowwise), over tp=2: 16 values (128 bytes) per token" in text  # d_model, float64
    assert "all_gather logits (forward): head (vocab_head), over tp=2: 24 values (192 bytes) per token" in text
    (text, _) = get_pool(2).run(_explained, True)
    assert "all_gather the sequence (forward; reduce_scatter in backward): blocks.0.mlp" in text
    assert "reduce_scatter over the sequence (forward; all_gather in backward): blocks.0.attn.proj" in text


def _laid_out(train_step, tp, stage):
    """The step at tp (1: no transform), beside ZeRO on dp=2 where `stage`."""
    _on_mesh(tp=tp, dp=2 if stage else 1)
    step = sharded.tensor_parallel()(train_step) if tp > 1 else train_step
    return sharded.shard_zero(stage=stage)(step) if stage else sharded.Step(step)


def _saved_at_tp2(path, stage=0):
    """Two steps of GPT at tp=2 (beside ZeRO on dp=2 where `stage`), then a checkpoint:
    the state's gathered params after one more step."""
    model, train_step = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=2, n_heads=4, d_model=16, dropout=0.0))
    step = _laid_out(train_step, 2, stage)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    batches = _batches(16, 2, 8, 1)  # a sequence that splits over tp=4 too
    for b in batches[:2]:
        state, _ = step(state, b)
    sharded.checkpoint.save(state, path)
    after, _ = step(state, batches[2])
    return {k: v.clone() for k, v in step.gather(after).params.items()}


def _loaded(path, tp, stage=0):
    """A fresh state at `tp` (1: no transform; beside ZeRO on dp=2 where `stage`), the
    checkpoint loaded into it, one more step: the gathered params."""
    model, train_step = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=2, n_heads=4, d_model=16, dropout=0.0))
    step = _laid_out(train_step, tp, stage)
    fresh = step.init(sharded.TrainState.create(sharded.tree.map(torch.clone, model.params), sharded.optim.adamw(1e-2)))
    state = sharded.checkpoint.load(path, like=fresh)
    state, _ = step(state, _batches(16, 2, 8, 1)[2])
    return {k: v.clone() for k, v in step.gather(state).params.items()}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_checkpoint_saved_at_tp2_continues_identically_at_any_tp(tmp_path, tp):
    """Saved with the slices (the fused qkv's blocks too) as chunks of the flattened
    leaves, so it reshards: loaded at tp=1, 2 or 4, the next step matches tp=2's."""
    want = get_pool(2).run(_saved_at_tp2, str(tmp_path / "ckpt"))[0]
    for got in get_pool(tp).run(_loaded, str(tmp_path / "ckpt"), tp):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("stage", [1, 3])
def test_a_checkpoint_of_tp_slices_chunked_by_zero_reshards(tmp_path, stage):
    """tp=2 x dp=2 under ZeRO (each tp slice chunked over dp) saved, then loaded into the
    same layout and into one process: the next step matches."""
    want = get_pool(4).run(_saved_at_tp2, str(tmp_path / "ckpt"), stage)[0]
    for tp, at, ranks in ((2, stage, 4), (1, 0, 1)):
        for got in get_pool(ranks).run(_loaded, str(tmp_path / "ckpt"), tp, at):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-9, msg=name)


def _logits_seen():
    """The logits a loss sees under loss_parallel: their type and local vocabulary."""
    _on_mesh(tp=2)
    model, _ = _gpt_step(GPTConfig(vocab_size=16, seq_len=8, n_layers=1, n_heads=4, d_model=16, dropout=0.0))
    seen = []

    def loss(params, batch):
        logits = model.apply(params, batch[0])
        seen.append((type(logits).__name__, logits.to_local().shape[-1], tuple(logits.shape)))
        return _loss(logits, batch[1])

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(loss)(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.tensor_parallel(loss_parallel=True)(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    _, metrics = step(state, _batches(16, 2, 8, 0)[0])
    return seen, type(metrics["loss"]).__name__


def test_under_loss_parallel_no_rank_holds_the_whole_vocabularys_logits():
    for seen, loss_type in get_pool(2).run(_logits_seen):
        assert seen == [("DTensor", 8, (2, 8, 16))]  # sharded over the vocabulary: 8 of 16 here
        assert loss_type == "Tensor"  # the step's loss made whole again
