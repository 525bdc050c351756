"""``leak-audit report``: the HTML page on crafted logs, its CLI, and the page in a real headless Chromium.

The browser tests need Debian's ``chromium`` (``/usr/bin/chromium`` or ``chromium`` on ``PATH``; ``.ci/run``
installs it) and skip with the reason otherwise. They check that the page renders (a screenshot that is not
blank, the verdict in the DOM) and that the browser reports no problem: no console message at all (the page
runs no script, so anything on the console is the browser complaining: an error, a CSP violation), no
uncaught exception, no resource that failed to load. :func:`browser_problems` is itself tested on a page
with a deliberate exception and a broken image, so the check cannot pass silently.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from leak_audit.cli.main import main
from leak_audit.gate.policy import GatePolicy, PolicyError
from leak_audit.results.records import CANARY_RECORD, AuditRecord, read_audit_log
from leak_audit.cli.report import render_report, write_report

QUERY = "bert.encoder.layer.0.attention.self.query"
SECRET = "Patient Jane Roe, SSN 078-05-1120"
XSS = '<script>alert("pwned")</script> & <img src=x onerror=alert(1)>'


def _write_log(path: Path, records: list[AuditRecord]) -> Path:
    path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    return path


def _privacy(step: int) -> dict:
    return {"noise_multiplier": 0.5, "max_grad_norm": 1.0, "expected_batch_size": 8, "noise_std": 0.0625,
            "accountant": "prv", "epsilon": 0.4 * (step + 1) ** 0.5 if step else 0.0, "epsilon_accountant": "prv",
            "delta": 1e-5, "sample_rate": 0.03, "steps": step, "error": None}


def text_records() -> list[AuditRecord]:
    """Two attacks, steps 0..40, a failed record with HTML in its error, DP privacy, two module sets, samples."""
    records = []
    audit = 0
    for modules in ([QUERY], [""]):
        for step in (0, 10, 20, 30, 40):
            audit += 1
            t = f"2026-11-21T17:{audit:02d}:00.000Z"
            records.append(AuditRecord(
                step=step, attack="span_check", status="ok", modules=modules, batch_size=8, audit=audit,
                metrics={"rouge1": 0.2 + step / 100, "token_recall": 0.5 + step / 200, "exact_match": 0.1},
                seconds=1.5 + step / 20, privacy=_privacy(step), time=t,
                samples=[{"reference": SECRET, "reconstruction": SECRET + " (rebuilt)"}],
            ))
            if step == 20 and modules == [""]:
                records.append(AuditRecord(step=step, attack="token_bag", status="failed", modules=modules,
                                           batch_size=8, audit=audit, seconds=0.2, error=f"ValueError: {XSS}",
                                           privacy=_privacy(step), time=t))
            else:
                records.append(AuditRecord(step=step, attack="token_bag", status="ok", modules=modules,
                                           batch_size=8, audit=audit, metrics={"token_recall": 0.9, "token_precision": 1.0},
                                           seconds=0.01, privacy=_privacy(step), time=t))
    records.append(AuditRecord(step=50, attack="span_check", status="skipped", modules=[""], batch_size=8,
                               audit=audit + 1, error="RuntimeError: the worker was still busy"))
    return records


def image_records(samples: bool = False) -> list[AuditRecord]:
    out = []
    for audit, step in enumerate((0, 25, 50), start=1):
        for attack, psnr in (("dlg", 30.0 - step / 5), ("inverting_gradients", 25.0 - step / 10)):
            out.append(AuditRecord(
                step=step, attack=attack, status="ok", modules=[""], batch_size=4, audit=audit,
                metrics={"psnr": psnr, "ssim": psnr / 40, "label_accuracy": 1.0}, seconds=4.0,
                samples=[{"file": f"samples/audit{audit:05d}-step{step:07d}-{attack}.npz", "images": 4}] if samples else None,
            ))
    return out


def _section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start:page.index("</section>", start)]


def _audit_rows(page: str) -> list[str]:
    return re.findall(r'<tr class="r-[a-z]+">', _section(page, "audits"))


# -------------------------------------------------------------------------------------------- the page


def test_text_run_page_has_summary_verdict_plots_and_table(tmp_path):
    records = text_records()
    log = _write_log(tmp_path / "audit.jsonl", records)
    policy = GatePolicy.from_thresholds({"rouge1": 0.5, "token_recall": 0.95})
    page = render_report(read_audit_log(log), policy=policy, source=log)

    summary = _section(page, "summary")
    assert str(log) in summary
    assert "21: " in summary and "19 ok" in summary and "1 failed" in summary and "1 skipped" in summary
    assert "0–50" in summary and "span_check (11)" in summary and "token_bag (10)" in summary
    assert QUERY in summary and "(whole model)" in summary
    assert "ε = " in summary and "δ = 1e-05" in summary

    gate = _section(page, "gate")
    assert 'data-verdict="fail">BREACH</div>' in gate  # rouge1 reaches 0.6 > 0.5
    assert '<td>rouge1</td><td>rouge1</td><td>max</td><td class="num">0.6</td><td>max 0.5</td>' in gate
    assert "token_recall = 0.9 " in gate and "&lt;= max 0.95" in gate

    # one PNG per plot: by attack, by module set (two sets), vs epsilon (DP), seconds
    figures = re.findall(r'<figure class="plot" data-plot="([a-z-]+)">', page)
    assert figures == ["leakage-by-attack", "leakage-by-modules", "leakage-vs-epsilon", "seconds"]
    assert page.count("<img ") == 4 and page.count('src="data:image/png;base64,') == 4
    assert "data-plot-note" not in page

    rows = _audit_rows(page)
    assert len(rows) == len(records)
    assert rows.count('<tr class="r-failed">') == 1 and rows.count('<tr class="r-skipped">') == 1
    assert "<th>ROUGE-1</th>" in page and "<th>ε</th>" in page and "<th>modules</th>" in page


def test_no_url_no_script_no_samples_by_default(tmp_path):
    page = render_report(text_records(), policy=GatePolicy.from_thresholds({"rouge1": 0.5}))
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert SECRET not in page and html.escape(SECRET) not in page and "078-05-1120" not in page
    assert 'data-samples="excluded"' in page and "not included" in page and "--include-samples" in page
    assert "Content-Security-Policy" in page


def test_samples_only_with_include_samples(tmp_path):
    page = render_report(text_records(), include_samples=True)
    assert 'data-samples="included"' in page and "private data" in page
    assert html.escape(SECRET + " (rebuilt)") in page
    assert "http://" not in page and "https://" not in page


def test_log_text_is_html_escaped(tmp_path):
    hostile = text_records()
    hostile.append(AuditRecord(step=60, attack="<b>evil</b>", status="failed", modules=["<i>mod</i>"],
                               error="boom </td></tr></table><script>alert(2)</script>"))
    page = render_report(hostile, title="<script>t</script>", source="<x>.jsonl")
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "<i>mod</i>" not in page and "&lt;x&gt;.jsonl" in page and "<title>&lt;script&gt;t" in page
    assert len(_audit_rows(page)) == len(hostile)  # the error did not break out of its table cell


def test_no_policy_shows_worst_values():
    page = render_report(text_records())
    gate = _section(page, "gate")
    assert 'data-verdict="none">no policy given</div>' in gate
    assert "<td>rouge1</td><td class=\"num\">0.600</td><td>span_check@step 40</td>" in gate
    assert "BREACH" not in page and "PASS" not in page


def test_timeouts_and_the_attackers_pick_are_shown_apart():
    records = text_records()
    records[0].info["attacker_pick"] = 1  # span_check at step 0: rouge1 0.2
    records.append(AuditRecord(step=40, attack="dlg", status="timeout", modules=[QUERY], batch_size=8, audit=99,
                               seconds=30.0, error="stopped by its 30 s budget before it finished (step 12 of 300)",
                               info={"partial_rouge1": 0.35, "progress": "step 12 of 300"}))
    page = render_report(records)
    assert "1 timed out</span>" in _section(page, "summary")
    gate = _section(page, "gate")
    # the oracle (0.600, span_check@step 40) next to the attacker's pick (0.200 at step 0)
    assert ("<td>rouge1</td><td class=\"num\">0.600</td><td>span_check@step 40</td>"
            "<td class=\"num\">0.200</td><td>span_check@step 0</td>") in gate
    assert "1 timed-out attack record(s) are missing evidence" in gate
    timeout_row = re.search(r'<tr class="r-timeout">.*?</tr>', _section(page, "audits")).group(0)
    assert "≥ 0.350" in timeout_row and "step 12 of 300" in timeout_row


def test_lower_bound_records_show_as_at_least_with_their_reason():
    records = text_records()
    why = "LoRA adapters at B > 1 <tokens without their sentences>"
    records.append(AuditRecord(step=60, attack="span_check", status="ok", modules=[QUERY], batch_size=4, audit=98,
                               seconds=1.0, metrics={"rouge1": 0.425, "token_recall": 0.7}, info={"lower_bound": why}))
    page = render_report(records)
    row = [r for r in re.findall(r'<tr class="r-ok">.*?</tr>', _section(page, "audits")) if "0.425" in r]
    assert len(row) == 1 and "≥ 0.425" in row[0] and f'title="{html.escape(why)}"' in row[0]
    assert "1 record(s) are lower bounds" in _section(page, "gate") and html.escape(why) in _section(page, "gate")
    assert why not in page  # escaped wherever it appears


def test_warn_and_pass_verdicts_and_toml_policy(tmp_path):
    recs = text_records()
    toml = tmp_path / "policy.toml"
    toml.write_text('[[rule]]\nmetric = "rouge1"\nmax = 0.7\nwarn = 0.5\n\n'
                    '[[rule]]\nmetric = "epsilon"\nmax = 10\naggregation = "last"\n', encoding="utf-8")
    page = render_report(recs, policy=toml)  # a path goes through GatePolicy.coerce
    assert 'data-verdict="warn">WARN</div>' in page
    assert "max 0.7, warn 0.5" in page and "<td>epsilon</td>" in page and "<td>last</td>" in page
    page = render_report(recs, policy={"rule": [{"metric": "rouge1", "max": 0.9}]})
    assert 'data-verdict="pass">PASS</div>' in page
    with pytest.raises(PolicyError):
        render_report(recs, policy={"rule": [{"metric": "rouge", "max": 0.9}]})


def test_image_run_plots_psnr_ssim_and_skips_empty_plots(tmp_path):
    page = render_report(image_records())
    assert re.findall(r'data-plot="([a-z-]+)"', page) == ["leakage-by-attack", "seconds"]
    assert re.findall(r'data-plot-note="([a-z-]+)"', page) == ["leakage-by-modules", "leakage-vs-epsilon"]
    assert page.count("<img ") == 2
    assert "<th>PSNR (dB)</th>" in page and "<th>SSIM</th>" in page and "<th>ε</th>" not in page
    assert "not a DP-SGD run" in page
    assert '<td>psnr</td><td class="num">30.00</td><td>dlg@step 0</td>' in page


def test_image_samples_drawn_from_npz_only_on_request(tmp_path):
    log = _write_log(tmp_path / "audit.jsonl", image_records(samples=True))
    rng = np.random.default_rng(0)
    for rec in read_audit_log(log):
        path = tmp_path / rec.samples[0]["file"]
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(path, originals=rng.random((4, 3, 8, 8), dtype=np.float32),
                            reconstructions=rng.random((4, 3, 8, 8), dtype=np.float32))
    assert write_report(log, tmp_path / "plain.html").read_text().count("<img ") == 2
    page = write_report(log, tmp_path / "samples.html", include_samples=True).read_text()
    assert page.count('<div class="sample-images"><img ') == 6 and page.count("<img ") == 8


def test_empty_and_all_failed_logs_render(tmp_path):
    page = render_report([], policy=GatePolicy.from_thresholds({"rouge1": 0.5}))
    assert "The log holds no record." in page and 'data-verdict="error">no verdict' in page
    failed = [AuditRecord(step=0, attack="span_check", status="failed", error="boom")]
    page = render_report(failed, policy=GatePolicy.from_thresholds({"rouge1": 0.5}))
    assert "no successful audit" in page and "nothing to plot" in page and page.count("<img ") == 1  # seconds


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_writes_page_and_exits_0_on_breach(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    log = _write_log(tmp_path / "run" / "audit.jsonl", text_records())
    assert main(["report", str(log), "--max", "rouge1=0.5"]) == 0  # a breach: shown, not enforced
    out = capsys.readouterr().out
    default = tmp_path / "run" / "report.html"
    assert f"wrote {default}" in out and "verdict BREACH" in out
    assert 'data-verdict="fail">BREACH' in default.read_text()
    assert main(["gate", str(log), "--max", "rouge1=0.5"]) == 1  # the gate is what fails a release

    toml = tmp_path / "p.toml"
    toml.write_text('[[rule]]\nmetric = "rouge1"\nmax = 0.9\n', encoding="utf-8")
    target = tmp_path / "out" / "r.html"
    assert main(["report", str(log), "-o", str(target), "--policy", str(toml), "--max", "token_recall=0.95",
                 "--title", "My run", "--include-samples"]) == 0
    page = target.read_text()
    assert "<title>My run</title>" in page and 'data-verdict="pass">PASS' in page
    assert page.count("<td>token_recall</td>") >= 2 and html.escape(SECRET) in page


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda d: None, ["missing.jsonl"], "audit log not found"),
        (lambda d: (d / "bad.jsonl").write_text('{"schema":1}\nnot json\n'), ["bad.jsonl"], "bad.jsonl:1"),
        (lambda d: (d / "p.toml").write_text("[[rule]]\nmetric = 'rouge1'\nmaxx = 1\n"),
         ["audit.jsonl", "--policy", "p.toml"], "unknown key 'maxx'"),
        (lambda d: None, ["audit.jsonl", "--policy", "none.toml"], "policy file not found"),
        (lambda d: None, ["audit.jsonl", "--max", "rouge=0.5"], "unknown metric 'rouge'"),
        (lambda d: (d / "dir.html").mkdir(), ["audit.jsonl", "-o", "dir.html"], "cannot write"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, monkeypatch, setup, args, message):
    monkeypatch.chdir(tmp_path)
    _write_log(tmp_path / "audit.jsonl", text_records())
    setup(tmp_path)
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leak-audit report: error: ") and message in err
    assert not (tmp_path / "report.html").exists()


# ------------------------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


needs_chromium = pytest.mark.skipif(
    _chromium() is None,
    reason="headless browser test: no /usr/bin/chromium and no chromium on PATH "
    "(apt-get install --no-install-recommends chromium; .ci/run does it)",
)

_PROBE_NONCE = "leakauditprobe"
_PROBE = f"""<script nonce="{_PROBE_NONCE}">(function () {{
  var out = [];
  function put() {{ document.documentElement.setAttribute("data-probe", JSON.stringify(out)); }}
  window.addEventListener("error", function (e) {{
    if (e.target && e.target !== window && e.target.tagName) {{
      out.push("Failed to load resource: " + (e.target.currentSrc || e.target.src || e.target.href));
    }} else {{ out.push("Uncaught " + e.message); }}
    put();
  }}, true);
  document.addEventListener("securitypolicyviolation", function (e) {{
    out.push("CSP violation: " + e.violatedDirective + " " + e.blockedURI); put();
  }});
  window.addEventListener("load", function () {{
    for (var i = 0; i < document.images.length; i++) {{
      var img = document.images[i];
      if (!(img.complete && img.naturalWidth > 0)) out.push("broken image: " + img.src);
    }}
    put();
    document.documentElement.setAttribute("data-probe-done", "1");
  }});
}})();</script>"""

_CONSOLE_PATTERNS = re.compile(r"CONSOLE|Uncaught|Failed to load resource")


def _run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    chromium = _chromium()
    assert chromium is not None
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish in 60 s: {' '.join(cmd)}\n{exc.stderr}")


def console_problems(stderr: str) -> list[str]:
    """Lines of Chromium's stderr log that report the page's console: errors, uncaught exceptions, CSP
    violations, failed loads. Chromium logs every console message as ``INFO:CONSOLE(...)`` whatever its
    level, and the report runs no script, so any console line is the browser complaining about the page."""
    return [line for line in stderr.splitlines() if _CONSOLE_PATTERNS.search(line)]


def browser_problems(page: Path, tmp: Path) -> tuple[list[str], str]:
    """Open ``page`` in headless Chromium; return ``(problems, DOM)``.

    Two runs: the page as written, whose stderr log must hold no console line (:func:`console_problems`);
    and a copy with a probe script that records, in the DOM that ``--dump-dom`` prints, every uncaught
    error, resource that failed to load, CSP violation and image that did not decode. The probe is needed
    because Chromium logs a failed image load only to DevTools, not to stderr. The copy's CSP, if any, is
    extended by the probe's nonce alone, so the page's own scripts stay blocked (and are reported)."""
    run = _run_chromium(tmp, "--dump-dom", page.resolve().as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    problems = console_problems(run.stderr)
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"(Content-Security-Policy\" content=\"[^\"]*)\"", rf"\1; script-src 'nonce-{_PROBE_NONCE}'\"", text)
    probed, n = re.subn(r"<head>", "<head>" + _PROBE, text, count=1, flags=re.IGNORECASE)
    assert n == 1, "the page has no <head>"
    copy = tmp / f"probe-{page.name}"
    copy.write_text(probed, encoding="utf-8")
    probe = _run_chromium(tmp, "--dump-dom", copy.resolve().as_uri())
    assert probe.returncode == 0, probe.stderr[-2000:]
    head = probe.stdout[: probe.stdout.find(">", probe.stdout.find("<html")) + 1]
    assert 'data-probe-done="1"' in head, f"the probe did not run to the load event: {head[:500]}"
    found = re.search(r'data-probe="([^"]*)"', head)
    problems += json.loads(html.unescape(found.group(1))) if found else []
    return problems, run.stdout


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    log = _write_log(tmp / "audit.jsonl", text_records())
    return write_report(log, tmp / "report.html", policy=GatePolicy.from_thresholds({"rouge1": 0.5}))


@needs_chromium
def test_browser_checker_catches_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body><p>hi</p>'
                   '<img src="missing.png"><script>throw new Error("x")</script></body></html>', encoding="utf-8")
    problems, dom = browser_problems(bad, tmp_path)
    assert "<p>hi</p>" in dom
    assert any("Uncaught Error: x" in p and "CONSOLE" in p for p in problems), problems  # stderr, as written
    assert any("Failed to load resource" in p and "missing.png" in p for p in problems), problems  # the probe
    assert any(p.startswith("broken image") for p in problems), problems


@needs_chromium
def test_browser_csp_blocks_anything_external(report_page, tmp_path):
    """A page with a script and remote/missing resources smuggled in: the report's CSP blocks them all, and
    the checker reports each block."""
    page = report_page.read_text(encoding="utf-8").replace(
        "</body>", '<img src="https://example.invalid/x.png"><img src="missing.png"><script>document.title="x"</script></body>')
    hostile = tmp_path / "hostile.html"
    hostile.write_text(page, encoding="utf-8")
    problems, _ = browser_problems(hostile, tmp_path)
    text = "\n".join(problems)
    assert "example.invalid" in text and "missing.png" in text and "inline script" in text.lower(), text


@needs_chromium
def test_report_renders_in_chromium_without_console_errors(report_page, tmp_path):
    problems, dom = browser_problems(report_page, tmp_path)
    assert problems == []
    assert 'data-verdict="fail">BREACH</div>' in dom and "Run summary" in dom
    assert dom.count('src="data:image/png;base64,') == 4

    shot = tmp_path / "shot.png"
    run = _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", report_page.resolve().as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert console_problems(run.stderr) == []
    assert shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        pixels = np.asarray(im.convert("RGB")).astype(np.int16)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not a blank page
    red = (np.abs(pixels - np.array([198, 40, 40])).sum(axis=2) < 30).sum()  # the BREACH banner (#c62828)
    assert red > 2000, red


def test_runs_appended_to_one_log_keep_their_own_canary_rows_dp_summary_and_plot_lines():
    """Two DP fits in one log share steps: the canary table and the DP-SGD summary are per run (the first run's
    fault is not hidden by the second's clean step 10), and the plots' captions say which line style is which run."""
    def rec(run, step, eps, low):  # run r2 starts an hour after run r1, each audit a minute per 10 steps
        hour = {"r1": 10, "r2": 11}[run]
        return AuditRecord(step=step, attack="span_check", status="ok", metrics={"rouge1": 0.1}, run=run,
                           time=f"2026-12-07T{hour}:{step // 10:02d}:00+00:00",
                           privacy={"epsilon": eps, "delta": 1e-5, "epsilon_empirical": low, "canaries": 1000})

    page = render_report([rec("r1", 0, 0.5, 0.0), rec("r1", 10, 2.0, 4.2), rec("r2", 0, 0.5, 0.0), rec("r2", 10, 2.0, 0.7)])
    section = _section(page, "canaries")
    assert "<th>run</th>" in section and section.count(">above<") == 1
    assert "DP implementation fault:</strong> at the last audited step (10) of run r1" in section
    assert "At the last audited step (10) of run r2 the canaries' lower bound stays at or below" in section
    summary = _section(page, "summary")
    assert "DP-SGD, run r1" in summary and "DP-SGD, run r2" in summary
    assert "<th>steps, run r1</th><td>0–10" in summary and "<th>steps, run r2</th><td>0–10" in summary
    assert "<th>time span, run r1</th><td>2026-12-07 10:00:00 UTC → 2026-12-07 10:01:00 UTC (1 min 00 s)" in summary
    assert "<th>time span, run r2</th><td>2026-12-07 11:00:00 UTC → 2026-12-07 11:01:00 UTC (1 min 00 s)" in summary
    assert "Runs (line styles): 1 = r1, 2 = r2." in page
    one_run_records = [rec("r1", 0, 0.5, 0.0), rec("r1", 10, 2.0, 0.7)]
    one_run = render_report(one_run_records)
    assert "<th>run</th>" not in _section(one_run, "canaries") and "Runs (line styles)" not in one_run
    assert "<th>steps</th><td>0–10" in _section(one_run, "summary")
    # a log whose second run has no DP-SGD: its one DP-SGD row names the run it belongs to
    plain = AuditRecord(step=0, attack="span_check", status="ok", metrics={"rouge1": 0.1}, run="r2")
    assert "<th>DP-SGD, run r1</th>" in _section(render_report([*one_run_records, plain]), "summary")


def test_gate_table_never_rounds_a_failing_value_onto_its_limit():
    """ε = 8.00001 against max 8 fails; the table must not show it as 8."""
    rec = AuditRecord(step=0, attack="token_bag", status="ok", modules=["m"], metrics={"rouge1": 0.1},
                      privacy={"epsilon": 8.00001, "delta": 1e-5})
    page = render_report([rec], policy=GatePolicy.from_thresholds({"epsilon": 8, "rouge1": 0.123456}))
    gate = _section(page, "gate")
    assert "<td class=\"num\">8.00001</td><td>max 8</td>" in gate
    assert "max 0.123456" in gate


def test_canaries_get_their_own_section_and_a_fault_is_named():
    def rec(step, eps, low):
        return AuditRecord(step=step, attack="span_check", status="ok", metrics={"rouge1": 0.1},
                           privacy={"epsilon": eps, "delta": 1e-5, "epsilon_empirical": low, "canaries": 1000,
                                    "epsilon_empirical_ceiling": 5.27, "epsilon_empirical_gdp": low * 2})

    page = render_report([rec(0, 0.5, 0.0), rec(10, 2.0, 0.7)])
    section = _section(page, "canaries")
    assert "(1000 canaries)" in section and "stays at or below the accountant" in section and ">above<" not in section
    assert "<td class=\"num\">0.7</td>" in section and "<td class=\"num\">1.4</td>" in section
    faulty = _section(render_report([rec(0, 0.5, 0.0), rec(10, 2.0, 4.2)]), "canaries")
    assert "DP implementation fault:</strong> at the last audited step (10)" in faulty and ">above<" in faulty
    assert 'id="canaries"' not in render_report(text_records())
    closing = AuditRecord(step=16, attack=CANARY_RECORD, status="ok", audit=2,
                          privacy={"epsilon": 2.5, "delta": 1e-5, "epsilon_empirical": 3.1, "canaries": 1000})
    page = render_report([rec(0, 0.5, 0.0), rec(10, 2.0, 0.7), closing])
    ended = _section(page, "canaries")
    assert "16 (end of run)" in ended and "DP implementation fault:</strong> at the end of the run (step 16)" in ended
    assert "2 (2 ran, 0 skipped entirely)" in _section(page, "summary")  # the closing record is no audit
