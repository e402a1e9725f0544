"""`tunelab compare`: shared base, mixed-adapter batches, expectations, and a safe, self-contained report."""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, EXAMPLES, fake_run, run_cli
from tunelab.compare import Check, Comparison, Prompt, Variant, check_output, compare, parse_eval_also, read_prompts
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.report import write_report
from tunelab.runs import read_manifest
from tunelab.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for example, extra in (
        ("quickstart", ["train.epochs=1"]),
        ("lora-qv", ["train.max_steps=20"]),
        ("partial-last4", ["train.max_steps=10", "train.learning_rate=1e-3"]),
    ):
        exp = load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={out}", *extra])
        made[example] = train(exp).run_dir
    return made


def prompts_file(tmp_path: Path, n: int = 6) -> Path:
    rows = [json.loads(line) for line in (DATA / "prompts.jsonl").read_text().splitlines()[:n]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_outputs_alone_equal_outputs_in_a_mixed_batch(runs, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path)
    alone = compare([runs["quickstart"]], prompts_file=prompts)
    mixed = compare([runs["quickstart"], runs["lora-qv"], runs["partial-last4"]], prompts_file=prompts)
    assert alone.outputs["quickstart"] == mixed.outputs["quickstart"]
    assert alone.outputs["base"] == mixed.outputs["base"]
    # partial tensors were swapped in and back out: the base after them is still the base
    partial_only = compare([runs["partial-last4"]], prompts_file=prompts)
    assert partial_only.outputs["base"] == alone.outputs["base"]
    assert partial_only.outputs["partial-last4"] == mixed.outputs["partial-last4"]
    assert mixed.outputs["quickstart"] != mixed.outputs["base"]
    names = [v.name for v in mixed.variants]
    assert names == ["base", "quickstart", "lora-qv", "partial-last4"]
    losses = {v.name: v.numbers["eval_loss"] for v in mixed.variants}
    assert losses["quickstart"] < losses["base"] and losses["partial-last4"] < losses["base"]


def test_single_adapter_outputs_match_plain_peft_generation(runs, tmp_path: Path, tiny_model_dir) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.compare import generate
    from tunelab.templates import tokenize_example

    prompts = read_prompts(prompts_file(tmp_path, 3))
    ours = compare([runs["quickstart"], runs["lora-qv"]], prompts_file=prompts_file(tmp_path, 3))
    tok = AutoTokenizer.from_pretrained(runs["quickstart"] / "tokenizer")
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, str(runs["lora-qv"] / "adapter")).eval()
    torch.manual_seed(0)
    one_by_one = [generate(plain, tok, [p], None, 48, 1)[0] for p in prompts]
    assert one_by_one == ours.outputs["lora-qv"]
    # Each held-out chat's loss, row by row (what the bootstrap resamples), is Transformers' own loss on its replies
    held = [json.loads(line) for line in (DATA / "sft_eval.jsonl").read_text().splitlines()]
    assert len(ours.per_row["lora-qv"]["eval_loss"]) == len(held) == ours.settings["eval_examples"]
    for row, (summed, tokens) in zip(held[:3], ours.per_row["lora-qv"]["eval_loss"], strict=False):
        t = tokenize_example(tok, row)
        labels = torch.tensor([[i if m else -100 for i, m in zip(t.input_ids, t.loss_mask, strict=True)]])
        with torch.no_grad():
            mean = plain(input_ids=torch.tensor([t.input_ids]), labels=labels).loss.item()
        assert tokens == sum(t.loss_mask[1:]) and summed / tokens == pytest.approx(mean, rel=1e-5)
    differences = ours.differences()["eval_loss"]
    assert differences["reference"] == "quickstart" and differences["rows"] == len(held)
    numbers = {v.name: v.numbers["eval_loss"] for v in ours.variants}
    for name in ("base", "lora-qv"):
        found = differences["against"][name]
        assert found["difference"] == pytest.approx(numbers[name] - numbers["quickstart"])
        assert found["low"] <= found["difference"] <= found["high"]


def test_runs_on_different_bases_are_refused(runs, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(runs["lora-qv"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base_model"]["fingerprint"] = "ffffffffffffffff"
    manifest["name"] = "other"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TunelabError, match="the runs do not share a base model"):
        compare([runs["quickstart"], other])
    out = run_cli("compare", str(runs["quickstart"]), str(other), "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and out.stderr.startswith("error: compare: the runs do not share a base model")


def test_expectations_are_counted() -> None:
    p = Prompt(
        0, [{"role": "user", "content": "q"}], contains=["Keltis", "capital"], not_contains=["Zorb"], regex=[r"\bis\b"]
    )
    checks = check_output(p, "The capital of Varno is keltis.")
    assert [c.passed for c in checks] == [True, True, True, True]
    checks = check_output(p, "Zorb capitals")
    assert [(c.kind, c.passed) for c in checks] == [
        ("contains", False),
        ("contains", True),
        ("not_contains", False),
        ("regex", False),
    ]


def test_bad_prompt_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "regex": "("}\n')
    with pytest.raises(TunelabError, match=r"p.jsonl:2: regex '\(' is invalid"):
        read_prompts(path)


def test_a_prompt_files_tools_are_read_as_training_data_holds_them(tmp_path: Path) -> None:
    from tests.unit.test_tool_calls import TOOLS

    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a", "tools": json.dumps(TOOLS), "capital": "Vevasmo"},
        {"prompt": "b"},
        {"prompt": "c", "tools": 3},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    first, second = read_prompts(path)
    assert (first.tools, first.fields, second.tools) == (TOOLS, {"capital": "Vevasmo"}, None)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TunelabError, match=r"p.jsonl:3: 'tools' must be a list of tool definitions"):
        read_prompts(path)


def hostile() -> Comparison:
    evil = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    p = Prompt(0, [{"role": "user", "content": evil}], contains=["<b>"])
    variants = [
        Variant("base", "base", numbers={"eval_loss": 1.0}),
        Variant(
            "run<i>", "lora", numbers={"eval_loss": 0.5}, curves={"train": [(1, 2.0), (2, 1.0)], "eval": [(2, 1.1)]}
        ),
    ]
    return Comparison(
        "m",
        {"decoding": "greedy"},
        variants,
        [p],
        {"base": [evil], "run<i>": ["ok " + evil]},
        {"base": [[Check("contains", "<b>", False)]], "run<i>": [[Check("contains", "<b>", False)]]},
    )


def test_the_best_variant_of_each_quality_is_named_and_marked(tmp_path: Path) -> None:
    """Which version should survive: the lowest held-out losses, the highest pref acc and pass rate, ties kept."""
    c = hostile()
    c.variants[0].numbers |= {"eval_general_loss": 2.0, "preference_accuracy": 0.75, "expectation_pass_rate": 0.5}
    c.variants[1].numbers |= {"eval_general_loss": 2.5, "preference_accuracy": 0.5, "expectation_pass_rate": 0.5}
    c.variants.append(Variant("other", "lora", numbers={"eval_loss": 0.5, "train_seconds": 1.0}))
    c.outputs["other"], c.checks["other"] = ["fine"], [[Check("contains", "<b>", False)]]
    assert c.best() == {
        "eval_general_loss": ["base"],
        "eval_loss": ["run<i>", "other"],
        "expectation_pass_rate": ["base", "run<i>"],
        "preference_accuracy": ["base"],
    }
    assert write_report(c, tmp_path)["json"].read_text().count('"best"') == 1
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[4].startswith("| base | 1 | **2** |") and md[5].startswith("| run&lt;i&gt; | **0.5** | 2.5 |")
    html = (tmp_path / "report.html").read_text()
    assert html.count("class='num best'") == 6


def test_markdown_keeps_hostile_text_inert(tmp_path: Path) -> None:
    comparison = hostile()
    comparison.outputs["run<i>"] = ["[click](javascript:alert(1)) **bold** `code` <script>x</script>"]
    md = write_report(comparison, tmp_path)["md"].read_text()
    assert "<script>" not in md and "<img" not in md and "<i>" not in md
    assert "](javascript:" not in md and "**bold**" not in md and "`code`" not in md
    assert "&lt;script&gt;" in md and "\\[click\\]" in md


def test_html_escapes_hostile_text(tmp_path: Path) -> None:
    html = write_report(hostile(), tmp_path)["html"].read_text()
    assert "<script>" not in html and "<img src=x" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network


def test_a_report_replaces_the_last_one_whole_and_refuses_a_file_for_its_folder(tmp_path: Path) -> None:
    first = write_report(hostile(), tmp_path / "r")
    again = write_report(hostile(), tmp_path / "r")
    assert again == first and sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "report.html", "report.json", "report.md"
    ]  # fmt: skip
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(TunelabError, match=r"--out: .*taken is a file; give a folder for the report"):
        write_report(hostile(), tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """A browser lays the page out: Chromium exits cleanly, its parsed DOM holds the hostile text as text, and its
    screenshot shows the loss chart's curves (so the embedded PNG decoded and was painted)."""
    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "headless Chromium is missing: install Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    paths = write_report(hostile(), tmp_path)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]

    def chrome(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [chromium, *flags, *args, paths["html"].as_uri()], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    dom = chrome("--dump-dom").stdout
    assert '<table id="summary">' in dom and dom.count("<tr>") >= 3
    assert "<script>" not in dom and "&lt;script&gt;" in dom  # parsed as text, not as an element
    shot = tmp_path / "page.png"
    chrome(f"--screenshot={shot}", "--window-size=1400,5000")
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    # matplotlib's first two line colours (C0 blue, C1 orange) draw the training and eval curves; the page's own
    # styles use neither, so their pixels on screen are the decoded chart
    near = [np.abs(rgb - np.array(colour)).sum(axis=-1) < 40 for colour in ((31, 119, 180), (255, 127, 14))]
    curves = int((near[0] | near[1]).sum())
    assert curves > 200, f"only {curves} curve pixels on the screenshot: the chart was not painted"


def test_compare_cli_writes_all_reports(runs, tmp_path: Path) -> None:
    out = run_cli(
        "compare",
        str(runs["quickstart"]),
        str(runs["partial-last4"]),
        "--prompts",
        str(prompts_file(tmp_path, 4)),
        "--out",
        str(tmp_path / "rep"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["base", "quickstart", "partial-last4"]
    assert all(len(o) == 4 for o in report["outputs"].values())
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# Comparison on builtin:tiny-chat")
    assert "report.html" in out.stdout
    # --against: every variant set against the one named, in the terminal and the report
    against = run_cli("compare", str(runs["quickstart"]), "--prompts", str(prompts_file(tmp_path, 4)), "--against",
                      "base", "--out", str(tmp_path / "vs"))  # fmt: skip
    assert against.returncode == 0, against.stderr[-2000:]
    assert "Against base: difference (95% interval)" in against.stdout
    differences = json.loads((tmp_path / "vs" / "report.json").read_text())["differences"]
    assert differences["eval_loss"]["reference"] == "base" and list(differences["eval_loss"]["against"]) == [
        "quickstart"
    ]
    unknown = run_cli("compare", str(runs["quickstart"]), "--against", "quickstrat", "--out", str(tmp_path / "x"))
    assert unknown.returncode == 2 and unknown.stderr == (
        "error: --against quickstrat: no variant of that name; the variants are base, quickstart\n"
    )


def test_sampling_is_recorded_and_seeded(runs, tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 4)
    a = compare([runs["quickstart"]], prompts_file=prompts, temperature=1.5, seed=3)
    b = compare([runs["quickstart"]], prompts_file=prompts, temperature=1.5, seed=3)
    greedy = compare([runs["quickstart"]], prompts_file=prompts)
    assert a.settings["decoding"] == "sampling (temperature 1.5, top_p 1.0)" and a.settings["seed"] == 3
    assert greedy.settings["decoding"] == "greedy"
    assert a.outputs == b.outputs
    assert a.outputs != greedy.outputs


def test_prompts_asked_on_the_command_line_print_each_variants_answer(runs, tmp_path: Path) -> None:
    """`--prompt` (repeatable): the same answers as the same prompts in a file, on the terminal under each prompt;
    markup in a prompt or an answer is printed as text."""
    first = json.loads((DATA / "prompts.jsonl").read_text().splitlines()[0])["prompt"]
    asked = [first, "Where is [bold]Molo[/bold]?"]
    done = run_cli(
        "compare", str(runs["quickstart"]), *[a for p in asked for a in ("--prompt", p)], "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    path = tmp_path / "asked.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in asked))
    assert report["outputs"] == compare([runs["quickstart"]], prompts_file=path).outputs
    lines = done.stdout.splitlines()
    for i, prompt in enumerate(asked):
        at = lines.index(f"> {prompt}")
        assert lines[at + 1].startswith("  base: ") and lines[at + 2].startswith("  quickstart: ")
        assert report["outputs"]["quickstart"][i].split("\n")[0][:20] in lines[at + 2]
    both = run_cli("compare", str(runs["quickstart"]), "--prompt", "hi", "--prompts", str(path))
    assert both.returncode == 2 and both.stderr == (
        "error: --prompt and --prompts: give the prompts one way, on the command line or in a file\n"
    )


def test_a_base_model_without_a_chat_template_is_prompted_with_the_raw_text(tmp_path: Path, tiny_model_dir) -> None:
    """A base model trained on plain prompt/completion text has no chat template: compare gives it each prompt as
    the text it is (with the BOS the tokenizer adds, as training had it), the same as a plain generate call."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{"prompt": "The capital of Molo is", "completion": " Vevasmo."}] * 16
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = [f"model.id={base}", f"data.train={tmp_path / 'raw.jsonl'}", "data.eval=null", "train.max_steps=2"]
    run = train(load_experiment(EXAMPLES / "quickstart.yaml", [*settings, f"output.dir={tmp_path}"])).run_dir

    asked = "The capital of Molo is"
    result = compare([run], asked=[asked], max_new_tokens=8)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    ids = tokenizer(asked, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    assert result.outputs["base"] == [
        tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    ]
    conversation = tmp_path / "turns.jsonl"
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    conversation.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(TunelabError, match=r"^compare: prompt 1 is a conversation, and the tokenizer has no chat"):
        compare([run], prompts_file=conversation)


def test_a_run_trained_on_plain_text_is_asked_in_plain_text_beside_chat_runs(tmp_path: Path, tiny_model_dir) -> None:
    """A chat model's run trained on string prompt/completion rows (no data.as_chat) learned plain text: compare asks
    it its prompts as plain text, as training rendered them, while the base and a chat run get the chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": "The capital of Molo is", "completion": " Vevasmo."}] * 16
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = [f"data.train={tmp_path / 'raw.jsonl'}", "data.eval=null", "train.max_steps=2", "output.name=plain"]
    quick = ["train.max_steps=2", "output.name=chat"]
    runs = [
        train(load_experiment(EXAMPLES / "quickstart.yaml", [*extra, f"output.dir={tmp_path}"])).run_dir
        for extra in (plain, quick)
    ]
    assert read_manifest(runs[0]).data.rendered == "text" and read_manifest(runs[1]).data.rendered == "chat"
    asked = "The capital of Molo is"
    result = compare(runs, asked=[asked], max_new_tokens=8)
    assert result.settings["asked_as_text"] == ["plain"]

    tokenizer = AutoTokenizer.from_pretrained(runs[0] / "tokenizer")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": asked}], add_generation_prompt=True, tokenize=False
    )
    ids = {"text": tokenizer(asked)["input_ids"], "chat": tokenizer(chat, add_special_tokens=False)["input_ids"]}

    def plain_generate(run: Path | None, how: str) -> str:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if run is not None:
            model = PeftModel.from_pretrained(model, str(run / "adapter"))
        prompt = torch.tensor([ids[how]])
        with torch.no_grad():
            out = model.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip()

    assert result.outputs["plain"] == [plain_generate(runs[0], "text")]
    assert result.outputs["chat"] == [plain_generate(runs[1], "chat")]
    assert result.outputs["base"] == [plain_generate(None, "chat")]
    assert plain_generate(runs[0], "text") != plain_generate(runs[0], "chat")  # the rendering is what differs


def test_adapters_saved_by_a_plain_peft_script_are_compared_beside_runs(runs, tmp_path: Path, tiny_model_dir) -> None:
    """compare_lora.py's inputs: adapter folders a plain PEFT script saved (adapter_config.json naming the base)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.compare import generate

    torch.manual_seed(0)
    settings = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    script = tmp_path / "train_lora_qv"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings).save_pretrained(script)
    copied = tmp_path / "qv_copy"  # a tunelab run's adapter, as a script would find it on disk
    shutil.copytree(runs["lora-qv"] / "adapter", copied)

    ours = compare([runs["quickstart"], runs["lora-qv"], script, copied], prompts_file=prompts_file(tmp_path, 3))
    assert ours.outputs["qv_copy"] == ours.outputs["lora-qv"]
    numbers = {v.name: v.numbers for v in ours.variants}
    assert numbers["qv_copy"]["eval_loss"] == numbers["lora-qv"]["eval_loss"]
    assert numbers["train_lora_qv"]["scope"] == "lora r4 q_proj,v_proj (made elsewhere)"
    tok = AutoTokenizer.from_pretrained(runs["quickstart"] / "tokenizer")
    tok.padding_side = "left"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(script)).eval()
    lora = sum(p.numel() for n, p in plain.named_parameters() if "lora_" in n)
    assert numbers["train_lora_qv"]["trainable_params"] == lora == 7168
    prompts = read_prompts(prompts_file(tmp_path, 3))
    assert [generate(plain, tok, [p], None, 48, 1)[0] for p in prompts] == ours.outputs["train_lora_qv"]

    with pytest.raises(TunelabError, match="adapters made elsewhere carry no data to take prompts from"):
        compare([script, copied])


def test_every_variant_is_scored_on_each_held_out_set_of_the_runs_and_the_command_line(runs, tmp_path: Path) -> None:
    """What a variant costs elsewhere, on the same rows for the base and every run: a run's data.eval_also sets and
    --eval-also files become 'eval NAME loss' columns."""
    exp = load_experiment(
        EXAMPLES / "quickstart.yaml",
        [
            f"output.dir={tmp_path}",
            "output.name=also",
            "train.max_steps=2",
            "data.eval_also={same: data/sft_eval.jsonl}",
        ],
    )
    also = train(exp).run_dir
    general = tmp_path / "general.jsonl"
    general.write_text("".join((DATA / "sft_train.jsonl").read_text().splitlines(keepends=True)[:12]))
    ours = compare([also, runs["lora-qv"]], prompts_file=prompts_file(tmp_path, 2), eval_also={"general": general})
    for v in ours.variants:  # the run's own set is the eval data: the same number; another set gives another
        assert v.numbers["eval_same_loss"] == v.numbers["eval_loss"]
        assert v.numbers["eval_general_loss"] != v.numbers["eval_loss"]
    assert ours.settings["eval_also_examples"] == {"same": 40, "general": 12}
    report = write_report(ours, tmp_path / "r")
    header = next(line for line in Path(report["md"]).read_text().splitlines() if line.startswith("| variant"))
    assert "| eval loss | eval general loss | eval same loss | ppl |" in header
    with pytest.raises(TunelabError, match="--eval-also: 'eval=x' is not NAME=FILE"):
        compare([also], eval_also=parse_eval_also(["eval=x"]))


def test_runs_are_measured_on_the_rows_held_out_and_named_where_they_trained_on_them(tmp_path: Path) -> None:
    """A seed ladder with eval_fraction: each run holds out other rows of one file. compare measures every variant on
    the first run's held-out rows (no longer on its training file's first rows), and names the run that trained on
    them, counting exactly the rows the seeded draws put on each side; runs whose data changed or is gone are named
    as not checked."""
    import random

    data = tmp_path / "chats.jsonl"
    shutil.copy(DATA / "sft_train.jsonl", data)
    lines = data.read_text().splitlines()
    held = {}
    for seed in (1, 2):
        order = list(range(len(lines)))
        random.Random(seed).shuffle(order)  # eval_fraction's draw where every row asks its own question
        held[seed] = sorted(order[: round(len(lines) * 0.1)])
        exp = load_experiment(
            EXAMPLES / "quickstart.yaml",
            [f"output.dir={tmp_path}", f"data.train={data}", "data.eval=null", "data.eval_fraction=0.1"]
            + [f"train.seed={seed}", "train.max_steps=2", f"output.name=seed{seed}"],
        )
        train(exp)
    runs = [tmp_path / "seed1", tmp_path / "seed2"]
    result = compare(runs)
    assert result.settings["eval_examples"] == len(held[1])
    assert result.settings["prompts"] == f"{data} (held out)"
    first = [json.loads(lines[i])["messages"] for i in held[1][:32]]
    assert [p.messages for p in result.prompts] == [
        m[: max(j for j, t in enumerate(m) if t["role"] == "assistant")] for m in first
    ]
    assert all(v.numbers["eval_loss"] is not None for v in result.variants)
    trained = [i for i in held[1] if i not in held[2]]  # seed 2 trained on these of seed 1's held-out rows
    assert result.settings["trained_on"] == {
        "seed2": f"{len(trained)} of the {len(held[1])} eval rows, "
        f"{len([i for i in held[1][:32] if i not in held[2]])} of the 32 prompts"
    }
    assert len(trained) > 20 and result.settings["trained_on_unchecked"] == {}
    touched = ["eval_loss", "expectation_pass_rate", "reward", "reference_f1", "exact_match"]
    assert result.settings["trained_on_numbers"] == {"seed2": touched}
    fair = [v for v in result.variants if v.name != "seed2"]  # seed2's eval loss is never marked best
    assert result.best()["eval_loss"] == [min(fair, key=lambda v: v.numbers["eval_loss"]).name]
    # each reply is scored against the held-out chat's own last reply; seed2 trained on most of those chats, so its
    # score there is neither the best nor set against the best
    assert [p.reference for p in result.prompts] == [
        m[max(j for j, t in enumerate(m) if t["role"] == "assistant")]["content"] for m in first
    ]
    assert all(v.numbers["reference_f1"] is not None for v in result.variants)
    assert "seed2" not in result.best()["reference_f1"]
    assert set(result.differences()["reference_f1"]["against"]) == {"base", "seed1"} - set(
        result.best()["reference_f1"][:1]
    )

    data.write_text("\n".join(lines[:-1]) + "\n")  # a row gone since the runs trained
    changed = compare(runs, prompts_file=prompts_file(tmp_path, 2))
    assert changed.settings["trained_on"] == {}
    assert changed.settings["trained_on_unchecked"] == {
        name: f"its data changed since it trained ({data})" for name in ("seed1", "seed2")
    }
    data.unlink()  # the run folders brought elsewhere without their data
    gone = compare(runs, prompts_file=prompts_file(tmp_path, 2), eval_file=DATA / "sft_eval.jsonl")
    assert gone.settings["trained_on_unchecked"]["seed2"].startswith("its training data cannot be read here (")
    assert gone.settings["trained_on"] == {} and gone.settings["eval_examples"] == 40


def _replies(stdout: str, turns: list[str]) -> list[str]:
    """What `tunelab chat` printed under each "> turn" line."""
    lines, replies, at = stdout.splitlines(), [], None
    for line in lines:
        if line.startswith("> ") and line[2:] in turns:
            at = len(replies)
            replies.append([])
        elif at is not None and not line.startswith("(conversation reset)"):
            replies[at].append(line)
    return ["\n".join(r).strip() for r in replies]


def _plain_chat(model, tokenizer, turns: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies to `turns` as one conversation, each reply joining it, with Transformers alone."""
    import torch

    stops = [tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id]
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_chat_goes_on_from_each_reply_as_plain_transformers_would(runs, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    turns = ["Which city is the capital of Molo?", "What do people in Selnu like to eat?"]
    run = runs["quickstart"]
    asked = [arg for turn in turns for arg in ("--prompt", turn)]
    out = run_cli("chat", str(run), *asked, "--max-new-tokens", "24")
    assert out.returncode == 0, out.stderr
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    expected = _plain_chat(tuned.eval(), tokenizer, turns, 24)
    assert _replies(out.stdout, turns) == expected
    base = run_cli("chat", str(run), "--base", "--prompt", turns[0], "--max-new-tokens", "24")
    assert base.returncode == 0, base.stderr
    plain_base = _plain_chat(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, turns[:1], 24)
    assert _replies(base.stdout, turns[:1]) == plain_base != expected[:1]


def test_chat_reads_turns_from_its_input_and_starts_over_on_reset(runs, tiny_model_dir) -> None:
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    turns = ["Which city is the capital of Molo?", "What do people in Selnu like to eat?"]
    typed = f"{turns[0]}\n\n{turns[1]}\n/reset\n{turns[1]}\n/exit\n{turns[0]}\n"
    run = runs["quickstart"]
    out = subprocess.run(
        [sys.executable, "-m", "tunelab", "chat", str(run), "--max-new-tokens", "24"],
        input=typed, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    asked = [line[2:] for line in out.stdout.splitlines() if line.startswith("> ")]
    assert asked == [turns[0], turns[1], turns[1]]  # the blank line skipped, nothing after /exit
    said = [part.split("(conversation reset)")[0].strip() for part in out.stdout.split("> ")[1:]]
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    together, alone = _plain_chat(tuned.eval(), tokenizer, turns, 24), _plain_chat(tuned, tokenizer, turns[1:], 24)
    assert said == [f"{turns[0]}\n{together[0]}", f"{turns[1]}\n{together[1]}", f"{turns[1]}\n{alone[0]}"]


def test_chat_leaves_out_the_oldest_exchanges_that_no_longer_fit_in_the_models_positions(tiny_model_dir) -> None:
    """The built-in base reads 512 positions and rambles to the end of each reply: after two replies of 200 tokens,
    the third turn is asked without the first exchange (and said so), its reply the one plain Transformers gives to
    the rest; a reply that would outgrow the positions is cut to the room left; a turn that alone outgrows them is
    one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.chat import open_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def plain(messages: list[dict], most: int) -> tuple[int, str]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        stops = [tokenizer.convert_tokens_to_ids("<|eot_id|>"), tokenizer.eos_token_id]
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=most, do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id
            )
        return ids.shape[1], tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    turns = ["Which city is the capital of Molo?", "What do people in Selnu like to eat?", "Which flag does Duve fly?"]
    said: list[str] = []
    with open_chat(str(tiny_model_dir), max_new_tokens=200) as chat:
        replies = [chat.ask(turn, say=said.append) for turn in turns]
        kept = [dict(m) for m in chat.turns]
    name = str(tiny_model_dir)
    assert said == [
        f"(the first exchange of this chat left out: with a reply of up to 200 tokens, the chat no longer fits in the "
        f"512 positions {name} reads)"
    ]
    rest = [{"role": "user", "content": turns[1]}, {"role": "assistant", "content": replies[1]}]
    asked = [*rest, {"role": "user", "content": turns[2]}]
    assert plain(asked, 200)[1] == replies[2] and kept == [*asked, {"role": "assistant", "content": replies[2]}]
    said.clear()
    with open_chat(str(tiny_model_dir), max_new_tokens=600) as chat:
        reply = chat.ask(turns[0], say=said.append)
    used, uncut = plain([{"role": "user", "content": turns[0]}], 600)
    room = 512 - used
    assert said == [f"(this reply can be at most {room} tokens: {name} reads 512 positions)"]
    assert reply == plain([{"role": "user", "content": turns[0]}], room)[1] != uncut
    with open_chat(str(tiny_model_dir), max_new_tokens=8) as chat, pytest.raises(TunelabError) as e:
        chat.ask("apples " * 600)
    assert re.fullmatch(rf"chat: this turn is \d+ tokens as the template renders it, and {re.escape(name)} reads at "
                        r"most 512; ask a shorter one", str(e.value))  # fmt: skip


def test_preference_runs_are_ranked_on_the_pairs_held_out_and_named_where_they_trained_on_them(tmp_path: Path) -> None:
    """The DPO runs of a seed ladder with eval_fraction: pref acc is measured on the first run's held-out pairs, and
    the run that trained on some of them is named, for the pairs and for the prompts taken from them."""
    import random

    n = len((DATA / "pref_train.jsonl").read_text().splitlines())
    held = {}
    for seed in (1, 2):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held[seed] = sorted(order[: round(n * 0.25)])
        exp = load_experiment(
            EXAMPLES / "dpo.yaml",
            [f"output.dir={tmp_path}", "data.eval=null", "data.eval_fraction=0.25", f"train.seed={seed}"]
            + ["train.max_steps=1", f"output.name=seed{seed}"],
        )
        train(exp)
    result = compare([tmp_path / "seed1", tmp_path / "seed2"], max_new_tokens=4)
    assert result.settings["preference_pairs"] == len(held[1])
    trained = len([i for i in held[1] if i not in held[2]])
    assert result.settings["trained_on"] == {
        "seed2": f"{trained} of the {len(held[1])} prompts, {trained} of the {len(held[1])} preference pairs"
    }
    assert all(v.numbers["preference_accuracy"] is not None for v in result.variants)
    touched = ["expectation_pass_rate", "reward", "reference_f1", "exact_match", "preference_accuracy"]
    assert result.settings["trained_on_numbers"] == {"seed2": touched}


def test_runs_repeated_with_other_seeds_are_summarised_over_them(tmp_path: Path) -> None:
    """The replicates compare found (settings) get the mean and sample standard deviation of each measured quality
    that two of them have, in report.json, the Markdown and the HTML page; a count or a time is not summarised, nor
    a number measured on rows the run trained on."""
    c = hostile()
    c.variants = [
        Variant("qv-seed_1", "lora", numbers={"eval_loss": 1.0, "preference_accuracy": 0.5, "train_seconds": 3.0}),
        Variant("qv-seed_2", "lora", numbers={"eval_loss": 2.0, "preference_accuracy": 1.0, "train_seconds": 5.0}),
        Variant("qv-seed_3", "lora", numbers={"eval_loss": 3.0, "preference_accuracy": None}),
    ]
    c.outputs = {v.name: ["ok"] for v in c.variants}
    c.checks = {v.name: [[]] for v in c.variants}
    c.settings["replicates"] = {"qv": ["qv-seed_1", "qv-seed_2", "qv-seed_3"]}
    assert c.over_seeds() == {
        "qv": {
            "runs": ["qv-seed_1", "qv-seed_2", "qv-seed_3"],
            "numbers": {
                "eval_loss": {"mean": 2.0, "sd": 1.0, "n": 3},
                "preference_accuracy": {"mean": 0.75, "sd": pytest.approx(0.353553, abs=1e-6), "n": 2},
            },
        }
    }
    written = write_report(c, tmp_path)
    assert json.loads(written["json"].read_text())["over_seeds"]["qv"]["numbers"]["eval_loss"]["sd"] == 1.0
    md = written["md"].read_text()
    assert (
        "## Over seeds\n\n| variant | runs | eval loss | pref acc |\n|---|---|---|---|\n| qv | 3 | 2 ± 1 | 0.75 ± 0.35 |"
        in md
    )
    assert (
        "<table id='over-seeds'><tr><th>variant</th><th>runs</th><th>eval loss</th>"
        in (tmp_path / "report.html").read_text()
    )
    c.settings["trained_on_numbers"] = {"qv-seed_2": ["eval_loss"]}  # its eval rows were among its training rows
    assert c.over_seeds()["qv"]["numbers"]["eval_loss"] == {"mean": 2.0, "sd": pytest.approx(2**0.5), "n": 2}
    c.settings["replicates"] = {}
    assert "Over seeds" not in write_report(c, tmp_path / "none")["md"].read_text()


def test_a_teachers_and_a_reward_models_seeds_group_the_runs_built_on_them(tmp_path: Path) -> None:
    """Students each taught by its own seed's teacher run, and GRPO runs each against its own seed's reward-model run,
    are replicates (grouped by the runs they build on, not those runs' paths); against a hub teacher or with another
    setting they are not."""
    from tunelab.compare import replicates

    def run(name: str, example: str, seed: int, **changes: object) -> Path:
        settings = load_experiment(EXAMPLES / example).model_dump(mode="json")
        settings["train"]["seed"] = seed
        for key, value in changes.items():
            section, field = key.split("__")
            settings[section][field] = value
        folder = fake_run(tmp_path, name)
        (folder / "experiment.yaml").write_text(yaml.safe_dump(settings | {"name": name}))
        return folder

    made = []
    for seed in (1, 2):
        teacher = run(f"teacher-seed_{seed}", "quickstart.yaml", seed)
        judge = run(f"judge-seed_{seed}", "reward.yaml", seed)
        made += [teacher, judge]
        made.append(run(f"student-seed_{seed}", "distill.yaml", seed, distill__teacher=str(teacher)))
        made.append(run(f"policy-seed_{seed}", "grpo-reward-model.yaml", seed, grpo__rewards=[str(judge)]))
    made.append(run("student-hub", "distill.yaml", 3, distill__teacher="org/teacher"))
    made.append(run("policy-other", "grpo-reward-model.yaml", 3, grpo__rewards=[str(judge)], grpo__generations=2))
    assert replicates([(folder, read_manifest(folder)) for folder in made]) == {
        "teacher": ["teacher-seed_1", "teacher-seed_2"],
        "judge": ["judge-seed_1", "judge-seed_2"],
        "student": ["student-seed_1", "student-seed_2"],
        "policy": ["policy-seed_1", "policy-seed_2"],
    }


def test_a_studys_seed_grid_is_compared_over_its_seeds_chain_by_chain(tmp_path: Path) -> None:
    """A study's grid of two seeds over SFT and DPO after it: compare groups each SFT seed with the other and each
    DPO run with the other, though each went on from another SFT run, and not the SFT runs with the DPO runs."""
    from tunelab.study import load_study, run_study

    study = tmp_path / "seeds.yaml"
    study.write_text(
        f"name: seeds\nbase: {EXAMPLES / 'quickstart.yaml'}\ngrid: {{train.seed: [1, 2]}}\noutput: {tmp_path / 'runs'}\n"
        "variants:\n"
        "  sft: {set: {train.max_steps: 1}}\n"
        f"  dpo: {{after: sft, set: {{method: dpo, data.train: {DATA / 'pref_train.jsonl'}, "
        f"data.eval: {DATA / 'pref_eval.jsonl'}, train.max_steps: 1}}}}\n"
        f"compare: {{prompts: {prompts_file(tmp_path, 2)}, base: false, max_new_tokens: 4, against: sft-seed_1}}\n"
    )
    outcomes, report = run_study(load_study(study), log=lambda *_: None)
    assert [o.status for o in outcomes] == ["trained"] * 4 and report is not None
    made = json.loads((Path(report).parent / "report.json").read_text())
    runs = {o.name: Path(o.run_dir).name for o in outcomes}
    assert made["settings"]["replicates"] == {
        "sft": [runs["sft-seed_1"], runs["sft-seed_2"]], "dpo": [runs["dpo-seed_1"], runs["dpo-seed_2"]]
    }  # fmt: skip
    assert set(made["over_seeds"]["sft"]["numbers"]) >= {"eval_loss", "preference_accuracy"}
    # compare.against names a variant; the report sets every other run against that variant's run
    assert made["settings"]["against"] == runs["sft-seed_1"]
    assert {d["reference"] for d in made["differences"].values()} == {runs["sft-seed_1"]}
    assert set(made["differences"]["eval_loss"]["against"]) == {
        runs[n] for n in ("sft-seed_2", "dpo-seed_1", "dpo-seed_2")
    }


def test_a_runs_last_checkpoint_is_compared_as_the_run_it_became(runs, tmp_path: Path) -> None:
    """A checkpoint given beside its run is a variant of its own, <run>@<step>: the checkpoint at the last step
    holds the run's result, so it answers and scores exactly as the run does (LoRA's adapter from the checkpoint
    folder, partial's opened tensors from its model.safetensors), and it is the run, not another seed of it."""
    checkpoints = {name: sorted((runs[name] / "checkpoints").glob("checkpoint-*"))[-1] for name in runs}
    given = [runs["quickstart"], checkpoints["quickstart"], runs["partial-last4"], checkpoints["partial-last4"]]
    result = compare(given, prompts_file=prompts_file(tmp_path, 4))
    steps = {name: read_manifest(runs[name]).global_steps for name in runs}
    assert {name: int(c.name.removeprefix("checkpoint-")) for name, c in checkpoints.items()} == steps
    at = {name: f"{name}@{steps[name]}" for name in runs}
    assert [v.name for v in result.variants] == [
        "base",
        "quickstart",
        at["quickstart"],
        "partial-last4",
        at["partial-last4"],
    ]
    numbers = {v.name: v.numbers for v in result.variants}
    for name in ("quickstart", "partial-last4"):
        assert result.outputs[at[name]] == result.outputs[name] != result.outputs["base"]
        assert numbers[at[name]]["eval_loss"] == numbers[name]["eval_loss"] < numbers["base"]["eval_loss"]
        assert numbers[at[name]]["trainable_params"] == numbers[name]["trainable_params"]
    shown = {v.name: v.run_dir for v in result.variants}
    assert shown[at["quickstart"]] == str(checkpoints["quickstart"])  # where it is, not where compare laid it out
    assert result.settings["replicates"] == {}
    assert not (runs["quickstart"] / "checkpoints" / "manifest.json").exists()  # nothing written in the run
    # chat talks to a partial run's checkpoint as to the run (its folder holds a config.json, but not a whole model)
    turns = ["Which city is the capital of Molo?"]
    said = [run_cli("chat", str(d), "--prompt", turns[0], "--max-new-tokens", "12") for d in given[2:]]
    assert [s.returncode for s in said] == [0, 0], said[1].stderr[-2000:]
    assert _replies(said[1].stdout, turns) == _replies(said[0].stdout, turns) != [""]


def test_an_earlier_checkpoint_answers_as_its_weights_do_with_the_runs_numbers_up_to_it(
    tmp_path: Path, tiny_model_dir
) -> None:
    """A full run's checkpoint of step 2 of 4: its replies are plain Transformers' from that checkpoint folder, its
    curves and last train loss stop at step 2, its eval loss logged there is its run eval loss; and on the command
    line, `--checkpoints` makes it one more variant of the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.compare import generate

    sets = ["scope=full", "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1"]
    run = train(
        load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={tmp_path}", *sets, "train.learning_rate=1e-3"])
    ).run_dir
    checkpoint = run / "checkpoints" / "checkpoint-2"
    prompts = prompts_file(tmp_path, 3)
    result = compare([run, checkpoint], prompts_file=prompts)
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    tok.padding_side = "left"
    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    torch.manual_seed(0)
    assert result.outputs["quickstart@2"] == generate(plain, tok, read_prompts(prompts), None, 48, 16)
    assert result.outputs["quickstart@2"] != result.outputs["quickstart"]
    at = next(v for v in result.variants if v.name == "quickstart@2")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in at.curves["train"]] == [1, 2] and [s for s, _ in at.curves["eval"]] == [0, 2]
    assert at.numbers["final_train_loss"] == next(r["loss"] for r in metrics if r.get("loss") and r["step"] == 2)
    assert at.numbers["run_eval_loss"] == next(r["eval_loss"] for r in metrics if "eval_loss" in r and r["step"] == 2)
    assert at.numbers["train_seconds"] is None  # the run's time is the whole run's
    done = run_cli("compare", str(run), "--checkpoints", "--prompts", str(prompts), "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-2000:]
    # the step that should survive exports as a run does: plain Transformers loads the checkpoint's weights
    exported = export_run(checkpoint, tmp_path / "step2")
    record = json.loads((exported / "tunelab-export.json").read_text())
    assert (record["run"], record["run_name"]) == (str(checkpoint.resolve()), "quickstart@2")
    ours = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert ours.keys() == plain.state_dict().keys() and all(
        torch.equal(ours[k], v) for k, v in plain.state_dict().items()
    )
    # what compare, chat and export laid out to read the checkpoint as a run is gone once they return
    laid_out = Path(tempfile.gettempdir()).glob("tunelab-checkpoints-*/*/quickstart@2")
    assert [p for p in laid_out if (p / "experiment.yaml").resolve() == run / "experiment.yaml"] == []
    evals = {r["step"]: r["eval_loss"] for r in metrics if "eval_loss" in r}
    shown = run_cli("show", str(run)).stdout
    assert (
        f"\ncheckpoints at steps 2 (eval loss {evals[2]:.4f}), 4 (eval loss {evals[4]:.4f}); tunelab compare {run} "
        f"{checkpoint} sets step 2 beside the result\n"
    ) in shown
    # show of the checkpoint is the run at that step: its name, steps, losses and curve up to it, no checkpoints
    step2 = run_cli("show", str(checkpoint)).stdout.splitlines()
    assert step2[0].startswith("quickstart@2  completed  sft · full") and step2[1].startswith(f"folder {checkpoint};")
    assert "2 steps" in step2 and not any(line.startswith("checkpoints at") for line in step2)
    assert any(line.startswith("train loss ") and line.endswith(" (2 logged)") for line in step2)
    assert any(line.startswith("eval loss ") and f"-> {evals[2]:.4f}" in line for line in step2)
    as_json = json.loads(run_cli("show", str(checkpoint), "--json").stdout)
    assert (as_json["name"], as_json["global_steps"], as_json["final_eval_loss"]) == ("quickstart@2", 2, evals[2])
    assert [v["name"] for v in json.loads((tmp_path / "r" / "report.json").read_text())["variants"]] == [
        "base",
        "quickstart",
        "quickstart@2",
    ]
    # weights in a sharding engine's own format (FSDP, DeepSpeed) are not a model folder: refused, naming why
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model_fsdp_0.bin")
    refused = run_cli("compare", str(checkpoint), "--prompt", "Hi")
    assert refused.returncode == 2 and "holds no config.json and model.safetensors" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_checkpoints_that_do_not_hold_the_result_are_refused_in_one_line(tmp_path: Path, tiny_model_dir) -> None:
    """A checkpoint a crash cut short, and a PiSSA run's (its adapter before PEFT converts it to LoRA on the base)."""
    sets = ["scope.lora.init=pissa_niter_4", "train.max_steps=2", "train.save_steps=1", f"output.dir={tmp_path}"]
    run = train(load_experiment(EXAMPLES / "quickstart.yaml", sets)).run_dir
    (run / "checkpoints" / "checkpoint-1" / "trainer_state.json").unlink()
    for step, said in ((1, "a crash cut this checkpoint short"), (2, "a pissa_niter_4 run's checkpoints hold")):
        done = run_cli("compare", str(run / "checkpoints" / f"checkpoint-{step}"), "--prompt", "Hi")
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
