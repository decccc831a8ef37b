"""The results page: one self-contained HTML file (styles, script and figures inline; no server,
no network) with the report's tables (sortable by any column, filterable by dataset and model, the
data's floor rows and the † marks as in Markdown), every figure of ``genbench plot``, the
protocol line and the provenance. Written by ``genbench report RUN_DIR... --format html``."""
from __future__ import annotations

import base64
import html

import pandas as pd

from .report import MARK, NOTES, aggregate, metric_notes, protocol_line, settings_label

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #1b1b1b; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1.05em; }
.filters { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; z-index: 1; }
.filters label { margin-right: 1.2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; position: relative; }
th.asc::after { content: ' \\25B2'; font-size: .7em; } th.desc::after { content: ' \\25BC'; font-size: .7em; }
td.text, th.text { text-align: left; }
tr.floor td { background: #f7f7e8; font-style: italic; }
td.marked { color: #a40000; }
.protocol, .notes { color: #444; font-size: 12.5px; max-width: 1100px; }
.figures figure { margin: 1em 0 2em; } .figures img { max-width: 100%; border: 1px solid #eee; }
dl.prov { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; font-size: 12.5px; }
dl.prov dt { font-weight: 600; }
"""

SCRIPT = """
(function () {
  function key(td) {
    var t = td.textContent.trim().replace('%s', '');
    var m = t.match(/^[≤]?\\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)/i);
    return m ? [0, parseFloat(m[1])] : [1, t.toLowerCase()];
  }
  document.querySelectorAll('table.results').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var dir = th.classList.contains('asc') ? -1 : 1;
        table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
        th.classList.add(dir === 1 ? 'asc' : 'desc');
        table.querySelectorAll('tbody').forEach(function (body) {
          var rows = Array.prototype.slice.call(body.querySelectorAll('tr:not(.floor)'));
          rows.sort(function (a, b) {
            var x = key(a.children[col]), y = key(b.children[col]);
            if (x[0] !== y[0]) return x[0] - y[0];
            return (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0) * dir;
          });
          rows.forEach(function (r) { body.appendChild(r); });
        });
      });
    });
  });
  function apply() {
    var d = document.getElementById('f-dataset').value, m = document.getElementById('f-model').value;
    document.querySelectorAll('table.results tbody').forEach(function (body) {
      body.style.display = (!d || body.dataset.dataset === d) ? '' : 'none';
      body.querySelectorAll('tr:not(.floor)').forEach(function (r) {
        r.style.display = (!m || r.dataset.model === m) ? '' : 'none';
      });
    });
  }
  document.getElementById('f-dataset').addEventListener('change', apply);
  document.getElementById('f-model').addEventListener('change', apply);
})();
""" % MARK


def _e(v) -> str:
    return html.escape(str(v))


def _table(table: pd.DataFrame) -> str:
    """One aggregated table: a tbody per dataset, its floor row first."""
    cols = list(table.columns)
    text_cols = {"model", "variant", "dataset", "status"}
    head = "".join(f'<th class="{"text" if c in text_cols else ""}">{_e(c)}</th>' for c in cols)
    bodies = []
    for dataset, g in table.groupby("dataset", sort=False):
        rows = []
        for _, r in g.iterrows():
            floor = r["model"] == "data (floor)"
            cells = "".join(f'<td class="{"text" if c in text_cols else ""}{" marked" if MARK in str(r[c]) else ""}">'
                            f"{_e(r[c])}</td>" for c in cols)
            rows.append(f'<tr class="{"floor" if floor else ""}" data-model="{_e(r["model"])}">{cells}</tr>')
        bodies.append(f'<tbody data-dataset="{_e(dataset)}">{"".join(rows)}</tbody>')
    return f'<table class="results"><thead><tr>{head}</tr></thead>{"".join(bodies)}</table>'


def _sections(df: pd.DataFrame, level: int) -> list[str]:
    parts = []
    for dev, table in aggregate(df).items():
        sub = df[df["device_name"].astype(str) == dev]
        devices = ", ".join(sorted(sub["device"].dropna().astype(str).unique()))
        torch_v = ", ".join(sorted(sub["torch_version"].dropna().astype(str).unique()))
        parts += [f"<h{level}>{_e(dev)} ({_e(devices)}; torch {_e(torch_v)})</h{level}>", _table(table),
                  f'<p class="protocol">{_e(protocol_line(sub))}</p>']
    return parts


def _provenance(df: pd.DataFrame) -> str:
    fields = [("run dir(s)", "run_id"), ("budget", "budget"), ("n samples", "n_samples"), ("device", "device_name"),
              ("host", "host"), ("torch", "torch_version"), ("genbench", "genbench_version"), ("git", "git_sha"),
              ("python", "python"), ("executor", "executor")]
    items = []
    for label, col in fields:
        if col in df:
            vals = ", ".join(sorted(df[col].dropna().astype(str).unique()))
            items.append(f"<dt>{_e(label)}</dt><dd>{_e(vals or '–')}</dd>")
    return f'<dl class="prov">{"".join(items)}</dl>'


def page(df: pd.DataFrame, figures: list[tuple[str, str, bytes]], title: str = "genbench results") -> str:
    """The page: ``df`` (report.tidy's rows) as tables, and ``figures`` ((section, caption, PNG bytes)) inline."""
    datasets = list(dict.fromkeys(df["dataset"].astype(str)))
    models = list(dict.fromkeys(df["model"].astype(str)))
    options = lambda values: "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in values)  # noqa: E731
    parts = [f"<h1>{_e(title)}</h1>", _provenance(df),
             '<div class="filters"><label>dataset <select id="f-dataset"><option value="">all</option>'
             f'{options(datasets)}</select></label><label>model <select id="f-model"><option value="">all</option>'
             f'{options(models)}</select></label><span class="hint">click a column to sort</span></div>']
    labels = settings_label(df)
    if labels.nunique() > 1:
        parts.append(f"<p>These rows were made with {labels.nunique()} different settings; each is tabulated on "
                     "its own.</p>")
        for lab, sub in df.groupby(labels, sort=False):
            parts += [f"<h2>Settings: {_e(lab)}</h2>"] + _sections(sub, 3)
    else:
        parts += _sections(df, 2)
    notes = "".join(f"<li>{_e(line[2:])}</li>" for line in metric_notes(df).splitlines() if line.startswith("- "))
    parts += [f'<div class="notes"><p>{_e(NOTES)}</p><ul>{notes}</ul></div>']
    if figures:
        parts.append('<h2>Figures</h2><div class="figures">')
        for section, caption, png in figures:
            data = base64.b64encode(png).decode()
            parts.append(f'<figure><figcaption>{_e(section)}: {_e(caption)}</figcaption>'
                         f'<img alt="{_e(caption)}" src="data:image/png;base64,{data}"></figure>')
        parts.append("</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>\n")
