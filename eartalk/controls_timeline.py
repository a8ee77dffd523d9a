"""Controls timelines: JSON files that pin or free controls at given moments of a stream.

Format (used by ``eartalk stream`` and ``eartalk generate``)::

    {"events": [{"t": 1.5, "yaw": 10, "emotion": "happy"},   # from 1.5 s (frame round(1.5 * fps))
                {"frame": 80, "blink": null}]}                # from frame 80; null frees blink

Each event names exactly one of ``"t"`` (seconds >= 0) or ``"frame"`` (int >= 0) plus any controls
of ``eartalk.model.config.CONTROLS``. Every event is validated when the file is read, so a bad
name or value is reported before any frame is made.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_timeline", "parse_timeline", "apply_timeline"]


def parse_timeline(doc, fps: int, source: str = "controls timeline") -> list[tuple[int, dict]]:
    """A decoded timeline document -> sorted [(frame, {control: value or None})].

    Raises ValueError naming ``source``, the event and what is wrong (an unknown control lists the
    valid ones; an out-of-range value gives the range).
    """
    from eartalk.model.conditions import encode_controls
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError(f"{source}: expected {{\"events\": [...]}}, got {type(doc).__name__}")
    out = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict) or ("t" in ev) == ("frame" in ev):
            raise ValueError(f"{source}: event {i} needs exactly one of \"t\" (seconds) "
                             f"or \"frame\", got {ev!r}")
        at = ev.get("frame", None)
        if at is None:
            t = ev["t"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
                raise ValueError(f"{source}: event {i} has t={t!r}; expected seconds >= 0")
            at = int(round(t * fps))
        elif isinstance(at, bool) or not isinstance(at, int) or at < 0:
            raise ValueError(f"{source}: event {i} has frame={at!r}; expected an int >= 0")
        values = {k: v for k, v in ev.items() if k not in ("t", "frame")}
        try:
            encode_controls(values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: event {i}: {e}") from None
        out.append((at, values))
    return sorted(out, key=lambda e: e[0])


def load_timeline(path, fps: int) -> list[tuple[int, dict]]:
    """Timeline JSON file -> sorted [(frame, {control: value})]; validates every event up front."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"controls timeline not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"controls timeline {path} is not valid JSON: {e}") from e
    return parse_timeline(doc, fps, source=f"controls timeline {path}")


def apply_timeline(session, timeline: list[tuple[int, dict]]) -> None:
    """Schedule every event on ``session`` (``session.control(at_frame=frame, **values)``)."""
    for at, values in timeline:
        session.control(at_frame=at, **values)
