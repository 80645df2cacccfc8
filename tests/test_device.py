"""``--device`` plumbing, verified on a machine without a GPU.

What a GPU changes is checked here on the CPU: device selection and its errors (with
torch's CUDA queries monkeypatched), the dtype and quantisation a GPU gets, and the
code path a GPU runs: the fast decoder's torch forward (``native`` None, dense weights)
under the real engine (greedy equal to transformers, a batch equal to each prompt
alone, logprobs, a grammar, a LoRA adapter), with no tensor of the step made on the
CPU by default where it must follow the decoder's device. What needs CUDA itself is in
``test_gpu.py`` (skipped here).
"""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from chatforge import Engine, GenerationConfig, Message, Request, load_model
from chatforge.device import DeviceError, check_device_spec, default_dtype, resolve_device
from chatforge.errors import ModelLoadError
from chatforge.generation.engine import EngineConfig
from chatforge.models.loading import device_settings, parse_dtype

# -- device selection -------------------------------------------------------------------


def _fake_cuda(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_is_the_cpu_without_a_gpu_and_cuda_with_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    _fake_cuda(monkeypatch, count=2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: the CPU even so


def test_a_device_the_machine_lacks_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=f"--device {spec}: this machine has no CUDA GPU"):
            resolve_device(spec)
    _fake_cuda(monkeypatch, count=1)
    with pytest.raises(DeviceError, match=r"--device cuda:3: this machine has 1 CUDA GPU \(cuda:0"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="--device mps: this machine has no Apple GPU"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:-1", "tpu", ""])
def test_a_spec_that_names_no_device_says_what_is_accepted(spec):
    with pytest.raises(DeviceError, match="--device must be auto, cpu, cuda, cuda:N or mps"):
        check_device_spec(spec)
    with pytest.raises(ValueError):  # EngineConfig checks the spelling too
        EngineConfig(device=spec)


def test_dtype_and_quantisation_follow_the_device(monkeypatch):
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    _fake_cuda(monkeypatch, bf16=True)
    assert default_dtype(cuda) == "bf16"
    assert device_settings(cuda, "auto", "auto") == ("bf16", "none")
    assert device_settings(cuda, "fp32", "none") == ("fp32", "none")  # asked for: kept
    _fake_cuda(monkeypatch, bf16=False)  # e.g. a T4 or V100
    assert device_settings(cuda, "auto", "auto") == ("fp16", "none")
    for quant in ("int8", "int4", "gguf"):
        with pytest.raises(ModelLoadError, match=f"--quantize {quant} runs on the CPU only"):
            device_settings(cuda, "auto", quant)
    cpu = torch.device("cpu")
    assert default_dtype(cpu) == "auto"
    assert device_settings(cpu, "auto", "auto") == ("auto", "auto")  # the CPU: as before
    assert parse_dtype("half") == parse_dtype("fp16") == "fp16"
    with pytest.raises(ModelLoadError, match="--dtype fp16 is for a GPU"):
        device_settings(cpu, "fp16", "none")


def test_load_model_refuses_a_missing_gpu_before_loading(monkeypatch, tiny_llama_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import chatforge.models.loading as loading

    def no_load(*a, **k):
        raise AssertionError("nothing may load for a device the machine lacks")

    monkeypatch.setattr(loading, "resolve", no_load)
    with pytest.raises(DeviceError, match="--device cuda: this machine has no CUDA GPU"):
        load_model(str(tiny_llama_dir), device="cuda")


# -- the GPU's code path, on the CPU ------------------------------------------------------

PROMPTS = ["Hello there", "What is the capital of France? Tell me a story", "Thanks"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def torch_path(request, tiny_llama_dir, tiny_gpt2_dir):
    """A tiny model as a GPU runs it: dense weights, the torch forward (no C step)."""
    d = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    lm = load_model(str(d), dtype="fp32", quantize="none", device="cpu")
    assert lm.info.device == "cpu" and lm.info.engine == "fast"
    lm.fast.native = None  # what FastDecoder.to(<a GPU>) does
    assert lm.fast.kernel_path == "torch"
    return lm


def _ids(lm, text: str) -> list[int]:
    return lm.format.encode([Message("user", text)]).input_ids


def _engine(lm, **config) -> Engine:
    eng = Engine.from_loaded(lm, EngineConfig(**config) if config else None)
    eng.stop_token_ids = set()  # random weights: fixed-length replies
    return eng


def _hf_greedy(lm, ids: list[int], n: int) -> list[int]:
    out = lm.model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_torch_path_greedy_equals_transformers_and_a_batch_equals_each_alone(torch_path):
    lm = torch_path
    eng = _engine(lm, device="cpu")
    assert eng.device == torch.device("cpu")
    prompts = [_ids(lm, p) for p in PROMPTS]
    cfg = GenerationConfig(temperature=0, max_new_tokens=12)
    batch = [c.token_ids for c in eng.generate([Request(p, cfg) for p in prompts])]
    alone = [eng.generate([Request(p, cfg)])[0].token_ids for p in prompts]
    assert batch == alone
    assert batch == [_hf_greedy(lm, p, 12) for p in prompts]


def test_torch_path_logprobs_streaming_and_grammar(torch_path):
    import json

    lm = torch_path
    eng = _engine(lm)
    ids = _ids(lm, PROMPTS[1])
    c = eng.generate([Request(ids, GenerationConfig(temperature=0, max_new_tokens=6), logprobs=3)])[
        0
    ]
    assert len(c.logprobs) == 6 and all(len(t.top) == 3 for t in c.logprobs)
    # the chosen token of a greedy reply is its top-1, with the same logprob
    for t in c.logprobs:
        assert t.top[0][0] == t.token_id and t.top[0][1] == pytest.approx(t.logprob)
    greedy = GenerationConfig(temperature=0, max_new_tokens=6)
    assert "".join(e.text for e in eng.stream([Request(ids, greedy)])) == c.text
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    eng.stop_token_ids = set(Engine.from_loaded(lm).stop_token_ids)
    cfg = GenerationConfig(temperature=1.0, seed=1, max_new_tokens=40, json_schema=schema)
    out = eng.generate([Request(ids, cfg)])[0]
    assert isinstance(json.loads(out.text)["n"], int)


def test_engine_config_device_must_match_the_model(torch_path, monkeypatch):
    _fake_cuda(monkeypatch)
    with pytest.raises(ValueError, match=r"the model is loaded on cpu; load it there"):
        Engine.from_loaded(torch_path, EngineConfig(device="cuda"))
    assert Engine.from_loaded(torch_path, EngineConfig(device="cpu")).device.type == "cpu"


def test_fp16_on_the_torch_path_stays_close_to_fp32(tiny_llama_dir):
    """fp16 is what a GPU without bf16 runs: the same code, checked here on the CPU."""
    from chatforge.models.fast import build_fast_model
    from chatforge.models.loading import _torch_dtype, load_transformers

    hf = load_transformers(tiny_llama_dir, "fp32")
    ref = build_fast_model(hf, torch.float32)
    half = build_fast_model(hf, _torch_dtype("fp16"))
    ref.native = half.native = None
    assert half.cfg.dtype == torch.float16 and half.kernel_path == "torch"
    ids = torch.arange(3, 20)
    outs = []
    for dec in (ref, half):
        kv = dec.new_cache(n_blocks=4, block_size=16)
        h = dec.forward(
            ids,
            torch.arange(len(ids)),
            torch.zeros(len(ids), dtype=torch.long),
            torch.tensor([[0, 1]], dtype=torch.int32),
            kv,
        )
        assert kv.k[0].dtype == dec.cfg.dtype
        outs.append(dec.logits(h))
    assert outs[1].dtype == torch.float32  # logits are fp32 whatever the weights
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)


def test_decoder_to_moves_every_tensor_and_drops_the_c_step(tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none", device="cpu")
    dec = lm.fast
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        moved.append(self.shape)
        return real_to(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", spy)
        dec.to("cpu")
    n_tensors = 2 + 1 + 1 + len(dec.layers) * 6  # embed, rope, final norm, head; per layer
    assert len(moved) >= n_tensors
    q = load_model(str(tiny_llama_dir), dtype="fp32", quantize="int8", device="cpu").fast
    with pytest.raises(ValueError, match="run on the CPU only"):
        q.to(torch.device("meta"))


# -- nothing of the step is made on the CPU by default ------------------------------------

_FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.arange, torch.empty}
_WATCHED = ("models/fast/model.py", "generation/fast_runner.py")


class _DeviceAudit(TorchFunctionMode):
    """Records tensor factories called without ``device=`` from the files a GPU step
    runs through: each would make a CPU tensor that a GPU step then mixes with its own."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and "device" not in kwargs:
            for frame in reversed(traceback.extract_stack(sys._getframe(1), limit=3)):
                path = frame.filename.replace("\\", "/")
                if path.endswith(_WATCHED):
                    self.found.append(f"{path.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}")
                    break
        return func(*args, **kwargs)


def test_no_tensor_of_a_step_is_made_on_the_cpu_by_default(torch_path, tiny_llama_dir):
    from lora_helpers import make_adapter

    lm = torch_path
    eng = _engine(lm)
    ids = [_ids(lm, p) for p in PROMPTS]
    reqs = [Request(p, GenerationConfig(temperature=0.7, seed=3, max_new_tokens=5)) for p in ids]
    if lm.fast.cfg.arch == "llama":  # a LoRA adapter on one row: the per-row path too
        import tempfile
        from pathlib import Path

        out = Path(tempfile.mkdtemp()) / "lora"
        eng.add_adapter(str(make_adapter(tiny_llama_dir, out, seed=1)), name="a")
        reqs[0] = Request(ids[0], GenerationConfig(temperature=0, max_new_tokens=5), adapter="a")
    with _DeviceAudit() as audit:
        eng.generate(reqs)
    assert audit.found == []


# -- the device is named: models info, /metrics, and the flags ------------------------------


def test_models_info_names_the_device(capsys, tiny_llama_dir):
    from cli_helpers import run

    code, out, err = run(["models", "info", str(tiny_llama_dir), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "device" in out and "  cpu\n" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "-m", "MODEL", "--device", "cuda"],
        ["generate", "IN", "-o", "OUT", "-m", "MODEL", "--device", "cuda"],
        ["compare", "-m", "MODEL", "--prompts", "IN", "-o", "OUT", "--device", "cuda"],
        ["serve", "-m", "MODEL", "--device", "cuda"],
        ["eval", "-m", "MODEL", "-d", "IN", "--device", "cuda"],
        ["models", "info", "MODEL", "--device", "cuda"],
    ],
)
def test_each_command_refuses_a_missing_gpu_in_one_line(argv, capsys, tmp_path, monkeypatch):
    from cli_helpers import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    subs = {"MODEL": str(tmp_path / "no-model"), "IN": str(src), "OUT": str(tmp_path / "o.jsonl")}
    code, out, err = run([subs.get(a, a) for a in argv], capsys)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--device cuda: this machine has no CUDA GPU" in lines[0], err


def test_metrics_name_the_device(tiny_llama_dir):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from chatforge.server import create_app
    from serverkit import ServerThread

    lm = load_model(str(tiny_llama_dir), dtype="fp32", quantize="none", device="cpu")
    with ServerThread(create_app(lm, model_id="tiny")) as srv:
        text = httpx.get(srv.url + "/metrics").text
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "chatforge_model_info"
    ]
    (sample,) = family.samples
    assert sample.value == 1
    assert sample.labels["device"] == "cpu" and sample.labels["dtype"] == "fp32"


def test_training_reads_the_gpus_free_memory_on_cuda(monkeypatch):
    """The memory check of a CUDA run compares with the GPU's free memory, not the host's."""
    from chatforge.training import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (3 * 2**30, 80 * 2**30))
    assert memory.device_available_bytes(torch.device("cuda", 0)) == 3 * 2**30
    monkeypatch.setattr(memory, "available_bytes", lambda: 5 * 2**30)
    assert memory.device_available_bytes(torch.device("cpu")) == 5 * 2**30
    assert memory.device_available_bytes(torch.device("mps")) is None
