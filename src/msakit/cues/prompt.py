"""The request an MLLM answers with cues, and how its reply becomes `visual_cues` / `language_cues`.

As in MMSLF, the model sees three frames spread over the clip, the transcript and, for training
clips only, the annotated label, and writes two labelled sections: what the face shows and which
words carry the sentiment. Changing the wording means raising `PROMPT_VERSION`, so that a resumed
run asks again instead of mixing answers to two different requests.
"""

from __future__ import annotations

import re

from msakit.cues.backend import CueSample, label_phrase

PROMPT_VERSION = "mmslf-1"

_HEADING = re.compile(
    r"^[\s#>*_\-]*(?:\d+\s*[.)]\s*)?[*_]*\s*(visual|language)\s+cues?\s*[*_]*\s*(?:[:：]|$)\s*[*_]*\s*(.*)$",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


def build_prompt(sample: CueSample, frames: int) -> str:
    """The text part of the request for `sample`; `frames` images go with it."""
    if frames:
        seeing = (f"You are given {frames} frames taken at even intervals from the start to the end of "
                  "a short video clip of a speaker, and what the speaker says.")
        visual = ("Visual cues: what the face shows across the frames (smiling, frowning, the eyes and "
                  "brows, gaze, head movement) and what that suggests about the speaker's sentiment.")
    else:
        seeing = ("You are given what the speaker in a short video clip says; no frames of the video are "
                  "available.")
        visual = "Visual cues: write only that no frames were available."
    transcript = sample.transcript.strip() if sample.transcript and sample.transcript.strip() else None
    lines = [
        "You help train a small multimodal sentiment model. " + seeing + " Write hints that point the "
        "model to the evidence for the speaker's sentiment.",
        "",
        f'Transcript: "{transcript}"' if transcript else "Transcript: not available.",
    ]
    if sample.label is not None:
        lines.append("Annotated sentiment of this training clip (explain the evidence for it): "
                     + label_phrase(sample.label, sample.family) + ".")
    lines += [
        "",
        "Answer with exactly two sections, each starting on its own line with its heading in English:",
        visual,
        "Language cues: the words and phrases that carry sentiment (praise, criticism, negation, "
        "intensifiers, hedging) and the attitude they express together."
        + ("" if transcript else " As there is no transcript, write only that none was available."),
        "Keep each section to a few sentences of plain text.",
    ]
    return "\n".join(lines)


def _clean(lines: list[str]) -> str:
    text = " ".join(_BULLET.sub("", line).replace("**", "").strip() for line in lines)
    return " ".join(text.split())


def parse_cues(reply: str) -> tuple[str, str]:
    """(visual cues, language cues) from a reply with the two headed sections, else ValueError."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in reply.splitlines():
        match = _HEADING.match(line)
        if match:
            current = sections.setdefault(match.group(1).lower(), [])
            current.append(match.group(2))
        elif current is not None:
            current.append(line)
    found = {name: _clean(lines) for name, lines in sections.items()}
    missing = [f"'{name.title()} cues'" for name in ("visual", "language") if not found.get(name)]
    if missing:
        raise ValueError(f"the reply has no {' and no '.join(missing)} section")
    return found["visual"], found["language"]
