"""Input a hostile or unlucky user gives: names that are paths, alias bombs, duplicate keys, damaged runs."""

import json
import time
from pathlib import Path

import pytest

from tests.conftest import DATA, run_cli, write_experiment
from tunelab.config import load_experiment
from tunelab.errors import ConfigError, TunelabError
from tunelab.runs import list_runs, open_run, read_manifest

EXPERIMENT = f"name: t\nmodel: {{id: builtin:tiny-chat}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n"


def exp_in(tmp_path: Path, text: str = EXPERIMENT, **kw):
    return load_experiment(write_experiment(tmp_path, text), [f"output.dir={tmp_path / 'runs'}"], **kw)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", ".hidden", "#scratch", "[/]", "x" * 101, ""])
def test_a_run_name_is_one_path_component_never_yaml(tmp_path: Path, name: str) -> None:
    with pytest.raises(TunelabError, match=r"^--name: .* is not a run name"):
        exp_in(tmp_path, run_name=name)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "[red]x"])
def test_output_name_in_the_file_is_checked_too(tmp_path: Path, name: str) -> None:
    with pytest.raises(TunelabError, match=r"exp.yaml:\d+: output.name: String should match pattern"):
        exp_in(tmp_path, EXPERIMENT + f"output: {{name: {json.dumps(name)}}}\n")


def test_name_is_taken_as_written(tmp_path: Path) -> None:
    assert exp_in(tmp_path, run_name="1e3").run_name == "1e3"  # not the float 1000.0
    assert exp_in(tmp_path, run_name="true").run_name == "true"
    assert exp_in(tmp_path, run_name="null").run_name == "null"  # not "no name"


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match=r"exp.yaml:5: key 'name' is written twice \(first on line 1\)"):
        exp_in(tmp_path, EXPERIMENT + "\nname: u\n")


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]\n"
    started = time.perf_counter()
    with pytest.raises(TunelabError) as error:
        exp_in(tmp_path, EXPERIMENT + bomb)
    assert time.perf_counter() - started < 5
    # the first list past the limit is f's, 9**6 values, on line 3 + 6 (a is on line 4)
    assert str(error.value) == (
        f"{tmp_path}/exp.yaml:9: expands to more than 100000 values (nested YAML aliases?); write the values out"
    )


def test_ordinary_anchors_still_work(tmp_path: Path) -> None:
    text = EXPERIMENT + "train: &t {seed: 7}\n"
    assert exp_in(tmp_path, text).train.seed == 7


@pytest.mark.parametrize("key", ["model.id", "data.train", "data.eval", "tokenizer.chat_template", "init_from"])
def test_a_path_longer_than_the_file_system_holds_is_named_by_its_key(tmp_path: Path, key: str) -> None:
    long = "x" * 300 + ".jsonl"
    with pytest.raises(ConfigError) as refused:
        load_experiment(write_experiment(tmp_path, EXPERIMENT), [f"{key}={long}"])
    assert (
        str(refused.value) == f"{key}: cannot look up '{long[:40]}...{long[-30:]}' (File name too long); check the path"
    )


def test_oversized_and_binary_experiment_files_are_one_line(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(EXPERIMENT + "# " + "x" * 1_100_000 + "\n")
    with pytest.raises(TunelabError, match=r"big.yaml: \d+ bytes is too large"):
        load_experiment(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(TunelabError, match=r"bin.yaml: not a UTF-8 text file"):
        load_experiment(binary)
    control = write_experiment(tmp_path, EXPERIMENT + "train: {seed: 1}\x07\n", name="bell.yaml")
    with pytest.raises(TunelabError) as error:
        load_experiment(control)
    assert str(error.value) == (
        f"{control}:4: not valid YAML (character #x0007: special characters are not allowed); remove it"
    )


def test_a_gguf_file_as_the_model_says_what_training_starts_from(tmp_path: Path) -> None:
    """llama.cpp users hold their model as a .gguf file: quantized for inference, not a checkpoint to train."""
    gguf = tmp_path / "Llama-3.1-8B-Instruct-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    exp = write_experiment(tmp_path, EXPERIMENT.replace("builtin:tiny-chat", str(gguf)))
    done = run_cli("plan", str(exp))
    assert done.returncode == 2 and done.stderr.startswith(
        f"error: {exp}: model.id: '{gguf}' is a GGUF file, llama.cpp's format for inference"
    )
    assert done.stderr.count("\n") == 1 and "safetensors" in done.stderr


def test_one_writer_per_run(tmp_path: Path, tiny_model_dir) -> None:
    exp = exp_in(tmp_path)
    first = open_run(exp, resume=False, overwrite=False)
    with pytest.raises(TunelabError, match=rf"process {__import__('os').getpid()} is training this run now"):
        open_run(exp, resume=True, overwrite=False)
    first.update(status="failed")
    first.close()
    second = open_run(exp, resume=True, overwrite=False)  # released: a resume may take it
    second.close()


def test_a_lock_held_before_its_holder_wrote_its_pid_names_another_process(tmp_path: Path) -> None:
    import fcntl
    import os

    exp = exp_in(tmp_path)
    (tmp_path / "runs").mkdir()
    fd = os.open(tmp_path / "runs" / ".t.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(TunelabError) as error:
        open_run(exp, resume=False, overwrite=False)
    os.close(fd)
    assert str(error.value) == (
        f"{tmp_path}/runs/t: another process is training this run now; wait for it, or use --name to start another run"
    )


def test_a_run_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    exp = exp_in(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "t").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TunelabError) as error:
        open_run(exp, resume=False, overwrite=False)
    assert str(error.value) == (
        f"{tmp_path}/runs/t: is a symbolic link; a run folder must be a real folder inside output.dir"
    )


def test_overwrite_replaces_only_its_own_run(tmp_path: Path, tiny_model_dir) -> None:
    exp = exp_in(tmp_path)
    run = open_run(exp, resume=False, overwrite=False)
    run.update(name="someone-else")
    run.close()
    with pytest.raises(TunelabError, match=r"holds a run named 'someone-else'; --overwrite replaces only its own"):
        open_run(exp, resume=False, overwrite=True)
    assert (tmp_path / "runs" / "t" / "manifest.json").is_file()


def test_a_symlink_in_a_run_folder_is_refused(tmp_path: Path, tiny_model_dir) -> None:
    exp = exp_in(tmp_path)
    run = open_run(exp, resume=False, overwrite=False)
    run.update(status="failed")
    run.close()
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (run.dir / "metrics.jsonl").unlink(missing_ok=True)
    (run.dir / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(TunelabError, match=r"metrics.jsonl: is a symbolic link inside the run folder"):
        open_run(exp, resume=True, overwrite=False)


def test_a_damaged_manifest_is_one_line_and_runs_lists_the_rest(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "manifest.json").write_text(json.dumps({"name": "good", "status": "completed", "created_at": "x"}))
    (bad / "manifest.json").write_text('{"name": "bad", "sta')
    with pytest.raises(TunelabError, match=r"bad/manifest.json: unreadable"):
        read_manifest(bad)
    assert {(r["name"], r["status"]) for r in list_runs(tmp_path)} == {("good", "completed"), ("bad", "unreadable")}
    r = run_cli("runs", str(tmp_path))
    assert r.returncode == 0 and "unreadable" in r.stdout and "Traceback" not in r.stderr


def test_resume_refuses_changed_data_unless_forced(tmp_path: Path, tiny_model_dir) -> None:
    from tunelab.runs import BaseModelRecord, DataRecord, Provenance

    def provenance(digest: str) -> Provenance:
        data = DataRecord(format="messages", train_examples=1, eval_examples=0, hashes={"train.jsonl": digest})
        return Provenance(base_model=BaseModelRecord(id="m", fingerprint="f"), data=data, chat_template_hash="t1")

    exp = exp_in(tmp_path)
    before = provenance("aaaa")
    run = open_run(exp, resume=False, overwrite=False, provenance=before)
    run.update(status="failed", **before.model_dump())
    run.close()
    after = provenance("bbbb")
    with pytest.raises(TunelabError, match=r"since this run started, the data changed \(train.jsonl\); .*--force"):
        open_run(exp, resume=True, overwrite=False, provenance=after)
    forced = open_run(exp, resume=True, overwrite=False, provenance=after, force=True)
    forced.close()
    assert read_manifest(forced.dir).forced_resume == ["the data changed (train.jsonl)"]


def test_the_base_fingerprint_sees_the_weights_not_just_their_shapes(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tunelab.models import fingerprint

    other = tmp_path / "merged-export"
    shutil.copytree(tiny_model_dir, other)
    shard = sorted(other.glob("*.safetensors"))[-1]  # the last shard alone
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.finfo(tensors[name].dtype).eps
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert fingerprint(str(other)) != fingerprint(str(tiny_model_dir))
    assert fingerprint(str(tiny_model_dir)) == fingerprint(str(tiny_model_dir))  # cached, and stable


def fake_checkpoint(folder: Path, step: int, state: bool = True, optimizer: bool = True) -> Path:
    ckpt = folder / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    if optimizer:
        (ckpt / "optimizer.pt").write_bytes(b"x")
        (ckpt / "scheduler.pt").write_bytes(b"x")
    if state:
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def test_resume_passes_over_a_checkpoint_a_crash_cut_short(tmp_path: Path) -> None:
    from tunelab.runs import last_checkpoint

    good = fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 6, state=False)  # killed while writing: no trainer_state.json yet
    assert last_checkpoint(tmp_path) == good
    (tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')  # cut mid-file
    assert last_checkpoint(tmp_path) == good


def test_a_checkpoint_without_optimizer_state_is_refused(tmp_path: Path) -> None:
    from tunelab.runs import last_checkpoint

    fake_checkpoint(tmp_path, 3, optimizer=False)
    with pytest.raises(TunelabError, match=r"checkpoint-3: has no optimizer or scheduler state"):
        last_checkpoint(tmp_path)


def fake_run(folder: Path, name: str, result: str = "adapter") -> Path:
    folder.mkdir(parents=True)
    manifest = {
        "name": name,
        "status": "completed",
        "scope": "lora",
        "result": result,
        "base_model": {"id": "m", "fingerprint": "f"},
        "config_hash": "c",
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    experiment = {"name": name, "model": {"id": "m"}, "data": {"train": "t.jsonl"}, "scope": {"lora": {}}}
    (folder / "experiment.yaml").write_text(json.dumps(experiment))
    return folder


def test_a_run_named_base_is_refused_beside_the_base(tmp_path: Path) -> None:
    from tunelab.compare import compare

    with pytest.raises(TunelabError, match=r"a run is named 'base'.*--no-base"):
        compare([fake_run(tmp_path / "base", "base")])


def test_export_refuses_a_damaged_adapter(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tunelab.export import export_run

    run = fake_run(tmp_path / "r", "r")
    adapter = run / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(TunelabError, match=r"the adapter is incomplete"):
        export_run(run, tmp_path / "out")
    name = "base_model.model.layers.0.q_proj.lora_A.weight"
    save_file({name: torch.zeros(4, 8), name.replace("lora_A", "lora_B"): torch.zeros(8, 4)}, str(adapter / "x"))
    whole = (adapter / "x").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(whole[: len(whole) - 40])  # cut short
    with pytest.raises(TunelabError, match=r"adapter_model.safetensors: unreadable"):
        export_run(run, tmp_path / "out")
    save_file({name: torch.zeros(4, 8)}, str(adapter / "adapter_model.safetensors"))  # lora_B lost
    with pytest.raises(TunelabError, match=r"has no .*lora_B.* the adapter is damaged"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_command_line_values_are_named_as_given(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match=r"^--set train.learning_rate: Input should be a valid number"):
        load_experiment(write_experiment(tmp_path, EXPERIMENT), ["train.learning_rate=abc"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "0"], "--temperature: 0 is greedy decoding"),
        (["--top-p", "2"], "--top-p"),
        (["--prompts", "/nonexistent/p.jsonl"], "--prompts"),
    ],
)
def test_compare_refuses_bad_options_before_any_work(tmp_path: Path, args: list[str], expected: str) -> None:
    r = run_cli("compare", str(tmp_path), *args)
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr


def test_compare_refuses_a_report_folder_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "report.txt"
    target.write_text("mine")
    r = run_cli("compare", str(tmp_path), "--out", str(target))
    assert r.returncode == 2 and "is a file; give a folder" in r.stderr and target.read_text() == "mine"
