"""Scheduling the large model's passes across a batch: how long a row's drafts may grow, how long a row that
needs the large model waits for others to need it too, and when BiLD should not run at all.

One large pass costs about the same for one row as for many while the device is memory-bound, so a pass
that serves every row at once is cheap per token; a pass for each row that needs one is not. Rows that need
the large model therefore wait (without drafting) for the others; a pass runs when the waiting rows make up
`wait_fraction` of the live rows or one of them has waited `max_wait` small steps. How wide a pass may get
before it stops paying off depends on the device and the batch size, which `draft_limit` sets: on a CPU a
pass over 16 rows costs about its width in one-token steps, so drafts there must stay short. Where no
schedule beats the large model alone, `large_only` decodes with it (`bild-jax bench --save-schedule`
measures which holds).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from bild_jax.atomic import write_text_atomic
from bild_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
    """How one call shares the large model's passes among its rows. All of it is traced (no recompilation),
    and none of it changes a row's output, which never depends on its batch neighbours; `large_only`
    decodes with the large model alone."""

    draft_limit: int | None = None  # >= 1: drafts before a row waits for the large model, capped at max_draft
    wait_fraction: float = 1.0      # in [0, 1]: run a pass once this share of the live rows waits
    max_wait: int | None = None     # >= 0: or once a row has waited this many small steps; None: no limit
    large_only: bool = False        # decode with the large model alone

    def __post_init__(self):
        for name, low in (("draft_limit", 1), ("max_wait", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"schedule {name} must be None or an int >= {low}, got {value!r}")
        if isinstance(self.wait_fraction, bool) or not isinstance(self.wait_fraction, (int, float)) \
                or not 0.0 <= float(self.wait_fraction) <= 1.0:
            raise InputError(f"schedule wait_fraction must be in [0, 1], got {self.wait_fraction!r}")
        if not isinstance(self.large_only, bool):
            raise InputError(f"schedule large_only must be a bool, got {self.large_only!r}")

    def describe(self) -> str:
        """One line for the CLI and benchmark reports."""
        if self.large_only:
            return "large model alone (no schedule beats it at this batch size)"
        limit = "max_draft" if self.draft_limit is None else self.draft_limit
        wait = "" if self.max_wait is None else f", at most {self.max_wait} steps"
        return f"BiLD, drafts <= {limit}, pass when {self.wait_fraction:.0%} of rows wait{wait}"


@dataclasses.dataclass(frozen=True)
class ScheduleTable:
    """Schedules by batch size: a call of B rows uses the entry of the largest batch size <= B (the smallest
    entry below it). `measured_on` says where the table comes from."""

    entries: tuple[tuple[int, BatchSchedule], ...]
    measured_on: str = ""

    def __post_init__(self):
        sizes = [size for size, _ in self.entries]
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise InputError(f"a schedule table needs increasing batch sizes >= 1, got {sizes}")

    def for_batch(self, batch_size: int) -> BatchSchedule:
        chosen = self.entries[0][1]
        for size, schedule in self.entries:
            if size <= batch_size:
                chosen = schedule
        return chosen

    def to_dict(self) -> dict:
        return {"measured_on": self.measured_on,
                "entries": [{"batch_size": size, **dataclasses.asdict(s)} for size, s in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> "ScheduleTable":
        """The inverse of `to_dict`; ValueError (naming the problem) for anything else."""
        try:
            entries = tuple((int(e["batch_size"]), BatchSchedule(**{k: v for k, v in e.items() if k != "batch_size"}))
                            for e in data["entries"])
            return cls(entries=entries, measured_on=str(data.get("measured_on", "")))
        except (KeyError, TypeError, AttributeError) as error:
            raise InputError(f"not a schedule table ({type(error).__name__}: {error})") from None

    def save(self, path: str | Path) -> None:
        """Writes the table as JSON (`atomic.write_text_atomic`)."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ScheduleTable":
        """Reads a table written by `save` (`bild-jax bench --save-schedule`); ValueError for anything else."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise InputError(f"no schedule table at {path}") from None
        except (json.JSONDecodeError, ValueError) as error:
            raise InputError(f"{path} is not a schedule table written by `bild-jax bench --save-schedule` "
                             f"({error})") from None


# Measured with `bild-jax bench` on the bundled aligned pair, 2-core CPUs, native kernels (README, "Throughput by
# batch size"). A 2-core Xeon with AMX, `--batch-sizes 1,2,3,4 --num-prompts 48` and `--batch-sizes 2,3,4
# --num-prompts 64`, BiLD's candidate schedules over greedy decoding: batch 1 full synchronisation with long
# drafts, 2.08x; batch 2 drafts <= 5, 1.29x in both runs (long drafts 1.26x / 1.22x); batch 3 drafts <= 3,
# 1.10x / 1.11x (long drafts 0.93x / 0.97x: slower than greedy); batch 4 drafts <= 3, 1.03x / 1.05x and 1.04x
# in a third run, but 0.97x in a fourth (0.91x on an AMD EPYC before): within noise of the large model alone,
# which is kept from batch 4 on; at 16 and 64 every candidate lost (best 0.88x and 0.71x, 0.81x and 0.74x).
# Other backends start from full synchronisation with long drafts, what a memory-bound accelerator favours;
# measure a table there for the guarantee against large-only.
CPU_SCHEDULES = ScheduleTable(
    entries=((1, BatchSchedule()), (2, BatchSchedule(draft_limit=5)), (3, BatchSchedule(draft_limit=3)),
             (4, BatchSchedule(large_only=True))),
    measured_on="bundled aligned pair, 2-core Intel Xeon CPU (AMX), native kernels")
ACCELERATOR_SCHEDULES = ScheduleTable(entries=((1, BatchSchedule()),), measured_on="not measured: defaults")


def default_schedules(platform: str | None = None) -> ScheduleTable:
    """The built-in table for `platform` (default: JAX's default backend)."""
    return CPU_SCHEDULES if (platform or jax.default_backend()) == "cpu" else ACCELERATOR_SCHEDULES


def resolve(schedule: BatchSchedule | ScheduleTable | None, batch_size: int) -> BatchSchedule:
    """The schedule a call of `batch_size` rows runs: a BatchSchedule as given, a table's entry, or (None)
    the built-in table's entry for the default backend."""
    if isinstance(schedule, BatchSchedule):
        return schedule
    return (schedule or default_schedules()).for_batch(batch_size)


def traced_limits(schedule: BatchSchedule, max_draft: int) -> tuple[int, int]:
    """(draft_limit, max_wait) as the loop's ints: the limit capped at max_draft, no wait limit as one the
    loop never reaches."""
    limit = max_draft if schedule.draft_limit is None else min(schedule.draft_limit, max_draft)
    max_wait = max_draft + 1 if schedule.max_wait is None else min(schedule.max_wait, max_draft + 1)
    return limit, max_wait
