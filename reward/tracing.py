"""One training forward on the meta device, as a run would make it: what autograd keeps for backward, where backward
holds it beside the gradients it makes, and the forward's FLOPs. `lpo.reward.plan` turns it into a plan's memory and
time (its docstring states the model)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

# torch's counter knows the CUDA attention kernels; the CPU's own (which F.scaled_dot_product_attention calls there)
# costs the same multiply-adds, so counts on the CPU agree with those on the meta device (where it decomposes)
_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_ATTENTION not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_CPU_ATTENTION)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                      **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

# the modules diffusers checkpoints one at a time under gradient checkpointing
CHECKPOINTED = ("ResnetBlock2D", "Transformer2DModel", "DualTransformer2DModel",  # UNets
                "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")  # MMDiTs


# autocast's casts (aten/src/ATen/autocast_mode.{h,cpp}), at the level of the Python calls a model makes: these run
# in the half dtype on either device (einsum and matmul decompose into the listed products, which autocast casts)...
_TO_HALF = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
            F.prelu, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm,
            torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm,
            torch.Tensor.addmm, torch.addbmm, torch.Tensor.addbmm, torch.einsum, F.scaled_dot_product_attention)
# ...and these in float32 on CUDA only (the CPU's float32 list has none of them): norms, softmax, upsampling,
# exponentials, powers and reductions, and the losses
_TO_FLOAT_ON_CUDA = (F.layer_norm, F.group_norm, getattr(F, "rms_norm", F.layer_norm), F.softmax, torch.softmax,
                     torch.Tensor.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax, F.interpolate,
                     F.softplus, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow, torch.Tensor.pow,
                     torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.sum, torch.Tensor.sum, torch.cumsum,
                     torch.Tensor.cumsum, torch.prod, torch.Tensor.prod, torch.logsumexp, torch.Tensor.logsumexp,
                     F.cosine_similarity, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.kl_div,
                     F.binary_cross_entropy_with_logits)


class _FusedAttention(torch.autograd.Function):
    """`scaled_dot_product_attention` as the fused kernels keep it for backward (query, key, value, output and the
    float32 log-sum-exp of each query row), where the meta device would run the math path and keep every attention
    matrix."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> torch.Tensor:
        output = F.scaled_dot_product_attention(query, key, value, **kwargs)  # no autograd inside: nothing kept
        if output.dim() == 4:  # the kernels write (batch, tokens, heads, dim): merging the heads after is a view
            batch, heads, tokens, dim = output.shape
            output = output.new_empty(batch, tokens, heads, dim).transpose(1, 2)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("a plan's trace is never differentiated")


class _Timeline:
    """What one traced forward leaves for backward, in the order it is kept: each storage autograd saves (first
    save, bytes, the checkpointed block it was saved in or -1) and where each trained weight is used. Backward runs
    the forward in reverse: at forward event e, what was saved up to e is still held and the gradients of weights
    used from e on are already made."""

    def __init__(self, held: set[int]):
        self.held = held  # storages of weights and tables: held anyway
        self.events = 0
        self.saved: dict[int, tuple[int, int, int, torch.Tensor]] = {}  # storage -> (event, bytes, block, tensor)
        self.uses: dict[int, tuple[int, int]] = {}  # id(weight) -> (event, elements)
        self.blocks: list[int] = []  # the checkpointed blocks open now
        self.opened = 0
        self.boundaries: dict[int, tuple[int, int, int, torch.Tensor]] = {}  # blocks' outputs
        self.latest = -1  # the latest event among what the running operation keeps

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.held:
            if key not in self.saved:
                self.saved[key] = (self.events, t.untyped_storage().nbytes(), self.blocks[-1] if self.blocks else -1,
                                   t)
                self.events += 1
            self.latest = max(self.latest, self.saved[key][0])
        return t

    def op(self, weights: list[tuple[nn.Parameter, bool]], run: Callable[[], Any]) -> Any:
        """Run one operation that uses `weights` (each with: is this use its gradient's last); the gradient of a
        weight is made when backward reaches the operation, while what the operation kept is still held. A weight's
        last use counts, or its first where autocast's cached cast (made at the first use) carries every use."""
        self.latest = -1
        result = run()
        event = self.latest if self.latest >= 0 else self.events - 1
        for weight, last in weights:
            if weight.requires_grad and (last or id(weight) not in self.uses):
                self.uses[id(weight)] = (event, weight.numel())
        return result

    def enter(self, _module: nn.Module, _inputs: Any) -> None:
        self.blocks.append(self.opened)
        self.opened += 1

    def leave(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self.blocks.pop()
        for t in output if isinstance(output, (tuple, list)) else [output]:
            if torch.is_tensor(t):
                self.boundaries[t.untyped_storage()._cdata] = (self.events, t.untyped_storage().nbytes(), -1, t)

    def curve(self, checkpointing: bool) -> list[tuple[float, float]]:
        """(saved bytes held, trained elements whose gradients are made) at each event of the backward sweep.
        With checkpointing a block keeps only its output; its inside is recomputed whole when backward reaches it."""
        outside = dict(self.saved) if not checkpointing else \
            {**{k: v for k, v in self.saved.items() if v[2] < 0}, **self.boundaries}
        inside: dict[int, int] = {}
        for key, (_, size, block, _) in self.saved.items():
            if checkpointing and block >= 0 and key not in outside:
                inside[block] = inside.get(block, 0) + size
        block_at = [-1] * (self.events + 1)
        for _, (event, _, block, _) in self.saved.items():
            block_at[event] = block
        held = [0.0] * (self.events + 1)
        for event, size, _, _ in outside.values():
            held[min(event, self.events)] += size
        made = [0.0] * (self.events + 2)
        for event, elements in self.uses.values():
            made[event] += elements
        for e in range(1, self.events + 1):
            held[e] += held[e - 1]  # saved up to e
        for e in range(self.events - 1, -1, -1):
            made[e] += made[e + 1]  # used from e on
        return [(held[e] + (inside.get(block_at[e], 0) if checkpointing else 0), made[e])
                for e in range(self.events + 1)]


class _Precision(TorchFunctionMode):
    """The casts `torch.autocast(device_type, half)` makes, above autograd, so that a meta trace (where autocast does
    not run) keeps what a run keeps in the dtypes it keeps; a trained weight's cast is made once per forward, as
    autocast caches it. `half` None: a float32 run, no casts. Attention runs as `_FusedAttention` either way; each
    operation runs through `timeline`, which places the gradients of the weights it uses."""

    def __init__(self, half: torch.dtype | None, device_type: str, timeline: _Timeline):
        super().__init__()
        self.half, self.device_type, self.timeline = half, device_type, timeline
        self.weights: dict[int, torch.Tensor] = {}

    def cast(self, value: Any, dtype: torch.dtype | None, weights: list[tuple[nn.Parameter, bool]]) -> Any:
        if isinstance(value, nn.Parameter):
            if dtype is None or value.dtype == dtype or not value.is_floating_point():
                weights.append((value, True))
                return value
            if id(value) not in self.weights:
                weights.append((value, False))
                self.weights[id(value)] = value.to(dtype)
            return self.weights[id(value)]
        if dtype is None or not (torch.is_tensor(value) and value.is_floating_point()) or value.dtype == dtype:
            return value
        return value.to(dtype)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        dtype = None
        if self.half is not None and func in _TO_HALF:
            dtype = self.half
        elif self.half is not None and self.device_type == "cuda" and func in _TO_FLOAT_ON_CUDA:
            dtype = torch.float32
        weights: list[tuple[nn.Parameter, bool]] = []
        args = tuple(self.cast(a, dtype, weights) for a in args)
        kwargs = {k: self.cast(v, dtype, weights) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            named = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
                             args), **kwargs)
            return _FusedAttention.apply(named.pop("query"), named.pop("key"), named.pop("value"), named)
        return self.timeline.op(weights, lambda: func(*args, **kwargs))


@dataclass
class Trace:
    """One traced training forward: its FLOPs, the most activations held at once (when backward starts; with
    checkpointing, while it recomputes a block), and along the backward sweep (saved bytes held, trained elements
    whose gradients exist)."""

    flops: float
    sweep: list[tuple[float, float]]

    @property
    def activations(self) -> float:
        return max((held for held, _ in self.sweep), default=0.0)

    def peak(self, gradient_bytes: float, trained: int) -> float:
        """The most that activations and gradients (`gradient_bytes` each of `trained` elements: 4, divided by the
        processes when sharded) hold together during backward: the gradients are made as the activations are
        freed; at the end every gradient is held."""
        during = max((held + made * gradient_bytes for held, made in self.sweep), default=0.0)
        return max(during, trained * gradient_bytes)


def trace(module: nn.Module, forward: Callable[[], Any], checkpointing: bool, half: torch.dtype | None = None,
          device_type: str = "cuda") -> Trace:
    """One training `forward` of `module` on the meta device, as the run would make it (the memory model:
    `lpo.reward.plan`'s docstring).
    The parameters of `module` that require gradients are the trained ones (autograd keeps less around a frozen one);
    `half` is the autocast dtype of a mixed-precision run on `device_type`, None a float32 one."""
    timeline = _Timeline({t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]})
    hooks = []
    for sub in module.modules():
        if type(sub).__name__ in CHECKPOINTED:
            hooks += [sub.register_forward_pre_hook(timeline.enter), sub.register_forward_hook(timeline.leave)]
    counter = FlopCounterMode(display=False)
    try:
        with (torch.enable_grad(), saved_tensors_hooks(timeline.pack, lambda t: t), counter,
              _Precision(half, device_type, timeline)):
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    return Trace(float(counter.get_total_flops()), timeline.curve(checkpointing))


def forward_flops(forward: Callable[[], Any]) -> float:
    """FLOPs of one `forward`, counted by torch's FLOP counter (works on the meta device: shapes suffice)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward()
    return float(counter.get_total_flops())
