"""Expert-parallel groups over real Ray actors and gloo: EP = 1, 2, 4 give the single-process engine's greedy
tokens bit for bit (deterministic mode on both sides), each rank holds only its share of the experts, an
expert count the group size does not divide is refused before any actor starts, and a KV handoff between
groups goes rank to rank as an ObjectRef (a lost one is reported, not imported)."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import torch
from helpers.tiny import run_all, tiny_engine

from k2serve.worker.engine.settings import EngineConfig
from k2serve.worker.engine.requests import KVHandoff, KVHandoffLost
from k2serve.worker.engine.sampling import SamplingParams
from k2serve.worker.loader import load_weights, resolve_checkpoint
from k2serve.worker.parallel.ep_group import ExpertParallelGroup, GroupSpec
from k2serve.worker.quant.moe import prepare_experts

NUM_REQUESTS = 16


def params(i: int) -> SamplingParams:
    # Output lengths differ too, so ranks run out of work at different steps and join with empty batches.
    return SamplingParams(temperature=0.0, max_tokens=2 + i % 7)


def mixed_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 120, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (length,), generator=g).tolist() for length in lengths]


def group_spec(world_size: int) -> GroupSpec:
    return GroupSpec(model_source="builtin:tiny-k2", world_size=world_size,
                     engine=EngineConfig(num_blocks=256, block_size=16, max_batch_tokens=512), eos_ids=[],
                     deterministic=True, num_cpus_per_actor=0.5, collective_timeout_s=20.0)


@pytest.fixture
def reference(one_torch_thread: None) -> dict[str, list[int]]:
    engine = tiny_engine(deterministic=True, max_batch_tokens=512)
    for i, p in enumerate(mixed_prompts(NUM_REQUESTS, seed=5)):
        engine.add_request(str(i), p, params(i))
    return run_all(engine)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_expert_parallel_equals_single_process(ray_cluster: None, reference: dict[str, list[int]],
                                               world_size: int) -> None:
    t0 = time.monotonic()
    group = ExpertParallelGroup(group_spec(world_size))
    try:
        started = time.monotonic()
        for i, p in enumerate(mixed_prompts(NUM_REQUESTS, seed=5)):
            group.add_request(str(i), p, params(i))
        assert {group.owner[str(i)] for i in range(NUM_REQUESTS)} == set(range(world_size))  # all ranks serve
        got = run_all(group)  # type: ignore[arg-type]
        print(f"EP={world_size}: start {started - t0:.1f} s, {NUM_REQUESTS} requests "
              f"{time.monotonic() - started:.1f} s, all-to-all {group.all_to_all_bytes} B")
        assert got == reference

        weights = load_weights(resolve_checkpoint("builtin:tiny-k2"))
        total = sum(s.nbytes() for s in prepare_experts(weights.experts, torch.device("cpu")).values())
        assert max(group.expert_bytes) <= 1.05 * total / world_size
        load = group.take_expert_load()  # every computed token routes to top-k experts in every MoE layer
        tokens = group.stats.prefill_tokens + group.stats.decode_tokens
        c = weights.config
        assert load is not None and int(load.sum()) == tokens * c.num_experts_per_tok * len(c.moe_layers)
        assert (group.all_to_all_bytes > 0) == (world_size > 1)  # only bytes to other ranks count
    finally:
        group.shutdown()


def test_forked_choices_on_a_rank_prefill_once(ray_cluster: None, one_torch_thread: None) -> None:
    prompt = mixed_prompts(1, seed=9)[0]
    sampled = SamplingParams(temperature=1.0, seed=30, max_tokens=6)
    forks = [("c1", 31), ("c2", 32)]
    engine = tiny_engine(deterministic=True, max_batch_tokens=512)
    engine.add_request("c0", prompt, sampled, forks=forks)
    reference = run_all(engine)
    group = ExpertParallelGroup(group_spec(2))
    try:
        group.add_request("c0", prompt, sampled, forks=forks)
        assert group.owner["c1"] == group.owner["c2"] == group.owner["c0"]
        assert run_all(group) == reference  # type: ignore[arg-type]
        assert group.stats.prefill_tokens == len(prompt)
        assert not group.owner and not group.active
    finally:
        group.shutdown()


def test_group_size_must_divide_expert_count() -> None:
    with pytest.raises(ValueError, match="expert_parallel 3 must divide the model's 16 routed experts"):
        ExpertParallelGroup(group_spec(3))


def test_a_prompt_goes_to_the_rank_that_caches_its_prefix(ray_cluster: None) -> None:
    """A chain's next turn (same prompt prefix) lands on the rank whose prefix cache holds it, not on the least
    loaded one, and prefills only its new tokens there."""
    group = ExpertParallelGroup(group_spec(2))
    try:
        turn1 = mixed_prompts(1, seed=9)[0] + list(range(1, 300))  # > one affinity stride (256 tokens)
        other = [list(range(100 + i, 140 + i)) for i in range(2)]
        long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        group.add_request("turn1", turn1, long)
        group.add_request("b", other[0], long)
        group.step()  # prefills both: turn1's blocks are in its rank's cache
        group.add_request("c", other[1], long)  # ties go to the lower rank: turn1's now runs two, the other one
        loads = [sum(1 for r in group.active if group.owner[r] == k) for k in range(2)]
        home = group.owner["turn1"]
        assert loads[home] > min(loads)  # turn1's rank is not the least loaded ...
        hits_before = group.blocks.prefix_hit_tokens
        group.add_request("turn2", turn1 + [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))
        assert group.owner["turn2"] == home  # ... but holds the prefix
        run_all(group)  # type: ignore[arg-type]
        assert group.blocks.prefix_hit_tokens - hits_before >= 256
    finally:
        group.shutdown()


class _Owner:
    """Puts a KVHandoff in the object store and hands out the ref; killing it leaves borrowers a dead owner."""

    def put(self, kv: KVHandoff) -> list[ray.ObjectRef]:
        return [ray.put(kv)]


def test_kv_handoff_between_groups_goes_rank_to_rank(ray_cluster: None) -> None:
    """Prefill group → decode group with the ref of the KV the prefill rank exported (the groups never load it):
    the single engine's greedy tokens. The count comes from the prefill group's books without asking its rank, and
    is what the exported KV covers. A ref whose owner died, or of an export that failed on the prefill rank, is
    refused with KVHandoffLost (not a failure of the decode group), and the group then serves the request by
    re-prefilling it."""
    prompt = mixed_prompts(1, seed=11)[0] + list(range(40))
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine = tiny_engine(deterministic=True, max_batch_tokens=512)
    engine.add_request("r", prompt, greedy)
    expected = run_all(engine)["r"]
    prefill, decode = ExpertParallelGroup(group_spec(1)), ExpertParallelGroup(group_spec(1))
    try:
        prefill.add_request("r", prompt, greedy.model_copy(update={"max_tokens": 1}), hold_kv=True)
        first = run_all(prefill)["r"]  # type: ignore[arg-type]
        ref, count = prefill.export_kv_ref("r")
        assert isinstance(ref, ray.ObjectRef) and count == len(prompt) == len(ray.get(ref).tokens)
        decode.add_request("r", prompt, greedy, output_prefix=first, kv=ref)
        assert first + run_all(decode)["r"] == expected  # type: ignore[arg-type]
        assert decode.stats.prefill_tokens == 0  # the KV was imported, not recomputed

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
        try:
            owner = ray.remote(_Owner).options(num_cpus=0).remote()
            [lost] = ray.get(owner.put.remote(ray.get(ref)))
        finally:
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.kill(owner)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until Ray reports the owner's death to borrowers
            try:
                ray.get(lost, timeout=5)
            except ray.exceptions.ObjectLostError:
                break
            time.sleep(0.2)
        with pytest.raises(KVHandoffLost):
            decode.add_request("again", prompt, greedy, output_prefix=first, kv=lost)
        with pytest.raises(KVHandoffLost, match="KeyError"):  # the prefill rank holds no KV of that request
            decode.add_request("again", prompt, greedy, output_prefix=first,
                               kv=prefill.ranks[0].export_kv.remote("never-prefilled"))
        assert decode.failed is None and "again" not in decode.owner
        decode.add_request("again", prompt, greedy, output_prefix=first)
        assert first + run_all(decode)["again"] == expected  # type: ignore[arg-type]
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_a_request_is_admitted_beside_the_queued_steps(ray_cluster: None) -> None:
    """A rank answers add_request from its admission thread while steps queued before it still run (the leader
    does not wait behind them); a step takes the request in, a bad one is refused at once, and a cancel that
    reaches the rank before any step did finds the request still in the inbox."""
    group = ExpertParallelGroup(group_spec(1))
    try:
        rank = group.ranks[0]
        long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        for i, prompt in enumerate(mixed_prompts(8, seed=3)):
            ray.get(rank.add_request.remote(f"busy{i}", prompt, long, {}))
        steps = [rank.step.remote() for _ in range(12)]
        seed = ray.get(rank.add_request.remote("late", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2), {}))
        _, unfinished = ray.wait(steps, num_returns=len(steps), timeout=0)
        assert unfinished, "add_request waited for every step queued before it"
        assert isinstance(seed, int)
        with pytest.raises(ValueError, match="token ids must lie in"):
            ray.get(rank.add_request.remote("bad", [10**9], long, {}))
        late = [ev for evs, _ in ray.get(steps) for ev in evs if ev.request_id == "late"]
        assert [ev.finish_reason for ev in late] == [None, "length"]  # taken in by a step queued before it

        ray.get(rank.add_request.remote("gone", [4, 5, 6], long, {}))
        assert ray.get(rank.cancel.remote("gone"))  # still in the inbox: no step ran since
        later = [ev for _ in range(3) for ev in ray.get(rank.step.remote())[0]]
        assert all(ev.request_id != "gone" for ev in later)
    finally:
        group.shutdown()
