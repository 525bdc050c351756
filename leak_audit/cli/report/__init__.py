"""``leak-audit report AUDIT.jsonl -o report.html``: one self-contained HTML page about an audit log.

The page is a single file that loads nothing: inline CSS, no JavaScript, plots drawn with matplotlib's
Agg renderer and embedded as base64 PNG ``data:`` URIs, no fonts, no links to any server. A
Content-Security-Policy ``<meta>`` (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``) makes a
browser refuse anything else, so the page cannot reach the network even if a log held hostile text.
Every string that comes from the log (paths, attack and module names, errors, privacy fields, samples)
is HTML-escaped.

What the page shows, top to bottom:

1. **Run summary**: the log's path, audits (distinct ``(audit, step)`` pairs), records ok / failed /
   skipped, step and epoch range, attacks, tapped module sets, batch sizes, time span and, for DP-SGD
   runs, the privacy parameters and the last ε (steps, time span and DP-SGD one row per run when the log
   holds several runs).
2. **Gate**: with a policy (:class:`leak_audit.gate.policy.GatePolicy`, the one ``leak-audit gate`` applies),
   its verdict, PASS / WARN / BREACH, and one row per rule (value, thresholds, status, message, where).
   Without one, "no policy given". In both cases the worst value of each metric over the successful
   records, and where it was reached.
3. **Plots** (each skipped with a one-line note when it has no data):
   (a) leakage against the optimizer step, one line per attack, one panel per headline metric present
   (``rouge1``, ``token_recall``, ``exact_match`` for text; ``psnr``, ``ssim`` for images; other metrics
   only when none of these is present); (b) the same, worst over attacks, one line per tapped module set,
   when the log has more than one; (c) worst leakage against ε for records whose ``privacy.epsilon`` is a
   number (DP-SGD runs); (d) attack seconds per audited step, per attack and in total.
4. **Audits**: one table row per record (step, audit, attack, status, every metric, ε under DP, seconds,
   error).
5. **Privacy**: reconstructed text and images (``record.samples``) are the private data the attacks
   recovered. They are **never** on the page unless ``include_samples=True`` (``--include-samples``); the
   page says which. With it, text samples are shown as escaped text, and image samples (``.npz`` files
   next to the log) as originals above reconstructions. Record ``info`` dicts are never shown.

The report never judges: a breach of the policy is shown, but ``leak-audit report`` still exits 0 when
the page was written (``leak-audit gate`` is the command whose exit code fails a release). It exits 2 on
bad input: a missing or malformed log, a bad policy or threshold, an unwritable output.

The package, along the page's seams: :mod:`~leak_audit.cli.report.page` assembles the page
(:func:`render_report`, :func:`write_report`), :mod:`~leak_audit.cli.report.sections` writes its HTML
sections, :mod:`~leak_audit.cli.report.plots` draws the plots, :mod:`~leak_audit.cli.report.format` holds
the escaping and number formats they share, and :mod:`~leak_audit.cli.report.command` is the
``leak-audit report`` subcommand.
"""
from leak_audit.cli.report.format import HEADLINE_METRICS
from leak_audit.cli.report.page import ReportError, render_report, write_report

__all__ = ["HEADLINE_METRICS", "ReportError", "render_report", "write_report"]
