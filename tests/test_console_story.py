"""The main job's story (flows/console.py): one line per stage, steps only with --verbose,
and third-party progress bars silenced where the project shows its own."""

from __future__ import annotations

import io

from rich.console import Console
from tvsplit.flows.console import Story, quiet_third_party


def _story(verbose: bool) -> tuple[Story, io.StringIO]:
    story = Story(verbose=verbose)
    buffer = io.StringIO()
    story.console = Console(file=buffer, width=60)  # not a terminal: no live line
    return story, buffer


def test_a_stage_prints_one_line_and_its_steps_only_when_verbose():
    for verbose in (False, True):
        story, buffer = _story(verbose)
        with story.stage("build [one-sided]", live=True) as stage:
            for index in range(5):
                stage.step(f"model {index} [seed {index}] fine-tuned")
            stage.done("5 models in /tmp/zoo")
        lines = buffer.getvalue().splitlines()
        steps = [line for line in lines if "fine-tuned" in line]
        assert len(steps) == (5 if verbose else 0)
        assert "  model 3 [seed 3] fine-tuned" in lines or not verbose  # markup stays text
        (final,) = [line for line in lines if line.startswith("build [one-sided]:")]
        assert "5 models in /tmp/zoo (" in final and final.endswith(" s)")


def test_a_failed_stage_prints_no_end_line():
    story, buffer = _story(False)
    try:
        with story.stage("ingest") as stage:
            stage.done("never")
            raise RuntimeError("bad input")
    except RuntimeError:
        pass
    assert "never" not in buffer.getvalue()


def test_quiet_third_party_turns_off_transformers_and_hub_bars(monkeypatch):
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    tf_logging.enable_progress_bar()
    hub_utils.enable_progress_bars()
    try:
        quiet_third_party()
        assert not tf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    finally:
        tf_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()


def test_a_user_who_wants_the_bars_keeps_them(monkeypatch):
    import transformers.utils.logging as tf_logging

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    tf_logging.enable_progress_bar()
    quiet_third_party()
    assert tf_logging.is_progress_bar_enabled()
