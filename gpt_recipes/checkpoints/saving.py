"""Save and load checkpoints through the DeepSpeed engine, plus what the engine does not store.

Each checkpoint OUT/checkpoints/step<N>/ holds the engine's model and optimizer shards,
the trainer state in client_state (step, tokens seen, batch layout), one RNG-state file
per rank (the engine stores none), and the model config and tokenizer so the checkpoint
can be exported on its own. `latest` is written last, atomically, after every rank has
finished writing, so it never names an incomplete checkpoint.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt_recipes import console, faults
from gpt_recipes.checkpoints.paths import (
    BEST,
    BestMetric,
    LATEST,
    TRAINING_INFO,
    best_tag,
    checkpoints_dir,
    complete_tags,
    is_complete,
    latest_tag,
    rng_state_file,
    saved_info,
    tag_for,
    universal_tag,
    write_latest,
)
from gpt_recipes.errors import RankError, UserError, first_line
from gpt_recipes.folders import fsync_path, fsync_tree, is_disk_failure
from gpt_recipes.parallel.distributed import barrier

TRAINER_STATE_KEY = "trainer_state"


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so it loads with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist() if torch.is_tensor(mt) else mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys  # an array in files from before
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_own(path: Path) -> Any:
    """A file these recipes wrote (RNG states, export checks): tensors and plain values only.

    weights_only=True refuses pickled code, so a tampered file cannot run anything when loaded.
    DeepSpeed's own shards are loaded by DeepSpeed, which unpickles them in full: only resume
    or export checkpoints from a source you trust.
    """
    # RNG states written before they were stored as tensors hold NumPy arrays: allow exactly the
    # NumPy types that rebuild an array, which run no other code.
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} holds more than tensors and plain values, so it is not loaded "
                        f"({first_line(err)}); was it written by another program or an older version?")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def expected_bytes(ckpt_dir: Path, num_params: int) -> int:
    """Size of the next checkpoint: the last complete one's, else 16 bytes per parameter
    (fp32 master weights and two Adam moments, 12 bytes, plus the 16- or 32-bit weights)."""
    tag = latest_tag(ckpt_dir)
    if tag is not None:
        try:
            return _dir_bytes(ckpt_dir / tag)
        except FileNotFoundError:  # rank 0 set it aside meanwhile (a save of the same tag after a roll-back)
            pass
    return 16 * num_params


def check_free_space(ckpt_dir: Path, needed: int) -> None:
    probe = ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 1.1 * needed:
        raise UserError(f"not enough disk space for a checkpoint in {ckpt_dir}: about {needed / 2**30:.2f} GiB "
                        f"needed, {free / 2**30:.2f} GiB free; free some space or use another --output_dir "
                        "(the previous checkpoint is kept)")


def rotate(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints; never the one `latest` names.

    Each goes by its completion mark first (flushed), so a deletion cut short leaves an
    incomplete folder, never one that looks complete."""
    if keep_last <= 0:
        return []
    kept = {latest_tag(ckpt_dir), best_tag(ckpt_dir)}  # never the one to resume, nor the best
    doomed = [t for t in complete_tags(ckpt_dir)[:-keep_last] if t not in kept]
    for tag in doomed:
        (ckpt_dir / tag / TRAINING_INFO).unlink()
        fsync_path(ckpt_dir / tag)
        shutil.rmtree(ckpt_dir / tag)
    return doomed


def _set_aside(tag_dir: Path) -> Path:
    """Rename a complete checkpoint out of the way of a new one of the same tag (kept, not deleted)."""
    n = 1
    while (aside := tag_dir.with_name(f"{tag_dir.name}.replaced{'' if n == 1 else n}")).exists():
        n += 1
    tag_dir.rename(aside)
    return aside


def save(engine, out_dir: Path, trainer_state: dict[str, Any], rank: int, hf_files: list[Any],
         training_info: dict[str, Any], num_params: int, keep_last: int = 0, log=print,
         frozen_base: bool = False, best: BestMetric = BestMetric()) -> Path:
    """Save a checkpoint on every rank; only a complete one ever becomes `latest`.

    `hf_files` are objects with save_pretrained (model config, tokenizer); `training_info`
    (precision, ZeRO stage, world size) is written as JSON for the export tool, last, as the
    mark that every rank's shards are on disk. Everything is flushed to disk before `latest`
    moves. A save removes only an incomplete folder of its own tag (left by an interrupted
    save); a complete one of that tag (from before a roll-back) is renamed aside. With
    frozen_base (LoRA), the frozen parameters are left out: num_params counts what trains.
    `best` names the checkpoint whose trainer state holds the best value of that metric.
    """
    ckpt_dir = checkpoints_dir(out_dir)
    step = trainer_state["step"]
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    check_free_space(ckpt_dir, expected_bytes(ckpt_dir, num_params))
    if rank == 0 and tag_dir.exists():
        if is_complete(tag_dir):
            log(f"{tag_dir} holds a complete checkpoint from before this run's resume point: kept as "
                f"{_set_aside(tag_dir).name}")
        else:
            shutil.rmtree(tag_dir)  # left incomplete by an interrupted save: never mix its shards in
    barrier()
    _write_shards(engine, ckpt_dir, tag, step, rank, trainer_state, frozen_base)
    barrier()
    if rank == 0:
        _complete(ckpt_dir, tag, hf_files, {**training_info, **trainer_state})
        best_so_far = best_tag(ckpt_dir)
        if best.key in trainer_state and best.better(
                trainer_state[best.key], saved_info(ckpt_dir, best_so_far).get(best.key) if best_so_far else None):
            write_latest(ckpt_dir, tag, BEST)
        rotate(ckpt_dir, keep_last)
    barrier()
    return ckpt_dir / tag


def _write_shards(engine, ckpt_dir: Path, tag: str, step: int, rank: int, trainer_state: dict[str, Any],
                  frozen_base: bool) -> None:
    """This rank's part of the checkpoint, flushed: DeepSpeed's shards and this rank's RNG states. A
    disk that fills is one line naming the checkpoint that is kept."""
    tag_dir = ckpt_dir / tag
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={TRAINER_STATE_KEY: trainer_state},
                               save_latest=False, exclude_frozen_parameters=frozen_base)
        faults.disk_full(step, rank)
        torch.save(_rng_state(), rng_state_file(tag_dir, rank))
        faults.during_save(step, rank)
        fsync_tree(tag_dir)  # each rank flushes what it wrote (and what it sees) before the checkpoint counts
    except (OSError, RuntimeError) as err:
        if not is_disk_failure(err):
            raise
        kept = latest_tag(ckpt_dir)
        raise RankError(f"writing checkpoint {tag_dir} failed on rank {rank}: {first_line(err)} (is the disk full?); "
                        + (f"the previous checkpoint, {kept}, is intact: free some space and continue with: "
                           f"{console.resume_command()}" if kept else "no earlier checkpoint exists; free some space and "
                           "start again"))


def _complete(ckpt_dir: Path, tag: str, hf_files: list[Any], info: dict[str, Any]) -> None:
    """Rank 0, once every rank's shards are on disk: the model config, tokenizer and training.json (the
    completion mark, with each file's size), flushed, then `latest` moved to the tag."""
    tag_dir = ckpt_dir / tag
    sharded = set(tag_dir.iterdir())  # flushed already
    for obj in hf_files:
        obj.save_pretrained(tag_dir)
    # Each file's size, so a checkpoint damaged later (a truncated copy, a disk error) is named
    # before anything loads it.
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    with open(tag_dir / TRAINING_INFO, "w") as f:
        f.write(json.dumps({**info, "files": files}, indent=2) + "\n")
    for path in set(tag_dir.iterdir()) - sharded:
        fsync_tree(path) if path.is_dir() else fsync_path(path)
    fsync_path(tag_dir)
    write_latest(ckpt_dir, tag)


def convert_to_universal(ckpt_dir: Path, tag: str, rank: int, zero_stage: int) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (rank 0; others wait).

    A universal checkpoint stores every parameter and its optimizer state whole, so it loads
    on any number of ranks at any ZeRO stage (with "checkpoint": {"load_universal": true}).
    """
    target = ckpt_dir / universal_tag(tag)
    done = target / ".complete"
    if rank == 0 and not done.is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(target, ignore_errors=True)
        try:
            with console.quiet_prints():  # DeepSpeed narrates every file it converts
                ds_to_universal(Namespace(input_folder=str(ckpt_dir / tag), output_folder=str(target),
                                          num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                          strict=True, inject_missing_state=True))
            if zero_stage < 3 and (target / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
                _zero3_universal_for_lower_stages(target)
        except BaseException:  # a conversion cut short is never left behind to be mistaken for one
            shutil.rmtree(target, ignore_errors=True)
            (ckpt_dir / f"{LATEST}_universal").unlink(missing_ok=True)
            raise
        (ckpt_dir / f"{LATEST}_universal").unlink(missing_ok=True)  # DeepSpeed's own pointer, not ours
        done.write_text("")
    barrier()
    return universal_tag(tag)


def _zero3_universal_for_lower_stages(target: Path) -> None:
    """Rewrite a universal checkpoint made from ZeRO-3 into the layout DeepSpeed's ZeRO-0/1/2 loader reads.

    DeepSpeed 0.19.8 stores a ZeRO-3 source's per-parameter fp32 weights and Adam moments as
    flat tensors without a step count or a full model-states file, while the ZeRO-1/2 loader
    expects {"cat_dim", "param"} with the parameter's shape, a step.pt per parameter, the
    optimizer's global state, and mp_rank_00_model_states.pt with whole module weights.
    """
    import deepspeed

    states = torch.load(target / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    zero = target / "zero"
    module = {}
    for name, shape in shapes.items():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            flat = torch.load(zero / name / f"{key}.pt", map_location="cpu", weights_only=False)
            full = flat[: shape.numel()].view(shape).clone()
            torch.save({"cat_dim": 0, "param": full}, zero / name / f"{key}.pt")
            if key == "fp32":
                module[name] = full
        torch.save(states["global_steps"], zero / name / "step.pt")
    for alias, source in states.get("shared_params", {}).items():  # tied weights, e.g. lm_head = wte
        module[alias] = module[source]
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    torch.save({"loss_scaler": optim["loss_scaler"], "dynamic_loss_scale": optim["dynamic_loss_scale"],
                "overflow": optim["overflow"], "clip_grad": float(states["ds_config"].get("gradient_clipping", 0.0)),
                "ds_version": deepspeed.__version__, "param_groups": optim["param_groups"]}, zero / "optimizer_state.pt")
    states["module"] = module
    torch.save(states, target / "mp_rank_00_model_states.pt")


def load(engine, ckpt_dir: Path, tag: str, rank: int, frozen_base: bool = False) -> dict[str, Any]:
    """Load checkpoint `tag` into the engine, and this rank's RNG states; returns its trainer state.

    With frozen_base (LoRA) the checkpoint holds only what trains; the base is already loaded."""
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not frozen_base)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as err:
        raise UserError(f"checkpoint {ckpt_dir / tag} could not be loaded, a file of it is damaged or missing: "
                        f"{first_line(err)}")
    if path is None or not client_state or TRAINER_STATE_KEY not in client_state:
        raise UserError(f"checkpoint {ckpt_dir / tag} could not be loaded or was not written by these recipes")
    rng_file = rng_state_file(ckpt_dir / tag, rank)
    if rng_file.is_file():  # absent when resuming on another layout: each rank's stream then starts afresh
        _set_rng_state(load_own(rng_file))
    return client_state[TRAINER_STATE_KEY]


