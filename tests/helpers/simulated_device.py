"""A simulated accelerator: real CPU values, CUDA's rules about which devices may meet in one op.

CI has no GPU, but the attacks must run on one (``attack_device=None`` on a CUDA run puts them on the
training GPU). Their commonest GPU-only defect is device mixing: a tensor made on the CPU (``torch.randn``
with a CPU generator, ``torch.tensor(list)``, a buffer left behind) meeting one on the GPU, which CUDA
refuses with "Expected all tensors to be on the same device". This module reproduces exactly that refusal
on a CPU-only build, so the attacks' device handling is tested everywhere.

``SimulatedAccelerator`` is a ``TorchDispatchMode``. Inside it, ``tensor.to("meta")`` (and any factory
call with ``device="meta"``) makes an :class:`AcceleratorTensor`: a wrapper whose ``device`` reads
``meta`` and whose values live in a CPU tensor, so every op computes real numbers. Each op then checks
its tensor arguments as CUDA would:

* accelerator and CPU tensors may not meet, except CPU tensors with zero dimensions (CUDA accepts CPU
  scalars), CPU index tensors of an accelerator tensor (``x[idx]``), and copies (``copy_``, ``.to``);
* a factory op on the accelerator may not take a CPU ``torch.Generator``;
* ``.numpy()`` of an accelerator tensor raises, as it does on CUDA; ``.tolist()`` and ``.item()`` work.

``meta`` stands in for ``cuda`` because autograd needs a device guard, which a CPU build has for ``meta``
and not for ``cuda``; so code that branches on ``tensor.is_cuda`` is not covered here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["AcceleratorTensor", "DeviceMixError", "SimulatedAccelerator"]

ACCEL = torch.device("meta")
aten = torch.ops.aten

_COPIES = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default, aten._copy_from.default,
           aten._copy_from_and_resize.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMixError(RuntimeError):
    """An op mixed accelerator and CPU tensors in a way CUDA refuses."""


class AcceleratorTensor(torch.Tensor):
    """A tensor 'on the accelerator' (``device`` reads ``meta``) whose values are a CPU tensor, ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> AcceleratorTensor:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=ACCEL, requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    __torch_function__ = torch._C._disabled_torch_function_impl

    # Python lists in an index become index tensors made in C++ on the indexed tensor's device, out of the
    # mode's reach (a data-less meta tensor here); CUDA makes them on the GPU. Hand them over as CPU tensors.
    def __getitem__(self, index: Any) -> Any:
        return super().__getitem__(_list_indices(index))

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(_list_indices(index), value)

    def tolist(self) -> Any:
        return self.elem.tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert accelerator (simulated cuda) tensor to numpy. Use Tensor.cpu() first.")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        return self.numpy()

    def __repr__(self) -> str:
        return f"AcceleratorTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        with SimulatedAccelerator():  # reached only when an accelerator tensor escapes the mode
            return func(*args, **(kwargs or {}))


def _on_accel(device: Any) -> bool:
    return device is not None and torch.device(device) == ACCEL


class SimulatedAccelerator(TorchDispatchMode):
    """Run code as if ``meta`` were a CUDA device; see the module docstring. ``ops`` counts dispatched ops."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self._factories: dict[str, Any] = {}

    # ``torch.tensor(data, device=...)`` builds its result in C++, out of the mode's reach: on the
    # accelerator it would be a data-less meta tensor. Build it on the CPU and move it, as CUDA does.
    def __enter__(self) -> SimulatedAccelerator:
        for name in ("tensor", "as_tensor"):
            original = self._factories[name] = getattr(torch, name)

            def factory(data: Any, *args: Any, _original: Any = original, **kwargs: Any) -> torch.Tensor:
                device = kwargs.pop("device", None)
                out = _original(data, *args, **kwargs)
                return out.to(device) if device is not None else out

            setattr(torch, name, factory)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._factories.items():
            setattr(torch, name, original)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206, C901
        kwargs = dict(kwargs or {})
        self.ops += 1
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        accel = [t for t in tensors if isinstance(t, AcceleratorTensor)]
        if any(t.device == ACCEL and not isinstance(t, AcceleratorTensor) for t in tensors):
            raise NotImplementedError(f"{func}: a data-less meta tensor, made outside the simulator's reach")
        target = _on_accel(kwargs.get("device"))
        if func in _COPIES:
            pass
        elif func in _INDEXING:
            self_arg = args[0]
            index_like = [t for t in flat[1:] if isinstance(t, torch.Tensor)]
            if isinstance(self_arg, AcceleratorTensor):
                values = args[2] if len(args) > 2 else None
                if isinstance(values, torch.Tensor) and not isinstance(values, AcceleratorTensor) and values.dim() > 0:
                    raise DeviceMixError(f"{func}: values on the cpu, self on the accelerator, shape {tuple(values.shape)}")
            elif any(isinstance(t, AcceleratorTensor) for t in index_like) and self_arg.dim() > 0:
                raise DeviceMixError(f"{func}: indexing a cpu tensor {tuple(self_arg.shape)} with accelerator indices")
        elif accel or target:
            cpu = [t for t in tensors if not isinstance(t, AcceleratorTensor) and t.dim() > 0]
            if cpu:
                shapes = ", ".join(str(tuple(t.shape)) for t in cpu[:3])
                raise DeviceMixError(
                    f"{func}: expected all tensors to be on the same device, found the accelerator and cpu "
                    f"(cpu tensors of shape {shapes})"
                )
        gen = kwargs.get("generator")
        if target and isinstance(gen, torch.Generator) and gen.device.type == "cpu":
            raise DeviceMixError(f"{func}: a cpu generator for an op on the accelerator")
        to_cpu = func is aten._to_copy.default and "device" in kwargs and not target
        if target:
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if to_cpu or not (accel or target):
            return out
        if func is aten.copy_.default and not isinstance(args[0], AcceleratorTensor):
            return args[0]
        inputs = {id(t.elem): t for t in accel}
        return tree_map(lambda t: _wrap(t, inputs), out)


def _list_indices(index: Any) -> Any:
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
    return index


def _unwrap(t: Any) -> Any:
    return t.elem if isinstance(t, AcceleratorTensor) else t


def _wrap(t: Any, inputs: dict[int, AcceleratorTensor]) -> Any:
    if not isinstance(t, torch.Tensor) or isinstance(t, AcceleratorTensor):
        return t
    same = inputs.get(id(t))  # an in-place op returns its own argument
    if same is None:
        return AcceleratorTensor(t)
    if same.shape != t.shape or same.stride() != t.stride():  # squeeze_, transpose_, ...: follow the values
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Python)):
            aten.as_strided_.default(same, t.shape, t.stride(), t.storage_offset())
    return same
