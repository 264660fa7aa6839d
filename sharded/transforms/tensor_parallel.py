"""`tensor_parallel(plan=None, sequence_parallel=True, loss_parallel=False)`: Megatron's
tensor parallelism (and its sequence parallelism) over the mesh's tp axis.

Reference semantics: the plain step, exactly (up to the order of float additions).

    sharded.distributed.init()
    sharded.Mesh.set_current(sharded.Mesh(tp=2))   # torchrun --nproc-per-node 2
    step = sharded.tensor_parallel()(train_step)

Each tp rank holds a slice of every weight the plan names, and computes with it:

  colwise      Linear: weight and bias split over output features (dim 0). Its input
               is whole on every rank; in backward that input's grad is summed over
               the tp ranks (each rank's is the part from its own output features).
  colwise_qkv  the same for a Linear whose outputs are q, k and v stacked (GPT's fused
               qkv): each third split, so a rank's slice is its heads of q, k and v.
  rowwise      Linear: weight split over input features (dim 1), its input the slice a
               colwise layer left; the output is summed over the tp ranks, then the
               bias (whole on every rank) added once.
  vocab_embedding  Embedding: rows (the vocabulary) split; a rank looks up the ids in
               its rows, zeros for the rest, and the lookups are summed over tp.
  vocab_head   Linear head: rows (the vocabulary) split, as colwise; the logits are
               all-gathered, so the loss sees the whole vocabulary (every rank
               computes the same loss), unless loss_parallel (below).

So attention runs on each rank's heads and the MLP on its slice of the hidden
features, with one all-reduce of activations after each in forward and one in
backward, as Megatron-LM's. Every other param (norms, position embeddings) is whole on
every rank, and its grads are equal there.

A plan maps module paths (fnmatch patterns) to a style, as data. `plan=None` finds the
built-in one for the traced model: `sharded.models.GPT`, Hugging Face's GPT-2 (its
Conv1D layers store weights [in, out]; its attention's `split_size` is divided by tp
while the model runs) and its Llama family (Llama, Mistral, Qwen2: q/k/v/o,
gate/up/down, embed_tokens, lm_head).

[Note: where tensor parallelism acts] It is a property of modules, not of blocks: its
`apply` handler gives each planned module a forward of its style for the duration of
the model's forward, and its `block` handler does the same for a block's modules
whenever the block runs (a remat recompute in backward too), inside every other
transform's block work. The traced model's params are this rank's slices between
steps; `state.placements` records each as a cut over tp along its dim.

Under `pipeline`, each stage's tp ranks hold the slices of that stage's params (3D
parallelism with dp): the stage's init cuts the params first, and this one finds
their model through `trace.model_laid_out`.

With sequence_parallel=True the norms, residual adds and dropout inside the blocks
run on 1/tp of the tokens each ([Note: sequence parallelism]).

With loss_parallel=True the head's logits stay sharded over the vocabulary, a DTensor,
inside the step's value_and_grad, which runs under torch's `loss_parallel()`:
`F.cross_entropy` on them (ours, Hugging Face's own loss) never gathers the whole
vocabulary. Outside it (an eval), the logits are gathered as usual.

Not built yet (issue 16): torch.func over the model (refused by name).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import fnmatch
import functools
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sharded import comm
from sharded import tree as T
from sharded.mesh import Mesh
from sharded.placement import Cut, Placement, state_leaves
from sharded.sharding import dim_slice, gather_slices, map_chunked
from sharded.step import Capability, Level, Op, ProgramInfo, Transform, transform

__all__ = ["tensor_parallel", "Style", "BuiltIn", "plan_for", "sliced_params"]


class Style(enum.Enum):
    COLWISE = "colwise"
    COLWISE_QKV = "colwise_qkv"
    ROWWISE = "rowwise"
    VOCAB_EMBEDDING = "vocab_embedding"
    VOCAB_HEAD = "vocab_head"


# {param name in its module: (dim, blocks)} per style; a param a style does not name is whole
_CUTS = {
    Style.COLWISE: {"weight": (0, 1), "bias": (0, 1)},
    Style.COLWISE_QKV: {"weight": (0, 3), "bias": (0, 3)},
    Style.ROWWISE: {"weight": (1, 1)},
    Style.VOCAB_EMBEDDING: {"weight": (0, 1)},
    Style.VOCAB_HEAD: {"weight": (0, 1), "bias": (0, 1)},
}

GPT_PLAN = {
    "wte": Style.VOCAB_EMBEDDING, "head": Style.VOCAB_HEAD,
    "blocks.*.attn.qkv": Style.COLWISE_QKV, "blocks.*.attn.proj": Style.ROWWISE,
    "blocks.*.mlp.fc": Style.COLWISE, "blocks.*.mlp.proj": Style.ROWWISE,
}
LLAMA_PLAN = {
    "model.embed_tokens": Style.VOCAB_EMBEDDING, "lm_head": Style.VOCAB_HEAD,
    "model.layers.*.self_attn.q_proj": Style.COLWISE, "model.layers.*.self_attn.k_proj": Style.COLWISE,
    "model.layers.*.self_attn.v_proj": Style.COLWISE, "model.layers.*.self_attn.o_proj": Style.ROWWISE,
    "model.layers.*.mlp.gate_proj": Style.COLWISE, "model.layers.*.mlp.up_proj": Style.COLWISE,
    "model.layers.*.mlp.down_proj": Style.ROWWISE,
}


GPT2_PLAN = {  # Hugging Face GPT-2: Conv1D layers (weights stored [in, out]), q, k, v fused in c_attn
    "transformer.wte": Style.VOCAB_EMBEDDING, "lm_head": Style.VOCAB_HEAD,
    "transformer.h.*.attn.c_attn": Style.COLWISE_QKV, "transformer.h.*.attn.c_proj": Style.ROWWISE,
    "transformer.h.*.mlp.c_fc": Style.COLWISE, "transformer.h.*.mlp.c_proj": Style.ROWWISE,
}


class BuiltIn(NamedTuple):
    """A built-in plan, the head counts it splits ({"heads": n, "kv_heads": m}), and the
    module attributes that count a split width, divided by tp while the model runs
    ({module path pattern: attribute names}: GPT-2's attention splits c_attn's output
    by `split_size`)."""

    plan: dict[str, Style]
    heads: dict[str, int]
    divided: dict[str, tuple[str, ...]] = {}


def plan_for(module: nn.Module) -> BuiltIn:
    """The built-in plan for `module`, or a clear error where there is none."""
    from sharded.models import GPT

    if isinstance(module, GPT):
        return BuiltIn(GPT_PLAN, {"heads": module.cfg.n_heads})
    config = getattr(module, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in ("llama", "mistral", "qwen2"):
        return BuiltIn(LLAMA_PLAN, {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads})
    if kind == "gpt2":
        return BuiltIn(GPT2_PLAN, {"heads": config.n_head}, {"transformer.h.*.attn": ("split_size",)})
    raise ValueError(
        f"tensor_parallel(plan=None): no built-in plan for {kind or type(module).__name__}; built in: sharded.models.GPT, Hugging Face "
        f"gpt2, llama, mistral, qwen2. Pass plan={{module path pattern: style}}, the styles {', '.join(x.value for x in Style)}"
    )


def sliced_params(model: Any, plan: Mapping[str, Style | str] | None = None) -> set[str]:
    """The names of the params `plan` (None: the built-in one) slices over tp: what the
    memory estimate divides by tp."""
    found = plan_for(model.module).plan if plan is None else {k: Style(v) for k, v in plan.items()}
    return {name for p in _resolve(model, found) for name in p.cuts}


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A module the plan names, and the cut of each of its params (by full name)."""

    path: str
    module: nn.Module
    style: Style
    cuts: dict[str, tuple[int, int]]  # {param name in the model: (dim, blocks)}
    in_block: bool = False  # under sequence parallelism: inside a block, where activations are cut along the sequence


class TensorParallel(Transform):
    name = "tensor_parallel"
    level = Level.MODEL
    levels = {"block": Level.PRECISION}  # [Note: where tensor parallelism acts]: inside remat, so a recompute is styled too
    capabilities = Capability.NONE

    def __init__(
        self, plan: Mapping[str, Style | str] | None = None, sequence_parallel: bool = True, loss_parallel: bool = False,
        mesh: Mesh | None = None, axis: str = "tp",
    ):
        for name, flag in (("sequence_parallel", sequence_parallel), ("loss_parallel", loss_parallel)):
            if not isinstance(flag, bool):
                raise ValueError(f"tensor_parallel({name}=...) is True or False; got {flag!r}")
        if plan is not None:
            if not isinstance(plan, Mapping) or not plan:
                raise ValueError(f"tensor_parallel(plan=...) is a non-empty dict {{module path pattern: Style}}; got {plan!r}")
            try:
                plan = {str(k): Style(v) for k, v in plan.items()}
            except ValueError as err:
                raise ValueError(f"tensor_parallel(plan=...): {err}; the styles are {', '.join(s.value for s in Style)}") from None
        self.plan, self.mesh, self.axis, self.sequence_parallel, self.loss_parallel = plan, mesh, axis, sequence_parallel, loss_parallel
        self._ends: tuple[int, int] = (-1, -1)  # the first and last module block's index in model.blocks
        self._entries: list[tuple[str, nn.Module]] = []  # under sequence parallelism: the modules whose input is gathered (attention, MLP)
        self._gathering: set[Any] = set()  # the entries whose gathering hook is on now (ids), and the attributes divided now
        self._divided: list[tuple[str, nn.Module, str]] = []  # (path, module, attribute) a built-in plan divides by tp while the model runs
        self.handlers = {"apply": self._apply, "block": self._block, "update": self._update}
        if loss_parallel:
            self.handlers["value_and_grad"] = self._value_and_grad
        self._loss_inside = False  # in a differentiation under loss_parallel: the head's logits stay sharded
        self._planned: list[_Planned] = []
        self._shapes: dict[str, torch.Size] = {}  # the whole shapes of the params cut
        self._cuts: dict[str, tuple[int, int]] = {}  # {param name: (dim, blocks)} of the params cut
        self._whole: frozenset[str] = frozenset()  # the params every tp rank holds whole

    def describe(self) -> str:
        return f"tensor_parallel({self.axis}={self._mesh().size(self.axis)})"

    def _mesh(self) -> Mesh:
        return self.mesh if self.mesh is not None else Mesh.current()

    def _group(self) -> tuple[int, int, Any]:
        mesh = self._mesh()
        return mesh.size(self.axis), mesh.rank(self.axis), mesh.group(self.axis)

    # -- layout ----------------------------------------------------------------------

    def init(self, state: Any) -> Any:
        from sharded.trace import model_laid_out, model_of

        size, rank, group = self._group()
        if size == 1:
            raise ValueError(f"tensor_parallel: the mesh's {self.axis} axis has one rank; make one with sharded.Mesh({self.axis}=2) (or more) and launch that many ranks")
        model = model_laid_out() or model_of(state.params)  # a pipeline stage holds some of the model's params
        if model is None:
            raise ValueError("tensor_parallel: these params are not a traced model's (sharded.trace(module).params); trace the model first")
        plan, heads, divided = (self.plan, {}, {}) if self.plan is not None else plan_for(model.module)
        modules = dict(model.module.named_modules())
        self._divided = [(path, modules[path], attr) for pattern, attrs in divided.items() for path in modules if fnmatch.fnmatchcase(path, pattern) for attr in attrs]
        self._planned = [dataclasses.replace(p, cuts={n: c for n, c in p.cuts.items() if n in state.params}) for p in _resolve(model, plan)]
        blocks = [i for i, b in enumerate(model.blocks) if not b.name.startswith("<")]
        self._ends = (blocks[0], blocks[-1]) if blocks else (-1, -1)
        self._entries = []
        if self.sequence_parallel:  # [Note: sequence parallelism]: inside blocks, the sequence is what is cut
            inside = tuple(model.blocks[i].name + "." for i in blocks)
            self._planned = [dataclasses.replace(p, in_block=p.path.startswith(inside)) for p in self._planned]
            parents = {p.path.rpartition(".")[0] for p in self._planned if p.in_block and p.style in (Style.COLWISE, Style.COLWISE_QKV)}
            flat = parents & {model.blocks[i].name for i in blocks}
            if flat:
                raise ValueError(
                    f"tensor_parallel(sequence_parallel=True) gathers the sequence at the input of the module that holds a block's colwise "
                    f"layers (its attention, its MLP); in {sorted(flat)[0]} they sit in the block itself, whose residual stream stays cut; "
                    "use sequence_parallel=False for this model"
                )
            self._entries = [(path, modules[path]) for path in sorted(parents)]
        _check_divisible(self._planned, size, heads, state.params)
        cuts = self._cuts = {name: cut for p in self._planned for name, cut in p.cuts.items()}
        names = _names(state.params)
        self._shapes = {n: state.params[n].shape for n in cuts}
        self._whole = frozenset(n for n in names if n not in cuts)
        chunked = tuple(n in cuts for n in names)
        spec = T.structure(state.params)

        def cut(x: torch.Tensor, i: int) -> torch.Tensor:
            dim, blocks = cuts[names[i]]
            return dim_slice(x, dim, blocks, size, rank).clone()

        opt_state = map_chunked(state.opt_state, spec, chunked, cut)
        params = map_chunked(state.params, spec, chunked, cut)
        for n in cuts:  # donated (decision 1): the whole params' memory goes back now
            state.params[n].untyped_storage().resize_(0)
        entries = {}
        for path, x in state_leaves(state.replace(params=params, opt_state=opt_state)):
            name = _param_name(path)
            if name in cuts and isinstance(x, torch.Tensor) and x.dim() > 0:
                dim, blocks = cuts[name]
                whole = state.placements.get(path) or Placement(self._shapes[name])
                entries[path] = whole.cut(Cut(self.axis, group, size, rank, dim=dim, blocks=blocks))
        return state.replace(params=params, opt_state=opt_state, placements=state.placements.update(entries))

    def gather(self, state: Any) -> Any:
        size, rank, group = self._group()
        names = _names(state.params)
        chunked = tuple(n in self._cuts for n in names)

        def whole(x: torch.Tensor, i: int) -> torch.Tensor:
            dim, blocks = self._cuts[names[i]]
            return gather_slices(x, dim, blocks, size, group)

        spec = T.structure(state.params)
        params, opt_state = map_chunked(state.params, spec, chunked, whole), map_chunked(state.opt_state, spec, chunked, whole)
        placements = state.placements.map(lambda p: p.uncut(self.axis))
        return state.replace(params=params, opt_state=opt_state, placements=placements)

    def gather_params(self, params: Any) -> Any:
        size, rank, group = self._group()
        return {n: gather_slices(x, *self._cuts[n], size, group) if n in self._cuts else x for n, x in params.items()}

    # -- the step --------------------------------------------------------------------

    def _apply(self, next_: Callable, model: Any, params: Any, args: tuple, kwargs: dict) -> Any:
        from sharded.trace import under_torch_func

        if under_torch_func(params):
            raise ValueError(
                "tensor_parallel: torch.func over the model (vmap, grad, jvp in the step's own code) is not built yet under tensor "
                "parallelism (issue 16): each tp rank holds slices of the weights; compute it on step.gather_params(state)"
            )
        with self._styled(self._planned, self._entries, self._divided):
            return next_(model, params, args, kwargs)

    def _block(self, next_: Callable, call: Any, params: Any, buffers: Any, args: tuple, kwargs: dict) -> Any:
        inside = [p for p in self._planned if p.path.startswith(call.name + ".")]
        entries = [(path, m) for path, m in self._entries if path.startswith(call.name + ".")]
        divided = [d for d in self._divided if d[0].startswith(call.name + ".")]
        if not self.sequence_parallel:
            with self._styled(inside, entries, divided):
                return next_(call, params, buffers, args, kwargs)
        size, rank, group = self._group()
        if call.index == self._ends[0]:
            args = (_ScatterSeq.apply(args[0], group, size, rank), *args[1:])
        params = {n: _CopyToTP.apply(x, group) if n in self._whole else x for n, x in params.items()}  # each rank's grads are its tokens'
        with self._styled(inside, entries, divided):
            out = next_(call, params, buffers, args, kwargs)
        if call.index == self._ends[1]:
            gather = lambda x: _Joined.apply(x, 1, group, size, rank, False)  # noqa: E731
            out = gather(out) if isinstance(out, torch.Tensor) else (gather(out[0]), *out[1:])
        return out

    @contextlib.contextmanager
    def _styled(self, planned: list[_Planned], entries: list[tuple[str, nn.Module]], divided: list[tuple[str, nn.Module, str]]) -> Iterator[None]:
        """Each module of `planned` runs its style's forward in the body, each of
        `entries` gathers its input's sequence first, and each attribute of `divided`
        counts this rank's slice (unless they do already)."""
        size, rank, group = self._group()
        scaled = [(m, attr) for _, m, attr in divided if (id(m), attr) not in self._gathering]
        for m, attr in scaled:
            setattr(m, attr, getattr(m, attr) // size)
        self._gathering |= {(id(m), attr) for m, attr in scaled}
        mine = [p for p in planned if "forward" not in vars(p.module)]
        for p in mine:
            style = _vocab_sharded_head if p.style is Style.VOCAB_HEAD and self._loss_inside else _FORWARDS[p.style]
            p.module.forward = style(p.module, size, rank, group, p.in_block)
        gather = functools.partial(_gather_input, group=group, size=size, rank=rank)
        fresh = [m for _, m in entries if id(m) not in self._gathering]
        hooks = [m.register_forward_pre_hook(gather, with_kwargs=True) for m in fresh]
        self._gathering |= {id(m) for m in fresh}
        try:
            yield
        finally:
            for p in mine:
                del p.module.forward
            for h in hooks:
                h.remove()
            self._gathering -= {id(m) for m in fresh}
            for m, attr in scaled:
                setattr(m, attr, getattr(m, attr) * size)
            self._gathering -= {(id(m), attr) for m, attr in scaled}

    def _value_and_grad(self, next_: Callable, fn: Callable, has_aux: bool, params: Any, args: tuple, kwargs: dict) -> Any:
        """With loss_parallel: the step's loss over logits sharded by vocabulary (torch's
        `loss_parallel`, forward and backward), its value and aux made whole again."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.parallel import loss_parallel

        self._loss_inside = True
        try:
            with loss_parallel():
                out = next_(fn, has_aux, params, args, kwargs)
        finally:
            self._loss_inside = False
        return T.map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, out)

    def _update(self, next_: Callable, tx: Any, grads: Any, opt_state: Any, params: Any) -> Any:
        """The optimizer on this rank's slices; a global norm sums the slices over tp and
        counts the whole params' grads (equal on every tp rank) on tp rank 0 only."""
        size, rank, group = self._group()
        whole = [grads[n] for n in self._whole if n in grads] if rank else []
        with T.sharded_over(group, counted_elsewhere=whole):
            return next_(tx, grads, opt_state, params)

    def explain(self, program: list[Op], info: ProgramInfo) -> list[Op]:
        """Each layer's collective over tp, with its bytes per token (the activation's
        width at the params' dtype; a step moves that times its tokens)."""
        size = self._mesh().size(self.axis)
        sequence = "; inside blocks each rank holds 1/%d of the tokens" % size if self.sequence_parallel else ""
        out = [Op("data", "tp slices", f"{len(self._shapes)} params cut over tp={size}{sequence}")]
        for op in program:
            out.append(op)
            if op.name != "forward":
                continue
            entries = {path: m for path, m in self._entries}
            for p in self._planned:
                parent = p.path.rpartition(".")[0]
                into, out_of = _widths(p.module) if p.style is not Style.VOCAB_EMBEDDING else p.module.weight.shape[::-1]
                if parent in entries and p.style in (Style.COLWISE, Style.COLWISE_QKV):  # the first colwise layer of a gathering module
                    del entries[parent]
                    out.append(_collective("all_gather the sequence (forward; reduce_scatter in backward)", parent, into, p.module.weight, size))
                elif p.in_block and p.style is Style.ROWWISE:
                    out.append(_collective("reduce_scatter over the sequence (forward; all_gather in backward)", p.path, out_of, p.module.weight, size))
                elif not p.in_block or p.style is Style.ROWWISE:
                    width = out_of if p.style in (Style.ROWWISE, Style.VOCAB_HEAD) else into
                    out.append(_collective(_COLLECTIVE[p.style], f"{p.path} ({p.style.value})", width, p.module.weight, size))
        return out


def _collective(what: str, where: str, width: int, like: torch.Tensor, size: int) -> Op:
    per_token = width * like.element_size()
    return Op("collective", what, f"{where}, over tp={size}: {width} values ({per_token} bytes) per token")


def _names(params: dict) -> list[str]:
    """The params' names in their flatten order (the order `map_chunked` counts leaves in)."""
    return [_param_name(path) for path, _ in T.leaves_with_paths(params)]


def _param_name(path: str) -> str | None:
    """The param name a state path ends with ("params['blocks.0.attn.qkv.weight']"), if any."""
    return path[path.rindex("['") + 2 : -2] if path.endswith("']") and "['" in path else None


def _resolve(model: Any, plan: Mapping[str, Style]) -> list[_Planned]:
    """The modules `plan` names, with the model's names of the params they cut."""
    modules = dict(model.module.named_modules())
    names = {id(p): n for n, p in model.module.named_parameters()}  # the first name of each (a tied weight's too)
    out, used = [], set()
    for path, module in modules.items():
        style = next((s for pattern, s in plan.items() if fnmatch.fnmatchcase(path, pattern)), None)
        if style is None:
            continue
        used |= {pattern for pattern in plan if fnmatch.fnmatchcase(path, pattern)}
        if not isinstance(module, nn.Embedding if style is Style.VOCAB_EMBEDDING else nn.Linear) and not (style is not Style.VOCAB_EMBEDDING and _is_conv1d(module)):
            kind = "Embedding" if style is Style.VOCAB_EMBEDDING else "Linear (or Hugging Face's Conv1D)"
            raise ValueError(f"tensor_parallel: {path} is a {type(module).__name__}; style {style.value} splits an {kind}")
        flip = _is_conv1d(module)  # its weight is stored [in, out]: the dims swap
        cuts = {
            names[id(p)]: ((1 - _CUTS[style][local][0], _CUTS[style][local][1]) if flip and local == "weight" else _CUTS[style][local])
            for local, p in module.named_parameters(recurse=False) if local in _CUTS[style]
        }
        out.append(_Planned(path, module, style, cuts))
    missing = [pattern for pattern in plan if pattern not in used]
    if missing:
        raise ValueError(f"tensor_parallel: the plan names {missing}, which match no module of the model; fix the pattern or drop it")
    seen: dict[str, tuple[int, int]] = {}
    for p in out:
        for name, cut in p.cuts.items():
            if seen.setdefault(name, cut) != cut:
                raise ValueError(f"tensor_parallel: {name} is tied across modules the plan splits differently ({seen[name]} and {cut}); give them one style")
    return out


def _check_divisible(planned: list[_Planned], size: int, heads: dict[str, int], params: dict) -> None:
    for key, n in heads.items():
        if n % size:
            raise ValueError(f"tensor_parallel: the model has {n} {key.replace('_', ' ')}, not divisible by tp={size}; pick a tp that divides {n}")
    for p in planned:
        for name, (dim, blocks) in p.cuts.items():
            n = params[name].shape[dim]
            if n % (blocks * size):
                fix = "pad the vocabulary to a multiple of tp" if p.style in (Style.VOCAB_EMBEDDING, Style.VOCAB_HEAD) else "pick a tp that divides it"
                raise ValueError(f"tensor_parallel: {p.path} ({p.style.value}) splits {name}'s dim {dim} of {n}{f' in {blocks} blocks' if blocks > 1 else ''} over tp={size}, which does not divide it; {fix}")


class _CopyToTP(torch.autograd.Function):
    """Forward: x as it is. Backward: its grad summed over tp (each rank's is the part
    its own slice of the next layer saw)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return comm.summed(grad.contiguous(), ctx.group), None


class _SumOverTP(torch.autograd.Function):
    """Forward: x summed over tp (each rank's partial result). Backward: the grad as it
    is (the sum's grad reaches every rank's part whole)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return comm.summed(x.contiguous(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


# [Note: sequence parallelism] With sequence_parallel=True the activations inside the
# modules that hold a block's colwise and rowwise layers (attention, MLP) stay as they
# are, and everywhere else inside the blocks (norms, residual adds, dropout) each tp rank
# holds 1/tp of the tokens, cut along dim 1 (batch-first activations): a rowwise layer
# reduce-scatters its output over the sequence instead of all-reducing it, and the
# module holding the colwise layers all-gathers its input (a pre-hook, so its own code,
# which may count tokens from its input, sees the whole sequence).
# The first block cuts its input, the last gathers its output, so the embedding, the
# final norm, the head and the model's own code between blocks (masks, positions) see
# the whole sequence. The params every rank holds whole and uses inside the blocks (the
# norms, rowwise biases) get each rank's tokens' share of their grads, summed over tp
# on the way back (`_CopyToTP` on entry).
def _summed_part(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """x summed over tp, this rank's part of it along `dim`."""
    return comm.summed_scattered(x.movedim(dim, 0), group).movedim(0, dim)


class _Joined(torch.autograd.Function):
    """Forward: every rank's x joined along `dim`. Backward: this rank's part of the
    grad, summed over tp first where each rank's is a part (`summed`: the input of a
    module's colwise layers) or as it is where it is equal on every rank (the last
    block's output, the logits)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, size: int, rank: int, summed: bool) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.size, ctx.rank, ctx.summed = dim, group, size, rank, summed
        return gather_slices(x.contiguous(), dim, 1, size, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        part = _summed_part(grad, ctx.dim, ctx.group) if ctx.summed else dim_slice(grad, ctx.dim, 1, ctx.size, ctx.rank).contiguous()
        return part, None, None, None, None, None


class _ScatterSeq(torch.autograd.Function):
    """Forward: this rank's tokens (1/tp of dim 1). Backward: every rank's grads joined."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, rank: int) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % size:
            raise ValueError(f"tensor_parallel(sequence_parallel=True): the blocks' input of shape {tuple(x.shape)} has no sequence (dim 1) that splits over tp={size}; use a length divisible by {size}")
        ctx.group, ctx.size = group, size
        return dim_slice(x, 1, 1, size, rank).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return gather_slices(grad.contiguous(), 1, 1, ctx.size, ctx.group), None, None, None


class _SumScatterSeq(torch.autograd.Function):
    """Forward: x summed over tp, this rank's tokens of it. Backward: every rank's grads joined."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, rank: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        return _summed_part(x, 1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return gather_slices(grad.contiguous(), 1, 1, ctx.size, ctx.group), None, None, None


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2's layers): a Linear whose weight is stored [in, out]."""
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2


def _project(m: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x through the layer's weight (a Linear's [out, in], a Conv1D's [in, out]), plus `bias`."""
    if not _is_conv1d(m):
        return F.linear(x, m.weight, bias)
    y = x @ m.weight
    return y if bias is None else y + bias


def _widths(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of a layer's whole weight."""
    a, b = m.weight.shape
    return (a, b) if _is_conv1d(m) else (b, a)


def _colwise(m: nn.Module, size: int, rank: int, group: Any, sequence: bool) -> Callable:
    if sequence:  # its module gathered the input already (`_gather_input`), whose backward sums over tp
        return lambda x: _project(m, x, m.bias)
    return lambda x: _project(m, _CopyToTP.apply(x, group), m.bias)


def _gather_input(module: nn.Module, args: tuple, kwargs: dict, group: Any, size: int, rank: int) -> tuple:
    """A forward pre-hook: the module's first tensor input (positional, else by name)
    with every rank's tokens joined along dim 1 ([Note: sequence parallelism])."""
    gather = lambda x: _Joined.apply(x, 1, group, size, rank, True)  # noqa: E731
    if args:
        return (gather(args[0]), *args[1:]), kwargs
    name = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, name: gather(kwargs[name])}


def _rowwise(m: nn.Module, size: int, rank: int, group: Any, sequence: bool) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = _project(m, x, None)
        y = _SumScatterSeq.apply(y, group, size, rank) if sequence else _SumOverTP.apply(y, group)
        return y if m.bias is None else y + m.bias

    return forward


def _vocab_embedding(m: nn.Embedding, size: int, rank: int, group: Any, sequence: bool) -> Callable:
    if m.max_norm is not None:
        raise ValueError("tensor_parallel: an Embedding with max_norm renormalises rows in place across the vocabulary; it cannot be split")

    def forward(ids: torch.Tensor) -> torch.Tensor:
        rows = m.weight.shape[0]
        first = rank * rows
        outside = (ids < first) | (ids >= first + rows)
        pad = m.padding_idx - first if m.padding_idx is not None and first <= m.padding_idx < first + rows else None
        out = F.embedding((ids - first).masked_fill(outside, 0), m.weight, padding_idx=pad, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse)
        return _SumOverTP.apply(out.masked_fill(outside.unsqueeze(-1), 0), group)

    return forward


def _vocab_head(m: nn.Module, size: int, rank: int, group: Any, sequence: bool) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = _project(m, _CopyToTP.apply(x, group), m.bias)
        return _Joined.apply(logits, logits.dim() - 1, group, size, rank, False)  # every rank computes the same loss of them

    return forward


@functools.cache
def _device_mesh(group: Any, device_type: str) -> Any:
    """The tp group as a DeviceMesh, made once (not on every forward)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type)


def _vocab_sharded_head(m: nn.Module, size: int, rank: int, group: Any, sequence: bool) -> Callable:
    """loss_parallel's head: the logits stay sharded over the vocabulary, a DTensor."""
    from torch.distributed.tensor import DTensor, Shard

    def forward(x: torch.Tensor) -> Any:
        local = _project(m, _CopyToTP.apply(x, group), m.bias)
        return DTensor.from_local(local, _device_mesh(group, local.device.type), [Shard(local.dim() - 1)], run_check=False)

    return forward


_FORWARDS = {
    Style.COLWISE: _colwise, Style.COLWISE_QKV: _colwise, Style.ROWWISE: _rowwise,
    Style.VOCAB_EMBEDDING: _vocab_embedding, Style.VOCAB_HEAD: _vocab_head,
}
_COLLECTIVE = {
    Style.COLWISE: "all_reduce (backward)", Style.COLWISE_QKV: "all_reduce (backward)", Style.ROWWISE: "all_reduce (forward)",
    Style.VOCAB_EMBEDDING: "all_reduce (forward)", Style.VOCAB_HEAD: "all_gather logits (forward)",
}

tensor_parallel = transform(TensorParallel)
