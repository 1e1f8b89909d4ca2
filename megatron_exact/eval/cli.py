"""``python -m megatron_exact.eval <suite> --model DIR [--model-b DIR] ...`` (also ``tools/evaluate.py``).

Suites: ``ruler`` (RULER-style synthetic tasks), ``probe`` (distance-resolved evidence probe),
``nolima`` (NoLiMa-style latent-association needles), ``lm-eval`` (lm-evaluation-harness tasks).
Each writes ``--output``: ``results.json`` (every sample), ``table.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_exact import atomic_io, cli
from megatron_exact.eval import report, ruler
from megatron_exact.errors import BadInputError

PROG = "megatron_exact.eval"


def _common(parser: argparse.ArgumentParser, *, lengths: bool = True) -> None:
    parser.add_argument("--model", required=True, help="HF checkpoint directory (config.json + tokenizer)")
    parser.add_argument("--model-b", default=None, help="second HF checkpoint: both side by side, deltas B - A")
    parser.add_argument("--output", required=True, help="directory for results.json, table.md and plots")
    if lengths:
        parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                            help="total context lengths in tokens (prompt + generation)")
        parser.add_argument("--allow-extrapolation", action="store_true",
                            help="allow lengths beyond the model's max_position_embeddings")
    parser.add_argument("--num-samples", type=int, default=20, help="samples per task and length (per cell)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same prompts)")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")

    r = suites.add_parser("ruler", help="RULER-style synthetic tasks (generation, string match)")
    _common(r)
    r.add_argument("--tasks", nargs="+", default=None,
                   help=f"default: {' '.join(ruler.DEFAULT_TASKS)}; known: {', '.join(ruler.TASKS)}")
    r.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget of every task (default: RULER's: niah 128, vt 30, cwe 120, fwe 50); "
                        "prompts are fitted so that prompt + budget <= length")
    r.add_argument("--spec", default=None,
                   help="task specification: write key-value retrieval and vt in its language "
                        f"(tasks {', '.join(ruler.SPEC_TASKS)})")
    r.add_argument("--haystack-file", default=None, help="your own prose (UTF-8 text) for essay-haystack NIAH")

    p = suites.add_parser("probe", help="distance-resolved evidence probe (teacher-forced, present vs ablated)")
    _common(p)
    p.add_argument("--spec", default=None, help="task specification file (default: the shipped English one)")
    p.add_argument("--length", type=int, default=None,
                   help="total length of the distance sweep (default: the largest of --lengths)")
    p.add_argument("--distances", type=int, nargs="+", default=None,
                   help="evidence distances in tokens (default: 64, 128, ... up to half of --length)")
    p.add_argument("--mirror-distance", type=int, default=None,
                   help="distance of the mirror sweep over --lengths (default: the smallest distance); "
                        "-1 skips the mirror sweep")

    n = suites.add_parser("nolima", help="NoLiMa-style latent-association needles (generation, contains)")
    _common(n)
    n.add_argument("--nolima-dir", default=None,
                   help="a local copy of the NoLiMa data (needlesets/*.json, haystack/...); default: the shipped set")
    n.add_argument("--needle-set", default=None, help="needle-set file name inside --nolima-dir/needlesets")
    n.add_argument("--haystack-file", default=None, help="haystack prose (default: NoLiMa's books, else filler)")
    n.add_argument("--depths", type=float, nargs="+", default=[0.0, 25.0, 50.0, 75.0, 100.0],
                   help="needle depths in percent of the haystack")
    n.add_argument("--batch-size", type=int, default=8)

    h = suites.add_parser("lm-eval", help="standard QA through lm-evaluation-harness (offline)")
    h.add_argument("--model", required=True, help="HF checkpoint directory")
    h.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names, e.g. mmlu arc_challenge")
    h.add_argument("--output", required=True, help="directory for results.json and table.md")
    h.add_argument("--include-path", default=None, help="directory of your own lm-eval task YAML files")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--batch-size", type=int, default=8)
    h.add_argument("--limit", type=float, default=None, help="examples per task (for a quick check)")
    h.add_argument("--device", default=None)
    h.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def _positive(values, flag: str) -> None:
    bad = [v for v in values if v <= 0]
    if bad:
        raise BadInputError(f"{flag} {' '.join(map(str, bad))}: must be positive")


def _device(args) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_text(path: Optional[str], flag: str) -> Optional[str]:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError as err:
        raise BadInputError(f"{flag} {path}: not UTF-8 text (byte {err.start})") from None
    if len(text.split()) < 50:
        raise BadInputError(f"{flag} {path}: only {len(text.split())} words; a haystack needs prose (50+ words)")
    return text


def _models(args):
    from megatron_exact.eval.backend import check_lengths, check_model_dir, load_model

    flags = [("--model", args.model)] + ([("--model-b", args.model_b)] if args.model_b else [])
    for flag, path in flags:
        check_model_dir(path, flag)
        lengths = list(getattr(args, "lengths", []) or []) + ([args.length] if getattr(args, "length", None) else [])
        if lengths:
            check_lengths(path, lengths, getattr(args, "allow_extrapolation", False))
    return [(label, load_model(path, backend=args.backend, device=_device(args), dtype=args.dtype, flag=flag))
            for label, (flag, path) in zip("AB", flags)]


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def _write_reports(args, layout_name: str, records: dict, models: dict, extra: dict, plots) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    layout = report.LAYOUTS[layout_name]
    two = "B" in records
    rows = report.table_rows(layout, records["A"], records.get("B"))
    results = {
        "suite": args.suite, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": _settings(args), "python": platform.python_version(), **extra,
        "models": {label: {"path": str(models[label]), "samples": records[label]} for label in records},
        "table": rows,
    }
    atomic_io.write_json(out / "results.json", results)
    title = f"{args.suite}: A = {models['A']}" + (f", B = {models['B']}" if two else "")
    atomic_io.write_text(out / "table.md", f"# {title}\n\n" + report.markdown_table(layout, rows, two))
    written = plots(rows, out, two)
    print(f"{PROG}: wrote {out / 'results.json'}, {out / 'table.md'}"
          + "".join(f", {p}" for p in written), flush=True)
    print(report.markdown_table(layout, rows, two), flush=True)


def _run_ruler(args) -> None:
    from megatron_exact.eval import suites
    from megatron_exact.eval.progress import Progress
    from megatron_exact.eval.spec import load_spec

    _positive(args.lengths, "--lengths")
    _positive([args.num_samples, args.batch_size], "--num-samples/--batch-size")
    if args.max_new_tokens is not None:
        _positive([args.max_new_tokens], "--max-new-tokens")
    spec = load_spec(args.spec) if args.spec else None
    haystack = _read_text(args.haystack_file, "--haystack-file")
    tasks = args.tasks or (ruler.SPEC_TASKS if spec is not None else ruler.DEFAULT_TASKS)
    ruler.check_tasks(tasks, spec=spec, haystack_text=haystack)
    records, paths = {}, {}
    for label, model in _models(args):
        samples = suites.ruler_samples(model, tasks, args.lengths, num_samples=args.num_samples, seed=args.seed,
                                       spec=spec, haystack_text=haystack, max_new_tokens=args.max_new_tokens)
        with Progress(len(samples), f"ruler {label}", enabled=not args.no_progress) as step:
            records[label] = suites.generate_and_score(model, samples, batch_size=args.batch_size, progress=step)
        paths[label] = model.path

    def plots(rows, out, two):
        task_rows = [r for r in rows if r["task"] != "average"]
        return [report.plot_scores_vs_length(task_rows, out / "ruler_scores.png", group="task", metric="score",
                                             two=two, title="RULER-style tasks", ylabel="score (%)")]

    _write_reports(args, "ruler", records, paths, {"tasks": tasks, "spec": spec.source if spec else None}, plots)


def _run_probe(args) -> None:
    from megatron_exact.eval import probe, suites
    from megatron_exact.eval.progress import Progress
    from megatron_exact.eval.spec import load_spec

    _positive(args.lengths, "--lengths")
    spec = load_spec(args.spec)
    length = args.length or max(args.lengths)
    _positive([length], "--length")
    distances = args.distances or probe.default_distances(length)
    if any(d < 0 for d in distances):
        raise BadInputError(f"--distances {' '.join(map(str, distances))}: must be >= 0")
    mirror = min(distances) if args.mirror_distance is None else args.mirror_distance
    mirror = None if mirror == -1 else mirror
    records, paths = {}, {}
    for label, model in _models(args):
        samples = suites.probe_samples(model, spec, length=length, distances=distances, mirror_distance=mirror,
                                       mirror_lengths=args.lengths, num_samples=args.num_samples, seed=args.seed)
        with Progress(len(samples), f"probe {label}", enabled=not args.no_progress) as step:
            records[label] = probe.score_samples(model, samples, progress=step)
        paths[label] = model.path

    def plots(rows, out, two):
        written = [report.plot_probe(rows, out / "probe_distance.png", sweep="distance", two=two,
                                     title=f"evidence probe at {length} tokens ({spec.name})")]
        if mirror is not None:
            written.append(report.plot_probe(rows, out / "probe_length.png", sweep="length", two=two,
                                             title=f"mirror sweep: evidence {mirror} tokens back ({spec.name})"))
        return written

    _write_reports(args, "probe", records, paths,
                   {"spec": spec.as_json(), "length": length, "distances": distances, "mirror_distance": mirror},
                   plots)


def _run_nolima(args) -> None:
    from megatron_exact.eval import nolima, suites
    from megatron_exact.eval.progress import Progress

    _positive(args.lengths, "--lengths")
    if any(not 0 <= d <= 100 for d in args.depths):
        raise BadInputError(f"--depths {' '.join(map(str, args.depths))}: must lie in [0, 100]")
    needle_set = nolima.load_needle_set(args.nolima_dir, args.needle_set)
    haystack = _read_text(args.haystack_file, "--haystack-file")
    if haystack is None:
        haystack = nolima.default_haystack(args.nolima_dir)
    records, paths = {}, {}
    for label, model in _models(args):
        samples = nolima.generate_samples(needle_set, model, haystack, lengths=args.lengths, depths=args.depths,
                                          num_samples=args.num_samples, seed=args.seed)
        with Progress(len(samples), f"nolima {label}", enabled=not args.no_progress) as step:
            records[label] = suites.generate_and_score(model, samples, batch_size=args.batch_size, progress=step)
        for record, sample in zip(records[label], samples):
            record["needle_set"] = needle_set.name
        paths[label] = model.path

    def plots(rows, out, two):
        return [report.plot_scores_vs_length(rows, out / "nolima_scores.png", group="needle_set", metric="contains",
                                             two=two, title="NoLiMa-style latent association", ylabel="contains (%)")]

    _write_reports(args, "nolima", records, paths, {"needle_set": needle_set.source}, plots)


def _run_lm_eval(args) -> None:
    from megatron_exact.eval import harness

    harness.run(args.model, args.tasks, output=Path(args.output), include_path=args.include_path,
                num_fewshot=args.num_fewshot, batch_size=args.batch_size, limit=args.limit, device=_device(args),
                dtype=args.dtype)


SUITES = {"ruler": _run_ruler, "probe": _run_probe, "nolima": _run_nolima, "lm-eval": _run_lm_eval}


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    SUITES[args.suite](args)
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    return cli.run(prog, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
