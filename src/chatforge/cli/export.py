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

    from chatforge.models.export import DEFAULT_QUANTIZE, export_model

    written = export_model(model, out, format, quantize, force)  # checks flags before loading
    gguf = format.lower() == "gguf"  # export_model accepted it: gguf or hf
    what = f"GGUF ({(quantize or DEFAULT_QUANTIZE).lower()})" if gguf else "Hugging Face directory"
    print(f"wrote {what}: {written}", file=sys.stderr)
