"""The Loss-mask tab: paste a conversation (or pick a row from a workspace file) and see, token by
token, what the draft is trained on (green) and what is masked (red).

A wrong chat template silently ruins a training run; this view is where a user catches it. All
work happens in plain functions (`parse_pasted`, `run_mask`, `run_compare`) that call
`specforge_core.data.mask`, with rows and tokenizers read through `workbench.common` (`read_row`,
`resolve_tokenizer`); `build` only lays out components and wires them. The same view, without file
or tokenizer-path access, is the public demo (`workbench.mask_demo`), which reuses `build_mask_view`
with an allow-list of tokenizers.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import InputError, read_row, render_message, resolve_input, resolve_tokenizer, whole_number

TITLE = "Loss mask"
log = logging.getLogger(__name__)

EXAMPLE_CONVERSATION = {
    "id": "example-1",
    "conversations": [
        {"role": "system", "content": "You are a concise assistant for a bicycle repair shop."},
        {"role": "user", "content": "My chain keeps slipping on the smallest cog. What should I check?"},
        {"role": "assistant", "content": "Check the rear derailleur limit screw first: turn the H screw "
                                         "a quarter turn at a time until the chain sits cleanly.\n"
                                         "If it still slips, the chain or cog is probably worn."},
        {"role": "user", "content": "How do I know if the chain is worn?"},
        {"role": "assistant", "content": "Use a chain checker: at 0.75% stretch, replace the chain."},
    ],
}
EXAMPLE_TEXT = json.dumps(EXAMPLE_CONVERSATION, indent=2, ensure_ascii=False)

SOURCE_PASTE = "Paste a conversation"
SOURCE_FILE = "Pick a row from a workspace file"
COLOR_MAP = {"trained": "#16a34a", "masked": "#dc2626"}
MAX_LENGTH_LIMIT = 131072

# The public demo's tokenizers: name shown -> name `load_tokenizer` understands.
DEFAULT_ALLOWED_TOKENIZERS = {
    "default (SmolLM2-135M-Instruct)": "default",
    "llama3 (Meta Llama-3)": "llama3",
}


# The name this tab's callers catch; the class is the one every tab raises for input the user can fix.
MaskInputError = InputError


# ------------------------------------------------------------------------------------------------
# Input: pasted text
# ------------------------------------------------------------------------------------------------
def _normalize(obj: Any, where: str) -> dict:
    from specforge_core.data.schema import RowError, normalize_row

    try:
        return normalize_row(obj)
    except RowError as e:
        raise InputError(f"{where}: {e.message}") from None


def parse_pasted(text: str) -> dict:
    """Pasted input -> one row in our schema.

    Accepts a row object (`conversations` / `messages` / `text`), a bare list of turns
    (`{role, content}` or ShareGPT `{from, value}`), a JSON string, or plain chat text, which becomes
    a `text` row (the template still finds its assistant spans).
    """
    if text is None or not text.strip():
        raise InputError("nothing to show: paste a conversation (JSON) or already templated chat text")
    stripped = text.strip()
    if stripped[0] in "[{\"":
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InputError(f"pasted input is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg} "
                                 "(plain chat text is fine too, but then do not start it with '{' or '[')") from None
    else:
        return {"id": "pasted", "text": text}
    if isinstance(obj, str):
        return _normalize({"id": "pasted", "text": obj}, "pasted text")
    if isinstance(obj, list):
        if obj and all(isinstance(t, dict) and ("conversations" in t or "messages" in t or "text" in t) for t in obj):
            # A pasted list of rows: show the first, like a file's row 0.
            return _normalize(obj[0], "pasted row 0")
        return _normalize({"id": "pasted", "conversations": obj}, "pasted conversation")
    if isinstance(obj, dict):
        return _normalize(obj, "pasted row")
    raise InputError(f"pasted JSON is a {type(obj).__name__}; expected a row object or a list of turns")


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
@dataclass
class MaskView:
    """What the GUI shows for one sample under one template."""

    html: str
    highlights: list[tuple[str, str]]
    summary: dict
    warnings: list[str] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)

    @property
    def status_html(self) -> str:
        return render_status(self.summary, self.warnings)


def _visible(piece: str) -> str:
    """Escape one token's text and make whitespace that would otherwise vanish visible."""
    if piece == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in piece:
        if ch == "\n":
            out.append('<span class="ws">↵</span><br>')
        elif ch == "\t":
            out.append('<span class="ws">→</span>\t')
        elif ch == "\r":
            out.append('<span class="ws">␍</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def render_tokens_html(tokens: list[dict]) -> str:
    """Tokens from `token_view` -> one HTML block; hover shows position, id and state."""
    parts = ['<div class="mask-legend"><span class="tok trained">trained (in the loss)</span> '
             '<span class="tok masked">masked</span> <span class="hint">hover a token for its id</span></div>',
             '<div class="tok-view">']
    for t in tokens:
        state = "trained" if t["trained"] else "masked"
        parts.append(f'<span class="tok {state}" data-id="{int(t["id"])}" '
                     f'title="#{int(t["i"])} · id {int(t["id"])} · {state}">{_visible(t["token"])}</span>')
    parts.append("</div>")
    return "".join(parts)


def collect_warnings(ms: Any, max_length: int) -> list[str]:
    """The sample's warnings, each with what it means for training, the stopping ones first."""
    raw = [w for w in (getattr(ms, "warnings", None) or ([ms.warning] if ms.warning else [])) if w]
    if ms.num_trained == 0 and not any("all-zero" in w.lower() for w in raw):
        raw.insert(0, "all-zero mask")
    if ms.truncated and not any("truncat" in w.lower() for w in raw):
        raw.append(f"truncated to {max_length} tokens")
    raw.sort(key=lambda w: "all-zero" not in w.lower())
    explained = []
    for w in raw:
        lw = w.lower()
        if "all-zero" in lw and "max_length" in lw:
            explained.append(f"ALL-ZERO MASK ({w}): no token of this sample would be trained; raise max_length "
                             "or shorten the conversation. Training skips such samples.")
        elif "all-zero" in lw:
            explained.append(f"ALL-ZERO MASK ({w}): no token of this sample would be trained. The template "
                             "probably does not match this tokenizer or text; training skips such samples.")
        elif "truncat" in lw:
            explained.append(f"TRUNCATED at max_length = {max_length} tokens: later turns are cut off.")
        elif "prefix" in lw:
            explained.append(f"NOT PREFIX-STABLE ({w}): the tokenizer's template re-renders earlier turns "
                             "differently (e.g. drops <think> blocks), so prefix diffs are unreliable. Use a "
                             "named template or train_only_last_turn.")
        else:
            explained.append(w)
    return explained


def render_status(summary: dict, warnings: list[str]) -> str:
    frac = summary.get("trained_fraction", 0.0) or 0.0
    parts = [f'<div class="mask-summary"><b>{summary.get("tokens", 0)}</b> tokens · '
             f'<b class="c-trained">{summary.get("trained", 0)}</b> trained · '
             f'<b class="c-masked">{summary.get("masked", 0)}</b> masked · '
             f'<b>{100 * frac:.1f}%</b> trained'
             + (f' · template <code>{html.escape(str(summary["template"]))}</code>' if summary.get("template") else "")
             + "</div>"]
    for w in warnings:
        parts.append(f'<div class="mask-warning">⚠ {html.escape(w)}</div>')
    return "".join(parts)


def render_error(message: str) -> str:
    return render_message(message, ok=False)


def mask_view(sample: dict | str, tokenizer: Any, template: str = "auto", max_length: int = 2048,
              train_only_last_turn: bool = False) -> MaskView:
    """Mask one sample and build everything the view shows. Raises the engine's errors unchanged."""
    from specforge_core.data.inspect import mask_summary, token_view
    from specforge_core.data.mask import mask

    ms = mask(sample, tokenizer, template=template, max_length=int(max_length),
              train_only_last_turn=bool(train_only_last_turn))
    tokens = token_view(ms, tokenizer)
    summary = dict(mask_summary(ms))
    summary["template"] = summary.get("template") or template
    highlights = [(t["token"], "trained" if t["trained"] else "masked") for t in tokens]
    return MaskView(html=render_tokens_html(tokens), highlights=highlights, summary=summary,
                    warnings=collect_warnings(ms, int(max_length)),
                    input_ids=list(ms.input_ids), loss_mask=list(ms.loss_mask))


def _friendly(e: Exception) -> str:
    from specforge_core.targets import ModelNotFoundError

    if isinstance(e, (InputError, ModelNotFoundError)):
        return str(e)
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"{msg}" if msg else type(e).__name__


def _sample_from_inputs(source: str, pasted: str, file_path: str, index: Any, workspace: Path | None) -> dict:
    if source == SOURCE_FILE:
        if workspace is None:
            raise InputError("files are not available here; paste a conversation instead")
        if not file_path or not str(file_path).strip():
            raise InputError("give a file path inside the workspace (e.g. data/train.jsonl)")
        return read_row(resolve_input(workspace, file_path), int(index or 0))
    return parse_pasted(pasted)


def _check_max_length(max_length: Any) -> int:
    n = whole_number(max_length, "max_length")
    if not 8 <= n <= MAX_LENGTH_LIMIT:
        raise InputError(f"max_length must be between 8 and {MAX_LENGTH_LIMIT}, got {n}")
    return n


def run_mask(source: str, pasted: str, file_path: str, index: Any, tokenizer_name: str, template: str,
             max_length: Any, train_only_last_turn: bool, *, workspace: Path | None = None,
             allowed_tokenizers: dict[str, str] | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """The Show-mask button: returns (status html, token html, highlights). Never raises."""
    try:
        n = _check_max_length(max_length)
        sample = _sample_from_inputs(source, pasted, file_path, index, workspace)
        tok = resolve_tokenizer(tokenizer_name, workspace, allowed_tokenizers)
        view = mask_view(sample, tok, template or "auto", n, train_only_last_turn)
    except Exception as e:  # noqa: BLE001 - every failure becomes a readable message in the page
        if not isinstance(e, (ValueError, KeyError, FileNotFoundError)):
            log.exception("loss-mask view failed")
        return render_error(_friendly(e)), "", []
    return view.status_html, view.html, view.highlights


def run_compare(source: str, pasted: str, file_path: str, index: Any, tokenizer_name: str, template_a: str,
                template_b: str, max_length: Any, train_only_last_turn: bool, *, workspace: Path | None = None,
                allowed_tokenizers: dict[str, str] | None = None) -> tuple[str, str, str, str, str]:
    """Side by side: (status A, tokens A, status B, tokens B, a one-line verdict). Never raises."""
    try:
        n = _check_max_length(max_length)
        sample = _sample_from_inputs(source, pasted, file_path, index, workspace)
        tok = resolve_tokenizer(tokenizer_name, workspace, allowed_tokenizers)
    except Exception as e:  # noqa: BLE001
        err = render_error(_friendly(e))
        return err, "", err, "", ""
    out: list[str] = []
    views: list[MaskView | None] = []
    for tpl in (template_a or "auto", template_b or "auto"):
        try:
            v = mask_view(sample, tok, tpl, n, train_only_last_turn)
            out += [v.status_html, v.html]
            views.append(v)
        except Exception as e:  # noqa: BLE001
            out += [render_error(f"{tpl}: {_friendly(e)}"), ""]
            views.append(None)
    out.append(compare_verdict(*views))
    return tuple(out)  # type: ignore[return-value]


def compare_verdict(a: MaskView | None, b: MaskView | None) -> str:
    if a is None or b is None:
        return "One of the templates failed; see its message."
    if a.input_ids != b.input_ids:
        return (f"The two templates render different token sequences ({len(a.input_ids)} vs "
                f"{len(b.input_ids)} tokens) and train {a.summary.get('trained', 0)} vs "
                f"{b.summary.get('trained', 0)} tokens.")
    diff = sum(x != y for x, y in zip(a.loss_mask, b.loss_mask))
    if diff == 0:
        return f"Identical: same {len(a.input_ids)} tokens, same mask."
    return f"Same {len(a.input_ids)} tokens, but the masks differ at **{diff}** positions."


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
def template_choices() -> list[str]:
    from specforge_core.data.templates import list_templates

    names = list(list_templates())
    return ["auto"] + [n for n in names if n != "auto"]


def build_mask_view(workspace: Path | None, allowed_tokenizers: dict[str, str] | None = None, app: Any = None,
                    example: str = EXAMPLE_TEXT) -> dict:
    """Lay out the mask view in the current Blocks context and wire its events.

    `workspace=None` (the public demo) hides everything that touches files; `allowed_tokenizers`
    turns the tokenizer box into a dropdown over that allow-list. Returns the components by name.
    """
    import gradio as gr

    templates = template_choices()
    c: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            if workspace is not None:
                c["source"] = gr.Radio([SOURCE_PASTE, SOURCE_FILE], value=SOURCE_PASTE, label="Input",
                                       elem_id="mask-source")
            else:
                c["source"] = gr.State(SOURCE_PASTE)
            c["pasted"] = gr.Textbox(value=example, lines=10, max_lines=30, label="Conversation",
                                     info="JSON: a row ({id, conversations}), a list of {role, content} or "
                                          "ShareGPT {from, value} turns, or plain templated chat text",
                                     elem_id="mask-input")
            if workspace is not None:
                with gr.Row(visible=False) as file_row:
                    c["file_path"] = gr.Textbox(label="File (inside the workspace)", placeholder="data/train.jsonl",
                                                scale=3, elem_id="mask-file")
                    c["index"] = gr.Number(value=0, precision=0, minimum=0, label="Row index", scale=1,
                                           elem_id="mask-index")
                c["source"].change(lambda s: (gr.update(visible=s == SOURCE_FILE), gr.update(visible=s == SOURCE_PASTE)),
                                   inputs=c["source"], outputs=[file_row, c["pasted"]])
            else:
                c["file_path"] = gr.State("")
                c["index"] = gr.State(0)
        with gr.Column(scale=1, min_width=240):
            if allowed_tokenizers is not None:
                names = list(allowed_tokenizers)
                c["tokenizer"] = gr.Dropdown(names, value=names[0], label="Tokenizer", elem_id="mask-tokenizer")
            else:
                c["tokenizer"] = gr.Textbox(value="default", label="Tokenizer", elem_id="mask-tokenizer",
                                            info="default (SmolLM2), llama3, a directory in the workspace, "
                                                 "or a cached hub id")
            c["template"] = gr.Dropdown(templates, value="auto", label="Chat template", elem_id="mask-template",
                                        info="auto = the tokenizer's own template, diffed prefix by prefix")
            c["max_length"] = gr.Number(value=2048, precision=0, minimum=8, maximum=MAX_LENGTH_LIMIT,
                                        label="max_length", elem_id="mask-max-length")
            c["last_turn"] = gr.Checkbox(value=False, label="train_only_last_turn", elem_id="mask-last-turn")
            c["button"] = gr.Button("Show mask", variant="primary", elem_id="mask-run")
    c["status"] = gr.HTML(elem_id="mask-status")
    c["tokens"] = gr.HTML(elem_id="mask-tokens", elem_classes=["tok-container"])
    with gr.Accordion("Span view (merged runs)", open=False):
        c["highlighted"] = gr.HighlightedText(color_map=COLOR_MAP, combine_adjacent=True, show_legend=True,
                                              show_inline_category=False, label="trained / masked spans",
                                              elem_id="mask-highlighted")
    with gr.Accordion("Compare two templates side by side", open=False, elem_id="mask-compare"):
        with gr.Row():
            c["template_a"] = gr.Dropdown(templates, value="auto", label="Template A", elem_id="mask-template-a")
            c["template_b"] = gr.Dropdown(templates, value=next((t for t in templates if t != "auto"), "auto"),
                                          label="Template B", elem_id="mask-template-b")
            c["compare_button"] = gr.Button("Compare", elem_id="mask-compare-run")
        c["verdict"] = gr.Markdown(elem_id="mask-verdict")
        with gr.Row(equal_height=False):
            with gr.Column():
                c["status_a"] = gr.HTML(elem_id="mask-status-a")
                c["tokens_a"] = gr.HTML(elem_id="mask-tokens-a")
            with gr.Column():
                c["status_b"] = gr.HTML(elem_id="mask-status-b")
                c["tokens_b"] = gr.HTML(elem_id="mask-tokens-b")

    common = [c["source"], c["pasted"], c["file_path"], c["index"], c["tokenizer"]]

    def on_mask(source, pasted, file_path, index, tokenizer, template, max_length, last_turn):
        return run_mask(source, pasted, file_path, index, tokenizer, template, max_length, last_turn,
                        workspace=workspace, allowed_tokenizers=allowed_tokenizers)

    def on_compare(source, pasted, file_path, index, tokenizer, ta, tb, max_length, last_turn):
        sa, ha, sb, hb, verdict = run_compare(source, pasted, file_path, index, tokenizer, ta, tb, max_length,
                                              last_turn, workspace=workspace, allowed_tokenizers=allowed_tokenizers)
        return verdict, sa, ha, sb, hb

    mask_inputs = common + [c["template"], c["max_length"], c["last_turn"]]
    mask_outputs = [c["status"], c["tokens"], c["highlighted"]]
    c["button"].click(on_mask, inputs=mask_inputs, outputs=mask_outputs, api_name="mask")
    c["compare_button"].click(on_compare, inputs=common + [c["template_a"], c["template_b"], c["max_length"],
                                                          c["last_turn"]],
                              outputs=[c["verdict"], c["status_a"], c["tokens_a"], c["status_b"], c["tokens_b"]],
                              api_name="compare_templates")
    if app is not None:
        # Show the example's mask as soon as the page opens: the view explains itself.
        app.load(on_mask, inputs=mask_inputs, outputs=mask_outputs)
    return c


def build(ctx) -> dict:
    """Add the Loss-mask tab's content (called inside its open `gr.Tab`)."""
    import gradio as gr

    gr.Markdown("Which tokens does the draft learn from? **Green** tokens are in the loss (assistant output and "
                "the end-of-turn token that closes it); **red** ones are masked (system, user, template headers). "
                "A mask that is all red, or green in the wrong places, means the chat template does not fit.")
    return build_mask_view(Path(ctx.workspace), None, app=ctx.app)
