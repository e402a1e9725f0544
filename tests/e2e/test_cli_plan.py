"""`tunelab` as a user runs it: a fresh process, exit codes, one-line errors."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, EXAMPLES, run_cli, write_experiment


def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys, tunelab.cli; sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    start = time.perf_counter()
    out = run_cli("--help", fresh=True)  # a new interpreter: its start is what is timed
    assert out.returncode == 0 and "plan" in out.stdout
    assert time.perf_counter() - start < 2.0


def test_schema_command_prints_json_schema() -> None:
    out = run_cli("schema")
    schema = json.loads(out.stdout)
    assert {"model", "data", "scope", "train", "output"} <= set(schema["properties"])


def test_plan_8b_config_only_json(tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path,
        f"""\
name: l8
model: {{id: {CONFIGS}/llama-3.1-8b-instruct, dtype: bfloat16}}
data: {{train: {DATA}/sft_train.jsonl}}
scope: {{lora: {{targets: qkvo, layers: last-half}}}}
""",
    )
    start = time.perf_counter()
    out = run_cli("plan", str(exp), "--json")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["trainable_params"] == 16 * 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert plan["total_params"] == 8_030_261_248 + plan["trainable_params"]
    assert plan["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert plan["layers"] == list(range(16, 32))
    assert plan["memory"]["weights_bytes"] == 8_030_261_248 * 2 + plan["trainable_params"] * 4
    # a guard against loading weights (minutes, or out of memory), not a timing: about 5 s on an idle machine
    assert elapsed < 120


PEAK_MEMORY_OF_PLAN = """
import resource, sys
from tunelab.cli import main
sys.argv = ["tunelab", "plan", sys.argv[1], "--json"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)  # Linux: kilobytes
"""


def test_plan_of_a_tied_head_it_opens_allocates_no_copy_of_it(tmp_path: Path) -> None:
    """Gemma 3's head is its embedding matrix (262,208 x 2560). Opening it under LoRA makes PEFT build a trainable
    copy, which it allocated at full size and initialised on the CPU before tying it: plan took 2.7 GB more and
    20 s instead of 8 for a model it only counts. The copy is shapes on the meta device, as the rest of the model."""
    exp = write_experiment(
        tmp_path,
        f"""\
name: g3
model: {{id: {CONFIGS}/gemma-3-4b-it}}
data: {{train: {DATA}/sft_train.jsonl}}
scope: {{lora: {{targets: qv, open: [lm_head]}}}}
""",
    )
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY_OF_PLAN, str(exp)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    scope = json.loads(done.stdout)["scope"]
    head = 262_208 * 2560
    assert scope["opened_params"] == head and scope["opened_modules"] == [
        "lm_head",
        "model.language_model.embed_tokens",
    ]
    assert scope["tied_embeddings"] and scope["trainable_params"] == head + 34 * 16 * ((2560 + 2048) + (2560 + 1024))
    assert int(done.stderr.strip().splitlines()[-1]) < head * 4  # the peak is below one float32 copy of the head


def test_plan_human_output_shows_scope_and_counts() -> None:
    out = run_cli("plan", str(EXAMPLES / "partial-last4.yaml"))
    assert out.returncode == 0, out.stderr
    assert "Parameters that open" in out.stdout and "lm_head.weight" in out.stdout
    assert "model.norm.weight" in out.stdout and "trainable" in out.stdout


def test_plan_names_the_part_of_each_source_it_sampled() -> None:
    out = run_cli("plan", str(EXAMPLES / "quickstart.yaml"), "--set", "data.train.rows=100")
    assert out.returncode == 0, out.stderr
    assert "(100 of 348 rows, sampled)" in " ".join(out.stdout.split())
    assert "│      100 │" in out.stdout  # the train row of the data table


def test_plan_warns_of_held_out_rows_the_run_trains_on_and_not_of_the_bundled_ones(tmp_path: Path) -> None:
    train = (DATA / "sft_train.jsonl").read_text().splitlines(keepends=True)
    held = tmp_path / "eval.jsonl"
    held.write_text("".join([*(DATA / "sft_eval.jsonl").read_text().splitlines(keepends=True)[:5], train[6]]))
    out = run_cli("plan", str(EXAMPLES / "quickstart.yaml"), "--set", f"data.eval={held}", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["warnings"] == [
        f"data.eval: 1 of 6 held-out rows are training rows too (first: {held}:6 is {DATA / 'sft_train.jsonl'}:7); "
        "what is measured on them is partly recall of the training data: remove them from one side"
    ]
    bundled = run_cli("plan", str(EXAMPLES / "quickstart.yaml"), "--json")
    assert bundled.returncode == 0 and json.loads(bundled.stdout)["warnings"] == []


def test_study_plan_prints_each_variants_warnings_once_and_rows_compare_would_measure_after_training(
    tmp_path: Path,
) -> None:
    path = tmp_path / "seeds.yaml"
    apart = "data.eval: null, data.eval_fraction: 0.1"
    path.write_text(
        f"name: seeds\nbase: {EXAMPLES / 'quickstart.yaml'}\nvariants:\n"
        f"  s1: {{set: {{train.seed: 1, {apart}, scope.lora.r: 2000}}}}\n"
        f"  s2: {{set: {{train.seed: 2, {apart}, scope.lora.r: 2000}}}}\n"
        f"  wide: {{set: {{train.seed: 1, {apart}, scope.lora.r: 3000}}}}\n"
    )
    out = run_cli("study", "plan", str(path))
    assert out.returncode == 0, out.stderr
    said = [line for line in " ".join(out.stdout.split()).split("warning") if line.startswith((" (", ": "))]
    assert [w.split(":")[0] for w in said] == [" (s1, s2)", " (wide)", ""]
    assert "scope.lora.r=2000 is above the model's hidden size (128)" in said[0]
    assert "scope.lora.r=3000 is above the model's hidden size (128)" in said[1]
    assert said[2].startswith(": compare will measure every variant's eval loss on s1's held-out rows, and s2 (")


def test_chat_refuses_what_is_neither_a_run_nor_a_model_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "runs" / "notes").mkdir(parents=True)
    shutil.copytree(EXAMPLES / "data", tmp_path / "runs" / "data")
    empty = run_cli("chat", str(tmp_path / "runs" / "notes"), "--prompt", "hi")
    assert (empty.returncode, empty.stderr.strip()) == (
        2,
        f"error: chat: {tmp_path}/runs/notes is a folder but neither a tunelab run, an adapter folder a script saved "
        "(adapter_config.json) nor a model folder (config.json); give one of those, or a model's hub id",
    )
    typo = run_cli("chat", str(tmp_path / "runs" / "qv2"), "--prompt", "hi")
    assert (typo.returncode, typo.stderr.strip()) == (2, f"error: chat: {tmp_path}/runs/qv2 does not exist")


def test_chat_names_a_system_message_the_template_refuses(tmp_path: Path, tiny_model_dir) -> None:
    model = tmp_path / "gemma-like"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text((CONFIGS.parent / "chat_models" / "gemma-2-it.jinja").read_text())
    out = run_cli("chat", str(model), "--system", "Be brief.", "--prompt", "hi", "--max-new-tokens", "4")
    assert (out.returncode, out.stderr.strip()) == (
        2,
        "error: --system: the chat template refuses a system message (System role not supported); leave it out",
    )
    assert run_cli("chat", str(model), "--prompt", "hi", "--max-new-tokens", "4").returncode == 0


@pytest.mark.parametrize(
    ("text", "extra", "expected"),
    [
        (
            "train:\n  lerning_rate: 1\n",
            [],
            "exp.yaml:5: unknown key 'train.lerning_rate'; did you mean 'learning_rate'?",
        ),
        ("", ["--set", "scope.lora.layers=[99]"], "exp.yaml: scope.lora.layers: layer 99 is out of range"),
        (  # offline (as every test is), and never downloaded
            "",
            ["--set", "model.id=org/never-downloaded"],
            "exp.yaml: model.id: 'org/never-downloaded' is not in the local cache and the hub cannot be reached; "
            "download it where there is a network (hf download org/never-downloaded --local-dir FOLDER) and point "
            "model.id at that folder",
        ),
        (  # pinned to a revision: the download the message gives fetches that revision
            "",
            ["--set", "model.id=org/never-downloaded", "--set", "model.revision=v2"],
            "exp.yaml: model.id: 'org/never-downloaded' at revision 'v2' is not in the local cache and the hub cannot "
            "be reached; download it where there is a network (hf download org/never-downloaded --revision v2 "
            "--local-dir FOLDER) and point model.id at that folder",
        ),
        (
            "",
            ["--set", f"model.id={CONFIGS}/phi-3-mini", "--set", "scope.lora.targets=qkvo"],
            "linear modules in Phi3ForCausalLM: down_proj, gate_up_proj, o_proj, qkv_proj",
        ),
        (
            "",
            ["--set", "data.train=missing.jsonl"],
            "exp.yaml: data.train: data file 'missing.jsonl' not found (a relative path is read from the experiment file's folder)",
        ),
        ("", ["--set", "data.train.rows=1000"], "exp.yaml: data.train.rows: 1000 asks for more rows than"),
        (
            "",
            ["--set", f"data.train={DATA}/pref_train.jsonl"],
            "holds preference pairs (chosen/rejected) but method is sft",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, text: str, extra: list[str], expected: str) -> None:
    exp = write_experiment(
        tmp_path,
        f"name: t\nmodel: {{id: {CONFIGS}/llama-3.1-8b-instruct}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n" + text,
    )
    out = run_cli("plan", str(exp), *extra)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert expected in lines[0]
    assert "Traceback" not in out.stderr


def test_bad_data_line_through_cli(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    exp = write_experiment(
        tmp_path, f"name: t\nmodel: {{id: {CONFIGS}/llama-3.1-8b-instruct}}\ndata: {{train: d.jsonl}}\n"
    )
    out = run_cli("plan", str(exp))
    assert out.returncode == 2 and f"{tmp_path}/d.jsonl:2: malformed JSON" in out.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    exp = write_experiment(tmp_path, "name: t\nmodel: {id: x}\n")
    out = run_cli("--debug", "plan", str(exp))
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_plan_8b_qlora_prints_the_memory_table_in_seconds(tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path,
        f"""\
name: q8b
model: {{id: {CONFIGS}/llama-3.1-8b-instruct, dtype: bfloat16, quantization: {{bits: 4}}}}
data: {{train: {DATA}/sft_train.jsonl}}
scope: {{lora: {{r: 16, alpha: 32, targets: all-linear}}}}
train: {{batch_size: 1, max_length: 32, gradient_checkpointing: "off"}}
""",
    )
    start = time.perf_counter()
    out = run_cli("plan", str(exp))
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert "weights (4-bit nf4 double-quant base)" in out.stdout and "7.4 GiB" in out.stdout
    assert "quantized 4-bit nf4 double-quant: 6,979,321,856 parameters" in out.stdout
    assert "trainable 41,943,040 of 8,072,204,288 parameters" in out.stdout  # unpacked counts
    # a config without tokenizer files: the rows are counted, their tokens are not, and no note says they were
    assert "no tokenizer beside the model config: token statistics skipped" in out.stdout
    assert "the token columns count" not in out.stdout
    assert elapsed < 120  # no weights loaded: seconds, not minutes


def test_plan_on_gpt_oss_names_the_frozen_experts_and_the_line_that_trains_them(tmp_path: Path) -> None:
    """Transformers' GptOssConfig defaults are gpt-oss-120b's published sizes; the warning's fix quotes a YAML list,
    which the terminal must print as it is."""
    from transformers import AutoConfig

    AutoConfig.for_model("gpt_oss").save_pretrained(tmp_path / "gpt-oss")
    body = f"name: oss\nmodel: {{id: {tmp_path / 'gpt-oss'}}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n"
    out = run_cli("plan", str(write_experiment(tmp_path, body)))
    assert out.returncode == 0, out.stderr
    printed = " ".join(out.stdout.split())
    assert "set scope.lora.parameters: [mlp.experts.down_proj, mlp.experts.gate_up_proj] to train them" in printed
    trained = body + "scope: {lora: {parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]}}\n"
    out = run_cli("plan", str(write_experiment(tmp_path, trained, "trained.yaml")), "--json")
    scope = json.loads(out.stdout)["scope"]
    assert scope["lora_modules"][:2] == ["model.layers.0.mlp.experts", "model.layers.0.self_attn.k_proj"]
    assert not any("frozen" in w for w in scope["warnings"])
