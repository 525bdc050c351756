"""The model replica: a stopped forward reads the snapshot's parameters, not the live model's."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leak_audit.models.replica import ModelReplica


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


def test_a_stopped_forward_follows_the_snapshot_on_every_call() -> None:
    """The inputs of layer 2's query follow the snapshot's values of the layers before it on every call, also after
    training changed the live weights in place (the replica's frozen copies share their storage), and a parameter
    left out of the snapshot is read from the live model."""
    model = _llama()
    module = "model.layers.2.self_attn.q_proj"
    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    replica = ModelReplica(model)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = replica.module_inputs(snapshot, [module], ids)[module]
    with torch.no_grad():  # training moves the live weights, which the replica's frozen copies share
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert torch.equal(replica.module_inputs(snapshot, [module], ids)[module], first)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    later = replica.module_inputs(moved, [module], ids)[module]
    assert not torch.allclose(later, first)
    torch.testing.assert_close(later, ModelReplica(model).module_inputs(moved, [module], ids)[module])
    one_layer = {n: v for n, v in moved.items() if ".layers.1." in n}  # the rest from the (moved) live model
    torch.testing.assert_close(replica.module_inputs(one_layer, [module], ids)[module], later)
