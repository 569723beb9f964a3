import logging

import pytest

from gpt_recipes import console


def test_deepspeed_chatter_is_dropped_and_its_other_messages_kept(caplog, monkeypatch):
    monkeypatch.setattr(console, "VERBOSE", False)
    logger = logging.getLogger("DeepSpeed")
    assert any(isinstance(f, console._DropChatter) for f in logger.filters)  # installed on import
    records = [logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, None, None) for msg in (
        "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
        "Attempting to get learning rate from scheduler before it has started",
        "NaN or Inf found in input tensor.")]
    assert [logger.filter(r) for r in records] == [False, False, True]
    monkeypatch.setattr(console, "VERBOSE", True)
    assert all(logger.filter(r) for r in records)


def test_quiet_prints_hold_back_until_a_failure(capsys, monkeypatch):
    monkeypatch.setattr(console, "VERBOSE", False)
    with console.quiet_prints():
        print("DeepSpeed op built successfully")
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError), console.quiet_prints():
        print("reading rank 1's file")
        raise RuntimeError("corrupt file")
    assert capsys.readouterr().out == "reading rank 1's file\n"
    monkeypatch.setattr(console, "VERBOSE", True)
    with console.quiet_prints():
        print("shown")
    assert capsys.readouterr().out == "shown\n"


def test_library_warnings_and_bars_are_held_back_off_a_terminal(monkeypatch):
    import warnings

    monkeypatch.setattr(console, "VERBOSE", False)
    monkeypatch.setattr(console, "progress_bars", lambda: False)
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.install()
        warnings.warn("The PEFT config's `base_model_name_or_path` was renamed from 'a' to 'b'.")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something the user should see")
    assert [str(w.message) for w in caught] == ["something the user should see"]
    import os

    assert all(os.environ[n] == "1" for n in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"))


def test_long_phases_say_where_they_are_in_a_log_file(monkeypatch, capsys):
    """Off a terminal: a counted phase prints its count at most every LINE_INTERVAL seconds, and a
    phase with nothing to count says it is still running."""
    import time

    from gpt_recipes import console

    monkeypatch.setattr(console, "progress_bars", lambda: False)
    monkeypatch.setattr(console, "LINE_INTERVAL", 0.0)
    with console.Progress(10, "reference log-probabilities (train)", "pair") as bar:
        bar.update(4)
    with console.Progress(10, "quiet rank", "pair", show=False) as bar:
        bar.update(4)
    assert capsys.readouterr().out.startswith("reference log-probabilities (train): 4/10 pairs (40%, ")
    monkeypatch.setattr(console, "LINE_INTERVAL", 0.05)
    with console.heartbeat("exporting step9"):
        time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("exporting step9: still running (") for line in lines), lines
