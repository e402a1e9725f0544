"""GRPO whose replies call tools (grpo.tools), on a tiny model with Llama 3.1 Instruct's own chat template (the
mission's model family; a small tokenizer with its special tokens, tests/chat_fixtures.py): the usual agentic
recipe, SFT on chats that call the tool, then GRPO from that adapter with the tool at hand. TRL prints the tool's description
into every prompt, parses the call from the reply with Llama 3.1's response template, runs it and lets the reply
go on after the result. plan measures the prompts as TRL renders them, and what cannot work is refused in one line
before anything loads."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import statistics
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from tests.chat_fixtures import build
from tests.conftest import DATA, run_cli, write_experiment
from tunelab.compare import compare
from tunelab.config import load_experiment
from tunelab.errors import ConfigError, TunelabError
from tunelab.export import model_card
from tunelab.plan import make_plan
from tunelab.report.terminal import print_show, sparkline
from tunelab.runs import read_manifest, read_metrics
from tunelab.train import train

pytestmark = pytest.mark.slow

GRPO_ROWS = [json.loads(line) for line in (DATA / "grpo_train.jsonl").read_text().splitlines()]
CAPITALS = {r["country"]: r["capital"] for r in GRPO_ROWS}
TOOLS = f'''"""The tool the replies may call, and a record of every call (beside this file)."""

import json
from pathlib import Path

CAPITALS = {CAPITALS!r}


def capital_of(country: str) -> str:
    """The capital city of a country.

    Args:
        country: The country's name, as the question gives it.
    """
    with open(Path(__file__).with_suffix(".calls"), "a") as calls:
        calls.write(json.dumps(country) + "\\n")
    return CAPITALS.get(country, "unknown")
'''
REWARDS = '''def answers_capital(completions: list, capital: list[str], **kwargs) -> list[float]:
    """1 where the reply's last message names the capital."""
    return [1.0 if c[-1]["content"] and name in c[-1]["content"] else 0.0 for c, name in zip(completions, capital)]
'''


ENVIRONMENT = f'''"""An environment each reply acts in: its country's atlas; it rewards exactly one look-up."""

import json
from pathlib import Path

CAPITALS = {CAPITALS!r}
LOG = Path(__file__).with_suffix(".log")


class Atlas:
    def reset(self, country: str, **row) -> None:
        self.country, self.calls = country, 0
        with open(LOG, "a") as log:
            log.write(json.dumps(["reset", country]) + "\\n")

    def capital_of(self, country: str) -> str:
        """The capital city of a country.

        Args:
            country: The country's name, as the question gives it.
        """
        self.calls += 1
        return CAPITALS.get(country, "unknown")

    def get_reward(self) -> float:
        with open(LOG, "a") as log:
            log.write(json.dumps(["reward", self.country, self.calls]) + "\\n")
        return float(self.calls == 1)
'''


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    # a prompt that describes the tool takes about 700 tokens of the small tokenizer
    return build("llama-3.1-instruct", tmp_path_factory.mktemp("hub") / "llama-3.1", positions=2048)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """tools.py and rewards.py, and SFT chats in which the assistant calls the tool, reads its result and answers."""
    folder = tmp_path_factory.mktemp("agent")
    (folder / "tools.py").write_text(TOOLS)
    (folder / "rewards.py").write_text(REWARDS)
    schema = tool_schema(folder / "tools.py")
    with (folder / "sft.jsonl").open("w") as out:
        for r in GRPO_ROWS:
            call = {"type": "function", "function": {"name": "capital_of", "arguments": {"country": r["country"]}}}
            messages = [
                *r["prompt"],
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "capital_of", "content": r["capital"]},
                {"role": "assistant", "content": f"The capital of {r['country']} is {r['capital']}."},
            ]
            out.write(json.dumps({"messages": messages, "tools": [schema]}) + "\n")
    return folder


def tool_schema(file: Path) -> dict:
    """capital_of's description as transformers reads it from the function (what TRL prints into the prompt)."""
    from transformers.utils import get_json_schema

    spec = importlib.util.spec_from_file_location("tools_under_test", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return get_json_schema(module.capital_of)


def grpo_experiment(folder: Path, download: Path, out: Path, extra: str = "") -> Path:
    return write_experiment(
        folder,
        f"""name: agent
model: {{id: {download}}}
data: {{train: {DATA / "grpo_train.jsonl"}}}
method: grpo
grpo:
  rewards: [rewards.py:answers_capital]
  tools: [tools.py:capital_of]
  tool_rounds: 1
  generations: 4
  max_completion_length: 64
scope: {{lora: {{r: 16, alpha: 32, targets: all-linear}}}}
train: {{learning_rate: 1.0e-4, max_steps: 2, batch_size: 4, max_length: 1024, logging_steps: 1, seed: 0}}
output: {{dir: {out}}}
{extra}""",
        "grpo.yaml",
    )


def test_plan_measures_prompts_with_the_tools_trl_prints_into_them(folder: Path, download: Path, tmp_path) -> None:
    from transformers import AutoTokenizer

    exp = load_experiment(grpo_experiment(folder, download, tmp_path))
    plan = make_plan(exp)
    assert "replies may call capital_of (up to 1 rounds; results carry no loss)" in plan.method_line
    # each prompt measured as TRL renders it: the chat template with the tool's description
    tok = AutoTokenizer.from_pretrained(download)
    schema = tool_schema(folder / "tools.py")
    rendered = [
        len(
            tok.apply_chat_template(r["prompt"], tools=[schema], add_generation_prompt=True, tokenize=True)["input_ids"]
        )
        for r in GRPO_ROWS
    ]
    bare = [
        len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"])
        for r in GRPO_ROWS
    ]
    stats = plan.data.train
    # plan measures a prompt with the end of the reply sampling starts (<|eot_id|>, where it stops): one token more
    assert stats.tokens_max == max(rendered) + 1 and max(rendered) > max(bare) + 500


@pytest.fixture(scope="module")
def sft_calls(folder: Path, download: Path, tmp_path_factory) -> Path:
    """An SFT run that taught the model to call the tool, read its result and answer: what the GRPO runs start from."""
    out = tmp_path_factory.mktemp("sft")
    sft = write_experiment(
        folder,
        f"""name: sft-calls
model: {{id: {download}}}
data: {{train: sft.jsonl}}
scope: {{lora: {{r: 16, alpha: 32, targets: all-linear, open: [lm_head, embeddings]}}}}
train: {{learning_rate: 5.0e-3, max_steps: 100, batch_size: 8, max_length: 1024, seed: 0}}
output: {{dir: {out}}}
""",
        "sft.yaml",
    )
    assert read_manifest(train(load_experiment(sft)).run_dir).status == "completed"
    return out / "sft-calls"


def test_grpo_runs_the_tool_a_reply_calls_after_sft_taught_the_call(
    folder: Path, download: Path, sft_calls: Path, tmp_path
) -> None:
    calls = folder / "tools.calls"
    calls.unlink(missing_ok=True)
    exp = load_experiment(grpo_experiment(folder, download, tmp_path, f"init_from: {sft_calls}"))
    m = train(exp).manifest
    assert m.status == "completed" and m.global_steps == 2
    # the replies called the tool: TRL parsed the calls, ran capital_of on their arguments and logged how often
    made = [json.loads(line) for line in calls.read_text().splitlines()]
    assert made and all(isinstance(country, str) for country in made)
    logged = [r for r in read_metrics(tmp_path / "agent") if "tools/call_frequency" in r]
    assert len(logged) == 2 and sum(r["tools/call_frequency"] for r in logged) > 0
    assert all(r["tools/failure_frequency"] == 0 for r in logged)
    shown = StringIO()
    print_show(tmp_path / "agent", m, read_metrics(tmp_path / "agent"), console=Console(file=shown, width=300))
    calls = [r["tools/call_frequency"] for r in logged]
    assert f"tool calls (capital_of) {sparkline(calls)} {calls[0]:.2f} -> {calls[-1]:.2f} a reply, 0% failing" in (
        shown.getvalue()
    )
    # the tool file is part of what the run is made of: hashed, and kept as it trained
    tools = folder / "tools.py"
    assert m.tool_hashes == {f"{tools}:capital_of": hashlib.sha256(tools.read_bytes()).hexdigest()[:16]}
    assert (tmp_path / "agent" / "tools" / "tools.py").read_bytes() == tools.read_bytes()
    # the model card names the rewards and tools it trained with, and their hashes, without this machine's paths
    card = model_card(tmp_path / "agent", m, "adapter")
    digest = m.tool_hashes[f"{tools}:capital_of"]
    assert (
        f"| tools | tools.py:capital_of (`{digest}`) |" in card and "| rewards | rewards.py:answers_capital (`" in card
    )
    assert str(folder) not in card
    # compare asks every variant the prompts with the tools the run sampled with, runs the calls a reply makes and
    # lets it go on after their results, as GRPO's sampling did; the run's reward scores the whole exchange
    record = folder / "tools.calls"
    record.unlink()
    comparison = compare([tmp_path / "agent"], max_new_tokens=64)  # a call takes about 40 tokens here
    assert comparison.prompts and all(p.tools == [tool_schema(tools)] for p in comparison.prompts)
    assert comparison.settings["tools"] == (
        "agent's tools (capital_of) shown with every prompt; a reply's calls run, and it goes on after their results "
        "(up to 1 rounds)"
    )
    exchanges = [e for e in comparison.exchanges["agent"] if e is not None]
    assert exchanges, "the agent called no tool"
    called = []
    for exchange, text in zip(comparison.exchanges["agent"], comparison.outputs["agent"], strict=True):
        if exchange is None:
            continue
        call, result = exchange[0]["tool_calls"][0]["function"], exchange[1]
        called.append(call["arguments"]["country"])
        assert call["name"] == "capital_of" and result == {
            "role": "tool", "name": "capital_of", "content": CAPITALS.get(called[-1], "unknown")
        }  # fmt: skip
        assert text.startswith(f"capital_of(country={called[-1]!r})\n-> {result['content']}")
    assert [json.loads(line) for line in record.read_text().splitlines()] == called  # run once a call, in order
    capitals = [p.fields["capital"] for p in comparison.prompts]
    said = [e or [{"role": "assistant", "content": t}] for e, t in zip(
        comparison.exchanges["agent"], comparison.outputs["agent"], strict=True
    )]  # fmt: skip
    scored = [1.0 if s[-1]["content"] and c in s[-1]["content"] else 0.0 for s, c in zip(said, capitals, strict=True)]
    agent = next(v for v in comparison.variants if v.name == "agent")
    assert agent.numbers["reward"] == round(sum(scored) / len(scored), 4)


def test_each_reply_acts_in_an_environment_of_its_own(folder: Path, download: Path, sft_calls: Path, tmp_path) -> None:
    """grpo.environment (TRL's environment_factory): one instance a reply, reset with its prompt row's fields, its
    methods the tools the prompt describes (measured by plan as TRL renders them), and its get_reward a reward beside
    grpo.rewards; the class's file is hashed and kept with the run, as tool files are. compare asks every variant
    so too."""
    from transformers import AutoTokenizer

    (folder / "atlas.py").write_text(ENVIRONMENT)
    text = grpo_experiment(folder, download, tmp_path, f"init_from: {sft_calls}").read_text()
    text = text.replace("tools: [tools.py:capital_of]", "environment: atlas.py:Atlas")
    exp = load_experiment(write_experiment(folder, text, "env.yaml"))
    plan = make_plan(exp)
    assert "replies may act in Atlas (one each) (up to 1 rounds; results carry no loss)" in plan.method_line
    tok = AutoTokenizer.from_pretrained(download)
    schema = tool_schema(folder / "tools.py")  # the method's description is the function's: the same docstring
    rendered = [
        len(tok.apply_chat_template(r["prompt"], tools=[schema], add_generation_prompt=True)["input_ids"])
        for r in GRPO_ROWS
    ]
    assert plan.data.train.tokens_max == max(rendered) + 1
    m = train(exp).manifest
    assert m.status == "completed" and m.global_steps == 2
    log = [json.loads(line) for line in (folder / "atlas.log").read_text().splitlines()]
    # every reply: a fresh instance reset with its row's country, and its own reward read from that instance
    resets, scored = [e for e in log if e[0] == "reset"], [e for e in log if e[0] == "reward"]
    assert len(resets) == len(scored) == 2 * 4 and {e[1] for e in resets} <= set(CAPITALS)
    assert sorted(e[1] for e in resets) == sorted(e[1] for e in scored)
    logged = [r["rewards/Atlas/mean"] for r in read_metrics(tmp_path / "agent") if "rewards/Atlas/mean" in r]
    assert logged == [statistics.fmean(float(e[2] == 1) for e in scored[i * 4 : (i + 1) * 4]) for i in range(2)]
    atlas = folder / "atlas.py"
    assert m.tool_hashes == {f"{atlas}:Atlas": hashlib.sha256(atlas.read_bytes()).hexdigest()[:16]}
    assert (tmp_path / "agent" / "tools" / "atlas.py").read_bytes() == atlas.read_bytes()
    # compare: each variant's reply to each prompt acts in an instance of its own, reset with the prompt's row; its
    # calls run that instance's method, and the instance's get_reward adds to the run's reward, as in training
    (folder / "atlas.log").unlink()
    comparison = compare([tmp_path / "agent"], max_new_tokens=64)
    assert comparison.settings["tools"].endswith("each reply acts in an instance of Atlas of its own, reset with its "
                                                 "prompt's row")  # fmt: skip
    log = [json.loads(line) for line in (folder / "atlas.log").read_text().splitlines()]
    resets, scored = [e for e in log if e[0] == "reset"], [e for e in log if e[0] == "reward"]
    countries = [p.fields["country"] for p in comparison.prompts]
    assert [e[1] for e in resets] == countries * 2  # the agent's replies, then the base's
    assert [e[1] for e in scored] == countries * 2
    exchanges = comparison.exchanges["agent"]
    assert any(exchanges), "the agent called no tool"
    looked_up = [
        sum(m["role"] == "tool" and not m["content"].startswith("{'error'") for m in exchange or [])
        for exchange in exchanges
    ]
    assert [e[2] for e in scored[: len(countries)]] == looked_up  # each instance counted its own reply's calls
    said = [
        e or [{"role": "assistant", "content": t}] for e, t in zip(exchanges, comparison.outputs["agent"], strict=True)
    ]
    answered = [
        float(bool(s[-1]["content"]) and CAPITALS[c] in s[-1]["content"]) for s, c in zip(said, countries, strict=True)
    ]
    agent = next(v for v in comparison.variants if v.name == "agent")
    expected = [a + float(n == 1) for a, n in zip(answered, looked_up, strict=True)]
    assert agent.numbers["reward"] == round(statistics.fmean(expected), 4)
    # --prompts rows without the fields reset reads: one line that says so
    asked = folder / "asked.jsonl"
    asked.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of Molo?"}]}) + "\n")
    with pytest.raises(TunelabError) as e:
        compare([tmp_path / "agent"], prompts_file=asked, max_new_tokens=8)
    assert str(e.value).startswith("compare: Atlas.reset failed on prompt 1 (TypeError: ") and "\n" not in str(e.value)


def test_tool_refusals_name_the_setting(folder: Path, download: Path, tmp_path, tiny_model_dir) -> None:
    def refused(extra: str = "", experiment: Path | None = None) -> str:
        with pytest.raises(ConfigError) as e:
            make_plan(load_experiment(experiment or grpo_experiment(folder, download, tmp_path, extra)))
        return str(e.value)

    # the built-in model's template prints no tools
    builtin = grpo_experiment(folder, download, tmp_path).read_text().replace(str(download), "builtin:tiny-chat")
    assert refused(experiment=write_experiment(folder, builtin, "builtin.yaml")).startswith(
        "grpo.tools: the chat template cannot render a tool-calling conversation"
    )
    # a template that prints tools but whose calls TRL cannot parse back (Llama 3.1's, with one character more)
    custom = (download / "chat_template.jinja").read_text().replace("Environment: ipython", "Environment:  ipython")
    (folder / "custom.jinja").write_text(custom)
    assert refused("tokenizer: {chat_template: custom.jinja}").startswith(
        "grpo.tools: TRL cannot read a tool call back from a reply in this chat template"
    )
    (folder / "bad_tools.py").write_text("def capital_of(country):\n    return country\n")
    text = grpo_experiment(folder, download, tmp_path).read_text().replace("[tools.py:", "[bad_tools.py:")
    message = refused(experiment=write_experiment(folder, text, "bad.yaml"))
    assert message.startswith("grpo.tools[0]: ") and "docstring" in message and "\n" not in message
    text = grpo_experiment(folder, download, tmp_path).read_text().replace("[tools.py:capital_of", "[tools.py:capitol")
    message = refused(experiment=write_experiment(folder, text, "typo.yaml"))
    assert message.startswith(f"grpo.tools[0]: {folder / 'tools.py'} defines no function 'capitol'")
    assert "capital_of" in message
    text = grpo_experiment(folder, download, tmp_path).read_text().replace("  tools: [tools.py:capital_of]\n", "")
    with pytest.raises(TunelabError, match=r"rounds.yaml:\d+: grpo.tool_rounds: no tool is named in grpo.tools"):
        load_experiment(write_experiment(folder, text, "rounds.yaml"))
    plain = folder / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "What is the capital of Molo?", "capital": "Vevasmo"}) + "\n")
    text = grpo_experiment(folder, download, tmp_path).read_text().replace(str(DATA / "grpo_train.jsonl"), str(plain))
    message = refused(experiment=write_experiment(folder, text, "plain.yaml"))
    assert message.startswith(f"{plain}:1: the prompt is plain text") and "data.as_chat: true" in message
    # an environment: a class, with reset, whose methods are described; each refusal one line naming the setting
    for source, expected in (
        ("def Atlas():\n    return 1\n", "is not a class"),
        ("class Atlas:\n    def capital_of(self, country: str) -> str:\n        return country\n", "has no reset method"),
        ("class Atlas:\n    def reset(self, **row):\n        pass\n\n    def capital_of(self, country):\n"
         "        return country\n", "Atlas.capital_of: "),
        ("class Atlas:\n    def reset(self, **row):\n        pass\n", "has no public method besides reset"),
    ):  # fmt: skip
        (folder / "bad_env.py").write_text(source)
        text = grpo_experiment(folder, download, tmp_path).read_text()
        text = text.replace("tools: [tools.py:capital_of]", "environment: bad_env.py:Atlas")
        message = refused(experiment=write_experiment(folder, text, "bad_env.yaml"))
        assert message.startswith(f"grpo.environment: {folder / 'bad_env.py'}:Atlas") and expected in message
        assert "\n" not in message


def test_a_resume_with_changed_tools_is_refused(download: Path, tmp_path) -> None:
    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS)
    (tmp_path / "rewards.py").write_text(REWARDS)
    experiment = grpo_experiment(tmp_path, download, tmp_path / "runs")
    first = run_cli("train", str(experiment), "--set", "train.max_steps=1")
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = tmp_path / "runs" / "agent" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"status": "interrupted"}))
    tools.write_text(TOOLS.replace("The capital city", "The capital"))
    resumed = run_cli("train", str(experiment), "--set", "train.max_steps=1", "--resume")
    assert resumed.returncode == 2 and f"the tools changed ({tools}:capital_of)" in resumed.stderr
