import cProfile, pstats, io, time, sys, torch, sharded
from sharded.models import GPT, GPTConfig, loss_fn

def run(update, stage, offload):
    torch.manual_seed(0)
    model = sharded.trace(GPT(GPTConfig(vocab_size=64, seq_len=8, n_layers=24, d_model=32, n_heads=2, tied=False)))
    def train_step(state, batch):
        v, g = sharded.value_and_grad(lambda p, b: loss_fn(model.apply(p, b[0]), b[1]))(state.params, batch)
        return state.apply_gradients(g), {"loss": v}
    step = sharded.mixed_precision("bf16", autocast=False)(train_step)
    step = sharded.shard_zero(stage=stage)(step)
    if offload:
        step = sharded.offload("cpu", params=True, update=update)(step)
    state = step.init(sharded.TrainState.create(model.params, sharded.optim.adamw(1e-3), opt_device="cpu" if offload else None))
    x = torch.randint(0, 64, (2 * sharded.distributed.world_size(), 8))
    for _ in range(3):
        state, _ = step(state, (x, x))
    pr = cProfile.Profile(); t = time.perf_counter()
    pr.enable()
    for _ in range(5):
        state, _ = step(state, (x, x))
    pr.disable()
    dt = (time.perf_counter() - t) / 5
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    return dt, s.getvalue() if sharded.distributed.rank() == 0 else ""

if __name__ == "__main__":
    for args in [("host", 3, True), ("device", 3, True), ("host", 3, False)]:
        out = sharded.launch(run, *args, nprocs=2)
        out = out if isinstance(out, list) else [out]
        print(args, "step ms", [round(o[0] * 1e3, 1) for o in out])
        print(out[0][1][:6000])
