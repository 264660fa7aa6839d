"""What every kernel in this package shares: the optional Triton import, input checks,
the in-kernel helpers for optional operands, and their torch reference counterparts.

[Note: optional operands] A kernel takes each optional tensor (grad_scale, found_inf,
out_lowp) as a pointer plus a constexpr flag. An absent tensor is passed as a
placeholder that the kernel never touches, so every combination compiles once and a
switched-off operand costs nothing. found_inf is read on the device: when it is nonzero
every lane is masked off, so nothing is read or written and no host sync is needed.
"""
from __future__ import annotations

from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs (triton is Linux x86_64 only): references only
    triton = tl = None

__all__ = [
    "BLOCK",
    "FLOAT_DTYPES",
    "LOWP_DTYPES",
    "HAVE_TRITON",
    "INTERPRETED",
    "jit",
    "uses_triton",
    "check_flat",
    "check_scalar",
    "optimizer_operands",
    "skip_if_found_inf",
    "load_grad",
    "store_lowp",
    "reference_grad",
    "reference_commit_",
]

BLOCK = 1024  # elements per program: the vector-add tutorial's size, ~peak bandwidth
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOWP_DTYPES = (torch.bfloat16, torch.float16)
HAVE_TRITON = triton is not None


def jit(fn=None, **options):
    """`triton.jit`, or the undecorated function where triton is missing (never launched)."""
    if not HAVE_TRITON:
        return fn if fn is not None else (lambda f: f)
    return triton.jit(fn, **options) if fn is not None else triton.jit(**options)


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the kernels run for tensors on t's device: CUDA tensors with triton, or CPU
    tensors when this process imported the kernels under TRITON_INTERPRET=1."""
    if not HAVE_TRITON:
        return False
    return t.device.type == "cpu" if INTERPRETED else t.device.type == "cuda"


# -- checks (the public functions call these; launchers and references assume them) --

def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_flat(
    fn: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype], like: torch.Tensor | None = None, flat: bool = True, like_name: str = "param"
) -> None:
    """ValueError unless `t` is a contiguous tensor (1-D when `flat`) of one of `dtypes`,
    with `like`'s numel and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if (flat and t.dim() != 1) or not t.is_contiguous():
        what = "a flat (1-D, contiguous)" if flat else "a contiguous"
        raise ValueError(
            f"{fn}: {name} must be {what} tensor, got shape {tuple(t.shape)} with strides {t.stride()}; "
            f"pass {name}.contiguous(){'.view(-1)' if flat else ''}"
        )
    if t.dtype not in dtypes:
        raise ValueError(f"{fn}: {name} has dtype {t.dtype}; it must be {_dtype_names(dtypes)}: cast it with .to(...)")
    if like is not None and t.numel() != like.numel():
        raise ValueError(f"{fn}: {name} has {t.numel()} elements but {like_name} has {like.numel()}; pass the tensor that matches {like_name}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {like_name} is on {like.device}; move it with .to({str(like.device)!r})")


def check_scalar(fn: str, name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    """ValueError unless `t` is a 0-dim float32 tensor (on `device`, when given): a value
    the kernels read on the device, never on the host."""
    if not isinstance(t, torch.Tensor) or t.dim() != 0 or t.dtype != torch.float32 or t.device != (device or t.device):
        got = f"shape {tuple(t.shape)}, {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        where = device or getattr(t, "device", torch.device("cpu"))
        raise ValueError(
            f"{fn}: {name} must be a 0-dim float32 tensor{f' on {device}' if device else ''}, got {got}; "
            f"e.g. torch.zeros((), dtype=torch.float32, device={str(where)!r})"
        )


def optimizer_operands(fn: str, param, grad, states: dict, grad_scale, found_inf, out_lowp) -> dict[str, list | None]:
    """The checks every fused optimizer makes, and its tensor operands as lists (keyed
    param, grad, the states' names, out_lowp; out_lowp None when not given).

    Each of param, grad, the states and out_lowp is one tensor, or each is a sequence of
    tensors, all of one length. The i-th tensors are alike in numel, and all are
    contiguous (any shape) and on one device; param and states are fp32, the grads of
    one float dtype, the out_lowps all bf16 or all fp16; grad_scale and found_inf are
    0-dim fp32 on that device."""
    given = {"param": param, "grad": grad, **states, **({} if out_lowp is None else {"out_lowp": out_lowp})}
    one = isinstance(param, torch.Tensor)
    lists = {}
    for name, value in given.items():
        if isinstance(value, torch.Tensor) != one or not (one or isinstance(value, Sequence)):
            raise ValueError(
                f"{fn}: param is {_form(param)} but {name} is {_form(value)}; pass one tensor for each operand "
                "(one shard) or a sequence of tensors for each, all of one length (many tensors, one launch)"
            )
        lists[name] = [value] if one else list(value)
        if len(lists[name]) != len(lists["param"]):
            raise ValueError(f"{fn}: {len(lists['param'])} params but {len(lists[name])} in {name}; pass one {name} per param")
    params = lists.pop("param")
    _check_tensors(fn, "param", params, (torch.float32,), one)
    devices = {p.device for p in params}
    if len(devices) > 1:
        i = next(i for i, p in enumerate(params) if p.device != params[0].device)
        raise ValueError(f"{fn}: param[{i}] is on {params[i].device} but param[0] is on {params[0].device}; call once per device")
    numels = [p.numel() for p in params]
    for name, xs in lists.items():
        if len(_check_tensors(fn, name, xs, _DTYPES.get(name, (torch.float32,)), one, params, numels, devices)) > 1:
            i = next(i for i, x in enumerate(xs) if x.dtype != xs[0].dtype)
            raise ValueError(
                f"{fn}: {name}[{i}] has dtype {xs[i].dtype} but {name}[0] has {xs[0].dtype}; one call takes one {name} dtype: "
                "cast them, or call once per dtype"
            )
    for name, flag in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if flag is not None:
            check_scalar(fn, name, flag, params[0].device if params else None)
    return {"param": params, **lists, "out_lowp": lists.get("out_lowp")}


def _check_tensors(fn: str, name: str, xs: list, dtypes, one: bool, params=None, numels=None, devices=None) -> set:
    """check_flat(flat=False) on each of xs, like params' tensor at its index (when
    given) in numel and device; returns the dtypes of xs. The fast path looks at whole
    lists (hundreds of tensors a step); the slow one names what is wrong."""
    if all(isinstance(x, torch.Tensor) for x in xs) and all(x.is_contiguous() for x in xs):
        found = {x.dtype for x in xs}
        if found.issubset(dtypes) and (params is None or ([x.numel() for x in xs] == numels and {x.device for x in xs} <= devices)):
            return found
    for i, x in enumerate(xs):
        like = None if params is None else params[i]
        check_flat(fn, name if one else f"{name}[{i}]", x, dtypes, like, flat=False, like_name="param" if one else f"param[{i}]")
    return {x.dtype for x in xs}


_DTYPES = {"grad": FLOAT_DTYPES, "out_lowp": LOWP_DTYPES}  # param and the states: float32


def _form(x) -> str:
    return "a tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


# -- in-kernel helpers (see [Note: optional operands]) --

@jit
def skip_if_found_inf(mask, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """`mask` with every lane off when *found_inf != 0."""
    if HAS_FOUND_INF:
        mask = tl.where(tl.load(found_inf_ptr) == 0, mask, False)  # (`&` with a scalar breaks the interpreter)
    return mask


@jit
def load_grad(grad_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """The grad in float32, divided by *grad_scale when there is one."""
    g = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr))
    return g


@jit
def store_lowp(lowp_ptr, offs, p, mask, HAS_LOWP: tl.constexpr):
    """The low-precision copy of the updated param, in the same pass."""
    if HAS_LOWP:
        tl.store(lowp_ptr + offs, p.to(lowp_ptr.dtype.element_ty), mask=mask)


# The interpreter replaces every jit function by an InterpretedFunction at decoration time.
INTERPRETED = HAVE_TRITON and type(load_grad).__name__ == "InterpretedFunction"


# -- the same operands in torch, for the references --

def reference_grad(grad: torch.Tensor, grad_scale: torch.Tensor | None) -> torch.Tensor:
    g = grad.float()
    return g if grad_scale is None else g / grad_scale


def reference_commit_(found_inf: torch.Tensor | None, updates, out_lowp: torch.Tensor | None = None) -> None:
    """Write each `(dst, new)` pair, and the low-precision copy of the first `new`, unless
    found_inf != 0; the flag stays on the device."""
    skip = None if found_inf is None else found_inf != 0
    if out_lowp is not None:
        updates = [*updates, (out_lowp, updates[0][1].to(out_lowp.dtype))]
    for dst, new in updates:
        dst.copy_(new if skip is None else torch.where(skip, dst, new))
