"""The head where it is fastest: one head call for concurrent generations, sampling on the
logits' device, and the CLI's --device / --ignore-eos.

Batched logits against alone: in float32 on the CPU, a batch of up to 3 rows was
bit-identical to each row alone on this box (MKL runs them as matrix-vector
products); from 4 rows on the matrix-matrix kernel sums in another order, so rows
agree within BATCH_ATOL (measured on the default model: at most 4e-5 on logits
up to ~37; greedy choices unchanged).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from client.generate import GenerationStats, LocalBlocks, stream_tokens
from client.head_batch import HeadBatcher
from client.sampling import Sampler, SamplingParams
from swarm.errors import SwarmError
from swarm.model.device import default_dtype, resolve_device

BATCH_ATOL = 1e-3  # absolute, on logits; far below any gap greedy decoding would notice

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


class CountingHead:
    """A head whose `logits` calls are counted (and can be made to fail)."""

    def __init__(self, head, fail: bool = False) -> None:
        self.head = head
        self.calls: list[int] = []  # rows per call
        self.fail = fail

    @property
    def device(self):
        return self.head.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(hidden.shape[0])
        if self.fail:
            raise RuntimeError("the head broke")
        return self.head.logits(hidden)


class YieldingBlocks:
    """LocalBlocks that give the loop a turn per step, as a network hop would."""

    def __init__(self, inner: LocalBlocks) -> None:
        self.inner = inner

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last") -> torch.Tensor:
        await asyncio.sleep(0)
        return await self.inner.forward(hidden, start, output)


def _rows(head, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, head.config.hidden_size, generator=torch.Generator().manual_seed(seed)) * 2


async def _concurrent(batcher: HeadBatcher, rows: torch.Tensor) -> list[torch.Tensor]:
    async def one(row):
        with batcher.generation():
            await asyncio.sleep(0)
            return (await batcher.score(row))[0]

    return await asyncio.gather(*(one(r) for r in rows))


@pytest.mark.parametrize("n", [2, 3, 4, 16])
def test_concurrent_rows_share_one_head_call_and_get_their_own_logits(head, n):
    counting = CountingHead(head)
    rows = _rows(head, n)
    batched = asyncio.run(_concurrent(HeadBatcher(counting), rows))
    assert counting.calls == [n]  # one call, every row in it
    for row, got in zip(rows, batched):
        alone = head.logits(row[None])[0]
        torch.testing.assert_close(got, alone, rtol=0, atol=BATCH_ATOL)  # equal for n <= 3 on this box's MKL
        assert got.argmax() == alone.argmax()


def test_a_batch_finds_every_row_argmax_and_the_sampler_uses_it_only_unpenalised(head):
    batcher = HeadBatcher(head)
    rows = _rows(head, 5, seed=4)

    async def run():
        async def one(row):
            with batcher.generation():
                await asyncio.sleep(0)
                return await batcher.score(row)

        return await asyncio.gather(*(one(r) for r in rows))

    for logits, best in asyncio.run(run()):
        assert best == int(logits.argmax())
    logits = torch.tensor([2.0, 1.9, -1.0])
    assert Sampler(SamplingParams())(logits, [0], best=2) == 2  # trusted as the argmax of these logits
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0], best=0) == 1  # penalised: found afresh
    assert Sampler(SamplingParams(frequency_penalty=1.0))(logits, [0], [0], best=0) == 1


def test_alone_the_head_runs_inline_without_a_loop_turn(head):
    """One generation: `logits` finishes on its first step (never suspends), as a plain head call."""
    batcher = HeadBatcher(CountingHead(head))
    row = _rows(head, 1)[0]

    async def run():
        with batcher.generation():
            step = batcher.score(row)
            with pytest.raises(StopIteration) as done:
                step.send(None)
            return done.value.value[0]

    assert torch.equal(asyncio.run(run()), head.logits(row[None])[0])
    assert batcher.head.calls == [1]


def test_a_late_generation_does_not_hold_the_batch(head):
    """Two registered, one busy elsewhere (a long network step): the other's row runs after a quiet turn."""
    counting = CountingHead(head)
    batcher = HeadBatcher(counting)
    rows = _rows(head, 2)

    async def run():
        release = asyncio.Event()

        async def busy():
            with batcher.generation():
                await release.wait()
                return (await batcher.score(rows[1]))[0]

        async def ready():
            with batcher.generation():
                await asyncio.sleep(0)
                logits, _ = await batcher.score(rows[0])
                release.set()
                return logits

        return await asyncio.gather(ready(), busy())

    first, second = asyncio.run(run())
    assert counting.calls == [1, 1]
    assert torch.equal(first, head.logits(rows[:1])[0]) and torch.equal(second, head.logits(rows[1:])[0])


def test_rows_a_turn_apart_are_not_held_for_the_rest(head):
    """Twenty registered generations asking one loop turn apart: nobody waits for all twenty; a row
    runs after the first loop turn that brings no new one."""
    counting = CountingHead(head)
    batcher = HeadBatcher(counting)
    rows = _rows(head, 20)

    async def run():
        async def one(index):
            with batcher.generation():
                for _ in range(index + 1):
                    await asyncio.sleep(0)
                return (await batcher.score(rows[index]))[0]

        return await asyncio.gather(*(one(i) for i in range(20)))

    results = asyncio.run(run())
    assert sum(counting.calls) == 20 and max(counting.calls) <= 2
    for row, got in zip(rows, results):
        torch.testing.assert_close(got, head.logits(row[None])[0], rtol=0, atol=BATCH_ATOL)


def test_a_cancelled_waiter_drops_out_and_an_error_reaches_every_waiter(head):
    rows = _rows(head, 3)

    async def cancel_one():
        counting = CountingHead(head)
        batcher = HeadBatcher(counting)
        with batcher.generation(), batcher.generation(), batcher.generation():
            tasks = [asyncio.ensure_future(batcher.score(r)) for r in rows[:2]]
            await asyncio.sleep(0)  # both wait for the third generation
            tasks[0].cancel()
            third, _ = await batcher.score(rows[2])  # every generation is here: runs now, without the cancelled row
            second, _ = await tasks[1]
        return counting.calls, second, third

    calls, second, third = asyncio.run(cancel_one())
    assert calls == [2]
    torch.testing.assert_close(second, head.logits(rows[1:2])[0], rtol=0, atol=BATCH_ATOL)
    torch.testing.assert_close(third, head.logits(rows[2:3])[0], rtol=0, atol=BATCH_ATOL)

    async def broken():
        batcher = HeadBatcher(CountingHead(head, fail=True))

        async def one(row):
            with batcher.generation():
                await asyncio.sleep(0)
                return (await batcher.score(row))[0]

        return await asyncio.gather(*(one(r) for r in rows), return_exceptions=True), batcher.head.calls

    outcomes, calls = asyncio.run(broken())
    assert calls == [3] and all(isinstance(o, RuntimeError) and "the head broke" in str(o) for o in outcomes)


def test_concurrent_local_generations_batch_the_head_and_keep_their_text(head, full_span):
    """Four generations at once through one batcher: one head call per step, each text as when it runs alone."""
    prompts = [head.encode_prompt(p, chat=True) for p in ("Hi", "What is 2+2?", "Name a colour.", "Say yes.")]
    params = SamplingParams(max_new_tokens=6, stop_at_eos=False, speculate=False)  # one row a step (tests/test_speculate.py: several)

    async def generate(batcher, ids):
        blocks = YieldingBlocks(LocalBlocks(full_span, len(ids) + params.max_new_tokens))
        return [t.id async for t in stream_tokens(head, blocks, ids, params, batcher=batcher) if t.id is not None]

    alone = [asyncio.run(generate(None, ids)) for ids in prompts]
    counting = CountingHead(head)
    shared = HeadBatcher(counting)

    async def together():
        return await asyncio.gather(*(generate(shared, ids) for ids in prompts))

    assert asyncio.run(together()) == alone
    assert counting.calls == [4] * params.max_new_tokens  # every step of all four in one call
    assert not shared._loops  # every generation unregistered


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_works_where_the_logits_are(device):
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5, 1.0], device=device)
    assert Sampler(SamplingParams())(logits, []) == 0
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1
    assert Sampler(SamplingParams(frequency_penalty=2.0))(logits, [0, 1], [0, 1]) == 4
    assert Sampler(SamplingParams(presence_penalty=2.0, repetition_penalty=1.2))(logits, [0, 1], [0, 1]) == 4
    nucleus = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], device=device))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {sampler(nucleus, []) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 crosses 0.7
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0, 1}
    # A seed reproduces on any device. (Across devices the probabilities differ in their last bits,
    # measured on an H100, so a CPU and a GPU run of one seed may part at a near tie.)
    flat = torch.zeros(50)
    for params in (SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=1.0, top_p=0.9, top_k=30, seed=3, repetition_penalty=1.3)):
        first, second = Sampler(params), Sampler(params)
        history = [1, 2, 3]
        assert [first(flat.to(device), history) for _ in range(20)] == [second(flat.to(device), history) for _ in range(20)]


def test_device_names_resolve_here():
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu") and default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    for bad in ("tpu", "gpu0", "", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(SwarmError):
            resolve_device(bad)


def test_cli_ignore_eos_gives_exactly_max_new_tokens_on_the_auto_device():
    """A local run of the default model: 12 tokens, however early the model would have ended; --device auto is cpu here."""
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", "Say OK.", "--ignore-eos", "--max-new-tokens", "12", "--device", "auto", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["tokens"]) == 12 and out["finish_reason"] == "length"
    assert out["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_cli_refuses_a_device_this_machine_lacks(capsys):
    from client.cli import main

    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["generate", "hi", "--device", missing]) == 2  # before any weight is read
    assert f"device {missing}:" in capsys.readouterr().err


# --- the head on a device: a tiny random checkpoint (the accelerator box has no default model) ---------------
#
# On cpu these run here (float32 against float32: equal); on cuda (skipped without one) the
# same tests check the GPU paths. bfloat16 logits against float32: within BF16_REL_ERROR in
# relative norm (bf16 keeps 8 bits of mantissa; 2 blocks and the head).

BF16_REL_ERROR = 0.05


def _tiny_checkpoint(directory):
    """A 2-block random Llama (hidden 128, vocab 512) with a word-level tokenizer: "w3 w4 ..." are tokens 3, 4, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.random_checkpoint import build

    build(directory, layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=512)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 512)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    """The CPU float32 baseline of the tiny model."""
    from client.local import LocalModel

    return LocalModel.load(str(tiny))


PROMPTS = ["w5 w9 w17 w33", "w100 w7", "w3 w4 w5 w6 w7 w8", "w400"]


def _greedy(model, ids, new_tokens, batcher=None) -> list[int]:
    params = SamplingParams(max_new_tokens=new_tokens, stop_at_eos=False, speculate=False)  # one head row a step

    async def run():
        blocks = YieldingBlocks(LocalBlocks(model.span, len(ids) + new_tokens))
        return [t.id async for t in stream_tokens(model.head, blocks, ids, params, batcher=batcher) if t.id is not None]

    return asyncio.run(run())


@pytest.mark.parametrize("device", DEVICES)
def test_local_model_on_device_matches_cpu_float32(tiny, tiny_reference, device):
    """LocalModel.load(device=...): blocks and head there in the device's dtype, logits close to
    CPU float32; a batch of rows on the device gets each row's own logits; and four generations at
    once share one head call per step with the text each gets alone (float32, where greedy is exact)."""
    from client.local import LocalModel

    model = LocalModel.load(str(tiny), device=device)
    assert model.device.type == device and model.head.embed_device == model.device and model.head.dtype == default_dtype(model.device)
    bf16 = model.head.dtype == torch.bfloat16
    ids = model.head.encode_prompt(PROMPTS[0], chat=False)
    hidden = model.span(model.head.embed(ids).to(model.span.dtype), [_segment(model.span, len(ids))])
    ref_span = tiny_reference.span
    reference = tiny_reference.head.logits(ref_span(tiny_reference.head.embed(ids), [_segment(ref_span, len(ids))]))
    got = model.head.logits(hidden).cpu()
    assert (got - reference).norm() / reference.norm() <= (BF16_REL_ERROR if bf16 else 1e-5)

    rows = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)).to(model.device)
    batched = asyncio.run(_concurrent(HeadBatcher(model.head), rows))
    for row, logits in zip(rows, batched):
        alone = model.head.logits(row[None])[0]
        # bf16 rounds each logit to 8 bits: a row's batched and lone logits may differ by a rounding step
        torch.testing.assert_close(logits, alone, rtol=0, atol=alone.abs().max().item() * 2**-7 if bf16 else BATCH_ATOL)

    exact = LocalModel.load(str(tiny), torch.float32, device)
    prompts = [exact.head.encode_prompt(p, chat=False) for p in PROMPTS]
    alone = [_greedy(exact, p, 5) for p in prompts]
    counting = CountingHead(exact.head)
    batcher = HeadBatcher(counting)

    async def together():
        async def one(p):
            blocks = YieldingBlocks(LocalBlocks(exact.span, len(p) + 5))
            params = SamplingParams(max_new_tokens=5, stop_at_eos=False, speculate=False)  # one head row a step
            return [t.id async for t in stream_tokens(exact.head, blocks, p, params, batcher=batcher) if t.id is not None]

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(together()) == alone
    assert counting.calls == [4] * 5


def _segment(span, length):
    from swarm.model import Segment

    return Segment(span.new_cache(length), 0, length)


@pytest.fixture(scope="module")
def tiny_node(tiny, tmp_path_factory):
    from tests.nodes import start_nodes, stop_nodes

    nodes = start_nodes([["--model", str(tiny), "--blocks", "0:2", "--device", "cpu"]], tmp_path_factory.mktemp("tiny-node"))
    yield nodes[0]
    stop_nodes(nodes)


@pytest.mark.parametrize("device", DEVICES)
def test_swarm_head_on_device_shares_its_calls_and_keeps_greedy_text(tiny, tiny_reference, tiny_node, device):
    """SwarmModel(device=...): a CPU float32 node serves the blocks, the head runs on `device` (float32
    here, so greedy text equals the CPU baseline's); concurrent generations go through its one batcher."""
    from client.swarm import ClientConfig, SwarmModel

    model = SwarmModel(str(tiny), bootstrap=[tiny_node.url], config=ClientConfig(wire_dtype="float32", verify_fraction=0.0), insecure_http=True, device=device, dtype=torch.float32)
    assert model.head.device.type == device and model.head.embed_device.type == "cpu"  # embeddings go to the wire from the CPU
    prompts = [model.head.encode_prompt(p, chat=False) for p in PROMPTS]
    expected = [_greedy(tiny_reference, p, 6) for p in prompts]

    async def together():
        async def one(ids):
            stats = GenerationStats()
            params = SamplingParams(max_new_tokens=6, stop_at_eos=False, speculate=False)  # one head row a step
            async for _ in model.stream_generation(ids, params, stats):
                pass
            return stats.token_ids

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(together()) == expected
    assert model.batcher.rows == 4 * 6 and model.batcher.calls <= model.batcher.rows
    assert not model.batcher._loops


@pytest.mark.parametrize("device", DEVICES)
def test_cli_local_run_on_device(tiny, device):
    """`swarm generate DIR --device D --ignore-eos`: exactly the tokens asked for, on that device in its default dtype."""
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "generate", str(tiny), "w5 w9", "--no-chat", "--device", device, "--ignore-eos", "--max-new-tokens", "7", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["tokens"]) == 7 and out["device"] == str(resolve_device(device))


def test_cli_flags_reach_the_configs():
    """--ignore-eos on generate and chat; --device and --dtype (default: the device's) on generate, chat, serve."""
    from client.cli import build_parser
    from client.cli_args import dtype_of, sampling_params

    parser = build_parser()
    for argv in (["generate", "hi"], ["chat"], ["serve"]):
        args = parser.parse_args(argv)
        assert args.device == "auto" and dtype_of(args) is None
        if argv[0] != "serve":
            assert sampling_params(args).stop_at_eos
    args = parser.parse_args(["chat", "--ignore-eos", "--device", "cuda:1", "--dtype", "float16"])
    assert not sampling_params(args).stop_at_eos and args.device == "cuda:1" and dtype_of(args) == torch.float16
    assert parser.parse_args(["serve", "--device", "cpu"]).device == "cpu"
