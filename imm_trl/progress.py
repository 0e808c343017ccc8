"""One progress line per phase of an IMM run, instead of every library's progress bars.

    display = ProgressDisplay(sys.stderr)
    handler = PhaseLogHandler(display, arm="imm")            # reads IMMCallback's phase logs
    logging.getLogger("imm_trl.callback").addHandler(handler)
    trainer.add_callback(TrainingProgress(display))          # training steps and loss
    sampler_config.show_progress = generation_progress(display)   # vLLM: completions done

prints, one line per iteration,

    [imm 1/2] sampling 512/512 6s, train 6/6 (loss 0.21) 81s, merge 0s, ..., eval 1000/1000 15s

On a terminal the line is redrawn in place as work advances; on any other stream (a log file,
a pipe, pytest's capture) each piece is appended once it is known: plain text, no carriage
returns. `quiet_libraries` turns the libraries' own bars, INFO logs and known-harmless
warnings off for the duration of a run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from transformers import TrainerCallback

# How IMMCallback.phase announces a phase: logger "imm_trl.callback", INFO, args
# (iteration, iterations, phase name).
PHASE_LOGGER = "imm_trl.callback"
PHASE_MESSAGE = "iteration %d/%d: %s"

# Warnings that say nothing about the run, by message start (matched with
# `warnings.filterwarnings`, so only these are hidden).
KNOWN_HARMLESS_WARNINGS = (
    # vLLM's triton dispatcher probes torch.distributed attributes on import.
    r"`torch\.distributed\.reduce_op` is deprecated",
    # The Trainer asks for pinned memory by default; there is no accelerator to pin for.
    r"'pin_memory' argument is set as true but no accelerator is found",
)


@dataclass
class Phase:
    """One phase of a line: its name, when it began and how far it got (`done` of `total`
    units; 0 of 0 when it reports none)."""

    name: str
    started: float
    done: int = 0
    total: int = 0
    note: str = ""
    seconds: float | None = None  # set when the phase ends

    def text(self) -> str:
        """`train 6/6 (loss 0.21) 81s` (the duration only once the phase has ended)."""
        return self.name + self.suffix()

    def suffix(self) -> str:
        """What follows the name: the count, the note, the duration (once known)."""
        parts = [f"{self.done}/{self.total}"] if self.total else []
        if self.note:
            parts.append(f"({self.note})")
        if self.seconds is not None:
            parts.append(f"{self.seconds:.0f}s")
        return "".join(" " + part for part in parts)


class ProgressDisplay:
    """Lines like `[imm 1/2] sampling 512/512 6s, train 3/6 ...` on a stream.

    Args:
        stream: Where the lines go (default `sys.stderr`).
        live: Redraw the current line in place (carriage return) as work advances; default:
            whether `stream` is a terminal. Otherwise each piece is written once, when known.
        clock: Seconds, monotonic (tests pass a fake one).
        redraw_interval: Least seconds between two live redraws of the same line.
        width: Columns of the terminal; a live line longer than that shows its end only, since
            a wrapped line cannot be redrawn in place (default: the terminal's width).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        redraw_interval: float = 0.2,
        width: int | None = None,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.clock = clock
        self.redraw_interval = redraw_interval
        self.width = width or shutil.get_terminal_size(fallback=(100, 24)).columns
        self.label: str | None = None
        self.phases: list[Phase] = []
        self._last_redraw = -float("inf")

    # -- what callers report -------------------------------------------------------------

    def phase(self, label: str, name: str) -> None:
        """Start phase `name` on the line `label` (ending the phase before it, and the line
        before it if its label differs)."""
        if label != self.label:
            self.end_line()
            self.label = label
            self._write(f"[{label}] {name}")
        else:
            self._end_phase()
            self._write(f", {name}")
        self.phases.append(Phase(name, self.clock()))
        self._redraw(force=True)

    def expect(self, units: int) -> None:
        """The running phase has `units` more units of work (completions, steps)."""
        if self.phases:
            self.phases[-1].total += units
            self._redraw()

    def advance(self, units: int = 1) -> None:
        """`units` more units of the running phase are done."""
        if self.phases:
            self.phases[-1].done += units
            self._redraw()

    def note(self, text: str) -> None:
        """A short remark shown after the running phase's count, e.g. `loss 0.21`."""
        if self.phases:
            self.phases[-1].note = text
            self._redraw()

    def end_line(self) -> None:
        """End the running phase and its line (before anything else is printed)."""
        if self.label is None:
            return
        self._end_phase()
        # The finished line is written whole (a terminal may wrap it; it is not redrawn).
        self.stream.write(("\r\033[K" + self.line() if self.live else "") + "\n")
        self.stream.flush()
        self.label, self.phases = None, []

    # -- drawing ------------------------------------------------------------------------

    def line(self) -> str:
        """The current line as a terminal shows it."""
        running = "…" if self.phases and self.phases[-1].seconds is None else ""
        return f"[{self.label}] " + ", ".join(p.text() for p in self.phases) + running

    def visible_line(self) -> str:
        """`line()` cut to the terminal's width, keeping its label and its end."""
        line = self.line()
        if len(line) < self.width:
            return line
        prefix = f"[{self.label}] …"
        return prefix + line[len(line) - (self.width - 1 - len(prefix)) :]

    def _end_phase(self) -> None:
        if self.phases and self.phases[-1].seconds is None:
            phase = self.phases[-1]
            phase.seconds = self.clock() - phase.started
            self._write(phase.suffix())

    def _write(self, text: str) -> None:
        if not self.live:
            self.stream.write(text)
            self.stream.flush()

    def _redraw(self, force: bool = False) -> None:
        now = self.clock()
        if self.live and (force or now - self._last_redraw >= self.redraw_interval):
            self.stream.write("\r\033[K" + self.visible_line())
            self.stream.flush()
            self._last_redraw = now


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def phase_label(arm: str, iteration: int, iterations: int) -> str:
    """`imm 1/2` for an iteration; the arm alone for what comes before iteration 1."""
    return f"{arm} {iteration}/{iterations}" if iteration else arm


class PhaseLogHandler(logging.Handler):
    """Turns IMMCallback's phase announcements (`PHASE_MESSAGE` on `PHASE_LOGGER`) into
    `ProgressDisplay.phase` calls on the line of `arm`; ignores every other record."""

    def __init__(self, display: ProgressDisplay, arm: str):
        super().__init__(level=logging.INFO)
        self.display = display
        self.arm = arm

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg != PHASE_MESSAGE or not isinstance(record.args, tuple):
            return
        iteration, iterations, name = record.args
        self.display.phase(phase_label(self.arm, iteration, iterations), name)


@contextmanager
def phase_logs(handler: PhaseLogHandler) -> Iterator[None]:
    """Route IMMCallback's phase logs to `handler` while the block runs (the logger's level
    is lowered to INFO for it and restored after)."""
    logger = logging.getLogger(PHASE_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class TrainingProgress(TrainerCallback):
    """Counts optimizer steps of each `Trainer.train()` call (`done/max_steps`) and shows the
    latest logged training loss on the display's running phase."""

    def __init__(self, display: ProgressDisplay):
        self.display = display

    def on_train_begin(self, args, state, control, **kwargs):
        self.display.expect(state.max_steps - state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.display.advance(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.display.note(f"loss {float(logs['loss']):.3g}")


def generation_progress(display: ProgressDisplay) -> Callable[..., object]:
    """A tqdm factory for vLLM's `use_tqdm` (the vLLM sampler's `show_progress`): counts the
    finished completions of each `generate` call on the display's running phase, draws no bar."""
    from tqdm.auto import tqdm

    class CompletionCounter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=_NullStream(), mininterval=3600)
            super().__init__(*args, **kwargs)
            # vLLM also wraps its prompt rendering in a bar, over prompts not completions.
            self.counts = kwargs.get("desc") == "Processed prompts"
            if self.counts and self.total:
                display.expect(int(self.total))

        def update(self, n=1):
            if self.counts:
                display.advance(int(n))
            return super().update(n)

    return CompletionCounter


class _NullStream:
    """A text stream that discards what is written (where the counters' bars go)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """While the block runs: no progress bars from datasets and transformers, only errors from
    the transformers, datasets and vLLM loggers, and `KNOWN_HARMLESS_WARNINGS` hidden. vLLM
    reads `VLLM_LOGGING_LEVEL` when first imported, so it is set here too (and left set)."""
    import datasets
    import transformers

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    datasets_bars = datasets.is_progress_bar_enabled()
    transformers_level = transformers.logging.get_verbosity()
    transformers_bars = transformers.utils.logging.is_progress_bar_enabled()
    loggers = {name: logging.getLogger(name) for name in ("datasets", "vllm", "bitsandbytes")}
    levels = {name: logger.level for name, logger in loggers.items()}
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for logger in loggers.values():
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message in KNOWN_HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        transformers.logging.set_verbosity(transformers_level)
        if transformers_bars:
            transformers.utils.logging.enable_progress_bar()
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
