"""Several processes through torchrun or accelerate, and the guards against their silent failure modes.

`tunelab train --nproc N` re-launches itself under `torch.distributed.run` (DDP), or, when the
experiment names an accelerate config file (`distributed.accelerate_config`: FSDP, DeepSpeed ZeRO),
under `accelerate launch --config_file` with that file. Three traps train without an error:
processes that each train alone on all the data; data that is sharded while gradients are never
averaged (ranks drift apart); and an FSDP or DeepSpeed config that accelerate quietly replaces with
plain data parallelism (it does so on CPU, or when the process was not started by `accelerate
launch`). The first and third are caught before training by comparing what the Trainer runs with
what was asked for; the second after training by comparing every rank's trained weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ConfigError, TunelabError

# accelerate's DistributedType values that shard weights, gradients or optimizer state across processes
SHARDED = ("FSDP", "DEEPSPEED")
LAUNCHED = "TUNELAB_LAUNCHED"  # set in the processes tunelab starts, so they do not launch again


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def under_launcher() -> bool:
    """Whether this process was started by tunelab, torchrun or accelerate launch (and must not launch again)."""
    return LAUNCHED in os.environ or "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class Engine:
    """What an accelerate config file asks for, as far as tunelab must know."""

    config_file: Path
    distributed_type: str  # accelerate's DistributedType value: MULTI_GPU, FSDP, DEEPSPEED, ...
    num_processes: int
    checkpoints_activations: bool = False  # FSDP's own activation checkpointing (fsdp_activation_checkpointing)
    sharded_parts: tuple[str, ...] = ()  # which of weights, gradients, optimizer are split over the processes

    @property
    def sharded(self) -> bool:
        return self.distributed_type in SHARDED

    def provenance(self) -> dict:
        digest = hashlib.sha256(self.config_file.read_bytes()).hexdigest()[:16]
        return {"accelerate_config": str(self.config_file), "accelerate_config_hash": digest}


def read_engine(config_file: str | None) -> Engine | None:
    """Read `distributed.accelerate_config` with accelerate's own loader, which rejects unknown keys."""
    if config_file is None:
        return None
    from accelerate.commands.config.config_args import load_config_from_file

    key = "distributed.accelerate_config"
    if not Path(config_file).is_file():
        raise ConfigError(f"{key}: '{config_file}' not found; write one with `accelerate config --config_file FILE`")
    try:
        config = load_config_from_file(config_file)
    except Exception as e:  # accelerate raises ValueError, TypeError, KeyError or a YAML error
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}: '{config_file}' is not a valid accelerate config: {reason}") from e
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    fsdp_checkpointing = bool((config.fsdp_config or {}).get("fsdp_activation_checkpointing"))
    return Engine(Path(config_file), kind, int(config.num_processes or 1), fsdp_checkpointing, _sharded_parts(config))


def _sharded_parts(config) -> tuple[str, ...]:
    """What FSDP's sharding strategy or DeepSpeed's ZeRO stage splits over the processes."""
    import json

    all_three = ("weights", "gradients", "optimizer")
    kind = getattr(config.distributed_type, "value", str(config.distributed_type))
    if kind == "FSDP":
        fsdp = config.fsdp_config or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if strategy == "NO_SHARD":
            return ()
        if strategy == "SHARD_GRAD_OP" or str(fsdp.get("fsdp_reshard_after_forward", True)).lower() == "false":
            return all_three[1:]
        return all_three
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config or {}
        stage = ds.get("zero_stage")
        if ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            stage = json.loads(file.read_text()).get("zero_optimization", {}).get("stage") if file.is_file() else None
        return {1: all_three[2:], 2: all_three[1:], 3: all_three}.get(int(stage or 0), ())
    return ()


def one_process_gpus(visible: int, launched: bool) -> str | None:
    """Several GPUs seen by one process that no launcher started: the Trainer would wrap the model in nn.DataParallel,
    which TRL's trainers refuse (its replicas would run the forward of the original model). The line that says what
    to run instead; None where this process trains on one GPU or under a launcher."""
    if visible <= 1 or launched:
        return None
    return (
        f"{visible} GPUs are visible to this one process; train on all of them with `tunelab train ... --nproc "
        f"{visible}` (DDP, one process a GPU), or on one with CUDA_VISIBLE_DEVICES=0"
    )


def several_gpus(device: str, engine: Engine | None) -> str | None:
    """one_process_gpus for this process: None off CUDA and where an accelerate config launches the processes."""
    if device != "cuda" or engine is not None:
        return None
    import torch

    return one_process_gpus(torch.cuda.device_count(), under_launcher())


def check_engine_device(engine: Engine | None, device: str) -> None:
    """Refuse, before launching, a sharded engine on a device where accelerate would quietly run DDP instead."""
    if engine is not None and engine.sharded and device != "cuda":
        raise ConfigError(
            f"distributed.accelerate_config: '{engine.config_file.name}' asks for {engine.distributed_type}, which "
            f"accelerate runs on GPUs only (on {device} it would silently train unsharded); remove the "
            "distributed section for this device, or run on GPUs"
        )


def launch_command(nproc: int, argv: list[str], engine: Engine | None) -> list[str]:
    """The launcher command line that runs `tunelab <argv>` in several processes on this machine."""
    if engine is None:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        processes = [f"--num_processes={nproc}"] if nproc > 1 else []
        launcher = ["-m", "accelerate.commands.launch", f"--config_file={engine.config_file}", *processes]
    return [sys.executable, *launcher, "-m", "tunelab", *argv]


def launch(nproc: int, argv: list[str], engine: Engine | None) -> int:
    """Run `tunelab <argv>` under the launcher; returns its exit code."""
    env = {**os.environ, LAUNCHED: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(launch_command(nproc, argv, engine), env=env).returncode


def check_launch(trainer_world_size: int, engine: Engine | None, running: str) -> None:
    """Refuse a launch in which the Trainer would not run what was asked for.

    `running` is the accelerator's DistributedType value in this process.
    """
    launched = world_size()
    if launched > 1 and trainer_world_size != launched:
        raise TunelabError(
            f"launched with {launched} processes but the Trainer sees a world of {trainer_world_size}: every "
            "process would train alone on all the data. On CPU the run needs use_cpu with the gloo backend "
            "(tunelab sets it); check the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR)"
        )
    if engine is not None and engine.sharded and running != engine.distributed_type:
        raise TunelabError(
            f"distributed.accelerate_config asks for {engine.distributed_type} but accelerate runs {running}: the "
            f"model would not be sharded. Launch with `tunelab train EXPERIMENT --nproc N` or `accelerate launch "
            f"--config_file {engine.config_file} -m tunelab train EXPERIMENT`"
        )


def trained_digest(model, names: list[str]) -> str:
    import torch

    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in names:
        h.update(params[name].detach().float().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_synced(model, names: list[str], sharded: bool) -> list[str]:
    """Every rank's digest of the trained weights; raises if they differ (gradients were not averaged).

    A sharded model holds one copy of each weight, spread over the ranks, so there is nothing to compare.
    """
    import torch.distributed as dist

    if sharded:
        return []
    mine = trained_digest(model, names)
    if world_size() == 1 or not dist.is_initialized():
        return [mine]
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        raise TunelabError(
            f"the {len(digests)} processes ended with different weights ({', '.join(digests)}): "
            "gradients were not synchronised, so the run is not one training run"
        )
    return digests


def finish() -> None:
    """Leave together: a process that tears down its process group while another still talks to it
    can abort (gloo), failing a run whose work is done."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
