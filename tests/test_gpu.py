"""GPU tier (run on the device machine): the same properties over CUDA and NCCL."""
import pytest
import torch

import sharded
from sharded.testing.models import ToyConfig, ToyLM, make_train_step

pytestmark = pytest.mark.gpu
needs = lambda n: pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPU(s)")  # noqa: E731


def _batches(vocab, rows, steps, device="cpu", seq=6):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, vocab, (rows, seq), generator=g).to(device), torch.randint(0, vocab, (rows, seq), generator=g).to(device))
        for _ in range(steps)
    ]


@needs(1)
def test_trace_and_fused_adamw_on_cuda_match_cpu():
    cfg = ToyConfig(tied=True, depth=3, width=64, hidden=96, vocab=50)
    results = []
    for device in ("cpu", "cuda"):
        model = sharded.trace(ToyLM(cfg).to(device))
        step = sharded.Step(make_train_step(model))
        state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
        for batch in _batches(cfg.vocab, 8, 5, device):
            state, metrics = step(state, batch)
        results.append({k: v.cpu() for k, v in state.params.items()})
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-3, atol=1e-4)


STACKS = {
    "data_parallel": lambda f: sharded.data_parallel(bucket_mb=0.01)(sharded.accumulate(steps=2)(f)),
    "zero1": lambda f: sharded.shard_zero(stage=1, bucket_mb=0.01)(sharded.accumulate(steps=2)(f)),
    "zero2": lambda f: sharded.accumulate(steps=2)(sharded.shard_zero(stage=2, bucket_mb=0.01)(f)),
    "zero3": lambda f: sharded.shard_zero(stage=3, prefetch=2)(sharded.accumulate(steps=2)(f)),
    # protocol v2: any nesting is the canonical one; remat recomputes after ZeRO-3 regathers
    "zero3_remat_any_order": lambda f: sharded.remat("full")(sharded.accumulate(steps=2)(sharded.shard_zero(stage=3)(f))),
    "dp_remat_selective": lambda f: sharded.data_parallel(sharded.remat("selective")(f)),
    # the optimizer on the host (pinned copies), its clip norm summed over NCCL through a device copy
    "zero2_offload": lambda f: sharded.offload("cpu")(sharded.shard_zero(stage=2, bucket_mb=0.01)(f)),
    "zero3_offload": lambda f: sharded.offload("cpu")(sharded.shard_zero(stage=3)(f)),
    # the param chunks on the host too, fetched per block on the side stream (prefetched), bf16 gathers
    "zero3_offload_params": lambda f: sharded.offload("cpu", params=True)(sharded.shard_zero(stage=3, prefetch=2)(f)),
}


def _dp_on_cuda(cfg, batches, stack):
    assert torch.distributed.get_backend() == "nccl"
    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev))  # float32, as the one-GPU reference: the Triton kernels' path
    step = STACKS[stack](make_train_step(model))
    tx = sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(1e-2))
    state = step.init(sharded.TrainState.create(model.params, tx))
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather(state).params.items()}, m["loss"].cpu()


@needs(2)
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_data_parallel_and_zero_over_nccl_match_one_gpu(stack):
    cfg = ToyConfig(tied=True, depth=4, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 4)
    got, loss = sharded.launch(_dp_on_cuda, cfg, batches, stack, nprocs=2, device="cuda")
    _assert_matches_one_gpu(cfg, batches, got, loss, sharded.optim.chain(sharded.optim.clip_by_global_norm(1.0), sharded.optim.adamw(1e-2)))


def _bf16_zero3(cfg, batches, update, microbatches):
    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev))
    step = sharded.mixed_precision("bf16", autocast=False)(sharded.accumulate(steps=microbatches)(make_train_step(model)))
    step = sharded.shard_zero(stage=3)(step)
    step = sharded.offload("cpu", params=True, update=update)(step) if update else step
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather(state).params.items()}, m["loss"].cpu()


@needs(2)
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("update", ["host", "device"])
def test_bf16_zero3_with_params_on_the_host_matches_it_on_the_device(update, microbatches):
    """The standard recipe: the host's fp32 chunks fetched and cast to bf16 per block give
    the device-resident step's params (updated on the host, they differ only as the CPU's
    and the GPU's fused AdamW round; with update="device", each block's state streamed
    through the GPU during the last micro-batch's backward)."""
    cfg = ToyConfig(tied=False, depth=4, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 4)
    (got, loss), (want, want_loss) = (sharded.launch(_bf16_zero3, cfg, batches, u, microbatches, nprocs=2, device="cuda") for u in (update, None))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)


def _infinity_on_one_gpu(cfg, batches, update, microbatches):
    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev))
    step = sharded.accumulate(steps=microbatches)(make_train_step(model))
    step = sharded.offload("cpu", params=True, update=update)(sharded.shard_zero(stage=3)(step))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    assert all(x.device.type == "cpu" for x in state.params.values())  # every param on the host between steps
    assert all(p.untyped_storage().size() == 0 for p in model.params.values())  # the model's device copies given back
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather(state).params.items()}, m["loss"].cpu()


@needs(1)
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("update", ["host", "device"])
def test_params_on_the_host_on_one_gpu_match_the_plain_step(update, microbatches):
    """ZeRO-Infinity on one GPU: each block fetched from pinned host memory as it runs,
    updated on the host or streamed through the GPU, during the last micro-batch's backward."""
    cfg = ToyConfig(tied=True, depth=4, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 4)
    got, loss = sharded.launch(_infinity_on_one_gpu, cfg, batches, update, microbatches, nprocs=1, device="cuda")
    _assert_matches_one_gpu(cfg, batches, got, loss, sharded.optim.adamw(1e-2))


def _nvme_on_cuda(cfg, batches, path, params):
    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev))
    zero = sharded.shard_zero(stage=3 if params else 2, bucket_mb=0.01)
    step = sharded.offload("nvme", path=path, host_buffer_gb=1e-3, params=params)(zero(make_train_step(model)))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather(state).params.items()}, m["loss"].cpu()


@needs(2)
@pytest.mark.parametrize("params", [False, True])
def test_the_nvme_tier_over_nccl_matches_one_gpu(tmp_path, params):
    """The moments (and with params=True ZeRO-3's param chunks, fetched per block
    through their mapping) in swap files, staged through 1 MB of pinned buffers: the
    grads' and params' copies over PCIe and the disk's reads and writes, group by group."""
    cfg = ToyConfig(tied=True, depth=4, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 4)
    got, loss = sharded.launch(_nvme_on_cuda, cfg, batches, str(tmp_path), params, nprocs=2, device="cuda")
    _assert_matches_one_gpu(cfg, batches, got, loss, sharded.optim.adamw(1e-2))


def _assert_matches_one_gpu(cfg, batches, got, loss, tx):
    """The plain step on one GPU ends with `got` params and `loss`."""
    model = sharded.trace(ToyLM(cfg).cuda())
    step = sharded.Step(make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, tx))
    for x, y in batches:
        state, m = step(state, (x.cuda(), y.cuda()))
    for k, v in state.params.items():
        torch.testing.assert_close(got[k], v.cpu(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, m["loss"].cpu(), rtol=1e-4, atol=1e-5)


@needs(1)
@pytest.mark.parametrize("compute,autocast", [("bf16", True), ("fp16", True), ("bf16", False)])
def test_mixed_precision_on_cuda_tracks_fp32(compute, autocast):
    cfg = ToyConfig(tied=True, depth=3, width=64, hidden=96, vocab=50)
    finals = {}
    for name in ("fp32", compute):
        model = sharded.trace(ToyLM(cfg).cuda())
        f = make_train_step(model)
        step = sharded.Step(f) if name == "fp32" else sharded.mixed_precision(compute, autocast=autocast)(f)
        state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
        for batch in _batches(cfg.vocab, 8, 30, "cuda"):
            state, metrics = step(state, batch)
        finals[name] = metrics["loss"].item()
    assert finals[compute] == pytest.approx(finals["fp32"], rel=0.03)


def _pipeline_on_cuda(cfg, batches, schedule):
    assert torch.distributed.get_backend() == "nccl"
    sharded.Mesh.set_current(sharded.Mesh(pp=2))
    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev))
    virtual = 2 if schedule == "interleaved" else 1
    step = make_train_step(model)
    if schedule == "1f1b":  # remat inside each stage's blocks, over NCCL
        step = sharded.remat("full")(step)
    step = sharded.pipeline(stages=2, microbatches=4, schedule=schedule, virtual=virtual)(step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-2)))
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather(state).params.items()}, m["loss"].cpu()


@needs(2)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_pipeline_over_nccl_matches_one_gpu(schedule):
    cfg = ToyConfig(tied=True, depth=4, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 3)
    got, loss = sharded.launch(_pipeline_on_cuda, cfg, batches, schedule, nprocs=2, device="cuda")
    _assert_matches_one_gpu(cfg, batches, got, loss, sharded.optim.adamw(1e-2))


@needs(1)
def test_adamw_on_cuda_runs_the_triton_kernel_and_matches_torch_fused():
    from sharded.optim.aliases import _triton_applies

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(37, 5), (1000,), (3, 7, 11), (1,)]
    params = {f"p{i}": torch.randn(s, device="cuda", generator=g) for i, s in enumerate(shapes)}
    torch_params = [p.clone().requires_grad_() for p in params.values()]
    tx = sharded.optim.adamw(1e-2, weight_decay=0.1)
    assert _triton_applies(next(iter(params.values())), 1e-2)
    state = tx.init(params)
    ref = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(20):
        grads = {k: torch.randn(p.shape, device="cuda", generator=g) for k, p in params.items()}
        params, state = tx.fused(grads, state, params)
        for p, grad in zip(torch_params, grads.values()):
            p.grad = grad
        ref.step()
    for p, q in zip(params.values(), torch_params):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


def _per_sample_norms_on_cuda(cfg, batches, zero):
    import torch.nn.functional as F

    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev))

    def sample_loss(params, tokens, targets):
        logits = model.apply(params, tokens[None])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def step_fn(state, batch):
        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(state.params, *batch)
        squares = sum(g.flatten(1).square().sum(1) for g in sharded.tree.leaves(per_sample))
        return state, {"norms": sharded.sharding.sum_over_shards(squares).sqrt()}

    step = sharded.shard_zero(stage=3)(step_fn) if zero else sharded.Step(step_fn)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.sgd(0.1)))
    x, y = batches[0]
    return step(state, (x.to(dev), y.to(dev)))[1]["norms"].cpu()


@needs(2)
def test_per_sample_grad_norms_under_zero3_over_nccl_match_one_gpu():
    """torch.func's vmap(grad) over model.apply in the step's own code, ZeRO-3 over NCCL."""
    cfg = ToyConfig(tied=True, depth=3, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 1)
    got = sharded.launch(_per_sample_norms_on_cuda, cfg, batches, True, nprocs=2, device="cuda")
    want = sharded.launch(_per_sample_norms_on_cuda, cfg, batches, False, nprocs=1, device="cuda")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _compressed_on_cuda(cfg, batches, stack):
    from test_compress_grads import STACKS

    dev = sharded.distributed.device()
    model = sharded.trace(ToyLM(cfg).to(dev).double())
    step = STACKS[stack](make_train_step(model))
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.onebit_adam(1e-2, warmup_steps=1, weight_decay=0.1)))
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather_params(state).items()}


@needs(2)
@pytest.mark.parametrize("stack", ["data_parallel", "zero1", "zero2", "zero3"])
def test_compress_grads_over_nccl_matches_the_one_bit_simulation(stack):
    """1-bit Adam's exchange over NCCL (all-to-all, all-gather of packed signs) against the
    plain simulation of two workers on one GPU, in float64: after a short warmup Adam's
    frozen variance is tiny for some elements, so a float32 rounding that flips one sign
    moves a param a lot (the kernels themselves are checked natively below)."""
    from test_compress_grads import reference_step

    cfg = ToyConfig(tied=True, depth=3, width=64, hidden=96, vocab=50)
    batches = _batches(cfg.vocab, 8, 4)
    got = sharded.launch(_compressed_on_cuda, cfg, batches, stack, nprocs=2, device="cuda")
    model = sharded.trace(ToyLM(cfg).cuda().double())
    step = reference_step(model, 2, warmup=1)
    state = sharded.TrainState.create(model.params, sharded.optim.onebit_adam(1e-2, warmup_steps=1, weight_decay=0.1))
    for x, y in batches:
        state, _ = step(state, (x.cuda(), y.cuda()))
    for k, v in state.params.items():
        torch.testing.assert_close(got[k], v.cpu(), rtol=1e-7, atol=1e-9)


@needs(1)
def test_sign_packing_kernels_on_cuda_match_references():
    from sharded import kernels
    from sharded.kernels import onebit

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, per in ((1, 1), (31, 3), (33, 32), (1000, 256), (100_003, 256)):
        x = torch.randn(n, device="cuda", generator=g)
        x[::7] = 0.0
        scales = torch.rand(-(-n // per), device="cuda", generator=g)
        scale = scales.repeat_interleave(per)[:n]
        error, want_error = torch.empty_like(x), torch.empty_like(x)
        words = kernels.pack_signs_(x, scales, error, per)
        assert torch.equal(words, onebit.reference_pack_signs_(x, scales, want_error, per))
        torch.testing.assert_close(error, want_error)
        out = torch.empty_like(x)
        kernels.unpack_signs_(words, scales, out, per)
        assert torch.equal(out, torch.where(x >= 0, scale, -scale))


def _gpt_tp_on_cuda(cfg, batches, tp_kwargs):
    """sharded's GPT, float32, its train step under `tensor_parallel` when `tp_kwargs` is not None."""
    from sharded.models import GPT, loss_fn

    if tp_kwargs is not None:
        sharded.Mesh.set_current(sharded.Mesh(tp=sharded.distributed.world_size()))
    dev = sharded.distributed.device()
    torch.manual_seed(0)
    model = sharded.trace(GPT(cfg).to(dev))

    def train_step(state, batch):
        value, grads = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(grads), {"loss": value}

    step = sharded.Step(train_step) if tp_kwargs is None else sharded.tensor_parallel(**tp_kwargs)(train_step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3, weight_decay=0.1)))
    for x, y in batches:
        state, m = step(state, (x.to(dev), y.to(dev)))
    return {k: v.cpu() for k, v in step.gather(state).params.items()}, m["loss"].cpu()


@needs(2)
@pytest.mark.parametrize("tp_kwargs", [dict(sequence_parallel=False), dict(sequence_parallel=True, loss_parallel=True)])
def test_tensor_parallel_over_nccl_matches_one_gpu(tp_kwargs):
    """Megatron's slices over NCCL's functional collectives (sequence-parallel
    reduce-scatters, the vocab-parallel loss's DTensor) give the one-GPU step's params
    (to float32's sums in another order: 1e-4 is a tenth of one Adam step here)."""
    from sharded.models import GPTConfig

    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layers=2, n_heads=4, d_model=64, tied=False)
    batches = _batches(cfg.vocab_size, 4, 3, seq=16)
    got, loss = sharded.launch(_gpt_tp_on_cuda, cfg, batches, tp_kwargs, nprocs=2, device="cuda")
    want, want_loss = sharded.launch(_gpt_tp_on_cuda, cfg, batches, None, nprocs=1, device="cuda")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
