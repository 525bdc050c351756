"""Training-thread side of an audit: which gradients are tapped, what is read from the batch, the snapshot handed to the background, the gradient DP-SGD releases, and the DDP exchange.

Everything here runs inside the Trainer's hooks and must stay cheap: it copies, it never attacks.
"""
