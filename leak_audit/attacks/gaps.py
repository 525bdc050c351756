"""Measured gaps: where an attack of ours reads far less than published attacks report, and says so.

An auditor is only as honest as its strongest attack. Where ours is measured to fall far short of the
literature, or of what our own attack recovers exactly from the same view on other batches, its reading is a lower
bound, not evidence that the data is safe: the attack then puts one of these sentences in ``Reconstruction.info``
under :data:`~leak_audit.results.records.LOWER_BOUND` (or, for a gap the run's configuration or the whole audit
sets, the auditor puts it in the record's ``info``: :func:`dp_search_gap`, :func:`query_sentence_gap`,
:func:`span_attention_gap`), the audit
record keeps it, the gate counts the record toward a breach but never toward a pass (:mod:`leak_audit.gate.policy`),
the report shows its values as ``≥ x`` and the run warns once. A mark is the audit's: the auditor copies the first
one to every record of the audit with :data:`~leak_audit.metrics.names.SENTENCE_METRICS`, so no weaker attack's
reading decides a rule in its place. Each entry names the measurement behind it (benchmarks/README.md); an entry
goes when an attack closes its gap.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from leak_audit.attacks.base import Reconstruction
from leak_audit.capture.privacy import LOWER_BOUND_NOISE_MULTIPLIER
from leak_audit.models import TextModelSpec

__all__ = ["DECODER_BAG_UNFINISHED", "DECODER_ENDS_UNVERIFIED", "DECODER_PURSUIT_UNFINISHED",
           "DECODER_SENTENCES_MISSING", "DP_SEARCH_BOUND", "LORA_SENTENCE_ASSIGNMENT", "QUERY_SENTENCE_ASSIGNMENT",
           "SPAN_ATTENTION_UNCERTIFIED", "SPAN_SEARCH_UNFINISHED", "decoder_bag_gap", "decoder_ends_gap",
           "decoder_pursuit_gap", "decoder_sentences_gap", "dp_search_gap", "lora_sentence_gap", "query_sentence_gap",
           "span_attention_gap", "span_search_gap"]

LORA_SENTENCE_ASSIGNMENT = (
    "LoRA adapters of an encoder at B > 1: the batch's tokens come back but not which sentence each belongs to "
    "(pretrained MiniLM, r = 8 on query/value, CoLA B = 4: ROUGE-1 0.425 with the token bag exact), while published "
    "LoRA attacks (UTR, FedSpy-LLM, 2026) report ROUGE-1 > 0.99 at such batches; these sentence metrics are lower bounds"
)
"""Text attacks on an encoder's LoRA adapters (no base weight's gradient) at ``B > 1``: ``leak-audit bench text --views
lora --lora-r 8 --lora-steps 50`` gives ``span_check`` ROUGE-1 0.425 / 0.304 at B = 4 / 8 on CoLA and 0.280 / 0.168 on
SST-2 with the exact bag, ``gradient_matching`` seeded by it 0.472 at B = 4 (benchmarks/README.md, LoRA section;
docs/peft-and-images.md)."""


def lora_sentence_gap(spec: TextModelSpec, gradients: Collection[str], batch_size: int) -> str | None:
    """:data:`LORA_SENTENCE_ASSIGNMENT` when an attack reads an encoder's LoRA adapters and none of its base weights
    (``gradients``: the names it was given) at ``batch_size > 1``; ``None`` otherwise (a decoder, ``B = 1``, or a
    view with embedding or layer weights, which the full-view attacks assign to sentences)."""
    if spec.causal or batch_size <= 1:
        return None
    names = set(gradients)
    adapters, base = _adapters_and_base(spec)
    return LORA_SENTENCE_ASSIGNMENT if names & adapters and not names & base else None


def _adapters_and_base(spec: TextModelSpec) -> tuple[set[str], set[str]]:
    """The LoRA adapter weights of ``spec``, and its base weights: embedding tables and norm, every layer's linear
    weights, adapters excluded."""
    adapters = {n for layer in spec.layers for a in layer.lora for n in (a.a, a.b)}
    return adapters, (set(spec.embedding_params) | {n for layer in spec.layers for n in layer.linear_weights}) - adapters


DP_SEARCH_BOUND = (
    f"DP-SGD below noise multiplier {LOWER_BOUND_NOISE_MULTIPLIER:g}: the released gradient still ranks the private "
    "sentence above every single-token replacement and swap of it that was tried (pretrained MiniLM, full view, B = 1, "
    "C = 1: 4 of 4 CoLA sentences at sigma 0.01), while the attacks' search reads ROUGE-1 0.09 there and 0.455 at "
    "sigma 0.001; these text metrics are lower bounds set by the search, not by the noise"
)
"""Text attacks on a DP-SGD release whose noise multiplier is below
:data:`~leak_audit.capture.privacy.LOWER_BOUND_NOISE_MULTIPLIER`: ``benchmarks/dp_likelihood_probe.py --n 4`` (the
truth scores above its 50-60 nearest neighbours in 4 of 4 sentences up to σ = 0.01, in none at σ = 0.1) against
``leak-audit bench text --views full --attacks gradient_matching --max-grad-norm 1.0`` on CoLA, B = 1, with
``--n 4 --max-steps 500 --dp-noise 0.001`` (ROUGE-1 0.455) and ``--n 2 --max-steps 100 --dp-noise 0.01`` (0.09):
benchmarks/README.md, DP-SGD section; docs/privacy.md."""


def dp_search_gap(spec: object, noise_multiplier: float | None, metrics: Collection[str]) -> str | None:
    """:data:`DP_SEARCH_BOUND` for a text model's record with token or sentence metrics (``metrics``: its keys; a
    record with ``label_accuracy`` alone is a measurement: the label survives this noise, read from the classifier's
    rank-one gradient) when the run's DP-SGD noise multiplier is in ``(0, LOWER_BOUND_NOISE_MULTIPLIER)``; ``None``
    otherwise (no DP, ``σ = 0``, larger noise, or an image model, where no such gap was measured)."""
    if not isinstance(spec, TextModelSpec) or noise_multiplier is None:
        return None
    if not 0 < noise_multiplier < LOWER_BOUND_NOISE_MULTIPLIER or not set(metrics) - {"label_accuracy"}:
        return None
    return DP_SEARCH_BOUND


DECODER_PURSUIT_UNFINISHED = (
    "a decoder's LoRA adapters beyond their rank: span_decoder's prefix pursuit stopped without explaining the "
    "gradient (its relative residual stayed above the acceptance level, or its prefix tree has more leaves than the "
    "batch has sentences), so its sentences are unverified guesses (pretrained SmolLM2, r = 8, SST-2 B = 8, a batch of "
    "219 positions: residual 3.2e-3 to 3.6e-3 after 421 picks, 169-170 leaves, ROUGE-1 0.21), while published LoRA attacks (UTR, "
    "FedSpy-LLM, 2026) report ROUGE-1 > 0.99 at such batches; these sentence metrics are lower bounds"
)
"""``span_decoder`` on a decoder's LoRA adapters beyond their rank when its joint sparse recovery of the prefix tree
(:func:`~leak_audit.attacks.text.decoder_pursuit.pursue_prefixes`) does not close. Measured with ``leak-audit bench
text --model smollm2 --task causal-lm --views lora --attacks span_decoder --lora-r 8 --lora-steps 50 --n 16``: on
SST-2 the second batch of 8 ends at relative residual 3.2e-3 to 3.6e-3 (two runs) with 169-170 leaves (ROUGE-1
0.21); the other SST-2 batches of 4 and 8 and the CoLA batches of 8 close below 1e-6 with one leaf per sentence
(ROUGE-1 0.96-1.0) and carry no mark (``benchmarks/decoder_pursuit_probe.py``; docs/decoders.md, LoRA section)."""


def decoder_pursuit_gap(pursuit: Mapping[str, object], accept: float, leaves: int, batch_size: int) -> str | None:
    """:data:`DECODER_PURSUIT_UNFINISHED` when the prefix pursuit did not close: ``pursuit["pursuit_residual"]`` (its
    relative residual after pruning) above ``accept`` (``SpanDecoder.pursuit_accept``, the level at which its token
    bag counts as complete), or more ``leaves`` (sentences found) than ``batch_size``; ``None`` otherwise (fewer leaves
    with a closed fit can be a batch with repeated sentences, which the fit explains)."""
    residual = pursuit.get("pursuit_residual")
    unexplained = not isinstance(residual, (int, float)) or residual > accept
    return DECODER_PURSUIT_UNFINISHED if unexplained or leaves > batch_size else None


DECODER_BAG_UNFINISHED = (
    "a decoder's LoRA adapters beyond their rank: span_decoder's token-bag pursuit did not explain layer 0's adapter "
    "gradients (with lora_dropout, each adapter sees its inputs under its own dropout mask, so no set of vocabulary "
    "inputs spans the rows), so it returned a partial bag ranked against the rows and no sentence (pretrained "
    "SmolLM2, r = 8 on q_proj/v_proj, lora_dropout 0.1, CoLA, training-mode gradients: token recall 0.72 at B = 1 "
    "and 0.11 at B = 4, precision 0.97 and 1.0), while the same view without dropout gives ROUGE-1 0.997 at B = 1 "
    "and 1.000 at B = 4; these token metrics are lower bounds"
)
"""``span_decoder`` on a decoder's LoRA adapters beyond their rank when the joint sparse recovery of the token bag
(:func:`~leak_audit.attacks.text.sparse_bag.sparse_bag`) does not close below ``SpanDecoder.pursuit_accept`` within
its uniqueness bound and the attack falls back to the ranked partial bag (not when the audit's deadline cut it: that
record is a timeout). Measured with ``leak-audit bench text --model smollm2 --task causal-lm --data
../shared/data/cola_dev.tsv --n 16 --batch-sizes 1,4 --views lora --attacks span_decoder --lora-r 8 --lora-steps 50
--dropout on --lora-dropout 0.1 --seed 0`` (docs/decoders.md, LoRA section)."""


def decoder_bag_gap(residual: float, accept: float, cut: bool) -> str | None:
    """:data:`DECODER_BAG_UNFINISHED` when the token bag's sparse recovery ended above ``accept`` (its relative
    ``residual``) without the deadline stopping it (``cut``: a timeout says that already); ``None`` otherwise."""
    return DECODER_BAG_UNFINISHED if residual > accept and not cut else None


DECODER_SENTENCES_MISSING = (
    "a decoder: span_decoder read fewer sentences than the batch holds, so the rest of the batch is unread (pretrained "
    "SmolLM2, LoRA r = 8 on q_proj/v_proj after 50 steps, the 16 CoLA batches of 4: 15 exact; in the 12th, the first "
    "position's massive activations spread layer 0's adapter rows over singular values 650 to 4.9e-5, so the rank "
    "at relative tolerance 1e-6 was 11 of 16, the span test took 2 tokens and one sentence came back, ROUGE-1 0.20, "
    "gradient residual 0.99999, before the balanced reading of such rows); these sentence metrics are lower bounds"
)
"""``span_decoder`` returned fewer sentences than ``B`` without the deadline stopping it (a batch that repeats a sentence
is read as fewer too; its mark is then conservative). Measured with ``leak-audit bench text --model smollm2 --task
causal-lm --data ../shared/data/cola_dev.tsv --n 64 --batch-sizes 4 --views lora --attacks span_decoder --lora-r 8
--lora-steps 50 --seed 0`` and ``benchmarks/decoder_pursuit_probe.py`` (docs/decoders.md, LoRA section)."""


def decoder_sentences_gap(found: int, batch_size: int, cut: bool) -> str | None:
    """:data:`DECODER_SENTENCES_MISSING` when ``found < batch_size`` sentences came back and the deadline did not cut
    the reading (``cut``: the record is a timeout then); ``None`` otherwise."""
    return DECODER_SENTENCES_MISSING if found < batch_size and not cut else None


DECODER_ENDS_UNVERIFIED = (
    "a decoder's LoRA adapters under massive activations: span_decoder read their rows in a balanced frame, where "
    "float32 round-off of the few massive directions hides the smallest contributions (a sentence's last positions), "
    "and a sentence's last token matched no candidate, so that sentence may be cut short (pretrained SmolLM2, r = 8 "
    "after 50 steps, CoLA dev 44-47: 'They represented seriously to the dean Mary as a genuine' for '... genuine "
    "linguist.', the attacker's own gradient residual 0.12, the other three sentences exact); these sentence metrics "
    "are lower bounds"
)
"""``span_decoder`` read layer 0's adapter rows in the balanced frame (:func:`~leak_audit.attacks.spans.balanced_rows`:
the rank read at ``rtol`` fell short of the rows) and some sentence's last token did not match. There the pursuit
closes at round-off level rather than exactly, so an unmatched end is no longer just a missing last token. Measured
with ``leak-audit bench text --model smollm2 --task causal-lm --data ../shared/data/cola_dev.tsv --n 64 --batch-sizes
4,8 --views lora --attacks span_decoder --lora-r 8 --lora-steps 50 --seed 0`` (docs/decoders.md, LoRA section)."""


def decoder_ends_gap(balanced: bool, ends: Sequence[int | None]) -> str | None:
    """:data:`DECODER_ENDS_UNVERIFIED` when the rows were read ``balanced`` and some entry of ``ends`` (each sentence's
    matched last token) is ``None``; ``None`` otherwise."""
    return DECODER_ENDS_UNVERIFIED if balanced and any(t is None for t in ends) else None


SPAN_SEARCH_UNFINISHED = (
    "one linear layer deep inside an encoder: span_search stopped at a span distance D > 0, so its sequences are "
    "not certified; on a gradient without dropout or noise the private batch has D = 0, so a sequence that explains "
    "the gradient exactly exists and the search did not reach it in its time (pretrained MiniLM, layer 3's query "
    "alone, B = 1, span_search's 30 s: the first 8 CoLA dev sentences all certified, but only 38 of the first 64 "
    "SST-2 reviews, ROUGE-1 0.923, and 28 without bfloat16 screening); these sentence metrics are lower bounds"
)
"""``span_search`` ended without certifying its sequences (``D`` above ``exact_tol``) on a gradient without DP noise,
from a view without layer 0's linear weights.
Measured with ``leak-audit bench text --data ../shared/data/sst2_dev.tsv --n 64 --batch-sizes 1 --views
linear:bert.encoder.layer.3.attention.self.query --attacks span_search --dropout off --seed 0 --max-seconds 60
--threads 2`` (ROUGE-1 0.923, exact 38 of 64; 0.881 and 28 with ``--screen off``; with ``cola_dev.tsv --n 8
--max-seconds 30``: 8 of 8 exact; benchmarks/README.md, "Screening in bfloat16"). A training-mode gradient
(dropout on) has ``D > 0`` at the truth as well; span search is not measured there, so its uncertified reading is
marked too. Under DP noise ``D > 0`` at the truth, and
:func:`dp_search_gap` decides."""


def span_search_gap(spec: TextModelSpec, gradients: Collection[str], exact: bool, noise_std: float) -> str | None:
    """:data:`SPAN_SEARCH_UNFINISHED` when ``span_search`` ended uncertified (not ``exact``) on a gradient without
    noise (``noise_std == 0``) and its view (``gradients``: the names it was given) holds no linear weight of layer 0;
    ``None`` otherwise: a certified result, a noised gradient (:func:`dp_search_gap`), or a view with layer 0's
    weights, where the layer-0 attacks (``span_check``, ``span_attention``, ``span_cluster``) read the batch and their
    own gaps apply."""
    first = set(spec.layers[0].linear_weights) if spec.layers else set()
    return SPAN_SEARCH_UNFINISHED if not exact and noise_std == 0 and not first & set(gradients) else None


QUERY_SENTENCE_ASSIGNMENT = (
    "layer 0's attention query weight alone at B > 1: span_check finds each position's tokens but not which sentence "
    "each belongs to, and span_cluster, which assigns them and certifies each sentence by its exact gradient, did not "
    "certify the whole batch, while on the batches it certifies it recovers every sentence exactly (pretrained "
    "MiniLM, SST-2 B = 4: where it certified 4 of 4, in 6 of 16 batches, ROUGE-1 was 1.0; where it certified 0-2, in "
    "the other 10, ROUGE-1 was 0.27-0.86; span_check read 0.25-0.53 in all 16); these sentence metrics are lower bounds"
)
"""Sentence records of an audit that sees layer 0's attention query weight and no other base weight of an encoder at
``B > 1``, when ``span_cluster`` did not certify all ``B`` sentences. Measured with ``leak-audit bench text --data
../shared/data/sst2_dev.tsv --n 64 --batch-sizes 4 --views linear:bert.encoder.layer.0.attention.self.query --attacks
span_check,span_attention,span_cluster --dropout off --seed 0 --max-seconds 30`` and a per-batch print
(``benchmarks/query_assignment_probe.py --data ../shared/data/sst2_dev.tsv --batch-sizes 4``): ``span_cluster``'s
``info["certified"]`` equalled its count of exact sentences in all 16 batches. On CoLA it certified all 16 batches of
4 (ROUGE-1 1.0, no mark) and 2 of 4 batches of 16; the third certified 4 of 16 (ROUGE-1 0.72) and the fourth timed
out, both marked. The mark is the audit's, not one attack's: with only ``span_cluster``'s record marked,
``span_check``'s lower reading would decide a ``last`` or ``mean_last_k`` rule (docs/gate-and-report.md, "Lower
bounds")."""


def query_sentence_gap(spec: object, gradients: Collection[str], batch_size: int, noise_std: float,
                       priors: Mapping[str, Reconstruction], attacks: Collection[str] = ()) -> str | None:
    """:data:`QUERY_SENTENCE_ASSIGNMENT`, with this audit's count, for an encoder's audit whose view (``gradients``:
    the tapped names) holds layer 0's attention query weight and no other embedding or layer weight, at
    ``batch_size > 1`` on exact gradients, unless ``priors["span_cluster"]`` (the audit's finished, untimed
    ``span_cluster`` reconstruction, if any) certified all ``batch_size`` sentences (``info["certified"]``).
    ``attacks``: the audit's attack names, so that the sentence can say when ``span_cluster`` was not among them.

    Exact means no DP noise (``noise_std == 0``) and no dropout mask, by the attacks' own evidence: ``span_cluster``
    finished (it runs only on a gradient spanned by the bag's tokens and positions) or ``span_check`` read the gradient
    without its dropout mode (``info["dropout_mode"] == 0``: exact span members showed). ``None`` otherwise: another
    view or model, ``B = 1``, DP noise, a training-mode gradient or a batch whose gradient rank fills the hidden size
    (no such gap measured there; :func:`dp_search_gap` covers small noise), or a certified batch, whose sentences
    ``span_cluster`` returns exactly."""
    if not isinstance(spec, TextModelSpec) or spec.causal or not spec.layers or batch_size <= 1 or noise_std > 0:
        return None
    if set(gradients) & _adapters_and_base(spec)[1] != {spec.layers[0].query}:
        return None
    cluster, check = priors.get("span_cluster"), priors.get("span_check")
    if cluster is None and (check is None or check.info.get("dropout_mode") != 0):
        return None  # no evidence that the gradient is exact
    rank = check.info.get("rank") if check is not None else None
    if cluster is None and isinstance(rank, int) and rank >= spec.hidden_size - 8:
        return None  # past the span methods' physical limit (span_cluster skips there): no such gap measured
    return _uncertified(QUERY_SENTENCE_ASSIGNMENT, "span_cluster", cluster, batch_size, attacks)


def _uncertified(reason: str, name: str, prior: Reconstruction | None, batch_size: int,
                 attacks: Collection[str]) -> str | None:
    """``reason`` with this audit's finding, unless ``prior`` (attack ``name``'s finished reconstruction, if any)
    certified all ``batch_size`` sentences (``info["certified"]``)."""
    certified = prior.info.get("certified") if prior is not None else None
    if isinstance(certified, int) and certified >= batch_size:
        return None
    if isinstance(certified, int):
        found = f"{name} certified {certified} of {batch_size}"
    elif prior is not None:
        found = f"{name} ran without its certificates (peel=False)"
    elif name not in attacks:
        found = f"{name} is not among its attacks; add it to read the sentences"
    else:
        found = f"{name} did not finish: timed out, skipped or failed"
    return f"{reason} (this audit: {found})"


SPAN_ATTENTION_UNCERTIFIED = (
    "an encoder's embeddings and first layer at B > 1 (the full view): span_check finds each position's tokens but not "
    "which sentence each belongs to, and span_attention, which assigns them and certifies each sentence exactly, did "
    "not certify the whole batch, while where it does it recovers every sentence (pretrained MiniLM, CoLA: 64 of 64 "
    "sentences at B = 4 and 8, dropout on or off; SST-2 at B = 8 with dropout on: 14 of 64, where span_check read "
    "ROUGE-1 0.21); these sentence metrics are lower bounds"
)
"""Sentence records of an encoder's audit whose view holds what ``span_attention`` reads (the word and position
embeddings, layer 0's attention output and FFN weights) at ``B > 1`` on gradients without DP noise, unless
``span_attention`` certified all ``B`` sentences. Measured with ``leak-audit bench text --data
../shared/data/cola_dev.tsv --n 64 --batch-sizes 8 --views full --attacks span_check,span_attention,token_bag,best
--dropout on --seed 0 --threads 2``: ``span_attention`` ROUGE-1 1.000 (64 of 64, each certified; 0.406 before the
dropout-mask search of :mod:`~leak_audit.attacks.text.dropout_masks` found every instance of repeated tokens),
``span_check`` 0.366; on ``sst2_dev.tsv`` 0.219 (14 of 64) and 0.209. With ``--dropout off`` it certified all 64 of
both at B = 8 (0.78 and 1.30 s per batch); at ``--batch-sizes 4`` all 64 of both both ways (62 of 64 SST-2 reviews with
dropout on before the mask search) (benchmarks/README.md). SST-2's batches of 8 hold 196 tokens on average against MiniLM's 384
dimensions, and there the mask search misses first instances, so the membership linear program of a sentence with a
missing member does not close. Its ``info["certified"]`` counts the sentences it returns, each certified, so a
batch it certified whole is exact and unmarked."""


def span_attention_gap(spec: object, gradients: Collection[str], batch_size: int, noise_std: float,
                       priors: Mapping[str, Reconstruction], attacks: Collection[str] = ()) -> str | None:
    """:data:`SPAN_ATTENTION_UNCERTIFIED`, with this audit's count, for an encoder's audit at ``batch_size > 1``
    without DP noise whose view (``gradients``: the tapped names) holds the word and position embeddings and layer
    0's attention output and FFN weights, unless ``priors["span_attention"]`` (the audit's finished, untimed
    reconstruction, if any) certified all ``batch_size`` sentences. ``attacks``: the audit's attack names, so that
    the sentence can say when ``span_attention`` was not among them.

    ``None`` otherwise, and where ``span_check`` found the first layer's rank within 8 of the hidden size (the batch
    fills the space: the span methods' physical limit, where no such gap is measured)."""
    if not isinstance(spec, TextModelSpec) or spec.causal or not spec.layers or batch_size <= 1 or noise_std > 0:
        return None
    layer = spec.layers[0]
    needed = (spec.word_embeddings, spec.position_embeddings, layer.attention_output, layer.ffn_input,
              layer.ffn_output)
    if not all(n and n in gradients for n in needed):
        return None
    attention, check = priors.get("span_attention"), priors.get("span_check")
    rank = check.info.get("rank") if check is not None else None
    if attention is None and isinstance(rank, int) and rank >= spec.hidden_size - 8:
        return None
    return _uncertified(SPAN_ATTENTION_UNCERTIFIED, "span_attention", attention, batch_size, attacks)
