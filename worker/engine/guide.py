"""The per-sequence steering of constrained decoding and of the reasoning budget: which tokens the next sample may
take (a row of xgrammar's token bitmask), and the state after each token.

A K2 Thinking answer is `[<think>] reasoning </think> answer`. The reasoning stays free (only the end tokens
are withheld, so it cannot stop before answering); past `max_reasoning_tokens` the guide forces `</think>`.
The answer then follows its constraint: one JSON value, or K2's tool-call section

    <|tool_calls_section_begin|> ( <|tool_call_begin|> functions.NAME:i <|tool_call_argument_begin|> ARGS
    <|tool_call_end|> )+ <|tool_calls_section_end|> <|im_end|>

where xgrammar constrains the id and the arguments (against NAME's parameters) and the guide places the special
tokens. The state is a function of the tokens accepted, so a resumed sequence replays its tokens to rebuild it.
"""

from __future__ import annotations

import enum

import torch
import xgrammar as xgr

from k2serve.sampling_params import SamplingParams
from k2serve.worker.engine.grammar import ConstraintGrammars, GrammarVocab


class GuideViolation(ValueError):
    """A token the constraint does not allow where it stands (e.g. a resumed prefix from another request)."""


class Phase(enum.Enum):
    THINK = "think"
    FREE = "free"  # an unconstrained answer
    TOOLS_OPTIONAL = "tools_optional"  # free, but a tool-call section it starts is constrained
    JSON = "json"
    SECTION_BEGIN = "section_begin"
    CALL_BEGIN = "call_begin"
    CALL_ID = "call_id"
    ARGUMENTS = "arguments"
    AFTER_CALL = "after_call"
    END = "end"  # only an end-of-turn token may follow


def _word_bit(token: int) -> tuple[int, int]:
    """(word, signed int32 value of the token's bit) in xgrammar's bitmask layout (little-endian bits)."""
    word, bit = divmod(token, 32)
    value = 1 << bit
    return word, value - (1 << 32) if bit == 31 else value


def set_tokens(row: torch.Tensor, tokens: list[int] | tuple[int, ...]) -> None:
    """row [W] int32: marks `tokens` allowed."""
    for t in tokens:
        word, value = _word_bit(t)
        row[word] = int(row[word]) | value


def clear_tokens(row: torch.Tensor, tokens: list[int] | tuple[int, ...]) -> None:
    """row [W] int32: marks `tokens` not allowed."""
    for t in tokens:
        word, value = _word_bit(t)
        row[word] = int(row[word]) & ~value


def has_token(row: torch.Tensor, token: int) -> bool:
    word, value = _word_bit(token)
    return bool(int(row[word]) & value)


class Guide:
    def __init__(self, params: SamplingParams, vocab: GrammarVocab, grammars: ConstraintGrammars | None) -> None:
        self.constraint = params.constraint
        self.budget = params.max_reasoning_tokens
        self.vocab = vocab
        self.grammars = grammars
        self.reasoning = 0  # tokens spent in the thinking section
        self.calls = 0  # tool calls started
        self._matcher: xgr.GrammarMatcher | None = None
        self._id_text = b""  # the current call id's bytes, to know which tool's arguments follow
        after_think = self.constraint is None or self.constraint.after_think
        self.phase = Phase.THINK if after_think else self._answer_phase()

    def _answer_phase(self) -> Phase:
        c = self.constraint
        if c is None:
            return Phase.FREE
        if c.kind == "json":
            assert self.grammars is not None and self.grammars.answer is not None
            self._matcher = xgr.GrammarMatcher(self.grammars.answer)
            return Phase.JSON
        return Phase.SECTION_BEGIN if c.required else Phase.TOOLS_OPTIONAL

    @property
    def masks(self) -> bool:
        """Whether the next token is restricted at all (a free answer, or free reasoning without a budget or a
        constraint after it, needs no bitmask row)."""
        if self.phase in (Phase.FREE, Phase.TOOLS_OPTIONAL):
            return False
        free_reasoning = self.constraint is None or not self.constraint.required
        return not (self.phase is Phase.THINK and free_reasoning and not self._budget_spent)

    @property
    def _budget_spent(self) -> bool:
        return self.budget is not None and self.reasoning >= self.budget

    def fill(self, row: torch.Tensor) -> None:
        """Writes the allowed next tokens into `row` ([W] int32, xgrammar's layout; its bits past the vocabulary
        are ignored)."""
        v = self.vocab
        phase = self.phase
        if phase is Phase.THINK:
            if self._budget_spent:
                return self._only(row, (v.think_end,))
            row.fill_(-1)
            if self.constraint is not None and self.constraint.required:  # no end before the constrained answer
                banned = list(v.eos_ids)
                if self.constraint.kind == "json":
                    banned.append(v.section_begin)
                clear_tokens(row, banned)
        elif phase is Phase.JSON:
            self._fill_matcher(row, None)
        elif phase is Phase.SECTION_BEGIN:
            self._only(row, (v.section_begin,))
        elif phase is Phase.CALL_BEGIN:
            self._only(row, (v.call_begin,))
        elif phase is Phase.CALL_ID:
            self._fill_matcher(row, v.argument_begin)
        elif phase is Phase.ARGUMENTS:
            self._fill_matcher(row, v.call_end)
        elif phase is Phase.AFTER_CALL:
            self._only(row, self._after_call())
        elif phase is Phase.END:
            self._only(row, v.eos_ids)
        else:
            row.fill_(-1)

    def _after_call(self) -> tuple[int, ...]:
        """Another call (when parallel calls are allowed and ids remain) or the section's end."""
        v = self.vocab
        assert self.constraint is not None and self.grammars is not None
        more = self.constraint.parallel and self.calls < len(self.grammars.call_ids)
        return (v.call_begin, v.section_end) if more else (v.section_end,)

    @staticmethod
    def _only(row: torch.Tensor, tokens: tuple[int, ...]) -> None:
        row.zero_()
        set_tokens(row, tokens)

    def _fill_matcher(self, row: torch.Tensor, terminator: int | None) -> None:
        """xgrammar's mask; inside an answer the grammar's end (its stop tokens) becomes `terminator`."""
        assert self._matcher is not None
        self._matcher.fill_next_token_bitmask(row.view(1, -1))
        if terminator is None:
            return
        ends = any(has_token(row, t) for t in self.vocab.eos_ids)
        clear_tokens(row, self.vocab.eos_ids)
        if ends:
            set_tokens(row, (terminator,))

    def accept(self, token: int) -> None:
        """Advances past `token`; GuideViolation if the constraint does not allow it here."""
        v = self.vocab
        phase = self.phase
        if phase is Phase.THINK:
            if token == v.think_end:
                self.phase = self._answer_phase()
                return
            if self._budget_spent:
                raise GuideViolation(f"token {token}: the reasoning budget of {self.budget} is spent")
            c = self.constraint
            if c is not None and token == v.section_begin and c.kind == "tool_calls":
                self.phase = Phase.CALL_BEGIN  # K2's reasoning also ends at the tool-call section
                return
            if c is not None and c.required and (token in v.eos_ids or (token == v.section_begin and c.kind == "json")):
                raise GuideViolation(f"token {token} would end the turn before its constrained answer")
            self.reasoning += 1
        elif phase is Phase.FREE:
            return
        elif phase is Phase.TOOLS_OPTIONAL:
            if token == v.section_begin:
                self.phase = Phase.CALL_BEGIN
        elif phase is Phase.JSON:
            self._advance_matcher(token)
            if token in v.eos_ids:
                self.phase = Phase.END
        elif phase is Phase.SECTION_BEGIN:
            self._expect(token, (v.section_begin,), Phase.CALL_BEGIN)
        elif phase is Phase.CALL_BEGIN:
            self._expect(token, (v.call_begin,), Phase.CALL_ID)
            assert self.grammars is not None
            self._matcher = xgr.GrammarMatcher(self.grammars.call_ids[self.calls])
            self._id_text = b""
            self.calls += 1
        elif phase is Phase.CALL_ID:
            if token == v.argument_begin and self._can_end():
                name = self._id_text.decode()[len("functions."):].rsplit(":", 1)[0]
                assert self.grammars is not None
                self._matcher = xgr.GrammarMatcher(self.grammars.arguments[name])
                self.phase = Phase.ARGUMENTS
                return
            self._advance_matcher(token)
            self._id_text += v.encoded[token]
        elif phase is Phase.ARGUMENTS:
            if token == v.call_end and self._can_end():
                self._matcher = None
                self.phase = Phase.AFTER_CALL
                return
            self._advance_matcher(token)
        elif phase is Phase.AFTER_CALL:
            self._expect(token, self._after_call(), Phase.CALL_BEGIN if token == v.call_begin else Phase.END)
            if token == v.call_begin:
                self.accept(token)
        elif phase is Phase.END:
            self._expect(token, v.eos_ids, Phase.END)

    def _expect(self, token: int, allowed: tuple[int, ...], then: Phase) -> None:
        if token not in allowed:
            raise GuideViolation(f"token {token} where the constraint needs one of {list(allowed)}")
        self.phase = then

    def _can_end(self) -> bool:
        assert self._matcher is not None
        return self._matcher.is_completed()

    def _advance_matcher(self, token: int) -> None:
        assert self._matcher is not None
        if token in self.vocab.eos_ids and not self._matcher.is_completed():
            raise GuideViolation(f"token {token} ends the answer before its JSON is complete")
        if not self._matcher.accept_token(token):
            raise GuideViolation(f"token {token} breaks the constrained answer's grammar")
