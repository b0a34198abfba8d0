"""Pair profiles: the BiLD settings `bild-jax tune` recommends for a small model with its large one, stored
as `bild_pair.json` next to the small model."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from bild_jax.errors import InputError

PROFILE_FILE = "bild_pair.json"
FORMAT = "bild-jax pair profile 1"


@dataclasses.dataclass(frozen=True)
class PairProfile:
    """Recommended settings for one small/large pair, with what they were measured to give and on what."""

    fallback_threshold: float   # in [0, 1]
    rollback_threshold: float   # >= 0 or inf
    max_draft: int              # >= 1
    speedup: float              # BiLD over the large model alone, wall clock, batch 1
    quality: dict[str, Any]     # ROUGE-L of BiLD and of the large model, the reference, the allowed loss, spread
    measured_on: dict[str, Any]  # large model, prompts, new tokens, device, date, bild-jax version

    def config(self, **settings):
        """A `BiLDConfig` with this profile's thresholds and max_draft, other fields from `settings`."""
        from bild_jax.bild import BiLDConfig

        return BiLDConfig(fallback_threshold=self.fallback_threshold, rollback_threshold=self.rollback_threshold,
                          max_draft=self.max_draft, **settings)

    def describe(self) -> str:
        """One line: the settings and what they gave."""
        return (f"fallback {self.fallback_threshold:g}, rollback {self.rollback_threshold:g}, max_draft "
                f"{self.max_draft}; tuned with {self.measured_on.get('large', '?')}: {self.speedup:.2f}x")


def write_profile(profile: PairProfile, path: str | Path) -> Path:
    """Writes `profile` as JSON to `path` (a file, or a directory that gets `bild_pair.json`); returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, **dataclasses.asdict(profile)}, indent=1))
    return path


def read_profile(path: str | Path) -> PairProfile:
    """The profile at `path` (a `bild_pair.json` file, or a directory holding one). A missing or broken file
    raises one error line naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no pair profile at {path}")
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not a valid pair profile: not JSON ({error})") from None
    problem = _problem(fields)
    if problem:
        raise InputError(f"{path} is not a valid pair profile: {problem}")
    fields.pop("format")
    profile = PairProfile(**fields)
    try:
        profile.config()
    except ValueError as error:
        raise InputError(f"{path} is not a valid pair profile: {error}") from None
    return profile


def _problem(fields) -> str | None:
    if not isinstance(fields, dict):
        return "expected a JSON object"
    if fields.get("format") != FORMAT:
        return f"format is {fields.get('format')!r}, expected {FORMAT!r}"
    names = {f.name for f in dataclasses.fields(PairProfile)}
    missing, unknown = sorted(names - set(fields)), sorted(set(fields) - names - {"format"})
    if missing or unknown:
        return "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                       unknown and f"unknown {', '.join(unknown)}"]))
    for name in ("fallback_threshold", "rollback_threshold", "speedup"):
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return f"{name} must be a number, got {value!r}"
    if isinstance(fields["max_draft"], bool) or not isinstance(fields["max_draft"], int):
        return f"max_draft must be an int, got {fields['max_draft']!r}"
    for name in ("quality", "measured_on"):
        if not isinstance(fields[name], dict):
            return f"{name} must be an object, got {fields[name]!r}"
    return None


def find_profile(small: str | Path) -> Path | None:
    """The `bild_pair.json` shipped with a small model (a directory, hub id or bundled:NAME), or None."""
    from bild_jax.hub import resolve_model_dir

    path = resolve_model_dir(small) / PROFILE_FILE
    return path if path.is_file() else None


def profile_of(source: str | Path) -> PairProfile:
    """The profile in the file `source`, or the one shipped with the small model `source` (a directory, hub
    id or bundled:NAME); FileNotFoundError when there is none."""
    if Path(source).expanduser().is_file():
        return read_profile(Path(source).expanduser())
    path = find_profile(source)
    if path is None:
        raise FileNotFoundError(f"{source} has no pair profile ({PROFILE_FILE}); `bild-jax tune` writes one")
    return read_profile(path)
