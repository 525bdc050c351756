"""W&B views of an audit run: metric definitions, charts, sample tables, summary and alerts.

One :class:`WandbDashboard` per ``WandbLogger`` (its ``.experiment`` run), called on the Trainer's
thread on global rank zero only (``wandb.log`` is not thread-safe). Everything here works offline
(``WANDB_MODE=offline``): charts and tables are ordinary logged objects, synced later with the run.

What it adds to the scalars every Lightning logger gets (:func:`~leak_audit.results.sinks.flatten_metrics`):

* ``define_metric``: ``leak/*``, ``privacy/*``, ``audit/*`` and ``gate/*`` are plotted against
  ``trainer/global_step``; ``leak/*`` summaries keep the maximum (the worst case), not the last value.
* ``charts/<metric>_per_attack``: one line per attack over steps (``wandb.plot.line_series``), for the
  headline metrics (text: ROUGE-1 and token recall; images: PSNR and SSIM).
* ``charts/leakage_vs_epsilon``: the worst value of the headline metric against ε (DP-SGD runs,
  ``wandb.plot.line``).
* With ``log_samples=True`` only: ``samples/text``, a table of original vs reconstructed text with the
  recovered words highlighted; for image models ``samples/images/<attack>``, originals and reconstructions
  side by side (read from the audit's ``.npz`` sample file).
* ``run.summary``: ``leak/worst/<metric>`` (the oracle: the worst value of every metric over the run and
  every attack, each scored against the real batch, with the attack and step it came from),
  ``leak/pick_worst/<metric>`` (the same over the attacker's picks only: per audit the reconstruction an
  attacker without the answer keeps, the smallest gradient residual), ``audit/timeouts`` (attacks stopped
  by their budget: missing evidence, never charted as a value) and, with a policy, ``gate/result`` (pass, warn or fail; rules without a
  measured value yet do not count, except those with lower bounds only, which fail as at the release gate) and
  ``gate/rule/<rule>`` (pass, warn, fail, "lower bounds only" or "no data").
* ``alert=True``: one ``run.alert`` per breached rule (delivery, by e-mail or Slack, is W&B's when the run
  is online; tested here only as the call).

Charts are rebuilt from the whole history at each audit (W&B tables are immutable once logged), so the
latest chart in the run always covers the whole run.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leak_audit.results.records import PICK, AuditRecord, worst_values
from leak_audit.metrics.scoring import display_images

__all__ = ["HEADLINE_METRICS", "WandbDashboard", "highlight_recovered"]

HEADLINE_METRICS: dict[str, tuple[str, ...]] = {"text": ("rouge1", "token_recall"), "image": ("psnr", "ssim")}
"""Metrics charted per attack over steps, by modality; the first is the one charted against ε."""

_GREEN, _RED = "#c8f7c5", "#f9c9c9"


def highlight_recovered(reference: str, reconstruction: str) -> tuple[str, str]:
    """HTML of both texts with the recovered words marked (a display aid, not a metric).

    A word of the reconstruction is *recovered* when the reference still holds an unmatched copy of it
    (multiset match on lower-cased, whitespace-separated words); recovered words are green in both texts,
    reconstruction words not in the reference are red. Every word is HTML-escaped.

    Returns:
        ``(reference_html, reconstruction_html)``.
    """
    ref_words = reference.split()
    left = Counter(w.lower() for w in ref_words)
    rec_html = []
    hits: Counter[str] = Counter()
    for word in reconstruction.split():
        key = word.lower()
        if left[key] > 0:
            left[key] -= 1
            hits[key] += 1
            rec_html.append(f'<span style="background:{_GREEN}">{html.escape(word)}</span>')
        else:
            rec_html.append(f'<span style="background:{_RED}">{html.escape(word)}</span>')
    ref_html = []
    for word in ref_words:
        key = word.lower()
        if hits[key] > 0:
            hits[key] -= 1
            ref_html.append(f'<span style="background:{_GREEN}">{html.escape(word)}</span>')
        else:
            ref_html.append(html.escape(word))
    return " ".join(ref_html), " ".join(rec_html)


class WandbDashboard:
    """The W&B views of one run (see the module docstring).

    Args:
        run: the ``wandb`` run (``WandbLogger.experiment``); anything with ``log``, ``define_metric``,
            ``summary`` and ``alert`` works (tests pass a recorder).
        modality: ``"text"`` or ``"image"`` (picks :data:`HEADLINE_METRICS`).
        log_samples: log reconstructions (text tables, image panels). Off by default: they are private data.
        log_dir: the audit log's folder, against which image sample files (``samples/*.npz``) resolve.
        alert: send ``run.alert`` when a policy rule is breached.

    Raises:
        ValueError: unknown ``modality``.
    """

    def __init__(self, run: Any, modality: str, *, log_samples: bool = False, log_dir: str | Path = ".",
                 alert: bool = False) -> None:
        if modality not in HEADLINE_METRICS:
            raise ValueError(f"modality must be one of {sorted(HEADLINE_METRICS)}, got {modality!r}")
        self.run = run
        self.modality = modality
        self.log_samples = log_samples
        self.log_dir = Path(log_dir)
        self.alert = alert
        self._series: dict[str, dict[str, dict[int, float]]] = {}  # metric -> attack -> step -> worst value
        self._epsilon: dict[int, tuple[float, float]] = {}  # step -> (epsilon, worst headline value)
        self._canary_eps: dict[int, tuple[float, float]] = {}  # step -> (accountant's epsilon, empirical epsilon)
        self._worst: dict[str, tuple[float, str]] = {}  # metric -> (value, "attack@step"), the oracle
        self._picked: dict[str, tuple[float, str]] = {}  # the same over the attacker's picks
        self._timeouts = 0
        self._alerted: set[str] = set()
        self._defined = False

    def define_metrics(self) -> None:
        """Tie the leak_audit keys to ``trainer/global_step``; worst-case (max) summaries for ``leak/*``."""
        if self._defined:
            return
        self._defined = True
        self.run.define_metric("trainer/global_step")
        for prefix, summary in (("leak/*", "max"), ("privacy/*", "last"), ("audit/*", "last"), ("gate/*", "last")):
            self.run.define_metric(prefix, step_metric="trainer/global_step", summary=summary)

    def update(self, records: Sequence[AuditRecord], step: int) -> None:
        """Charts, samples and summary after one finished audit (its records, all at ``step``)."""
        self.define_metrics()
        import wandb

        ok = [r for r in records if r.status == "ok"]
        for r in ok:
            for name, value in r.metrics.items():
                v = float(value)
                series = self._series.setdefault(name, {}).setdefault(r.attack, {})
                series[r.step] = max(series.get(r.step, float("-inf")), v)
        worst_values(ok, self._worst)
        worst_values((r for r in ok if r.info.get(PICK)), self._picked)
        self._timeouts += sum(r.status == "timeout" for r in records)
        payload: dict[str, Any] = {}
        for metric in HEADLINE_METRICS[self.modality]:
            per_attack = self._series.get(metric)
            if not per_attack:
                continue
            keys = sorted(per_attack)
            xs = [sorted(per_attack[a]) for a in keys]
            ys = [[per_attack[a][s] for s in x] for a, x in zip(keys, xs, strict=True)]
            payload[f"charts/{metric}_per_attack"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=keys, title=f"{metric} per attack", xname="step")
        headline = HEADLINE_METRICS[self.modality][0]
        eps = next((r.privacy.get("epsilon") for r in records if r.privacy), None)
        worst_now = max((float(r.metrics[headline]) for r in ok if headline in r.metrics), default=None)
        if isinstance(eps, int | float) and not isinstance(eps, bool) and worst_now is not None:
            self._epsilon[step] = (float(eps), worst_now)
            rows = [[e, v, s] for s, (e, v) in sorted(self._epsilon.items())]
            table = wandb.Table(columns=["epsilon", f"worst {headline}", "step"], data=rows)
            payload["charts/leakage_vs_epsilon"] = wandb.plot.line(
                table, "epsilon", f"worst {headline}", title=f"worst {headline} vs epsilon")
        privacy = next((r.privacy for r in records if r.privacy), None) or {}
        low = privacy.get("epsilon_empirical")
        if isinstance(eps, int | float) and isinstance(low, int | float) and not isinstance(low, bool):
            self._canary_eps[step] = (float(eps), float(low))
            steps = sorted(self._canary_eps)
            payload["charts/epsilon_accountant_vs_empirical"] = wandb.plot.line_series(
                xs=[steps, steps], ys=[[self._canary_eps[s][0] for s in steps], [self._canary_eps[s][1] for s in steps]],
                keys=["accountant", "empirical (canaries, 95% lower bound)"], title="epsilon: promised vs delivered",
                xname="step")
        if self.log_samples:
            payload.update(self._samples(records, wandb))
        if payload:
            payload["trainer/global_step"] = step
            self.run.log(payload)
        for prefix, worst in (("leak/worst", self._worst), ("leak/pick_worst", self._picked)):
            for name, (value, where) in worst.items():
                self.run.summary[f"{prefix}/{name}"] = value
                self.run.summary[f"{prefix}/{name}/at"] = where
        self.run.summary["audit/timeouts"] = self._timeouts
        if records and records[0].run:
            self.run.summary["audit/run"] = records[0].run  # the audit log's name for this run (its records' `run`)

    def _samples(self, records: Sequence[AuditRecord], wandb: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rows = []
        for r in records:
            for s in r.samples or ():
                if "reference" in s or "reconstruction" in s:
                    ref, rec = highlight_recovered(str(s.get("reference", "")), str(s.get("reconstruction", "")))
                    rows.append([r.step, r.attack, wandb.Html(ref), wandb.Html(rec), s.get("rouge1")])
                elif "file" in s:
                    panels = self._image_panels(r, s, wandb)
                    if panels:
                        out[f"samples/images/{r.attack}"] = panels
        if rows:
            out["samples/text"] = wandb.Table(
                columns=["step", "attack", "original", "reconstruction", "rouge1"], data=rows)
        return out

    def _image_panels(self, r: AuditRecord, sample: dict[str, Any], wandb: Any) -> list[Any]:
        path = self.log_dir / str(sample["file"])
        try:
            with np.load(path) as data:
                originals, recons = data["originals"], data["reconstructions"]
                psnr = data["psnr"] if "psnr" in data else None
        except (OSError, KeyError, ValueError):
            return []
        panels = []
        n = min(len(originals), len(recons), 8)
        if n == 0:
            return []
        shown, rebuilt = display_images(originals[:n], recons[:n])  # one scale: the originals'
        for i in range(n):
            pair = np.concatenate([shown[i], rebuilt[i]], axis=1)
            caption = f"step {r.step} #{i}: original | reconstruction"
            if psnr is not None and i < len(psnr):
                caption += f" (PSNR {float(psnr[i]):.1f} dB)"
            panels.append(wandb.Image(pair, caption=caption))
        return panels

    def verdict(self, verdict: str, rules: dict[str, str], breaches: dict[str, str], step: int) -> None:
        """Record the policy's verdict in the summary; alert once per newly breached rule.

        Args:
            verdict: ``"pass"``, ``"warn"`` or ``"fail"``.
            rules: rule name -> status.
            breaches: rule name -> message, for the rules that fail on a measured value (one alert per rule
                per run).
            step: the optimizer step the verdict was reached at.
        """
        self.run.summary["gate/result"] = verdict  # "gate/verdict" is the logged number (0 pass, 1 warn, 2 fail)
        for name, status in rules.items():
            self.run.summary[f"gate/rule/{name}"] = status
        if not self.alert:
            return
        for name, message in breaches.items():
            if name in self._alerted:
                continue
            self._alerted.add(name)
            try:
                self.run.alert(title="leak_audit: leakage threshold exceeded", text=f"step {step}: {message}",
                               level="ERROR")
            except Exception:  # noqa: BLE001 - offline runs and old servers may refuse alerts; never crash training
                pass
