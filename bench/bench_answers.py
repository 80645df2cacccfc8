"""Right answers of a quantised setting: the figures the README gives for the default.

For each setting (``--quantize``, fp32 activations):

* **Paris**: "What is the capital of France?" answered with Paris in how many of
  ``--samples`` independent sampled runs (the default preset, seeds 0..n-1) and of 5
  greedy runs (greedy is deterministic: 5/5 or 0/5);
* **greedy = transformers**: for 5 factual prompts, is the greedy reply (32 tokens)
  token for token transformers' ``generate`` on the same weights in fp32 (the GGUF's
  weights dequantised: the reference every setting is an approximation of)?

    python bench/bench_answers.py                      # gguf and int8 on smollm2
    python bench/bench_answers.py --quantize int4 --json bench/results/answers.json

Where llama-cpp-python is installed (``make bench``), llama.cpp's sampled Paris figure on
the same file, prompt tokens and preset settings is measured beside ours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUESTION = "What is the capital of France?"
FACTUAL = [
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "How many legs does a spider have?",
]


def main() -> None:
    import torch

    from chatforge import Engine, GenerationConfig, Message, Request, load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quantize", action="append", help="settings (default: gguf, int8)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = args.quantize or ["gguf", "int8"]

    ref = load_model(args.model, dtype="fp32", quantize="none").model  # transformers, fp32
    rows = []
    for quant in settings:
        lm = load_model(args.model, dtype="fp32", quantize=quant)
        eng = Engine.from_loaded(lm)
        stops = sorted(eng.stop_token_ids)

        def ids(q: str, lm=lm) -> list[int]:
            return lm.format.encode([Message("user", q)]).input_ids

        sampled = eng.generate(
            [Request(ids(QUESTION), GenerationConfig.default(seed=s)) for s in range(args.samples)]
        )
        greedy = GenerationConfig(temperature=0, max_new_tokens=32)
        paris_greedy = eng.generate([Request(ids(QUESTION), greedy) for _ in range(5)])
        same = 0
        for q in FACTUAL:
            ours = eng.generate([Request(ids(q), greedy)])[0].token_ids
            with torch.no_grad():
                out = ref.generate(
                    torch.tensor([ids(q)]),
                    max_new_tokens=32,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=lm.tokenizer.pad_token_id or 0,
                )[0, len(ids(q)) :].tolist()
            if out and out[-1] in stops:
                out = out[:-1]
            same += ours == out
        row = {
            "quantize": lm.info.quantize,
            "paris_sampled": sum("Paris" in c.text for c in sampled),
            "samples": args.samples,
            "paris_greedy": sum("Paris" in c.text for c in paris_greedy),
            "greedy_equals_transformers": same,
            "prompts": len(FACTUAL),
            "greedy_answer": paris_greedy[0].text,
        }
        rows.append(row)
        print(json.dumps(row))
    peer = _llama_cpp_paris(args.model, ids(QUESTION), args.samples)
    if peer is not None:
        print(json.dumps(peer))
    if args.json:
        out = {"model": args.model, "results": rows, "llama_cpp": peer}
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def _llama_cpp_paris(model: str, prompt: list[int], samples: int) -> dict | None:
    """The sampled Paris figure of llama.cpp on the same GGUF file, same prompt tokens and
    the default preset's settings (seeds 0..n-1); None without llama-cpp-python or a file."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from chatforge.generation.config import DEFAULT_PRESET, PRESETS
    from chatforge.models.registry import resolve_alias

    alias = resolve_alias(model)
    path = alias[0] if alias else Path(model)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    p = PRESETS[DEFAULT_PRESET]
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    hits = 0
    for seed in range(samples):
        out = llm.create_completion(
            prompt,
            max_tokens=64,
            temperature=p["temperature"],
            top_p=p.get("top_p", 1.0),
            min_p=p.get("min_p", 0.0),
            repeat_penalty=p.get("repetition_penalty", 1.0),
            top_k=0,  # off, as in the preset
            seed=seed,
        )
        hits += "Paris" in out["choices"][0]["text"]
    return {"engine": "llama.cpp", "paris_sampled": hits, "samples": samples}


if __name__ == "__main__":
    main()
