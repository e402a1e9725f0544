from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from tunelab.errors import TunelabError
from tunelab.study import load_study


def study(tmp_path: Path, variants: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {EXAMPLES / 'quickstart.yaml'}\nvariants:\n{variants}")
    return path


def test_ladder_example_loads_in_dependency_order() -> None:
    s = load_study(EXAMPLES / "ladder.yaml")
    assert s.order == ["qv", "qkvo", "all-linear", "last-half", "partial", "dpo"]
    assert s.order.index("all-linear") < s.order.index("dpo")


def test_unknown_after(tmp_path: Path) -> None:
    with pytest.raises(TunelabError) as e:
        load_study(study(tmp_path, "  a: {after: nope}\n  b: {}\n"))
    assert str(e.value) == f"{tmp_path}/s.yaml: variants.a.after: unknown variant 'nope'; variants are a, b"


def test_cycle(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match=r"variants form a cycle: a -> b -> c -> a"):
        load_study(study(tmp_path, "  a: {after: b}\n  b: {after: c}\n  c: {after: a}\n"))


def test_override_key_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(TunelabError) as e:
        load_study(study(tmp_path, "  a: {set: {train.learnign_rate: 1}}\n"))
    assert str(e.value) == (
        f"{tmp_path}/s.yaml: variants.a.set.train.learnign_rate: unknown key 'learnign_rate'; "
        "did you mean 'learning_rate'?"
    )


def test_override_value_that_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match=r"variants.a.set: train.epochs: Input should be greater than 0"):
        load_study(study(tmp_path, "  a: {set: {train.epochs: -1}}\n"))


def test_unknown_study_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {EXAMPLES / 'quickstart.yaml'}\nvariants: {{}}\ncompre: {{}}\n")
    with pytest.raises(TunelabError, match=r"s.yaml:4: compre: Extra inputs are not permitted"):
        load_study(path)


def test_set_applies_to_every_variant_and_moves_the_study(tmp_path: Path) -> None:
    from tunelab.study import load_study, variant_experiment

    study = load_study(EXAMPLES / "ladder.yaml", ["train.max_steps=2", f"output.dir={tmp_path / 'smoke'}"])
    assert study.output == tmp_path / "smoke"
    for name in study.order:
        exp = variant_experiment(study, name, init_from=None)
        assert exp.train.max_steps == 2 and Path(exp.output.dir) == tmp_path / "smoke"
    with pytest.raises(TunelabError, match=r"--set train.seed: Input should be greater than or equal to 0"):
        load_study(EXAMPLES / "ladder.yaml", ["train.seed=-1"])


def test_a_variant_keeps_the_bases_defaults_as_defaults(tmp_path: Path) -> None:
    """A base that leaves LoRA dropout at its default: a variant's experiment must too, or a default that gives way
    to the model (dropout on a MoE model's fused experts) would turn into an explicit setting that refuses."""
    from tunelab.study import variant_experiment

    text = (EXAMPLES / "quickstart.yaml").read_text()
    (tmp_path / "base.yaml").write_text("\n".join(line for line in text.splitlines() if "dropout" not in line))
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {tmp_path / 'base.yaml'}\nvariants:\n  a: {{set: {{scope.lora.r: 4}}}}\n")
    s = load_study(path)
    base = s.base.scope.lora
    variant = variant_experiment(s, "a", None).scope.lora
    assert "dropout" not in base.model_fields_set and "dropout" not in variant.model_fields_set
    assert (variant.r, variant.dropout) == (4, base.dropout)


def test_a_variants_differences_name_the_keys_it_sets() -> None:
    """A section the base lacks shows the keys the variant sets in it, not its defaults beside them; one it sets
    nothing in (dpo, with method: dpo) shows whole."""
    from tunelab.study import diff_from_base, variant_experiment

    study = load_study(EXAMPLES / "ladder.yaml")
    differs = {name: diff_from_base(study, variant_experiment(study, name, init_from=None)) for name in study.order}
    assert differs["partial"] == [
        "scope.partial.last_blocks=4",
        "scope.partial.lm_head=true",
        "scope.partial.norm=true",
        "train.epochs=2.0",
        "train.learning_rate=5e-06",
    ]
    assert differs["qv"] == ['scope.lora.targets="qv"'] and differs["all-linear"] == []
    assert 'dpo={"beta": 0.1, "loss_type": "sigmoid", "reference": "auto"}' in differs["dpo"]
    assert 'method="dpo"' in differs["dpo"]


def test_a_seed_ladder_holding_out_other_rows_is_named_before_it_trains(tmp_path: Path) -> None:
    """Each seed's eval_fraction holds out other rows of one file; compare measures all on the first SFT variant's,
    which the others train on. The count is exactly the rows one draw holds out and the other does not."""
    import random

    from tunelab.study import measured_apart

    n = len((EXAMPLES / "data" / "sft_train.jsonl").read_text().splitlines())
    held = {}
    for seed in (1, 2, 3):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        held[seed] = set(order[: round(n * 0.1)])
    apart = "data.eval: null, data.eval_fraction: 0.1"
    path = study(tmp_path, "".join(f"  s{i}: {{set: {{train.seed: {i}, {apart}}}}}\n" for i in (1, 2, 3)))
    counts = {i: len(held[1] - held[i]) for i in (2, 3)}
    assert measured_apart(load_study(path)) == (
        f"compare will measure every variant's eval loss on s1's held-out rows, and s2 ({counts[2]} of {len(held[1])}), "
        f"s3 ({counts[3]} of {len(held[1])}) train on them (the same rows, or rows that ask the same): give every "
        "variant one data.eval file none trains on"
    )
    same = study(tmp_path, "".join(f"  r{r}: {{set: {{scope.lora.r: {r}, {apart}}}}}\n" for r in (4, 8)))
    assert measured_apart(load_study(same)) is None  # one seed: the same rows held out, none trained on
    assert measured_apart(load_study(EXAMPLES / "ladder.yaml")) is None


def test_a_grid_makes_one_variant_for_each_combination_in_place(tmp_path: Path) -> None:
    """train.seed x train.learning_rate gives four variants where the gridded one stood, named by their values, each
    with the variant's `set` and its own values; a variant can start from one of them."""
    from tunelab.study import diff_from_base, variant_experiment

    path = study(
        tmp_path,
        "  first: {}\n"
        "  qv:\n"
        "    set: {scope.lora.targets: qv}\n"
        "    grid: {train.seed: [1, 2], train.learning_rate: [1.0e-4, 3.0e-3]}\n"
        "  more: {after: qv-seed_2-learning_rate_0.0001, set: {train.epochs: 1}}\n",
    )
    s = load_study(path)
    points = ["qv-seed_1-learning_rate_0.0001", "qv-seed_1-learning_rate_0.003"]
    points += ["qv-seed_2-learning_rate_0.0001", "qv-seed_2-learning_rate_0.003"]
    assert s.order == ["first", *points, "more"]
    made = {name: variant_experiment(s, name, init_from=None) for name in s.order}
    assert [(made[p].train.seed, made[p].train.learning_rate) for p in points] == [
        (1, 1e-4), (1, 3e-3), (2, 1e-4), (2, 3e-3)
    ]  # fmt: skip
    assert {made[p].scope.lora.targets for p in points} == {"qv"}
    assert len({made[p].run_name for p in points}) == 4  # four run folders
    assert diff_from_base(s, made[points[2]]) == [
        'scope.lora.targets="qv"', "train.learning_rate=0.0001", "train.seed=2"
    ]  # fmt: skip
    assert made["more"].init_from == f"<run of {points[2]}>" and made["more"].train.seed == 42


@pytest.mark.parametrize(
    ("variants", "said"),
    [
        ("  a: {grid: {train.sed: [1, 2]}}\n", "variants.a.grid.train.sed: unknown key 'sed'; did you mean 'seed'?"),
        ("  a: {grid: {train.epochs: [1, -1]}}\n", "variants.a (a-epochs_-1): train.epochs: Input should be"),
        ("  a: {grid: {train.seed: []}}\n", "variants.a.grid.train.seed: no values; give a list of them"),
        (
            "  a: {set: {train.seed: 3}, grid: {train.seed: [1, 2]}}\n",
            "variants.a.grid.train.seed: also in variants.a.set; give it in one of them",
        ),
        (
            "  a: {grid: {scope.lora.layers: [{last: 2}, all]}}\n",
            "variants.a.grid.scope.lora.layers: a grid takes plain values (numbers, text, true or false)",
        ),
        ("  a: {grid: {train.seed: [1, 1]}}\n", "variants.a.grid: its variant 'a-seed_1' is named twice"),
        (
            f"  {'a' * 95}: {{grid: {{train.seed: [1]}}}}\n",
            f"variants.{'a' * 95}.grid: its variant '{'a' * 95}-seed_1' is longer than a run's name may be (100",
        ),
        ("  a-seed_1: {}\n  a: {grid: {train.seed: [1, 2]}}\n", "variants.a.grid: its variant 'a-seed_1' is named"),
        ("  a: {grid: {output.dir: [x, y]}}\n", "variants.a.grid.output.dir: the study sets this itself"),
        (
            "  a: {grid: {train.seed: [1, 2]}}\n  b: {after: a}\n",
            "variants.b.after: 'a' is a grid of 2 variants (a-seed_1, a-seed_2); name one of them",
        ),
    ],
)
def test_a_grid_that_cannot_be_made_is_one_line_naming_it(tmp_path: Path, variants: str, said: str) -> None:
    with pytest.raises(TunelabError) as e:
        load_study(study(tmp_path, variants))
    assert str(e.value).startswith(f"{tmp_path}/s.yaml: {said}") and "\n" not in str(e.value), str(e.value)


def test_the_studys_grid_runs_every_variant_once_for_each_combination(tmp_path: Path) -> None:
    """grid: {train.seed: [1, 2]} beside the variants: each variant twice, a variant `after` another going on from the
    run of its own seed; with a variant's own grid, its values come first in the names."""
    from tunelab.study import variant_experiment

    path = tmp_path / "s.yaml"
    pairs = f"{{method: dpo, data.train: {EXAMPLES / 'data/pref_train.jsonl'}, data.eval: null}}"
    path.write_text(
        f"name: s\nbase: {EXAMPLES / 'quickstart.yaml'}\ngrid: {{train.seed: [1, 2]}}\nvariants:\n"
        "  sft: {}\n"
        "  qv: {set: {scope.lora.targets: qv}, grid: {scope.lora.r: [4, 8]}}\n"
        f"  dpo: {{after: sft, set: {pairs}}}\n"
        f"  more: {{after: qv-r_8, set: {pairs}}}\n"
    )
    s = load_study(path)
    assert s.order == [
        "sft-seed_1", "sft-seed_2", "qv-r_4-seed_1", "qv-r_4-seed_2", "qv-r_8-seed_1", "qv-r_8-seed_2",
        "dpo-seed_1", "dpo-seed_2", "more-seed_1", "more-seed_2",
    ]  # fmt: skip
    made = {name: variant_experiment(s, name, init_from=None) for name in s.order}
    assert [made[n].train.seed for n in s.order] == [1, 2] * 5
    assert [made[n].scope.lora.r for n in s.order[2:6]] == [4, 4, 8, 8]
    assert [made[n].init_from for n in s.order[6:]] == [
        "<run of sft-seed_1>", "<run of sft-seed_2>", "<run of qv-r_8-seed_1>", "<run of qv-r_8-seed_2>"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("grid", "variants", "said"),
    [
        ("{train.sed: [1]}", "  a: {}\n", "grid.train.sed: unknown key 'sed'; did you mean 'seed'?"),
        ("{train.seed: []}", "  a: {}\n", "grid.train.seed: no values; give a list of them"),
        ("{train.seed: [1]}", "  a: {set: {train.seed: 2}}\n", "variants.a.set.train.seed: also in the study's grid"),
        ("{train.seed: [1]}", "  a: {grid: {train.seed: [2]}}\n", "variants.a.grid.train.seed: also in the study's"),
        ("{train.seed: [1, 1]}", "  a: {}\n", "grid: its variant 'a-seed_1' is named twice"),
        ("{train.seed: [1]}", "  a: {after: b}\n", "variants.a.after: unknown variant 'b'; variants are a"),
    ],
)
def test_a_study_grid_that_cannot_be_made_is_one_line_naming_it(
    tmp_path: Path, grid: str, variants: str, said: str
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {EXAMPLES / 'quickstart.yaml'}\ngrid: {grid}\nvariants:\n{variants}")
    with pytest.raises(TunelabError) as e:
        load_study(path)
    assert str(e.value).startswith(f"{path}: {said}") and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("compared", "said"),
    [
        ("{against: nope}", "compare.against: unknown variant 'nope'; variants are base, a-seed_1, a-seed_2, b"),
        ("{against: a}", "compare.against: 'a' is a grid of 2 variants (a-seed_1, a-seed_2); name one of them"),
        ("{against: base, base: false}", "compare.against: the base is not compared (compare.base: false); name a"),
    ],
)
def test_a_comparison_against_a_variant_the_study_does_not_make_is_refused(
    tmp_path: Path, compared: str, said: str
) -> None:
    path = study(tmp_path, f"  a: {{grid: {{train.seed: [1, 2]}}}}\n  b: {{}}\ncompare: {compared}\n")
    with pytest.raises(TunelabError) as e:
        load_study(path)
    assert str(e.value).startswith(f"{path}: {said}") and "\n" not in str(e.value), str(e.value)
    for fine in ("a-seed_2", "b", "base"):
        assert load_study(
            study(tmp_path, f"  a: {{grid: {{train.seed: [1, 2]}}}}\n  b: {{}}\ncompare: {{against: {fine}}}\n")
        )


def test_a_grid_named_by_compare_against_lists_its_own_variants_only(tmp_path: Path) -> None:
    """'a-x' is another variant whose grid makes names that begin 'a-' too: they are not a's."""
    path = study(
        tmp_path, "  a: {grid: {train.seed: [1, 2]}}\n  a-x: {grid: {train.seed: [3]}}\ncompare: {against: a}\n"
    )
    with pytest.raises(TunelabError) as e:
        load_study(path)
    assert (
        str(e.value) == f"{path}: compare.against: 'a' is a grid of 2 variants (a-seed_1, a-seed_2); name one of them"
    )
