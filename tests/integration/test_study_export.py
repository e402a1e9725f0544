"""Studies run once, skip when unchanged, re-run only what changed; exports load with plain Transformers."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import DATA, EXAMPLES, run_cli
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.export import export_run
from tunelab.study import load_study, run_study
from tunelab.train import train

pytestmark = pytest.mark.slow

STUDY = """\
name: mini
base: {base}
output: {out}
variants:
  qv:
    set: {{scope.lora.targets: qv, train.max_steps: 4, train.save_steps: 2}}
  partial:
    set: {{scope: {{partial: {{last_blocks: 1, lm_head: true}}}}, train.max_steps: 3, train.learning_rate: {lr}}}
  dpo:
    after: qv
    set: {{method: dpo, data.train: {data}/pref_train.jsonl, data.eval: {data}/pref_eval.jsonl, train.max_steps: 3}}
compare:
  prompts: {data}/prompts.jsonl
  max_new_tokens: 8
"""


def write_study(tmp_path: Path, lr: str = "1.0e-4") -> Path:
    """The study, comparing on its own copy of the bundled prompts (tmp_path/prompts.jsonl), written once."""
    path = tmp_path / "mini.yaml"
    path.write_text(STUDY.format(base=EXAMPLES / "quickstart.yaml", out=tmp_path / "runs", data=DATA, lr=lr))
    path.write_text(path.read_text().replace(f"prompts: {DATA}/prompts.jsonl", "prompts: prompts.jsonl"))
    if not (tmp_path / "prompts.jsonl").exists():
        (tmp_path / "prompts.jsonl").write_bytes((DATA / "prompts.jsonl").read_bytes())
    return path


def test_study_runs_skips_and_reruns_only_what_changed(tmp_path: Path, tiny_model_dir) -> None:
    first, report = run_study(load_study(write_study(tmp_path)), log=lambda *_: None)
    assert [(o.name, o.status) for o in first] == [("qv", "trained"), ("partial", "trained"), ("dpo", "trained")]
    assert report is not None and report.is_file()
    html = report.read_text()
    assert all(name in html for name in ("qv", "partial", "dpo"))
    dpo_manifest = json.loads((Path(first[2].run_dir) / "manifest.json").read_text())
    assert dpo_manifest["init_from"] == first[0].run_dir

    # Skipped means untouched: every run's record and result stay byte for byte what they were.
    records = {o.run_dir: (Path(o.run_dir) / "manifest.json").read_bytes() for o in first}
    made = (report.parent / "report.json").stat().st_mtime_ns
    again, kept = run_study(load_study(write_study(tmp_path)), log=lambda *_: None)
    assert [o.status for o in again] == ["skipped"] * 3
    assert {o.run_dir: (Path(o.run_dir) / "manifest.json").read_bytes() for o in again} == records
    assert kept == report and (report.parent / "report.json").stat().st_mtime_ns == made  # nothing to compare anew
    # the same file name with other prompts in it is compared again: one prompt fewer in the new report
    prompts = (tmp_path / "prompts.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "prompts.jsonl").write_text("".join(prompts[:-1]))
    _, report = run_study(load_study(write_study(tmp_path)), log=lambda *_: None)
    assert len(json.loads((report.parent / "report.json").read_text())["prompts"]) == len(prompts) - 1
    # the same runs under another compare section (against: qv, and qv's step 2 beside it) are compared again
    path = write_study(tmp_path)
    path.write_text(path.read_text() + "  against: qv\n  checkpoints: true\n")
    _, report = run_study(load_study(path), log=lambda *_: None)
    compared = json.loads((report.parent / "report.json").read_text())
    qv = Path(first[0].run_dir).name
    assert compared["settings"]["against"] == qv
    assert [v["name"] for v in compared["variants"]] == [
        "base",
        qv,
        f"{qv}@2",
        *(Path(o.run_dir).name for o in first[1:]),
    ]

    changed, _ = run_study(load_study(write_study(tmp_path, lr="2.0e-4")), log=lambda *_: None)
    assert [(o.name, o.status) for o in changed] == [("qv", "skipped"), ("partial", "trained"), ("dpo", "skipped")]
    assert changed[1].run_dir != first[1].run_dir and Path(first[1].run_dir).is_dir()  # the old run is kept


def test_failed_variant_does_not_stop_independent_ones(tmp_path: Path, tiny_model_dir) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"""\
name: s
base: {EXAMPLES / "quickstart.yaml"}
output: {tmp_path / "runs"}
variants:
  broken: {{set: {{data.train: {tmp_path / "bad.jsonl"}, train.max_steps: 1}}}}
  after-broken: {{after: broken, set: {{train.max_steps: 1}}}}
  fine: {{set: {{train.max_steps: 1}}}}
compare: {{prompts: {DATA}/prompts.jsonl, max_new_tokens: 4, against: broken}}
""")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{nope\n')
    said: list[str] = []
    outcomes, report = run_study(load_study(path), log=lambda *line: said.append(" ".join(map(str, line))))
    status = {o.name: o.status for o in outcomes}
    assert status == {"broken": "failed", "after-broken": "blocked", "fine": "trained"}
    assert "bad.jsonl:2: malformed JSON" in next(o.error for o in outcomes if o.name == "broken")
    # the variant the comparison was to be set against failed: the others are set against the best, and it says so
    assert "compare.against: broken did not complete; every variant is set against the best instead" in said
    assert report is not None and json.loads((report.parent / "report.json").read_text())["settings"]["against"] is None


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_merged_and_partial_exports_match_with_plain_transformers(tmp_path: Path, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.scopes import load_trained

    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    lora = train(load_experiment(EXAMPLES / "lora-all-linear.yaml", [f"output.dir={tmp_path}", "train.max_steps=5"]))
    merged = export_run(lora.run_dir, tmp_path / "merged", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()
    torch.testing.assert_close(logits(plain, ids), logits(load_trained(lora.run_dir), ids), atol=1e-4, rtol=0)
    provenance = json.loads((merged / "tunelab-export.json").read_text())
    assert provenance["kind"] == "merged" and provenance["base_model"]["fingerprint"]

    adapter = export_run(lora.run_dir, tmp_path / "adapter")
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    torch.testing.assert_close(logits(again, ids), logits(load_trained(lora.run_dir), ids), atol=0, rtol=0)

    # Each export carries a model card: the Hub's metadata and the run's numbers, with no path of this machine.
    for folder, library in ((adapter, "peft"), (merged, "transformers")):
        card = (folder / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["library_name"] == library and meta["tags"] == ["tunelab", "sft", lora.manifest.scope]
        assert "base_model" not in meta  # the built-in model is no hub id
        m = lora.manifest
        assert f"| eval loss | {m.base_eval_loss:.4g} | {m.final_eval_loss:.4g} |" in card
        assert f"({m.trainable_params:,} of {m.total_params:,} parameters)" in card
        assert str(tmp_path) not in card and "sft_train.jsonl `" in card

    partial = train(
        load_experiment(
            EXAMPLES / "partial-last4.yaml", [f"output.dir={tmp_path}", "train.max_steps=2", "train.learning_rate=1e-3"]
        )
    )
    out = export_run(partial.run_dir, tmp_path / "partial")
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out), ids),
        logits(load_trained(partial.run_dir), ids),
        atol=1e-4,
        rtol=0,
    )
    with pytest.raises(TunelabError, match="exists and is not empty"):
        export_run(partial.run_dir, tmp_path / "partial")


def test_runs_command_lists_newest_first(tmp_path: Path, tiny_model_dir) -> None:
    for name in ("older", "newer"):
        train(
            load_experiment(
                EXAMPLES / "lora-qv.yaml", [f"output.dir={tmp_path}", "train.max_steps=1", f"output.name={name}"]
            )
        )
    out = run_cli("runs", str(tmp_path), "--json")
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == ["newer", "older"]
    assert rows[0]["status"] == "completed" and rows[0]["scope"] == "lora" and rows[0]["eval_loss"] is not None
    table = run_cli("runs", str(tmp_path))
    assert "newer" in table.stdout and "lora" in table.stdout
