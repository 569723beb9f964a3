"""How the tests start processes directly (tests/helpers.py `_start_python`): forked from the warm
start (tests/warm_start.py) or, with GPT_RECIPES_COLD_START=1, as fresh interpreters, each process
must see what `python -u script args...` sees and end as such a process ends."""

import json
import subprocess
import time

import pytest

from tests.helpers import REPO, _start_python, unbuffered_env

PROBE = "tests/scripts/start_probe.py"


@pytest.fixture(params=["warm", "cold"])
def start(request, monkeypatch):
    if request.param == "cold":
        monkeypatch.setenv("GPT_RECIPES_COLD_START", "1")
    else:
        monkeypatch.delenv("GPT_RECIPES_COLD_START", raising=False)

    def run(ends: list[str], timeout: float = 60):
        envs = [unbuffered_env(RANK=str(i), PROBE_END=end) for i, end in enumerate(ends)]
        return _start_python(PROBE, ["--flag", "value"], envs, timeout)
    return run


@pytest.mark.slow
def test_each_process_sees_its_own_arguments_environment_and_seeds(start):
    status, outputs = start(["", ""])
    seen = [json.loads(out.splitlines()[0]) for out, _ in outputs]
    assert status == 0
    assert [s["rank"] for s in seen] == ["0", "1"]
    for s in seen:
        assert s["argv"] == [PROBE, "--flag", "value"] and s["name"] == "__main__"
        assert s["cwd"] == str(REPO) and s["path0"] == str(REPO / "tests" / "scripts")
        assert not s["project_imported"]  # the project's modules read each process's own environment
    assert all(a != b for a, b in zip(seen[0]["random"], seen[1]["random"]))  # Python's and numpy's seeds


@pytest.mark.slow
@pytest.mark.parametrize("end, status, said", [("exit3", 3, ""), ("raise", 1, "RuntimeError: the probe was told to fail")])
def test_a_failing_process_gives_its_status_and_ends_the_others(start, end, status, said):
    began = time.monotonic()
    got, outputs = start(["sleep", end])
    assert got == status
    assert said in outputs[1][1]
    assert time.monotonic() - began < 30  # the sleeping one was ended, not waited for


@pytest.mark.slow
def test_past_its_timeout_a_launch_is_killed_and_the_next_one_runs(start):
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        start(["sleep", "sleep"], timeout=3)
    assert time.monotonic() - began < 20
    status, outputs = start(["", ""])
    assert status == 0 and [json.loads(out)["rank"] for out, _ in outputs] == ["0", "1"]
