"""The report's HTML page: one self-contained file (plotly.js embedded once, in the head),
interactive charts, the tables and the notes. It opens offline, from disk or an e-mail."""

from __future__ import annotations

import datetime
import html
import json
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fedrec.report.charts import Chart
from fedrec.report.tables import QUALITY, MetricCell, direction, format_value

__all__ = ["render_page", "PALETTE", "color_of"]

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def color_of(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _line_traces(chart: Chart, colors: Mapping[str, str], axis: str) -> List[Dict[str, Any]]:
    traces: List[Dict[str, Any]] = []
    for series in chart.series:
        color = colors[series.name]
        x = series.x[axis]
        if series.spread is not None:
            upper = [y + s for y, s in zip(series.y, series.spread)]
            lower = [y - s for y, s in zip(series.y, series.spread)]
            traces.append({"type": "scatter", "mode": "lines", "x": x, "y": upper, "line": {"width": 0},
                           "showlegend": False, "hoverinfo": "skip", "legendgroup": series.name})
            traces.append({"type": "scatter", "mode": "lines", "x": x, "y": lower, "line": {"width": 0},
                           "fill": "tonexty", "fillcolor": _rgba(color, 0.2), "showlegend": False,
                           "hoverinfo": "skip", "legendgroup": series.name})
        traces.append({"type": "scatter", "mode": "lines+markers" if len(x) <= 60 else "lines", "x": x,
                       "y": series.y, "name": series.name, "legendgroup": series.name,
                       "line": {"color": color, "width": 2}, "marker": {"size": 4}})
    return traces


def _dtick(chart: Chart, axis: str) -> Optional[int]:
    """A whole-number tick spacing on the round axis (no "round 1.5"); None: Plotly's own."""
    if axis != "round":
        return None
    top = max((max(s.x[axis]) for s in chart.series if s.x.get(axis)), default=1)
    return max(1, math.ceil(top / 8))


def _figure(chart: Chart, colors: Mapping[str, str]) -> Dict[str, Any]:
    layout: Dict[str, Any] = {
        "title": {"text": html.escape(chart.title), "font": {"size": 15}, "y": 0.98, "yanchor": "top"},
        "height": 380, "margin": {"l": 60, "r": 20, "t": 80, "b": 60},
        "legend": {"orientation": "h", "y": -0.28}, "plot_bgcolor": "#fff",
        "yaxis": {"title": {"text": chart.y_label}, "gridcolor": "#e5e5e5", "zerolinecolor": "#ccc"},
    }
    if chart.kind == "hist":
        data = [{"type": "histogram", "x": s.y, "name": s.name, "opacity": 0.65,
                 "marker": {"color": colors[s.name]}} for s in chart.series]
        layout.update(barmode="overlay", xaxis={"title": {"text": chart.title.split(" (")[0]}, "gridcolor": "#e5e5e5"})
        if chart.reference is not None:
            layout["shapes"] = [{"type": "line", "x0": chart.reference, "x1": chart.reference, "yref": "paper",
                                 "y0": 0, "y1": 1, "line": {"dash": "dash", "color": "#444"}}]
        return {"data": data, "layout": layout}
    axis = chart.axes[0]
    data = _line_traces(chart, colors, axis)
    layout["xaxis"] = {"title": {"text": axis}, "gridcolor": "#e5e5e5", "dtick": _dtick(chart, axis)}
    if chart.reference is not None:
        layout["shapes"] = [{"type": "line", "y0": chart.reference, "y1": chart.reference, "xref": "paper",
                             "x0": 0, "x1": 1, "line": {"dash": "dash", "color": "#444"}}]
    if len(chart.axes) > 1:
        buttons = []
        for name in chart.axes:
            xs = [t["x"] for t in _line_traces(chart, colors, name)]
            buttons.append({"label": name, "method": "update",
                            "args": [{"x": xs}, {"xaxis.title.text": name, "xaxis.dtick": _dtick(chart, name)}]})
        layout["updatemenus"] = [{"type": "buttons", "direction": "right", "x": 0, "xanchor": "left",
                                  "y": 1.02, "yanchor": "bottom", "showactive": True, "buttons": buttons,
                                  "font": {"size": 11}, "pad": {"r": 4, "t": 0}}]
    return {"data": data, "layout": layout}


def _chart_div(chart: Chart, colors: Mapping[str, str]) -> str:
    import plotly.io as pio

    div = pio.to_html(_figure(chart, colors), full_html=False, include_plotlyjs=False, validate=False,
                      div_id=f"chart-{chart.key}", default_width="100%",
                      config={"displaylogo": False, "responsive": True})
    note = f'<p class="note">{html.escape(chart.note)}</p>' if chart.note else ""
    return f'<div class="chart" data-chart="{html.escape(chart.key)}">{div}{note}</div>'


def _cell_text(cell: Optional[MetricCell], key: str) -> str:
    if cell is None:
        return "—"
    text = format_value(cell.final)
    if cell.final_spread is not None:
        text += f" ± {format_value(cell.final_spread)}"
    if cell.best is not None and direction(key):
        best = format_value(cell.best)
        if cell.best_spread is not None:
            best += f" ± {format_value(cell.best_spread)}"
        at = f" @ {format_value(cell.best_at)}" if cell.best_at is not None else ""
        text += f' <span class="best">(best {best}{at})</span>'
    if cell.count > 1:
        text += f' <span class="n">n={cell.count}</span>'
    return text


def _metric_table(table: Mapping[Tuple[str, str], Mapping[str, MetricCell]], names: Sequence[str]) -> str:
    """Quality metrics in view; every other metric (bytes, seconds, ...) folded below them."""
    head = f"<thead><tr><th>phase</th><th>metric</th>{''.join(f'<th>{html.escape(n)}</th>' for n in names)}</tr></thead>"
    main, other = [], []
    for (phase, key), cells in table.items():
        tds = "".join(f"<td>{_cell_text(cells.get(n), key)}</td>" for n in names)
        row = (f'<tr data-metric="{html.escape(phase)}/{html.escape(key)}"><th>{html.escape(phase)}</th>'
               f"<th>{html.escape(key)}</th>{tds}</tr>")
        (main if key in QUALITY else other).append(row)
    text = f'<table id="final-best">{head}<tbody>{"".join(main)}</tbody></table>'
    if other:
        text += (f"<details><summary>{len(other)} more metrics</summary>"
                 f'<table id="final-other">{head}<tbody>{"".join(other)}</tbody></table></details>')
    return text


def _diff_table(diff: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    if not diff:
        return '<p id="config-diff">The runs\' configs do not differ.</p>' if len(names) > 1 else ""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f'<tr data-key="{html.escape(key)}"><th>{html.escape(key)}</th>'
        + "".join(f"<td>{html.escape(format_value(values.get(n)))}</td>" for n in names) + "</tr>"
        for key, values in diff.items())
    return f'<table id="config-diff"><thead><tr><th>key</th>{head}</tr></thead><tbody>{rows}</tbody></table>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
thead th{background:#f4f4f4}.best{color:#666}.n{color:#999;font-size:11px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
.chart{border:1px solid #eee;padding:4px}.note{font-size:12px;color:#555;margin:2px 8px}
ul.notes li{font-size:13px;color:#8a4b00}
"""


def render_page(title: str, runs_table: List[Dict[str, Any]], names: Sequence[str],
                table: Mapping[Tuple[str, str], Mapping[str, MetricCell]], diff: Mapping[str, Mapping[str, Any]],
                charts: Sequence[Chart], notes: Sequence[str], pngs: Sequence[str],
                colors: Mapping[str, str]) -> str:
    """The whole page as a string; ``colors``: series name -> colour (the PNGs' too)."""
    from plotly.offline import get_plotlyjs

    runs_rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(row.get(k, '')))}</td>" for k in ("name", "kind", "length", "path"))
        + "</tr>" for row in runs_table)
    sections: Dict[str, List[str]] = {}
    for chart in charts:
        sections.setdefault(chart.section, []).append(_chart_div(chart, colors))
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>written {datetime.datetime.now().isoformat(timespec='seconds')} by <code>fedrec report</code>; "
            f"{len(charts)} charts</p>",
            f'<table id="runs"><thead><tr><th>run</th><th>kind</th><th>length</th><th>folder</th></tr></thead>'
            f"<tbody>{runs_rows}</tbody></table>"]
    if notes:
        body.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body.append("<h2>Final and best values</h2>" + _metric_table(table, names))
    if len(names) > 1:
        body.append("<h2>Config differences</h2>" + _diff_table(diff, names))
    for section, divs in sections.items():
        body.append(f"<h2>{html.escape(section)}</h2><div class=\"charts\">{''.join(divs)}</div>")
    if pngs:
        body.append("<h2>PNG files</h2><p>" + " ".join(
            f'<a href="{html.escape(p)}">{html.escape(p)}</a>' for p in pngs) + "</p>")
    script = get_plotlyjs()
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script type=\"text/javascript\">{script}</script></head>"
            f"<body>{''.join(body)}</body></html>")


def data_json(table: Mapping[Tuple[str, str], Mapping[str, MetricCell]]) -> str:
    """The final/best table as JSON (written beside the page, for scripts and tests)."""
    return json.dumps({f"{p}/{k}": {n: vars(c) for n, c in cells.items()} for (p, k), cells in table.items()},
                      indent=1)
