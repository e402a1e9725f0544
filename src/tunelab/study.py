"""Studies: a base experiment and named variants (dotted overrides, optionally `after` another variant).

Each variant resolves to a full experiment whose run directory is `<output>/<variant>-<hash>`, the
hash taken over the resolved experiment. So an unchanged variant finds its completed run and is
skipped, a changed one gets a new run beside the old, and an interrupted one resumes. A variant
`after` another starts from that variant's run (`init_from`), one whose `teacher` is another distills that
variant's run (`distill.teacher`), and one whose `reward_model` is another trains GRPO against that variant's reward
model (`grpo.rewards`), so changing the first re-runs both.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.config import METHOD_SECTIONS, Experiment, apply_override, read_yaml, resolve_paths, set_key, validate
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from tunelab.lmeval import EvalSettings


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys to override, e.g. scope.lora.r: 8.")
    after: str | None = Field(default=None, description="Start from this variant's run (sets init_from).")
    teacher: str | None = Field(
        default=None, description="Distill this variant's run (sets distill.teacher; set method: distill)."
    )

    reward_model: str | None = Field(
        default=None,
        description="Score this variant's GRPO replies with that variant's reward model (a variant of method: reward): "
        "its run joins grpo.rewards (set method: grpo).",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted keys, each with a list of values: the variant becomes one variant for every combination "
        "(train.seed: [1, 2, 3] gives <name>-seed_1, <name>-seed_2, <name>-seed_3), each with `set` too.",
    )

    def needs(self) -> list[tuple[str, str]]:
        """The variants whose runs this one needs, by the key that names each."""
        named = (("after", self.after), ("teacher", self.teacher), ("reward_model", self.reward_model))
        return [(key, name) for key, name in named if name is not None]


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: str | None = Field(default=None, description="Prompt JSONL; default: the held-out data.")
    eval: str | None = Field(default=None, description="SFT data for eval loss; default: the base experiment's.")
    base: bool = Field(default=True, description="Include the untrained base model.")
    max_new_tokens: int = Field(default=48, gt=0, description="Tokens generated per output.")
    against: str | None = Field(
        default=None,
        description="The variant every other is set against in the differences table (a variant's name, or base: "
        "the ladder's baseline); default: the best of each quality.",
    )
    checkpoints: bool = Field(
        default=False,
        description="Each variant's other kept checkpoints too (not the one that is its result), each compared as a "
        "variant of its own (<run>@<step>): which step of a variant should survive.",
    )


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1, description="lm-evaluation-harness task names.")
    include_path: str | None = Field(
        default=None, description="A folder of your own lm-eval task YAML files (relative to this file)."
    )
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples (default: the task's).")
    limit: float | None = Field(default=None, gt=0, description="Documents per task (a fraction if below 1).")
    batch_size: int = Field(default=16, gt=0, description="Requests per forward pass.")
    chat_template: bool = Field(default=False, description="Wrap prompts in the runs' chat template.")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Study name.")
    base: str | dict = Field(description="The base experiment: a path (relative to this file) or inline.")
    variants: dict[str, VariantSpec] = Field(description="Named variants, each a set of overrides.")
    compare: CompareSpec = Field(default_factory=CompareSpec, description="The comparison written at the end.")
    eval: EvalSpec | None = Field(
        default=None, description="Benchmarks (lm-evaluation-harness) on the base and every variant, then compared."
    )
    output: str | None = Field(default=None, description="Folder of the study's runs; default runs/<name>.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted keys, each with a list of values: every variant once for each combination (train.seed: "
        "[1, 2, 3] runs the study three times over), a variant `after` another going on from that one's run of the "
        "same values.",
    )


@dataclass
class Study:
    spec: StudySpec
    path: Path
    base: Experiment
    order: list[str]  # variants in dependency order
    # each variant a grid made: the variant it comes from, and its values of the grid's keys
    points: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.spec.output or f"runs/{self.spec.name}")


@dataclass
class VariantOutcome:
    name: str
    status: str  # skipped | trained | resumed | failed | blocked
    run_dir: str | None = None
    error: str | None = None
    diff: list[str] = field(default_factory=list)


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read a study; `overrides` (the CLI's --set) apply to the base experiment, so to every variant that does not
    set the same key itself, and `output.dir` moves the whole study."""
    path = Path(path)
    raw, lines = read_yaml(path)
    raw.setdefault("name", path.stem)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        line = lines.get(tuple(str(p) for p in first["loc"]), lines.get(tuple(str(p) for p in first["loc"][:1]), 1))
        raise TunelabError(f"{path}:{line}: {key}: {first['msg']}") from e
    if isinstance(spec.base, str):
        base_path = path.parent / spec.base
        base_raw, _ = read_yaml(base_path)
        base_raw.setdefault("name", base_path.stem)
        base_dir = base_path.parent
    else:
        base_raw, base_dir = copy.deepcopy(spec.base), path.parent
    given = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key.strip() == "output.dir":
            spec = spec.model_copy(update={"output": value.strip()})
            continue
        apply_override(base_raw, item)
        given[key.strip()] = f"--set {key.strip()}"
    base = resolve_paths(validate(base_raw, source=f"{path}: base", given=given), base_dir)
    spec, points = expand_grids(spec, path)
    _check_against(spec, points, path)
    order = _dependency_order(spec, path)
    study = Study(spec, path, base, order, points)
    for name in order:  # every variant must resolve before anything trains
        variant_experiment(study, name, init_from=None)
    return study


def expand_grids(spec: StudySpec, path: Path) -> tuple[StudySpec, dict[str, tuple[str, dict[str, Any]]]]:
    """The study with each variant replaced, in place, by one variant for every combination of the values of its grid
    and the study's (the first key varying slowest, the variant's before the study's), named
    <variant>-<key>_<value>-... (the last part of each key); and for each of those, the variant it comes from and its
    values. Under the study's grid a variant goes on from (after, teacher, reward_model) the variant of its own
    combination of the study's values."""
    variants: dict[str, VariantSpec] = {}
    points: dict[str, tuple[str, dict[str, Any]]] = {}
    _check_grid("grid", spec.grid, {}, path)
    shared_points = _combinations(spec.grid)
    for name, v in spec.variants.items():
        if not v.grid and not spec.grid:
            variants[name] = v
            continue
        _check_grid(f"variants.{name}.grid", v.grid, v.set, path)
        for key in spec.grid:
            if key in v.set or key in v.grid:
                where = f"variants.{name}.{'set' if key in v.set else 'grid'}"
                raise TunelabError(f"{path}: {where}.{key}: also in the study's grid; give it in one of them")
        for own in _combinations(v.grid):
            for shared in shared_points:
                point = own | shared
                named = _point_name(name, point)
                where = f"{path}: {'variants.' + name + '.' if own else ''}grid: its variant '{named}'"
                if len(named) > 100:
                    raise TunelabError(
                        f"{where} is longer than a run's name may be (100 characters); give the variant a shorter "
                        "name, or fewer values in text"
                    )
                if named in variants or named in spec.variants:
                    raise TunelabError(
                        f"{where} is named twice (a value given twice, or another variant of that name); give each "
                        "value once and each variant its own name"
                    )
                needs = {key: _point_name(needed, shared) for key, needed in v.needs()}
                variants[named] = v.model_copy(update={"grid": {}, **needs})
                points[named] = (name, point)
    _check_needs(spec, variants, points, path)
    return spec.model_copy(update={"variants": variants}), points


def _combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values, the first key varying slowest; one empty one for no grid."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _point_name(name: str, point: dict[str, Any]) -> str:
    return "-".join([name, *(f"{key.rsplit('.', 1)[-1]}_{_name_part(value)}" for key, value in point.items())])


def _check_needs(
    spec: StudySpec, variants: dict[str, VariantSpec], points: dict[str, tuple[str, dict[str, Any]]], path: Path
) -> None:
    """Each variant a variant goes on from (after, teacher, reward_model) is one variant of the study, as written or
    as its grid made it (the study's grid aside: a variant goes on from the one of its own values): naming a variant
    its grid made several of is refused."""
    made = {
        name: [_point_name(name, own) for own in _combinations(v.grid)] for name, v in spec.variants.items() if v.grid
    }
    for name, v in variants.items():
        origin = points[name][0] if name in points else name
        for (key, needed), (_, resolved) in zip(spec.variants[origin].needs(), v.needs(), strict=True):
            if needed in made:
                raise TunelabError(
                    f"{path}: variants.{origin}.{key}: '{needed}' is a grid of {len(made[needed])} variants "
                    f"({', '.join(made[needed])}); name one of them"
                )
            if resolved not in variants:
                named = [n for n in spec.variants if not spec.variants[n].grid] + [
                    n for ns in made.values() for n in ns
                ]
                raise TunelabError(
                    f"{path}: variants.{origin}.{key}: unknown variant '{needed}'; variants are " + ", ".join(named)
                )


def _check_against(spec: StudySpec, points: dict[str, tuple[str, dict[str, Any]]], path: Path) -> None:
    """compare.against names one variant of the study as its grids made them (`points`: expand_grids'), or base where
    the base is compared."""
    against = spec.compare.against
    named = (["base"] if spec.compare.base else []) + list(spec.variants)
    if against is None or against in named:
        return
    made = [name for name, (origin, _) in points.items() if origin == against]
    if made:
        said = f"'{against}' is a grid of {len(made)} variants ({', '.join(made)}); name one of them"
    elif against == "base":
        said = "the base is not compared (compare.base: false); name a variant, or set compare.base: true"
    else:
        said = f"unknown variant '{against}'; variants are " + ", ".join(named)
    raise TunelabError(f"{path}: compare.against: {said}")


def _check_grid(at: str, grid: dict[str, list[Any]], given: dict[str, Any], path: Path) -> None:
    """A grid (at: where in the study) has values, plain ones, for keys the variant does not set (`given`)."""
    for key, values in grid.items():
        where = f"{path}: {at}.{key}"
        if key in given:
            raise TunelabError(f"{where}: also in {at.removesuffix('grid')}set; give it in one of them")
        if not values:
            raise TunelabError(f"{where}: no values; give a list of them, e.g. [1, 2, 3]")
        if not all(isinstance(value, str | int | float | bool) for value in values):
            raise TunelabError(
                f"{where}: a grid takes plain values (numbers, text, true or false), which name its variants; "
                "write a variant of its own for each other value"
            )


def _name_part(value: str | int | float | bool) -> str:
    """A grid value as its variants' names spell it (in run names: letters, digits, . _ -): numbers as short as they
    read, text with any other character as _."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(value))


def _dependency_order(spec: StudySpec, path: Path) -> list[str]:
    for name, v in spec.variants.items():
        for key, needed in v.needs():
            if needed not in spec.variants:
                raise TunelabError(
                    f"{path}: variants.{name}.{key}: unknown variant '{needed}'; variants are "
                    + ", ".join(spec.variants)
                )
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise TunelabError(f"{path}: variants form a cycle: {' -> '.join([*chain, name])}")
        state[name] = "visiting"
        for _, needed in spec.variants[name].needs():
            visit(needed, [*chain, name])
        state[name] = "done"
        order.append(name)

    for name in spec.variants:
        visit(name, [])
    return order


def variant_experiment(
    study: Study, name: str, init_from: str | None, teacher: str | None = None, reward_model: str | None = None
) -> Experiment:
    """The variant's fully resolved experiment (its run name carries the hash of everything else). `init_from`,
    `teacher` and `reward_model`: the runs of the variants it is `after`, whose run it distills and whose reward model
    scores its replies; before they exist, a placeholder, for the teacher its variant's base model (the same shapes,
    for plan), for the reward model the folder its run will have (plan counts it once it is there)."""
    # What the base file set, not every default: a default that gives way to the model (LoRA dropout on fused
    # experts) must stay a default in each variant.
    raw = study.base.model_dump(mode="json", exclude_unset=True)
    origin, point = study.points.get(name, (name, {}))
    # where a value the experiment refuses was given: the variant's set, or with a grid's values, the variant they made
    where = f"{study.path}: variants.{origin}" + (f" ({name})" if point else ".set")
    spec = study.spec.variants[name]
    settings = [(key, value, f"variants.{origin}.set") for key, value in spec.set.items()]
    settings += [(k, v, "grid" if k in study.spec.grid else f"variants.{origin}.grid") for k, v in point.items()]
    for key, value, given in settings:
        if key in ("output.name", "output.dir", "init_from") or (key == "distill.teacher" and spec.teacher):
            raise TunelabError(f"{study.path}: {given}.{key}: the study sets this itself")
        set_key(raw, key, value, where=f"{study.path}: {given}.{key}")
    method = raw.get("method", "sft")
    for section in METHOD_SECTIONS:  # the base's method section gives way in a variant of another method
        if section != method and section in raw and not any(k.split(".")[0] == section for k, _, _ in settings):
            del raw[section]
    if spec.after is not None:
        raw["init_from"] = init_from or f"<run of {spec.after}>"
    if spec.teacher is not None:
        teacher = teacher or variant_experiment(study, spec.teacher, None).model.id
        set_key(raw, "distill.teacher", teacher, where=f"{study.path}: variants.{origin}.teacher")
    if spec.reward_model is not None:
        if raw.get("method") != "grpo":
            raise TunelabError(
                f"{study.path}: variants.{origin}.reward_model: a reward model scores GRPO's replies; set method: grpo "
                "in this variant"
            )
        judged = variant_experiment(study, spec.reward_model, None)
        if judged.method != "reward":
            raise TunelabError(
                f"{study.path}: variants.{origin}.reward_model: variant '{spec.reward_model}' trains method "
                f"{judged.method}, not a reward model; name a variant of method: reward"
            )
        grpo = raw.setdefault("grpo", {})
        if grpo.get("reward_quantization") is not None:
            raise TunelabError(
                f"{study.path}: variants.{origin}.reward_model: variant '{spec.reward_model}' is a reward run, which "
                "scores as it trained, and grpo.reward_quantization quantizes published reward models only; remove "
                "grpo.reward_quantization from this variant"
            )
        grpo["rewards"] = [*grpo.get("rewards", []), reward_model or str(Path(judged.output.dir) / judged.run_name)]
    raw["name"] = name
    raw["output"] = {"dir": str(study.output), "name": name}
    exp = resolve_paths(validate(raw, source=where), study.path.parent)
    return exp.model_copy(update={"output": exp.output.model_copy(update={"name": f"{name}-{exp.config_hash()[:8]}"})})


def diff_from_base(study: Study, exp: Experiment) -> list[str]:
    """`key=value` for every setting that differs from the base experiment (run names aside). A section the base
    does not have shows the keys the variant sets in it (scope.partial.last_blocks=4, not every default of
    scope.partial beside it), or where it sets none (dpo, with method: dpo), the whole section."""
    out: list[str] = []
    given = exp.model_dump(mode="json", exclude_unset=True)

    def set_in(path: str) -> dict:
        section: Any = given
        for name in path.split("."):
            section = section.get(name) if isinstance(section, dict) else None
        return section if isinstance(section, dict) else {}

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a is None and isinstance(b, dict) and set_in(path):  # a section of its own: the keys set in it
            walk({k: None for k in set_in(path)}, {k: b[k] for k in set_in(path)}, path)
        elif a != b and not (b is None and isinstance(a, dict)):  # a section switched off is implied by its rival
            out.append(f"{path}={json.dumps(b)}")

    walk(study.base.model_dump(mode="json"), exp.model_dump(mode="json"), "")
    return [d for d in out if not d.startswith(("name=", "output.dir=", "output.name="))]


def plan_study(study: Study) -> list[tuple[str, Any, list[str]]]:
    from tunelab.plan import make_plan

    rows = []
    for name in study.order:
        exp = variant_experiment(study, name, init_from=None)
        if exp.init_from is not None:
            exp = exp.model_copy(update={"init_from": None})  # the plan of the scope does not need the weights
        rows.append((name, make_plan(exp), diff_from_base(study, exp)))
    return rows


def measured_apart(study: Study) -> str | None:
    """Where the study's comparison will measure every variant's eval loss on rows some variants train on (a seed or
    data ladder with data.eval_fraction holds out other rows in each): the rows (compare.eval, else the first SFT
    variant's held-out rows), checked against each variant's training rows; None where none trains on them."""
    from tunelab.compare import RunSplits
    from tunelab.data import Split, load_file

    experiments = {name: variant_experiment(study, name, init_from=None) for name in study.order}
    splits, spec = RunSplits(), study.spec.compare
    if spec.eval:
        path = str(study.path.parent / spec.eval)
        loaded = load_file(path, "compare.eval", study.base.data, "sft")
        measured, whose = Split(loaded.rows, path, loaded.origins), f"compare.eval ({path})"
    else:
        first = next((name for name, exp in experiments.items() if exp.method == "sft"), None)
        measured = splits.held_out(experiments[first]) if first else None
        whose = f"{first}'s held-out rows"
    if measured is None:
        return None
    counts = {}
    for name, exp in experiments.items():
        seen = splits.training_rows(exp).seen(measured)
        if seen.count:
            counts[name] = f"{seen.count:,} of {seen.held:,}"
    if not counts:
        return None
    listing = ", ".join(f"{name} ({said})" for name, said in counts.items())
    return (
        f"compare will measure every variant's eval loss on {whose}, and {listing} train on them (the same rows, or "
        "rows that ask the same): give every variant one data.eval file none trains on"
    )


def run_study(study: Study, log=print) -> tuple[list[VariantOutcome], Path | None]:
    from tunelab.runs import run_status
    from tunelab.train import train

    outcomes: dict[str, VariantOutcome] = {}
    for name in study.order:
        spec = study.spec.variants[name]
        broken = [needed for _, needed in spec.needs() if outcomes[needed].status in ("failed", "blocked")]
        if broken:
            outcomes[name] = VariantOutcome(
                name, "blocked", error=f"needs {broken[0]}, which {outcomes[broken[0]].status}"
            )
            log(f"[{name}] blocked: {outcomes[name].error}")
            continue
        init_from = outcomes[spec.after].run_dir if spec.after is not None else None
        teacher = outcomes[spec.teacher].run_dir if spec.teacher is not None else None
        judge = outcomes[spec.reward_model].run_dir if spec.reward_model is not None else None
        exp = variant_experiment(study, name, init_from, teacher, judge)
        run_dir = Path(exp.output.dir) / exp.run_name
        status = run_status(run_dir)
        outcome = VariantOutcome(name, "", str(run_dir), diff=diff_from_base(study, exp))
        if status == "completed":
            outcome.status = "skipped"
            log(f"[{name}] unchanged, completed run {run_dir}")
        else:
            log(f"[{name}] {'resuming' if status else 'training'} -> {run_dir}")
            try:
                train(exp, resume=status is not None, group=study.spec.name)
                outcome.status = "resumed" if status else "trained"
            except TunelabError as e:
                outcome.status, outcome.error = "failed", str(e)
            except Exception as e:  # one variant's crash must not stop the independent others
                outcome.status, outcome.error = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
            if outcome.error:
                log(f"[{name}] failed: {outcome.error}")
        outcomes[name] = outcome
    done = [o for o in outcomes.values() if o.status in ("skipped", "trained", "resumed")]
    evaluated = _evaluate_study(study, done, log)
    report = (None if evaluated else _previous_report(study, done)) or _compare_study(study, done, log)
    _write_index(study, list(outcomes.values()), report)
    return list(outcomes.values()), report


def eval_settings(study: Study) -> EvalSettings | None:
    from tunelab.lmeval import EvalSettings, documents

    spec = study.spec.eval
    if spec is None:
        return None
    include = str((study.path.parent / spec.include_path).resolve()) if spec.include_path else None
    fields = spec.model_dump(exclude={"include_path", "limit"})
    return EvalSettings(**fields, include_path=include, limit=documents(spec.limit))


def _evaluate_study(study: Study, done: list[VariantOutcome], log) -> bool:
    """Run the study's benchmarks on the runs that lack them with these settings; True if any ran."""
    from tunelab.lmeval import evaluate_runs, task_settings
    from tunelab.runs import other_checkpoints, read_lm_eval

    settings = eval_settings(study)
    if settings is None or not done:
        return False

    def has(folder: Path, task: str) -> bool:
        stored = read_lm_eval(folder).get(task)
        return stored is not None and stored["settings"] == task_settings(settings, task)

    folders = [Path(o.run_dir) for o in done]
    if study.spec.compare.checkpoints:  # the checkpoints the comparison sets beside their runs are scored too
        folders = [f for run_dir in folders for f in (run_dir, *other_checkpoints(run_dir))]
    missing = [f for f in folders if not all(has(f, t) for t in settings.tasks)]
    if not missing:
        return False
    log(f"benchmarks ({', '.join(settings.tasks)}) on {len(missing)} run(s) or checkpoint(s)")
    try:
        evaluate_runs(missing, settings, include_base=study.spec.compare.base)
    except TunelabError as e:
        log(f"benchmarks skipped: {e}")
        return False
    return True


def _previous_report(study: Study, done: list[VariantOutcome]) -> Path | None:
    """The last report, when every variant was skipped and it compared exactly these runs, as the study's compare
    section says now (a changed section, prompts or `against`, or a named file's changed contents compare again)."""
    index = study.output / "study.json"
    if not index.is_file() or any(o.status != "skipped" for o in done):
        return None
    previous = json.loads(index.read_text())
    same_runs = [v["run_dir"] for v in previous["variants"] if v["status"] in ("skipped", "trained", "resumed")]
    report = previous.get("report")
    same_comparison = previous.get("compare") == _comparison_record(study)
    if same_runs == [o.run_dir for o in done] and same_comparison and report and Path(report).is_file():
        return Path(report)
    return None


def _comparison_record(study: Study) -> dict[str, Any]:
    """The compare section, with a sha256 prefix of each file it names (prompts, eval data): a report is reused only
    while both are unchanged, so editing a prompt file in place compares again."""
    record = study.spec.compare.model_dump(mode="json")
    for key in ("prompts", "eval"):
        path = study.path.parent / record[key] if record[key] else None
        if path is not None and path.is_file():
            record[f"{key}_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return record


def _compare_study(study: Study, done: list[VariantOutcome], log) -> Path | None:
    from tunelab.compare import compare
    from tunelab.report import write_report

    if not done:
        return None
    base_dir = study.path.parent
    spec = study.spec.compare
    try:
        result = compare(
            [Path(o.run_dir) for o in done],
            include_base=spec.base,
            prompts_file=base_dir / spec.prompts if spec.prompts else None,
            eval_file=base_dir / spec.eval if spec.eval else None,
            max_new_tokens=spec.max_new_tokens,
            against=_run_named(spec.against, done, log),
            checkpoints=spec.checkpoints,
        )
    except TunelabError as e:
        log(f"comparison skipped: {e}")
        return None
    if (note := result.trained_on_note()) is not None:
        log(note)
    return write_report(result, study.output / "report")["html"]


def _run_named(against: str | None, done: list[VariantOutcome], log) -> str | None:
    """compare.against as compare names the variants: a variant by its run's name (<variant>-<hash>), base as it is;
    None (each quality's best) where that variant has no completed run to compare."""
    if against is None or against == "base":
        return against
    found = next((Path(o.run_dir).name for o in done if o.name == against), None)
    if found is None:
        log(f"compare.against: {against} did not complete; every variant is set against the best instead")
    return found


def _write_index(study: Study, outcomes: list[VariantOutcome], report: Path | None) -> None:
    from dataclasses import asdict

    from tunelab.runs import write_json

    study.output.mkdir(parents=True, exist_ok=True)
    write_json(
        study.output / "study.json",
        {
            "study": study.spec.name,
            "file": str(study.path),
            "variants": [asdict(o) for o in outcomes],
            "report": str(report) if report else None,
            "compare": _comparison_record(study),  # what the report was made with
        },
    )
