"""The study configuration (YAML): data, model, stages, arms, seeds, launcher, evaluation.

A study is the paper's CPT protocol as a set of runs::

    for each seed s:
        short stage  (or the given start_checkpoint)     --seed s
        for each arm a:  CPT from that checkpoint         --seed s, loss options of a

Arms differ **only** in loss options (the flags in :data:`LOSS_FLAGS`); a
*data arm* may also change the data mixture (a length-bucketed blend of the
same corpus). Everything else is shared, so for a given seed every loss arm
reads the identical batches (the metrics files' ``batch_sha1`` proves it).

Trainer flags are written as a mapping ``flag-name: value`` (Megatron-LM's
names without the dashes; ``true`` for a switch, a list for a multi-value
flag). See ``examples/study/*.yaml`` for complete files.
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_exact.errors import UserError
from megatron_exact.synthetic.language import LanguageConfig


class StudyConfigError(UserError, ValueError):
    """A study file that cannot work; the message names the file and the setting."""


# The trainer flags an arm may set: the per-token weighting and document masking.
LOSS_FLAGS = ("loss-weighting", "exact-alpha", "exact-gamma", "exact-eps", "exact-tau", "exact-scope",
              "exact-normalization", "no-document-masking")
# Flags the study sets itself for every run.
STUDY_FLAGS = ("seed", "save", "load", "finetune", "metrics-file", "data-path", "tensorboard-dir")
# Short names in ablation grids.
ABLATION_ALIASES = {"alpha": "exact-alpha", "gamma": "exact-gamma", "tau": "exact-tau", "eps": "exact-eps",
                    "scope": "exact-scope", "normalization": "exact-normalization",
                    "document_masking": "document-masking"}
TOP_LEVEL = ("name", "output", "seeds", "data", "model", "short_stage", "start_checkpoint", "cpt", "arms",
             "ablations", "data_arms", "launch", "evaluation", "on_change")
LAUNCH_MODES = ("local", "commands", "slurm")


@dataclass
class DataArm:
    name: str
    loss: Dict[str, Any]
    length_edges: List[int]
    upsample: List[float]


@dataclass
class Launch:
    mode: str = "local"
    nproc_per_node: int = 2
    torchrun_args: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)
    slurm: Dict[str, Any] = field(default_factory=dict)  # #SBATCH options for the emitted array jobs


@dataclass
class Evaluation:
    probe_lengths: List[int]
    probe_distances: List[int]
    probe_samples: int = 256
    probe_seed: int = 0
    export_dtype: Optional[str] = None
    # RULER-style tasks in the corpus's own language (those its task specification expresses; none: off),
    # greedy generation at each length (default: the probe's lengths, trained and extrapolated).
    ruler_tasks: Optional[List[str]] = None
    ruler_lengths: List[int] = field(default_factory=list)
    ruler_samples: int = 50
    ruler_seed: int = 0
    ruler_max_new_tokens: int = 4


@dataclass
class StudyConfig:
    name: str
    output: str
    seeds: List[int]
    model: Dict[str, Any]
    cpt: Dict[str, Any]
    arms: Dict[str, Dict[str, Any]]  # name -> loss flags (uniform is always one of them)
    data_arms: List[DataArm]
    launch: Launch
    evaluation: Optional[Evaluation]
    short_stage: Optional[Dict[str, Any]] = None
    start_checkpoint: Optional[str] = None
    data_path: Optional[List[str]] = None  # an existing corpus ...
    synthetic: Optional[LanguageConfig] = None  # ... or the synthetic language
    synthetic_documents: int = 0
    on_change: str = "refuse"  # a recorded run of other settings: "refuse" (say so and stop) or "rebuild"
    source: str = "<dict>"

    @property
    def arm_names(self) -> List[str]:
        return list(self.arms) + [arm.name for arm in self.data_arms]


def _fail(source: str, message: str) -> StudyConfigError:
    return StudyConfigError(f"{source}: {message}")


def _flags(value, source: str, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, f"{where} must be a mapping of trainer flags (flag-name: value), got {type(value).__name__}")
    flags = {}
    for key, item in value.items():
        name = str(key).lstrip("-").replace("_", "-")
        if name in STUDY_FLAGS:
            raise _fail(source, f"{where}: --{name} is set by the study for every run (remove it)")
        flags[name] = item
    return flags


def _check_trainer_flags(flags: Dict[str, Any], source: str, where: str) -> None:
    """Every flag name must be one the trainer knows (a typo would otherwise be an error at launch)."""
    from megatron_exact.training.arguments import build_parser

    known = {option.lstrip("-") for action in build_parser()._actions for option in action.option_strings}
    unknown = sorted(name for name in flags if name not in known)
    if unknown:
        raise _fail(source, f"{where}: unknown trainer flag(s) {', '.join('--' + n for n in unknown)} "
                            "(see tools/pretrain_exact.py --help)")


def _loss_flags(value, source: str, where: str) -> Dict[str, Any]:
    flags = _flags(value, source, where)
    for name in flags:
        if name not in LOSS_FLAGS:
            raise _fail(source, f"{where} sets --{name}, which is not a loss option: arms differ only in "
                                f"{', '.join('--' + f for f in LOSS_FLAGS)}; shared flags go under 'cpt'")
    return flags


def _trainer_default(flag: str):
    from megatron_exact.training.arguments import build_parser

    return build_parser().get_default(flag.replace("-", "_"))


def _ablation_arms(value, base_arms: Dict[str, Dict[str, Any]], source: str) -> Dict[str, Dict[str, Any]]:
    """``ablations: {base: exact, grid: {alpha: [0.15, 0.5], scope: [step, microbatch]}}`` -> one arm per
    combination, named ``exact-alpha0.5-scopemicrobatch`` (settings equal to the base's are omitted)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or "grid" not in value:
        raise _fail(source, "ablations must be a mapping with 'grid' (setting: [values]) and optionally 'base'")
    base_name = value.get("base", "exact")
    if base_name not in base_arms:
        raise _fail(source, f"ablations.base {base_name!r} is not an arm (arms: {', '.join(base_arms)})")
    grid = value["grid"]
    if not isinstance(grid, dict) or not grid:
        raise _fail(source, "ablations.grid must map settings to lists of values")
    names, choices = [], []
    for key, options in grid.items():
        flag = ABLATION_ALIASES.get(key, str(key).replace("_", "-"))
        if flag not in LOSS_FLAGS and flag != "document-masking":
            raise _fail(source, f"ablations.grid.{key} is not a loss option "
                                f"(known: {', '.join(sorted(ABLATION_ALIASES))} or {', '.join(LOSS_FLAGS)})")
        if not isinstance(options, list) or not options:
            raise _fail(source, f"ablations.grid.{key} must be a non-empty list")
        names.append((key, flag))
        choices.append(options)
    arms = {}
    base = base_arms[base_name]
    for combination in itertools.product(*choices):
        flags = dict(base)
        label = []
        for (key, flag), option in zip(names, combination):
            if flag == "document-masking":
                if not isinstance(option, bool):
                    raise _fail(source, f"ablations.grid.{key} takes true/false, got {option!r}")
                flags.pop("no-document-masking", None)
                if not option:
                    flags["no-document-masking"] = True
                if option != ("no-document-masking" not in base):
                    label.append(f"masking{'on' if option else 'off'}")
                continue
            if base.get(flag, _trainer_default(flag)) != option:
                flags[flag] = option
                label.append(f"{key}{option}")
        name = "-".join([base_name, *label]) if label else None
        if name is not None and name not in base_arms:
            arms[name] = flags
    return arms


def load_study_config(path: str) -> StudyConfig:
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise StudyConfigError(f"{path}: not valid YAML ({err})") from None
    return study_config_from_dict(raw, source=path)


def study_config_from_dict(raw: dict, source: str = "<dict>") -> StudyConfig:
    raw = copy.deepcopy(raw)
    if not isinstance(raw, dict):
        raise _fail(source, "the study file must be a mapping")
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise _fail(source, f"unknown top-level setting(s) {unknown}; known: {', '.join(TOP_LEVEL)}")
    for required in ("seeds", "data", "model", "cpt", "arms"):
        if required not in raw:
            raise _fail(source, f"missing '{required}'")
    seeds = raw["seeds"]
    if isinstance(seeds, int):
        seeds = list(range(1, seeds + 1))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise _fail(source, f"seeds must be a positive count or a list of distinct integers, got {raw['seeds']!r}")

    def resolve(path):  # relative paths are relative to the working directory, as for the trainer's flags
        return os.path.abspath(path)

    data = raw["data"]
    synthetic, documents, data_path = None, 0, None
    if not isinstance(data, dict) or (("synthetic" in data) == ("data_path" in data)):
        raise _fail(source, "data needs exactly one of 'synthetic' (settings of the synthetic language) "
                            "or 'data_path' (a preprocessed corpus prefix)")
    if "synthetic" in data:
        settings = dict(data["synthetic"] or {})
        documents = int(settings.pop("documents", 4000))
        try:
            synthetic = LanguageConfig.from_dict(settings, where=f"{source}: data.synthetic")
        except (TypeError, ValueError) as err:
            raise _fail(source, f"data.synthetic: {err}") from None
    else:
        data_path = data["data_path"]
        data_path = [data_path] if isinstance(data_path, str) else list(data_path)
        if len(data_path) != 1:
            raise _fail(source, "data.data_path takes one corpus prefix (data arms build blends of it)")
        data_path = [resolve(data_path[0])]

    model = _flags(raw["model"], source, "model")
    cpt = _flags(raw["cpt"], source, "cpt")
    short = _flags(raw.get("short_stage"), source, "short_stage") if raw.get("short_stage") is not None else None
    start = raw.get("start_checkpoint")
    if (short is None) == (start is None):
        raise _fail(source, "give exactly one of 'short_stage' (trainer flags of the short-context stage) "
                            "or 'start_checkpoint' (a checkpoint to continue from, e.g. an imported HF model)")
    for where, flags in (("model", model), ("cpt", cpt), ("short_stage", short or {})):
        _check_trainer_flags(flags, source, where)
        overlap = sorted(set(flags) & set(LOSS_FLAGS) - {"no-document-masking"}) if where == "cpt" else []
        if overlap:
            raise _fail(source, f"cpt sets {', '.join('--' + f for f in overlap)}: loss options belong to the arms")
    for required in ("seq-length", "train-iters", "lr"):
        if required not in cpt:
            raise _fail(source, f"cpt needs {required}")
        if short is not None and required not in short:
            raise _fail(source, f"short_stage needs {required}")

    arms_raw = raw["arms"]
    if isinstance(arms_raw, list):
        arms_raw = {name: {"loss-weighting": name} for name in arms_raw}
    if not isinstance(arms_raw, dict) or "uniform" not in arms_raw:
        raise _fail(source, "arms must name 'uniform' (the baseline every difference is taken against) and "
                            "the arms to compare, e.g. [uniform, exact]")
    arms = {}
    for name, flags in arms_raw.items():
        flags = _loss_flags(flags if flags is not None else {"loss-weighting": name}, source, f"arms.{name}")
        flags.setdefault("loss-weighting", "uniform" if name == "uniform" else "exact")
        arms[str(name)] = flags
    if arms["uniform"].get("loss-weighting") != "uniform":
        raise _fail(source, "arms.uniform must have loss-weighting uniform")
    arms.update(_ablation_arms(raw.get("ablations"), arms, source))

    data_arms = []
    for name, spec in (raw.get("data_arms") or {}).items():
        if name in arms:
            raise _fail(source, f"data_arms.{name}: the name is already a loss arm")
        if not isinstance(spec, dict) or "length_edges" not in spec or "upsample" not in spec:
            raise _fail(source, f"data_arms.{name} needs length_edges (token edges of the document-length "
                                "buckets) and upsample (one factor per bucket)")
        edges = [int(e) for e in spec["length_edges"]]
        if edges and edges[0] != 0:
            edges = [0, *edges]
        upsample = [float(f) for f in spec["upsample"]]
        if len(upsample) != len(edges):
            raise _fail(source, f"data_arms.{name}: {len(upsample)} upsample factor(s) for {len(edges)} length "
                                f"bucket(s) (edges {edges}; the last bucket is open-ended)")
        loss = _loss_flags(spec.get("loss", {"loss-weighting": "uniform"}), source, f"data_arms.{name}.loss")
        loss.setdefault("loss-weighting", "uniform")
        data_arms.append(DataArm(str(name), loss, edges, upsample))

    launch_raw = dict(raw.get("launch") or {})
    launch = Launch(
        mode=launch_raw.pop("mode", "local"),
        nproc_per_node=int(launch_raw.pop("nproc_per_node", 2)),
        torchrun_args=[str(a) for a in launch_raw.pop("torchrun_args", [])],
        env={str(k): str(v) for k, v in (launch_raw.pop("env", None) or {}).items()},
        slurm=dict(launch_raw.pop("slurm", None) or {}),
    )
    if launch_raw:
        raise _fail(source, f"launch: unknown setting(s) {sorted(launch_raw)}")
    if launch.mode not in LAUNCH_MODES:
        raise _fail(source, f"launch.mode must be one of {LAUNCH_MODES}, got {launch.mode!r}")

    evaluation = None
    if raw.get("evaluation") is not None:
        ev = dict(raw["evaluation"])
        probe = dict(ev.pop("probe", None) or {})
        lengths = [int(x) for x in probe.pop("lengths", [cpt["seq-length"]])]
        distances = [int(x) for x in probe.pop("distances", [])]
        if not distances:
            raise _fail(source, "evaluation.probe.distances: give the fact-to-question distances to probe")
        for length in lengths:
            # The synthetic language's prompt: filler, KEY k v, <distance filler words>, QUERY k, the answer.
            too_far = [d for d in distances if d > length - 6]
            if too_far:
                raise _fail(source, f"evaluation.probe: distance(s) {too_far} do not fit a prompt of {length} "
                                    f"tokens (at most {length - 6})")
        evaluation = Evaluation(lengths, distances, int(probe.pop("samples", 256)), int(probe.pop("seed", 0)),
                                ev.pop("export_dtype", None))
        ruler = ev.pop("ruler", {})
        if ruler is not None:  # ruler: null turns the tasks off
            ruler = dict(ruler)
            tasks = ruler.pop("tasks", None)
            evaluation.ruler_tasks = None if tasks is None else [str(t) for t in tasks]
            evaluation.ruler_lengths = [int(x) for x in ruler.pop("lengths", lengths)]
            for name in ("samples", "seed", "max_new_tokens"):
                setattr(evaluation, f"ruler_{name}", int(ruler.pop(name, getattr(evaluation, f"ruler_{name}"))))
            from megatron_exact.eval.ruler import SPEC_TASKS

            unknown = sorted(set(evaluation.ruler_tasks or []) - set(SPEC_TASKS))
            if unknown:
                raise _fail(source, f"evaluation.ruler.tasks: {unknown} cannot be written in a task specification's "
                                    f"language (choose from {SPEC_TASKS})")
            if ruler:
                raise _fail(source, f"evaluation.ruler: unknown setting(s) {sorted(ruler)}")
        else:
            evaluation.ruler_tasks = []
        if probe or ev:
            raise _fail(source, f"evaluation: unknown setting(s) {sorted(probe) + sorted(ev)}")
        if synthetic is None:
            raise _fail(source, "evaluation.probe needs the synthetic corpus's task specification; with "
                                "data.data_path evaluate the exported models with python -m megatron_exact.eval")

    on_change = raw.get("on_change", "refuse")
    if on_change not in ("refuse", "rebuild"):
        raise _fail(source, f"on_change must be 'refuse' or 'rebuild', got {on_change!r}")
    return StudyConfig(
        on_change=on_change, name=str(raw.get("name", "study")),
        output=resolve(str(raw.get("output", "runs/study"))),
        seeds=seeds, model=model, cpt=cpt, arms=arms, data_arms=data_arms, launch=launch,
        evaluation=evaluation, short_stage=short, start_checkpoint=resolve(start) if start else None,
        data_path=data_path, synthetic=synthetic, synthetic_documents=documents, source=source,
    )
