"""The job's report: `--report report.json` (the data) or `--report report.html` (one self-contained page: the
summary, records/s, the per-stage timeline, queue fill, batch sizes, the GPU when on CUDA, and a verdict naming
the bottleneck). The charts are SVG drawn here, with the CSS inline: the page fetches nothing and needs no
JavaScript.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Sequence
from typing import Any

from beam_infer import monitor
from beam_infer.monitor import EngineLog

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
_W, _H, _PAD = 760, 180, 84  # chart size and left margin, in CSS pixels
RECORD_QUEUES = {"decode_backlog": "for a decode thread", "fetch_backlog": "for a fetch thread",
                 "ready": "to be batched", "waiting": "in the length-bucketing window",
                 "postprocess_backlog": "for a postprocess thread"}
BATCH_QUEUES = {"to_forward": "for the forward", "to_unload": "for the D2H copy"}


def build(job: dict[str, Any], logs: Sequence[EngineLog], start: float, end: float) -> dict[str, Any]:
    """The report's data: `job` (the summary's fields, from Beam's counters) and what the engines' telemetry says
    about the time from `start` to `end` (time.time())."""
    points = monitor.timeline(logs, start, end)
    whole = monitor.window(logs, start, end)
    if logs:  # what "auto" became where the engines ran
        job = {**job, "device": logs[0].header["device"], "dtype": logs[0].header["dtype"]}
    return {
        "job": job,
        "verdict": monitor.verdict(whole, job.get("device", "")),
        "bottleneck": whole.bottleneck(),
        "load": {name: round(v, 4) for name, v in whole.load().items()} if whole.busy else {},
        "engines": [log.header for log in logs],
        "batch_sizes": monitor.batch_sizes(logs),
        "timeline": {
            "t": [round(p.t1 - start, 3) for p in points],
            "records_per_s": [round(p.rate, 2) for p in points],
            "dead_letters": [round(p.dead_letters, 2) for p in points],
            "busy": {stage: [round(p.busy.get(stage, 0.0), 4) for p in points] for stage in monitor.STAGES},
            "in_flight_fill": [None if p.fill is None else round(p.fill, 4) for p in points],
            "queues": {name: [round(p.queues.get(name, 0.0), 2) for p in points]
                       for name in sorted({n for p in points for n in p.queues})},
            "gpu_util": [p.gpu_util for p in points],
            "gpu_mem_gb": [None if p.gpu_mem is None else round(p.gpu_mem / 2**30, 3) for p in points],
        },
    }


def write(path: str, data: dict[str, Any]) -> None:
    """Writes the report as JSON (a path ending in .json) or as an HTML page (anything else)."""
    text = json.dumps(data, indent=1) if path.lower().endswith(".json") else render_html(data)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---- HTML ----------------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:820px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 6px}
table{border-collapse:collapse} td{padding:2px 14px 2px 0;vertical-align:top} td:first-child{color:#666}
.verdict{background:#fff6e0;border-left:4px solid #f0a000;padding:10px 14px}
.legend span{display:inline-block;margin-right:14px} .legend i{display:inline-block;width:12px;height:12px;
margin-right:4px;vertical-align:-1px} svg text{font-size:11px;fill:#555} .note{color:#666;font-size:12px}
"""


def render_html(data: dict[str, Any]) -> str:
    job, tl = data["job"], data["timeline"]
    xs = tl["t"]
    parts = [f"<h1>beam_infer {_e(job.get('task', ''))} on {_e(job.get('runner', ''))}</h1>",
             f"<p class=note>{_e(job.get('started', ''))}</p>",
             f"<p class=verdict id=verdict>{_e(data['verdict'])}</p>", "<h2>Summary</h2>", _table(job)]
    if xs:
        parts += ["<h2>Records per second</h2>",
                  _lines(xs, {"records/s": tl["records_per_s"], "dead letters/s": _per_s(xs, tl["dead_letters"])})]
        parts += ["<h2>Stage timeline</h2><p class=note>The fraction of each stage's threads that was busy, per "
                  "interval (darker is busier; hover for the value).</p>", _strips(xs, tl["busy"])]
        fill = {"records in flight / limit": [None if v is None else 100 * v for v in tl["in_flight_fill"]]}
        parts += ["<h2>Queue fill</h2>", _lines(xs, fill, y_max=100, unit="%")]
        for names, what in ((RECORD_QUEUES, "records waiting"), (BATCH_QUEUES, "batches waiting")):
            series = {f"{what}: {label}": tl["queues"][name] for name, label in names.items() if name in tl["queues"]}
            parts += [_lines(xs, series)] if series else []
        if any(v is not None for v in tl["gpu_util"]):
            parts += ["<h2>GPU</h2>", _lines(xs, {"utilisation": tl["gpu_util"]}, y_max=100, unit="%")]
        if any(v is not None for v in tl["gpu_mem_gb"]):
            parts += [_lines(xs, {"memory in use (GB)": tl["gpu_mem_gb"]})]
    else:
        parts.append("<p>No engine telemetry was recorded (the engines ran where the launcher's files are not).</p>")
    if data["batch_sizes"]:
        parts += ["<h2>Batch sizes</h2>", _bars(data["batch_sizes"])]
    body = "\n".join(parts)
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>beam_infer report</title>"
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(job: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(_label(k))}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in job.items()
                   if k not in ("task", "runner", "started") and v is not None)
    return f"<table id=summary>{rows}</table>"


def _label(key: str) -> str:
    if key.startswith("busy_s_"):
        return f"busy seconds: {key[len('busy_s_'):]}"
    return key.replace("_per_", "/").replace("_", " ")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _per_s(xs: list[float], counts: list[float]) -> list[float]:
    return [c / (x - prev) if x > prev else 0.0 for c, x, prev in zip(counts, xs, [0.0, *xs[:-1]], strict=True)]


def _x(t: float, xs: list[float]) -> float:
    return _PAD + (_W - _PAD - 8) * t / xs[-1] if xs[-1] > 0 else _PAD


def _axes(xs: list[float], y_max: float, unit: str) -> str:
    out = [f'<line x1={_PAD} y1={_H - 20} x2={_W - 8} y2={_H - 20} stroke="#999"/>',
           f'<line x1={_PAD} y1=8 x2={_PAD} y2={_H - 20} stroke="#999"/>',
           f'<text x={_PAD - 4} y=14 text-anchor=end>{_fmt_num(y_max)}{unit}</text>',
           f'<text x={_PAD - 4} y={_H - 20} text-anchor=end>0</text>']
    for i in range(5):
        t = xs[-1] * i / 4
        label = f"{t:.0f}" if xs[-1] >= 20 else f"{t:.1f}"
        out.append(f'<text x={_x(t, xs):.1f} y={_H - 6} text-anchor=middle>{label}s</text>')
    return "".join(out)


def _fmt_num(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def _lines(xs: list[float], series: dict[str, list[float | None]], y_max: float | None = None,
           unit: str = "") -> str:
    values = [v for ys in series.values() for v in ys if v is not None]
    top = y_max or (max(values) * 1.1 if values and max(values) > 0 else 1.0)
    paths, legend = [], []
    for (name, ys), color in zip(series.items(), COLORS, strict=False):
        points = " ".join(f"{_x(t, xs):.1f},{_H - 20 - (_H - 28) * min(v, top) / top:.1f}"
                          for t, v in zip(xs, ys, strict=True) if v is not None)
        if points:
            paths.append(f'<polyline fill=none stroke="{color}" stroke-width=1.6 points="{points}"/>')
        legend.append(f'<span><i style="background:{color}"></i>{_e(name)}</span>')
    return (f'<div class=legend>{"".join(legend)}</div><svg class=chart width={_W} height={_H} '
            f'viewBox="0 0 {_W} {_H}">{_axes(xs, top, unit)}{"".join(paths)}</svg>')


def _strips(xs: list[float], busy: dict[str, list[float]]) -> str:
    row = 22
    height = row * len(busy) + 24
    cells = []
    for i, (stage, fractions) in enumerate(busy.items()):
        y = 4 + i * row
        mean = sum(fractions) / len(fractions) if fractions else 0.0
        cells.append(f'<text x={_PAD - 4} y={y + 15} text-anchor=end>{stage}</text>')
        prev = 0.0
        for t, f in zip(xs, fractions, strict=True):
            x0, x1 = _x(prev, xs), _x(t, xs)
            cells.append(f'<rect x={x0:.1f} y={y} width={max(x1 - x0, 0.5):.1f} height={row - 4} fill="{COLORS[0]}" '
                         f'fill-opacity={0.06 + 0.94 * f:.2f}><title>{stage} {f:.0%} at {t:.0f}s</title></rect>')
            prev = t
        cells.append(f'<text x={_W + 32} y={y + 15} text-anchor=end>{mean:.0%}</text>')
    return (f'<svg class=chart width={_W + 36} height={height} viewBox="0 0 {_W + 36} {height}">'
            f'{"".join(cells)}</svg>')


def _bars(counts: dict[int, int]) -> str:
    top = max(counts.values())
    width = (_W - _PAD - 8) / len(counts)
    bars = []
    for i, (size, n) in enumerate(counts.items()):
        h = (_H - 28) * n / top
        x = _PAD + i * width
        bars.append(f'<rect x={x + 1:.1f} y={_H - 20 - h:.1f} width={max(width - 2, 1):.1f} height={h:.1f} '
                    f'fill="{COLORS[2]}"><title>{n} batches of {size}</title></rect>')
        if len(counts) <= 24 or i % max(1, len(counts) // 12) == 0:
            bars.append(f'<text x={x + width / 2:.1f} y={_H - 6} text-anchor=middle>{size}</text>')
    axes = (f'<line x1={_PAD} y1={_H - 20} x2={_W - 8} y2={_H - 20} stroke="#999"/>'
            f'<text x={_PAD - 4} y=14 text-anchor=end>{top}</text>')
    return f'<svg class=chart width={_W} height={_H} viewBox="0 0 {_W} {_H}">{axes}{"".join(bars)}</svg>'


def started_at(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
