"""The single-process engine: continuous batching over one `K2Model` and its paged latent KV cache.

Every `step()` schedules running decodes first (one token each), then continues chunked prefills and admits
waiting requests, within a token budget; runs the model once per determinism mode present; samples the
sequences whose pending tokens are all computed; and returns one `TokenEvent` per sampled token. Prefix
caching comes from `BlockManager`: a new request whose prompt starts with cached full blocks computes only the
rest. Sampling draws are a pure function of (seed, position), so a resumed request — re-admitted with the
tokens it already produced as `output_prefix` — continues exactly where it stopped. A request's other choices
(`forks`, n > 1) share its prefill (engine/forks.py).
"""

from __future__ import annotations

import concurrent.futures
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from k2serve.sampling_params import finish_reason
from k2serve.worker.engine.blocks import BlockManager
from k2serve.worker.engine.forks import fork_children, share_prompt_kv
from k2serve.worker.engine.grammar import GrammarVocab, Grammars
from k2serve.worker.engine.guide import Guide
from k2serve.worker.engine.requests import EngineStats, KVHandoff, Request, TokenEvent
from k2serve.worker.engine.sampling import History, SamplingParams, resolve_seed, sample
from k2serve.worker.engine.settings import EngineConfig, plan
from k2serve.worker.model.batch import ForwardBatch, LatentKVCache, SeqSlice
from k2serve.worker.model.k2 import K2Model


class Engine:
    def __init__(self, model: K2Model, config: EngineConfig, eos_token_ids: list[int] | None = None,
                 grammar_vocab: GrammarVocab | None = None) -> None:
        """`grammar_vocab`: the tokenizer's view for constrained decoding and reasoning budgets; without it such
        requests are refused."""
        self.model = model
        mc = model.config
        self.cfg = config = plan(config, mc, model.dtype, model.device)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv = LatentKVCache(mc, config.num_blocks, config.block_size, model.dtype, model.device)
        eos = eos_token_ids if eos_token_ids is not None else mc.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}  # finished prefill-only sequences whose KV waits for export
        self.stats = EngineStats()
        self.forward_rows: deque[int] = deque(maxlen=1024)  # tokens per forward, recent
        self._admissions = itertools.count()
        self._models: dict[bool, K2Model] = {model.deterministic: model}
        self.grammars = Grammars(grammar_vocab) if grammar_vocab is not None else None

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], params: SamplingParams, **options: Any) -> int:
        """Queues a request (`options`: those of `prepare`); returns the seed its sampling uses (record it to
        resume identically)."""
        seq = self.prepare(request_id, prompt, params, **options)
        self.enqueue(seq)
        return seq.seed

    def prepare(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        output_prefix: list[int] | None = None,
        deterministic: bool | None = None,
        kv: KVHandoff | None = None,
        hold_kv: bool = False,
        forks: Sequence[tuple[str, int]] = (),
    ) -> Request:
        """A checked request for `enqueue`. `forks`: (request id, seed) of its other choices, which share its
        prefill (engine/forks.py). It reads only the engine's configuration, so another thread may
        call it while this one steps (a rank checks new requests beside its step)."""
        if not prompt:
            raise ValueError(f"request {request_id!r}: empty prompt")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"request {request_id!r}: token ids must lie in [0, {vocab})")
        prefix = list(output_prefix or [])
        if len(prompt) + max(params.max_tokens, len(prefix) + 1) > self.max_model_len:
            raise ValueError(f"request {request_id!r}: {len(prompt)} prompt tokens + max_tokens {params.max_tokens} "
                             f"exceed the context limit {self.max_model_len}")
        capacity = self.cfg.num_blocks * self.cfg.block_size
        if len(prompt) + max(len(prefix), params.max_tokens) > capacity:
            raise ValueError(f"request {request_id!r}: prompt + max_tokens exceed the KV cache ({capacity} tokens)")
        if kv is not None and kv.block_size != self.cfg.block_size:
            raise ValueError(f"KV handoff block size {kv.block_size} != engine block size {self.cfg.block_size}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"request {request_id!r}: logit_bias token ids must lie in [0, {vocab})")
        det = self.cfg.deterministic if deterministic is None or self.cfg.lockstep else deterministic
        seq = Request(request_id, list(prompt), prefix, params, resolve_seed(params), det, hold_kv, kv)
        seq.forks = fork_children(seq, forks)
        for s in (seq, *seq.forks) if params.guided else ():
            self._guide(s)
        return seq

    def _guide(self, seq: Request) -> None:
        """Sets up a guided request's steering. A fresh request's grammars compile on the grammar thread (it waits
        in the queue meanwhile); a resumed one compiles here and replays its tokens, so a prefix the constraint
        does not allow is refused before anything is queued."""
        grammars = self.grammars
        constraint = seq.params.constraint
        if grammars is None:
            raise ValueError(f"request {seq.request_id!r}: this engine was built without a tokenizer, so it cannot "
                             "follow constraints or reasoning budgets")
        if constraint is None:
            seq.guide = Guide(seq.params, grammars.vocab, None)
        else:
            Grammars.check(constraint)
            if not seq.output and not self.cfg.lockstep:  # ranks in lockstep must admit it in the same step
                seq.compiling = grammars.submit(constraint)
                return
            seq.guide = Guide(seq.params, grammars.vocab, grammars.compile(constraint))
        for token in seq.output:
            seq.guide.accept(token)  # GuideViolation is a ValueError: the request is refused

    def _compiled(self, seq: Request) -> bool:
        """Whether `seq` may be admitted: its grammars (if any) are compiled."""
        if seq.compiling is None:
            return True
        if not seq.compiling.done():
            return False
        assert self.grammars is not None
        seq.guide = Guide(seq.params, self.grammars.vocab, seq.compiling.result())
        seq.compiling = None
        return True

    def enqueue(self, seq: Request) -> None:
        for s in (seq, *seq.forks):
            if self.has_request(s.request_id):
                raise ValueError(f"request {s.request_id!r} is already in this engine")
        self.waiting.append(seq)

    def has_request(self, request_id: str) -> bool:
        return any(s.request_id == request_id for s in self._unfinished()) or request_id in self.held

    def _unfinished(self) -> Iterator[Request]:
        """Every waiting and running request, and the children still waiting for their parent's first sample."""
        for s in itertools.chain(self.waiting, self.running):
            yield s
            yield from s.forks

    def cancel(self, request_id: str) -> bool:
        for s in itertools.chain(self.waiting, self.running):
            child = next((c for c in s.forks if c.request_id == request_id), None)
            if child is not None:
                s.forks.remove(child)
                return True
        for s in list(self.waiting):
            if s.request_id == request_id:
                self.waiting.remove(s)
                self.waiting.extend(s.forks)  # its other choices go on, each computing the prompt itself
                return True
        for s in self.running:
            if s.request_id == request_id:
                self.running.remove(s)
                self.blocks.free(request_id)
                self.waiting.extend(s.forks)
                return True
        return self.release(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def request_ids(self) -> list[str]:
        return [s.request_id for s in self._unfinished()]

    # ---- KV handoff -----------------------------------------------------------------------------------
    def export_kv(self, request_id: str) -> KVHandoff:
        """The prompt KV of a finished `hold_kv` request (then released). A finished one-token request has computed
        exactly its prompt + output_prefix, which is what a worker group counts on without asking."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            raise KeyError(f"no held KV for request {request_id!r}")
        n = seq.num_computed
        table = self.blocks.block_table(request_id)[: -(-n // self.cfg.block_size)]
        data = self.kv.export_blocks(table)
        self.blocks.free(request_id)
        return KVHandoff(seq.tokens[:n], self.cfg.block_size, data)

    def release(self, request_id: str) -> bool:
        if self.held.pop(request_id, None) is None:
            return False
        self.blocks.free(request_id)
        return True

    # ---- the step -------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        scheduled = self._schedule()
        self.stats.steps += 1
        if not scheduled and not self.running:
            # Only requests whose grammars compile: wait a little for one instead of spinning.
            pending = [s.compiling for s in self.waiting if s.compiling is not None]
            if pending:
                concurrent.futures.wait(pending, timeout=0.01, return_when=concurrent.futures.FIRST_COMPLETED)
        if not scheduled:
            if self.cfg.lockstep:  # expert-parallel peers still run their MoE collectives
                self._forward([], self.cfg.deterministic)
            return []
        groups: dict[bool, list[tuple[Request, int]]] = {}
        for seq, n in scheduled:
            groups.setdefault(seq.deterministic, []).append((seq, n))
        events: list[TokenEvent] = []
        for det, items in sorted(groups.items()):
            events += self._run(items, det)
        return events

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.cfg.max_batch_tokens
        out: list[tuple[Request, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            pending = seq.num_tokens - seq.num_computed
            if pending == 1:
                if budget < 1 or not self._reserve_decode_slot(seq):
                    continue
                out.append((seq, 1))
                budget -= 1
            elif budget > 0:  # a prefill continuing in chunks
                n = min(pending, budget)
                out.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_running:
            # In queue order, passing over requests whose grammars still compile.
            seq = next((s for s in self.waiting if self._compiled(s)), None)
            if seq is None or not self._admit(seq):
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            pending = seq.num_tokens - seq.num_computed
            n = min(pending, budget)
            out.append((seq, n))
            budget -= n
        return out

    def _admit(self, seq: Request) -> bool:
        tokens = seq.tokens
        if not self.blocks.can_allocate(len(tokens)):
            return False
        alloc = self.blocks.allocate(seq.request_id, tokens)
        seq.num_computed = alloc.num_cached_tokens
        if seq.kv is not None:
            handed = min(len(seq.kv.tokens), len(tokens) - 1)
            if seq.kv.tokens[:handed] == tokens[:handed] and handed > seq.num_computed:
                bs = self.cfg.block_size
                first = seq.num_computed // bs  # blocks before it came from the prefix cache
                last = -(-handed // bs)
                self.kv.import_blocks(alloc.block_table[first:last], seq.kv.data[:, first:last])
                seq.num_computed = handed
            seq.kv = None
        seq.admitted = next(self._admissions)
        return True

    def _reserve_decode_slot(self, seq: Request) -> bool:
        """Makes room for one more token, preempting the latest admitted sequences (never one scheduled
        earlier in this step: `running` is in admission order and scheduled front to back)."""
        while not self.blocks.can_append(seq.request_id, 1):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append(seq.request_id, 1)
        return True

    def _preempt(self, seq: Request) -> None:
        """Frees a running sequence's KV; it is recomputed (prompt + output so far) when re-admitted."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _run(self, items: list[tuple[Request, int]], det: bool) -> list[TokenEvent]:
        logits = self._forward(items, det)
        events: list[TokenEvent] = []
        sampled = [seq for seq, _ in items if seq.num_computed == seq.num_tokens]
        if not sampled:
            return events
        rows = self._fork(sampled)
        if len(rows) > len(logits):
            logits = logits[rows]  # [B + forked, V]: a child samples from its parent's row
        positions = [s.num_tokens for s in sampled]
        masked = [i for i, s in enumerate(sampled) if s.guide is not None and s.guide.masks]
        bitmask = None
        if masked:
            bitmask = torch.full((len(sampled), -(-logits.shape[1] // 32)), -1, dtype=torch.int32)  # [B, W]
            for i in masked:
                sampled[i].guide.fill(bitmask[i])  # type: ignore[union-attr]
        histories = [History(s.prompt, s.output) if s.params.penalized else None for s in sampled]
        result = sample(logits, [s.params for s in sampled], [s.seed for s in sampled], positions,
                        histories=histories, bitmask=bitmask, masked_rows=masked)
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()  # one conversion, not one per row
        for i, seq in enumerate(sampled):
            token = tokens[i]
            if seq.guide is not None:
                seq.guide.accept(token)
            seq.output.append(token)
            seq.finish_reason = self._finish_reason(seq, token)
            row = result.top_logprobs[i]
            top = list(zip(*row)) if row is not None else None
            events.append(TokenEvent(seq.request_id, len(seq.output) - 1, token, logprobs[i], top,
                                     seq.finish_reason))
            if seq.finish_reason is not None:
                self.running.remove(seq)
                if seq.hold_kv:
                    self.held[seq.request_id] = seq
                else:
                    self.blocks.free(seq.request_id)
        return events

    def _fork(self, sampled: list[Request]) -> list[int]:
        """Adds to `sampled` the children of the parents about to sample their first token; returns each
        sampled sequence's logits row. A child that finds no room goes to the queue and computes its own prompt."""
        rows = list(range(len(sampled)))
        for i, parent in enumerate(list(sampled)):
            children, parent.forks = parent.forks, []
            for child in children:
                if len(self.running) >= self.cfg.max_running or not share_prompt_kv(self.blocks, self.kv, parent,
                                                                                    child):
                    self.waiting.append(child)
                    continue
                if child.compiling is not None:  # the parent's grammar, compiled: the cache has it
                    concurrent.futures.wait([child.compiling])
                    self._compiled(child)
                child.admitted = next(self._admissions)
                self.running.append(child)
                sampled.append(child)
                rows.append(i)
        return rows

    def _forward(self, items: list[tuple[Request, int]], det: bool) -> torch.Tensor:
        """Runs the model on `n` pending tokens of each sequence; returns logits of the sequences that are
        then fully computed, in order."""
        ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSlice] = []
        logits_rows: list[int] = []
        bs = self.cfg.block_size
        # Every sequence's slots from one padded grid of block tables: a few tensor ops per step, not per sequence.
        tables = [self.blocks.block_table(seq.request_id) for seq, _ in items]
        width = max(map(len, tables), default=0)
        grid = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64).view(len(items), width)
        all_slots = (grid.unsqueeze(2) * bs + torch.arange(bs)).view(len(items), width * bs)  # [B, nb] -> [B, nb * bs]
        owner: list[int] = []  # [T] the item each new token belongs to
        for i, (seq, n) in enumerate(items):
            start = seq.num_computed
            ctx = start + n
            seqs.append(SeqSlice(len(ids), n, start, all_slots[i]))  # slots [width * bs >= ctx]
            if n == 1:  # a decode: no copy of the sequence's tokens
                ids.append(seq.token_at(start))
                positions.append(start)
                owner.append(i)
            else:
                ids += seq.tokens[start:ctx]
                positions += range(start, ctx)
                owner += [i] * n
            seq.num_computed = ctx
            done = ctx == seq.num_tokens
            if done:
                logits_rows.append(len(ids) - 1)
            if n == 1 and done and seq.output:
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += n
            if self.blocks.enable_prefix_caching and ctx // bs > self.blocks.num_committed_blocks(seq.request_id):
                self.blocks.commit(seq.request_id, seq.tokens[:ctx])  # its full blocks join the prefix cache
        model = self._models.get(det) or self._models.setdefault(det, self.model.with_determinism(det))
        pos = torch.tensor(positions, dtype=torch.int64)  # [T]
        token_slots = all_slots.view(-1)[torch.tensor(owner, dtype=torch.int64) * (width * bs) + pos]  # [T]
        batch = ForwardBatch(torch.tensor(ids, dtype=torch.int64), pos, seqs,
                             torch.tensor(logits_rows, dtype=torch.int64), grid, token_slots)
        self.forward_rows.append(len(ids))
        return model.forward(batch, self.kv)

    def _finish_reason(self, seq: Request, token: int) -> str | None:
        return finish_reason(seq.params, token, len(seq.output), seq.num_tokens, self.max_model_len, self.eos_ids)
