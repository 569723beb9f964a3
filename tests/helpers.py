"""What the tests share: the tiny models, launching the recipes as users do (real processes under
the deepspeed launcher, CPU + gloo), test DeepSpeed configs, and readers of what runs wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpt_recipes.launch import REPO, launcher_prefix, master_port, unbuffered_env
from gpt_recipes.parallel.distributed import free_port, remove_shm_buffers

# A tiny GPT-2 so multi-rank runs take seconds: real text, real tokenizer, real engine.
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 176, "max_position_embeddings": 64,
              "tie_word_embeddings": False}
# Mixtures of experts small enough for fast multi-rank runs: 4 experts, 2 per token, widths multiples of 8
# (AutoEP's grouped matmuls on CPU need them).
TINY_MIXTRAL = {"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                "max_position_embeddings": 64, "tie_word_embeddings": False}
TINY_QWEN3_MOE = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 64,
                  "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "max_position_embeddings": 64, "tie_word_embeddings": False}


def launch(script: str, args: list[str], ranks: int = 2, timeout: int = 600, check: bool = True,
           launcher: str | None = None, fault: str | None = None) -> subprocess.CompletedProcess:
    """Start RANKS ranks of `script args...` from the repository root with `deepspeed`, `torchrun`
    or `accelerate` (launch, with the DeepSpeed JSON given to accelerate), or "env": the ranks
    started directly with the variables torchrun gives them; returns the finished process.

    By default the ranks start as "env" ranks, forked from the session's warm start (about 5 s
    sooner than fresh interpreters, 7-10 s sooner than under the deepspeed launcher;
    test_distributed checks that every launcher trains identically). Tests of what a user sees
    when a run ends badly through the launcher (its exit status, its last lines) name
    launcher="deepspeed". `fault` sets GPT_RECIPES_FAULT for this run alone (see
    gpt_recipes/faults.py).
    """
    launcher = launcher or "env"
    if launcher == "env":
        with master_port() as port:
            return _run_env_ranks(script, args, ranks, port, timeout, check, fault)
    if launcher == "accelerate":  # accelerate passes the JSON to the ranks; the recipe picks it up
        cfg = args[args.index("--deepspeed_config") + 1]
        args = [a for i, a in enumerate(args) if a != "--deepspeed_config" and args[i - 1] != "--deepspeed_config"]
        extra = ["--use_deepspeed", "--deepspeed_config_file", cfg]
    else:
        extra = []
    with master_port() as port:  # its buffers are removed also after runs the tests kill on purpose
        return _run([*launcher_prefix(launcher, ranks, port), *extra, script, *args], timeout, check, fault)


def launch_two_nodes(script: str, args: list[str], tmp_path: Path, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Two 'nodes' of one rank each on this machine: one deepspeed launcher per node with
    --no_ssh --node_rank 0/1, as on a cluster without passwordless ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    with master_port() as port:
        cmds = [[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                 "--node_rank", str(node), "--master_addr",
                 "127.0.0.1", "--master_port", str(port), script, *args] for node in (0, 1)]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=unbuffered_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for cmd in cmds]
        try:
            outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
    for cmd, proc, out in zip(cmds, procs, outputs):
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}")
    return [subprocess.CompletedProcess(cmd, proc.returncode, out, "") for cmd, proc, out in zip(cmds, procs, outputs)]


def _run(cmd: list[str], timeout: int, check: bool, fault: str | None = None) -> subprocess.CompletedProcess:
    env = unbuffered_env(**({"GPT_RECIPES_FAULT": fault} if fault else {}))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return _finished(proc, start, check)


def _finished(proc: subprocess.CompletedProcess, start: float, check: bool) -> subprocess.CompletedProcess:
    """A launch's ending: logged (GPT_RECIPES_LAUNCH_LOG), and with `check`, a failure raised with its output."""
    _log_launch(proc.args, time.monotonic() - start)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def _run_env_ranks(script: str, args: list[str], ranks: int, port: int, timeout: int, check: bool,
                   fault: str | None) -> subprocess.CompletedProcess:
    """`python -u script args...` once per rank with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT set (torch's env:// initialisation, what torchrun's static rendezvous
    exports). As torchrun does, a rank that fails ends the others; the ranks' outputs come back
    concatenated in rank order, and the status is the first failing rank's."""
    env = unbuffered_env(**({"GPT_RECIPES_FAULT": fault} if fault else {}), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks))
    start = time.monotonic()
    status, outputs = _start_python(script, args, [{**env, "RANK": str(r), "LOCAL_RANK": str(r)}
                                                   for r in range(ranks)], timeout)
    proc = subprocess.CompletedProcess(["(env ranks)", sys.executable, "-u", script, *args], status,
                                       "".join(o for o, _ in outputs), "".join(e for _, e in outputs))
    return _finished(proc, start, check)


def run_python(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python script args...` from the repository root, without a launcher."""
    start = time.monotonic()
    code, [(out, err)] = _start_python(script, args, [unbuffered_env()], timeout)
    _log_launch([script, *args], time.monotonic() - start)
    return subprocess.CompletedProcess([sys.executable, script, *args], code, out, err)


_WARM: list = []  # the session's warm start (tests/warm_start.py), once made


def _start_python(script: str, args: list[str], envs: list[dict[str, str]],
                  timeout: float) -> tuple[int, list[tuple[str, str]]]:
    """`python -u script args...` from the repository root once per environment, all at once: the
    status of the first to fail (0 if none did) and each one's (stdout, stderr). Forked from the
    session's warm start (tests/warm_start.py), or with GPT_RECIPES_COLD_START=1 as fresh
    interpreters; either way a failing one ends the others."""
    import tempfile

    with tempfile.TemporaryDirectory() as logs:
        files = [(f"{logs}/{i}.out", f"{logs}/{i}.err") for i in range(len(envs))]
        if os.environ.get("GPT_RECIPES_COLD_START", "") in ("", "0"):
            if not _WARM:
                from tests.warm_start import WarmStart

                _WARM.append(WarmStart(unbuffered_env(), str(REPO)))
            status = _WARM[0].run([{"script": script, "args": args, "env": env, "cwd": str(REPO), "out": out,
                                   "err": err} for env, (out, err) in zip(envs, files)], timeout)
        else:
            status = _run_cold([sys.executable, "-u", script, *args], envs, files, timeout)
        return status, [(Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
                        for out, err in files]


def _run_cold(cmd: list[str], envs: list[dict[str, str]], files: list[tuple[str, str]], timeout: float) -> int:
    start = time.monotonic()
    procs = []
    for env, (out, err) in zip(envs, files):
        with open(out, "w") as out_file, open(err, "w") as err_file:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_file, stderr=err_file))
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((p for p in procs if p.poll() not in (None, 0)), None)
        if time.monotonic() - start > timeout:
            _wait_or_kill(procs, 0)
            raise subprocess.TimeoutExpired(cmd, timeout)
        time.sleep(0.05)
    if failed is not None:  # the others may wait on it in a collective: end them, as torchrun does
        for p in procs:
            if p.poll() is None:
                p.terminate()
    _wait_or_kill(procs, 10)
    return failed.returncode if failed is not None else next((p.returncode for p in procs if p.returncode), 0)


def _wait_or_kill(procs: list[subprocess.Popen], grace: float) -> None:
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _ReachedRanks(Exception):
    pass


def _no_ranks_here(*args, **kwargs):
    raise _ReachedRanks("the run got past its checks to starting ranks; run it with launch() or run_python()")


def run_here(script: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python script args...` run in this process, for commands that end before any rank starts (bad
    input, checks, a tool's own work): the exit status, stdout and stderr a subprocess would give,
    without a new interpreter's seconds of imports. `env`: variables set for the command (a
    launcher's RANK and WORLD_SIZE: the command is then rank 0 of several, checking its inputs).
    Functions the command registers with atexit run when it ends, as at a process's exit. Reaching
    the start of the ranks fails the test."""
    import atexit
    import contextlib
    import gc
    import io
    import runpy
    import traceback

    import pytest

    from gpt_recipes.parallel import distributed

    start, out, err, at_exit, code = time.monotonic(), io.StringIO(), io.StringIO(), [], 0
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", [script, *args])
        patch.setattr(atexit, "register", lambda func, *a, **k: at_exit.append((func, a, k)))
        patch.setattr(distributed, "init", _no_ranks_here)
        patch.setattr(gc, "freeze", lambda: None)  # what a command does for its process's exit, not for this one
        patch.chdir(REPO)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        except _ReachedRanks:
            raise
        except Exception:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            for func, a, k in reversed(at_exit):
                func(*a, **k)
    _log_launch([f"(here) {script}", *args], time.monotonic() - start)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def _log_launch(cmd: list[str], seconds: float) -> None:
    """With GPT_RECIPES_LAUNCH_LOG set, one line per process a test starts: which test, how long, what."""
    log = os.environ.get("GPT_RECIPES_LAUNCH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"), "s": round(seconds, 1),
                                "cmd": " ".join(cmd)[:300]}) + "\n")


def demo_pairs(demo: Path, out: Path, train: int, val: int) -> Path:
    """OUT/train.jsonl and OUT/val.jsonl: the first `train` and `val` pairs of the demo preference set."""
    from gpt_recipes.data.sft_demo import build_preferences

    build_preferences(demo, out / "all")
    for split, n in (("train", train), ("val", val)):
        lines = (out / "all" / f"{split}.jsonl").read_text().splitlines()[:n]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "loss" in r], [r for r in lines if any(k.startswith("val_") for k in r)]


class Background:
    """A `deepspeed` launch left running in its own process group, as a terminal runs a command:
    signals can go to the whole group (Ctrl-C) or to the launcher alone."""

    def __init__(self, script: str, args: list[str], log: Path, ranks: int = 2, **env: str):
        self.port = free_port()
        self.log = log
        cmd = [*launcher_prefix("deepspeed", ranks, self.port), script, *args]
        with open(log, "w") as out:
            # SIGINT at its default, as under a terminal: a test suite started in the background
            # (`make test &`) hands its children SIGINT ignored, and the launcher would not stop.
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=unbuffered_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait_for_step(self, out_dir: Path, step: int, timeout: float = 300) -> None:
        """Until metrics.jsonl has a training line at `step` or later."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            path = out_dir / "metrics.jsonl"
            if path.is_file() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                      for line in path.read_text().splitlines() if line.endswith("}")):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended early ({self.proc.returncode}):\n{self.output()[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"no step {step} within {timeout} s:\n{self.output()[-3000:]}")

    def wait_all(self, pids: list[int], timeout: float = 120) -> None:
        """Until every process in `pids` has ended (the launcher's children included)."""
        import psutil

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                                  for p in pids):
            time.sleep(0.5)
        self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def shm_buffers(self) -> list[str]:
        """DeepSpeed's shared-memory buffers of this run still in /dev/shm."""
        import glob

        return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{self.port}_*")

    def tree(self) -> list[int]:
        """Every process the launch consists of: the launcher and all below it."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        remove_shm_buffers("127.0.0.1", str(self.port), marks=True)


def ds_json(tmp_path, stage: int, micro: int, accum: int = 1, fp32: bool = False, clip: bool = False,
            name: str = "") -> str:
    """A copy of ds_configs/zero<stage>.json with the batch layout (and precision) of a test.

    fp32 runs drop gradient clipping unless `clip`: same-layout comparisons (resume, launchers)
    are then bit-level, with no partition-order drift in the clipping norm."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    cfg["optimizer"]["params"]["lr"] = 3e-3  # the tiny test model learns visibly in a few steps
    if fp32:
        cfg.pop("bf16")
        if not clip:
            cfg.pop("gradient_clipping")
    path = tmp_path / f"ds_zero{stage}_{micro}x{accum}{'_fp32' if fp32 else ''}{'_clip' if clip else ''}{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def resolve_config(tmp_path, world_size: int = 2, stage: int = 2, **extra):
    """ds_configs/zero<stage>.json with `extra` keys, resolved as a run on `world_size` ranks resolves it."""
    from gpt_recipes import ds_config

    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(extra)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return ds_config.resolve(path, world_size, 10, "cpu")


def pretrain_args(cfg: str, data, model, out, steps: int, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--data", str(data), "--model", str(model), "--output_dir", str(out),
            "--max_steps", str(steps), *extra]


# Exported logits against the trained engine's on the same batch. fp32: rounding level.
# bf16: both sides run the same bf16 weights through the same kernels, so they agree up to
# bf16 rounding of the logits (|logit| < ~10, bf16 spacing there 2^-5 to 2^-4).
TOLERANCE = {"fp32": 1e-4, "bf16": 6e-2}


_HF_ONLY: list[subprocess.Popen] = []  # one process for the session, started on first use


def hf_only(folder, check_file, adapter: bool = False) -> dict:
    """What hf_only_check.py reports for an exported folder (or, with adapter, a LoRA adapter on its base),
    asked of one process of the session that imports nothing but transformers and peft."""
    if not _HF_ONLY or _HF_ONLY[0].poll() is not None:
        import atexit

        _HF_ONLY[:] = [subprocess.Popen([sys.executable, str(REPO / "tests" / "scripts" / "hf_only_check.py"), "--serve"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)]
        atexit.register(_HF_ONLY[0].kill)
    server = _HF_ONLY[0]
    server.stdin.write(json.dumps({"folder": str(folder), "check": str(check_file), "adapter": adapter}) + "\n")
    server.stdin.flush()
    answer = server.stdout.readline()
    assert answer, f"hf_only_check.py ended (status {server.poll()})"
    result = json.loads(answer)
    assert "error" not in result, result["error"]
    return result


# The cross-stage parity runs (tests/conftest.py's cross_stage): (label, ZeRO stage, ranks,
# micro-batch, accumulation steps, fused loss flag); ZeRO-3 always takes the loss from the
# logits, since it partitions the output layer. 20 steps, fp32, clipping at 1.0.
CROSS_STAGE_RUNS = [
    ("zero0 2x2", 0, 2, 2, 1, True),
    ("zero1 2x2", 1, 2, 2, 1, True),
    ("zero2 2x2", 2, 2, 2, 1, True),
    ("zero3 2x2", 3, 2, 2, 1, True),
    ("zero3 1x4", 3, 1, 4, 1, True),
    ("zero1 1x2x2 fused", 1, 1, 2, 2, True),
    ("zero2 1x2x2 logits", 2, 1, 2, 2, False),
]
PARITY_STEPS = 20


def parity_args(tmp_path, tiny_data, tiny_model, stage, micro, accum, fused, out, *extra: str) -> list[str]:
    """The flags of a parity run (fp32, clipping 1.0, PARITY_STEPS steps, a line per step)."""
    return pretrain_args(ds_json(tmp_path, stage, micro, accum, fp32=True, clip=True), tiny_data, tiny_model, out,
                         PARITY_STEPS, "--log_interval", "1", "--eval_interval", "10",
                         *([] if fused else ["--no-fused_loss"]), *extra)


def parity_run(tmp_path, tiny_data, tiny_model, stage, ranks, micro, accum, fused, label, *extra: str,
               fault: str | None = None, launcher: str | None = None) -> Path:
    """One run of the parity layout; its output goes to <label>.log beside its folder."""
    out = tmp_path / label.replace(" ", "_")
    args = parity_args(tmp_path, tiny_data, tiny_model, stage, micro, accum, fused, out, *extra)
    if ranks == 1 and fault is None and launcher is None:  # also covers a bare `python` run, without a launcher
        proc = run_python("recipes/pretrain.py", args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        proc = launch("recipes/pretrain.py", args, ranks=ranks, check=fault is None, fault=fault, launcher=launcher)
    (tmp_path / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    return out


class _Parsed(Exception):
    def __init__(self, spec: type):
        self.spec = spec


def parser_of(script: str):
    """The script's own argparse parser: the script runs until it parses its flags."""
    import runpy

    import pytest

    from gpt_recipes import args as recipe_args

    def capture(spec, argv=None, description=None):
        raise _Parsed(spec)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe_args, "parse_args", capture)
        patch.setattr(sys, "argv", [script])
        with pytest.raises(_Parsed) as parsed:
            runpy.run_path(str(REPO / script), run_name="__main__")
    return recipe_args.build_parser(parsed.value.spec)


def scripts() -> list[str]:
    """Every script users run: recipes, tools and benchmarks."""
    return sorted(str(p.relative_to(REPO)) for folder in ("recipes", "tools", "benchmarks")
                  for p in (REPO / folder).glob("*.py"))


def load_script(path: str):
    """A script of the repository (tools/X.py, benchmarks/X.py) as a module, to test its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
