"""Damaged checkpoints, trackers and configs: a message naming the file and what to do, in the
converter and in the trainer (both in this process, through their command-line entry points)."""

import shutil

import pytest

from megatron_exact.checkpoint import RELEASE, TRACKER_FILENAME
from tools.convert_checkpoint import main as convert_main


def _copy(imported, tmp_path, name="qwen2-tied"):
    target = tmp_path / "ckpt"
    shutil.copytree(imported[name], target)
    return target


def _export(load, tmp_path, capsys):
    status = convert_main(["export-hf", "--load", str(load), "--hf-dir-out", str(tmp_path / "hf_out")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and not (tmp_path / "hf_out").exists()
    return status, err


def _trainer(load, hf_dir, data_prefix, capsys, *extra):
    """The trainer, with the architecture of the imported model (so only the damage is wrong)."""
    import torch.distributed

    from megatron_exact.platform.distributed import destroy_model_parallel
    from megatron_exact.train import main as pretrain_main

    started_here = not torch.distributed.is_initialized()  # the converter tests share one process group
    try:
        status = pretrain_main(["--hf-config", str(hf_dir), "--seq-length", "64",
                                "--train-iters", "1", "--lr", "1e-3", "--data-path", data_prefix, "--eval-iters", "0",
                                "--load", str(load), *extra])
    finally:
        if started_here:
            destroy_model_parallel()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, err


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    from megatron_exact.data.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("data")
    (root / "c.jsonl").write_text('{"text": "some text to train on for a step or two, long enough"}\n' * 40)
    preprocess(PreprocessConfig(input=str(root / "c.jsonl"), output_prefix=str(root / "c"),
                                tokenizer_type="ByteTokenizer", append_eod=True), log=lambda m: None)
    return str(root / "c_text_document")


@pytest.mark.parametrize("content", ["12abc\n", "", "-3\n"], ids=["not-a-number", "empty", "negative"])
def test_tracker_without_an_iteration(imported, hf_models, tmp_path, capsys, byte_data, content):
    load = _copy(imported, tmp_path)
    (load / TRACKER_FILENAME).write_text(content)
    status, err = _export(load, tmp_path, capsys)
    assert status == 1 and f"{load / TRACKER_FILENAME}: " in err
    assert "write the iteration of a complete checkpoint" in err
    status, err = _trainer(load, hf_models["qwen2-tied"], byte_data, capsys, "--finetune")
    assert status == 2 and f"pretrain_exact.py: error: --load {load}: {load / TRACKER_FILENAME}: " in err


def test_tracker_naming_a_missing_iteration(imported, hf_models, tmp_path, capsys, byte_data):
    load = _copy(imported, tmp_path)
    (load / TRACKER_FILENAME).write_text("40\n")
    status, err = _export(load, tmp_path, capsys)
    assert status == 1 and f"{load / TRACKER_FILENAME} names 40 but {load / 'iter_0000040'} does not exist" in err
    status, err = _trainer(load, hf_models["qwen2-tied"], byte_data, capsys)
    assert status == 2 and f"--load {load}: {load / TRACKER_FILENAME} names 40 but" in err


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_truncated_distcp_in_load(imported, hf_models, tmp_path, capsys, byte_data, damage):
    load = _copy(imported, tmp_path)
    release = load / RELEASE
    shard = sorted(release.glob("*.distcp"), key=lambda p: p.stat().st_size)[-1]
    if damage == "delete":
        shard.unlink()
    else:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 3 if damage == "truncate" else 0)
    status, err = _export(load, tmp_path, capsys)
    assert status == 1 and f"convert_checkpoint.py: error: {release}: cannot read this checkpoint" in err
    assert "damaged or incomplete (e.g. a truncated .distcp)" in err
    status, err = _trainer(load, hf_models["qwen2-tied"], byte_data, capsys, "--finetune")
    assert status == 1 and f"pretrain_exact.py: error: {release}: cannot read this checkpoint" in err


def test_invalid_json_config_is_named(hf_models, tmp_path, capsys, byte_data):
    hf_dir = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2-tied"], hf_dir)
    (hf_dir / "config.json").write_text('{"model_type": "qwen2",\n  "hidden_size": 64,,\n}')
    status = convert_main(["import-hf", "--hf-dir", str(hf_dir), "--save", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert status == 1 and f"convert_checkpoint.py: error: {hf_dir / 'config.json'}:2:21: invalid JSON" in err
    assert "Traceback" not in err and not (tmp_path / "ckpt").exists()
    from megatron_exact.train import main as pretrain_main

    assert pretrain_main(["--hf-config", str(hf_dir), "--seq-length", "64", "--train-iters", "1", "--lr", "1e-3",
                          "--data-path", byte_data]) == 2
    assert f"--hf-config: {hf_dir / 'config.json'}:2:21: invalid JSON" in capsys.readouterr().err


def test_make_vocab_size_divisible_by_zero(hf_models, tmp_path, capsys, byte_data):
    status = convert_main(["import-hf", "--hf-dir", str(hf_models["qwen2-tied"]), "--save", str(tmp_path / "ckpt"),
                           "--make-vocab-size-divisible-by", "0"])
    err = capsys.readouterr().err
    assert status == 1 and "--make-vocab-size-divisible-by must be positive, got 0" in err
    assert "Traceback" not in err and not (tmp_path / "ckpt").exists()
    from megatron_exact.train import main as pretrain_main

    assert pretrain_main(["--model", "tiny-qwen2", "--seq-length", "64", "--train-iters", "1", "--lr", "1e-3",
                          "--data-path", byte_data, "--make-vocab-size-divisible-by", "0"]) == 2
    assert "--make-vocab-size-divisible-by must be positive, got 0" in capsys.readouterr().err
