"""Study files: what arms may differ in, ablation grids, the plan (flags, dependencies, seeds), the
emitted command lines and SLURM array jobs, and errors that name the setting."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from megatron_exact.study.config import StudyConfigError, load_study_config, study_config_from_dict
from megatron_exact.study.runner import StudyData, plan, write_launch_scripts
from megatron_exact.training.arguments import build_parser
from tests.launch import REPO

BASE = yaml.safe_load((REPO / "examples" / "study" / "cpu_study.yaml").read_text())


def config(**changes):
    raw = copy.deepcopy(BASE)
    raw["output"] = "/tmp/study-test"
    raw.update(changes)
    return study_config_from_dict(raw, "study.yaml")


def parsed(run):
    return vars(build_parser().parse_args(run.launch_flags()))


def test_shipped_studies_parse():
    for name in ("cpu_study.yaml", "quickstart.yaml"):
        study = load_study_config(str(REPO / "examples" / "study" / name))
        assert "uniform" in study.arms and "exact" in study.arms


def test_ruler_tasks_default_to_the_probe_lengths_and_can_be_turned_off():
    evaluation = config().evaluation
    assert evaluation.ruler_tasks is None  # every task the corpus's specification expresses
    assert evaluation.ruler_lengths == evaluation.probe_lengths  # the trained and an extrapolated length
    chosen = config(evaluation={"probe": {"distances": [16]},
                                "ruler": {"tasks": ["niah_multikey_2"], "lengths": [256], "samples": 3}}).evaluation
    assert (chosen.ruler_tasks, chosen.ruler_lengths, chosen.ruler_samples) == (["niah_multikey_2"], [256], 3)
    assert config(evaluation={"probe": {"distances": [16]}, "ruler": None}).evaluation.ruler_tasks == []


def test_arms_of_a_seed_differ_only_in_loss_options():
    study = config(ablations={"base": "exact", "grid": {"alpha": [0.15, 0.5], "document_masking": [True, False]}})
    data = StudyData(["/data/corpus_text_document"], vocab_size=165)
    runs = plan(study, data)
    names = [r.name for r in runs]
    assert names[:1] == ["seed1/short"] and len(runs) == 3 * (1 + 5)
    assert set(study.arms) == {"uniform", "exact", "exact-alpha0.5", "exact-maskingoff", "exact-alpha0.5-maskingoff"}
    for seed in (1, 2, 3):
        arms = {r.arm: parsed(r) for r in runs if r.seed == seed and r.arm}
        short = next(r for r in runs if r.seed == seed and r.arm is None)
        for arm, args in arms.items():
            assert args["seed"] == seed and args["load"] == short.save and args["finetune"]
            assert args["vocab_size"] == 165 and args["seq_length"] == 512
            differing = {k for k in args if args[k] != arms["uniform"][k]}
            allowed = {"loss_weighting", "exact_alpha", "document_masking", "save", "metrics_file"}
            assert differing <= allowed, (arm, differing)
        assert arms["exact-alpha0.5-maskingoff"]["exact_alpha"] == 0.5
        assert not arms["exact-alpha0.5-maskingoff"]["document_masking"] and arms["exact"]["document_masking"]
        assert vars(build_parser().parse_args(short.launch_flags()))["seq_length"] == 128


def test_start_checkpoint_instead_of_a_short_stage():
    raw = {k: v for k, v in BASE.items() if k != "short_stage"}
    study = study_config_from_dict(dict(raw, start_checkpoint="/ckpt/qwen", output="/tmp/s"), "study.yaml")
    runs = plan(study, StudyData(["/d"]))
    assert all(r.arm for r in runs) and {parsed(r)["load"] for r in runs} == {"/ckpt/qwen"}
    assert sorted({parsed(r)["seed"] for r in runs}) == [1, 2, 3]  # a seed varies the data order


@pytest.mark.parametrize("change, message", [
    ({"arms": {"uniform": {}, "exact": {"lr": 0.1}}}, "arms.exact sets --lr, which is not a loss option"),
    ({"arms": ["exact"]}, "must name 'uniform'"),
    ({"cpt": {"seq-length": 512, "train-iters": 10, "lr": 1e-3, "lr-warmup": 3}}, "unknown trainer flag.*--lr-warmup"),
    ({"cpt": {"seq-length": 512, "train-iters": 10, "lr": 1e-3, "exact-alpha": 0.3}}, "loss options belong to the arms"),
    ({"cpt": {"seq-length": 512, "lr": 1e-3}}, "cpt needs train-iters"),
    ({"start_checkpoint": "/x"}, "exactly one of 'short_stage'"),
    ({"cpt": {"seq-length": 512, "train-iters": 10, "lr": 1e-3, "save": "/x"}}, "--save is set by the study"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"evaluation": {"probe": {"lengths": [512], "distances": [600]}}}, r"distance\(s\) \[600\] do not fit"),
    ({"evaluation": {"probe": {"distances": [16]}, "ruler": {"tasks": ["cwe"]}}},
     r"evaluation.ruler.tasks: \['cwe'\] cannot be written in a task specification"),
    ({"evaluation": {"probe": {"distances": [16]}, "ruler": {"depth": 3}}}, r"evaluation.ruler: unknown setting"),
    ({"ablations": {"grid": {"alpha": [0.3], "lr": [1]}}}, "ablations.grid.lr is not a loss option"),
    ({"data_arms": {"long": {"length_edges": [0, 256], "upsample": [1]}}}, "1 upsample factor"),
    ({"launch": {"mode": "k8s"}}, "launch.mode must be one of"),
    ({"colour": 1}, "unknown top-level setting"),
])
def test_bad_study_files_name_the_setting(change, message):
    with pytest.raises(StudyConfigError, match=message):
        config(**change)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seeds: [1, 2\n")
    with pytest.raises(StudyConfigError, match="broken.yaml: not valid YAML"):
        load_study_config(str(path))


def test_command_lines_and_slurm_array_jobs(tmp_path):
    study = config(output=str(tmp_path), launch={"mode": "slurm", "nproc_per_node": 8, "slurm": {"partition": "gpu"}})
    runs = plan(study, StudyData(["/data/c_text_document"]))
    paths = write_launch_scripts(runs, study)
    commands = open(paths["commands"]).read()
    assert commands.count("torchrun --nproc-per-node=8") == 9
    # Dependency order: a seed's short stage comes before its arms.
    assert commands.index("seed1/short/checkpoints --metrics-file") < commands.index("--load " + runs[0].save)
    short, cpt = open(paths["short"]).read(), open(paths["cpt"]).read()
    assert "#SBATCH --array=0-2" in short and "#SBATCH --array=0-5" in cpt and "#SBATCH --partition=gpu" in cpt
    assert "--dependency=afterok:$short" in open(paths["submit"]).read()
    # Every emitted trainer command parses with the trainer's own parser.
    for line in commands.splitlines():
        if line.startswith("torchrun"):
            flags = line.split(" tools/pretrain_exact.py ")[1].split(" 2>&1")[0].split()
            build_parser().parse_args(flags)
    assert os.access(paths["commands"], os.X_OK)
