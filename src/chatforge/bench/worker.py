"""Measure one setting in this process and print its results as JSON (used by ``bench``)."""

from __future__ import annotations

import json
import sys

from chatforge.bench.decode import BenchSetting, measure, measure_llama_cpp, result_dicts


def main() -> None:
    spec = json.loads(sys.argv[1])
    setting = BenchSetting(**spec["setting"])
    if setting.engine == "llama.cpp":
        results = measure_llama_cpp(spec["gguf"], spec["new_tokens"], setting.threads) or []
    else:
        results = measure(
            setting, spec["model"], spec["new_tokens"], spec["batch_tokens"], tuple(spec["batches"])
        )
    print("RESULT " + json.dumps(result_dicts(results)))


if __name__ == "__main__":
    main()
