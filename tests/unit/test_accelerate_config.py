"""Reading accelerate config files, and refusing launches that would not run what the file asks for."""

from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from tunelab.distributed import check_engine_device, check_launch, read_engine
from tunelab.errors import ConfigError, TunelabError

ACCELERATE = EXAMPLES / "accelerate"


def test_example_configs_read_as_their_engines() -> None:
    ddp, fsdp, zero3 = (read_engine(str(ACCELERATE / f"{n}.yaml")) for n in ("ddp", "fsdp", "zero3"))
    assert (ddp.distributed_type, ddp.num_processes, ddp.sharded) == ("MULTI_GPU", 2, False)
    assert (fsdp.distributed_type, fsdp.num_processes, fsdp.sharded) == ("FSDP", 8, True)
    assert (zero3.distributed_type, zero3.sharded) == ("DEEPSPEED", True)
    assert read_engine(None) is None


def test_missing_config_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"distributed.accelerate_config: '.*nope.yaml' not found; write one"):
        read_engine(str(tmp_path / "nope.yaml"))


def test_unknown_key_is_refused_by_accelerates_loader(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_procesess: 4\n")
    with pytest.raises(ConfigError, match=r"not a valid accelerate config: .*num_procesess"):
        read_engine(str(bad))


def test_unknown_distributed_type_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: FSPD\nnum_processes: 2\n")
    with pytest.raises(ConfigError, match=r"not a valid accelerate config: .*FSPD"):
        read_engine(str(bad))


def test_sharded_engine_is_refused_off_gpu_before_launch() -> None:
    fsdp = read_engine(str(ACCELERATE / "fsdp.yaml"))
    with pytest.raises(ConfigError, match="asks for FSDP, which accelerate runs on GPUs only"):
        check_engine_device(fsdp, "cpu")
    check_engine_device(fsdp, "cuda")
    check_engine_device(read_engine(str(ACCELERATE / "ddp.yaml")), "cpu")  # DDP runs on CPU (gloo)


def test_fsdp_quietly_replaced_by_ddp_is_caught() -> None:
    fsdp = read_engine(str(ACCELERATE / "fsdp.yaml"))
    with pytest.raises(TunelabError, match="asks for FSDP but accelerate runs MULTI_GPU"):
        check_launch(1, fsdp, "MULTI_GPU")
    check_launch(1, fsdp, "FSDP")
    check_launch(1, read_engine(str(ACCELERATE / "ddp.yaml")), "MULTI_CPU")


def _full_8b_plan(accelerate_config: Path):
    """Full fine-tuning of the config-only Llama-3.1-8B (bench/llama8b-plan.yaml) under `accelerate_config`."""
    from tests.conftest import REPO
    from tunelab.config import load_experiment
    from tunelab.plan import make_plan

    overrides = ["scope.lora=null", "scope.full=true", "train.gradient_checkpointing=on"]
    exp = load_experiment(
        REPO / "bench" / "llama8b-plan.yaml", [*overrides, f"distributed.accelerate_config={accelerate_config}"]
    )
    return make_plan(exp).memory


def test_plan_splits_what_the_sharding_strategy_splits(tmp_path: Path) -> None:
    params = 8_030_261_248  # Llama-3.1-8B in bfloat16, every weight trained
    # FSDP2 reshard_after_forward: all three over 8; accelerate upcasts trained weights to float32 master weights
    # under mixed precision, so weights and gradients take 4 bytes, AdamW's moments 8.
    full = _full_8b_plan(ACCELERATE / "fsdp.yaml")
    assert (full.processes, full.sharded, full.master) == (8, ["weights", "gradients", "optimizer"], "params")
    assert (full.weights_bytes, full.gradients_bytes, full.optimizer_bytes) == (
        params * 4 // 8,
        params * 4 // 8,
        params * 8 // 8,
    )
    zero2 = tmp_path / "zero2.yaml"
    zero2.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config: {zero_stage: 2}\n")
    # ZeRO-2 splits gradients and optimizer state, weights replicated in bfloat16; DeepSpeed's optimizer keeps the
    # float32 master copy beside the two float32 moments: 12 bytes a weight.
    mem = _full_8b_plan(zero2)
    assert mem.master == "optimizer"
    assert (mem.weights_bytes, mem.gradients_bytes, mem.optimizer_bytes) == (params * 2, params * 2 // 4, params * 3)
    ddp = _full_8b_plan(ACCELERATE / "ddp.yaml")  # tunelab's float32 master weights, as under FSDP2
    assert (ddp.processes, ddp.sharded, ddp.weights_bytes, ddp.master) == (1, [], params * 4, "params")
    assert ddp.total_bytes - full.total_bytes == (params * 16 - params * 16 // 8)


def test_train_in_process_refuses_an_experiment_meant_for_a_launcher(tmp_path: Path, monkeypatch) -> None:
    """A study (or any caller of train()) must not quietly run a DDP/FSDP experiment as one process."""
    from tunelab.config import load_experiment
    from tunelab.train import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TUNELAB_LAUNCHED", raising=False)
    exp = load_experiment(
        EXAMPLES / "quickstart.yaml", ["distributed.accelerate_config=accelerate/ddp.yaml", f"output.dir={tmp_path}"]
    )
    with pytest.raises(
        ConfigError, match="runs under `accelerate launch` with ddp.yaml; start it with `tunelab train`"
    ):
        train(exp)
    assert not (tmp_path / "quickstart").exists()


def test_several_gpus_in_one_unlaunched_process_are_refused_with_the_tunelab_way() -> None:
    """TRL's trainers refuse nn.DataParallel, which the Trainer would use; tunelab says to launch one process a GPU."""
    from tunelab.distributed import one_process_gpus

    assert one_process_gpus(8, launched=False) == (
        "8 GPUs are visible to this one process; train on all of them with `tunelab train ... --nproc 8` (DDP, one "
        "process a GPU), or on one with CUDA_VISIBLE_DEVICES=0"
    )
    assert one_process_gpus(8, launched=True) is None  # each launched process takes its own GPU
    assert one_process_gpus(1, launched=False) is None and one_process_gpus(0, launched=False) is None


@pytest.mark.parametrize(
    ("init", "refused", "planned"),
    [
        ("pissa", r"pissa's adapter is converted .* \(FSDP\); use init", "pissa init, saved as plain LoRA r 32"),
        ("eva", r"eva starts the adapter from the inputs .* whole model at hand, .* \(FSDP\); use init", "eva init"),
    ],
)
def test_an_init_that_needs_the_whole_model_is_refused_under_a_sharding_engine(
    init: str, refused: str, planned: str
) -> None:
    """A PiSSA adapter is converted for the original weights, and EVA reads each adapted layer's inputs, with the
    whole model at hand; FSDP splits it. DDP keeps a whole model in each process."""
    from tests.conftest import REPO
    from tunelab.config import load_experiment
    from tunelab.plan import make_plan

    plan = REPO / "bench" / "llama8b-plan.yaml"
    exp = load_experiment(
        plan, [f"scope.lora.init={init}", f"distributed.accelerate_config={ACCELERATE / 'fsdp.yaml'}"]
    )
    with pytest.raises(ConfigError, match=f"scope.lora.init: {refused}"):
        make_plan(exp)
    ddp = load_experiment(plan, [f"scope.lora.init={init}", f"distributed.accelerate_config={ACCELERATE / 'ddp.yaml'}"])
    assert make_plan(ddp).scope.adapter.endswith(planned)
