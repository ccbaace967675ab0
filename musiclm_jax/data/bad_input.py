"""The bad-input policy of the dataset builders and jobs: every bad input is an error or a counted skip.

    report = BadInputReport(policy="skip", what="audio_folder /data/clips")
    report.bad("silent", "/data/clips/a.wav", "all samples below -60 dBFS")   # counted (or raises with 'error')
    report.note("downmixed")                                                    # counted, not a skip
    report.summary()  -> {'skipped': {'silent': 1}, 'notes': {'downmixed': 1}, 'examples': {...}}

Skip reasons used in the package (the `reason` argument): bad_caption_line, missing_file, unsupported_format,
empty, undecodable, non_finite, low_sample_rate, silent, too_short, no_caption, bad_csv_row, missing_clip. Notes
(changes made to usable inputs): downmixed, resampled, peak_normalized, uncaptioned, duration_mismatch; and the
held-out carve (captioned_audio.carve_held_out): carved_validation, carved_test, no_held_out.
"""
from __future__ import annotations

import collections
import sys
from typing import TextIO

POLICIES = ("skip", "error")
_PRINTED_PER_REASON = 10  # skips printed one by one per reason; the rest only counted
EXAMPLES_PER_REASON = 5  # skip messages kept per reason in the summary


class BadInputError(ValueError):
    """A bad input under the 'error' policy; the message names the file (and line) and the reason."""


def check_policy(policy: str, setting: str = "bad_input") -> str:
    if policy not in POLICIES:
        raise ValueError(f"{setting}={policy!r}: must be one of {POLICIES}")
    return policy


class BadInputReport:
    """Counts skipped inputs by reason (raising instead under policy 'error') and notes by kind.

    Args:
      policy: 'skip' (count and go on) or 'error' (raise BadInputError at the first bad input).
      what: names the dataset in messages, e.g. "audio_folder /data/clips".
      log: where skips are printed (stderr); None prints nothing.
    """

    def __init__(self, policy: str, what: str, log: TextIO | None = sys.stderr):
        self.policy = check_policy(policy)
        self.what = what
        self.log = log
        self.skipped: collections.Counter = collections.Counter()
        self.notes: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = {}

    def bad(self, reason: str, location: str, detail: str, *, always_skip: bool = False) -> None:
        """Reports bad input at `location` (a path, or path:line). Raises under 'error' unless always_skip."""
        message = f"{location}: {detail} [{reason}]"
        if self.policy == "error" and not always_skip:
            raise BadInputError(f"{self.what}: {message} (bad_input='error'; set bad_input='skip' to count and "
                                f"skip such inputs)")
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES_PER_REASON:
            self.examples[reason].append(message)
        if self.log is not None and self.skipped[reason] <= _PRINTED_PER_REASON:
            print(f"{self.what}: skipping {message}", file=self.log)

    def note(self, kind: str, count: int = 1) -> None:
        """Counts a change made to a usable input (e.g. 'downmixed')."""
        self.notes[kind] += count

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "BadInputReport") -> None:
        self.skipped.update(other.skipped)
        self.notes.update(other.notes)
        for reason, messages in other.examples.items():
            self.examples.setdefault(reason, []).extend(
                messages[:EXAMPLES_PER_REASON - len(self.examples.get(reason, []))])

    def summary(self) -> dict:
        """JSON-ready counts: {'skipped': {reason: n}, 'notes': {kind: n}, 'examples': {reason: [messages]}}."""
        return {"skipped": dict(sorted(self.skipped.items())), "notes": dict(sorted(self.notes.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def print_summary(self, file: TextIO = sys.stderr) -> None:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        notes = ", ".join(f"{k}: {v}" for k, v in sorted(self.notes.items())) or "none"
        print(f"{self.what}: skipped {self.num_skipped} inputs ({skipped}); notes ({notes})", file=file)
