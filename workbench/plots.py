"""Plotly figures for the workbench: training curves from `metrics.jsonl` rows, dataset histograms,
benchmark bars.

Every function takes plain data (lists of dicts, lists of numbers, a DataFrame) and returns a
`plotly.graph_objects.Figure`, so the tabs stay thin and the tests can check the traces. A figure
with no data says so in its title rather than drawing empty axes that look like a bug.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import plotly.graph_objects as go

_ACC_RE = re.compile(r"^acc_(\d+)$")
PALETTE = ["#4f46e5", "#16a34a", "#d97706", "#dc2626", "#0891b2", "#9333ea", "#65a30d", "#db2777",
           "#0d9488", "#ea580c"]
TRAIN_COLOR, EVAL_COLOR = "#4f46e5", "#d97706"


def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str, height: int = 300) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.02, font=dict(size=15)), height=height, template="plotly_white",
                      margin=dict(l=55, r=20, t=45, b=45), xaxis_title=xlabel, yaxis_title=ylabel,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
                      font=dict(family="ui-sans-serif, system-ui, sans-serif", size=12))
    return fig


def _empty(title: str, why: str, xlabel: str = "", ylabel: str = "") -> go.Figure:
    fig = _layout(go.Figure(), f"{title} <span style='font-size:12px;color:#888'>({why})</span>", xlabel, ylabel)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's metrics.jsonl (a torn last line from a running job is skipped)."""
    from specforge_core.events import read_events

    return read_events(path)


def split_rows(rows: Iterable[dict], split: str) -> list[dict]:
    return [r for r in rows if r.get("split", "train") == split and isinstance(r.get("step"), (int, float))]


def _series(rows: Sequence[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def acc_keys(rows: Iterable[dict]) -> list[str]:
    ks = {k for r in rows for k in r if _ACC_RE.match(k)}
    return sorted(ks, key=lambda k: int(_ACC_RE.match(k).group(1)))


def _train_eval_traces(fig: go.Figure, train: Sequence[dict], ev: Sequence[dict], key: str) -> bool:
    """`key` per step: train as a line, eval as dashed markers; False when neither has a value."""
    x, y = _series(train, key)
    if x:
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if len(x) < 40 else "lines", name="train",
                                 line=dict(color=TRAIN_COLOR, width=2), marker=dict(size=5)))
    x2, y2 = _series(ev, key)
    if x2:
        fig.add_trace(go.Scatter(x=x2, y=y2, mode="lines+markers", name="eval",
                                 line=dict(color=EVAL_COLOR, width=2, dash="dash"), marker=dict(size=8)))
    return bool(x or x2)


def loss_figure(rows: Sequence[dict], family: str = "eagle3") -> go.Figure:
    """Train loss per step (line) and eval loss (markers)."""
    train, ev = split_rows(rows, "train"), split_rows(rows, "eval")
    if not train and not ev:
        return _empty("Loss", "no metrics yet", "step", "loss")
    fig = go.Figure()
    _train_eval_traces(fig, train, ev, "loss")
    norm = next((r.get("loss_normalization") for r in reversed(train) if r.get("loss_normalization")), None)
    title = ("Loss (heads weighted decay**i)" if family == "medusa" else "Loss (TTT-weighted)") \
        + (f" · normalised per {norm} position" if norm == "counted" else "")
    return _layout(fig, title, "step", "loss")


def acc_label(key: str, family: str = "eagle3") -> str:
    """A metrics column `acc_i` as a legend names it: the TTT step (EAGLE3) or "head i" (Medusa)."""
    m = _ACC_RE.match(key)
    return f"head {m.group(1)}" if m and family == "medusa" else key


def acc_figure(rows: Sequence[dict], split: str = "train", family: str = "eagle3") -> go.Figure:
    """Accuracy per draft step, one line each: EAGLE3's TTT steps acc_k (k = 0 .. ttt_length-1), or a
    Medusa draft's heads (the same `acc_i` columns, drawn as "head i")."""
    sel = split_rows(rows, split)
    keys = acc_keys(sel)
    medusa = family == "medusa"
    what = "per head" if medusa else "acc_k"
    if not keys:
        return _empty(f"Accuracy {what} ({split})", "no metrics yet", "step", "accuracy")
    fig = go.Figure()
    for i, k in enumerate(keys):
        x, y = _series(sel, k)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if len(x) < 40 else "lines",
                                 name=acc_label(k, family),
                                 line=dict(color=PALETTE[i % len(PALETTE)], width=2 if i == 0 else 1.5),
                                 marker=dict(size=4)))
    title = (f"Accuracy per Medusa head ({split}): head i predicts token t+2+i" if medusa
             else f"Accuracy acc_k ({split}): draft token k of the chain")
    fig = _layout(fig, title, "step", "accuracy")
    fig.update_yaxes(range=[0, 1.02])
    return fig


def accept_len_figure(rows: Sequence[dict]) -> go.Figure:
    """Simulated acceptance length (1 + sum_j chain_j, training/metrics.py), train and eval."""
    train, ev = split_rows(rows, "train"), split_rows(rows, "eval")
    fig = go.Figure()
    if not _train_eval_traces(fig, train, ev, "sim_accept_len"):
        return _empty("Simulated acceptance length", "no metrics yet", "step", "tokens / verify step")
    fig = _layout(fig, "Simulated acceptance length (1 = no speedup)", "step", "tokens / verify step")
    fig.update_yaxes(rangemode="tozero")
    return fig


def training_figures(rows: Sequence[dict], family: str = "eagle3") -> tuple[go.Figure, go.Figure, go.Figure]:
    """(loss, accuracy per step or head, simulated acceptance length) for a run of draft `family`."""
    return loss_figure(rows, family), acc_figure(rows, family=family), accept_len_figure(rows)


def histogram(values: Sequence[float], title: str, xlabel: str, nbins: int | None = None,
              color: str = TRAIN_COLOR) -> go.Figure:
    vals = [v for v in values if v is not None]
    if not vals:
        return _empty(title, "no rows", xlabel, "rows")
    fig = go.Figure(go.Histogram(x=vals, nbinsx=nbins, marker=dict(color=color, line=dict(color="white", width=1))))
    fig = _layout(fig, title, xlabel, "rows", height=280)
    fig.update_layout(bargap=0.05, showlegend=False)
    return fig


def turns_histogram(turns: Sequence[int]) -> go.Figure:
    fig = histogram(turns, f"Turns per conversation ({len(turns)} rows)", "turns")
    if turns:
        # Turns are whole numbers: one bar per count, centred on it.
        fig.update_traces(xbins=dict(start=min(turns) - 0.5, end=max(turns) + 0.5, size=1))
        fig.update_xaxes(dtick=1 if max(turns) - min(turns) <= 20 else None)
    return fig


def token_length_histogram(lengths: Sequence[int], what: str = "tokens per conversation") -> go.Figure:
    return histogram(lengths, f"Token length ({len(lengths)} rows)", what, nbins=40, color="#0891b2")


def bench_bar(df: Any, value: str, title: str, ylabel: str, baseline: float | None = None) -> go.Figure:
    """One bar per benchmark config (x = config label, colour = benchmark set when there are several)."""
    if df is None or len(df) == 0 or value not in getattr(df, "columns", []):
        return _empty(title, "no results yet", "config", ylabel)
    fig = go.Figure()
    sets = list(dict.fromkeys(df["benchmark"])) if "benchmark" in df.columns else [None]
    for i, s in enumerate(sets):
        sub = df if s is None else df[df["benchmark"] == s]
        fig.add_trace(go.Bar(x=[str(c) for c in sub["config"]], y=list(sub[value]), name=str(s or value),
                             marker=dict(color=PALETTE[i % len(PALETTE)]),
                             text=[f"{v:.2f}" if isinstance(v, (int, float)) else "" for v in sub[value]],
                             textposition="outside"))
    fig = _layout(fig, title, "config (batch, steps, topk, draft_tokens)", ylabel, height=320)
    fig.update_layout(barmode="group")
    if baseline is not None:
        fig.add_hline(y=baseline, line=dict(color="#888", dash="dot"), annotation_text="no speculation")
    return fig


def figure_has_data(fig: go.Figure) -> bool:
    return any(len(getattr(t, "x", None) or ()) > 0 for t in fig.data)
