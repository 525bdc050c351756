"""LeakageAudit's eager argument checks (leak_audit.options): every bad value fails at construction, and the
message names the argument, the value given and what would be valid."""

from __future__ import annotations

import re

import pytest
import torch

from leak_audit import LeakageAudit
from leak_audit.attacks import DEFAULT_ATTACKS, DEFAULT_DECODER_ATTACKS, DEFAULT_IMAGE_ATTACKS, resolve_attacks


@pytest.mark.parametrize(("argument", "value", "valid"), [
    ("every_n_steps", 0, "positive int"),
    ("every_n_steps", True, "positive int"),
    ("recompute", "worst", "'observed', 'eval'"),
    ("log_samples", "yes", "bool"),
    ("max_pending", 0, "positive int"),
    ("max_seconds", -1.0, "positive or None"),
    ("worker_threads", 0, ">= 1 or None"),
    ("worker_niceness", 20, "0..19"),
    ("delta", 1.0, "(0, 1)"),
    ("batch_adapter", "adapter", "callable"),
    ("modality", "audio", "'auto', 'text', 'image'"),
    ("network", 3, "module name"),
    ("worker", "fiber", "'thread', 'process'"),
    ("on_breach", "panic", "'warn', 'stop', 'raise'"),
    ("wandb_alert", 1, "bool"),
    ("scope", "world", "'global', 'local'"),
    ("attack_device", "gpu:0", "torch device"),
])
def test_a_bad_argument_names_itself_its_value_and_what_is_valid(argument, value, valid):
    with pytest.raises(ValueError) as info:
        LeakageAudit(**{argument: value})
    message = str(info.value)
    assert message.startswith(argument) and repr(value) in message and valid in message, message


def test_bad_attack_requests():
    with pytest.raises(ValueError, match="Did you mean 'span_check'"):
        LeakageAudit(attacks=["spancheck"])
    with pytest.raises(ValueError, match="attacks is empty"):
        LeakageAudit(attacks=[])
    with pytest.raises(ValueError, match=re.escape("distinct names, got ['labels', 'labels']")):
        LeakageAudit(attacks=["labels", "labels"])
    with pytest.raises(ValueError, match="'inverting_gradients' reads image models"):
        LeakageAudit(attacks=["inverting_gradients"], modality="text")
    with pytest.raises(TypeError, match="names or Attack objects, got int"):
        LeakageAudit(attacks=[3])
    with pytest.raises(ValueError, match="act on a policy"):
        LeakageAudit(on_breach="stop")


def test_defaults_per_kind_of_model():
    assert [a.name for a in resolve_attacks(None, "text")] == list(DEFAULT_ATTACKS)
    assert [a.name for a in resolve_attacks(None, "text", causal=True)] == list(DEFAULT_DECODER_ATTACKS)
    assert [a.name for a in resolve_attacks(None, "image")] == list(DEFAULT_IMAGE_ATTACKS)
    assert [type(a).__module__ for a in resolve_attacks(["dlg"], "image")] == ["leak_audit.attacks.image.dlg"]
    assert LeakageAudit(attack_device="cpu").attack_device == torch.device("cpu")
