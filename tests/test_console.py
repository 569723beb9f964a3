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
