#!/usr/bin/env python
"""Peak memory of import-hf / export-hf on a ~1B-parameter random model (bf16), next to the model's size.

Writes a random LLaMA-3.2-1B-shaped HF directory (1.24B parameters, tied
embeddings, bf16: 2.47 GB) tensor by tensor, then runs
``tools/convert_checkpoint.py import-hf`` and ``export-hf`` as child processes
and samples their memory every 50 ms: the proportional set size (PSS) summed
over the process and its children (dist_checkpointing forks writer processes
that share the parent's pages copy-on-write; summing RSS would count those
pages once per process, PSS splits them) and, separately, the main process's
RSS. Prints the peaks, the same for a bare process that has only imported the
converter, and the ratio of the difference to the weights' size, so "peak ~
one copy of the model" can be read off directly.

  python bench/convert_memory.py [--preset llama3.2-1b] [--workdir /tmp/convert_bench] [--keep]
"""

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_exact.convert.hf_mapping import expected_hf_shapes, hf_config_dict  # noqa: E402
from megatron_exact.convert.safetensors_stream import SafetensorsWriter  # noqa: E402
from megatron_exact.model.config import get_preset  # noqa: E402


def write_random_hf_dir(arch, out: Path) -> int:
    """A random bf16 HF checkpoint of ``arch`` written one tensor at a time; returns the weight bytes."""
    import json

    shapes = expected_hf_shapes(arch)
    out.mkdir(parents=True)
    writer = SafetensorsWriter(out / "model.safetensors", [(n, s, torch.bfloat16) for n, s in shapes.items()])
    generator = torch.Generator().manual_seed(0)
    for i, (name, shape) in enumerate(shapes.items()):
        writer.write(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
        if i % 40 == 0:
            print(f"  writing random weights: {i}/{len(shapes)} tensors", flush=True)
    writer.close()
    config = hf_config_dict(arch, torch.bfloat16)
    config.update(bos_token_id=128000, eos_token_id=128001)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return writer.total_bytes


def peak_memory(command: list[str]) -> tuple[float, float, float]:
    """(peak PSS of the process tree, peak RSS of the main process, wall seconds) of running ``command``."""
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO)
    root = psutil.Process(process.pid)
    peak_pss = peak_rss = 0
    done = threading.Event()

    def sample():
        nonlocal peak_pss, peak_rss
        while not done.is_set():
            try:
                peak_rss = max(peak_rss, root.memory_info().rss)
                total = 0
                for proc in [root] + root.children(recursive=True):
                    try:
                        total += proc.memory_full_info().pss
                    except psutil.Error:  # a child that just exited
                        pass
                peak_pss = max(peak_pss, total)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
    return peak_pss, peak_rss, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--workdir", default="/tmp/convert_bench")
    parser.add_argument("--keep", action="store_true", help="keep the (multi-GB) directories afterwards")
    args = parser.parse_args()

    arch = get_preset(args.preset)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    hf_dir, ckpt, out = work / "hf", work / "ckpt", work / "hf_out"
    params = sum(torch.Size(s).numel() for s in expected_hf_shapes(arch).values())
    print(f"{args.preset}: {params / 1e9:.3f}B parameters; writing a random bf16 HF directory to {hf_dir}", flush=True)
    weight_bytes = write_random_hf_dir(arch, hf_dir)

    python = sys.executable
    tool = str(REPO / "tools" / "convert_checkpoint.py")
    bare = peak_memory([python, "-c", "import sys; sys.path.insert(0, '.'); "
                            "from megatron_exact.platform.distributed import initialize_model_parallel as f; f(1, 1, 1); "
                            "import megatron_exact.convert.importer, megatron_exact.convert.exporter"])
    runs = {
        "bare": bare,
        "import-hf": peak_memory([python, tool, "import-hf", "--hf-dir", str(hf_dir), "--save", str(ckpt)]),
        "export-hf": peak_memory([python, tool, "export-hf", "--load", str(ckpt), "--hf-dir-out", str(out), "--dtype", "bf16"]),
    }

    gib = 2**30
    print()
    print(f"weights (bf16): {weight_bytes / gib:.2f} GiB   ({params / 1e9:.3f}B parameters)")
    print("bare = a process that imported torch, Megatron-Core and the converter and started its process group")
    print(f"{'step':<10} {'tree PSS GiB':>12} {'(PSS-bare)/weights':>19} {'main RSS GiB':>13} {'(RSS-bare)/weights':>19} {'wall s':>7}")
    for step, (pss, rss, seconds) in runs.items():
        print(f"{step:<10} {pss / gib:>12.2f} {(pss - bare[0]) / weight_bytes:>19.2f} "
              f"{rss / gib:>13.2f} {(rss - bare[1]) / weight_bytes:>19.2f} {seconds:>7.1f}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
