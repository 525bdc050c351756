"""Training-thread side of an audit.

Which gradients are tapped (:mod:`~leak_audit.capture.tap`), what is read from the batch
(:mod:`~leak_audit.capture.batch`), the snapshot handed to the background (:mod:`~leak_audit.capture.snapshot`)
and the snapshotter that builds it hook by hook over an accumulation window
(:mod:`~leak_audit.capture.snapshotter`), the gradient DP-SGD releases (:mod:`~leak_audit.capture.privacy`),
and the DDP gather (:mod:`~leak_audit.capture.distributed`).

Everything here runs inside the Trainer's hooks and must stay cheap: it copies, it never attacks.
"""
