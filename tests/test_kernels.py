"""sharded.kernels: every Triton kernel against its torch reference, and the references
against torch.optim.

On CPU the kernels run under Triton's interpreter. triton.jit reads TRITON_INTERPRET
when a kernel is decorated, so it must be set before sharded.kernels is imported, and
setting it here would leak into every later test (and into torch.compile). So one child
process, spawned with the variable set, imports sharded.kernels and runs the kernels
(`interpreted`); the comparisons run here, against the references. The gpu tests run
the compiled kernels on CUDA.
"""
from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import pickle
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sharded
from sharded import kernels
from sharded.kernels import adamw, flat_copy, lion, sgd, unscale

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
LOWP = [None, torch.bfloat16, torch.float16]
# odd sizes on both sides of the 1024-element block, and anything up to three blocks
SIZES = st.one_of(st.sampled_from([1, 2, 1023, 1024, 1025, 3001]), st.integers(1, 3000))
SEEDS = st.integers(0, 2**31 - 1)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REFERENCES = {
    "adamw": adamw.reference_adamw_,
    "sgd": sgd.reference_sgd_,
    "lion": lion.reference_lion_,
}
PUBLIC = {"adamw": kernels.fused_adamw_, "sgd": kernels.fused_sgd_, "lion": kernels.fused_lion_}


# -- the interpreter child --

def _run_in_interpreter(payload: bytes) -> bytes:
    """(In the child.) sharded.kernels.<name>(**kwargs); returns the kwargs, mutated in place, and the result."""
    name, call = pickle.loads(payload)
    if not kernels.uses_triton(torch.empty(0)):
        raise RuntimeError("the child imported sharded.kernels without TRITON_INTERPRET=1: its kernels would not run")
    result = getattr(kernels, name)(**call)
    return pickle.dumps((call, result))


@pytest.fixture(scope="module")
def interpreted():
    """`interpreted(name, **kwargs)` runs sharded.kernels.<name> in Triton's interpreter (in
    the child) and returns (kwargs after the call, result). Tensors travel by plain pickle,
    copies, never shared memory."""
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        pool = multiprocessing.get_context("spawn").Pool(1)

    def call(name, **kwargs):
        reply = pool.apply_async(_run_in_interpreter, (pickle.dumps((name, kwargs)),))
        return pickle.loads(reply.get(timeout=120))  # a dead child would otherwise hang the run

    yield call
    pool.close()
    pool.join()


# -- comparisons --

def _clone(call: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else [x.clone() for x in v] if isinstance(v, list) else v for k, v in call.items()}


def assert_kernel_result(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32: to float32 rounding (torch's CPU sqrt is not always correctly rounded);
    fp16: bitwise; bf16 on CPU: within 1 ulp, because Triton's interpreter casts float32
    to bfloat16 by truncation where compiled kernels (and torch) round to nearest even."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, equal_nan=True)
    elif got.dtype == torch.bfloat16 and got.device.type == "cpu":
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# -- the fused optimizers --

# one tensor's shape: flat (empty, odd and block-sized lengths), or 2-D and 3-D ones
SHAPES = st.one_of(
    st.one_of(st.sampled_from([0, 1, 1023, 1024, 1025]), st.integers(1, 2100)).map(lambda n: (n,)),
    st.tuples(st.integers(0, 40), st.integers(1, 60)),
    st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(1, 33)),
)
TENSOR_OPERANDS = ("param", "grad", "exp_avg", "exp_avg_sq", "momentum_buffer", "out_lowp")  # one per param


def _tensors(x) -> list:
    """A call's operand as a list: the tensors it holds (one bare tensor is a list of one)."""
    return [] if x is None else [x] if isinstance(x, torch.Tensor) else x


@st.composite
def optimizer_calls(draw, names=tuple(sorted(REFERENCES))):
    """(name, kwargs) for one fused optimizer step over 1..6 tensors of random shapes
    (empty ones too) or over one bare tensor: a grad dtype, optional low-precision
    copies, grad scale and (clear) found_inf flag, and hyperparameters. Grads and
    states are sometimes flat where params are not (only numels must match)."""
    name = draw(st.sampled_from(names))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=6))
    bare = len(shapes) == 1 and draw(st.booleans())
    g = torch.Generator().manual_seed(draw(SEEDS))
    scale = draw(st.sampled_from([None, 1.0, 2.0**10, 3.0]))
    grad_dtype, lowp, flat = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(LOWP)), draw(st.booleans())

    def operand(make, like_param=True):
        xs = [make(shape if like_param or not flat else (math.prod(shape),)) for shape in shapes]
        return xs[0] if bare else xs

    call = {
        "param": operand(lambda s: torch.randn(s, generator=g)),
        "grad": operand(lambda s: (torch.randn(s, generator=g) * (scale or 1.0)).to(grad_dtype), like_param=False),
        "lr": draw(st.sampled_from([1e-3, 0.1])),
        "weight_decay": draw(st.sampled_from([0.0, 0.1])),
        "grad_scale": None if scale is None else torch.tensor(scale),
        "found_inf": draw(st.sampled_from([None, torch.zeros(())])),
        "out_lowp": None if lowp is None else operand(lambda s: torch.full(s, 7.0, dtype=lowp), like_param=False),
    }
    if name == "adamw":
        step = draw(st.one_of(st.integers(1, 10), st.integers(1, 10**5)))  # bias corrections matter early
        call.update(
            exp_avg=operand(lambda s: 0.1 * torch.randn(s, generator=g), like_param=False),
            exp_avg_sq=operand(lambda s: 0.01 * torch.randn(s, generator=g).square(), like_param=False),
            step=draw(st.sampled_from([step, torch.tensor(float(step))])),
            beta1=draw(st.sampled_from([0.0, 0.9])),
            beta2=draw(st.sampled_from([0.95, 0.999])),
            eps=draw(st.sampled_from([1e-8, 1e-3])),
            freeze_variance_after=draw(st.sampled_from([None, 1, 5, 10**4])),  # 1-bit Adam's: before and after the freeze
        )
    elif name == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        call.update(
            momentum_buffer=operand(lambda s: torch.randn(s, generator=g), like_param=False) if momentum else None,
            momentum=momentum,
            nesterov=bool(momentum) and draw(st.booleans()),
        )
    else:
        call.update(exp_avg=operand(lambda s: 0.1 * torch.randn(s, generator=g), like_param=False), beta1=0.9,
                    beta2=draw(st.sampled_from([0.9, 0.99])))
    return name, call


def reference_step(name: str, call: dict) -> dict:
    """A copy of the call after the reference's step, tensor by tensor (flat views)."""
    want = _clone(call)
    for i in range(len(_tensors(want["param"]))):
        REFERENCES[name](**{k: _tensors(v)[i].view(-1) if k in TENSOR_OPERANDS and v is not None else v for k, v in want.items()})
    return want


def assert_step_matches(got: dict, want: dict, call: dict, assert_close=None) -> None:
    """Params and states as the reference left them, grads untouched, and each out_lowp
    the kernel's own updated param, cast."""
    for key in TENSOR_OPERANDS:
        for x, y, before in zip(_tensors(got.get(key)), _tensors(want.get(key)), _tensors(call.get(key))):
            if key == "grad":
                assert torch.equal(x, before)
            elif key != "out_lowp":
                (assert_close or assert_kernel_result)(x, y)
    for lowp, param in zip(_tensors(got["out_lowp"]), _tensors(got["param"])):
        assert_kernel_result(lowp, param.reshape(lowp.shape).to(lowp.dtype))


@needs_triton
@settings(max_examples=150, deadline=None)
@given(case=optimizer_calls())
def test_fused_optimizer_kernels_match_references(interpreted, case):
    name, call = case
    got, _ = interpreted(f"fused_{name}_", **call)
    assert_step_matches(got, reference_step(name, call), call)


@needs_triton
@settings(max_examples=40, deadline=None)
@given(case=optimizer_calls())
def test_found_inf_leaves_every_tensor_bitwise_unchanged(interpreted, case):
    name, call = case
    call["found_inf"] = torch.ones(())
    got, _ = interpreted(f"fused_{name}_", **call)
    here = _clone(call)
    PUBLIC[name](**here)  # the CPU path: the reference, tensor by tensor
    for key in TENSOR_OPERANDS:
        for x, y, before in zip(_tensors(got.get(key)), _tensors(here.get(key)), _tensors(call.get(key))):
            assert torch.equal(x, before), f"kernel wrote {key}"
            assert torch.equal(y, before), f"reference wrote {key}"


def test_reference_adamw_matches_torch_adamw_over_steps():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(1037, generator=g)
    torch_param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([torch_param], lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    mine = {"param": p0.clone(), "exp_avg": torch.zeros(1037), "exp_avg_sq": torch.zeros(1037)}
    on_device = {k: v.clone() for k, v in mine.items()}
    count = torch.zeros(())
    for step in range(1, 7):
        grad = torch.randn(1037, generator=g)
        torch_param.grad = grad.clone()
        opt.step()
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.1)
        adamw.reference_adamw_(grad=grad, step=step, **mine, **hyper)
        adamw.reference_adamw_(grad=grad, step=count.add_(1), **on_device, **hyper)
        state = opt.state[torch_param]
        for got in (mine, on_device):
            torch.testing.assert_close(got["param"], torch_param.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["exp_avg"], state["exp_avg"])
            torch.testing.assert_close(got["exp_avg_sq"], state["exp_avg_sq"])


def test_reference_adamw_with_a_frozen_variance_matches_onebit_adams_pure_chain_over_steps():
    """Before the freeze: AdamW; after it: v and its bias correction stay at step k's."""
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(1037, generator=g)
    tx = sharded.optim.onebit_adam(1e-2, warmup_steps=3, b2=0.95, eps=1e-6, weight_decay=0.1)
    params, state = {"w": p0.clone()}, None
    state = tx.init(params)
    mine = {"param": p0.clone(), "exp_avg": torch.zeros_like(p0), "exp_avg_sq": torch.zeros_like(p0)}
    for step in range(1, 8):
        grad = torch.randn(1037, generator=g)
        updates, state = tx.update({"w": grad}, state, params)
        params = {"w": params["w"] + updates["w"]}
        adamw.reference_adamw_(grad=grad, step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.1, freeze_variance_after=3, **mine)
        adam = sharded.optim.states_of(state, sharded.optim.ScaleByFrozenAdamState)[0]
        if step == 3:
            frozen = mine["exp_avg_sq"].clone()
        for got, want in ((mine["param"], params["w"]), (mine["exp_avg"], adam.mu["w"]), (mine["exp_avg_sq"], adam.nu["w"])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(mine["exp_avg_sq"], frozen)


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 0.0), (0.5, True, 0.1)])
def test_reference_sgd_matches_torch_sgd_over_steps(momentum, nesterov, weight_decay):
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(515, generator=g)
    torch_param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([torch_param], lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    param, buf = p0.clone(), torch.zeros(515)
    for _ in range(5):
        grad = torch.randn(515, generator=g)
        torch_param.grad = grad.clone()
        opt.step()
        sgd.reference_sgd_(param, grad, buf if momentum else None, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        torch.testing.assert_close(param, torch_param.detach())
        if momentum:
            torch.testing.assert_close(buf, opt.state[torch_param]["momentum_buffer"])


def test_reference_lion_matches_sharded_optim_lion():
    g = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(300, generator=g)}
    tx = sharded.optim.lion(1e-2, b1=0.9, b2=0.99, weight_decay=0.1)
    state = tx.init(params)
    param, exp_avg = params["w"].clone(), torch.zeros(300)
    for _ in range(4):
        grad = torch.randn(300, generator=g)
        updates, state = tx.update({"w": grad}, state, params)
        params = {"w": params["w"] + updates["w"]}
        lion.reference_lion_(param, grad, exp_avg, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
        torch.testing.assert_close(param, params["w"])


# -- unscale and copy --

@st.composite
def tensor_lists(draw, max_tensors=4, max_size=2100):
    g = torch.Generator().manual_seed(draw(SEEDS))
    sizes = draw(st.lists(st.one_of(st.just(0), SIZES.filter(lambda n: n <= max_size)), min_size=1, max_size=max_tensors))
    return [torch.randn(n, generator=g).to(draw(st.sampled_from(FLOATS))) for n in sizes]


@needs_triton
@settings(max_examples=100, deadline=None)
@given(grads=tensor_lists(), scale=st.sampled_from([1.0, 2.0**16, 2.0**-3, 3.0]), bad=st.sampled_from([None, "inf", "-inf", "nan"]),
       flag=st.sampled_from([None, 0.0, 1.0]), one_buffer=st.booleans(), data=st.data())
def test_unscale_kernel_matches_reference(interpreted, grads, scale, bad, flag, one_buffer, data):
    grads = [(g * scale).to(g.dtype) for g in grads]
    if bad and any(g.numel() for g in grads):
        g = data.draw(st.sampled_from([g for g in grads if g.numel()]))
        g[data.draw(st.integers(0, g.numel() - 1))] = float(bad)
    checked = [grads[0]] if one_buffer else grads  # one flat buffer, or a list
    call = {"grads": grads[0] if one_buffer else grads, "scale": torch.tensor(scale), "found_inf": None if flag is None else torch.tensor(flag)}
    want = _clone({**call, "grads": checked})
    want_flag = unscale.reference_unscale_and_check_(**want)
    got, got_flag = interpreted("unscale_and_check_", **call)
    for x, y in zip([got["grads"]] if one_buffer else got["grads"], want["grads"]):
        assert_kernel_result(x, y)
    assert got_flag.item() == want_flag.item()
    expected = 1.0 if flag == 1.0 or any(not torch.isfinite(g).all() for g in checked) else 0.0
    assert got_flag.item() == expected


@needs_triton
@settings(max_examples=100, deadline=None)
@given(srcs=tensor_lists(max_tensors=5), gaps=st.lists(st.integers(0, 40), min_size=5, max_size=5), flat_dtype=st.sampled_from(FLOATS),
       scale=st.sampled_from([1.0, 0.25, 1 / 3]), out_dtypes=st.lists(st.sampled_from(FLOATS), min_size=5, max_size=5))
def test_copy_in_and_copy_out_kernels_match_references(interpreted, srcs, gaps, flat_dtype, scale, out_dtypes):
    offsets, end = [], 0
    for x, gap in zip(srcs, gaps):
        offsets.append(end + gap)
        end += gap + x.numel()
    flat = torch.full((end + 3,), 7.0, dtype=flat_dtype)  # padding keeps its 7s
    want = flat.clone()
    flat_copy.reference_copy_in(want, srcs, offsets, scale)
    got, _ = interpreted("copy_in", flat=flat, srcs=srcs, offsets=offsets, scale=scale)
    assert_kernel_result(got["flat"], want)

    dsts = [torch.zeros(x.shape, dtype=dt) for x, dt in zip(srcs, out_dtypes)]
    want_dsts = [d.clone() for d in dsts]
    flat_copy.reference_copy_out(got["flat"], want_dsts, offsets)
    got, _ = interpreted("copy_out", flat=got["flat"], dsts=dsts, offsets=offsets)
    for x, y in zip(got["dsts"], want_dsts):
        assert_kernel_result(x, y)


# -- dispatch and input checks --

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "0", reason="TRITON_INTERPRET is set for the whole session")
def test_cpu_tensors_run_the_references_in_this_process():
    assert not kernels.uses_triton(torch.empty(0))
    assert kernels.triton_available() == (importlib.util.find_spec("triton") is not None and torch.cuda.is_available())
    p, grad, m, v = torch.randn(33), torch.randn(33), torch.zeros(33), torch.zeros(33)
    want = [x.clone() for x in (p, grad, m, v)]
    kernels.fused_adamw_(p, grad, m, v, step=1, lr=0.1)
    adamw.reference_adamw_(*want, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
    assert all(torch.equal(x, y) for x, y in zip((p, m, v), (want[0], want[2], want[3])))
    # lists: the reference tensor by tensor, on flat views (shapes may differ where numels match)
    params, grads = [torch.randn(3, 5), torch.randn(0), torch.randn(7)], [torch.randn(15), torch.randn(0, 2), torch.randn(7)]
    lowps = [torch.zeros(x.shape, dtype=torch.bfloat16) for x in grads]
    want = [(x.clone(), y.clone()) for x, y in zip(params, grads)]
    kernels.fused_lion_(params, grads, [torch.zeros(x.shape) for x in grads], lr=0.1, out_lowp=lowps)
    for x, lowp, (p, grad) in zip(params, lowps, want):
        lion.reference_lion_(p.view(-1), grad.view(-1), torch.zeros(grad.numel()), lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
        assert torch.equal(x, p) and torch.equal(lowp, p.view(lowp.shape).bfloat16())


def _adamw(**change):
    n = change.pop("n", 8)
    call = dict(param=torch.zeros(n), grad=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n), step=1, lr=1e-3)
    call.update(change)
    return lambda: kernels.fused_adamw_(**call)


def _adamw_lists(**change):
    """Three (8,)-element tensors per operand, with `change`."""
    call = dict(param=[torch.zeros(8) for _ in range(3)], grad=[torch.zeros(8)] * 3, exp_avg=[torch.zeros(8)] * 3, exp_avg_sq=[torch.zeros(8)] * 3,
                step=1, lr=1e-3)
    call.update(change)
    return lambda: kernels.fused_adamw_(**call)


BAD_INPUTS = {
    "non-contiguous param": (_adamw(param=torch.zeros(16)[::2]), r"param must be a contiguous tensor.*\.contiguous\(\)"),
    "bf16 param": (_adamw(param=torch.zeros(8, dtype=torch.bfloat16)), r"param has dtype torch.bfloat16; it must be float32"),
    "int grad": (_adamw(grad=torch.zeros(8, dtype=torch.int32)), r"grad has dtype torch.int32.*cast it"),
    "short grad": (_adamw(grad=torch.zeros(7)), r"grad has 7 elements but param has 8"),
    "grad on meta": (_adamw(grad=torch.zeros(8, device="meta")), r"grad is on meta but param is on cpu"),
    "fp32 out_lowp": (_adamw(out_lowp=torch.zeros(8)), r"out_lowp has dtype torch.float32; it must be bfloat16 or float16"),
    "found_inf of shape (1,)": (_adamw(found_inf=torch.zeros(1)), r"found_inf must be a 0-dim float32 tensor"),
    "fp16 grad_scale": (_adamw(grad_scale=torch.ones((), dtype=torch.float16)), r"grad_scale must be a 0-dim float32"),
    "step 0": (_adamw(step=0), r"step must be an int >= 1"),
    "tensor lr": (_adamw(lr=torch.tensor(1e-3)), r"lr must be a Python number.*float\(lr\)"),
    "beta2 = 1": (_adamw(beta2=1.0), r"beta2=1.0 must be in \[0, 1\)"),
    "tensor param, list grad": (_adamw(grad=[torch.zeros(8)]), r"param is a tensor but grad is a list; pass one tensor for each"),
    "3 params, 2 grads": (_adamw_lists(grad=[torch.zeros(8)] * 2), r"3 params but 2 in grad; pass one grad per param"),
    "numel mismatch in lists": (_adamw_lists(exp_avg=[torch.zeros(8), torch.zeros(7), torch.zeros(8)]),
                                r"exp_avg\[1\] has 7 elements but param\[1\] has 8"),
    "mixed grad dtypes": (_adamw_lists(grad=[torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8)]),
                          r"grad\[1\] has dtype torch.bfloat16 but grad\[0\] has torch.float32; one call takes one grad dtype"),
    "mixed out_lowp dtypes": (_adamw_lists(out_lowp=[torch.zeros(8, dtype=torch.bfloat16)] * 2 + [torch.zeros(8, dtype=torch.float16)]),
                              r"out_lowp\[2\] has dtype torch.float16 but out_lowp\[0\] has torch.bfloat16"),
    "params on two devices": (_adamw_lists(param=[torch.zeros(8), torch.zeros(8, device="meta"), torch.zeros(8)]),
                              r"param\[1\] is on meta but param\[0\] is on cpu; call once per device"),
    "fp16 state in lists": (_adamw_lists(exp_avg_sq=[torch.zeros(8)] * 2 + [torch.zeros(8, dtype=torch.float16)]),
                            r"exp_avg_sq\[2\] has dtype torch.float16; it must be float32"),
    "sgd lists without buffers": (
        lambda: kernels.fused_sgd_([torch.zeros(4)], [torch.zeros(4)], [None], lr=0.1, momentum=0.9), r"momentum_buffer\[0\] must be a torch.Tensor"),
    "sgd momentum without buffer": (
        lambda: kernels.fused_sgd_(torch.zeros(4), torch.zeros(4), lr=0.1, momentum=0.9), r"needs momentum_buffer"),
    "sgd nesterov without momentum": (
        lambda: kernels.fused_sgd_(torch.zeros(4), torch.zeros(4), lr=0.1, nesterov=True), r"nesterov=True needs momentum > 0"),
    "unscale int grads": (
        lambda: kernels.unscale_and_check_([torch.zeros(4, dtype=torch.int64)], torch.ones(())), r"grads\[0\] has dtype torch.int64"),
    "unscale float scale": (
        lambda: kernels.unscale_and_check_([torch.zeros(4)], 2.0), r"scale must be a 0-dim float32 tensor"),
    "copy_in past the end": (
        lambda: kernels.copy_in(torch.zeros(10), [torch.zeros(4)], [7]), r"does not fit in flat \(10 elements\)"),
    "copy_in overlapping slots": (
        lambda: kernels.copy_in(torch.zeros(10), [torch.zeros(4), torch.zeros(4)], [0, 3]), r"srcs\[0\] and srcs\[1\] overlap"),
    "copy_in offsets count": (
        lambda: kernels.copy_in(torch.zeros(10), [torch.zeros(4)], [0, 4]), r"1 srcs but 2 offsets"),
    "copy_out non-contiguous dst": (
        lambda: kernels.copy_out(torch.zeros(10), [torch.zeros(4, 2).t()], [0]), r"dsts\[0\] must be a contiguous tensor"),
    "copy_out int flat": (
        lambda: kernels.copy_out(torch.zeros(10, dtype=torch.int32), [torch.zeros(4)], [0]), r"flat has dtype torch.int32"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_value_errors_that_name_the_fix(case):
    call, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        call()


# -- compiled for GPUs, without one --

def _ast_source():
    """triton's ASTSource when it takes `constexprs` and the NVIDIA backend (with ptxas) is there."""
    try:
        import inspect

        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return None
    if importlib.util.find_spec("triton.backends.nvidia.compiler") is None or "constexprs" not in inspect.signature(ASTSource).parameters:
        return None
    return ASTSource, GPUTarget


def _launch_signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """The signature and constexprs Triton would specialize this launch to (ints equal to 1
    become constexprs unless the kernel says not to specialize them)."""
    import inspect

    names = list(inspect.signature(kernel.fn).parameters)
    bound = {**dict(zip(names, args)), **kwargs}
    keep = {names[i] if isinstance(i, int) else i for i in (getattr(kernel, "do_not_specialize", None) or ())}
    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64"}
    signature, constexprs = {}, {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        value = bound[name]
        if "constexpr" in str(param.annotation) or (type(value) is int and value == 1 and name not in keep):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + types[value.dtype]
        else:
            signature[name] = {int: "i32" if -(2**31) <= value < 2**31 else "i64", float: "fp32"}[type(value)]
    return signature, constexprs


def _cpu(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype)


LAUNCHES = {  # module, kernel, launches covering every constexpr flag and both specializations of ints
    "adamw": (adamw, "adamw_kernel", lambda: [
        adamw.adamw_([_cpu(1)], [_cpu(1)], [_cpu(1)], [_cpu(1)], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
        adamw.adamw_([_cpu(99), _cpu(5)], [_cpu(99, torch.bfloat16), _cpu(5, torch.bfloat16)], [_cpu(99), _cpu(5)], [_cpu(99), _cpu(5)],
                     step=torch.ones(()), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, grad_scale=torch.ones(()),
                     found_inf=torch.zeros(()), out_lowp=[_cpu(99, torch.float16), _cpu(5, torch.float16)]),
    ]),
    "sgd": (sgd, "sgd_kernel", lambda: [
        sgd.sgd_([_cpu(99)], [_cpu(99)], None, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0),
        sgd.sgd_([_cpu(99), _cpu(3)], [_cpu(99, torch.float16), _cpu(3, torch.float16)], [_cpu(99), _cpu(3)], lr=0.1, momentum=0.9,
                 nesterov=True, weight_decay=0.1, grad_scale=torch.ones(()), found_inf=torch.zeros(()),
                 out_lowp=[_cpu(99, torch.bfloat16), _cpu(3, torch.bfloat16)]),
    ]),
    "lion": (lion, "lion_kernel", lambda: [
        lion.lion_([_cpu(99), _cpu(7)], [_cpu(99, torch.bfloat16), _cpu(7, torch.bfloat16)], [_cpu(99), _cpu(7)], lr=0.1, beta1=0.9,
                   beta2=0.99, weight_decay=0.1, grad_scale=torch.ones(()), found_inf=torch.zeros(()),
                   out_lowp=[_cpu(99, torch.bfloat16), _cpu(7, torch.bfloat16)]),
    ]),
    "unscale": (unscale, "unscale_kernel", lambda: [
        unscale.unscale_and_check_([_cpu(5)], torch.ones(())),
        unscale.unscale_and_check_([_cpu(5, torch.float16), _cpu(7, torch.float16), _cpu(9, torch.float16)], torch.ones(())),
    ]),
    "copy_in": (flat_copy, "copy_in_kernel", lambda: [flat_copy.copy_in(_cpu(20, torch.bfloat16), [_cpu(3), _cpu(4)], [0, 5], 0.5)]),
    "copy_out": (flat_copy, "copy_out_kernel", lambda: [flat_copy.copy_out(_cpu(20), [_cpu(3, torch.float16), _cpu(4, torch.float16)], [0, 5])]),
}


@needs_triton
@pytest.mark.skipif(_ast_source() is None, reason="needs triton's NVIDIA backend and ASTSource(constexprs=...)")
@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_kernels_compile_for_hopper_and_ampere_without_a_gpu(name, monkeypatch):
    """The interpreter runs kernels as Python; this compiles them, through their launchers'
    real arguments, to cubins for sm_90 and sm_80 (the code paths only a GPU would see)."""
    import triton

    ASTSource, GPUTarget = _ast_source()
    module, kernel_name, launch = LAUNCHES[name]
    kernel, launches = getattr(module, kernel_name), []
    monkeypatch.setattr(module, kernel_name, mock.MagicMock(**{"__getitem__.return_value": lambda *a, **kw: launches.append((a, kw))}))
    launch()
    assert launches
    for args, kwargs in launches:
        signature, constexprs = _launch_signature(kernel, args, kwargs)
        for arch in (90, 80):
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": True})
            assert compiled.asm.get("cubin")


# -- compiled kernels on CUDA --

def _cuda(call: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else [x.cuda() for x in v] if isinstance(v, list) else v for k, v in call.items()}


@pytest.mark.gpu
@needs_cuda
@settings(max_examples=30, deadline=None)
@given(case=optimizer_calls())
def test_fused_optimizer_kernels_match_references_on_cuda(case):
    name, call = case
    call = _cuda(call)
    got = _clone(call)
    PUBLIC[name](**got)
    # compiled kernels round to nearest even, as torch does: out_lowp is compared bitwise
    assert_step_matches(got, reference_step(name, call), call, lambda x, y: torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", [[(2**20 + 3,)], [(7, 129), (1025,), (0,), (3, 5, 11), (4096, 3)] * 40], ids=["one-shard", "200-tensors"])
def test_fused_adamw_tracks_torch_fused_adamw_on_cuda_and_never_syncs(grad_dtype, shapes):
    g = torch.Generator(device="cuda").manual_seed(0)
    torch_params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in shapes]
    opt = torch.optim.AdamW(torch_params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    params = [p.detach().clone() for p in torch_params]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    lowps, count = [torch.empty_like(p, dtype=torch.bfloat16) for p in params], torch.zeros((), device="cuda")
    given = (lambda xs: xs) if len(shapes) > 1 else (lambda xs: xs[0])  # one shard: bare tensors
    for _ in range(5):
        grads = [torch.randn(s, device="cuda", generator=g).to(grad_dtype) for s in shapes]
        for p, grad in zip(torch_params, grads):
            p.grad = grad.float()
        opt.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            kernels.fused_adamw_(given(params), given(grads), given(exp_avgs), given(exp_avg_sqs), step=count.add_(1), lr=1e-3,
                                 beta2=0.95, weight_decay=0.1, out_lowp=given(lowps))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for p, torch_param, m, lowp in zip(params, torch_params, exp_avgs, lowps):
        torch.testing.assert_close(p, torch_param.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m, opt.state[torch_param]["exp_avg"])
        assert torch.equal(lowp, p.bfloat16())


@pytest.mark.gpu
@needs_cuda
def test_unscale_and_copies_on_cuda_are_exact_and_never_sync():
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [1, 1023, 1025, 5000, 2**17 + 1]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    srcs = [torch.randn(n, device="cuda", generator=g).to(dt) for n, dt in zip(sizes, dtypes)]
    offsets = [sum(sizes[:i]) + 3 * i for i in range(len(sizes))]
    flat, want = (torch.zeros(offsets[-1] + sizes[-1], device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grads, want_grads = [x * 1024 for x in srcs], [x * 1024 for x in srcs]
    grads[2][5] = float("inf")
    want_grads[2][5] = float("inf")
    scale = torch.tensor(1024.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.copy_in(flat, srcs, offsets, scale=0.5)
        found = kernels.unscale_and_check_(grads, scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    flat_copy.reference_copy_in(want, srcs, offsets, 0.5)
    want_found = unscale.reference_unscale_and_check_(want_grads, scale)
    assert torch.equal(flat, want)
    assert all(torch.equal(x, y) for x, y in zip(grads, want_grads))
    assert found.item() == want_found.item() == 1.0
    dsts = [torch.empty_like(x, dtype=torch.float16) for x in srcs]
    kernels.copy_out(flat, dsts, offsets)
    assert all(torch.equal(d, flat[o : o + d.numel()].half()) for d, o in zip(dsts, offsets))


@needs_triton
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), per=st.sampled_from([1, 3, 32, 256]), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_sign_packing_kernels_match_references(interpreted, n, per, dtype, seed):
    """Signs 32 to an int32 with the block's scale and the error update fused, on odd
    sizes and blocks (and exact zeros, whose sign is +)."""
    from sharded.kernels import onebit

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=dtype)
    x[:: 5] = 0.0
    scales = torch.rand(-(-n // per), generator=g, dtype=dtype)
    scale = scales.repeat_interleave(per)[:n]
    want_error = torch.empty_like(x)
    want_words = onebit.reference_pack_signs_(x, scales, want_error, per)
    got, words = interpreted("pack_signs_", x=x, scales=scales, error=torch.empty_like(x), per=per)
    assert torch.equal(words, want_words) and words.dtype == torch.int32 and words.numel() == -(-n // 32)
    assert_kernel_result(got["error"], want_error)
    out = torch.randn(n, generator=g, dtype=dtype)
    want_out = onebit.reference_unpack_signs_(want_words, scales, out.clone(), per, True)
    got, _ = interpreted("unpack_signs_", words=words, scales=scales, out=out, per=per, accumulate=True)
    assert_kernel_result(got["out"], want_out)
    torch.testing.assert_close(want_out - out, torch.where(x >= 0, scale, -scale))  # the unpacked signs are x's
