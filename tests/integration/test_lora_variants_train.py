"""DoRA, rsLoRA and original modules opened beside the adapter, trained on the tiny model: what changed, what the
adapter folder holds, merged exports equal to the adapter, and compare putting each run's own adapter on its rows."""

import json
import re
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tests.chat_fixtures import build
from tests.conftest import (
    DATA,
    EXAMPLES,
    resume_matches_straight,
    run_cli,
    trained_tensors,
    write_experiment,
)
from tests.integration.test_compare import prompts_file
from tunelab.compare import compare, generate, read_prompts
from tunelab.config import load_experiment
from tunelab.export import export_run
from tunelab.plan import make_plan
from tunelab.runs import read_manifest
from tunelab.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    steps = ["train.max_steps=16", "train.logging_steps=4"]
    made = {}
    for name, example, extra in (
        ("dora-head", "lora-dora-head", ["scope.lora.rslora=true"]),
        ("lora-qv", "lora-qv", []),
        ("pissa-qv", "lora-qv", ["scope.lora.init=pissa"]),
    ):
        exp = load_experiment(
            EXAMPLES / f"{example}.yaml", [f"output.dir={out}", f"output.name={name}", *steps, *extra]
        )
        made[name] = train(exp).run_dir
    return made


def base_state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {name: t for shard in sorted(model_dir.glob("*.safetensors")) for name, t in load_file(shard).items()}


def test_dora_magnitudes_and_opened_modules_train_and_are_saved_with_the_adapter(runs, tiny_model_dir) -> None:
    import torch

    run = runs["dora-head"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.norm"]
    saved, base = trained_tensors(run), base_state(tiny_model_dir)
    magnitudes = {n: t for n, t in saved.items() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 2 * 4  # q, k, v, o of layers 2 and 3
    for name, magnitude in magnitudes.items():
        weight = base[name.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0] + ".weight"]
        # DoRA starts each magnitude at its weight's row norms; training moved them.
        assert not torch.allclose(magnitude, weight.norm(dim=1), atol=1e-4), name
    head = saved["base_model.model.lm_head.weight"]
    norm = saved["base_model.model.model.norm.weight"]
    assert head.shape == base["lm_head.weight"].shape and not torch.equal(head, base["lm_head.weight"])
    assert not torch.equal(norm, base["model.norm.weight"])
    check = read_manifest(run).change_check
    assert check.ok and check.trainable_changed == 8 * 3 + 2 and check.frozen_changed == []


def test_merged_export_gives_the_adapters_logits(runs, tmp_path: Path, tiny_model_dir) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = export_run(runs["dora-head"], tmp_path / "merged", merge=True)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs["dora-head"] / "adapter"
    )
    with torch.no_grad():
        want = plain.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, base, atol=1e-2)


def test_compare_generates_a_dora_run_with_its_own_adapter(runs, tmp_path: Path, tiny_model_dir) -> None:
    """PEFT cannot route a DoRA adapter inside a mixed batch: compare generates it on its own, and each variant's
    outputs are what that adapter (or the base) gives alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = prompts_file(tmp_path, 4)
    both = compare([runs["lora-qv"], runs["dora-head"]], prompts_file=prompts)
    alone = compare([runs["lora-qv"]], prompts_file=prompts)
    assert both.outputs["lora-qv"] == alone.outputs["lora-qv"] and both.outputs["base"] == alone.outputs["base"]
    tok = AutoTokenizer.from_pretrained(runs["dora-head"] / "tokenizer")
    tok.padding_side = "left"
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), runs["dora-head"] / "adapter"
    )
    eos = [tok.eos_token_id]
    wanted = [
        generate(plain.eval(), tok, [p], None, 48, 1, {"do_sample": False, "eos_token_id": eos})[0]
        for p in read_prompts(prompts)
    ]
    assert both.outputs["dora-head"] == wanted
    scopes = {v.name: v.numbers.get("scope") for v in both.variants}
    assert scopes["dora-head"] == "lora r16 rslora dora k_proj,o_proj,q_proj,v_proj layers 2-3 +norm,lm_head"
    assert both.outputs["dora-head"] != both.outputs["base"]
    only = compare([runs["dora-head"]], prompts_file=prompts)  # no run to batch with: the base is still the base
    assert only.outputs["base"] == alone.outputs["base"] and only.outputs["dora-head"] == wanted


def test_an_opened_head_tied_to_the_embeddings_trains_and_exports_as_one_tensor(tmp_path: Path) -> None:
    """Gemma 2 ties lm_head to the input embeddings: opening the head trains the one shared matrix, and the merged
    export (saved tied, as its config says) still gives the adapter's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = build("gemma-2-it", tmp_path / "gemma2")
    exp = write_experiment(
        tmp_path,
        f"name: tied\nmodel: {{id: {model_dir}}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n"
        "tokenizer: {fold_system: true}\nscope: {lora: {targets: qv, open: [lm_head]}}\n"
        f"train: {{max_steps: 4, learning_rate: 1.0e-2, max_length: 128}}\noutput: {{dir: {tmp_path / 'runs'}}}\n",
    )
    run = train(load_experiment(exp)).run_dir
    saved = trained_tensors(run)
    head, embeddings = (
        saved.pop("base_model.model.lm_head.weight"),
        saved.pop("base_model.model.model.embed_tokens.weight"),
    )
    assert all("lora_" in n for n in saved)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(head, embeddings) and not torch.equal(head, base.get_input_embeddings().weight)
    merged = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "merged", merge=True))
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    ids = torch.tensor([[2, 30, 31, 32, 33]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, plain(ids).logits, atol=1e-4)


TEMPLATE_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def untrained_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The built-in model with its chat template's tokens never trained, as a base (not instruct) checkpoint holds
    them: zero rows in the embeddings and lm_head (Llama 3's base <|eot_id|>)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("base")
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[tok.convert_tokens_to_ids(TEMPLATE_TOKENS)] = 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def token_experiment(folder: Path, base: Path, name: str, tokens: str) -> Path:
    return write_experiment(
        folder,
        f"name: {name}\nmodel: {{id: {base}}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n"
        f"scope: {{lora: {{targets: qv, {tokens}}}}}\n"
        f"train: {{max_steps: 12, learning_rate: 1.0e-2, max_length: 128}}\noutput: {{dir: {folder / 'runs'}}}\n",
        f"{name}.yaml",
    )


def test_untrained_template_tokens_are_named_and_train_as_rows(untrained_base: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    said = (
        "the data uses 3 token(s) this base never trained (their embedding rows are zero): <|start_header_id|>, "
        "<|end_header_id|>, <|eot_id|>; with those rows frozen the model cannot learn to read or write them: set "
        "scope.lora.tokens: [<|start_header_id|>, <|end_header_id|>, <|eot_id|>], or start from the instruct model"
    )
    experiment = load_experiment(token_experiment(tmp_path, untrained_base, "plain", "r: 16"))
    assert said in make_plan(experiment).warnings  # read from the checkpoint's rows, before any weights load
    assert train(experiment).manifest.scope_notes == [said]  # and on the loaded weights
    with_rows = load_experiment(token_experiment(tmp_path, untrained_base, "rows", f"tokens: {TEMPLATE_TOKENS}"))
    assert not [w for w in make_plan(with_rows).warnings if "never trained" in w]
    rows = train(with_rows)
    assert rows.manifest.scope_notes is None and rows.manifest.change_check.ok
    base = AutoModelForCausalLM.from_pretrained(untrained_base)
    merged = AutoModelForCausalLM.from_pretrained(export_run(rows.run_dir, tmp_path / "merged", merge=True))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        before, after = base.state_dict()[name], merged.state_dict()[name]
        changed = sorted(int(i) for i in (before != after).any(dim=1).nonzero())
        assert changed == [2, 3, 4], name  # exactly the three rows, in the embeddings and in the head
    ids = torch.tensor([[1, 2, 40, 41, 3, 4]])
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(untrained_base), rows.run_dir / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, adapter.eval()(ids).logits, atol=1e-4)
    prompts = prompts_file(tmp_path, 3)
    both = compare([tmp_path / "runs" / "plain", rows.run_dir], prompts_file=prompts)
    alone = compare([rows.run_dir], prompts_file=prompts)
    assert both.outputs["rows"] == alone.outputs["rows"] and both.outputs["plain"] != both.outputs["rows"]
    assert {v.name: v.numbers.get("scope") for v in both.variants}[
        "rows"
    ] == "lora r16 q_proj,v_proj layers 0-3 +3 token rows"


def test_a_pissa_adapter_is_saved_as_the_plain_lora_that_gives_the_trained_model_on_the_original_weights(
    runs, tmp_path: Path, tiny_model_dir
) -> None:
    """PiSSA starts the adapter from each weight's principal components and trains on the rest of the weight. The
    saved adapter is PEFT's conversion (rank 2r) for the original weights: on the base as it is, it gives the model
    that trained, which is rebuilt here the way it trained (the same init on the base, the last checkpoint's pairs)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunelab.scopes import load_trained

    run, plain = runs["pissa-qv"], read_manifest(runs["lora-qv"])
    manifest = read_manifest(run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (32, 64, True)
    assert manifest.change_check.ok and manifest.change_check.frozen_changed == []
    # The start is the base (PiSSA moves the components, it does not change the sum); training then went elsewhere.
    assert manifest.base_eval_loss == pytest.approx(plain.base_eval_loss, abs=1e-5)
    assert manifest.final_eval_loss != pytest.approx(plain.final_eval_loss, abs=1e-3)
    checkpoint = max((run / "checkpoints").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    settings = LoraConfig.from_pretrained(str(checkpoint))
    settings.init_lora_weights = "pissa"
    as_trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings)
    set_peft_model_state_dict(as_trained, load_file(checkpoint / "adapter_model.safetensors"))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        want = as_trained.eval()(ids).logits
        got = load_trained(run).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "merged", merge=True))
        exported = merged.eval()(ids).logits
        as_is = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), checkpoint)
        unconverted = as_is.eval()(ids).logits
    assert not torch.allclose(want, base, atol=1e-2)
    assert torch.allclose(got, want, atol=1e-4) and torch.allclose(exported, want, atol=1e-4)
    assert not torch.allclose(unconverted, want, atol=1e-2)  # the trained pairs alone on the original weights
    planned = make_plan(load_experiment(run / "experiment.yaml")).scope.adapter
    assert planned == manifest.adapter == "r 16, alpha 32 (scale 2), pissa init, saved as plain LoRA r 32"
    assert f"\nadapter {planned}\n" in run_cli("show", str(run)).stdout


def test_dpo_with_olora_keeps_the_frozen_weights_trl_copies_the_reference_adapter_over(tmp_path: Path) -> None:
    """TRL's DPO adds a frozen "ref" copy of the adapter with the adapter's own config: with OLoRA's init still in it,
    PEFT would take a second start out of the frozen weights, so policy and reference both move off the base."""
    exp = load_experiment(
        EXAMPLES / "dpo.yaml",
        [f"output.dir={tmp_path}", "scope.lora.init=olora", "train.max_steps=2", "train.learning_rate=1e-4"],
    )
    manifest = train(exp).manifest
    check = manifest.change_check
    assert check.frozen_changed == [] and check.ok and check.trainable_changed == 4 * 7 * 2
    assert manifest.base_eval_loss == pytest.approx(0.693147, abs=1e-5)  # policy = reference at the start


def test_a_fast_svd_pissa_run_killed_mid_way_resumes_to_the_uninterrupted_adapter(tmp_path: Path) -> None:
    """The resumed process takes the start out of the weights again (a randomised SVD, from the run's seed) before the
    checkpoint's pairs load onto them: the same start, or the resumed run trains on other frozen weights."""
    resume_matches_straight("lora-qv", tmp_path, "--set", "scope.lora.init=pissa_niter_2")


def test_loraplus_moves_b_at_its_ratio_of_the_learning_rate_and_resumes_its_optimizer(tmp_path: Path) -> None:
    """AdamW's first step moves each weight by the learning rate times the sign of its gradient: with LoRA+ at 16, B
    moves 16 times as far as plain LoRA's B from the same start, A (whose gradient is zero while B is) not at all.
    A resume loads the checkpoint's optimizer state into LoRA+'s groups and ends where the straight run ends."""
    import torch

    made = {}
    for name, extra in (("plain", []), ("plus", ["scope.lora.loraplus_ratio=16"])):
        sets = [f"output.dir={tmp_path}", f"output.name={name}", "train.max_steps=1", *extra]
        made[name] = trained_tensors(train(load_experiment(EXAMPLES / "lora-qv.yaml", sets)).run_dir)
    plain, plus = made["plain"], made["plus"]
    assert [n for n in plain if ".lora_B." in n] and plain.keys() == plus.keys()
    for name, before in plain.items():
        want = 16 * before if ".lora_B." in name else before
        assert torch.allclose(plus[name], want, rtol=1e-4, atol=1e-9), name
    resume_matches_straight("lora-qv", tmp_path / "resumed", "--set", "scope.lora.loraplus_ratio=16")


class EvaStart(TrainerCallback):
    """As training begins: keeps the adapter's start, and measures how much of each adapted layer's top-r principal
    subspace (of its inputs on the supervised tokens of every training batch, computed here with torch.linalg.eigh)
    its A spans: 1 is all of it; a random r-dimensional A spans about r/d of it."""

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        import torch

        self.a = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
        self.b = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
        seen, masks = {}, []
        adapted = {n: m for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})}
        hooks = [
            m.register_forward_pre_hook(lambda _, a, n=n: seen.setdefault(n, []).append(a[0]))
            for n, m in adapted.items()
        ]
        model.eval()
        with torch.no_grad():
            for batch in train_dataloader:
                masks.append(batch["labels"] != -100)
                model(**batch)
        model.train()
        for hook in hooks:
            hook.remove()
        self.spanned = {}
        for name, inputs in seen.items():
            x = torch.cat([x[m] for x, m in zip(inputs, masks, strict=True)]).double()
            x = x - x.mean(0)
            a = self.a[f"{name}.lora_A.default.weight"].double()
            top = torch.linalg.eigh(x.T @ x).eigenvectors[:, -a.shape[0] :]
            spans, _ = torch.linalg.qr(a.T)
            self.spanned[name] = float((spans.T @ top).pow(2).sum() / a.shape[0])


def test_eva_starts_each_a_from_its_layers_input_directions_and_the_base(tmp_path: Path) -> None:
    """init: eva: before the first step, each adapted layer's A holds orthonormal directions that span the top-r
    principal subspace of that layer's inputs on the training data (PEFT's EVA reads batches until its incremental
    SVD settles: at least 0.85 of it here, where the default init's random A spans 0.11-0.14), also on a 4-bit base
    and on packed rows, and B is zero, so the model starts as the base."""
    import torch

    started = {}
    for name, init, extra in (
        ("eva", "eva", []),
        ("default", "default", []),
        ("eva-4bit", "eva", ["model.quantization={bits: 4}"]),  # QLoRA: the inputs the 4-bit layers give
        ("eva-packed", "eva", ["train.packing=true"]),  # 8 packed rows: it settles after 27, over several passes
    ):
        callback = EvaStart()
        sets = [f"output.dir={tmp_path}", f"output.name={name}", "train.max_steps=1", f"scope.lora.init={init}"]
        train(load_experiment(EXAMPLES / "lora-qv.yaml", [*sets, *extra]), callbacks=[callback])
        started[name] = callback
    eva, default = started["eva"], started["default"]
    assert len(eva.spanned) == 2 * 4  # q_proj and v_proj of the 4 layers
    assert min(eva.spanned.values()) > 0.85 and max(default.spanned.values()) < 0.3, (eva.spanned, default.spanned)
    for name in ("eva-4bit", "eva-packed"):
        assert min(started[name].spanned.values()) > 0.85, (name, started[name].spanned)
    for a in (*eva.a.values(), *started["eva-4bit"].a.values(), *started["eva-packed"].a.values()):
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)
    assert all(not b.any() for b in eva.b.values())
    # what the run saved: one step moves B only (A's gradient is zero while B is), so A is still EVA's start
    saved = trained_tensors(tmp_path / "eva")
    for name, a in eva.a.items():
        assert torch.equal(saved[name.replace(".default", "")], a), name


def test_an_eva_run_killed_mid_way_resumes_to_the_uninterrupted_adapter(tmp_path: Path) -> None:
    """The straight run and the crashed one each ran EVA in a process of its own, to the same start; the resumed
    process goes on from the checkpoint's adapter to the straight run's weights and losses."""
    resume_matches_straight("lora-qv", tmp_path, "--set", "scope.lora.init=eva")


def test_eva_without_a_batch_of_r_supervised_tokens_is_refused_before_anything_loads(tmp_path: Path) -> None:
    """The quickstart's answers are short: no forward pass of its micro batch holds 64 supervised tokens, from which
    EVA would take 64 directions (PEFT skips such a batch, so the start would never settle). plan counts them from
    the tokenized rows and train refuses before the model loads; a larger micro batch holds enough."""
    sets = [f"output.dir={tmp_path}", "scope.lora.init=eva", "scope.lora.r=64", "train.max_steps=2"]
    done = run_cli("train", str(EXAMPLES / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)])
    assert done.returncode != 0
    assert re.fullmatch(
        r"error: .*quickstart.yaml: scope.lora.init: EVA takes r = 64 directions from each training batch's "
        r"supervised tokens, and no batch of 2 examples here can have that many \(at most \d+\); lower "
        r"scope.lora.r, raise train.micro_batch_size, or use init: default",
        done.stderr.strip(),
    ), done.stderr[-2000:]
    assert "loading" not in done.stdout and not (tmp_path / "quickstart").exists()
    wider = make_plan(load_experiment(EXAMPLES / "quickstart.yaml", [*sets, "train.micro_batch_size=8"]))
    assert wider.scope.adapter == "r 64, alpha 32 (scale 0.5), eva init"


def test_a_run_that_goes_on_from_an_eva_run_starts_from_its_trained_adapter(tmp_path: Path) -> None:
    """init_from an EVA run: the adapter's saved config says init: eva, and it goes on from its trained weights;
    nothing starts it from the data again."""
    import torch

    sets = [f"output.dir={tmp_path}", "train.max_steps=2"]
    first = train(load_experiment(EXAMPLES / "lora-qv.yaml", [*sets, "output.name=eva", "scope.lora.init=eva"]))
    assert json.loads((first.run_dir / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "eva"
    callback = EvaStart()
    train(load_experiment(EXAMPLES / "lora-qv.yaml", [*sets, "output.name=next", f"init_from={first.run_dir}"]),
          callbacks=[callback])  # fmt: skip
    saved = trained_tensors(first.run_dir)
    started = {**callback.a, **callback.b}
    assert len(started) == 2 * 2 * 4 and any(b.any() for b in callback.b.values())
    for name, tensor in started.items():
        assert torch.equal(tensor, saved[name.replace(".default", "")]), name
