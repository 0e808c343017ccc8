"""`imm_trl.progress`: the phase lines, from log records, trainer events and vLLM's counters."""

import io
import logging
import warnings
from types import SimpleNamespace

import pytest

from imm_trl.progress import (
    PHASE_LOGGER,
    PHASE_MESSAGE,
    PhaseLogHandler,
    ProgressDisplay,
    TrainingProgress,
    generation_progress,
    phase_label,
    phase_logs,
    quiet_libraries,
)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


def display_on(stream, live=False, width=200):
    clock = FakeClock()
    return ProgressDisplay(stream, live=live, clock=clock, redraw_interval=0.0, width=width), clock


def test_plain_stream_gets_one_line_per_label_and_no_carriage_returns():
    stream = io.StringIO()
    display, clock = display_on(stream)
    display.phase("imm 1/2", "sampling")
    display.expect(64)
    display.advance(60)
    display.advance(4)
    clock.tick(6.2)
    display.phase("imm 1/2", "train")
    display.expect(3)
    for _ in range(3):
        display.advance()
    display.note("loss 0.21")
    clock.tick(81)
    display.phase("imm 1/2", "merge")
    clock.tick(0.3)
    display.phase("imm 2/2", "sampling")
    clock.tick(5)
    display.end_line()
    display.end_line()  # a second end is a no-op
    assert stream.getvalue() == (
        "[imm 1/2] sampling 64/64 6s, train 3/3 (loss 0.21) 81s, merge 0s\n[imm 2/2] sampling 5s\n"
    )


def test_plain_stream_shows_each_phase_as_it_starts():
    stream = io.StringIO()
    display, clock = display_on(stream)
    display.phase("θ0", "engine start")
    assert stream.getvalue() == "[θ0] engine start"  # visible while the engine starts
    display.expect(10)
    display.advance(5)
    assert stream.getvalue() == "[θ0] engine start"  # counts only once the phase ends
    clock.tick(24)
    display.phase("θ0", "eval")
    assert stream.getvalue() == "[θ0] engine start 5/10 24s, eval"


def test_terminal_redraws_the_line_in_place_and_ends_it_whole():
    stream = io.StringIO()
    display, clock = display_on(stream, live=True)
    display.phase("IMM 1/2", "train")
    display.expect(2)
    display.advance()
    assert stream.getvalue().split("\r\033[K")[-1] == "[IMM 1/2] train 1/2…"
    clock.tick(3)
    display.end_line()
    assert stream.getvalue().endswith("\r\033[K[IMM 1/2] train 1/2 3s\n")
    assert stream.getvalue().count("\n") == 1


def test_terminal_line_wider_than_the_terminal_shows_its_end():
    stream = io.StringIO()
    display, _ = display_on(stream, live=True, width=30)
    display.phase("IMM 1/2", "sampling")
    display.phase("IMM 1/2", "a phase with a long name")
    shown = stream.getvalue().split("\r\033[K")[-1]
    assert len(shown) == 29 and shown.startswith("[IMM 1/2] …") and shown.endswith("long name…")


def test_redraws_are_throttled():
    stream = io.StringIO()
    clock = FakeClock()
    display = ProgressDisplay(stream, live=True, clock=clock, redraw_interval=1.0)
    display.phase("a", "sampling")
    display.expect(100)
    for _ in range(100):
        display.advance()
    assert stream.getvalue().count("\r") == 1  # only the phase start was drawn
    clock.tick(1.0)
    display.advance()
    assert stream.getvalue().count("\r") == 2


def test_non_terminal_streams_are_detected():
    assert ProgressDisplay(io.StringIO()).live is False

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert ProgressDisplay(Terminal()).live is True


def test_phase_label():
    assert phase_label("IMM", 1, 2) == "IMM 1/2"
    assert phase_label("IMM", 0, 2) == "IMM"


def test_log_handler_turns_the_callbacks_phase_logs_into_lines():
    stream = io.StringIO()
    display, clock = display_on(stream)
    logger = logging.getLogger(PHASE_LOGGER)
    level = logger.level
    with phase_logs(PhaseLogHandler(display, "self-improve")):
        logger.info(PHASE_MESSAGE, 0, 2, "engine start")
        logger.info("iteration %d: reusing the D_t saved in %s", 1, "somewhere")  # ignored
        logger.info(PHASE_MESSAGE, 1, 2, "sampling")
        clock.tick(2)
        logger.info(PHASE_MESSAGE, 1, 2, "train")
        clock.tick(3)
    logger.info(PHASE_MESSAGE, 2, 2, "sampling")  # after the block: not shown
    display.end_line()
    assert logger.level == level and not any(
        isinstance(h, PhaseLogHandler) for h in logger.handlers
    )
    assert (
        stream.getvalue()
        == "[self-improve] engine start 0s\n[self-improve 1/2] sampling 2s, train 3s\n"
    )


def test_training_progress_counts_steps_and_shows_the_loss():
    stream = io.StringIO()
    display, clock = display_on(stream)
    callback = TrainingProgress(display)
    display.phase("IMM 1/2", "train")
    state = SimpleNamespace(global_step=0, max_steps=6)
    callback.on_train_begin(None, state, None)
    for step in range(1, 7):
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 1.0 / step, "grad_norm": 0.5})
    callback.on_log(None, state, None, logs={"train_runtime": 81.0})  # no loss: kept
    clock.tick(81)
    display.end_line()
    assert stream.getvalue() == "[IMM 1/2] train 6/6 (loss 0.167) 81s\n"


def test_generation_progress_is_a_tqdm_factory_as_vllm_uses_it(capsys):
    stream = io.StringIO()
    display, clock = display_on(stream)
    factory = generation_progress(display)
    display.phase("IMM 1/2", "eval")
    for total in (24, 96):  # greedy, then 4 samples per question: two generate calls
        # vllm.entrypoints: maybe_tqdm(prompts, use_tqdm=factory, desc="Rendering prompts")
        assert list(factory(range(total // 4 if total > 24 else 24), desc="Rendering prompts"))
        # and in _run_completion:
        bar = factory(total=total, desc="Processed prompts", dynamic_ncols=True, postfix="x")
        while bar.n < total:
            assert bar.format_dict["elapsed"] >= 0
            bar.postfix = "est. speed"
            bar.update(4)
        bar.refresh()
        bar.close()
    clock.tick(15)
    display.end_line()
    assert stream.getvalue() == "[IMM 1/2] eval 120/120 15s\n"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # no bar drawn anywhere


def test_quiet_libraries_hides_bars_logs_and_known_warnings_then_restores_them():
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    with quiet_libraries():
        assert not datasets.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert transformers.logging.get_verbosity() == logging.ERROR
        assert logging.getLogger("vllm").getEffectiveLevel() == logging.ERROR
    assert datasets.is_progress_bar_enabled()
    assert transformers.utils.logging.is_progress_bar_enabled()
    assert transformers.logging.get_verbosity() == verbosity


def test_quiet_libraries_filters_only_the_named_warnings():
    with quiet_libraries(), warnings.catch_warnings(record=True) as caught:
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, then", stacklevel=1
        )
        warnings.warn("an unknown warning", stacklevel=1)
    assert [str(w.message) for w in caught] == ["an unknown warning"]


@pytest.mark.parametrize("live", [False, True])
def test_nothing_reported_before_a_phase_is_ignored(live):
    stream = io.StringIO()
    display, _ = display_on(stream, live=live)
    display.expect(3)
    display.advance()
    display.note("x")
    display.end_line()
    assert stream.getvalue() == ""
