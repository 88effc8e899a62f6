"""A self-contained HTML report of a win-rate evaluation: the tables, the plots and every judged dialogue pair.

Per candidate method and held-out prompt, the candidate's and the baseline's dialogues are shown side by side,
turn by turn, each turn followed by the judge's verdict on the two dialogues truncated there (scores for a reward
judge; both orders' verdicts and comparison texts for an LLM judge), so a reader can see why a method wins.
The page is one file: inline CSS, the PNG embedded as a data URI, no scripts, no external assets. Text from the
dialogues and the judge is HTML-escaped by Jinja2's autoescaping.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, StrictUndefined
from markupsafe import Markup

from dialogsim.messages import Message
from refuel.storage import atomic_path

DETAIL_SUFFIXES = {
    "_first": " (candidate)",
    "_second": " (baseline)",
    "_ab": " (candidate shown as A)",
    "_ba": " (candidate shown as B)",
}
LONG_DETAIL_PREFIX = "comparison"
TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 78rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.2rem; margin-top: 2rem; } h3 { font-size: 1rem; }
table.frame { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
table.frame th, table.frame td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; }
dl.settings { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; font-size: .9rem; }
dl.settings dt { font-weight: 600; } dl.settings dd { margin: 0; }
details.prompt { border: 1px solid #ccc; border-radius: 6px; margin: .5rem 0; padding: .3rem .6rem; }
details.prompt > summary { cursor: pointer; }
.chip { display: inline-block; min-width: 1.4rem; text-align: center; border-radius: 4px; margin-left: .2rem;
        font-size: .8rem; font-weight: 600; }
.win { background: #c8ecc8; } .loss { background: #f6c9c9; } .tie { background: #e6e6e6; }
.invalid { background: #fbe7a9; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem; margin-top: .6rem; }
.column-head { font-weight: 600; border-bottom: 2px solid #888; }
.message { white-space: pre-wrap; border-radius: 6px; padding: .4rem .6rem; font-size: .88rem; }
.user { background: #eef3fb; } .assistant { background: #f7f7f7; } .missing { color: #888; font-style: italic; }
.role { font-size: .75rem; font-weight: 600; color: #555; display: block; }
.judgement { grid-column: 1 / span 2; border-left: 4px solid #888; padding: .3rem .6rem; font-size: .88rem; }
.comparison { white-space: pre-wrap; margin: .2rem 0 .2rem 1rem; color: #333; }
.shared { margin-top: .5rem; }
</style></head><body>
<h1>{{ title }}</h1>
<dl class="settings">{% for key, value in settings.items() %}<dt>{{ key }}</dt><dd>{{ value }}</dd>{% endfor %}</dl>
<h2>Win rate (%) against {{ baseline }}, bootstrap 95 % interval</h2>{{ win_rates }}
<h2>Judged pairs per turn</h2>{{ counts }}
<h2>Judge behaviour</h2>{{ judge_stats }}
{% if plot %}<img alt="win rate per turn" src="data:image/png;base64,{{ plot }}">{% endif %}
{% if diagnostics %}
<h2>Per-turn diagnostics of each policy's own dialogues (rates in %)</h2>{{ diagnostics }}
{% if diagnostics_plot %}
<img alt="diagnostics per turn" src="data:image/png;base64,{{ diagnostics_plot }}" style="max-width: 100%">
{% endif %}
{% endif %}
{% for method in methods %}
<h2>{{ method.name }} (left) vs {{ baseline }} (right)</h2>
{% for prompt in method.prompts %}
<details class="prompt"><summary><code>{{ prompt.short_id }}</code>
{% for chip in prompt.chips %}
<span class="chip {{ chip.css }}" title="turn {{ chip.turn }}">{{ chip.text }}</span>
{% endfor %}
&nbsp;{{ prompt.preview }}</summary>
<div class="message user shared"><span class="role">user, turn 1 (shared)</span>{{ prompt.first_user }}</div>
{% for turn in prompt.turns %}
<div class="pair">
<div class="column-head">{{ method.name }}, turn {{ turn.turn }}</div>
<div class="column-head">{{ baseline }}, turn {{ turn.turn }}</div>
{% for side in (turn.candidate, turn.baseline) %}<div>
{% if side.user is not none %}<div class="message user"><span class="role">user</span>{{ side.user }}</div>{% endif %}
{% if side.assistant is not none %}
<div class="message assistant"><span class="role">assistant</span>{{ side.assistant }}</div>
{% else %}<div class="message missing">(the dialogue ended before this turn)</div>{% endif %}
</div>{% endfor %}
<div class="judgement {{ turn.judgement.css }}"><strong>h={{ turn.turn }}: {{ turn.judgement.label }}</strong>
{% if turn.identical %}&nbsp;(the two dialogues are identical up to this turn){% endif %}
{% for key, value in turn.judgement.short %}&nbsp;· {{ key }}: {{ value }}{% endfor %}
{% for key, value in turn.judgement.long %}
<div><em>{{ key }}</em><div class="comparison">{{ value }}</div></div>
{% endfor %}
</div></div>
{% endfor %}
</details>
{% endfor %}
{% endfor %}
</body></html>
"""


def write_html_report(
    path: Path,
    *,
    title: str,
    settings: Mapping[str, Any],
    baseline: str,
    rates: pd.DataFrame,
    counts: pd.DataFrame,
    judge_stats: pd.DataFrame,
    judgements: pd.DataFrame,
    dialogues: Mapping[str, Mapping[str, list[Message]]],
    plot: Path | None = None,
    diagnostics: pd.DataFrame | None = None,
    diagnostics_plot: Path | None = None,
) -> Path:
    """Write the report (atomically) and return ``path``.

    Args:
        path: the ``.html`` file to write; its folder is created if missing.
        title: page title.
        settings: run settings shown at the top (judge, prompts, horizon, seeds, ...).
        baseline: the baseline's method name; ``dialogues[baseline]`` holds its dialogues.
        rates / counts / judge_stats: ``paper_table``, ``count_table`` and ``judge_statistics`` frames.
        judgements: long frame, one row per (method, prompt_id, turn) with ``outcome``, optional ``reason`` and
            judge detail columns (``score_first``, ``verdict_ab``, ``comparison_ab``, ...; first = candidate).
        dialogues: method name → prompt id → messages, for the baseline and every method in ``judgements``.
        plot: PNG to embed (e.g. ``win_rates.png``), or ``None``.
        diagnostics: :func:`refuel.evaluation.diagnostics.diagnostics_frame` (one row per method and turn), shown
            after the judge's tables; ``None`` leaves the section out.
        diagnostics_plot: PNG of the diagnostics (``diagnostics.png``) to embed below them, or ``None``.

    Raises:
        KeyError: a judged (method, prompt id) has no dialogue in ``dialogues``; the message names it.
    """
    environment = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = environment.from_string(TEMPLATE).render(
        title=title,
        settings={key: str(value) for key, value in settings.items()},
        baseline=baseline,
        win_rates=_frame_html(rates, index=True),
        counts=_frame_html(counts, index=True),
        judge_stats=_frame_html(judge_stats, index=False),
        plot=_png(plot),
        diagnostics=_frame_html(diagnostics, index=False, formatters={"reward": _three_decimals})
        if diagnostics is not None
        else None,
        diagnostics_plot=_png(diagnostics_plot),
        methods=[
            {"name": method, "prompts": _prompt_views(frame, dialogues, str(method), baseline)}
            for method, frame in judgements.groupby("method", sort=False)
        ],
    )
    with atomic_path(Path(path)) as staging:
        staging.write_text(html, encoding="utf-8")
    return Path(path)


def _png(path: Path | None) -> str | None:
    """A PNG file as base64 text for a data URI; ``None`` for no file."""
    return base64.b64encode(path.read_bytes()).decode() if path is not None else None


def _frame_html(
    frame: pd.DataFrame, index: bool, formatters: Mapping[str, Callable[[float], str]] | None = None
) -> Markup:
    """A pandas table as escaped HTML (``to_html`` escapes cell text), numbers to one decimal unless
    ``formatters`` (column → formatter) says otherwise."""
    return Markup(
        frame.to_html(
            classes="frame",
            border=0,
            index=index,
            na_rep="–",
            float_format="{:.1f}".format,
            formatters=dict(formatters or {}),
        )
    )


def _three_decimals(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def _prompt_views(
    judgements: pd.DataFrame, dialogues: Mapping[str, Mapping[str, list[Message]]], method: str, baseline: str
) -> list[dict[str, Any]]:
    """One view per prompt of ``method``: outcome chips and turn-by-turn pairs with their judgements."""
    views = []
    for prompt_id, frame in judgements.groupby("prompt_id", sort=False):
        candidate, reference = _dialogue(dialogues, method, prompt_id), _dialogue(dialogues, baseline, prompt_id)
        by_turn = {int(row["turn"]): _judgement_view(row) for _, row in frame.iterrows()}
        first_user = candidate[0]["content"] if candidate else ""
        views.append(
            {
                "short_id": str(prompt_id)[:12],
                "preview": max(first_user.splitlines() or [""], key=len)[:140],  # the problem, not the template
                "first_user": first_user,
                "chips": [{"turn": turn, **view["chip"]} for turn, view in sorted(by_turn.items())],
                "turns": [
                    {
                        "turn": turn,
                        "candidate": _turn(candidate, turn),
                        "baseline": _turn(reference, turn),
                        "identical": _through_turn(candidate, turn) == _through_turn(reference, turn),
                        "judgement": view,
                    }
                    for turn, view in sorted(by_turn.items())
                ],
            }
        )
    return views


def _dialogue(dialogues: Mapping[str, Mapping[str, list[Message]]], method: str, prompt_id: object) -> list[Message]:
    try:
        return dialogues[method][str(prompt_id)]
    except KeyError as error:
        raise KeyError(f"write_html_report: no dialogue of method {method!r} for prompt {prompt_id!r}") from error


def _turn(messages: list[Message], turn: int) -> dict[str, str | None]:
    """The user message (``None`` at turn 1, shown once above) and the assistant reply of turn h."""
    users = [message["content"] for message in messages if message["role"] == "user"]
    replies = [message["content"] for message in messages if message["role"] == "assistant"]
    return {
        "user": users[turn - 1] if 1 < turn <= len(users) else None,
        "assistant": replies[turn - 1] if turn <= len(replies) else None,
    }


def _through_turn(messages: list[Message], turn: int) -> list[Message]:
    """The messages up to the assistant reply of turn h (all of them if the dialogue ended before)."""
    ends = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    return messages[: ends[turn - 1] + 1] if turn <= len(ends) else messages


def _judgement_view(row: pd.Series) -> dict[str, Any]:
    """Label, CSS class, chip and the judge's details of one judgement row."""
    outcome = float(row["outcome"])
    if math.isnan(outcome):
        reason = row.get("reason")
        label, css, chip = f"invalid ({reason if isinstance(reason, str) else 'no verdict'})", "invalid", "?"
    elif outcome == 0.5:
        label, css, chip = "tie", "tie", "T"
    else:
        css, chip = ("win", "W") if outcome > 0.5 else ("loss", "L")
        label = {1.0: "candidate wins", 0.0: "baseline wins"}.get(outcome, f"P(candidate better) = {outcome:.2f}")
    details = [(key, row[key]) for key in row.index if _is_detail(key) and _present(row[key])]
    return {
        "label": label,
        "css": css,
        "chip": {"text": chip, "css": css},
        "short": [
            (_detail_name(key), _short(value)) for key, value in details if not key.startswith(LONG_DETAIL_PREFIX)
        ],
        "long": [(_detail_name(key), value) for key, value in details if key.startswith(LONG_DETAIL_PREFIX)],
    }


def _is_detail(key: str) -> bool:
    return key not in ("method", "prompt_id", "turn", "outcome", "reason")


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def _short(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _detail_name(key: str) -> str:
    """``score_first`` → ``score (candidate)``, ``verdict_ab`` → ``verdict (candidate shown as A)``."""
    for suffix, label in DETAIL_SUFFIXES.items():
        if key.endswith(suffix):
            return key.removesuffix(suffix).replace("_", " ") + label
    return key.replace("_", " ")
