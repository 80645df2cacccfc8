"""Peak memory of a loaded model: chatforge's default setting against transformers alone.

Each measurement runs in a fresh process (peak RSS only ever grows) and reports
``ru_maxrss`` after loading the model and generating a few tokens greedily:

* ``chatforge``: ``load_model(ref, dtype, quantize)`` + one greedy reply through
  the model's engine, run twice: the first load may build the engine's decoder from
  transformers' weights and save it (once per model and setting; reported apart), the
  second reads it as every later load does;
* ``transformers``: ``AutoModelForCausalLM.from_pretrained`` (fp32; of the GGUF
  file itself for a GGUF model) + a short ``generate``, on the same prompt.

We report both peaks and their ratio (ours / transformers').

    python bench/bench_memory.py                       # smollm2, fp32 + int8
    python bench/bench_memory.py --dtype fp32 --quantize none
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROMPT = "What is the capital of France?"

# Both children print one JSON line: {"peak_mb": ..., "tokens": [...]}.
CHATFORGE_CHILD = """
import json, resource, sys
from chatforge import Engine, GenerationConfig, Message, Request, load_model
ref, dtype, quantize, n, prompt = sys.argv[1:6]
lm = load_model(ref, dtype=dtype, quantize=quantize)
ids = lm.format.encode([Message("user", prompt)]).input_ids
out = Engine.shared(lm).generate(
    [Request(ids, GenerationConfig(temperature=0, max_new_tokens=int(n)))]
)[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
held = getattr(lm, "holds_transformers", True)  # True: code from before the release
print(json.dumps({"peak_mb": peak, "tokens": out.token_ids, "engine": lm.info.engine,
                  "setting": [lm.info.dtype, lm.info.quantize], "holds_transformers": held}))
"""

TRANSFORMERS_CHILD = """
import json, resource, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, n, prompt, gguf = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(path)
if gguf:  # a GGUF model: transformers reads the file itself (dequantised, fp32)
    gguf = __import__("pathlib").Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
else:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
ids = ids["input_ids"] if not isinstance(ids, list) else ids
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=int(n), do_sample=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak, "tokens": out[0, len(ids):].tolist()}))
"""


def run_child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is the JSON result."""
    p = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )
    if p.returncode != 0:
        raise RuntimeError(f"child failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(ref: str, dtype: str, quantize: str, new_tokens: int = 16) -> dict:
    """Peak RSS (MB) of chatforge's load + reply and of transformers' load + generate."""
    from chatforge.models.gguf import weights_source
    from chatforge.models.loading import resolve

    directory = resolve(ref)[0]  # converts a GGUF alias once, outside the measurement
    gguf = weights_source(directory)  # where a GGUF model's weights are (None: directory)
    # The first load of a setting may build the engine's decoder from transformers'
    # weights and save it (packed.py): a one-time step, like the conversion above, whose
    # peak is reported apart; every later load reads the saved decoder.
    first = run_child(CHATFORGE_CHILD, ref, dtype, quantize, str(new_tokens), PROMPT)
    ours = run_child(CHATFORGE_CHILD, ref, dtype, quantize, str(new_tokens), PROMPT)
    hf = run_child(TRANSFORMERS_CHILD, str(directory), str(new_tokens), PROMPT, str(gguf or ""))
    return {
        "model": ref,
        "chatforge": ours,
        "chatforge_first_load": first,
        "transformers": hf,
        "ratio": ours["peak_mb"] / hf["peak_mb"],
        "first_load_ratio": first["peak_mb"] / hf["peak_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    r = measure(args.model, args.dtype, args.quantize, args.new_tokens)
    ours, hf = r["chatforge"], r["transformers"]
    print(
        f"{args.model}: chatforge {'/'.join(ours['setting'])} peak {ours['peak_mb']:.0f} MB "
        f"(transformers copy held: {ours['holds_transformers']}); "
        f"transformers fp32 peak {hf['peak_mb']:.0f} MB; ratio {r['ratio']:.2f} "
        f"(the first load, which may build and save the decoder: "
        f"{r['chatforge_first_load']['peak_mb']:.0f} MB, {r['first_load_ratio']:.2f})"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
