"""Live and peak tensor bytes of a computation, counted op by op at the dispatcher.

``MemoryCounter`` is a ``TorchDispatchMode``: every op output on the tracked device adds its
storage's bytes once (views and in-place results share a storage and add nothing), and a
``weakref.finalize`` on the storage subtracts them when the last reference dies. That is what
a caching allocator's "allocated" counter sees, minus its rounding. Tensors that exist before
the measured region (weights, optimizer state) enter as the *baseline* through ``track``.

On the meta device the same code runs real modules without data, so real-size models are
measured in seconds on a CPU. Two things meta tensors cannot do are handled here:

- a data-dependent Python scalar (``float(loss)``, ``bool(torch.isfinite(x))``, a grad norm)
  reads as 1 (True for booleans): the memory of what follows does not depend on the value;
- a copy off the meta device (``.cpu()``) returns an empty-strided CPU tensor of the right
  shape that holds no memory, as a copy to host frees nothing and allocates nothing on the
  accelerator; an op on such host placeholders (a ``torch.cat`` of decoded images, a dtype
  cast of a stored trajectory) gives a placeholder too, so the host never allocates at the
  model's sizes, whatever the resolution.

``efficient_attention()`` routes ``F.scaled_dot_product_attention`` without a mask to the
fused flash kernel (output + log-sum-exp saved, O(L) memory), which is what CUDA's
flash/memory-efficient SDPA and the CPU's own kernel do; on meta tensors torch would otherwise
take the math path and materialise every attention matrix.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten
_SCALAR = _aten._local_scalar_dense.default
_TO_COPY = _aten._to_copy.default
_CPU_FLASH = _aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_FLASH_BWD = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _flops(func, args, kwargs, out) -> int:
    # torch's FLOP formulas (matmuls, convolutions, attention); the CPU flash kernel is not in
    # its table, so its forward and backward get the SDPA formulas by hand.
    if func is _CPU_FLASH:
        q, k, v = args[:3]
        return sdpa_flop_count(q.shape, k.shape, v.shape)
    if func is _CPU_FLASH_BWD:
        grad_out, q, k, v = args[:4]
        return sdpa_backward_flop_count(grad_out.shape, q.shape, k.shape, v.shape)
    counter = flop_registry.get(func._overloadpacket)
    return int(counter(*args, **kwargs, out_val=out)) if counter is not None else 0


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_FRESH: dict = {}  # op → whether its outputs are always new tensors (no views, no in-place)


def _makes_fresh_tensors(func) -> bool:
    fresh = _FRESH.get(func)
    if fresh is None:
        schema = func._schema
        fresh = _FRESH[func] = (not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
                                and func not in (_SCALAR, _TO_COPY))
    return fresh


def _leaves(obj, out: list) -> list:
    # torch's pytree would do, but costs more than the meta kernel it saves on small ops.
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _leaves(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _leaves(item, out)
    else:
        out.append(obj)
    return out


def is_host_placeholder(x) -> bool:
    """A CPU tensor of many elements that all read one (every stride 0): data a plan never holds."""
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.numel() > 1 and not any(x.stride())


def _on_host_placeholders(func, args, kwargs) -> bool:
    if func._schema.is_mutable or kwargs.get("device") not in (None, torch.device("cpu"), "cpu"):
        return False
    tensors = [x for x in _leaves((args, kwargs), []) if isinstance(x, torch.Tensor)]
    return any(map(is_host_placeholder, tensors)) and all(t.device.type == "cpu" for t in tensors)


def _placeholder_op(func, args, kwargs):
    """``func`` on meta stand-ins of host placeholders, its outputs placeholders again."""
    def to_meta(x):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") if isinstance(x, torch.Tensor) else x

    def to_host(x):
        return torch.empty_strided(x.shape, [0] * x.dim(), dtype=x.dtype) if isinstance(x, torch.Tensor) else x

    return tree_map(to_host, func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs)))


def _shape_key(func, args, kwargs):
    """What a functional op's output metadata depends on, or None if an argument is not plain."""
    parts: list = [func, len(args), tuple(kwargs)]
    for x in _leaves((args, kwargs), []):
        if isinstance(x, torch.Tensor):
            if x.device.type != "meta":
                return None
            parts.append((tuple(x.shape), x.stride(), x.storage_offset(), x.dtype))
        elif isinstance(x, _PLAIN):
            parts.append(x)
        else:
            return None
    return tuple(parts)


def _blueprint(out):
    if isinstance(out, torch.Tensor):
        return (torch.Tensor, tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (tuple, list)):
        return (type(out), [_blueprint(o) for o in out])
    return (None, out)


def _build(blueprint):
    kind = blueprint[0]
    if kind is torch.Tensor:
        return torch.empty_strided(blueprint[1], blueprint[2], dtype=blueprint[3], device="meta")
    if kind is None:
        return blueprint[1]
    return kind(_build(b) for b in blueprint[1])


class MemoryCounter(TorchDispatchMode):
    """Counts live bytes of storages on ``device`` (type, e.g. "meta" or "cpu"), their peak, and FLOPs.

    On meta, an op that only ever returns new tensors is run once per distinct input shape:
    later calls get new empty tensors of the recorded shapes and strides (the same storage
    bytes), because torch's Python meta kernels cost a fraction of a millisecond per op and a
    UNet repeats the same shapes block after block.
    """

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self.flops = 0
        self._sizes: dict[int, int] = {}
        self._blueprints: dict = {}

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def track(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count tensors that already exist (the baseline); returns the bytes newly counted."""
        before = self.live
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                self._add(t.untyped_storage())
        return self.live - before

    def reset_peak(self) -> None:
        self.peak = self.live

    # -- the mode ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device == "meta":
            if func is _SCALAR and args[0].device.type == "meta":
                dtype = args[0].dtype
                return True if dtype == torch.bool else (1.0 if dtype.is_floating_point or dtype.is_complex else 1)
            target = kwargs.get("device")
            if func is _TO_COPY and args[0].device.type == "meta" and target is not None \
                    and torch.device(target).type != "meta":
                src = args[0]
                return torch.empty_strided(src.shape, [0] * src.dim(), dtype=kwargs.get("dtype") or src.dtype,
                                           device=target)
            if _on_host_placeholders(func, args, kwargs):
                return _placeholder_op(func, args, kwargs)
        out = None
        key = _shape_key(func, args, kwargs) if self.device == "meta" and _makes_fresh_tensors(func) else None
        if key is not None and key in self._blueprints:
            out = _build(self._blueprints[key])
        else:
            out = func(*args, **kwargs)
            if key is not None:
                self._blueprints[key] = _blueprint(out)
        for t in _leaves(out, []):
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                self._add(t.untyped_storage())
        self.flops += _flops(func, args, kwargs, out)
        return out


def module_tensors(*modules: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Parameters, their gradients and buffers of ``modules``: what a baseline counts."""
    for module in modules:
        for p in module.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from module.buffers()


def optimizer_tensors(*optimizers: torch.optim.Optimizer | None) -> Iterator[torch.Tensor]:
    for opt in optimizers:
        if opt is None:
            continue
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@contextmanager
def efficient_attention(enabled: bool = True) -> Iterator[None]:
    """Fused (flash) attention for every unmasked SDPA call inside, on any device.

    The function is swapped on ``torch.nn.functional`` itself rather than caught by a
    TorchFunctionMode: a mode is switched off while it handles ``Tensor.backward``, so the
    forward that gradient checkpointing recomputes during backward would escape it.
    """
    if not enabled:
        yield
        return
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None and not enable_gqa and query.shape[:-2] == key.shape[:-2]:
            return _CPU_FLASH(query, key, value, dropout_p, is_causal, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
