"""The fast path: logits parity with transformers, quantisation, the paged cache,
batch invariance of the C step."""

from __future__ import annotations

import pytest
import torch

from chatforge.models.fast import build_fast_model, unsupported_reason


def _tiny(kind: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    if kind == "llama-gqa":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=8, num_key_value_heads=2))
    if kind == "llama-bias-tied":
        return LlamaForCausalLM(
            LlamaConfig(
                **common,
                num_attention_heads=4,
                num_key_value_heads=4,
                attention_bias=True,
                tie_word_embeddings=True,
            )
        )
    if kind in ("llama-hd64", "llama-hd128"):  # attention's unrolled AVX2 paths (decode.c)
        heads = 2 if kind == "llama-hd64" else 1
        wide = {**common, "hidden_size": 128}
        return LlamaForCausalLM(
            LlamaConfig(**wide, num_attention_heads=heads, num_key_value_heads=1)
        )
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2))
    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=300, n_positions=256, n_embd=64, n_layer=2, n_head=4)
        )
    raise AssertionError(kind)


KINDS = ["llama-gqa", "llama-bias-tied", "qwen2", "gpt2", "llama-hd64", "llama-hd128"]


def _randomise_biases(model) -> None:
    # Fresh models have zero biases, which would hide a bias that is dropped.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)


class Driver:
    """Feeds rows to a FastDecoder directly: each sequence gets fresh blocks as it grows
    (small blocks, so attention crosses block boundaries)."""

    def __init__(self, fast, block_size: int = 4, n_blocks: int = 8) -> None:
        self.fast = fast
        self.kv = fast.new_cache(n_blocks=n_blocks, block_size=block_size)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.used = 0

    def feed(self, items, all_rows: bool = False) -> list[torch.Tensor]:
        """items: [(sequence id, token ids)] in one forward call; logits per item
        (its last row, or every row)."""
        tokens, positions, seq_index = [], [], []
        for i, (sid, ids) in enumerate(items):
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * self.kv.block_size < start + len(ids):
                table.append(self.used)
                self.used += 1
            self.kv.grow(self.used)
            tokens += list(ids)
            positions += range(start, start + len(ids))
            seq_index += [i] * len(ids)
            self.lens[sid] = start + len(ids)
        width = max(len(self.tables[sid]) for sid, _ in items)
        tables = torch.zeros(len(items), width, dtype=torch.int32)
        for i, (sid, _) in enumerate(items):
            tables[i, : len(self.tables[sid])] = torch.tensor(self.tables[sid])
        h = self.fast.forward(
            torch.tensor(tokens), torch.tensor(positions), torch.tensor(seq_index), tables, self.kv
        )
        out, row = [], 0
        for _, ids in items:
            rows = h[row : row + len(ids)] if all_rows else h[row + len(ids) - 1 : row + len(ids)]
            out.append(self.fast.logits(rows) if all_rows else self.fast.logits(rows)[0])
            row += len(ids)
        return out


def _paths(fast):
    """The C step (where it builds) and the torch path."""
    import copy

    out = [("c", fast)] if fast.native else []
    torch_path = copy.copy(fast)
    torch_path.native = None
    return [*out, ("torch", torch_path)]


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_decode_logits_match_transformers(kind):
    model = _tiny(kind).eval()
    _randomise_biases(model)
    assert unsupported_reason(model) is None
    ids = torch.randint(0, 300, (40,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]  # (T, V)
    for path, fast in _paths(build_fast_model(model)):
        drv = Driver(fast)
        prompt = drv.feed([(0, ids[:30].tolist())], all_rows=True)[0]  # (30, V)
        assert torch.allclose(prompt, ref[:30], atol=1e-4, rtol=0), path
        for t in range(30, 40):
            got = drv.feed([(0, [int(ids[t])])])[0]
            assert torch.allclose(got, ref[t], atol=1e-4, rtol=0), (path, t)


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_prefills_and_decodes_of_different_lengths_in_one_call(kind):
    """Three prompts prefilled in one call, then decoded together, then a fourth
    prompt prefilled in the same call as the others' decode step."""
    model = _tiny(kind).eval()
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (7, 19, 12, 5)]
    nxt = torch.randint(0, 300, (3, 6)).tolist()
    for path, fast in _paths(build_fast_model(model)):
        drv = Driver(fast)
        first = drv.feed([(i, prompts[i]) for i in range(3)])
        steps = [drv.feed([(i, [nxt[i][j]]) for i in range(3)]) for j in range(5)]
        mixed = drv.feed([(i, [nxt[i][5]]) for i in range(3)] + [(3, prompts[3])])
        for i in range(3):
            with torch.no_grad():
                ref = model(torch.tensor([prompts[i] + nxt[i]])).logits[0]
            n = len(prompts[i])
            assert torch.allclose(first[i], ref[n - 1], atol=1e-4, rtol=0), path
            for j in range(5):
                assert torch.allclose(steps[j][i], ref[n + j], atol=1e-4, rtol=0), (path, j)
            assert torch.allclose(mixed[i], ref[n + 5], atol=1e-4, rtol=0), path
        with torch.no_grad():
            ref = model(torch.tensor([prompts[3]])).logits[0, -1]
        assert torch.allclose(mixed[3], ref, atol=1e-4, rtol=0), path


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_c_rows_do_not_depend_on_the_batch_or_on_chunking(quantize):
    """The C step computes each row alone: a prompt's logits are bit-identical whether
    prefilled alone, beside other prompts, in chunks, or one token at a time (decode)."""
    model = _tiny("llama-gqa").eval()
    fast = build_fast_model(model, quantize=quantize)
    if not fast.native:
        pytest.skip("no C compiler here: the torch path is not batch-invariant")
    torch.manual_seed(3)
    # together 73 rows: decode.c splits a call's per-row work over threads from 64 rows
    a, b, c = (torch.randint(0, 300, (n,)).tolist() for n in (23, 9, 41))
    alone = Driver(fast).feed([(0, a)], all_rows=True)[0]
    together = Driver(fast).feed([(1, b), (0, a), (2, c)], all_rows=True)[1]
    assert torch.equal(alone, together)
    drv = Driver(fast)
    chunks = [drv.feed([(0, a[i : i + 5])], all_rows=True)[0] for i in range(0, 23, 5)]
    assert torch.equal(alone, torch.cat(chunks))
    drv = Driver(fast)
    drv.feed([(1, b)])
    steps = [drv.feed([(0, [t]), (1, [7])])[0] for t in a]  # decode beside another sequence
    assert torch.equal(alone, torch.stack(steps))


def test_pool_growth_keeps_what_it_holds():
    model = _tiny("llama-gqa").eval()
    fast = build_fast_model(model)
    ids = torch.randint(0, 300, (200,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    drv = Driver(fast, n_blocks=2)
    drv.feed([(0, ids[:10].tolist())])
    for t in range(10, 200):
        got = drv.feed([(0, [int(ids[t])])])[0]
    assert drv.kv.n_blocks >= 50
    assert torch.allclose(got, ref[199], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("quant", "tol"), [("int8", 0.05), ("int4", 0.35)])
def test_quantised_logits_stay_close(quant, tol):
    model = _tiny("llama-gqa").eval()
    dense = build_fast_model(model)
    q = build_fast_model(model, quantize=quant)
    assert q.weight_bytes < dense.weight_bytes / (3.5 if quant == "int8" else 4.5)
    ids = torch.randint(0, 300, (20,)).tolist()
    a = Driver(dense).feed([(0, ids)])[0]
    b = Driver(q).feed([(0, ids)])[0]
    assert (a - b).abs().max() < tol * a.abs().max()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


def test_unsupported_architectures_say_why():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    assert "no fast path" in unsupported_reason(m)
    with pytest.raises(ValueError, match="no fast path"):
        build_fast_model(m)
    with pytest.raises(ValueError, match="unknown quantization"):
        build_fast_model(_tiny("gpt2"), quantize="int3")
