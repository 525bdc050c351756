"""The training-thread capture without a Trainer: the batch window, the parameter copy rule, the snapshot."""

import pytest
import torch
from torch import nn

from leak_audit import ImageBatch, TextBatch
from leak_audit.capture.snapshotter import Snapshotter
from leak_audit.capture.tap import GradientTap


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.emb.weight.requires_grad_(False)
        self.fc = nn.Linear(4, 2)


class Rule:
    """A worker's copy rule for frozen parameters, and nothing else (all ``copy_params`` asks of a worker)."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def frozen_copy(self, name, param):
        return self.answer


def text_batch(n: int = 2, length: int = 3) -> dict:
    ones = torch.ones(n, length, dtype=torch.long)
    return {"input_ids": ones, "attention_mask": ones, "labels": torch.zeros(n, dtype=torch.long)}


def snapshotter(net: Net, **kw) -> Snapshotter:
    from leak_audit.capture.batch import default_batch_adapter

    tap = GradientTap(net, "fc")
    return Snapshotter(tap, {"fc.weight"}, {"fc.weight", "emb.weight"}, dict(net.named_parameters()),
                       adapter=default_batch_adapter, modality="text", **kw)


def test_trainable_parameters_are_copied_and_frozen_ones_follow_the_workers_rule():
    net = Net()
    for answer, expect in (("share", "same"), ("copy", "clone"), ("omit", None)):
        snaps = snapshotter(net)
        snaps.add_batch(0, text_batch())
        snaps.copy_params(0, Rule(answer))
        params = snaps.window.params
        assert params["fc.weight"].data_ptr() != net.fc.weight.data_ptr()  # trainable: always a copy
        if expect is None:
            assert "emb.weight" not in params
        else:
            assert torch.equal(params["emb.weight"], net.emb.weight)
            assert (params["emb.weight"].data_ptr() == net.emb.weight.data_ptr()) == (expect == "same")
        copied = snaps.window.copied_bytes
        assert copied == net.fc.weight.numel() * 4 + (net.emb.weight.numel() * 4 if answer == "copy" else 0)


def test_shared_frozen_weights_are_copied_once_to_another_attack_device():
    net = Net()
    snaps = snapshotter(net, device=torch.device("meta"))
    first = []
    for step in (0, 1):
        snaps.add_batch(step, text_batch())
        snaps.copy_params(step, Rule("share"))
        first.append(snaps.window.params["emb.weight"])
        snaps.finish()
    assert first[0].device.type == "meta" and first[0] is first[1]


def test_micro_batches_join_and_the_snapshot_carries_its_audit_and_capture_time():
    net = Net()
    snaps = snapshotter(net)
    snaps.add_batch(4, text_batch(2, 3))
    snaps.add_batch(4, text_batch(1, 5))  # a second micro-batch of the same step, longer: padded on joining
    snaps.copy_params(4, Rule("share"))
    net.fc.weight.grad = torch.full_like(net.fc.weight, 0.5)
    w = snaps.finish()
    assert w.problem() is None and w.unreleased is None and snaps.window is None
    snap, ready = snaps.snapshot(w, epoch=1, audit=7)
    assert ready is None  # CPU
    assert (snap.step, snap.epoch, snap.audit) == (4, 1, 7) and snap.capture_seconds > 0
    assert snap.batch.input_ids.shape == (3, 5) and snap.batch_size == 3
    assert torch.equal(snap.gradients["fc.weight"], net.fc.weight.grad)
    assert snap.gradients["fc.weight"].data_ptr() != net.fc.weight.grad.data_ptr()
    with pytest.raises(AttributeError):
        snap.audit = 8  # type: ignore[misc]  - a snapshot's fields are not reassigned


def test_a_window_that_cannot_be_audited_says_why():
    net = Net()
    snaps = snapshotter(net)
    snaps.adapter = lambda b: b  # an adapter that returns an image batch for a text model
    snaps.add_batch(0, ImageBatch(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long)))
    w = snaps.finish()
    assert "needs a leak_audit.TextBatch" in str(w.problem())
    snaps.add_batch(1, TextBatch(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)))
    w = snaps.finish()  # the optimizer step was never seen
    assert "not observed" in str(w.problem())
    empty = snaps.empty_snapshot(w, epoch=0, audit=3)
    assert empty.audit == 3 and empty.gradients == {} and isinstance(empty.batch, TextBatch)


def test_a_dp_step_that_released_nothing_is_marked():
    class Release:  # a DPRelease whose hook saw no optimizer step (an Opacus virtual step)
        class capture:
            @staticmethod
            def arm(names):
                pass

            @staticmethod
            def take():
                return None

    net = Net()
    snaps = snapshotter(net, release=Release())
    snaps.add_batch(0, text_batch())
    snaps.copy_params(0, Rule("share"))
    w = snaps.finish()
    assert w.problem() is None and "virtual step" in str(w.unreleased)
