"""Token-conditioned draft heads (`head_type="recurrent"`): the head, its training, its drafting, lossless decoding."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import VOCAB, batch_prompts, randomize_heads, tiny_base
from test_sampling import chi_square_pvalue
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from hf_bpd import BPDConfig, BPDForCausalLM
from hf_bpd.drafters import HeadsDrafter, SearchDrafter, StaticTreeDrafter
from hf_bpd.drafters.base import ChainDrafter, DraftContext, DraftHeadsView
from hf_bpd.heads import HEAD_TYPES, teacher_tokens
from hf_bpd.losses import prefix_accuracy_counts
from hf_bpd.recurrent_heads import PathStates, RecurrentHeads

H = 3


def recurrent(base=None, **config) -> BPDForCausalLM:
    return BPDForCausalLM.from_base(
        base if base is not None else tiny_base(), num_draft_heads=H, head_type="recurrent", **config
    )


# --------------------------------------------------------------------------------------------- the head
@pytest.mark.parametrize("layers", [1, 2])
def test_untrained_recurrent_heads_are_resblock_heads(arch, layers):
    """Zero-initialised: whatever the tokens, an untrained head is a resblock head with the same blocks."""
    base = tiny_base(arch)
    cond = recurrent(base, head_num_layers=layers)
    plain = randomize_heads(BPDForCausalLM.from_base(base, num_draft_heads=H, head_num_layers=layers), std=0.2)
    with torch.no_grad():  # the same (non-zero) blocks in both
        for k in range(H):
            cond.heads[k].blocks.load_state_dict(plain.heads[k].state_dict())
    assert RecurrentHeads.independent is False and HEAD_TYPES["recurrent"] is RecurrentHeads
    hidden = torch.randn(2, 5, 32)
    for seed in range(2):
        prev = torch.randint(0, VOCAB, (2, 5, H), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(cond.draft_logits(hidden, prev), plain.draft_logits(hidden))
    # and once P moves, the tokens matter
    with torch.no_grad():
        cond.heads[1].out_proj.weight.normal_()
    a = cond.draft_logits(hidden, torch.zeros(2, 5, H, dtype=torch.long) + 5)
    b = cond.draft_logits(hidden, torch.zeros(2, 5, H, dtype=torch.long) + 6)
    torch.testing.assert_close(a[..., 0, :], b[..., 0, :])  # head 0's P is still zero: it ignores the tokens
    assert not torch.allclose(a[..., 1, :], b[..., 1, :])


def test_ffn_blocks_start_as_the_identity_learn_and_round_trip(tmp_path):
    """`head_intermediate_size`: FFN blocks (EAGLE-sized MLP) instead of ResBlocks: an untrained head is still
    `Blocks(h_t) = h_t` (a resblock head's start), a gradient step moves it, and it saves and loads strictly."""
    base = tiny_base("llama")
    cond = recurrent(base, head_intermediate_size=48, head_num_layers=2)
    plain = BPDForCausalLM.from_base(base, num_draft_heads=H)
    assert all(type(b).__name__ == "FFNBlock" for k in range(H) for b in cond.heads[k].blocks)
    hidden, prev = torch.randn(2, 5, 32), torch.randint(0, VOCAB, (2, 5, H))
    torch.testing.assert_close(cond.draft_logits(hidden, prev), plain.draft_logits(hidden))
    labels = torch.randint(0, VOCAB, (2, 5))
    out = cond(base_hidden_states=hidden, labels=labels)
    out.loss.backward()
    assert (
        cond.heads[0].blocks[0].down.weight.grad.abs().sum() > 0 and cond.heads[1].out_proj.weight.grad.abs().sum() > 0
    )
    randomize_heads(cond, std=0.1)
    cond.save_pretrained(tmp_path / "ffn")
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "ffn", base_model=base)
    assert loaded.config.head_intermediate_size == 48
    torch.testing.assert_close(loaded.draft_logits(hidden, prev), cond.draft_logits(hidden, prev))
    with pytest.raises(ValueError, match="head_intermediate_size applies to head_type='recurrent' or 'context' only"):
        BPDConfig(head_type="resblock", head_intermediate_size=48)
    with pytest.raises(ValueError, match="head_intermediate_size must be an integer >= 1"):
        BPDConfig(head_type="recurrent", head_intermediate_size=0)


def test_grown_heads_compute_what_the_narrow_heads_computed_and_then_learn():
    """`load_grown_heads` (Net2Net widening): trained ResBlock heads, or narrower FFN heads, loaded into wider FFN
    heads give the same logits, the new inner units get gradient, and mismatches are refused with the tensor named."""
    from hf_bpd.heads import load_grown_heads

    base = tiny_base("llama")
    hidden, prev = torch.randn(2, 5, 32), torch.randint(0, VOCAB, (2, 5, H))
    for source_config in ({}, {"head_intermediate_size": 40}):
        narrow = randomize_heads(recurrent(base, head_num_layers=2, **source_config), std=0.3)
        wide = recurrent(base, head_num_layers=2, head_intermediate_size=64)
        # the source's dtype (here float64) and device are the target's after loading
        grown = load_grown_heads(wide.heads, {k: v.double() for k, v in narrow.heads.state_dict().items()})
        assert len(grown) == H * 2 * 4  # up/down weight and bias of every block
        torch.testing.assert_close(wide.draft_logits(hidden, prev), narrow.draft_logits(hidden, prev))
        wide(base_hidden_states=hidden, labels=torch.randint(0, VOCAB, (2, 5))).loss.backward()
        # the new units' output columns start at zero but learn (their inputs W_1[m:] are random)
        assert wide.heads[0].blocks[0].down.weight.grad[:, 40:].abs().sum() > 0
    with pytest.raises(ValueError, match=r"32 inner units\) is wider than 16 x 32"):
        load_grown_heads(recurrent(base, head_intermediate_size=16).heads, recurrent(base).heads.state_dict())
    with pytest.raises(ValueError, match="no source of that shape"):  # one block trained, two wanted
        load_grown_heads(
            recurrent(base, head_num_layers=2, head_intermediate_size=64).heads, recurrent(base).heads.state_dict()
        )
    with pytest.raises(ValueError, match="no place in these heads"):  # two blocks trained, one wanted
        load_grown_heads(
            recurrent(base, head_intermediate_size=64).heads, recurrent(base, head_num_layers=2).heads.state_dict()
        )


def test_output_j_reads_only_its_prefix_and_steps_match_forward():
    model = randomize_heads(recurrent(), std=0.3)
    hidden = torch.randn(4, 32)
    prev = torch.randint(0, VOCAB, (4, H))
    full = model.draft_logits(hidden, prev)
    for j in range(H):  # causality: output j sees prev[..., : j + 1] only
        torch.testing.assert_close(model.draft_logits(hidden, prev[:, : j + 1])[:, j], full[:, j])
        changed = prev.clone()
        changed[:, j + 1 :] = (changed[:, j + 1 :] + 1) % VOCAB
        torch.testing.assert_close(model.draft_logits(hidden, changed)[:, j], full[:, j])
    states = PathStates(model, hidden, prev[:, 0])  # one step per depth, parents looked up
    rows = torch.arange(4)
    for j in range(H):
        torch.testing.assert_close(states.logits(prev[:, 1 : j + 1], rows), full[:, j])
    fresh = PathStates(model, hidden, prev[:, 0])  # a caller that skips depths: recomputed from the root
    torch.testing.assert_close(fresh.logits(prev[:, 1:H], rows), full[:, H - 1])


def test_save_load_strict_first_heads_and_model_card(tmp_path):
    model = randomize_heads(recurrent(), std=0.1)
    model.save_pretrained(
        tmp_path / "heads",
        training_info={
            "head_metrics": {
                "split": "evaluation",
                "top1": [0.5, 0.4, 0.3],
                "top5": [0.9, 0.8, 0.7],
                "top1_given_prefix": [0.5, 0.6, 0.7],
            },
            "seconds_this_session": 120,
            "resumed_from_step": 855,
            "epochs": 2.17,
            "epochs_planned": 2.5,
            "command": "python examples/build_smollm2.py --stages heads",
        },
    )
    loaded = BPDForCausalLM.from_pretrained(tmp_path / "heads", base_model=model.base)
    hidden, prev = torch.randn(2, 32), torch.randint(0, VOCAB, (2, H))
    torch.testing.assert_close(loaded.draft_logits(hidden, prev), model.draft_logits(hidden, prev))
    assert not any("embed" in k for k in loaded.heads_state_dict())  # E is the base's, never saved
    card = (tmp_path / "heads" / "README.md").read_text()
    assert "token-conditioned" in card and "given a correct prefix" in card
    # a resumed run's wall time is labelled as covering only the steps after its checkpoint
    assert "| training wall time (s) of the run resumed at step 855 | 120 |" in card
    assert "`python examples/build_smollm2.py --stages heads`" in card
    # a run stopped by its time budget says how far it got beside what was planned
    assert "| epochs over the cached targets | 2.17 |" in card and "| epochs planned " in card
    two = model.first_heads(2)
    torch.testing.assert_close(two.draft_logits(hidden, prev[:, :2]), model.draft_logits(hidden, prev)[:, :2])
    # strict: a resblock config cannot read these heads, and the error names the head type
    config = BPDConfig.from_pretrained(tmp_path / "heads")
    config.head_type = "resblock"
    with pytest.raises(ValueError, match="head_type='resblock'"):
        BPDForCausalLM.from_pretrained(tmp_path / "heads", base_model=model.base, config=config)


def test_bad_input_errors():
    model = recurrent()
    hidden = torch.randn(2, 32)
    with pytest.raises(ValueError, match="prev_tokens"):
        model.draft_logits(hidden)
    with pytest.raises(ValueError, match="base-vocabulary token ids"):
        model.draft_logits(hidden, torch.tensor([[VOCAB], [3]]))
    with pytest.raises(ValueError, match="-100"):
        model.draft_logits(hidden, torch.tensor([[-100], [3]]))
    with pytest.raises(ValueError, match="at most 3"):
        model.draft_logits(hidden, torch.zeros(2, H + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="newer hf_bpd"):  # what an older reader of a newer head type says
        BPDConfig(head_type="hydra")
    from hf_bpd.export import export_medusa

    with pytest.raises(ValueError, match="serving.md"):
        export_medusa(model, "/nonexistent/never-written")


def test_draft_vocabulary_restricts_outputs_not_the_conditioning_token():
    """A token outside the draft vocabulary is never drafted, but it is still read (full input embedding)."""
    model = randomize_heads(recurrent(draft_vocab_size=20), std=0.3)
    model.set_draft_vocab(torch.arange(20, 40))
    hidden = torch.randn(1, 32)
    outside_a, outside_b = torch.tensor([[80, 5]]), torch.tensor([[81, 5]])  # 80, 81: not in the draft vocabulary
    a, b = model.draft_logits(hidden, outside_a), model.draft_logits(hidden, outside_b)
    assert not torch.allclose(a[:, 0], b[:, 0])  # the conditioning token was read
    assert bool(a[:, 0, :20].max() < a[:, 0, 20:40].min())  # outputs: draft vocabulary only
    assert set(model.draft_argmax(hidden, outside_a).flatten().tolist()) <= set(range(20, 40))


def test_prefix_accuracy_counts_by_hand():
    labels = torch.tensor([[9, 9, 1, 2, 3, 4, 9]])  # head i at position t predicts labels[t + 2 + i]
    logits = torch.full((1, 7, 2, 10), -1.0)
    best = {(0, 0): 1, (0, 1): 2, (1, 0): 7, (1, 1): 3, (2, 0): 3, (2, 1): 4}  # (t, head) -> argmax
    for (t, i), tok in best.items():
        logits[0, t, i, tok] = 1.0
    hits, totals = prefix_accuracy_counts(logits, labels)
    # positions 0..3 have both targets; head 0 right at t=0, 2 (and t=3's argmax is 0 != 4... wrong) -> 2 of 4
    assert hits.tolist() == [2, 2] and totals.tolist() == [4, 2]


# --------------------------------------------------------------------------------------------- training
def pairs_batch(gen: torch.Generator, batch: int = 16, length: int = 24) -> torch.LongTensor:
    """Random token `r`, then `r + 1`, repeated: the token after a random one is known only given that token."""
    r = torch.randint(3, VOCAB - 1, (batch, length // 2), generator=gen)
    return torch.stack([r, r + 1], dim=-1).flatten(1)


def test_teacher_forcing_learns_what_only_the_conditioning_token_tells():
    """Labels as targets: after a random token `r` comes `r + 1`. The conditioned head's first output (predicting
    `x_{t+2}` given `x_{t+1} = r`) learns it; an independent head cannot (r is unknown at `t`)."""
    gen = torch.Generator().manual_seed(0)
    base = tiny_base()
    results = {}
    for kind in ("recurrent", "resblock"):
        torch.manual_seed(0)
        model = BPDForCausalLM.from_base(base, num_draft_heads=2, head_type=kind)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(150):
            ids = pairs_batch(gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        ids = pairs_batch(gen)
        with torch.no_grad():
            logits = model(input_ids=ids, labels=ids).draft_logits
        # positions t with x_{t+1} = r (odd t): head 0 predicts x_{t+2} = r + 1
        results[kind] = float((logits[:, 1:-2:2, 0].argmax(-1) == ids[:, 3::2]).float().mean())
    assert results["recurrent"] > 0.9 and results["resblock"] < 0.3, results


def test_teacher_tokens_and_greedy_conditioning():
    model = randomize_heads(recurrent(), std=0.2)
    ids = torch.randint(3, VOCAB, (2, 10))
    prev = teacher_tokens(ids, H)
    assert torch.equal(prev[:, 0], ids[:, 1 : 1 + H]) and torch.equal(prev[:, -1], torch.zeros(2, H).long())
    with torch.no_grad():
        greedy = model.base(ids).logits.argmax(-1)
        seq = torch.cat([torch.full((2, 1), -100), greedy[:, :-1]], 1)
        explicit = model(input_ids=ids, draft_input_ids=seq).draft_logits
        internal = model(input_ids=ids, draft_input_ids="greedy").draft_logits
        cached = model(
            base_hidden_states=model.base(ids, output_hidden_states=True).hidden_states[-1],
            input_ids=ids,
            draft_input_ids=seq,
        ).draft_logits
    torch.testing.assert_close(internal, explicit)
    torch.testing.assert_close(cached, explicit)
    with pytest.raises(ValueError, match="needs the base model run"):
        model(base_hidden_states=torch.randn(2, 10, 32), draft_input_ids="greedy")


# --------------------------------------------------------------------------------------------- drafting
def ctx_for(model, hidden, last, sampling=False):
    batch = hidden.shape[0]
    tokens = last[:, None]
    return DraftContext(
        tokens,
        torch.ones(batch, dtype=torch.long),
        torch.ones(batch, dtype=torch.bool),
        DraftHeadsView(model),
        hidden,
        H,
        (lambda s: s) if sampling else None,
    )


@pytest.mark.parametrize("head_type", ["recurrent", "resblock"])
def test_path_topk_over_the_draft_vocabulary_equals_the_full_ranking(head_type):
    """`DraftContext.path_topk` ranks the draft vocabulary only (what trees and chains read): the same
    log-probabilities and base ids as the top-k of the full-vocabulary `path_logits`, at every depth."""
    base = tiny_base()
    draft_vocab = torch.arange(3, VOCAB, 2)
    model = BPDForCausalLM.from_base(base, num_draft_heads=H, head_type=head_type, draft_vocab_size=len(draft_vocab))
    model.set_draft_vocab(draft_vocab)
    model = randomize_heads(model, std=0.3)
    hidden, last = torch.randn(3, 32), torch.randint(3, VOCAB, (3,))
    for depth in range(H):
        ctx = ctx_for(model, hidden, last)
        paths = torch.randint(3, VOCAB, (6, depth))
        rows = torch.tensor([0, 1, 2, 0, 1, 2])
        want = torch.log_softmax(ctx.path_logits(paths, rows).float(), dim=-1).topk(4, dim=-1)
        values, ids = ctx_for(model, hidden, last).path_topk(paths, 4, rows)
        torch.testing.assert_close(values, want.values)
        assert torch.equal(ids, want.indices) and bool((ids % 2 == 1).all())  # draft-vocabulary ids only
        again = ctx.path_topk(paths, 4, rows)  # on the context whose full logits exist already: the same
        torch.testing.assert_close(again[0], want.values)
        assert torch.equal(again[1], want.indices)


def test_greedy_chain_is_the_heads_argmax_path_in_h_steps(monkeypatch):
    model = randomize_heads(recurrent(), std=0.3)
    hidden, last = torch.randn(3, 32), torch.randint(3, VOCAB, (3,))
    steps = []
    real_step = RecurrentHeads.step
    monkeypatch.setattr(RecurrentHeads, "step", lambda self, *a: steps.append(a[-1]) or real_step(self, *a))
    chain = HeadsDrafter().propose(ctx_for(model, hidden, last)).path_drafts()[:, 0]
    assert steps == list(range(H))  # one recurrent step per drafted token: the prefix is never recomputed
    path = last[:, None]
    for j in range(H):  # the reference: each token the argmax given the path so far
        path = torch.cat([path, model.draft_logits(hidden, path)[:, j].argmax(-1, keepdim=True)], 1)
    assert torch.equal(chain, path[:, 1:])


def test_trees_condition_every_node_on_its_own_path():
    model = randomize_heads(recurrent(), std=0.5)
    hidden, last = torch.randn(2, 32), torch.randint(3, VOCAB, (2,))
    choices = [[0], [1], [0, 0], [1, 0], [0, 0, 0], [1, 0, 0]]
    tree = StaticTreeDrafter(choices).propose(ctx_for(model, hidden, last))
    drafts = tree.path_drafts()  # (B, P, D)
    for b in range(2):
        for p in range(drafts.shape[1]):
            path = drafts[b, p][drafts[b, p] >= 0]
            for j in range(1, len(path)):  # node j: rank-0 child of its parent's own path
                prev = torch.cat([last[b : b + 1], path[:j]])[None]
                assert int(path[j]) == int(model.draft_logits(hidden[b : b + 1], prev)[0, j].argmax())
    # the two first-level nodes differ, and so may their children: not one per-depth argmax for all nodes
    assert not torch.equal(drafts[:, 0, 0], drafts[:, 1, 0])


def test_lattice_drafters_refuse_conditioned_heads():
    from hf_bpd.drafters import PBestRescorer

    model = recurrent()
    ids, mask = batch_prompts(1)
    with pytest.raises(ValueError, match="independent heads"):
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=4,
            use_bpd=True,
            draft_rescorer=PBestRescorer(top_k=3, num_drafts=2),
        )


# --------------------------------------------------------------------------------------------- lossless
DRAFTERS = {
    "chain": lambda: None,
    "beam": lambda: SearchDrafter(top_k=3, num_drafts=3),
    "static-tree": lambda: StaticTreeDrafter([[0], [1], [0, 0], [1, 0], [0, 0, 0]]),
}


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_random_recurrent_heads_equal_base(arch, batch, drafter):
    model = randomize_heads(recurrent(tiny_base(arch)), std=0.5)
    ids, mask = batch_prompts(batch)
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_bpd=True, draft_rescorer=DRAFTERS[drafter]()
    )
    assert torch.equal(out, ref)


def fit_to_greedy(model, ids, mask, new, steps=1500):
    """Train the heads (teacher-forced) on the base's own greedy continuations of these prompts until perfect."""
    with torch.no_grad():
        seq = model.base.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], new, dtype=mask.dtype)], 1)
    labels = seq.masked_fill(full_mask == 0, -100)
    labels[:, : ids.shape[1] - 1] = -100  # heads at the last prompt position onwards
    with torch.no_grad():
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
        hidden = model.base(
            seq, attention_mask=full_mask, position_ids=positions, output_hidden_states=True
        ).hidden_states[-1]
    opt = torch.optim.Adam(model.heads.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(
            base_hidden_states=hidden, labels=labels, input_ids=seq, return_draft_logits=True, draft_full_vocab=False
        )
        hits, totals = prefix_accuracy_counts(out.draft_logits.detach(), labels)
        if bool((hits == totals).all()) and out.loss.item() < 0.05:
            break
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return seq


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_fitted_recurrent_heads_accept_every_draft(arch, batch):
    """Heads trained on the base's own continuations: every block is accepted in full, output unchanged."""
    torch.manual_seed(0)
    model = recurrent(tiny_base(arch), head_num_layers=2)
    model.generation_config.eos_token_id = None
    ids, mask = batch_prompts(batch)
    blocks = 4
    new = 1 + blocks * (H + 1)
    ref = fit_to_greedy(model, ids, mask, new)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_bpd=True, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref)
    assert (out.accepted_lengths == H).all(), out.accepted_lengths


def test_untrained_recurrent_heads_decode_like_untrained_resblock_heads():
    base = tiny_base()
    ids, mask = batch_prompts(3)
    outs = []
    for kind in ("recurrent", "resblock"):
        model = BPDForCausalLM.from_base(base, num_draft_heads=H, head_type=kind)
        outs.append(
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=16,
                do_sample=False,
                use_bpd=True,
                return_dict_in_generate=True,
            )
        )
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert torch.equal(outs[0].accepted_lengths, outs[1].accepted_lengths)


# --------------------------------------------------------------------------------------------- sampling
NEW = 4  # the prompt's token, then one step verifying 2 drafts: depth 2 (whose q reads the drafted token) is tested
WARPERS = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(5)])


def exact_distribution(base, prompt, new):
    """P(t1 .. t_new | prompt) under the warped base model, by enumeration."""
    vocab = base.config.vocab_size
    probs = {}
    with torch.no_grad():
        for n in range(new):
            for prefix in itertools.product(range(vocab), repeat=n):
                ids = torch.tensor([prompt + list(prefix)])
                probs[prefix] = torch.softmax(WARPERS(ids, base(ids).logits[:, -1].float()), -1)[0].tolist()
    dist = {}
    for seq in itertools.product(range(vocab), repeat=new):
        p = 1.0
        for i in range(new):
            p *= probs[seq[:i]][seq[i]]
        if p > 0:
            dist[seq] = p
    return dist


SAMPLED = {
    "chain": lambda: None,
    "three-chains": lambda: SearchDrafter(top_k=4, num_drafts=3),
    "tree": lambda: StaticTreeDrafter([[0], [1], [2], [0, 0], [1, 0], [1, 1]]),
}


def sampling_base():
    """An 8-token base without an end token: every NEW-token continuation is enumerable."""
    base = tiny_base("llama", vocab_size=8, seed=4, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    base.generation_config.eos_token_id = None
    return base


def assert_sampling_is_exact(model, rescorer, new=NEW):
    """Speculative sampling from `model` (4000 rows of one prompt, one batch) matches the base's exact distribution
    of `new` tokens (chi-square over whole samples and over their last two tokens), with drafts really accepted at
    depths 1 and 2."""
    prompt, rows = [3, 5, 7], 4000
    dist = exact_distribution(model.base, prompt, new)
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt] * rows),
        max_new_tokens=new,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        top_p=1.0,
        use_bpd=True,
        draft_rescorer=rescorer,
        return_dict_in_generate=True,
    )
    samples = out.sequences[:, len(prompt) :]
    accepted = out.accepted_lengths[out.accepted_lengths >= 0]
    assert int((accepted > 0).sum()) > rows // 8  # drafts were really accepted
    assert int((accepted == 2).sum()) > rows // 20  # depth-2 drafts too
    assert chi_square_pvalue(samples, dist, key=lambda s: s) > 1e-3
    assert chi_square_pvalue(samples, dist, key=lambda s: s[2:]) > 1e-3


@pytest.mark.parametrize("drafter", sorted(SAMPLED))
def test_speculative_sampling_with_conditioned_proposals_is_exact(drafter):
    """The proposal of a node depends on its path: every chain / tree node is drawn from, and accepted against, its
    own path's q. Chi-square against the base's exact distribution of NEW = 4 tokens (4000 rows in one batch)."""
    model = BPDForCausalLM.from_base(sampling_base(), num_draft_heads=2, head_type="recurrent")
    with torch.no_grad():  # heads whose drafts are often accepted, and whose q really depends on the path
        for k in range(2):
            model.heads[k].out_proj.weight.normal_(0, 2.0)
            model.heads[k].blocks[0].linear.weight.normal_(0, 0.3)
    assert_sampling_is_exact(model, SAMPLED[drafter]())


def test_the_sampling_test_rejects_per_depth_proposals(monkeypatch):
    """A tree sampler that draws every node of a depth from one node's q (today's `sample_tree` for independent
    heads) while reporting each node's own q is biased: the chi-square test above would see it."""
    import hf_bpd.drafters.base as drafter_base

    base = sampling_base()
    model = BPDForCausalLM.from_base(base, num_draft_heads=2, head_type="recurrent")
    with torch.no_grad():  # q depends strongly on the path: a wrong one is far from the right one
        for k in range(2):
            model.heads[k].out_proj.weight.normal_(0, 2.0)
    real = drafter_base.DraftContext.path_logits

    def wrong(self, paths, rows=None):  # scores as if every path were the all-`3` path of its depth
        return real(self, torch.full_like(paths, 3), rows)

    def biased_chain(ctx, length):  # draws from the wrong q, reports the right one
        path, proposals = ctx.tokens.new_zeros(ctx.batch_size, 0), []
        for _ in range(length):
            proposals.append(ctx.proposal_probs(real(ctx, path)))
            path = torch.cat([path, torch.multinomial(ctx.proposal_probs(wrong(ctx, path)), 1)], 1)
        pad = ctx.num_heads - length
        q = torch.stack(proposals, 1) if proposals else path.new_zeros(ctx.batch_size, 0, ctx.vocab_size).float()
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        return drafter_base.Drafts(torch.nn.functional.pad(path, (0, pad))[:, None], q[:, None])

    monkeypatch.setattr(drafter_base, "sample_conditioned_chain", biased_chain)
    prompt, rows = [3, 5, 7], 4000
    dist = exact_distribution(base, prompt, NEW)
    torch.manual_seed(0)
    out = model.generate(
        torch.tensor([prompt] * rows),
        max_new_tokens=NEW,
        do_sample=True,
        temperature=0.8,
        top_k=5,
        top_p=1.0,
        use_bpd=True,
    )
    samples = out[:, len(prompt) :]
    assert (
        min(chi_square_pvalue(samples, dist, key=lambda s: s), chi_square_pvalue(samples, dist, key=lambda s: s[2:]))
        < 1e-3
    )


# --------------------------------------------------------------------------------------------- BPDTrainer
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_trainer_on_cached_features_teacher_forces_the_greedy_labels(mode, tmp_path):
    """Cached features (hard: greedy labels; soft: top-k) train recurrent heads; the logs and training info carry
    top-1 given a correct prefix; the conditioning tokens are the rows' real tokens the shards stored."""
    from test_trainer import training_args

    from hf_bpd.features import CachedFeatures, extract_features
    from hf_bpd.trainer import BPDTrainer

    base = tiny_base()
    gen = torch.Generator().manual_seed(0)
    seqs = pairs_batch(gen, batch=64, length=24).tolist()  # r, r + 1, ...: the base's greedy tokens are its own
    features = CachedFeatures(
        extract_features(base, seqs, tmp_path / "f", seq_len=24, shard_size=64, top_k=4 if mode == "soft" else 0)
    )
    model = BPDForCausalLM.from_base(base, num_draft_heads=2, head_type="recurrent")
    seen = []
    real_forward = model.heads.forward
    model.heads.forward = lambda hidden, prev=None: seen.append(prev) or real_forward(hidden, prev)
    trainer = BPDTrainer(
        model,
        training_args(tmp_path / "run", max_steps=40, distillation=mode, learning_rate=1e-2, logging_steps=20),
        train_dataset=features,
        eval_dataset=features,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["eval_head1_top1"] > 1.5 * before["eval_head1_top1"], (before, after)
    assert "eval_head2_top1_given_prefix" in after
    # the shards store the rows' real tokens: teacher forcing reads them (not the labels, the base's argmax)
    tokens = torch.stack([features[i]["draft_input_ids"] for i in range(len(features))])
    assert torch.equal(tokens[:, : len(seqs[0])], torch.tensor(seqs))
    rows = seen[-1].shape[0]
    assert any(torch.equal(seen[-1], teacher_tokens(tokens[i : i + rows], 2)) for i in range(0, len(tokens), rows))
    info = trainer.training_info()
    assert len(info["head_metrics"]["top1_given_prefix"]) == 2
    from hf_bpd.metrics import depth_accuracy

    measured = depth_accuracy(model.eval(), features.hidden, features.targets, input_ids=features.input_ids)
    assert measured["top1"] == pytest.approx([after["eval_head1_top1"], after["eval_head2_top1"]], abs=1e-3)
    assert measured["top1_given_prefix"][1] == pytest.approx(after["eval_head2_top1_given_prefix"], abs=1e-3)


def test_trainer_on_the_fly_self_distillation_conditions_on_the_greedy_tokens(tmp_path):
    from test_trainer import training_args

    from hf_bpd.trainer import BPDTrainer

    base = tiny_base()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": row} for row in pairs_batch(gen, batch=32, length=16).tolist()]
    model = BPDForCausalLM.from_base(base, num_draft_heads=2, head_type="recurrent")
    seen = []
    real_forward = model.heads.forward
    model.heads.forward = lambda hidden, prev=None: seen.append(prev) or real_forward(hidden, prev)
    trainer = BPDTrainer(model, training_args(tmp_path, max_steps=2, distillation="hard"), train_dataset=data)
    trainer.train()
    batch = torch.tensor([d["input_ids"] for d in data])
    with torch.no_grad():
        greedy = base(batch).logits.argmax(-1)  # position s predicts token s + 1: x_{t+1} = greedy[t]
    for row in seen[-1][:, :-1, 0]:  # batches are shuffled: each row is some sequence's greedy tokens
        assert any(torch.equal(row, g) for g in greedy[:, :-1])


def test_beam_search_merges_shared_prefixes_into_one_tree():
    from hf_bpd.drafters.search import prefix_tree

    tree = prefix_tree(torch.tensor([[5, 6, 7], [5, 6, 8], [5, 9, -1], [4, 6, 7]]))
    assert tree.layout.width == 1 + 8  # 5, 56, 567, 568, 59, 4, 46, 467: 8 distinct prefixes
    drafts = tree.path_drafts()[0].tolist()
    assert sorted(drafts) == sorted([[5, 6, 7], [5, 6, 8], [5, 9, -1], [4, 6, 7]])
    model = randomize_heads(recurrent(), std=0.3)
    ids, mask = batch_prompts(1)
    drafter = SearchDrafter(top_k=3, num_drafts=3)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_bpd=True, draft_rescorer=drafter
    )
    assert torch.equal(out, model.base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    hidden, last = torch.randn(1, 32), torch.tensor([7])
    ctx = ctx_for(model, hidden, last)
    beams = ChainDrafter.propose(drafter, ctx).path_drafts()[0]  # the 3 beams as separate chains
    tree = drafter.propose(ctx)
    distinct = {tuple(b[: j + 1]) for b in beams.tolist() for j in range(H)}
    assert tree.layout.width == 1 + len(distinct)
    assert sorted(map(tuple, tree.path_drafts()[0].tolist())) == sorted(set(map(tuple, beams.tolist())))
