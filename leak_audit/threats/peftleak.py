"""PEFTLeak: a malicious model provider rebuilds whole image batches from bottleneck-adapter gradients.

Threat model (Sami et al., "Gradient Inversion Attacks on Parameter-Efficient Fine-Tuning", CVPR 2025):
the party that ships the frozen pretrained ViT and the initial adapters (a federated-learning server, a
model hub) crafts both; the user fine-tunes only the adapters and shares their gradients. The audit
question is "what would a malicious provider learn from my adapter gradients?": build the crafted model
for your ViT configuration and adapter size with :func:`malicious_vit`, take one training step on your
batch, and hand the adapter gradients to :func:`peftleak`.

Construction (PEFTLeak's, with our choices where the paper leaves room; all exact, no optimisation):

* **Transparent backbone.** The patch embedding copies each patch's ``P = C·p·p`` pixels into hidden
  dimensions ``[0, P)``; position ``t`` adds a code ``κ·e_{P+t}``. Every attention layer attends from each
  token to itself only (queries and keys read the position codes), with identity values and output; every
  MLP is the identity (``W₂ act(W₁ y) = y`` with ``W₁ = [I; −I]``, ``W₂ = [I, −I]``, exact for GELU, ReLU,
  SiLU). So every adapter's input is ``u_t = LayerNorm(x_t)``, the normalised patch with its code.
* **Binned adapter units.** The down-projection units are split into *chains*, one per (patch position,
  measurement). Units of a chain share one row (a random direction on the patch plus the position code,
  which switches off tokens at other positions) and have biases at increasing quantiles of that
  measurement over *public* images; all up-projection columns are the same small vector ``ε·v``. A token
  then activates the first ``k`` units of the chain, and the difference of adjacent units' gradients is
  the sum over the tokens of one bin: ``x = ∂L/∂w_i ÷ ∂L/∂b_i`` when one token falls in the bin (Fowl et al.
  2022's imprint, applied to adapter units).
* **Peeling.** With several measurements per position a token that shares a bin in one chain is often
  alone in another; once known, its contribution is subtracted from every bin it falls in, which frees
  further tokens (our addition; the paper uses one binning per adapter).
* **Grouping patches into images.** The last layer averages all tokens into the class token through a
  value that reads ``v``, so each token's bias gradient is ``s_b / (T (σ_t + d + 1))``: ``s_b`` depends on
  the image only, ``σ_t`` is the token's embedding standard deviation (known once the patch is) and ``d``
  the adapter's depth (our choice; the paper clusters patches like Fowl et al. 2023). Tokens with equal
  ``s`` belong to one image.

Patches never recovered are filled with the public mean image.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from leak_audit.attacks.budget import late
from leak_audit.threats.vit_adapters import AdaptedLinear, AdapterSite, add_bottleneck_adapters, vit_layers

__all__ = ["Chain", "PEFTLeakDesign", "PEFTLeakReconstruction", "malicious_vit", "peftleak"]


@dataclass(frozen=True)
class Chain:
    """Adapter units ``[start, start + length)`` of ``site`` binning patch ``position`` along ``direction``.

    ``thresholds`` (``[length]``, increasing) are the units' activation thresholds of the measurement
    ``direction · u`` (``direction``: ``[D]``); ``depth`` is the site's sublayer index in forward order.
    """

    site: str
    depth: int
    start: int
    length: int
    position: int
    direction: Tensor
    thresholds: Tensor


@dataclass
class PEFTLeakDesign:
    """Everything the attacker knows about the crafted model (returned by :func:`malicious_vit`)."""

    image_size: int
    patch_size: int
    channels: int
    hidden_size: int
    kappa: float
    epsilon: float
    sites: list[AdapterSite]
    chains: list[Chain]
    public_mean: Tensor  # [C, H, W]

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2

    @property
    def units(self) -> int:
        return sum(c.length for c in self.chains)


@dataclass
class PEFTLeakReconstruction:
    """Result of :func:`peftleak`.

    Attributes:
        images: ``[B, C, H, W]`` rebuilt images (unrecovered patches hold the public mean image).
        patches: ``[n, C, p, p]`` recovered patches; ``positions`` ``[n]`` their patch index (row-major);
            ``image_index`` ``[n]`` the image each was assigned to.
        recovered_fraction: the fraction of the ``B · positions`` patch slots filled with a recovered patch.
        seconds: wall time.
    """

    images: Tensor
    patches: Tensor
    positions: Tensor
    image_index: Tensor
    recovered_fraction: float
    seconds: float
    rounds: int = 0
    signatures: Tensor = field(default_factory=lambda: torch.empty(0))


def _check_identity_activation(act: nn.Module) -> None:
    z = torch.linspace(-6, 6, 101, dtype=torch.float64)
    if not torch.allclose(act(z) - act(-z), z, atol=1e-6):
        raise ValueError(
            "the config's hidden_act must satisfy act(z) - act(-z) = z (gelu, gelu_new, relu, silu) so that the "
            "MLP can be made the identity"
        )


def malicious_vit(
    config: object,
    public_images: Tensor,
    r: int = 64,
    placement: str = "houlsby",
    measurements: int = 3,
    kappa: float = 100.0,
    epsilon: float = 1e-5,
    seed: int = 0,
) -> tuple[nn.Module, PEFTLeakDesign]:
    """Build PEFTLeak's crafted ViT with bottleneck adapters from a ``transformers`` ``ViTConfig``.

    Args:
        config: a ``ViTConfig``. Needs ``hidden_size ≥ P + T + 3`` (``P = channels·patch²`` pixels per
            patch, ``T`` = patches + 1 tokens), ``hidden_size / num_attention_heads ≥ T``,
            ``intermediate_size ≥ 2·hidden_size``, ``num_hidden_layers ≥ 2`` and an activation with
            ``act(z) − act(−z) = z``. Dropout is set to 0 (the provider ships the config).
        public_images: ``[M, C, H, W]`` images of the same value range as the user's (the provider's
            public data); bin thresholds are quantiles of their patch measurements.
        r: bottleneck dimension of every adapter.
        placement: ``"houlsby"`` (2 adapters per layer) or ``"pfeiffer"`` (1).
        measurements: chains (independent binnings) per patch position; more chains free more tokens by
            peeling, fewer give longer chains (finer bins).
        kappa: position-code magnitude (≫ patch norms keeps every token's LayerNorm scale nearly equal).
        epsilon: up-projection scale (small: adapters barely perturb the stream).
        seed: random measurement directions and classifier.

    Returns:
        ``(model, design)``: a ``ViTForImageClassification`` in train mode whose only trainable
        parameters are the adapters and the classifier, and the :class:`PEFTLeakDesign` the attack needs.

    Raises:
        ValueError: the config cannot host the construction (the message says which bound fails), the
            adapters have fewer than 2 units per chain, or ``public_images`` has the wrong shape.
    """
    from transformers import ViTForImageClassification

    cfg = copy.deepcopy(config)
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        setattr(cfg, attr, 0.0)
    D, ps, C, H = cfg.hidden_size, cfg.patch_size, cfg.num_channels, cfg.image_size
    if H % ps:
        raise ValueError(f"image_size {H} is not a multiple of patch_size {ps}")
    N, P = (H // ps) ** 2, C * ps * ps
    T = N + 1
    heads = cfg.num_attention_heads
    hd = D // heads
    problems = []
    if D < P + T + 3:
        problems.append(f"hidden_size {D} < patch pixels {P} + tokens {T} + 3")
    if hd < T:
        problems.append(f"head dim {hd} < tokens {T}")
    if cfg.intermediate_size < 2 * D:
        problems.append(f"intermediate_size {cfg.intermediate_size} < 2 * hidden_size")
    if cfg.num_hidden_layers < 2:
        problems.append("num_hidden_layers < 2")
    if problems:
        raise ValueError("this ViTConfig cannot host PEFTLeak's construction: " + "; ".join(problems))
    if public_images.dim() != 4 or tuple(public_images.shape[1:]) != (C, H, H):
        raise ValueError(f"public_images must be [M, {C}, {H}, {H}], got {tuple(public_images.shape)}")
    if measurements < 1:
        raise ValueError(f"measurements must be >= 1, got {measurements}")

    torch.manual_seed(seed)  # transformers' own initialisation; every weight is overwritten below
    model = ViTForImageClassification(cfg)
    sites = add_bottleneck_adapters(model, r=r, placement=placement, train_head=True)
    layers = vit_layers(model)
    L = len(layers)
    _check_identity_activation(layers[0].mlp.activation_fn)
    gen = torch.Generator().manual_seed(seed)
    spare = list(range(P + T, D))
    v_dims, out_dims = spare[:2], spare[2:]
    v = torch.zeros(D)
    v[v_dims[0]], v[v_dims[1]] = 1.0, -1.0

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.vit.embeddings
        proj = emb.patch_embeddings.projection.weight  # [D, C, p, p]
        proj.view(D, P)[:P] = torch.eye(P)
        emb.position_embeddings[0, torch.arange(T), P + torch.arange(T)] = kappa
        for ln in [m for m in model.modules() if isinstance(m, nn.LayerNorm)]:
            ln.weight.fill_(1.0)
        eye = torch.eye(D)
        for layer in layers[:-1]:
            att = layer.attention
            for h in range(heads):  # every head: queries/keys read the position codes -> self attention
                rows = h * hd + torch.arange(T)
                att.q_proj.weight[rows, P + torch.arange(T)] = 1.0
                att.k_proj.weight[rows, P + torch.arange(T)] = 1.0
            att.v_proj.weight.copy_(eye)
            _frozen(att.o_proj).weight.copy_(eye)
            fc1, fc2 = layer.mlp.fc1, _frozen(layer.mlp.fc2)
            fc1.weight[:D] = eye
            fc1.weight[D : 2 * D] = -eye
            fc2.weight[:, :D] = eye
            fc2.weight[:, D : 2 * D] = -eye
        last = layers[-1].attention  # head 0 averages every token into the class token
        last.v_proj.weight[0] = v
        last.v_proj.weight[1:hd, :P] = torch.randn(hd - 1, P, generator=gen) / math.sqrt(P)
        _frozen(last.o_proj).weight[out_dims, :hd] = torch.randn(len(out_dims), hd, generator=gen)
        model.classifier.weight[:, out_dims] = torch.randn(cfg.num_labels, len(out_dims), generator=gen) * 4.0

    # measurements of public tokens: u = LayerNorm(x) per (image, position)
    pub = _patches(public_images.double(), ps)  # [M, N, P]
    M = pub.shape[0]
    x = torch.zeros(M, N, D, dtype=torch.float64)
    x[..., :P] = pub
    x[:, torch.arange(N), P + 1 + torch.arange(N)] = kappa
    u = torch.nn.functional.layer_norm(x, (D,), eps=cfg.layer_norm_eps)

    usable = [s for s in sites if s.layer < L - 1]
    depth = {s.name: 2 * s.layer + (1 if s.sublayer == "mlp" else 0) for s in sites}
    n_chains = N * measurements
    if sum(r for _ in usable) < 2 * n_chains:
        raise ValueError(
            f"{len(usable)} usable adapters x r={r} units < 2 units x {N} positions x {measurements} measurements; "
            "raise r, add layers, or lower measurements"
        )
    base, extra = divmod(n_chains, len(usable))  # chains per site, as even as possible
    slots: list[tuple[AdapterSite, int, int]] = []  # (site, start, length)
    for i, s in enumerate(usable):
        k = base + (i < extra)
        bounds = [round(j * r / k) for j in range(k + 1)] if k else [0]
        slots += [(s, bounds[j], bounds[j + 1] - bounds[j]) for j in range(k)]
    if len(slots) < n_chains or min(length for _, _, length in slots) < 2:
        raise ValueError(f"r={r} leaves fewer than 2 units per chain for {n_chains} chains; raise r or lower measurements")
    chains: list[Chain] = []
    with torch.no_grad():
        for idx, (site, start, length) in enumerate(slots):
            k, pos = divmod(idx, N)
            d = torch.zeros(D, dtype=torch.float64)
            if k == 0:
                d[:P] = 1.0 / math.sqrt(P)  # brightness
            else:
                d[:P] = torch.randn(P, generator=gen, dtype=torch.float64)
                d[:P] /= d[:P].norm()
            meas = u @ d  # [M, N]
            spread = meas.abs().max().item()
            code = u[:, :, P + 1 + pos]  # own code entry of every token
            own, other = code[:, pos], torch.cat([code[:, :pos], code[:, pos + 1 :]], 1)
            gap = own.min().item() - other.max().item()
            d[P + 1 + pos] = 6.0 * spread / gap  # position code outweighs the patch term 3:1 either side
            m = u @ d
            m_own = m[:, pos]
            m_other = torch.cat([m[:, :pos], m[:, pos + 1 :]], 1)
            lo = 0.5 * (m_own.min() + m_other.max())
            qs = torch.quantile(m_own, torch.arange(1, length, dtype=torch.float64) / length)
            thresholds = torch.cat([lo.view(1), qs])
            thresholds = torch.cummax(thresholds, 0).values
            scale = 1.0 / float(m_own.max() - lo)
            adapter = model.get_submodule(site.name)
            rows = slice(start, start + length)
            adapter.down.weight[rows] = (scale * d).float()
            adapter.down.bias[rows] = (-scale * thresholds).float()
            chains.append(Chain(site.name, depth[site.name], start, length, pos, d, thresholds))
        for s in sites:  # every used unit writes eps * v; unused units stay off (zero row, bias -1)
            adapter = model.get_submodule(s.name)
            used = torch.zeros(r, dtype=torch.bool)
            for c in chains:
                if c.site == s.name:
                    used[c.start : c.start + c.length] = True
            adapter.down.bias[~used] = -1.0
            adapter.up.weight[:, used] = epsilon * v.view(D, 1)
    model.train()
    design = PEFTLeakDesign(
        image_size=H, patch_size=ps, channels=C, hidden_size=D, kappa=kappa, epsilon=epsilon, sites=sites,
        chains=chains, public_mean=public_images.float().mean(0),
    )
    return model, design


def _frozen(linear: nn.Module) -> nn.Linear:
    """The backbone ``nn.Linear`` of an output projection, with or without an adapter after it."""
    return linear.base if isinstance(linear, AdaptedLinear) else linear


def _patches(images: Tensor, ps: int) -> Tensor:
    """``[B, C, H, W]`` to ``[B, N, C·p·p]`` patches in the ViT's order (row-major grid; channel, row, column)."""
    B, C, H, W = images.shape
    g = H // ps
    return images.reshape(B, C, g, ps, g, ps).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * ps * ps)


@dataclass
class _Token:
    position: int
    u: Tensor  # [D] float64 LayerNorm output
    pixels: Tensor  # [P]
    sigma: float  # embedding std
    signature: float


def peftleak(
    gradients: Mapping[str, Tensor],
    design: PEFTLeakDesign,
    batch_size: int,
    max_rounds: int = 20,
    tol: float = 1e-6,
    group_tol: float = 2e-4,
    deadline: float | None = None,
) -> PEFTLeakReconstruction:
    """Rebuild a batch from the adapter gradients of a :func:`malicious_vit` model.

    Args:
        gradients: ``{name: grad}`` holding ``{site}.down.weight`` ``[r, D]`` and ``{site}.down.bias``
            ``[r]`` for every adapter site (batch-mean loss, as training computes it).
        design: the crafted model's :class:`PEFTLeakDesign`.
        batch_size: ``B``, the number of images in the batch.
        max_rounds: peeling rounds.
        tol: relative tolerance of the single-token test (mean 0, squared norm ``D``, one code spike).
        group_tol: relative signature difference within which two tokens belong to one image.
        deadline: ``time.monotonic()`` after which peeling stops.

    Returns:
        A :class:`PEFTLeakReconstruction`.

    Raises:
        KeyError: a site's down-projection gradient is missing (the message names it).
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    D, P, N, kappa = design.hidden_size, design.patch_dim, design.num_positions, design.kappa
    T = N + 1
    bins: list[tuple[Chain, Tensor, Tensor, Tensor]] = []  # chain, [n, D] and [n] bin sums, [n] rounding scale
    for c in design.chains:
        for suffix in ("down.weight", "down.bias"):
            if f"{c.site}.{suffix}" not in gradients:
                raise KeyError(f"gradient of {c.site}.{suffix} is missing; PEFTLeak reads every adapter's down-projection")
        gw = gradients[f"{c.site}.down.weight"][c.start : c.start + c.length].double()
        gb = gradients[f"{c.site}.down.bias"][c.start : c.start + c.length].double()
        sw = torch.cat([gw[:-1] - gw[1:], gw[-1:]])
        sb = torch.cat([gb[:-1] - gb[1:], gb[-1:]])
        # a bin sum is a difference of two running sums: its rounding error scales with their size
        noise = torch.finfo(gradients[f"{c.site}.down.bias"].dtype).eps * (gb.abs() + torch.cat([gb[1:].abs(), gb.new_zeros(1)]))
        bins.append((c, sw, sb, noise))
    scale_b = max((b.abs().max().item() for _, _, b, _ in bins), default=0.0)
    tokens: list[_Token] = []
    members: list[list[list[int]]] = [[[] for _ in range(c.length)] for c, _, _, _ in bins]  # known tokens per bin

    def factor(sigma: float, depth: int) -> float:
        return 1.0 / (T * (sigma + depth + 1))

    def as_token(u: Tensor, c: Chain, bias: float, tol: float) -> _Token | None:
        own = P + 1 + c.position
        code = u[P : P + T]
        others = torch.cat([code[: c.position + 1], code[c.position + 2 :]])
        z_o = others.mean()
        spike = u[own] - z_o
        if spike <= 0 or (others - z_o).abs().max() > tol * spike:
            return None
        if abs(u.mean().item()) > tol or abs(u.pow(2).sum().item() / D - 1) > tol:
            return None
        pixels = kappa * (u[:P] - z_o) / spike
        x = torch.zeros(D, dtype=torch.float64)
        x[:P] = pixels
        x[own] = kappa
        sigma = x.std(unbiased=False).item()
        return _Token(c.position, u, pixels, sigma, bias / factor(sigma, c.depth))

    def place(ti: int) -> None:
        tok = tokens[ti]
        for ci, (c, _, _, _) in enumerate(bins):
            if c.position != tok.position:
                continue
            m = float(tok.u @ c.direction)
            k = int(torch.searchsorted(c.thresholds, torch.tensor([m], dtype=torch.float64), right=True).item()) - 1
            if k >= 0:
                members[ci][k].append(ti)

    def same(a: _Token, b: _Token) -> bool:
        return a.position == b.position and bool((a.pixels - b.pixels).abs().max() < 1e-3)

    def agree(a: float, b: float) -> bool:
        return abs(a - b) <= group_tol * max(abs(a), abs(b))

    rounds = 0
    for rounds in range(1, max_rounds + 1):
        found: list[_Token] = []  # this round's single-token candidates, from residuals of confirmed tokens
        for ci, (c, sw, sb, noise) in enumerate(bins):
            if late(deadline):
                break
            for k in range(c.length):
                rw, rb, known = sw[k].clone(), float(sb[k]), 0.0
                for ti in members[ci][k]:
                    tok = tokens[ti]
                    delta = tok.signature * factor(tok.sigma, c.depth)
                    rw -= delta * tok.u
                    rb -= delta
                    known += abs(delta)
                if abs(rb) <= max(1e-6 * scale_b, 1e-2 * known):  # empty, or only the known tokens' rounding
                    continue
                tok = as_token(rw / rb, c, rb, max(tol, 20 * (float(noise[k]) + known * 1e-7) / abs(rb)))
                if tok is None or any(same(t, tok) for t in tokens):
                    continue
                m = float(tok.u @ c.direction)  # a single token lies inside its bin
                hi = float(c.thresholds[k + 1]) if k + 1 < c.length else math.inf
                if float(c.thresholds[k]) <= m < hi:
                    found.append(tok)
        # A candidate is confirmed when another chain returns the same patch, or another token (any
        # position) has its signature: a blend of several tokens passes the single-token test only rarely,
        # and then with a signature that matches no image.
        new: list[_Token] = []
        for i, tok in enumerate(found):
            if any(same(t, tok) for t in new):
                continue
            twin = any(j != i and same(o, tok) for j, o in enumerate(found))
            kin = any(o.position != tok.position and agree(o.signature, tok.signature) for o in [*tokens, *found])
            if twin or kin:
                new.append(tok)
        for tok in new:
            tokens.append(tok)
            place(len(tokens) - 1)
        if not new:
            break

    C, ps, g = design.channels, design.patch_size, design.grid
    images = design.public_mean.unsqueeze(0).repeat(batch_size, 1, 1, 1).clone()
    sig = torch.tensor([t.signature for t in tokens], dtype=torch.float64)
    pos = torch.tensor([t.position for t in tokens], dtype=torch.long)
    assign = _group(sig, pos, batch_size, group_tol)
    filled = torch.zeros(batch_size, N, dtype=torch.bool)
    for t, b in zip(tokens, assign.tolist(), strict=True):
        if b < 0 or filled[b, t.position]:
            continue  # unassigned, or a second token of one position in a group: keep the first
        filled[b, t.position] = True
        row, col = divmod(t.position, g)
        images[b, :, row * ps : (row + 1) * ps, col * ps : (col + 1) * ps] = t.pixels.view(C, ps, ps).float()
    patches = torch.stack([t.pixels.view(C, ps, ps).float() for t in tokens]) if tokens else torch.empty(0, C, ps, ps)
    return PEFTLeakReconstruction(
        images=images,
        patches=patches,
        positions=pos,
        image_index=assign,
        recovered_fraction=float(filled.float().mean()),
        seconds=time.perf_counter() - t0,
        rounds=rounds,
        signatures=sig,
    )


def _group(signatures: Tensor, positions: Tensor, batch_size: int, rel_tol: float = 2e-4) -> Tensor:
    """Image index of each token (``-1``: unassigned) from its signature.

    Sorted signatures split where neighbours differ by more than ``rel_tol`` of their magnitude (tokens of
    one image agree to about 1e-5). When that gives more than ``B`` groups, the ``B`` largest are the
    images and each leftover token joins the nearest one whose slot at its position is free.
    """
    n = signatures.numel()
    out = torch.full((n,), -1, dtype=torch.long)
    if n == 0:
        return out
    order = torch.argsort(signatures)
    s = signatures[order]
    gap = (s[1:] - s[:-1]).abs() > rel_tol * torch.maximum(s[1:].abs(), s[:-1].abs())
    label = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(gap.long(), 0)])
    groups = [order[label == g] for g in range(int(label[-1]) + 1)]
    groups.sort(key=len, reverse=True)
    kept, rest = groups[:batch_size], groups[batch_size:]
    centre = torch.stack([signatures[g].median() for g in kept])
    taken = [set(positions[g].tolist()) for g in kept]
    for b, g in enumerate(kept):
        out[g] = b
    for g in rest:
        for i in g.tolist():
            for b in torch.argsort((centre - signatures[i]).abs()).tolist():
                if int(positions[i]) not in taken[b]:
                    out[i] = b
                    taken[b].add(int(positions[i]))
                    break
    return out
