"""`mixed_precision(compute="bf16"|"fp16", ...)`: low-precision compute, fp32 master weights.

Reference semantics: the plain step with every forward run under
`torch.autocast(compute)` on params cast to `param_dtype` (those the policy keeps are
left in fp32); the state (params, optimizer) stays in its own precision, so the
update applies full-precision grads to fp32 masters.

With `autocast=False` the forward is the model's own code on every floating param cast
to `param_dtype` (the policy keeps none by default), with no autocast: FSDP2's
MixedPrecisionPolicy and DeepSpeed's bf16 mode. It is the faster and leaner recipe
when the whole model runs in one low precision: autocast runs norms and softmaxes in
fp32, casting their inputs and outputs and saving fp32 activations (decision 41).

For fp16, dynamic loss scaling as DeepSpeed does it: the loss is multiplied by the
scale before backward; at the update the grads are unscaled and checked, once,
across every rank that holds a part of them. A step with an inf or nan is skipped
(params and optimizer state untouched) and the scale backs off (after `hysteresis`
overflows in a row, never below `min_scale`); after `growth_interval` clean steps it
grows. The scale, the clean-step count and the skipped-step count live in
`state.extra["loss_scale"]` (so in checkpoints) and are reported in the metrics.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from sharded import comm, kernels, primitives
from sharded import tree as T
from sharded.grad import grad_pass
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform

__all__ = ["mixed_precision"]

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


_AUTOCAST = (torch.bfloat16, torch.float16)  # the dtypes autocast lowers ops to


def _dtype(value: Any, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"mixed_precision({what}={value!r}): unknown dtype; use one of {', '.join(sorted(_DTYPES))} or a torch.dtype")


def _keep_norms_and_biases(name: str, param: torch.Tensor) -> bool:
    """The default policy: 1-D params (norm scales, biases) stay fp32."""
    return param.ndim <= 1


def _keep_nothing(name: str, param: torch.Tensor) -> bool:
    """The policy without autocast: every floating param in param_dtype (ops need one dtype)."""
    return False


def _supports(dtype: torch.dtype, device: torch.device) -> bool:
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        return bool(torch.isfinite(x @ x).all())
    except RuntimeError:
        return False


class MixedPrecision(Transform):
    name = "mixed_precision"
    level = Level.PRECISION

    def __init__(
        self,
        compute: Any = "bf16",
        param_dtype: Any = None,
        keep_fp32: Callable[[str, torch.Tensor], bool] | None = None,
        loss_scale: bool | None = None,
        init_scale: float = 2.0**16,
        growth_interval: int = 1000,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        min_scale: float = 1.0,
        hysteresis: int = 2,
        autocast: bool = True,
    ):
        if not isinstance(autocast, bool):
            raise ValueError(f"mixed_precision(autocast=...) must be True (torch.autocast around the forward) or False (params cast, no autocast); got {autocast!r}")
        self.compute = _dtype(compute, "compute")
        self.param_dtype = _dtype(param_dtype, "param_dtype") if param_dtype is not None else self.compute
        self.autocast = autocast
        self.keep_fp32 = keep_fp32 or (_keep_norms_and_biases if autocast else _keep_nothing)
        self.user_policy = keep_fp32 is not None
        self.scaling = self.compute == torch.float16 if loss_scale is None else bool(loss_scale)
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and min_scale > 0 and growth_interval > 0 and hysteresis > 0):
            raise ValueError("mixed_precision: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, min_scale > 0, growth_interval > 0, hysteresis > 0")
        self.init_scale, self.growth_interval, self.growth_factor = init_scale, growth_interval, growth_factor
        self.backoff_factor, self.min_scale, self.hysteresis = backoff_factor, min_scale, hysteresis
        self.capabilities = Capability.CASTS_PARAMS
        self.handlers = {"apply": self._apply, "block": self._block}
        if self.scaling:
            self.capabilities |= Capability.OWNS_UPDATE | Capability.SCALES_LOSS | Capability.REWRITES_GRADS
            self.handlers.update(value_and_grad=self._value_and_grad, update=self._update)
        self._cast: dict[str, bool] | None = None
        self.cast_at_use = False  # under ZeRO-3: see check()
        self.cast_by_runner = False  # when the model runs whole, its runner casts (param_cast): see require()
        self._skipped = False  # whether the last update skipped its step

    def check(self, stack: Any) -> None:
        """Under a transform that shards the params (ZeRO-3) a block's params exist only
        while it runs: that transform gathers them in `param_dtype`, and autocast casts
        the rest at use, not up front."""
        self.cast_at_use = any(Capability.SHARDS_PARAMS in t.capabilities for t in stack)
        if self.cast_at_use and self.user_policy:
            applies = "applies to non-matmul ops only" if self.autocast else "is ignored (no autocast: every param runs in param_dtype)"
            warnings.warn(f"mixed_precision with sharded params (ZeRO-3): its params are gathered in param_dtype, so keep_fp32 {applies}", stacklevel=3)

    def require(self, stack: Any) -> None:
        """A transform that runs the model as one function (compile's whole-model graph)
        binds no block; it casts every param with `param_cast`, inside its graph, where
        the casts and their grads' casts back cost no eager launches."""
        self.cast_by_runner = any(Capability.RUNS_MODEL_WHOLE in t.capabilities for t in stack)

    def param_cast(self, params: Any) -> Callable[[dict], dict] | None:
        if self.cast_at_use:  # the gathers cast (ZeRO-3)
            return None
        self._casts(params)  # what to cast, decided here, outside any graph
        return self._cast_params

    def describe(self) -> str:
        scaling = ", dynamic loss scale" if self.scaling else ""
        plain = "" if self.autocast else ", no autocast"
        return f"mixed_precision({str(self.compute).removeprefix('torch.')}{scaling}{plain})"

    def init(self, state: Any) -> Any:
        device = T.leaves(state.params)[0].device
        if not _supports(self.compute, device):
            raise ValueError(f"mixed_precision: {self.compute} is not supported on {device}; use compute='bf16' or 'fp32'")
        if not self.scaling:
            return state
        scale = {
            "scale": torch.tensor(self.init_scale, dtype=torch.float32, device=device),
            "clean_steps": torch.zeros((), dtype=torch.int64),
            "overflows_in_a_row": torch.zeros((), dtype=torch.int64),
            "skipped_steps": torch.zeros((), dtype=torch.int64),
        }
        return state.replace(extra={**state.extra, "loss_scale": scale})

    def grad_scale(self, state: Any) -> float | torch.Tensor:
        return state.extra["loss_scale"]["scale"] if self.scaling else 1.0

    def metrics(self, state: Any) -> dict:
        if not self.scaling:
            return {}
        ls = state.extra["loss_scale"]
        return {"loss_scale": ls["scale"].clone(), "skipped_steps": ls["skipped_steps"].clone()}

    def _casts(self, params: dict) -> dict[str, bool]:
        """{name: cast to param_dtype?}, decided once from the first (whole) params;
        warns when a user policy keeps nothing."""
        if self._cast is None:
            self._cast = {k: p.is_floating_point() and not self.keep_fp32(k, p) for k, p in params.items()}
            if self.user_policy and all(self._cast.values()):
                name = getattr(self.keep_fp32, "__name__", repr(self.keep_fp32))
                warnings.warn(f"mixed_precision(keep_fp32={name}) matched no param: every param is cast to {self.param_dtype}", stacklevel=2)
        return self._cast

    def _cast_params(self, params: dict, skip: frozenset = frozenset()) -> dict:
        """`params` with those the policy casts in `param_dtype` (names in `skip` as they are)."""
        casts = self._casts(params)
        return {k: (p.to(self.param_dtype) if k not in skip and casts.get(k, False) else p) for k, p in params.items()}

    def _apply(self, next_: Callable, model: Any, params: dict, args: tuple, kwargs: dict) -> Any:
        # The blocks' params are cast by the block handler, as each block runs: under
        # remat the casts are then recomputed in backward rather than kept.
        if not self.cast_at_use and not self.cast_by_runner:
            params = self._cast_params(params, skip=model.block_params)
        if not self.autocast or self.compute not in _AUTOCAST:  # the params' cast is all there is
            return next_(model, params, args, kwargs)
        # The compute device (a pipeline hands other stages' params over as meta placeholders).
        device = next((p.device.type for p in params.values() if p.device.type != "meta"), "cpu")
        with torch.autocast(device, dtype=self.compute):
            return next_(model, params, args, kwargs)

    def _block(self, next_: Callable, call: Any, params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
        if not self.cast_at_use:
            params = self._cast_params(params)
        return next_(call, params, buffers, args, kwargs)

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        scale = primitives.step_state().extra["loss_scale"]["scale"]
        with grad_pass(params) as (gp, owner):
            outer = gp.loss_scale
            gp.loss_scale = outer * scale
            try:
                value, _ = next_(fn, has_aux, params, args, kwargs)
            finally:
                gp.loss_scale = outer
            return value, (gp.grads() if owner else None)

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        ls = primitives.step_state().extra["loss_scale"]
        # The grads are this step's own: unscaled in place, with the inf/nan flag, in one
        # fused pass (sharded.kernels; the torch reference off GPU).
        found = kernels.unscale_and_check_(T.leaves(grads), ls["scale"])
        for group in T.reduction_groups():  # grads are parts (ZeRO, pipeline): every holder must agree
            comm.all_reduce(found, group=group, op="max")
        overflow = self._skipped = bool(found.item())
        self._rescale(ls, overflow)
        if overflow:
            return params, opt_state
        return next_(tx, grads, opt_state, params)

    def skipped_update(self) -> bool:
        return self._skipped

    def _rescale(self, ls: dict, overflow: bool) -> None:
        """DeepSpeed's dynamic loss scale, updated in place (the state is donated)."""
        if overflow:
            ls["skipped_steps"] += 1
            ls["clean_steps"].zero_()
            ls["overflows_in_a_row"] += 1
            if ls["overflows_in_a_row"].item() >= self.hysteresis:
                ls["scale"].mul_(self.backoff_factor).clamp_(min=self.min_scale)
                ls["overflows_in_a_row"].zero_()
            return
        ls["overflows_in_a_row"].zero_()
        ls["clean_steps"] += 1
        if ls["clean_steps"].item() >= self.growth_interval:
            ls["scale"].mul_(self.growth_factor)
            ls["clean_steps"].zero_()

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        out = []
        for op in program:
            if op.name == "forward":
                how = f"autocast {str(self.compute).removeprefix('torch.')}, " if self.autocast else ""
                op = Op("compute", "forward", f"{op.detail}, {how}params cast to {str(self.param_dtype).removeprefix('torch.')}")
            if op.name == "update" and self.scaling:
                out.append(Op("compute", "unscale grads; check inf/nan", "skip the update and back the scale off on overflow"))
            out.append(op if not op.body else Op(op.kind, op.name, op.detail, op.nbytes, op.overlaps, tuple(self.explain(list(op.body), info))))
        return out


mixed_precision = transform(MixedPrecision)
