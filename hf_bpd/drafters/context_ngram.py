"""
Context n-gram drafting (prompt lookup) over each row's own prompt and output, batch-aware.

A row's last `n` committed tokens are looked up earlier in the same row (`n` from `max_ngram` down to `min_ngram`,
as transformers' `PromptLookupCandidateGenerator` does); the tokens that followed the match are the draft. Unlike
transformers (batch 1, the *first* match from the left), every row is matched on its own, and the *most recent*
earlier occurrence wins: recent text is the likeliest to be copied again (a quoted line, a loop, a variable name).
A row's context is `tokens[b, prompt_start[b] : lengths[b]]`: left padding is skipped by position, never by value
(a real token may equal the pad id).

Two ways to use a match with a model's draft tree (SAM-Decoding, llama.cpp; `bpd-algorithms.md` section 8):
- [`merge_match`]: the match as one more branch of the tree, sharing the tree's nodes where its prefix is already
  there (one shape for the batch: the deepest node whose path is a prefix of every matching row's match).
- [`switch_to_match`]: a long match (suffix match length `>= switch_length`, SAM-Decoding's rule with 4) replaces the
  tree. Batch > 1 shares one tree shape, so it switches only when every live row has a long match.
[`ContextNgramDrafter`] uses them through `Drafter.propose(ctx)`; alone (no inner drafter) it is prompt lookup: a
chain of the match's tokens, or a plain greedy step (no draft node) when no live row matches. A match may be deeper
than the heads (`max_depth`, default 10 tokens: prompt lookup copies long spans); the loop then verifies up to that
depth (`Drafter.max_depth`).

Merge or switch? Measured on the 10M reference (fp32, 1 thread, block efficiency and speed vs greedy, 3 validation
prompts per domain): with a fixed budget, "both" (switch when the suffix match is >= 4 tokens, else merge) was best:
a long match is accepted far deeper than the heads' tree, so replacing the tree saves its width; a short match is
worth one extra branch. Under width from cost ([`~hf_bpd.drafters.auto.AutoDrafter`]) merging alone is enough: the
chooser prunes the tree's unlikely nodes itself when the match is likely, so the composed default merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tree import DraftTree, tree_from_parents
from .base import DraftContext, Drafter

RULES = ("merge", "switch", "both")


@dataclass
class ContextMatch:
    """
    Each row's prompt-lookup match.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, num_tokens)`): the continuation after the match, `-1` past its
            end and for rows without a match.
        ngram (`torch.LongTensor` of shape `(batch,)`): `n` of the matched n-gram, 0 for no match.
        length (`torch.LongTensor` of shape `(batch,)`): the suffix match length: how many of the row's last tokens
            equal the tokens before the continuation (`>= ngram`, at most `max_match`), 0 for no match.
        start (`torch.LongTensor` of shape `(batch,)`): index (in the row's `tokens`) of the continuation's first
            token, `-1` for no match.
    """

    tokens: torch.LongTensor
    ngram: torch.LongTensor
    length: torch.LongTensor
    start: torch.LongTensor

    @property
    def found(self) -> torch.BoolTensor:
        """`(batch,)`: rows with a match."""
        return self.ngram > 0

    @property
    def num_found_tokens(self) -> torch.LongTensor:
        """`(batch,)`: valid continuation tokens per row (the leading non-`-1` entries)."""
        return (self.tokens >= 0).long().sum(dim=-1)


def find_context_match(
    tokens: torch.LongTensor,
    lengths: torch.LongTensor,
    prompt_start: torch.LongTensor,
    num_tokens: int,
    live: torch.BoolTensor | None = None,
    max_ngram: int = 3,
    min_ngram: int = 1,
    cyclic: bool = False,
    max_match: int = 64,
) -> ContextMatch:
    """
    For each live row, the most recent earlier occurrence of its last `n` tokens (largest `n` first) within its own
    context, and up to `num_tokens` tokens that followed it.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, buffer_len)`): committed tokens; row `b`'s context is
            `tokens[b, prompt_start[b] : lengths[b]]` (anything outside it is never read as context).
        lengths (`torch.LongTensor` of shape `(batch,)`): committed length of each row.
        prompt_start (`torch.LongTensor` of shape `(batch,)`): first real token of each row (after left padding).
        num_tokens (`int`): continuation tokens to return.
        live (`torch.BoolTensor` of shape `(batch,)`, *optional*): rows to match (others get no match).
        max_ngram, min_ngram (`int`): the n-gram sizes tried, largest first.
        cyclic (`bool`): when the continuation runs into the row's end, continue it as the repetition it implies
            (token `k` after a match ending `d` tokens before the end is `tokens[start + k % d]`); otherwise stop
            there, as transformers does.
        max_match (`int`): the suffix match length is counted up to this.
    Returns:
        [`ContextMatch`].
    """
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"Need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}.")
    batch = tokens.shape[0]
    device = tokens.device
    lengths, prompt_start = lengths.to(device), prompt_start.to(device)
    live = torch.ones(batch, dtype=torch.bool, device=device) if live is None else live.to(device)
    tokens = tokens[:, : max(int(lengths.max()), 1)]  # nothing past the longest row is context
    start = torch.full((batch,), -1, dtype=torch.long, device=device)  # of the matched n-gram
    ngram = torch.zeros(batch, dtype=torch.long, device=device)
    for n in range(max_ngram, min_ngram - 1, -1):
        todo = live & (ngram == 0) & (lengths - n - 1 >= prompt_start)  # room for the suffix and one earlier n-gram
        if n >= tokens.shape[1] or not bool(todo.any()):
            continue
        suffix = tokens.gather(1, (lengths[:, None] - n + torch.arange(n, device=device)).clamp(min=0))  # (B, n)
        hits = (tokens.unfold(1, n, 1) == suffix[:, None]).all(dim=-1)  # (B, S): n-gram at s equals the suffix
        s = torch.arange(hits.shape[1], device=device)[None]
        hits &= (s >= prompt_start[:, None]) & (s + n < lengths[:, None]) & todo[:, None]
        latest = torch.where(hits, s, -1).max(dim=-1).values  # the most recent occurrence, -1 for none
        found = latest >= 0
        start = torch.where(found, latest, start)
        ngram = torch.where(found, n, ngram)
    found = ngram > 0
    cont = torch.where(found, start + ngram, -1)  # first continuation token
    return ContextMatch(
        tokens=_continuation(tokens, lengths, cont, num_tokens, cyclic),
        ngram=ngram,
        length=_suffix_match_length(tokens, lengths, prompt_start, cont, max_match),
        start=cont,
    )


def _continuation(
    tokens: torch.LongTensor, lengths: torch.LongTensor, cont: torch.LongTensor, num_tokens: int, cyclic: bool
) -> torch.LongTensor:
    """`(B, num_tokens)` tokens from `cont` on (`-1` where there is no match, and past the row's end unless cyclic)."""
    k = torch.arange(num_tokens, device=tokens.device)[None]
    found = (cont >= 0)[:, None]
    if cyclic:
        period = (lengths - cont).clamp(min=1)[:, None]  # the match ends `period` tokens before the row's end
        index = cont[:, None] + k % period
        valid = found.expand_as(index)
    else:
        index = cont[:, None] + k
        valid = found & (index < lengths[:, None])
    values = tokens.gather(1, index.clamp(0, tokens.shape[1] - 1))
    return torch.where(valid, values, -1)


def _suffix_match_length(
    tokens: torch.LongTensor,
    lengths: torch.LongTensor,
    prompt_start: torch.LongTensor,
    cont: torch.LongTensor,
    max_match: int,
) -> torch.LongTensor:
    """How many tokens before `cont` equal the row's last tokens (from the end backwards, inside the context)."""
    k = torch.arange(1, max_match + 1, device=tokens.device)[None]
    earlier, recent = cont[:, None] - k, lengths[:, None] - k
    valid = (earlier >= prompt_start[:, None]) & (cont >= 0)[:, None]
    last = tokens.shape[1] - 1
    same = tokens.gather(1, earlier.clamp(0, last)) == tokens.gather(1, recent.clamp(0, last))
    return (same & valid).long().cumprod(dim=-1).sum(dim=-1)


# ------------------------------------------------------------------------------------------------ match and tree
def match_chain(match: ContextMatch, max_depth: int, fill_token: int = 0) -> DraftTree:
    """
    The matches as a single chain (prompt lookup alone): as deep as the longest live match (at most `max_depth`),
    shorter rows padded with `fill_token` (verified and rejected like any wrong draft). No match in any row gives the
    root alone: a plain greedy step.
    """
    depth = min(int(match.num_found_tokens.max()) if match.tokens.numel() else 0, max_depth)
    chain = match.tokens[:, :depth]
    chain = torch.where(chain >= 0, chain, fill_token)
    return DraftTree(tokens=chain, layout=tree_from_parents(tuple(range(-1, depth)), chain.device))


def merge_match(tree: DraftTree, match: ContextMatch, max_depth: int, fill_token: int = 0) -> DraftTree:
    """
    `tree` with the matches as one more branch, attached at the deepest node whose path is a prefix of every matching
    row's match (the root when there is none), so nodes the tree already has are not drafted twice where the rows
    agree. Where they do not (batch > 1), a row's branch may repeat tokens of its tree: wasted width, still lossless.

    Args:
        tree ([`~hf_bpd.tree.DraftTree`]): a deterministic draft tree (`proposals` None).
        match ([`ContextMatch`]): the rows' matches; rows without one fill the branch with `fill_token`.
        max_depth (`int`): the branch stops at this depth (the loop verifies at most `h` tokens along a path).
        fill_token (`int`): token of branch nodes a row has no match token for.
    Returns:
        [`~hf_bpd.tree.DraftTree`]: the tree's nodes (unchanged, in their order), then the branch's.
    """
    if tree.proposals is not None:
        raise ValueError("merge_match adds a deterministic branch: the tree must not carry sampling proposals.")
    found = match.found & (match.num_found_tokens > 0)
    if not bool(found.any()):
        return tree
    layout = tree.layout
    depth_of = layout.depth.tolist()
    wanted = match.num_found_tokens.clamp(max=max_depth)  # (B,) match tokens a row can use
    attach = _attach_node(tree, match.tokens, found, wanted)
    base_depth = depth_of[attach]
    extra = int(wanted[found].max()) - base_depth
    if extra <= 0:
        return tree
    k = torch.arange(base_depth, base_depth + extra, device=match.tokens.device)
    branch = match.tokens.gather(1, k[None].expand(match.tokens.shape[0], -1).clamp(max=match.tokens.shape[1] - 1))
    branch = torch.where((branch >= 0) & found[:, None], branch, fill_token)
    width = layout.width
    parents = tuple(layout.parent.tolist()) + (attach,) + tuple(range(width, width + extra - 1))
    tokens = torch.cat([tree.tokens, branch.to(tree.tokens.device)], dim=1)
    return DraftTree(tokens=tokens, layout=tree_from_parents(parents, layout.depth.device))


def _attach_node(tree: DraftTree, match_tokens: torch.LongTensor, found: torch.BoolTensor, wanted: torch.LongTensor):
    """The deepest node (first on ties) whose path equals the first `depth` match tokens of every matching row."""
    layout = tree.layout
    paths = tree.path_drafts()[:, layout.draft_of_node]  # (B, W, D): a path through each node
    d = paths.shape[-1]
    padded = torch.full((match_tokens.shape[0], d), -2, dtype=match_tokens.dtype, device=match_tokens.device)
    m = min(d, match_tokens.shape[1])
    padded[:, :m] = match_tokens[:, :m]
    depth = layout.depth.to(paths.device)
    inside = torch.arange(d, device=paths.device)[None] < depth[:, None]  # (W, D): positions on the node's path
    agree = ((paths == padded.to(paths.device)[:, None]) | ~inside[None]).all(dim=-1)  # (B, W)
    agree &= depth[None] <= wanted.to(paths.device)[:, None]
    ok = agree[found.to(paths.device)].all(dim=0)  # (W,), the root always qualifies
    return int(torch.where(ok, depth, -1).argmax())


def switch_to_match(
    tree: DraftTree,
    match: ContextMatch,
    switch_length: int,
    max_depth: int,
    live: torch.BoolTensor | None = None,
    fill_token: int = 0,
) -> DraftTree | None:
    """
    SAM-Decoding's rule: when every live row's suffix match is at least `switch_length` tokens long (and has a
    continuation), the match chain ([`match_chain`]) replaces the tree; otherwise None (keep or merge the tree).
    """
    live = torch.ones_like(match.found) if live is None else live.to(match.found.device)
    long_match = (match.length >= switch_length) & (match.num_found_tokens > 0)
    if not bool(live.any()) or not bool(long_match[live].all()):
        return None
    return match_chain(match, max_depth, fill_token)


def prompt_start_of(attention_mask: torch.LongTensor) -> torch.LongTensor:
    """`(batch,)`: index of each row's first attended position (its first real token after left padding)."""
    mask = attention_mask.bool()
    first = mask.long().argmax(dim=-1)  # the first maximum
    return torch.where(mask.any(dim=-1), first, mask.shape[-1])


# ------------------------------------------------------------------------------------------------ the drafter
class ContextNgramDrafter(Drafter):
    """
    Prompt lookup as a drafter: alone (`inner=None`), or combined with another drafter's drafts by `rule`.

    Args:
        inner ([`~hf_bpd.drafters.Drafter`], *optional*): the model's drafter (e.g. `HeadsDrafter()` or a tree
            drafter); None: prompt lookup alone (a chain of the match, or a plain greedy step without one).
        rule (`str`): how a match joins the inner drafts: `"merge"` (an extra branch, [`merge_match`]), `"switch"`
            (a long match replaces them, [`switch_to_match`]) or `"both"` (switch when long, else merge).
        max_ngram, min_ngram (`int`): n-gram sizes tried, largest first.
        switch_length (`int`): suffix match length from which a match replaces the inner drafts.
        cyclic (`bool`): continue a match that runs into the row's end as a repetition (see [`find_context_match`]).
        fill_token (`int`): token of branch nodes a row has no match token for (any id: such nodes are verified and
            rejected like wrong drafts).
        max_depth (`int`, defaults to 10): deepest match token drafted (may exceed the model's `h`).

    When the loop samples with proposals (speculative sampling), the inner drafter's sampled drafts are returned
    unchanged: a deterministic branch has no proposal distribution to verify it against. Alone, the match chain
    carries no proposals, so the loop verifies it by "sample, then match" (exact). A stateful inner drafter's
    `update` receives the row's accepted length even when the row kept the match's path.
    """

    num_drafts = 1

    def __init__(
        self,
        inner: Drafter | None = None,
        rule: str = "both",
        max_ngram: int = 3,
        min_ngram: int = 1,
        switch_length: int = 4,
        cyclic: bool = False,
        fill_token: int = 0,
        max_depth: int = 10,
    ):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"Need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}.")
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"max_depth must be an integer >= 1 (match tokens drafted), got {max_depth!r}.")
        self.inner, self.rule = inner, rule
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.switch_length, self.cyclic, self.fill_token = switch_length, cyclic, fill_token
        self.max_depth = max_depth
        self.num_drafts = 1 if inner is None else inner.num_drafts
        self.hidden_states = getattr(inner, "hidden_states", "last")
        self.requires_independent_heads = bool(getattr(inner, "requires_independent_heads", False))
        inner_width = _max_block_width(inner)
        self.max_block_width = None if inner_width is None else inner_width + max_depth
        self.reset()

    def reset(self) -> None:
        self.steps = self.matched_steps = self.switched_steps = 0
        if self.inner is not None:
            self.inner.reset()

    def update(self, accepted_lengths: torch.LongTensor, chosen: torch.LongTensor) -> None:
        if self.inner is not None:
            self.inner.update(accepted_lengths, chosen.clamp(max=self.inner.num_drafts - 1))

    def match(self, ctx: DraftContext) -> ContextMatch:
        """This step's matches: up to `ctx.max_tokens` tokens per live row (the pure [`find_context_match`])."""
        return find_context_match(
            ctx.tokens,
            ctx.lengths,
            ctx.prompt_start,
            min(ctx.max_tokens, self.max_depth),
            ctx.live,
            self.max_ngram,
            self.min_ngram,
            self.cyclic,
        )

    def propose(self, ctx: DraftContext) -> DraftTree:
        inner = None if self.inner is None else self.inner.propose(ctx)
        if ctx.sampling and inner is not None and inner.proposals is not None:
            return inner
        match = self.match(ctx)
        self.steps += 1
        self.matched_steps += int(match.found[ctx.live].any())
        depth = min(ctx.max_tokens, self.max_depth)
        if inner is None:
            return match_chain(match, depth, self.fill_token)
        tree = DraftTree(inner.tokens, inner.layout, None, inner.candidate) if inner.proposals is not None else inner
        if self.rule in ("switch", "both"):
            switched = switch_to_match(tree, match, self.switch_length, depth, ctx.live, self.fill_token)
            if switched is not None:
                self.switched_steps += 1
                return switched
        return merge_match(tree, match, depth, self.fill_token) if self.rule != "switch" else tree


def _max_block_width(drafter: Drafter | None) -> int | None:
    """The verify block a drafter declares (root included), 1 for none, None when unknown."""
    if drafter is None:
        return 1
    for name, extra in (("max_block_width", 0), ("num_nodes", 1)):
        value = getattr(drafter, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value + extra
    return None
