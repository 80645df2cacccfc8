"""Compare models and generation settings side by side over one file of prompts.

:func:`compare_grid` runs every prompt through every *cell* of a grid: each model
(``-m``) under each combination of the ``--grid`` values (their cartesian product, a
*column* of the grid), ``samples`` times, and writes one row per (prompt, model,
setting, sample). One process does it all: models on one base (the base itself, LoRA
adapters of it, named models made from it) share that base, loaded once, with each
adapter applied per request (:meth:`~chatforge.generation.engine.Engine.add_adapter`),
and every cell's requests go through the base's engine together, batched as
``generate`` batches records (:class:`~chatforge.batch.local.LocalRun`). With
``api_base`` the models are names on an endpoint and the requests go there
(:class:`~chatforge.batch.remote.RemoteRun`).

A cell's settings, each over the one before: the preset (a ``preset`` grid value,
else a named model's preset, else the default), the named model's own settings, the
seed, ``params`` (``--set``: every cell), then the cell's grid values. With a seed
(default 0), sample ``j`` of every cell uses ``seed + j``, so the same prompt under two
settings draws from the same seed and a rerun reproduces the grid.

Rows are appended crash-safely by :class:`~chatforge.batch.output.RowWriter`; a rerun
skips the cells already in the output. A row's resume key holds a digest of what
decides its reply (the prompt's fields, the system prompt, the cell's settings), so
adding a model or a grid value runs only the new cells, and a cell whose settings
changed runs again. A rerun with another template, system prompt, prompt format or
endpoint is refused unless ``force_resume``, as ``generate``'s is. The HTML report
and the terminal table (:mod:`~chatforge.batch.compare_report`) show the cells of
this call only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.batch.compare_report import setting_label
from chatforge.batch.jobs import (
    BatchSummary,
    Job,
    ProgressBar,
    ProgressFn,
    RowsRun,
    records_opener,
    resolved_params,
)
from chatforge.batch.local import LocalRun
from chatforge.batch.output import RowWriter, check_output
from chatforge.batch.records import Record
from chatforge.batch.remote import DEFAULT_CONCURRENCY, RemoteRun
from chatforge.batch.settings import fingerprint, model_key
from chatforge.batch.template import PromptTemplate
from chatforge.conversation import Message
from chatforge.errors import ChatforgeError, InputError, ParamError
from chatforge.generation.config import DEFAULT_PRESET, PRESETS, GenerationConfig

DEFAULT_BATCH_SIZE = 16
"""Sequences a base's engine decodes together when no ``batch_size`` is given."""

DEFAULT_SEED = 0
"""The seed a grid uses when none is given: sample ``j`` of every cell uses ``seed + j``."""

# Grid values are separated by commas; "\," is a comma inside a value (a stop string).
_VALUE_SEP = re.compile(r"(?<!\\),")


# -- the grid ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # hashed by identity: one per column of this grid
class Column:
    """One setting of the grid: a value for each ``--grid`` key (none without a grid)."""

    values: dict[str, Any]  # grid key -> its value as JSON holds it ({} = own settings)

    @property
    def label(self) -> str:
        """``temperature=0.3 top_p=0.9``; ``default`` for a grid without keys."""
        return setting_label(self.values)


def _parse_value(flag: str, key: str, value: Any) -> Any:
    """A grid or --set value as GenerationConfig takes it, as JSON holds it (text is
    parsed as the chat's ``/set`` parses it: ``off`` turns a setting off)."""
    if key == "preset":
        name = str(value).strip().lower()
        if name not in PRESETS:
            raise InputError(
                f"{flag} preset: unknown preset {value!r}; choose one of: {', '.join(PRESETS)}"
            )
        return name
    if key not in GenerationConfig.param_names():
        valid = ", ".join(("preset", *GenerationConfig.param_names()))
        raise InputError(f"{flag}: unknown setting {key!r}; valid names: {valid}")
    try:
        if isinstance(value, str):
            config = GenerationConfig().set_param(key, value)
        else:
            config = GenerationConfig().replace(**{key: value})
    except ParamError as e:
        raise InputError(e.render(f"{flag} {key}")) from None
    return config.to_dict()[key]


def _items(flag: str, spec: Mapping[str, Any] | Sequence[str] | None) -> list[tuple[str, Any]]:
    """``(key, value)`` pairs of ``--grid``/``--set``: from ``NAME=VALUE`` text or a mapping."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        return [(str(k), v) for k, v in spec.items()]
    if isinstance(spec, str):
        spec = [spec]
    out = []
    for item in spec:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} takes NAME=VALUE, e.g. temperature=0.3 (got {item!r})")
        out.append((key, value))
    return out


def _key(text: str) -> str:
    return text.strip().lower().replace("-", "_")


def expand_grid(grid: Mapping[str, Any] | Sequence[str] | None) -> list[Column]:
    """The columns of a grid: the cartesian product of its values, in the order given.

    ``grid`` is ``["temperature=0.3,0.9", "top_p=0.9,1.0"]`` (``--grid``: values split at
    commas, ``\\,`` for a comma in a value; a key given twice adds values) or a mapping
    ``{"temperature": [0.3, 0.9]}``. Keys are GenerationConfig fields or ``preset``. A bad
    key or value is an :class:`~chatforge.errors.InputError` naming ``--grid`` and the key.
    No grid is one column of the models' own settings.
    """
    axes: dict[str, list[Any]] = {}
    for raw_key, raw in _items("--grid", grid):
        key = _key(raw_key)
        if isinstance(raw, str):
            texts = [t.replace("\\,", ",") for t in _VALUE_SEP.split(raw)]
            if any(not t.strip() for t in texts) and key != "stop":
                raise InputError(f"--grid {key}: an empty value in {raw!r}")
            values = [_parse_value("--grid", key, t) for t in texts]
        elif isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
            values = [_parse_value("--grid", key, v) for v in raw]
        else:
            values = [_parse_value("--grid", key, raw)]
        if not values:
            raise InputError(f"--grid {key}: no values")
        axis = axes.setdefault(key, [])
        axis += [v for v in values if v not in axis]
    keys = list(axes)
    combos = itertools.product(*axes.values())
    return [Column(dict(zip(keys, combo, strict=True))) for combo in combos]


def parse_params(params: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """``--set`` values (``["repetition_penalty=1.1"]`` or a mapping) as GenerationConfig
    values; a bad one is an InputError naming ``--set`` and the key."""
    out: dict[str, Any] = {}
    for raw_key, raw in _items("--set", params):
        key = _key(raw_key)
        if key == "preset":
            raise InputError("--set preset: give a preset to every cell with --grid preset=NAME")
        out[key] = _parse_value("--set", key, raw)
    return out


# -- the models ----------------------------------------------------------------------


@dataclass
class GridModel:
    """One ``-m`` value: what its cells run on, and the settings it starts from."""

    name: str  # as given (the rows' "model")
    base: str  # the loaded model it runs on: models with the same base share one load
    load: Callable[[], Any] | None = None  # loads the base (None: an endpoint's model)
    adapter: Path | None = None  # a LoRA adapter applied per request on the base
    system: str | None = None  # a named model's system prompt
    preset: str | None = None  # a named model's preset
    params: dict[str, Any] = field(default_factory=dict)  # a named model's settings


def _base_key(ref: str) -> str:
    """One key per base however a model names it (a path made absolute, an alias
    lower-cased)."""
    from chatforge.models.registry import ALIASES

    if ref.lower() in ALIASES:
        return ref.lower()
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def resolve_models(
    refs: Sequence[str],
    dtype: str = "auto",
    quantize: str | None = "auto",
    prompt_format: str | None = None,
    remote: bool = False,
    device: str = "auto",
) -> list[GridModel]:
    """The grid's models, checked without loading weights: named models (their base,
    adapter, system prompt and settings), LoRA adapter directories (their base) and
    plain references. An adapter that cannot be applied per request (saved modules, a
    resized vocabulary) loads merged, as a model of its own. ``remote``: the
    references are an endpoint's model names, taken as they are."""
    from chatforge.models import load_model
    from chatforge.models.adapter_files import AdapterError, check_adapter_files
    from chatforge.models.recipes import load_recipe_model, resolve_named

    def per_request(ref: str, directory: Path, need_base: bool) -> Any:
        """The adapter's files (checked), or None when it cannot be applied per request
        on its base (the same test loading the directory alone makes)."""
        from chatforge.models.fast.lora import per_row_problem

        try:
            files = check_adapter_files(directory, need_base=need_base)
        except AdapterError as e:
            raise InputError(f"-m {ref}: {e}") from None
        return files if per_row_problem(files.config, files.shapes) is None else None

    if not refs:
        raise ParamError("model", "needs at least one model to compare")
    names = [model_key(r) for r in refs]
    dup = next((r for r, k in zip(refs, names, strict=True) if names.count(k) > 1), None)
    if dup is not None:
        raise ParamError("model", f"{dup!r} is given twice")
    if remote:
        return [GridModel(ref, base=ref) for ref in refs]

    def loader(ref: str) -> Callable[[], Any]:
        return lambda: load_model(
            ref, dtype=dtype, quantize=quantize, format=prompt_format, device=device
        )

    out: list[GridModel] = []
    for ref in refs:
        recipe = resolve_named(ref)
        if recipe is not None:
            own = {"system": recipe.system, "preset": recipe.preset, "params": dict(recipe.params)}
            adapter = Path(recipe.adapter) if recipe.adapter else None
            if adapter is not None and per_request(ref, adapter, need_base=False) is None:
                merged = lambda r=recipe: load_recipe_model(  # noqa: E731
                    r, dtype=dtype, quantize=quantize, format=prompt_format, device=device
                )
                out.append(GridModel(ref, f"{ref} (merged)", merged, **own))
            else:
                out.append(
                    GridModel(ref, _base_key(recipe.base), loader(recipe.base), adapter, **own)
                )
            continue
        path = Path(ref).expanduser()
        if (path / "adapter_config.json").is_file():
            files = per_request(ref, path, need_base=True)
            if files is not None:
                base = str(files.base)
                out.append(GridModel(ref, _base_key(base), loader(base), path.resolve()))
                continue
        out.append(GridModel(ref, _base_key(ref), loader(ref)))
    return out


def cell_config(
    model: GridModel,
    column: Column,
    params: Mapping[str, Any],
    seed: int | None,
    remote: bool = False,
) -> GenerationConfig:
    """The settings of one cell: the preset (the column's, else the model's, else the
    default), the model's own settings, the seed, ``params``, then the column's values.
    ``remote``: the default preset contributes what every endpoint takes
    (:func:`~chatforge.openai_api.remote_config`)."""
    from chatforge.openai_api import remote_config

    values = dict(column.values)
    preset = values.pop("preset", None) or model.preset
    over = {**model.params, **({"seed": seed} if seed is not None else {}), **params, **values}
    try:
        if remote:
            config = remote_config(preset, **over)
        else:
            config = GenerationConfig.from_preset(preset or DEFAULT_PRESET, **over)
        # from_preset ignores None overrides; "off" (e.g. max_new_tokens=off) means None
        off = {k: v for k, v in over.items() if v is None}
        return config.replace(**off) if off else config
    except InputError as e:  # each value was valid alone, not together
        raise InputError(f"--grid/--set: the cell {model.name} {column.label}: {e}") from None


# -- the run -------------------------------------------------------------------------


@dataclass
class Cell(Record):
    """One row to make: a prompt (the record) in one cell of the grid, one sample."""

    model: GridModel | None = None
    column: Column | None = None
    sample: int = 0
    config: GenerationConfig | None = None  # the cell's settings (sample 0's seed)
    system: str | None = None  # the system prompt it is sent with
    template: str | None = None  # the template's text (part of the digest)

    @property
    def prompt_key(self) -> str:
        return Record.key.fget(self)  # type: ignore[attr-defined]

    @property
    def label(self) -> str:
        """``prompt|model|setting|sample``: the row's ``id``."""
        assert self.model is not None and self.column is not None
        return f"{self.prompt_key}|{self.model.name}|{self.column.label}|{self.sample}"

    @property
    def key(self) -> str:  # type: ignore[override]
        """The resume key: the label and a digest of what decides the reply, so a cell
        whose prompt, system prompt or settings changed is not taken for done."""
        assert self.config is not None and self.model is not None
        decided = {
            "fields": self.fields,
            "template": self.template,
            "system": self.system,
            "params": self.config.for_sample(self.sample).to_dict(),
            "adapter": str(self.model.adapter) if self.model.adapter else None,
        }
        text = json.dumps(decided, sort_keys=True, default=str, ensure_ascii=False)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        return f"{self.label}|{digest}"

    @property
    def legacy_key(self) -> str:
        return self.key


@dataclass
class CompareSummary(BatchSummary):
    """What :func:`compare_grid` did; ``str()`` is the summary line the CLI prints."""

    cells: int = 0  # models x columns
    prompts: int = 0
    loads: int = 0  # models loaded (one per base with cells to run)
    load_seconds: float = 0.0  # time spent loading them
    wall_seconds: float = 0.0  # the whole call, loads included
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # this call's cells
    columns: list[tuple[str, Column]] = field(default_factory=list, repr=False)
    report: Path | None = None  # the HTML report written

    def __str__(self) -> str:
        loads = f", {self.loads} model load{'s' if self.loads != 1 else ''}" if self.loads else ""
        return (
            f"{self.cells} cells x {self.prompts} prompts = {self.total} rows: {self.done} done, "
            f"{self.errors} errors, {self.skipped} skipped (already in output) in "
            f"{self.wall_seconds:.1f} s{loads}, {self.tokens_per_second:.0f} tok/s"
        )


class _GridRows:
    """What a grid run changes in a run over records (mixed into :class:`LocalRun` and
    :class:`RemoteRun`): each job is one :class:`Cell`, sent with its cell's system
    prompt and settings, written as a grid row."""

    def _plan(self, job: Job) -> tuple[list[Message], GenerationConfig, list[int]]:
        cell = job.record
        assert isinstance(cell, Cell) and cell.config is not None and job.prompt is not None
        messages = [Message("user", job.prompt)]
        if cell.system:
            messages.insert(0, Message("system", cell.system))
        return messages, cell.config, [cell.sample]

    def _row(self, job: Job) -> dict[str, Any]:
        cell = job.record
        assert isinstance(cell, Cell) and cell.config is not None
        assert cell.model is not None and cell.column is not None
        config = cell.config.for_sample(cell.sample)
        row: dict[str, Any] = {
            "id": cell.label,
            "prompt_id": cell.id,
            "prompt": job.prompt,
            "model": cell.model.name,
            "setting": cell.column.values,
            "sample": cell.sample,
            "seed": config.seed,
            "system": cell.system,
        }
        if job.error is not None:
            row.update(text=None, finish_reason=None, error=job.error)
        else:
            c = job.completions[0]
            row.update(
                text=c.text,
                prompt_tokens=c.prompt_tokens,
                completion_tokens=c.completion_tokens,
                tok_s=_rate(c),
                seconds=round(c.seconds, 4),
                finish_reason=c.finish_reason,
                error=None,
            )
        row["params"] = resolved_params(config)
        row["key"] = cell.key
        row["settings"] = self.settings  # type: ignore[attr-defined]
        return row


def _rate(c: Any) -> float | None:
    """A reply's tokens/s as it was decoded (batched with the others): from its first
    token to its end, so time spent queued or in the prefill does not count (a remote
    reply, which has no first-token time: over its whole request)."""
    first = getattr(c, "first_token_seconds", None)
    if first is not None and c.completion_tokens > 1 and c.seconds > first:
        return round((c.completion_tokens - 1) / (c.seconds - first), 2)
    return round(c.completion_tokens / c.seconds, 2) if c.seconds > 0 else None


class _LocalGrid(_GridRows, LocalRun):
    """The cells of one base, through its engine."""

    adapters: dict[str, str]  # GridModel.name -> the adapter's name in the engine

    def _prepare(self, record: Record) -> Job:
        job = super()._prepare(record)
        assert isinstance(record, Cell) and record.model is not None
        adapter = self.adapters.get(record.model.name)
        if adapter is not None:
            job.requests = [dataclasses.replace(r, adapter=adapter) for r in job.requests]
        return job


class _RemoteGrid(_GridRows, RemoteRun):
    """The cells, sent to the endpoint: each to its model there."""

    def calls(self, job: Job) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
        cell = job.record
        assert isinstance(cell, Cell) and cell.model is not None
        return [(cell.model.name, m, p) for _, m, p in super().calls(job)]


def compare_grid(
    models: Sequence[str],
    prompts: str | Path | Sequence[str | Mapping[str, Any]],
    output: str | Path,
    grid: Mapping[str, Any] | Sequence[str] | None = None,
    params: Mapping[str, Any] | Sequence[str] | None = None,
    samples: int = 1,
    seed: int | None = DEFAULT_SEED,
    template: str | PromptTemplate | None = None,
    system: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fail_fast: bool = False,
    progress: bool | ProgressFn = True,
    dtype: str = "auto",
    quantize: str | None = "auto",
    threads: int | None = None,
    prompt_format: str | None = None,
    device: str = "auto",
    force_resume: bool = False,
    api_base: str | None = None,
    api_key: str | None = None,
    key_source: str | None = None,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    timeout: float = 600.0,
    report: bool | str | Path = True,
) -> CompareSummary:
    """Run every prompt through every cell (model x setting) of a grid, ``samples``
    times, appending one row per (prompt, model, setting, sample) to ``output``.

    Args:
        models: model references (as ``generate`` takes them; named models and LoRA
            adapter directories share their base, loaded once), or with ``api_base``
            the endpoint's model names.
        prompts: a ``.txt`` / ``.jsonl`` / ``.csv`` file, or Python records.
        output: a ``.jsonl`` file; cells already in it are skipped (resume).
        grid: ``["temperature=0.3,0.9", "preset=precise,creative"]`` or a mapping of
            lists; the columns are the cartesian product (:func:`expand_grid`).
        params: settings for every cell (``--set``), over each model's own.
        samples: samples per cell; sample ``j`` uses ``seed + j``.
        seed: the grid's seed (``None``: a fresh draw per request, not reproducible).
        template, system: as :func:`~chatforge.batch.generate_batch`'s; ``system``
            replaces named models' own system prompts (``""`` drops them).
        batch_size: sequences a base's engine decodes together (all its cells' requests).
        report: write the HTML report beside ``output`` (``True``: same stem, ``.html``),
            to this path, or not (``False``).
        device: where local models run (``auto``: a CUDA GPU when present, else the CPU).
        The rest are ``generate_batch``'s and ``generate_batch_remote``'s.

    Returns:
        A :class:`CompareSummary`, with this call's rows in grid order.

    >>> compare_grid(["smollm2", "pirate"], "prompts.txt", "grid.jsonl",   # doctest: +SKIP
    ...              grid=["temperature=0.3,0.9"], samples=2)
    """
    t_start = time.perf_counter()
    for name, value, low in (("samples", samples, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ParamError(name, f"must be an integer >= {low} (got {value!r})")
    remote = api_base is not None
    columns = expand_grid(grid)
    fixed = parse_params(params)
    if seed is not None:
        GenerationConfig(seed=seed)  # in range
    tmpl = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    open_records = records_opener(prompts)
    out_path = check_output(output)
    if out_path.suffix.lower() != ".jsonl":
        raise ChatforgeError(f"compare writes JSONL rows: name the output *.jsonl (got {output})")
    _check_compare_rows(out_path)
    report_path = _report_path(out_path, report)
    if not remote:
        from chatforge.models import parse_dtype
        from chatforge.models.loading import parse_quantize

        parse_dtype(dtype)
        quantize = parse_quantize(quantize)
    entries = resolve_models(models, dtype, quantize, prompt_format, remote=remote, device=device)
    # Every cell's settings, checked now: before a model loads or a request is sent.
    configs = {
        (m.name, c): cell_config(m, c, fixed, seed, remote=remote) for m in entries for c in columns
    }
    if remote:
        from chatforge.openai_api import request_params

        for config in configs.values():
            request_params(config)  # a setting no request can carry fails before any is sent
    system_of = {m.name: (m.system if system is None else (system or None)) for m in entries}
    settings = {
        "model": None,  # rows of many models: the row's "model" says which
        "api_base": api_base.rstrip("/") if api_base else None,
        "template": tmpl.text,
        "system": system,  # None: each model's own; "": none for any
        "format": prompt_format,
        "n": None,
    }

    def cells(base: str | None) -> Iterator[Cell]:
        """The rows of the models on ``base`` (all models: None), prompt by prompt, so a
        prompt's cells run together (they share its prefix in the cache)."""
        for rec in open_records():
            for m in entries:
                if base is not None and m.base != base:
                    continue
                for c in columns:
                    for j in range(samples):
                        yield Cell(
                            **{f.name: getattr(rec, f.name) for f in dataclasses.fields(Record)},
                            model=m,
                            column=c,
                            sample=j,
                            config=configs[(m.name, c)],
                            system=system_of[m.name],
                            template=tmpl.text,
                        )

    summary = CompareSummary(output=out_path, cells=len(entries) * len(columns))
    summary.columns = [(m.name, c) for m in entries for c in columns]
    with RowWriter(out_path, fingerprint(settings, {}), force_resume) as writer:
        order: dict[str, int] = {}
        prompt_ids: set[str] = set()
        todo = 0
        for cell in cells(None):
            order[cell.key] = len(order)
            prompt_ids.add(cell.prompt_key)
            todo += not writer.existing.has(cell.key, cell.key)
        summary.total, summary.prompts = len(order), len(prompt_ids)
        summary.torn_bytes = writer.existing.torn_bytes
        # The runs' own config is unused: each cell carries its settings (_GridRows._plan).
        unused = GenerationConfig.default()
        with contextlib.ExitStack() as stack:
            on_progress = progress or None
            if progress is True:
                on_progress = stack.enter_context(ProgressBar(todo, writer.path.name)).update
            if remote:
                from chatforge.openai_api import openai_client

                info = {"name": None, "ref": None, "api_base": api_base}  # each cell names its own
                run = _RemoteGrid(writer, tmpl, system, unused, 1, fail_fast, info, settings)
                run.client = openai_client(api_base, api_key, timeout=timeout)
                run.api_base, run.concurrency = api_base, max_concurrency
                run.key_source = key_source if api_key else None
                _run_part(run, cells(None), on_progress, summary)
            else:
                for base in dict.fromkeys(m.base for m in entries):
                    on_base = [m for m in entries if m.base == base]
                    if all(writer.existing.has(c.key, c.key) for c in cells(base)):
                        summary.skipped += sum(1 for _ in cells(base))
                        continue
                    t0 = time.perf_counter()
                    loaded = _load_base(on_base, threads)
                    summary.loads += 1
                    summary.load_seconds += time.perf_counter() - t0
                    run = _LocalGrid(
                        loaded, writer, tmpl, system, unused, 1, batch_size, fail_fast, settings
                    )
                    run.adapters = _add_adapters(run.engine, on_base)
                    try:
                        _run_part(run, cells(base), on_progress, summary)
                    finally:
                        _remove_adapters(run.engine, run.adapters)
                    del loaded, run  # one base in memory at a time
    summary.rows = _current_rows(out_path, order)
    if report_path is not None:
        from chatforge.batch.compare_report import write_report

        write_report(report_path, summary.rows, summary.columns)
        summary.report = report_path
    summary.wall_seconds = time.perf_counter() - t_start
    return summary


def _report_path(output: Path, report: bool | str | Path) -> Path | None:
    if report is False:
        return None
    path = output.with_suffix(".html") if report is True else Path(report).expanduser()
    if path.suffix.lower() not in (".html", ".htm"):
        raise ParamError("report", f"must name an .html file (got {report})")
    if not path.parent.exists():
        raise ParamError("report", f"{path}: directory {path.parent} does not exist")
    return path


def _load_base(on_base: list[GridModel], threads: int | None) -> Any:
    """Load a base (once for all its models) with its engine's threads set."""
    from chatforge.generation.engine import Engine, EngineConfig

    assert on_base[0].load is not None
    loaded = on_base[0].load()
    if threads is not None:  # before anything makes the model's engine
        Engine.shared(loaded, EngineConfig(threads=threads))
    return loaded


def _add_adapters(engine: Any, on_base: list[GridModel]) -> dict[str, str]:
    """Load each model's adapter into the base's engine; model name -> adapter name."""
    names: dict[str, str] = {}
    for i, m in enumerate(on_base):
        if m.adapter is not None:
            names[m.name] = engine.add_adapter(m.adapter, f"compare-{i}-{m.adapter.name}")
    return names


def _remove_adapters(engine: Any, names: dict[str, str]) -> None:
    """Leave the (shared) engine as it was, whatever happened to the run."""
    for name in names.values():
        try:
            engine.remove_adapter(name)
        except ChatforgeError:  # still in use after an interruption: the engine goes too
            pass


def _run_part(
    run: RowsRun, cells: Iterator[Cell], on_progress: Any, summary: CompareSummary
) -> None:
    """Run cells through ``run`` and add what it did to ``summary``."""
    run.on_progress = on_progress
    try:
        run.run(cells)
    finally:
        part = run.summary
        for name in ("done", "errors", "skipped", "prompt_tokens", "completion_tokens"):
            setattr(summary, name, getattr(summary, name) + getattr(part, name))
        for name in ("seconds", "context_full", "slid"):
            setattr(summary, name, getattr(summary, name) + getattr(part, name))
        summary.context_length = part.context_length or summary.context_length
        for kind, count in part.error_kinds.items():
            summary.error_kinds[kind] = summary.error_kinds.get(kind, 0) + count
        room = 5 - len(summary.error_messages)
        summary.error_messages += part.error_messages[: max(room, 0)]


def _current_rows(path: Path, order: Mapping[str, int]) -> list[dict[str, Any]]:
    """The rows of this call's cells in ``path``, in grid order (the last row of a key
    wins: a rerun with --force-resume may have added one)."""
    found: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("key") in order:
                found[row["key"]] = row
    return [found[k] for k in sorted(found, key=order.__getitem__)]


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_SEED",
    "Column",
    "CompareSummary",
    "GridModel",
    "cell_config",
    "compare_grid",
    "expand_grid",
    "parse_params",
    "resolve_models",
]


def _check_compare_rows(path: Path) -> None:
    """Refuse, naming the command, an output whose rows another command wrote (a
    ``generate`` output has no ``setting``/``key``): its settings would be compared field
    by field and the message would not say what is wrong. A torn or unreadable first
    line is left to the row writer, which repairs or reports it."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        row = json.loads(first) if first is not None else None
    except (OSError, ValueError):
        return
    if isinstance(row, dict) and not ("setting" in row and "key" in row):
        raise ChatforgeError(
            f"{path} holds rows that `chatforge generate` (not compare) wrote; compare "
            "writes its own rows: use another --output"
        )
