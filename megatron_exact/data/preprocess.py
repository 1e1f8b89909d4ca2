"""Raw JSONL corpora -> Megatron indexed datasets (``.bin``/``.idx``), streaming.

The output is written with Megatron-Core's ``IndexedDatasetBuilder`` exactly as
Megatron-LM 0.16.1's ``tools/preprocess_data.py`` writes it (same dtype choice,
same sequence/document layout, empty documents kept as documents with no
sequence and no EOD), so for document-level output with the same tokenizer the
files are byte-identical. Differences on purpose:

- every ``--json-keys`` key gets its own finalized ``.bin``/``.idx`` (Megatron-LM
  only finalizes the last one);
- documents are tokenized in batches through the fast tokenizer's Rust entry point
  (same ids as Megatron-Core's per-document ``tokenize``);
- at most ``2 * workers`` chunks are in flight, so memory stays flat however large
  the corpus (``multiprocessing.Pool.imap`` would read the whole input ahead);
- bad lines stop the run with ``file:line`` (or are counted with ``skip_bad_lines``);
- outputs are written under temporary names and renamed at the very end;
- ``--split-sentences`` uses nltk Punkt with parameters learned from the start of
  the input itself (no download), so it is not byte-compatible with Megatron-LM's
  pretrained English Punkt.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_exact import atomic_io
from megatron_exact.errors import BadInputError, UserError
from megatron_exact.data.tokenizers import BatchEncoder, build_tokenizer, tokenizer_description, write_tokenizer_sidecar

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
# Megatron-LM hands Punkt at most this many characters at a time.
_SPLIT_MAX_CHARS = 1_000_000
_LINES_PER_CHUNK = 256
_PUNKT_TRAIN_CHARS = 4_000_000
UNREADABLE = "unreadable file"  # the BadInputError kind of a file that cannot be decompressed or read


@dataclass
class PreprocessConfig:
    input: str
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    json_keys: Sequence[str] = ("text",)
    split_sentences: bool = False
    keep_newlines: bool = False
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    log_interval: int = 1000
    skip_bad_lines: bool = False


@dataclass
class PreprocessSummary:
    documents: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    tokens: Dict[str, int] = field(default_factory=dict)
    empty_documents: Dict[str, int] = field(default_factory=dict)
    skipped_lines: Dict[str, int] = field(default_factory=dict)
    outputs: Dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- input files


def resolve_input_files(spec: str) -> List[str]:
    """``--input``: a file, a directory (its supported files, sorted) or a glob (sorted)."""
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(spec, name) for name in os.listdir(spec) if name.endswith(INPUT_SUFFIXES)
        )
        if not files:
            raise FileNotFoundError(f"--input {spec}: directory holds no {'/'.join(INPUT_SUFFIXES)} files")
        for path in files:
            if not os.path.isfile(path):
                raise BadInputError(f"--input {spec}: {path} is a directory, not an input file (input directories "
                                    f"are not searched recursively); move it out of {spec} or pass a glob of the files")
        return files
    if os.path.isfile(spec):
        return [spec]
    files = sorted(path for path in glob.glob(spec) if os.path.isfile(path))
    if not files:
        raise FileNotFoundError(f"--input {spec}: no such file, directory or matching glob")
    return files


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decompression_errors() -> tuple:
    errors = [OSError, EOFError, gzip.BadGzipFile]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_line_chunks(files: Sequence[str], lines_per_chunk: int = _LINES_PER_CHUNK) -> Iterator[Tuple[str, int, List[bytes]]]:
    """``(path, first line number, raw lines)`` chunks, streaming, in input order.

    A file that cannot be read or decompressed (truncated, not gzip/zstd, corrupt)
    stops the run with ``file:line`` like a malformed line (no skipping past it).
    """
    unreadable = _decompression_errors()
    for path in files:
        lineno = 0
        try:
            with _open_binary(path) as f:
                chunk: List[bytes] = []
                first = 1
                for lineno, line in enumerate(f, start=1):
                    if not chunk:
                        first = lineno
                    chunk.append(line)
                    if len(chunk) == lines_per_chunk:
                        yield path, first, chunk
                        chunk = []
                if chunk:
                    yield path, first, chunk
        except unreadable as err:
            if isinstance(err, OSError) and not isinstance(err, gzip.BadGzipFile) and err.filename:
                raise  # missing file, permission: the OS error names the path
            kind = "zstd" if path.endswith(".zst") else "gzip" if path.endswith(".gz") else "text"
            raise BadInputError(
                f"{path}:{lineno + 1}: cannot read the file past line {lineno} ({type(err).__name__}: {err}); "
                f"it is truncated or corrupt, or not {kind} data: re-create or re-download it",
                UNREADABLE,
            ) from None


# ---------------------------------------------------------------- sentence splitting


def _keep_newlines_language_vars():
    from nltk.tokenize.punkt import PunktLanguageVars

    class KeepNewlinesLanguageVars(PunktLanguageVars):
        # Stock Punkt drops the whitespace after a sentence end; letting the sentence
        # keep it (\s* inside the match) preserves newlines between sentences.
        _period_context_fmt = r"""
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # whitespace stays with the sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    return KeepNewlinesLanguageVars()


def learn_punkt_parameters(files: Sequence[str], json_keys: Sequence[str], max_chars: int = _PUNKT_TRAIN_CHARS):
    """Punkt parameters learned (unsupervised) from the first ``max_chars`` characters
    of the input's text values: no pretrained model, no download."""
    from nltk.tokenize.punkt import PunktTrainer

    texts, total = [], 0
    for _, _, lines in read_line_chunks(files):
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the main pass reports bad lines with their line numbers
            for key in json_keys:
                value = record.get(key) if isinstance(record, dict) else None
                if isinstance(value, str):
                    texts.append(value)
                    total += len(value)
            if total >= max_chars:
                break
        if total >= max_chars:
            break
    trainer = PunktTrainer()
    trainer.train("\n\n".join(texts), finalize=True)
    return trainer.get_params()


# ---------------------------------------------------------------- worker side


class _Worker:
    """Per-process state: tokenizer and splitter (built once per worker)."""

    encoder: Optional[BatchEncoder] = None
    splitter = None
    config: Optional[PreprocessConfig] = None
    eod: int = -1

    @classmethod
    def init(cls, config: PreprocessConfig, punkt_params) -> None:
        tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
        cls.encoder = BatchEncoder(tokenizer, config.tokenizer_type)
        cls.eod = int(tokenizer.eod)
        cls.config = config
        cls.splitter = None  # state from an earlier in-process run must not leak
        if config.split_sentences:
            from nltk.tokenize.punkt import PunktSentenceTokenizer

            lang_vars = _keep_newlines_language_vars() if config.keep_newlines else None
            cls.splitter = (
                PunktSentenceTokenizer(punkt_params, lang_vars=lang_vars)
                if lang_vars
                else PunktSentenceTokenizer(punkt_params)
            )

    @classmethod
    def split(cls, text: str) -> List[str]:
        if cls.splitter is None:
            return [text]
        return [s for i in range(0, len(text), _SPLIT_MAX_CHARS) for s in cls.splitter.tokenize(text[i : i + _SPLIT_MAX_CHARS])]


def _parse_line(raw: bytes, json_keys: Sequence[str]) -> Dict[str, str]:
    """The values of ``json_keys`` of one line, or BadInputError naming the problem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"invalid UTF-8 at byte {err.start}", "invalid UTF-8") from None
    if not line.strip():
        raise BadInputError("empty line (expected one JSON object per line)", "empty line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(f"malformed JSON ({err.msg} at column {err.colno})", "malformed JSON") from None
    if not isinstance(record, dict):
        raise BadInputError(f"expected a JSON object, got {type(record).__name__}", "not a JSON object")
    values = {}
    for key in json_keys:
        if key not in record:
            raise BadInputError(f"missing key {key!r} (see --json-keys)", "missing key")
        value = record[key]
        if not isinstance(value, str):
            raise BadInputError(f"value of key {key!r} is {type(value).__name__}, expected a string", "non-string value")
        if "\\ud" in line or "\\uD" in line:  # only an escape can smuggle a lone surrogate into valid JSON
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadInputError(f"value of key {key!r} holds a lone surrogate ({value[err.start]!r} at character "
                                    f"{err.start}), which is not text", "lone surrogate") from None
        values[key] = value
    return values


@dataclass
class _KeyResult:
    tokens: np.ndarray  # all token ids of the chunk's documents, concatenated
    sequence_lengths: np.ndarray  # one per sequence (document or sentence)
    sequences_per_document: np.ndarray  # 0 for a document that tokenized to nothing


@dataclass
class _ChunkResult:
    path: str
    documents: int
    input_bytes: int
    bad_lines: List[Tuple[int, str, str]]  # line number, kind, message
    keys: Dict[str, _KeyResult]


def _encode_chunk(job: Tuple[str, int, List[bytes]]) -> _ChunkResult:
    path, first_lineno, lines = job
    config = _Worker.config
    bad_lines: List[Tuple[int, str, str]] = []
    records: List[Dict[str, str]] = []
    for offset, raw in enumerate(lines):
        try:
            records.append(_parse_line(raw, config.json_keys))
        except BadInputError as err:
            bad_lines.append((first_lineno + offset, err.kind, str(err)))
            if not config.skip_bad_lines:
                break  # the run stops here; no need to encode the rest
    keys = {}
    for key in config.json_keys:
        sentences, sentence_counts = [], []
        for record in records:
            parts = _Worker.split(record[key])
            sentences.extend(parts)
            sentence_counts.append(len(parts))
        encoded = _Worker.encoder.encode(sentences)
        tokens, lengths, per_document = [], [], []
        cursor = 0
        for count in sentence_counts:
            # As Megatron-LM: sentences that tokenize to nothing are dropped, EOD goes
            # after the last non-empty one, an all-empty document gets no EOD.
            kept = [ids for ids in encoded[cursor : cursor + count] if len(ids)]
            cursor += count
            if kept and config.append_eod:
                kept[-1] = np.append(kept[-1], _Worker.eod)
            tokens.extend(kept)
            lengths.extend(len(ids) for ids in kept)
            per_document.append(len(kept))
        keys[key] = _KeyResult(
            tokens=np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, dtype=np.int64),
            sequence_lengths=np.asarray(lengths, dtype=np.int64),
            sequences_per_document=np.asarray(per_document, dtype=np.int64),
        )
    return _ChunkResult(path, len(records), sum(len(raw) for raw in lines), bad_lines, keys)


def _init_worker(config: PreprocessConfig, punkt_params) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _Worker.init(config, punkt_params)


# ---------------------------------------------------------------- main side


class _WorkerError(Exception):
    """An exception raised in a worker process, carried back with its formatted traceback."""


def _worker_loop(tasks, results, initargs, parent: int) -> None:
    # The parent handles Ctrl-C (it reaches the whole process group) and stops the workers
    # itself; SIGTERM, which is how it stops them, must simply end a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    try:
        _init_worker(*initargs)
        for number, job in iter(tasks.get, None):
            results.put((number, _encode_chunk(job), None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        import traceback

        results.put((-1, None, traceback.format_exc()))


def _end_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies (even by SIGKILL), so no orphaned
    worker is left waiting for work forever."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _WorkerPool:
    """``workers`` forked tokenizer processes fed through queues.

    Unlike ``multiprocessing.Pool`` (whose ``terminate`` can deadlock when a worker is
    killed mid-task, e.g. on Ctrl-C), stopping is plain: every worker still alive gets
    SIGTERM, then SIGKILL after a grace period, and is reaped before :meth:`close` returns.
    """

    def __init__(self, workers: int, initargs):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.tasks, self.results = context.Queue(), context.Queue()
        self.processes = [context.Process(target=_worker_loop, args=(self.tasks, self.results, initargs, os.getpid()),
                                          daemon=True)
                          for _ in range(workers)]
        for process in self.processes:
            process.start()

    def submit(self, number: int, job) -> None:
        self.tasks.put((number, job))

    def receive(self):
        """The next finished ``(number, result)``, in completion order."""
        import queue

        while True:
            try:
                number, result, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise UserError(f"a tokenizer worker process died (exit code {dead[0].exitcode}; "
                                       "out of memory?): lower --workers") from None
                continue
            if error is not None:
                raise _WorkerError(f"in a tokenizer worker process:\n{error}")
            return number, result

    def close(self, finished: bool) -> None:
        """Stop and reap the workers: after the last result they are told to exit; after an
        error or an interrupt they are terminated at once."""
        if finished:
            for _ in self.processes:
                with contextlib.suppress(Exception):
                    self.tasks.put_nowait(None)
            deadline = time.time() + 2.0
            for process in self.processes:
                process.join(max(deadline - time.time(), 0.0))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()  # a full pipe nobody reads must not block the exit
            q.close()


def _ordered_results(jobs: Iterator, workers: int, initargs) -> Iterator[_ChunkResult]:
    """Results in input order with at most ``2 * workers`` chunks in flight."""
    if workers <= 1:
        _init_worker(*initargs)
        for job in jobs:
            yield _encode_chunk(job)
        return
    pool = _WorkerPool(workers, initargs)
    finished = False
    try:
        submitted = delivered = 0
        pending = {}  # results that arrived before the ones ahead of them
        jobs = iter(jobs)
        exhausted = False
        while True:
            while not exhausted and submitted - delivered < 2 * workers:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                pool.submit(submitted, job)
                submitted += 1
            if delivered == submitted:
                finished = True
                return
            while delivered not in pending:
                number, result = pool.receive()
                pending[number] = result
            yield pending.pop(delivered)
            delivered += 1
    finally:
        pool.close(finished)


def output_prefixes(output_prefix: str, json_keys: Sequence[str], split_sentences: bool) -> Dict[str, str]:
    """``{key: "{prefix}_{key}_{document|sentence}"}``: Megatron-LM's output names."""
    level = "sentence" if split_sentences else "document"
    return {key: f"{output_prefix}_{key}_{level}" for key in json_keys}


def preprocess(config: PreprocessConfig, log=None) -> PreprocessSummary:
    """Run preprocessing; raises ``BadInputError`` (naming file and line) on bad input.

    Each output prefix is locked for the run (a second run writing it is refused),
    temporaries left by dead runs are removed first, and every output is written
    under a unique temporary name (:mod:`megatron_exact.atomic_io`) that only a
    complete run renames: an error or an interrupt leaves the previous outputs as
    they were and no temporary behind. Per prefix the old ``.idx`` goes first and
    the new one comes last (after ``.bin`` and the sidecar), so an ``.idx`` never
    describes a ``.bin`` it was not written with.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    _validate(config)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from --workers only
    files = resolve_input_files(config.input)
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = output_prefixes(config.output_prefix, config.json_keys, config.split_sentences)
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--output-prefix {config.output_prefix}: directory {out_dir} does not exist")

    summary = PreprocessSummary(
        tokens={k: 0 for k in config.json_keys}, empty_documents={k: 0 for k in config.json_keys}
    )
    with contextlib.ExitStack() as outputs:
        for prefix in prefixes.values():
            name = os.path.basename(prefix)
            outputs.enter_context(atomic_io.exclusive_lock(os.path.join(out_dir, f".{name}.lock"),
                                                           f"--output-prefix {config.output_prefix} ({prefix}.bin/.idx)"))
            stale = atomic_io.remove_stale_temporaries(out_dir, f"{name}.*")
            # Fixed names of versions before unique temporaries; ours now, under the lock.
            stale += [path for path in (prefix + ".bin.tmp", prefix + ".idx.tmp") if os.path.exists(path)]
            atomic_io.remove_temporaries([pathlib.Path(path) for path in stale])
            if stale:
                log(f"removed {len(stale)} temporary file(s) left by an interrupted run: "
                    f"{', '.join(str(path) for path in stale)}")
        idx_tmp = {key: outputs.enter_context(atomic_io.atomic_path(prefix + ".idx")) for key, prefix in prefixes.items()}
        data_files = outputs.enter_context(contextlib.ExitStack())  # renamed before the .idx files
        bin_tmp = {key: data_files.enter_context(atomic_io.atomic_path(prefix + ".bin")) for key, prefix in prefixes.items()}
        builders = {}
        try:
            for key in prefixes:
                builders[key] = IndexedDatasetBuilder(str(bin_tmp[key]), dtype=dtype)
            punkt_params = learn_punkt_parameters(files, config.json_keys) if config.split_sentences else None
            start = time.time()
            next_log = config.log_interval
            for result in _ordered_results(read_line_chunks(files), config.workers, (config, punkt_params)):
                for lineno, kind, message in result.bad_lines:
                    if not config.skip_bad_lines:
                        raise BadInputError(f"{result.path}:{lineno}: {message}", kind)
                    summary.skipped_lines[kind] = summary.skipped_lines.get(kind, 0) + 1
                for key, part in result.keys.items():
                    _add_documents(builders[key], part)
                    summary.tokens[key] += int(part.tokens.size)
                    summary.empty_documents[key] += int((part.sequences_per_document == 0).sum())
                summary.documents += result.documents
                summary.input_bytes += result.input_bytes
                if summary.documents >= next_log:
                    next_log += config.log_interval * max(1, (summary.documents - next_log) // config.log_interval + 1)
                    elapsed = max(time.time() - start, 1e-9)
                    log(
                        f"Processed {summary.documents} documents ({summary.documents / elapsed:.1f} docs/s, "
                        f"{summary.input_bytes / elapsed / 2**20:.2f} MB/s)."
                    )
            if summary.documents == 0:
                skipped = sum(summary.skipped_lines.values())
                raise BadInputError(
                    f"--input {config.input}: no documents in {len(files)} file(s) ({', '.join(files[:3])}"
                    f"{', ...' if len(files) > 3 else ''})"
                    + (f"; all {skipped} line(s) were bad and skipped: {summary.skipped_lines}" if skipped else "")
                    + "; nothing was written", "no documents")
            for key in prefixes:
                builders[key].finalize(str(idx_tmp[key]))
        finally:
            for builder in builders.values():
                builder.data_file.close()
        summary.seconds = time.time() - start
        description = tokenizer_description(config.tokenizer_type, config.tokenizer_model, tokenizer)
        for prefix in prefixes.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(prefix + ".idx")
        data_files.close()  # the new .bin files take their names
        for key, prefix in prefixes.items():
            write_tokenizer_sidecar(
                prefix,
                {
                    **description,
                    "level": "sentence" if config.split_sentences else "document",
                    "append_eod": config.append_eod,
                    "json_key": key,
                    "dtype": np.dtype(dtype).name,
                    "num_documents": summary.documents,
                    "num_tokens": summary.tokens[key],
                },
            )
            summary.outputs[key] = prefix
    # Leaving the block renamed the .idx files last, then released the locks.
    elapsed = max(summary.seconds, 1e-9)
    log(
        f"Done: {summary.documents} documents, {summary.input_bytes / 2**20:.2f} MB in {summary.seconds:.2f} s "
        f"({summary.documents / elapsed:.1f} docs/s, {summary.input_bytes / elapsed / 2**20:.2f} MB/s); "
        f"tokens {summary.tokens}."
    )
    for key, count in summary.empty_documents.items():
        if count:
            log(f"{count} document(s) of key {key!r} tokenized to nothing: kept as empty documents (no EOD), as Megatron-LM does.")
    if summary.skipped_lines:
        log(f"Skipped {sum(summary.skipped_lines.values())} bad line(s): {summary.skipped_lines}")
    return summary


def _add_documents(builder, part: _KeyResult) -> None:
    """One ``add_document`` per document, exactly the calls Megatron-LM makes."""
    token_end = np.cumsum(part.sequence_lengths)
    sequence_cursor = 0
    for count in part.sequences_per_document:
        lengths = part.sequence_lengths[sequence_cursor : sequence_cursor + count]
        begin = int(token_end[sequence_cursor - 1]) if sequence_cursor else 0
        end = int(token_end[sequence_cursor + count - 1]) if count else begin
        builder.add_document(part.tokens[begin:end], lengths.tolist())
        sequence_cursor += count


def _validate(config: PreprocessConfig) -> None:
    if config.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {config.workers}")
    if config.partitions < 1 or config.workers % config.partitions:
        raise ValueError(f"--workers ({config.workers}) must be a multiple of --partitions ({config.partitions})")
    if config.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {config.log_interval}")
    if config.keep_newlines and not config.split_sentences:
        raise ValueError("--keep-newlines only applies with --split-sentences")
    if len(set(config.json_keys)) != len(config.json_keys):
        raise ValueError(f"--json-keys lists a key twice: {list(config.json_keys)}")
