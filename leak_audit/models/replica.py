"""A private copy of the model's architecture that attacks run with snapshot parameters.

Optimisation attacks (gradient matching, DLG) and the middle-layer subspace attack need the model's
forward pass: they compute the gradients or hidden states a *candidate* input would produce. They must
not touch the live model (training keeps running) and must use the parameter values of the audited step.
A :class:`ModelReplica` holds a deep copy of the Hugging Face model (eval mode, no stored gradients) and
runs it with :func:`torch.func.functional_call` on a snapshot's parameters.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["ModelReplica", "local_names", "parameter_gradients"]


class _Reached(Exception):
    """Raised by a forward pre-hook to stop the forward once every watched module has seen its input."""


def local_names(params: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``params`` whose names start with ``prefix`` (``"model."``, or ``""`` for all), renamed without it."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def parameter_gradients(
    params: Mapping[str, Tensor],
    names: Sequence[str],
    known: Sequence[str],
    loss: Callable[[dict[str, Tensor]], Tensor],
    *,
    create_graph: bool = False,
) -> list[Tensor]:
    """``∂loss(values)/∂values[k]`` for each ``k`` in ``names``, where ``values`` is ``params`` with those
    entries replaced by fresh leaves (the others stay constants); an unused parameter gets zeros.

    Args:
        params: parameter values by name.
        names: the parameters to differentiate (each in ``known``).
        known: every parameter name of the model.
        loss: maps the values to a scalar loss (runs the model).
        create_graph: keep the graph (the gradients stay differentiable w.r.t. the loss's other inputs).

    Raises:
        KeyError: a name is not in ``known``.
    """
    unknown = [k for k in names if k not in known]
    if unknown:
        raise KeyError(f"not parameters of the replicated model: {unknown[:5]}")
    values = dict(params)
    leaves = []
    for k in names:
        leaf = values[k].detach().requires_grad_(True)
        values[k] = leaf
        leaves.append(leaf)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(values), leaves, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads, strict=True)]


class ModelReplica:
    """Functional forward/backward of a Hugging Face sequence classifier on snapshot parameters.

    The copy shares the live model's parameter *storage* (no memory is duplicated) behind its own
    ``requires_grad=False`` parameter objects: frozen parameters are read from it, trainable ones must be
    passed in ``params`` (the snapshot), because training changes them in place.

    Args:
        hf_model: the live Hugging Face model.
        prefix: the model's module name inside the audited root (``""`` if it is the root); parameter
            names given to and returned by this class are root-relative (``prefix + "." + local``).
        device: where the replica runs (``None``: where the model is). On another device than the live
            model the frozen weights are copied there once (attacks placed off the training device).
    """

    def __init__(self, hf_model: nn.Module, prefix: str = "", device: torch.device | str | None = None) -> None:
        memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in hf_model.parameters()}
        self.model = copy.deepcopy(hf_model, memo).eval()
        if device is not None:
            self.model.to(device)  # a no-op on the live model's device: the storage stays shared
        self.prefix = prefix + "." if prefix else ""
        self.parameter_names = tuple(self.prefix + n for n, _ in hf_model.named_parameters())
        self.trainable = frozenset(self.prefix + n for n, p in hf_model.named_parameters() if p.requires_grad)

    def local(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Root-relative ``params`` renamed to the replica's own names (others dropped)."""
        return local_names(params, self.prefix)

    def input_embeddings(self, params: Mapping[str, Tensor]) -> Tensor:
        """The word-embedding table ``[V, d]`` at the snapshot's values."""
        emb = self.model.get_input_embeddings()
        name = next(n for n, p in self.model.named_parameters() if p is emb.weight)
        return params[self.prefix + name]

    def forward(
        self,
        params: Mapping[str, Tensor],
        *,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool = False,
        train: bool = False,
    ) -> Any:
        """Run the model at ``params`` (root-relative names) and return the Hugging Face output.

        ``input_ids`` ``[B, L]`` or ``inputs_embeds`` ``[B, L, d]`` (word embeddings only: position and
        token-type embeddings and the LayerNorm are added by the model). ``labels`` ``[B]`` (class ids) or
        ``[B, C]`` soft labels (probabilities): the loss is the batch-mean cross-entropy either way; with an LM
        head (logits ``[B, L, V]``), ``[B, L]`` token ids (-100: ignored) and the mean next-token loss.
        ``train`` switches dropout on for this call.
        """
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "output_hidden_states": output_hidden_states}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if train or self.model.training:  # it rests in eval mode; switching every module's mode costs ~1 ms
            self.model.train(train)
        try:
            out = functional_call(self.model, self.local(params), args=(), kwargs=kwargs, strict=False)
        finally:
            if train:
                self.model.eval()
        if labels is not None:
            logits = out.logits
            if logits.dim() == 3:  # an LM head: next-token loss, labels [B, L] with -100 ignored (the model's shift)
                out.loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                       ignore_index=-100)
            elif labels.dim() == 2:
                out.loss = -(labels * logits.log_softmax(-1)).sum(-1).mean()
            else:
                out.loss = nn.functional.cross_entropy(logits, labels)
        return out

    def gradients(
        self,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        *,
        labels: Tensor,
        create_graph: bool = False,
        train: bool = False,
        **inputs: Tensor | None,
    ) -> list[Tensor]:
        """``∂loss/∂param`` for each root-relative name in ``names``, at ``params`` on ``inputs``.

        With ``create_graph=True`` the result is differentiable w.r.t. ``inputs_embeds`` (gradient
        matching). Parameters outside ``names`` are constants.

        Raises:
            KeyError: a name is not a parameter of the model.
        """
        return parameter_gradients(
            params, names, self.parameter_names,
            lambda values: self.forward(values, labels=labels, train=train, **inputs).loss,
            create_graph=create_graph,
        )

    def module_inputs(
        self,
        params: Mapping[str, Tensor],
        modules: Sequence[str],
        input_ids: Tensor,
        *,
        cache: Any = None,
    ) -> dict[str, Tensor]:
        """The inputs of ``modules`` when the model reads ``input_ids``, stopping the forward right there.

        The forward runs at ``params`` (root-relative names; the replica's own values for the others) only
        until every module in ``modules`` has been called once; the layers after them never run, so the
        inputs of a decoder's first layers cost a fraction of a forward pass.

        Args:
            params: parameter values by root-relative name.
            modules: root-relative module names (e.g. ``"model.layers.1.self_attn.q_proj"``).
            input_ids: ``[M, k]`` token ids, no padding.
            cache: a Hugging Face ``DynamicCache`` holding a prefix (``[M, ...]``): ``input_ids`` then
                continue it (positions ``prefix_length .. prefix_length + k - 1``) and the cache grows by
                ``k`` in the layers that ran. ``None``: ``input_ids`` start at position 0.

        Returns:
            ``{module: input}`` with each input ``[M, k, d_in]`` (the first positional argument).

        Raises:
            KeyError: a name is not a module of the replica.
        """
        seen: dict[str, Tensor] = {}
        handles = []
        for name in modules:
            module = self.submodule(name)

            def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                seen.setdefault(name, args[0])
                if len(seen) == len(modules):
                    raise _Reached

            handles.append(module.register_forward_pre_hook(hook))
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": None}
        if cache is not None:  # transformers 5 names it `cache`, earlier versions `past_key_values`
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft
            key = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
            kwargs[key], kwargs["use_cache"] = cache, True
        try:
            functional_call(self.model, self.local(params), args=(), kwargs=kwargs, strict=False)
        except _Reached:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [m for m in modules if m not in seen]
        if missing:
            raise KeyError(f"the forward never called {missing}")
        return seen

    def submodule(self, name: str) -> nn.Module:
        """The replica's module of root-relative ``name`` (with or without the replica's prefix).

        Raises:
            KeyError: ``name`` is not a module of the replica.
        """
        short = name[len(self.prefix):] if name.startswith(self.prefix) else name
        try:
            return self.model.get_submodule(short)
        except AttributeError:
            raise KeyError(f"{name!r} is not a module of the replicated model") from None

    def new_cache(self) -> Any:
        """An empty Hugging Face ``DynamicCache`` for :meth:`module_inputs` (a decoder's key/value cache)."""
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 takes no config
            return DynamicCache()
