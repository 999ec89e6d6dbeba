"""The KV tiers under the prefix cache (CPU memory and disk): multi-turn chats whose histories the GPU cache is too
small to keep must give transformers' greedy replies exactly, with tiers on and off, while the tiers hand back every
block computed before (the prefill tokens computed are hand-counted); the disk tier outlives the LLM, never serves a
corrupt block or another model's, and each tier keeps to its capacity, least recently used out first."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from seekforge import LLM, SamplingParams
from seekforge.engine.kv_tiers import DiskTier, HostTier
from seekforge.engine.tiered_blocks import cache_identity, chain_key
from seekforge.errors import ConfigError
from seekforge.model.hf import from_pretrained

pytestmark = [pytest.mark.filterwarnings("ignore:config.json declares"), pytest.mark.usefixtures("one_thread")]

BS = 4  # tokens per block
SYSTEM, USER, REPLY, TURNS, CONVS = 24, 5, 6, 3, 4
GREEDY = SamplingParams(temperature=0, max_tokens=REPLY, ignore_eos=True)
ONE_AT_A_TIME = dict(dtype="float32", block_size=BS, num_blocks=18, max_num_seqs=1)  # the GPU holds one chat
BIG_CPU = 1e-3  # GiB: over a thousand blocks of the tiny model


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    """The tiny model with its MTP module (whose cache rows go through the tiers too), weights drawn wider."""
    return tiny_checkpoint(init_std=0.1)


def user_turns() -> tuple[list[int], list[list[list[int]]]]:
    """A shared system prompt and each conversation's user messages, turn by turn."""
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 300, (SYSTEM,), generator=g).tolist()
    return system, [[torch.randint(3, 300, (USER,), generator=g).tolist() for _ in range(TURNS)] for _ in range(CONVS)]


def converse(generate) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Every conversation's turn t before any turn t + 1 (so the others run between two turns of one): per turn,
    (the prompts: history + user message, the replies `generate` gives them)."""
    system, users = user_turns()
    history = [list(system) for _ in range(CONVS)]
    turns = []
    for t in range(TURNS):
        prompts = [h + u[t] for h, u in zip(history, users)]
        replies = generate(prompts)
        turns.append((prompts, replies))
        history = [p + r for p, r in zip(prompts, replies)]
    return turns


@pytest.fixture(scope="module")
def reference(path):
    """transformers' greedy replies (fp32) in the same conversations."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def generate(prompts):
        with torch.no_grad():
            return [hf.generate(torch.tensor([p]), max_new_tokens=REPLY, do_sample=False,
                                eos_token_id=10**6)[0, len(p):].tolist() for p in prompts]

    return converse(generate)


def chat(llm: LLM) -> list:
    return converse(lambda prompts: [o.token_ids for o in llm.generate(prompts, GREEDY)])


def replies(turns) -> list:
    return [r for _, r in turns]


def computed_with_every_block_back(turns, bs: int = BS) -> int:
    """Prefill tokens when each block computed before comes back: a turn's prompt hits the blocks its conversation
    filled in the turn before (the prompt and the reply but its last token, never computed), and the first turns
    after the first conversation's hit the system prompt's blocks."""
    total = 0
    for t, (prompts, _) in enumerate(turns):
        for c, p in enumerate(prompts):
            if t == 0:
                hit = 0 if c == 0 else SYSTEM // bs * bs
            else:
                before = len(turns[t - 1][0][c]) + REPLY - 1
                hit = min(before // bs, (len(p) - 1) // bs) * bs
            total += len(p) - hit
    return total


def last_blocks(prompts, bs: int = BS) -> int:
    """Prefill tokens of prompts whose full blocks all come back: each computes its last, partial block."""
    return sum(len(p) - (len(p) - 1) // bs * bs for p in prompts)


def tiers(llm: LLM) -> dict:
    return llm.stats()["kv_tiers"]


# ---------------------------------------------------------------------------------------------- coming back


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_histories_come_back_from_the_cpu_tier(path, reference, async_scheduling):
    off = LLM(path, **ONE_AT_A_TIME, async_scheduling=async_scheduling)
    assert replies(chat(off)) == replies(reference)
    on = LLM(path, **ONE_AT_A_TIME, async_scheduling=async_scheduling, kv_cpu_gb=BIG_CPU)
    assert replies(chat(on)) == replies(reference)
    expected = computed_with_every_block_back(reference)
    assert on.stats()["prefill_tokens_computed"] == expected
    assert off.stats()["prefill_tokens_computed"] > 1.5 * expected  # the GPU alone keeps little of the histories
    cpu = tiers(on)["cpu"]
    assert cpu["hit_tokens"] > 0 and 0 < cpu["hit_rate"] <= 1
    assert cpu["blocks"] <= cpu["capacity_blocks"] and cpu["used_bytes"] <= cpu["capacity_bytes"]
    on.close()


def test_histories_come_back_from_the_disk_tier(path, reference, tmp_path):
    # a CPU tier of 12 blocks: enough to stage a step's new blocks, far from the histories' 50-odd
    llm = LLM(path, **ONE_AT_A_TIME, kv_cpu_gb=12.5 * block_bytes(path) / 2**30, kv_disk=str(tmp_path))
    assert replies(chat(llm)) == replies(reference)
    t = tiers(llm)
    assert t["cpu"]["blocks"] <= 12 and t["disk"]["hit_tokens"] > 0
    assert llm.stats()["prefill_tokens_computed"] < 1.5 * computed_with_every_block_back(reference)
    llm.close()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_eviction_storms_leave_outputs_unchanged(path, reference, async_scheduling):
    """All chats at once on a GPU cache that holds barely one: blocks cycle, sequences are preempted and recomputed,
    prefixes come back from the CPU tier while others decode; MTP drafts ride along (the drafter's cache rows come
    back too: greedy verification keeps the replies)."""
    storm = dict(dtype="float32", block_size=BS, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=12,
                 async_scheduling=async_scheduling, kv_cpu_gb=BIG_CPU)
    llm = LLM(path, **storm)
    assert replies(chat(llm)) == replies(reference)
    assert llm.stats()["preemptions"] > 0 and tiers(llm)["cpu"]["hit_tokens"] > 0
    if not async_scheduling:
        spec = LLM(path, **storm, num_speculative_tokens=1)
        assert replies(chat(spec)) == replies(reference)
        assert tiers(spec)["cpu"]["hit_tokens"] > 0


class _Copy:
    """A copy up that a GPU would still be running: its event never completes on its own."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def later_turn_in_the_cpu_tier(path, async_scheduling, num_blocks, past=8):
    """An LLM whose copies up stay in flight as on a busy GPU (`_Copy`; on the CPU the data is there at once), the
    steps at which the engine's stream was made to wait for one, and a chat's second turn, whose history's eight full
    blocks (the first turn's computed tokens) the GPU cache has evicted and the CPU tier holds, cut to `past` tokens
    past them: the tokens the turn computes, against which a copy up of 32 tokens' latents is long (1: _JOIN 16) or
    short (8)."""
    llm = LLM(path, dtype="float32", block_size=BS, num_blocks=num_blocks, max_num_seqs=3,
              async_scheduling=async_scheduling, kv_cpu_gb=BIG_CPU)
    bm = llm.block_manager
    copier, waits = bm.copier, []
    to_device = copier.to_device

    def slow_copy(slots, blocks):
        to_device(slots, blocks)
        return _Copy()

    copier.to_device = slow_copy
    copier.engine_waits = lambda event: waits.append(bm.steps)
    system, users = user_turns()
    first = system + users[0][0]
    reply = llm.generate([first], GREEDY)[0].token_ids
    llm.generate([list(range(210, 210 + (num_blocks - 1) * BS))], SamplingParams(temperature=0, max_tokens=1))  # evicts
    return llm, waits, (first + reply + users[0][1])[:8 * BS + past]


def steps_to_first_tokens(llm, rids) -> list[int]:
    """Steps until each request has its first token (while the others step)."""
    got, steps = {}, 0
    while len(got) < len(rids):
        steps += 1
        for o in llm.step():
            if o.request_id in rids and o.outputs[0].token_ids:
                got.setdefault(o.request_id, steps)
        assert steps < 10, "a later turn never got its first token while another chat decoded"
    return [got[r] for r in rids]


def finish(llm, rids) -> list[list[int]]:
    """Step until every request is done; the replies of `rids`."""
    replies = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            if o.finished:
                replies[o.request_id] = o.outputs[0].token_ids
    return [replies[r] for r in rids]


def hf_greedy(path, prompt) -> list[int]:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=REPLY, do_sample=False, eos_token_id=10**6)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_history_in_the_cpu_tier_costs_one_step_of_overlap(path, async_scheduling):
    """A later turn whose history is in the CPU tier and whose own prefill is short against its copy up, asked while
    another chat decodes: the copy is queued in the first step, which the other chat's decode runs beside, and in
    the second the sequence is admitted and prefills, the engine's stream waiting on the device for whatever is
    left of the copy. Two steps to the first token, however late the copy's event shows on the host (three with
    async scheduling, which pipelines a step computing one token a sequence as a decode, its tokens read a step
    later); the reply is transformers' greedy one."""
    llm, waits, prompt = later_turn_in_the_cpu_tier(path, async_scheduling, num_blocks=18, past=1)
    other = llm.add_request(list(range(200, 210)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        llm.step()
    rid = llm.add_request(prompt, GREEDY)
    assert steps_to_first_tokens(llm, [rid]) == [2 + async_scheduling]
    assert waits == [llm.block_manager.steps - async_scheduling]  # on the device, in the step that admitted it
    assert tiers(llm)["cpu"]["hit_tokens"] > 0
    assert finish(llm, [rid, other])[0] == hf_greedy(path, prompt)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_history_in_the_cpu_tier_joins_a_step_that_prefills(path, async_scheduling):
    """A later turn whose history is in the CPU tier and a new chat, asked together while a third chat decodes: the
    new chat's prefill is admitted first, and the later turn's copy up, short against that prefill, joins the same
    step (the engine's stream waits for it on the device), instead of both prefills taking a step each. Both first
    tokens after one step; the replies are transformers' greedy ones."""
    llm, waits, prompt = later_turn_in_the_cpu_tier(path, async_scheduling, num_blocks=26, past=1)
    other = llm.add_request(list(range(200, 210)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for _ in range(3):
        llm.step()
    fresh = list(range(100, 116))
    rids = [llm.add_request(fresh, GREEDY), llm.add_request(prompt, GREEDY)]
    assert steps_to_first_tokens(llm, rids) == [1, 1]
    assert waits == [llm.block_manager.steps]
    assert tiers(llm)["cpu"]["hit_tokens"] > 0
    assert finish(llm, rids + [other])[:2] == [hf_greedy(path, fresh), hf_greedy(path, prompt)]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_history_in_the_cpu_tier_joins_its_own_prefill(path, async_scheduling):
    """A later turn whose history is in the CPU tier and whose own prefill the copy up is short against (eight
    blocks, 32 tokens' latents, against 8 tokens to compute: _JOIN 16), asked while another chat decodes: it is admitted in
    the step that queues its copy (the engine's stream waits for the copy on the device, as that step's decode
    waits for the prefill anyway), not a step later. Its first token after one step; the reply is transformers'
    greedy one."""
    llm, waits, prompt = later_turn_in_the_cpu_tier(path, async_scheduling, num_blocks=18)
    other = llm.add_request(list(range(200, 210)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        llm.step()
    rid = llm.add_request(prompt, GREEDY)
    assert steps_to_first_tokens(llm, [rid]) == [1]
    assert waits == [llm.block_manager.steps]
    assert tiers(llm)["cpu"]["hit_tokens"] > 0
    assert finish(llm, [rid, other])[0] == hf_greedy(path, prompt)


# ---------------------------------------------------------------------------------------------- restarts


@pytest.fixture(scope="module")
def written(path, reference, tmp_path_factory):
    """A disk tier that an LLM wrote in the chats and closed, and that LLM's cache identity."""
    where = tmp_path_factory.mktemp("kv-disk")
    llm = LLM(path, **ONE_AT_A_TIME, kv_cpu_gb=BIG_CPU, kv_disk=str(where))
    assert replies(chat(llm)) == replies(reference)
    llm.close()
    disk = tiers(llm)["disk"]
    assert disk["skipped_writes"] == disk["write_errors"] == 0
    return where, llm.block_manager.root


def last_turn(reference) -> list[list[int]]:
    return reference[-1][0]


def cold_prefill(prompts) -> int:
    """Prefill tokens of the prompts with nothing cached but what they share among themselves (the system prompt)."""
    return len(prompts[0]) + sum(len(p) - SYSTEM // BS * BS for p in prompts[1:])


def test_a_restart_reads_what_the_last_process_wrote(path, reference, written, tmp_path):
    where = tmp_path / "disk"
    shutil.copytree(written[0], where)
    prompts = last_turn(reference)
    llm = LLM(path, **ONE_AT_A_TIME, kv_cpu_gb=BIG_CPU, kv_disk=str(where))
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference[-1][1]
    # every full block of the prompts was computed (and written) before: each prompt computes its last partial block
    assert llm.stats()["prefill_tokens_computed"] == last_blocks(prompts)
    assert llm.stats()["prefill_tokens_computed"] < cold_prefill(prompts) / 5
    assert tiers(llm)["disk"]["hit_tokens"] >= (len(prompts[0]) - 1) // BS * BS
    assert tiers(llm)["disk"]["corrupt_blocks"] == 0
    llm.close()


def test_corrupt_and_torn_blocks_are_recomputed_never_served(path, reference, written, tmp_path):
    where = tmp_path / "disk"
    shutil.copytree(written[0], where)
    prompts = last_turn(reference)
    identity = written[1]
    blocks = [(block_key(identity, prompts[0], 7), tuple(prompts[0][7 * BS:8 * BS])),
              (block_key(identity, prompts[1], 9), tuple(prompts[1][9 * BS:10 * BS]))]
    flipped, torn = (where / identity.hex() / key.hex()[:2] / f"{key.hex()}.kvb" for key, _ in blocks)
    data = bytearray(flipped.read_bytes())
    mid = len(data) // 2  # in the payload: served, these latents would change the replies
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    flipped.write_bytes(bytes(data))
    torn.write_bytes(torn.read_bytes()[:-100])
    stale = flipped.parent / f".{flipped.name}.left-by-a-crash.tmp"  # a writer that died before its rename
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600,) * 2)
    llm = LLM(path, **ONE_AT_A_TIME, kv_cpu_gb=BIG_CPU, kv_disk=str(where))
    assert not stale.exists()
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == reference[-1][1]
    assert tiers(llm)["disk"]["corrupt_blocks"] == 2
    # the first chat recomputes from its block 7 on, the second from its block 9; the others their last partial block
    assert llm.stats()["prefill_tokens_computed"] == (len(prompts[0]) - 7 * BS) + (len(prompts[1]) - 9 * BS) + (
        last_blocks(prompts[2:]))
    llm.close()
    # recomputed, and written anew
    cfg = llm.cfg
    slot = torch.empty(cfg.n_layers, BS, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    check = DiskTier(where, 2**30, slot.nbytes, BS, identity)
    assert check.read([(key, tokens, slot) for key, tokens in blocks]).result() == 2
    check.close()


def test_another_model_never_reads_the_disk_tier(path, reference, written, tmp_path):
    where = tmp_path / "disk"
    shutil.copytree(written[0], where)
    before = sorted(p.relative_to(where) for p in where.rglob("*.kvb"))
    model = from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.layers[0].attn.wkv_a.weight.mul_(1.001)  # another model: slightly other weights
    prompts = last_turn(reference)
    llm = LLM(model, **{k: v for k, v in ONE_AT_A_TIME.items() if k != "dtype"}, kv_cpu_gb=BIG_CPU, kv_disk=str(where))
    llm.generate(prompts, GREEDY)
    llm.close()
    assert tiers(llm)["disk"]["hit_tokens"] == 0 and tiers(llm)["disk"]["corrupt_blocks"] == 0
    assert llm.stats()["prefill_tokens_computed"] == cold_prefill(prompts)
    assert llm.block_manager.root != written[1]
    after = sorted(p.relative_to(where) for p in where.rglob("*.kvb"))
    assert set(before) <= set(after)  # its own blocks go elsewhere; the first model's stay
    assert {p.parts[0] for p in after} == {written[1].hex(), llm.block_manager.root.hex()}


def test_the_identity_follows_weights_and_layout(path):
    model = from_pretrained(path, dtype=torch.float32)
    shape = (3, BS, 48)
    first = cache_identity(model, shape, torch.float32)
    assert cache_identity(from_pretrained(path, dtype=torch.float32), shape, torch.float32) == first
    assert cache_identity(model, (3, 2 * BS, 48), torch.float32) != first
    assert cache_identity(model, shape, torch.bfloat16) != first
    with torch.no_grad():
        model.norm.weight[0] += 1e-3
    assert cache_identity(model, shape, torch.float32) != first


def test_weight_updates_start_a_new_identity(path, reference):
    model = from_pretrained(path, dtype=torch.float32)
    llm = LLM(model, **{k: v for k, v in ONE_AT_A_TIME.items() if k != "dtype"}, kv_cpu_gb=BIG_CPU)
    prompts = last_turn(reference)
    llm.generate(prompts, GREEDY)
    root = llm.block_manager.root
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    llm.generate(prompts, GREEDY)
    assert llm.block_manager.root != root
    assert llm.stats()["prefill_tokens_computed"] == 2 * cold_prefill(prompts)  # nothing came back from the old


# ---------------------------------------------------------------------------------------------- capacities


def block_bytes(path, bs: int = BS, element_size: int = 4) -> int:
    """Bytes of one block of the tiny model without drafts: its layers' bs latents and rotary keys."""
    from seekforge.model import ModelConfig

    cfg = ModelConfig.load(path)
    return cfg.n_layers * bs * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element_size


def block_key(identity: bytes, prompt: list[int], i: int) -> bytes:
    """The lower tiers' key of block i of prompt."""
    key = identity
    for j in range(i + 1):
        key = chain_key(key, prompt[j * BS:(j + 1) * BS])
    return key


def test_host_tier_keeps_its_capacity_least_recently_used_out_first():
    host = HostTier(3, (2, 4), torch.float32, pin=False)
    for k in (b"a", b"b", b"c"):
        host.add(k, (1,), host.take())
    assert host.get(b"a", (1,)) is not None  # a is now the most recently used
    assert host.get(b"b", (2,)) is None  # other tokens behind the key: a miss
    host.add(b"d", (1,), host.take())  # evicts b, the least recently used
    assert list(host.entries) == [b"c", b"a", b"d"]
    host.hold(host.entries[b"c"][0])
    host.add(b"e", (1,), host.take())  # c is held: a goes instead
    assert list(host.entries) == [b"c", b"d", b"e"]
    for k in (b"d", b"e"):
        host.hold(host.entries[k][0])
    assert host.take() is None  # every slot held
    done = []
    host.release(host.entries[b"d"][0], when=lambda: bool(done))
    assert host.take() is None
    done.append(True)
    assert host.take() == 1 and b"d" not in host.entries and host.used_bytes == 2 * 2 * 4 * 4


def test_disk_tier_keeps_its_capacity_across_restarts(tmp_path):
    slot = torch.arange(8, dtype=torch.float32).reshape(2, 4)

    file_bytes = 56 + 2 * 8 + slot.nbytes + 4  # header, two token ids, the block, CRC-32

    def tier():
        return DiskTier(tmp_path, 3 * file_bytes, slot.nbytes, 2, b"i" * 16)

    disk = tier()
    for k in (b"a", b"b", b"c"):
        assert disk.write(k * 16, (1, 2), slot, None) is not None
        disk.flush()
        time.sleep(0.01)  # distinct modification times
    into = torch.zeros_like(slot)
    assert disk.read([(b"a" * 16, (1, 2), into)]).result() == 1 and torch.equal(into, slot)  # a: most recent now
    assert disk.read([(b"b" * 16, (1, 3), into)]).result() == 0  # other tokens: never served
    assert disk.corrupt == 1 and not disk.has(b"b" * 16)
    disk.close()
    again = tier()  # a new process: the least recently used order comes from the files' times
    assert again.has(b"a" * 16) and again.has(b"c" * 16) and again.used_bytes == 2 * file_bytes
    for k in (b"d", b"e"):
        again.write(k * 16, (1, 2), slot, None)
        again.flush()
    assert not again.has(b"c" * 16) and again.has(b"a" * 16)  # c was the least recently used
    assert again.used_bytes <= again.capacity_bytes and len(list(tmp_path.rglob("*.kvb"))) == 3
    again.close()


def test_tier_settings_are_checked(path, tmp_path):
    small = dict(dtype="float32", block_size=BS, num_blocks=8)
    with pytest.raises(ConfigError, match="kv_cpu_gb > 0"):
        LLM(path, **small, kv_disk=str(tmp_path))
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        LLM(path, **small, kv_cpu_gb=BIG_CPU, enable_prefix_caching=False)
    with pytest.raises(ConfigError, match="kv_cpu_gb is a number"):
        LLM(path, **small, kv_cpu_gb=-1)
    with pytest.raises(ConfigError, match="holds no block"):
        LLM(path, **small, kv_cpu_gb=1e-9)
    with pytest.raises(ConfigError, match="holds no block"):
        LLM(path, **small, kv_cpu_gb=BIG_CPU, kv_disk=str(tmp_path), kv_disk_gb=1e-9)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="directory"):
        LLM(path, **small, kv_cpu_gb=BIG_CPU, kv_disk=str(tmp_path / "file"))


# ---------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_cuda_tiers_match_transformers(path, reference, tmp_path, async_scheduling):
    """Loads on the side stream, events polled while other chats step, pinned slots, the disk's thread: one chat
    at a time, a restart, then all at once on a cache that holds barely one (preemptions while blocks come up)."""
    bs = 16  # the decode kernel's tested block sizes are 16 and 64
    cuda = dict(dtype="float32", device="cuda", block_size=bs, num_blocks=5, max_num_seqs=1,
                async_scheduling=async_scheduling, kv_cpu_gb=BIG_CPU)
    on = LLM(path, **cuda, kv_disk=str(tmp_path / "a"))
    assert replies(chat(on)) == replies(reference)
    assert on.stats()["prefill_tokens_computed"] == computed_with_every_block_back(reference, bs)
    assert tiers(on)["cpu"]["hit_tokens"] > 0
    on.close()
    again = LLM(path, **cuda, kv_disk=str(tmp_path / "a"))  # a restart: from the disk
    prompts = last_turn(reference)
    assert [o.token_ids for o in again.generate(prompts, GREEDY)] == reference[-1][1]
    assert again.stats()["prefill_tokens_computed"] == last_blocks(prompts, bs)
    assert tiers(again)["disk"]["hit_tokens"] > 0
    again.close()
    storm = LLM(path, **{**cuda, "max_num_seqs": 4}, max_num_batched_tokens=12, kv_disk=str(tmp_path / "b"),
                kv_disk_gb=20 * block_bytes(path, bs) / 2**30)
    assert replies(chat(storm)) == replies(reference)
    assert storm.stats()["preemptions"] > 0 and tiers(storm)["cpu"]["hit_tokens"] > 0
    storm.close()


@pytest.mark.gpu
def test_cuda_blocks_come_back_bit_exact_under_graphs(path, tmp_path):
    """bf16, CUDA graphs, async scheduling: one chat at a time, so that the steps are the same whether a history
    stays in a GPU cache big enough for all of them or comes back from the CPU tier or the disk; the copies are
    bit-exact, so the replies are too."""
    gpu = dict(dtype="bfloat16", device="cuda", block_size=16, max_num_seqs=1, cuda_graphs=True)
    big = chat(LLM(path, **gpu, num_blocks=200))
    small_cpu = 4.5 * block_bytes(path, 16, 2) / 2**30  # stages the disk's blocks, holds few
    for kv, tier in ((dict(kv_cpu_gb=BIG_CPU), "cpu"), (dict(kv_cpu_gb=small_cpu, kv_disk=str(tmp_path)), "disk")):
        llm = LLM(path, **gpu, num_blocks=6, **kv)
        assert replies(chat(llm)) == replies(big)
        assert tiers(llm)[tier]["hit_tokens"] > 0
        llm.close()
