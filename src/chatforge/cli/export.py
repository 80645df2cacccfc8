"""``chatforge export``: a model as a GGUF file (llama.cpp) or a plain HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A bundled name (smollm2), a model or LoRA adapter directory, or a .gguf file."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--output", "-o", help="The .gguf file or directory to write.")
    ],
    format: Annotated[
        str, typer.Option("--format", "-f", help="gguf (llama.cpp) or hf (vLLM, TGI).")
    ] = "gguf",
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize", "-q", help="GGUF weights: f16, q8_0 or q4_0 (gguf only). \\[default: f16]"
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Export a model for other runtimes: one GGUF file that llama.cpp (ollama, LM Studio)
    loads, with the tokenizer and chat template, or a transformers directory (safetensors)
    that vLLM and TGI load unchanged. A LoRA adapter is exported merged into its base."""
    import sys

    from chatforge.models.export import ExportConfig, export_model

    cfg = ExportConfig(model, out, format, quantize, force)  # flag errors before loading
    written = export_model(cfg.ref, cfg.out, cfg.format, quantize, cfg.force)
    what = f"GGUF ({cfg.quantize})" if cfg.format == "gguf" else "Hugging Face directory"
    print(f"wrote {what}: {written}", file=sys.stderr)
