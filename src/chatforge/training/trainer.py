"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, validation, checkpoints.

It runs unchanged in one process or several (``accelerate launch``, DDP):
every process sees the same deterministic data order (a permutation seeded by
``seed`` and the epoch) and takes its own slice of each step's rows, so the
data position is a pure function of the step and a resumed run continues
exactly where the checkpoint left off: same rows, same dropout, same losses.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chatforge.conversation.formats import get_format
from chatforge.errors import ChatforgeError
from chatforge.fsutil import atomic_write
from chatforge.threads import ThreadPolicy
from chatforge.training import checkpoint as ckpt
from chatforge.training import memory
from chatforge.training.config import TrainConfig, default_lr
from chatforge.training.data import Dataset, load_data
from chatforge.training.examples import (
    IGNORE,
    Row,
    build_examples,
    collate,
    loss_sum,
    model_inputs,
    pack,
    packing_isolates,
    to_device,
)
from chatforge.training.fast_modules import restore as restore_modules
from chatforge.training.fast_modules import speed_up
from chatforge.training.lora_fast import fuse_lora
from chatforge.training.loss import forward_loss, head_gives_logits
from chatforge.training.model import Built, build_model, save_model_dir, unwrap
from chatforge.training.packed_attention import (
    restore_attention,
    spans_match_mask,
    use_packed_attention,
)
from chatforge.training.plot import plot_losses
from chatforge.training.progress import TrainProgress, prep_progress

METRICS = "metrics.jsonl"
LOSS_PNG = "loss.png"
_OURS = (METRICS, LOSS_PNG, "train_config.json", ckpt.CKPT_DIR)
# Flags that fix the shape of the model (or what it is): a resumed run must repeat them.
# The n_* and tokenizer flags only matter for a new model (--init gpt2).
_SAME_RUN = (
    "model",
    "init",
    "lora",
    "lora_r",
    "format",
    "context",
    "valid_split",
    "packing",
    "dpo",
    "beta",
)
_SAME_NEW_MODEL = ("tokenizer", "n_layer", "n_embd", "n_head")


class TrainingInterrupted(ChatforgeError):
    """Ctrl-C: a checkpoint was written and the run can continue with ``resume``."""


class TrainingDiverged(ChatforgeError):
    """The loss (or the gradient norm) stopped being a finite number: the run was
    stopped before the optimizer step that would have written it into the weights."""


@dataclass
class TrainResult:
    """What a finished run did."""

    output: Path
    steps: int
    stopped: str  # "max_steps" | "max_time" | "epochs"
    tokens: int  # input tokens trained on (all processes)
    seconds: float  # training time of this invocation (no validation or saving)
    tokens_per_s: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) this run
    best_val_loss: float | None = None
    resumed_from: int | None = None  # step of the checkpoint this run continued from
    packed: bool = True
    precision: str = "fp32"
    model: Any = None  # the trained model (unwrapped; with LoRA, the peft model)


def train(
    cfg: TrainConfig,
    console: Any = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Run training as ``cfg`` says; the output directory becomes a model directory.

    ``on_step(step, row)`` is called after every optimizer step (tests use it).
    """
    return Trainer(cfg, console, on_step).run()


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        console: Any = None,
        on_step=None,
        datasets: tuple[Dataset, Dataset | None] | None = None,
    ) -> None:
        """``datasets``: (train, valid) conversations built in memory (the Python API's
        ``ConversationModel.fit``), read instead of ``cfg.data``/``cfg.valid`` files."""
        from rich.console import Console

        from chatforge.noise import quiet_libraries

        quiet_libraries()
        self.cfg = cfg
        self.acc = _accelerator()
        self.main = self.acc.is_main_process
        self.console = console or Console(stderr=True)
        self.on_step = on_step
        self.datasets = datasets
        self.out = Path(cfg.output).expanduser()
        self.dev = self.acc.device
        self.skipped: list[str] = []
        self.created: list[Path] = []  # folders this run made for its output, deepest first

    def say(self, msg: str) -> None:
        if self.main:
            self.console.print(msg, highlight=False)

    # -- setup -----------------------------------------------------------------

    def _check_output(self) -> None:
        out, cfg = self.out, self.cfg
        if out.exists() and not out.is_dir():
            raise ChatforgeError(f"output {out} is a file; pass a directory")
        reuse = False
        if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
            why = self._unfinished(out)
            if why is not None:
                raise ChatforgeError(f"output directory {out} {why}")
            reuse = True  # a run that stopped before its first checkpoint: nothing to lose
            self.say(
                f"reusing {out}: a previous run there stopped before writing a checkpoint "
                "or a model; starting afresh"
            )
        self.acc.wait_for_everyone()
        if (cfg.overwrite or reuse) and self.main and out.exists():
            import shutil

            for name in _OURS:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if self.main:
            missing = [p for p in (out, *out.parents) if not p.exists()]
            out.mkdir(parents=True, exist_ok=True)
            self.created = missing
        self.acc.wait_for_everyone()

    @staticmethod
    def _unfinished(out: Path) -> str | None:
        """None when ``out`` holds only what an unfinished run left before its first
        checkpoint (run record, metrics, plot, partial checkpoint folders) and may be
        reused without ``--overwrite``; else why it may not (the rest of the message)."""
        from chatforge.models.meta import ModelMeta

        names = {p.name for p in out.iterdir()}
        if not names <= set(_OURS):
            if (out / "chatforge.json").exists() and ModelMeta.read(out) is not None:
                return (
                    "holds a trained model; use --overwrite to replace it "
                    "(or --resume to continue its run)"
                )
            return "is not empty; use --resume to continue its run or --overwrite to replace it"
        found, _ = ckpt.candidates(out)
        if found is not None:
            return (
                f"holds an unfinished run (checkpoint {found.name}, no model yet); "
                "use --resume to continue it or --overwrite to start again"
            )
        return None

    def _remove_if_unused(self) -> None:
        """After a failure: remove the output folders this run made, if it wrote nothing.

        Only folders this run created are candidates, and only while they are empty
        (``train_config.json``, written at the start, does not count as output), so a
        folder that existed before, or that holds anything else, is never touched.
        """
        if not self.main or not self.created:
            return
        try:
            left = list(self.out.iterdir())
            if [p.name for p in left] == ["train_config.json"]:
                left[0].unlink()
            for d in self.created:
                d.rmdir()  # OSError when not empty: stop there
        except OSError:
            pass

    def _resume_point(self) -> Path:
        """The newest intact checkpoint, checked against this run's flags; else a clear error."""
        found, rejected = ckpt.candidates(self.out)
        where = self.out / ckpt.CKPT_DIR
        if found is None:
            if not rejected:
                afresh = "--overwrite" if any(self.out.iterdir()) else "no --resume"
                why = f"none was written (start afresh with {afresh})"
            else:
                more = f"; and {len(rejected) - 3} more" if len(rejected) > 3 else ""
                why = "; ".join(rejected[:3]) + more
            raise ChatforgeError(f"--resume: no usable checkpoint in {where}: {why}")
        for r in rejected:
            self.say(f"skipping checkpoint {r}")
        state = json.loads((found / "state.json").read_text(encoding="utf-8"))
        saved = state.get("config")
        if saved is None and (self.out / "train_config.json").is_file():
            try:  # checkpoints from before "config" was stored: the run's own record
                saved = json.loads((self.out / "train_config.json").read_text(encoding="utf-8"))
            except ValueError:
                saved = None
        if isinstance(saved, dict):
            self._check_same_run(saved, found.name)
        self._check_same_data(state.get("data"))
        return found

    def _check_same_data(self, saved: dict | None) -> None:
        """A resume must train on the data the checkpoint was trained on (by content)."""
        if not isinstance(saved, dict) or not saved.get("fingerprint"):
            return  # a checkpoint from before fingerprints were recorded
        now = self._data_record()
        if saved["fingerprint"] == now["fingerprint"]:
            return
        was, given = ", ".join(saved.get("sources") or ["?"]), ", ".join(now["sources"])
        changed = " (its content changed)" if was == given else ""
        raise ChatforgeError(
            f"cannot resume {self.out}: it was trained on {was} (fingerprint "
            f"{saved['fingerprint'][:12]}), this run gives {given} ({now['fingerprint'][:12]})"
            f"{changed}; pass the same --data or train into a new --output"
        )

    def _data_record(self) -> dict:
        """The training data as a checkpoint records it: sources and content fingerprint."""
        if getattr(self, "_data_rec", None) is None:
            from chatforge.training import prepared

            if self.datasets is not None:  # in memory: the conversations themselves
                import hashlib

                train_ds = self.datasets[0]
                convs = [[(m.role, m.content) for m in c] for c in train_ds.conversations]
                blob = json.dumps([train_ds.texts, convs])
                fp = hashlib.sha256(blob.encode()).hexdigest()
                sources = ["(in memory)"]
            else:
                fp = prepared.fingerprint(self.cfg.data, self.cfg.data_format)
                sources = [str(_where(d)) for d in self.cfg.data]
            self._data_rec = {"fingerprint": fp, "sources": sources}
        return self._data_rec

    def _config_record(self) -> dict:
        """``cfg`` as recorded (train_config.json, checkpoints): paths resolved, so a
        resume from another working directory compares the same things."""
        rec = self.cfg.to_dict()
        for key in ("model", "tokenizer", "valid"):
            rec[key] = _where(rec[key])
        rec["data"] = [_where(d) for d in rec["data"]]
        return rec

    def _check_same_run(self, saved: dict, name: str) -> None:
        now = self.cfg.to_dict()
        keys = _SAME_RUN + (_SAME_NEW_MODEL if now.get("init") else ())
        for key in keys:
            if key not in saved:
                continue
            a, b = saved[key], now[key]
            if key in ("model", "tokenizer"):
                a, b = _where(a), _where(b)
            if a != b:
                flag = "--" + key.replace("_", "-")
                raise ChatforgeError(
                    f"--resume: {flag} is {_shown(now[key])} but checkpoint {name} was trained "
                    f"with {_shown(saved[key])}; repeat the run's {flag} (or train into "
                    "a new --output)"
                )

    def _warner(self) -> Callable[[str], None]:
        """``warn(msg)`` for a malformed data line: kept in ``self.skipped`` (the end of
        the run reports them), the first five shown as they are met."""
        self.skipped = []

        def warn(msg: str) -> None:
            self.skipped.append(msg)
            if len(self.skipped) <= 5:
                self.say(f"[yellow]skipping[/] {msg}")

        return warn

    def _read(self):
        cfg = self.cfg
        warn = self._warner()
        shown = self.skipped

        if self.datasets is not None:  # built in memory: their skipped items are known
            train_ds, valid_ds = self.datasets
            for msg in train_ds.errors + (valid_ds.errors if valid_ds is not None else []):
                warn(msg)
        else:
            train_ds = load_data(cfg.data, cfg.data_format, cfg.on_error, warn)
            valid_ds = None
            if cfg.valid:
                valid_ds = load_data(cfg.valid, cfg.data_format, cfg.on_error, warn)
        if valid_ds is None and cfg.valid_split is not None:
            train_ds, valid_ds = train_ds.split_tail(cfg.valid_split)
        if shown:
            what = "item(s)" if self.datasets is not None else "line(s)"
            self.say(f"[yellow]skipped {len(shown)} malformed {what}[/] (first: {shown[0]})")
        return train_ds, valid_ds

    def _reader(self):
        """``read()``: the (train, valid) datasets, read once, when first needed."""
        got: list = []

        def read():
            if not got:
                got.append(self._read())
            return got[0]

        self._was_read = got
        return read

    def _kind(self, read) -> str:
        """The data kind (text or conversations), without reading the data if it is known."""
        if self._was_read:
            return read()[0].kind
        from chatforge.training.data import detect_kind

        kinds = {self.cfg.data_format or detect_kind(str(d)) for d in self.cfg.data}
        if "text" not in kinds:  # conversations of some kind (build_model asks no more)
            return sorted(kinds)[0]
        return "text" if kinds == {"text"} else read()[0].kind  # mixed: reading says why

    def _cache_settings(self) -> dict | None:
        """What the prepared rows depend on, before the model is known (None: no cache)."""
        cfg = self.cfg
        if self.datasets is not None:
            return None
        from chatforge.training import prepared

        return {
            "data": self._data_record()["fingerprint"],
            "valid": prepared.fingerprint([cfg.valid], cfg.data_format) if cfg.valid else None,
            "valid_split": cfg.valid_split,
            "data_format": cfg.data_format,
            "on_error": cfg.on_error,
            "train_on": cfg.train_on,
        }

    def _data(self, built: Built, read) -> tuple[list[Row], list[Row], bool]:
        """Packed training and validation rows: from the cache of prepared data when this
        data, tokenizer and settings were prepared before, else built (and cached).
        ``read()`` gives the (train, valid) datasets, read on first use."""
        from chatforge.training import prepared

        cfg = self.cfg
        isolated = False
        if cfg.packing:
            isolated = packing_isolates(
                built.model, len(built.tokenizer), uses_types=built.format_name == "sep"
            )
            if not isolated:
                self.say("[yellow]this model ignores a packed attention mask: one example per row")
        settings = self._cache_settings()
        key = None
        if settings is not None:
            key = prepared.cache_key(
                dict(
                    settings,
                    format=built.format_name,
                    tokenizer=prepared.tokenizer_identity(built.tokenizer),
                    context=built.context,
                    packed=isolated,
                )
            )
            hit = prepared.load(key)
            if hit is not None:
                rows, vrows, info = hit
                if not self._was_read:
                    self._replay_skipped(info.get("skipped", []))
                self.say(
                    info["summary"] + f"; {min(len(vrows), cfg.valid_rows)} validation rows"
                    " (prepared data from the cache)"
                )
                return rows, vrows[: cfg.valid_rows], isolated
        train_ds, valid_ds = read()
        fmt = get_format(built.format_name, built.tokenizer)
        n_items = len(train_ds) + (len(valid_ds) if valid_ds is not None else 0)
        show = self.main and self.cfg.progress
        with prep_progress(self.console, show, n_items, train_ds.kind) as tick:
            train_ex, st = build_examples(fmt, train_ds, built.context, cfg.train_on, on_item=tick)
            if not train_ex:
                why = f": {st.drop_reasons[0]}" if st.drop_reasons else ""
                raise ChatforgeError(f"no training example has a token to learn{why}")
            valid_ex = []
            if valid_ds is not None:
                valid_ex, _ = build_examples(
                    fmt, valid_ds, built.context, cfg.train_on, on_item=tick
                )
        rows = pack(train_ex, built.context, enabled=isolated)
        vrows = pack(valid_ex, built.context, enabled=isolated)
        fill = sum(map(len, rows)) / (len(rows) * built.context)
        summary = (
            f"data: {st.sources:,} {train_ds.kind} items -> {st.examples:,} examples, "
            f"{st.tokens:,} tokens ({st.loss_tokens:,} with loss); split {st.split}, "
            f"truncated {st.truncated}, dropped {st.dropped}; "
            f"{len(rows):,} rows of {built.context} ({fill:.0%} full, "
            f"{'packed' if isolated else 'one example per row'})"
        )
        if key is not None and self.main:
            prepared.save(key, rows, vrows, {"summary": summary, "skipped": self.skipped})
        vrows = vrows[: cfg.valid_rows]
        self.say(f"{summary}; {len(vrows)} validation rows")
        return rows, vrows, isolated

    def _replay_skipped(self, skipped: list[str]) -> None:
        """The malformed-line report of a run whose prepared data came from the cache."""
        self.skipped = list(skipped)
        for msg in skipped[:5]:
            self.say(f"[yellow]skipping[/] {msg}")
        if skipped:
            self.say(f"[yellow]skipped {len(skipped)} malformed line(s)[/] (first: {skipped[0]})")

    def _plan_memory(self, model: Any, context: int) -> None:
        """Chunked loss where the model allows it, gradient checkpointing, and the memory check.

        ``context``: the longest row a batch can have (at most the run's context)."""

        cfg = self.cfg
        self.head_ok = head_gives_logits(model, model.get_input_embeddings().num_embeddings)
        rows = cfg.batch_size * (2 if cfg.dpo else 1)  # DPO: a chosen and a rejected row per pair
        est = memory.estimate(model, rows, context, False, self.head_ok)
        lean = memory.estimate(model, rows, context, True, self.head_ok)
        ckpt_on = cfg.grad_checkpointing
        if ckpt_on is None:  # auto: when it saves more than a gigabyte
            saved = est.activations + est.scores - (lean.activations + lean.scores)
            ckpt_on = saved > memory.CHECKPOINT_ABOVE
        bare = unwrap(model)
        if ckpt_on and getattr(bare, "supports_gradient_checkpointing", False):
            kw = {"use_reentrant": False}
            if hasattr(bare, "activation_checkpointing_enable"):  # transformers >= 5.x
                bare.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                bare.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
            est = lean
        self.mem_estimate = est  # bench/bench_train_memory_estimate.py compares it to the peak
        avail = memory.device_available_bytes(self.dev)  # the GPU's free memory on CUDA
        if self.dev.type == "cpu" and (est.checkpointing or avail is None or 2 * est.total > avail):
            # Only where memory is tight: serving every >= 1 MB tensor with a fresh mmap
            # page-faults each activation in (1.8 M faults a step for SmolLM2 LoRA at
            # 4 x 256: 86 against 136 tok/s), a price worth paying only to keep the peak.
            memory.limit_heap_growth()
        if avail is not None and est.total > avail and not cfg.force:
            raise ChatforgeError(memory.refusal(est, avail, cfg.batch_size, context))
        self.say(
            f"memory: about {est.total / memory.GB:.1f} GB estimated"
            + (f" of {avail / memory.GB:.1f} GB available" if avail is not None else "")
            + ("; gradient checkpointing on" if est.checkpointing else "")
        )

    def _precision(self) -> str:
        if self.cfg.precision != "auto":
            return self.cfg.precision
        if self.dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        # CPU: bf16 autocast made a training step ~8x slower on our AVX-512-bf16 machine
        # (the backward kernels fall back to slow paths), so auto means fp32 there.
        return "fp32"

    def _autocast(self, precision: str):
        if precision == "bf16":
            return torch.autocast(self.dev.type, dtype=torch.bfloat16)
        return nullcontext()

    def _to_dev(self, batch: dict) -> dict:
        return to_device(batch, self.dev)

    # -- the run ---------------------------------------------------------------

    def run(self) -> TrainResult:
        self.threads: ThreadPolicy | None = None
        self.attn_before: str | None = None  # set when attention runs training/packed_attention
        self.spans = False  # and example by example (no attention dropout)
        self.swapped: list = []  # modules given faster forwards (training/fast_modules.py)
        self.stage = "setup"  # "training" once the loop runs: Ctrl-C then saves a checkpoint
        from chatforge.training.interrupt import InterruptNotice

        try:
            with InterruptNotice(self._noticed) if self.main else nullcontext():
                return self._run()
        except KeyboardInterrupt:
            self._remove_if_unused()
            if self.stage == "training":  # a second Ctrl-C while the checkpoint was written
                raise
            raise TrainingInterrupted(
                "interrupted before training started; nothing was written that a run needs "
                f"(run the same command again; {self.out} can be reused as it is)"
            ) from None
        except BaseException:
            self._remove_if_unused()  # a failed run leaves no empty output folder behind
            raise

    def _noticed(self) -> None:
        """Ctrl-C seen (from a watcher thread, at once): say so before the main thread,
        perhaps inside a long torch operation, gets to stop."""
        if getattr(self, "_said_stop", False):
            return
        self._said_stop = True
        then = "writing a checkpoint" if self.stage == "training" else "nothing to save yet"
        self.say(f"Ctrl-C: stopping ({then})")

    def _run(self) -> TrainResult:
        cfg, acc = self.cfg, self.acc
        self._check_output()
        # Before the slow parts, and before train_config.json is rewritten: a --resume
        # with nothing to resume from, or with other model flags, fails at once.
        found = self._resume_point() if cfg.resume else None
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # python, numpy, torch: weights (new model), dropout
        from chatforge.training import prepared

        if cfg.dpo:  # preference pairs: read first, so a bad file fails before a slow load
            from chatforge.training.dpo_run import PreferenceRun

            self.pref = PreferenceRun(cfg, self.say)
            pairs = self.pref.read(self._warner())
            built = build_model(cfg, "openai")
            fmt = get_format(built.format_name, built.tokenizer)
            rows, vrows = self.pref.examples(fmt, built.context, *pairs)
            packed, settings = False, None
        else:
            read = self._reader()
            settings = self._cache_settings()
            if settings is None or not prepared.seen(settings):
                read()  # first: a bad data file fails before a slow load
            built = build_model(cfg, self._kind(read))
        tok = built.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0
        if not cfg.dpo:
            rows, vrows, packed = self._data(built, read)
        if settings is not None and self.main:
            prepared.mark_seen(settings)
        world, rank = acc.num_processes, acc.process_index
        per_step = cfg.batch_size * cfg.grad_accum * world
        spe = max(1, len(rows) // per_step)  # steps per epoch
        time_only = cfg.max_time is not None and cfg.max_steps is None and cfg.epochs is None
        if cfg.max_steps:
            horizon = cfg.max_steps
        elif time_only:
            horizon = 10**9  # until the time is up; the schedule follows the clock
        else:
            horizon = max(1, math.ceil((cfg.epochs or 1.0) * spe))
        if self.main:
            (self.out / "train_config.json").write_text(json.dumps(self._config_record(), indent=2))

        model = built.model.to(self.dev)
        if cfg.lora:  # base + adapter in one autograd node per layer (training/lora_fast.py)
            fuse_lora(model)
        # Dropout masks from PCG64 and GPT-2's GELU in one op (training/fast_modules.py).
        self.swapped = speed_up(model)
        # Attention example by example instead of through the (B, 1, T, T) mask where the
        # model gives the same logits that way (training/packed_attention.py). With attention
        # dropout (GPT-2's attn_pdrop) torch's flash kernel does not apply: one masked call
        # per batch with our dropout (one call per example was 10 % slower on GPT-2).
        if not cfg.dpo:
            self.attn_before = use_packed_attention(
                model,
                lambda: spans_match_mask(model, len(tok), uses_types=built.format_name == "sep"),
            )
            self.spans = self.attn_before is not None and memory.attention_dropout(model) == 0.0
        longest = max(len(r) for r in (*rows, *vrows))  # a batch is never longer than this
        self._plan_memory(model, min(built.context, longest))
        # Threads as inference chooses them: the cores other processes leave free,
        # re-measured while it trains (a busy core made every step 6x slower).
        self.threads = ThreadPolicy(threads=cfg.threads) if self.dev.type == "cpu" else None
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
            # One fused kernel over all tensors: 158 ms against 646 ms a step for SmolLM2's
            # 135 M weights on 2 AVX2 cores (transformers' Trainer uses it too).
            fused=self.dev.type in ("cpu", "cuda")
            and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params),
        )
        state = {"step": 0, "elapsed": 0.0, "best_val_loss": None, "precision": None}
        self.state = state
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: self._lr_factor(s, horizon, time_only)
        )
        resumed_from = None
        if found is not None:
            data = ckpt.load(found, rank)
            ckpt.load_trainable(model, data["weights"])
            optimizer.load_state_dict(data["optimizer"])
            state.update(data["state"]["trainer"])
            sched.load_state_dict(data["state"]["scheduler"])
            self._new_lr(optimizer, sched, state["step"])
            if data["rng"] is not None:
                ckpt.set_rng_state(data["rng"])
            ckpt.set_host_rng_state(data["state"]["host_rng"])
            if data["state"].get("world") != world:
                self.say("[yellow]the number of processes changed: the data order differs")
            resumed_from = state["step"]
            self.say(
                f"resuming from {found.relative_to(self.out)} (step {state['step']}, "
                f"epoch {state['step'] // spe}): model, optimizer, scheduler, data position "
                "and RNG states restored"
            )
            self._trim_metrics(state["step"])
        precision = state["precision"] or self._precision()
        state["precision"] = precision
        model = acc.prepare_model(model)

        step0, t_run, tokens, sum_loss, n_loss = state["step"], 0.0, 0, 0.0, 0
        val_losses: list[tuple[int, float]] = []
        stopped = "max_steps" if cfg.max_steps else ("max_time" if time_only else "epochs")
        prog = TrainProgress(self.console, enabled=cfg.progress and self.main)
        prog.start(horizon if not time_only else None, cfg.max_time, step0)
        log_every = cfg.log_interval(None if time_only else horizon)
        last_eval = -1
        self.stage = "training"
        try:
            while state["step"] < horizon:
                if cfg.max_time is not None and self._time_up(state["elapsed"]):
                    stopped = "max_time"
                    break
                t0 = time.perf_counter()
                step = state["step"]
                epoch, k = divmod(step, spe)
                perm = self._perm(epoch, len(rows))
                idx = [perm[(k * per_step + j) % len(rows)] for j in range(per_step)]
                micro, n_in, n_tok = [], 0, 0
                for m in range(cfg.grad_accum):
                    lo = (m * world + rank) * cfg.batch_size
                    mine = [rows[i] for i in idx[lo : lo + cfg.batch_size]]
                    n_in += self._tokens(mine)  # real tokens, padding not counted
                    n_tok += self._units(mine)  # what the loss is averaged over
                    micro.append(mine)  # collated one at a time: one (B, 1, T, T) mask alive
                step_loss = 0.0
                for m, mine in enumerate(micro):
                    if self.threads is not None:
                        self.threads.apply()  # cheap; measures every half second at most
                    batch = self._to_dev(self._collate(mine))
                    sync = m == len(micro) - 1
                    with nullcontext() if sync else acc.no_sync(model):
                        with self._autocast(precision):
                            loss = self._loss_sum(model, batch) / max(1, n_tok)
                        acc.backward(loss)
                    step_loss += float(loss.detach())
                norm = acc.clip_grad_norm_(model.parameters(), cfg.clip) if cfg.clip else None
                stats = self._reduce([step_loss * n_tok, float(n_tok)])  # every rank sees a NaN
                loss_avg = stats[0] / max(1.0, stats[1])
                if not math.isfinite(loss_avg) or (
                    norm is not None and not math.isfinite(float(norm))
                ):  # before the optimizer step that would write it into the weights
                    what = "loss" if not math.isfinite(loss_avg) else "gradient norm"
                    value = loss_avg if what == "loss" else float(norm)
                    raise self._diverged(what, value, step + 1)
                optimizer.step()
                sched.step()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                state["elapsed"] = self._sync_elapsed(state["elapsed"] + dt)
                state["step"] = step + 1
                t_run += dt
                tokens += n_in * world
                sum_loss, n_loss = sum_loss + loss_avg, n_loss + 1
                row = {
                    "step": state["step"],
                    "epoch": round(state["step"] / spe, 4),
                    "loss": loss_avg,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / max(t_run, 1e-9), 1),
                    "elapsed_s": round(state["elapsed"], 2),
                }
                if cfg.dpo:  # this step's pairs: reward accuracy, margin, chosen/rejected
                    row.update(self.pref.take(self._reduce))
                prog.update(state["step"], loss_avg, row["tokens_per_s"], state["elapsed"])
                if state["step"] % log_every == 0 or state["step"] == horizon:
                    self._log(dict(row, loss=sum_loss / n_loss))
                    sum_loss, n_loss = 0.0, 0
                if self.on_step is not None:
                    self.on_step(state["step"], row)
                if vrows and cfg.eval_every and state["step"] % cfg.eval_every == 0:
                    val_losses.append(self._validate(model, vrows, precision, state))
                    last_eval = state["step"]
                if cfg.save_every and state["step"] % cfg.save_every == 0:
                    self._save(model, optimizer, sched, state, world)
        except KeyboardInterrupt:
            optimizer.zero_grad(set_to_none=True)
            prog.stop()
            self.say(
                f"interrupted at step {state['step']}: writing a checkpoint "
                "(Ctrl-C again to quit without it)"
            )
            where = self._save(model, optimizer, sched, state, world, plot=False)
            raise TrainingInterrupted(
                f"interrupted at step {state['step']}; checkpoint saved in {where}; "
                "continue with --resume"
            ) from None
        finally:
            prog.stop()
        if vrows and last_eval != state["step"]:
            val_losses.append(self._validate(model, vrows, precision, state))
        self._save(model, optimizer, sched, state, world)
        restore_attention(model, self.attn_before)  # the model leaves with its own attention
        restore_modules(self.swapped)
        self._finish(model, built, state, val_losses, packed, precision, tokens, t_run)
        return TrainResult(
            output=self.out,
            steps=state["step"],
            stopped=stopped,
            tokens=tokens,
            seconds=t_run,
            tokens_per_s=tokens / max(t_run, 1e-9),
            val_losses=val_losses,
            best_val_loss=state["best_val_loss"],
            resumed_from=resumed_from,
            packed=packed,
            precision=precision,
            model=unwrap(model),
        )

    def _diverged(self, what: str, value: float, step: int) -> TrainingDiverged:
        """The error for a loss or gradient that is no longer finite at ``step``."""
        cfg = self.cfg
        default = default_lr(cfg)
        lr = float(cfg.lr)  # type: ignore[arg-type]
        hint = f"{default:g}" if lr > default else f"{lr / 10:g}"
        found, _ = ckpt.candidates(self.out)
        kept = (
            f"the last checkpoint before it (step {int(found.name.split('-')[1])}) is kept in "
            f"{found}; continue from it with --resume --lr {hint}"
            if found is not None
            else f"no checkpoint was written before it; {self.out} can be reused as it is"
        )
        self._plot()
        return TrainingDiverged(
            f"the {what} became {value} at step {step} (--lr {lr:g} is likely too high; "
            f"try --lr {hint}); training stopped; {kept}"
        )

    def _new_lr(self, optimizer, sched, step: int) -> None:
        """A resume with another --lr: the restored schedule takes the new peak."""
        if all(math.isclose(b, self.cfg.lr) for b in sched.base_lrs):  # type: ignore[arg-type]
            return
        sched.base_lrs = [float(self.cfg.lr)] * len(sched.base_lrs)  # type: ignore[arg-type]
        for g, f in zip(optimizer.param_groups, sched.lr_lambdas, strict=True):
            g["initial_lr"] = float(self.cfg.lr)  # type: ignore[arg-type]
            g["lr"] = float(self.cfg.lr) * f(step)  # type: ignore[operator]
        self.say(f"learning rate: --lr {self.cfg.lr:g} (the checkpoint's run used another)")

    # -- pieces of the loop ----------------------------------------------------

    def _tokens(self, rows: list) -> int:
        """Real tokens in a micro-batch's rows (or pairs), padding not counted."""
        return self.pref.tokens(rows) if self.cfg.dpo else sum(map(len, rows))

    def _units(self, rows: list) -> int:
        """What the loss is averaged over: loss tokens (or, for DPO, pairs)."""
        if self.cfg.dpo:
            return self.pref.units(rows)
        return sum(t != IGNORE for r in rows for t in r.targets)

    def _collate(self, rows: list) -> dict:
        if self.cfg.dpo:
            return self.pref.collate(rows, self.pad_id)
        return collate(rows, self.pad_id, spans=self.spans)

    def _loss_sum(self, model: Any, batch: dict) -> torch.Tensor:
        """Summed loss of a batch: head + cross-entropy at loss positions only, in chunks
        (DPO: the per-pair loss summed over the batch's pairs)."""
        if self.cfg.dpo:
            return self.pref.loss_sum(model, batch, self.head_ok)
        if self.head_ok:
            return forward_loss(model, batch)
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        return loss_sum(logits, batch["targets"])

    def _lr_factor(self, step: int, horizon: int, time_only: bool) -> float:
        cfg = self.cfg
        if time_only:
            p = min(1.0, self.state["elapsed"] / (cfg.max_time * 60))  # type: ignore[operator]
            if cfg.warmup < 1:
                if p < cfg.warmup:
                    return max(p / cfg.warmup, 0.01)
                q = (p - cfg.warmup) / max(1e-9, 1 - cfg.warmup)
            else:
                if step < cfg.warmup:
                    return (step + 1) / cfg.warmup
                q = p
        else:
            w = cfg.warmup_steps(horizon)
            if step < w:
                return (step + 1) / w
            q = (step - w) / max(1, horizon - w)
        q = min(max(q, 0.0), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q))

    def _time_up(self, elapsed: float) -> bool:
        return elapsed >= self.cfg.max_time * 60  # type: ignore[operator]

    def _perm(self, epoch: int, n: int) -> list[int]:
        if getattr(self, "_perm_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache = torch.randperm(n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm_cache

    def _reduce(self, values: list[float]) -> list[float]:
        if self.acc.num_processes == 1:
            return values
        t = self.acc.reduce(torch.tensor(values, dtype=torch.float64, device=self.dev), "sum")
        return t.tolist()

    def _sync_elapsed(self, elapsed: float) -> float:
        # Ranks must agree on the time (it drives the schedule and the stop under --max-time).
        if self.acc.num_processes == 1:
            return elapsed
        from accelerate.utils import broadcast

        return float(broadcast(torch.tensor([elapsed], dtype=torch.float64, device=self.dev))[0])

    @torch.no_grad()
    def _validate(self, model: Any, vrows: list[Row], precision: str, state: dict):
        model.eval()
        total, n = 0.0, 0
        bs = self.cfg.batch_size
        for i in range(0, len(vrows), bs):
            if self.threads is not None:
                self.threads.apply()
            batch = self._to_dev(self._collate(vrows[i : i + bs]))
            with self._autocast(precision), torch.no_grad():
                total += float(self._loss_sum(model, batch))
            n += self._units(vrows[i : i + bs])
        model.train()
        val = total / max(1, n)
        step = state["step"]
        if self.cfg.dpo:  # the validation pairs' DPO numbers, not the last train step's
            extra = {f"val_{k}": v for k, v in self.pref.take(lambda x: x).items()}
            self._log({"step": step, "val_loss": val, **extra})
        else:
            self._log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        best = state["best_val_loss"]
        if best is None or val < best:
            state["best_val_loss"] = val
            if self.main:
                ckpt.begin(self.out, ckpt.BEST)
                ckpt.finish(
                    self.out,
                    ckpt.BEST,
                    ckpt.trainable_state(unwrap(model)),
                    {"step": step, "val_loss": val},
                )
        self.acc.wait_for_everyone()
        if self.cfg.dpo:
            self.say(
                f"step {step}: validation DPO loss {val:.4f}, reward accuracy "
                f"{extra['val_reward_accuracy']:.3f}, margin {extra['val_reward_margin']:.3f}"
            )
        else:
            ppl = math.exp(min(val, 50))
            self.say(f"step {step}: validation loss {val:.4f}, perplexity {ppl:.2f}")
        self._plot()
        return (step, val)

    def _save(self, model, optimizer, sched, state: dict, world: int, plot: bool = True) -> Path:
        name = ckpt.step_name(state["step"])
        if self.main:
            ckpt.begin(self.out, name)
        self.acc.wait_for_everyone()
        ckpt.write_rng(self.out / ckpt.CKPT_DIR / f".tmp-{name}", self.acc.process_index)
        self.acc.wait_for_everyone()
        if self.main:
            full = {
                "trainer": dict(state),
                "scheduler": sched.state_dict(),
                "host_rng": ckpt.host_rng_state(),
                "world": world,
                "config": self._config_record(),  # a resume checks its flags against these
                "data": self._data_record(),  # ... and its data
            }
            ckpt.finish(
                self.out,
                name,
                ckpt.trainable_state(unwrap(model)),
                full,
                optimizer.state_dict(),
            )
            ckpt.prune(self.out, self.cfg.keep_checkpoints, self.say)
            if plot:  # not on Ctrl-C: drawing (matplotlib's import) can take seconds
                self._plot()
        self.acc.wait_for_everyone()
        return self.out / ckpt.CKPT_DIR / name

    def _finish(self, model, built, state, val_losses, packed, precision, tokens, t_run):
        self.acc.wait_for_everyone()
        if not self.main:
            return
        bare = unwrap(model)
        used = "last"
        best_dir = self.out / ckpt.CKPT_DIR / ckpt.BEST
        if self.cfg.final == "best" and ckpt.verify(best_dir) is None and val_losses:
            best = ckpt.load(best_dir)
            if best["state"]["val_loss"] < val_losses[-1][1]:
                ckpt.load_trainable(bare, best["weights"])
                used = f"best (step {best['state']['step']})"
        facts = {
            "steps": state["step"],
            "weights": used,
            "best_val_loss": state["best_val_loss"],
            "packed": packed,
            "precision": precision,
        }
        bare.eval()
        save_model_dir(bare, built, self.cfg, self.out, facts)
        from chatforge.models.registry import remember_trained_model

        remember_trained_model(self.out)  # `chatforge models list` shows it
        self._plot()
        rate = tokens / max(t_run, 1e-9)
        if self.skipped:
            self.say(
                f"[yellow]note: {len(self.skipped)} malformed data line(s) were skipped[/] "
                f"(first: {self.skipped[0]}); --on-error fail stops at the first one"
            )
        self.say(
            f"done: {state['step']} steps, {rate:,.0f} tokens/s; wrote the model ({used} weights) "
            f"to {self.out}; chat with: chatforge chat --model {self.out}"
        )

    def _log(self, row: dict) -> None:
        if self.main:
            with open(self.out / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, step: int) -> None:
        # Rows logged after the checkpoint are redone by this run: drop them.
        if not self.main or not (self.out / METRICS).exists():
            return
        from chatforge.training.plot import read_metrics

        keep = [r for r in read_metrics(self.out / METRICS) if r.get("step", 0) <= step]
        atomic_write(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in keep))

    def _plot(self) -> None:
        if self.main:
            try:
                plot_losses(self.out / METRICS, self.out / LOSS_PNG, title=self.out.name)
            except Exception as e:  # a plotting problem must never stop training
                self.say(f"[yellow]could not draw {LOSS_PNG}: {e}")


def _accelerator() -> Any:
    """An Accelerator that leaves precision to us (``--precision``, ``_autocast``).

    accelerate keeps one state per process, and an Accelerator made earlier with mixed
    precision (TRL's trainers default to bf16) makes every later one wrap the model in
    its autocast: an fp32 run then trained in bf16. Such a state is dropped first (the
    process group, kept in accelerate's PartialState, stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    earlier = AcceleratorState._shared_state.get("_mixed_precision")
    if earlier is not None and str(earlier) != "no":
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def _where(ref: Any) -> Any:
    """A model/tokenizer reference as a resolved path when it is one, so ./m equals m."""
    if isinstance(ref, str) and Path(ref).expanduser().exists():
        return str(Path(ref).expanduser().resolve())
    return ref


def _shown(value: Any) -> str:
    return "not given" if value is None else str(value)
