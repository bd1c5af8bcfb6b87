"""The greedy chain replayed from teacher-forced head predictions (`metrics.greedy_chain_counts`) against the decode."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, batch_prompts, tiny_base

from hf_bpd import BPDForCausalLM, metrics
from hf_bpd.losses import draft_head_loss
from hf_bpd_bench.analyze import greedy_features

H = 3
M = -100  # masked


def test_leading_correct_counts_heads_in_a_row():
    labels = torch.tensor([[5, 6, 7, 8, 9, 10, M]])
    logits = torch.zeros(1, 7, 2, 11)  # all-zero logits: argmax 0, never a label
    logits[0, 0, 0, 7] = logits[0, 0, 1, 8] = 1  # head 0 vs labels[2], head 1 vs labels[3]: both right
    logits[0, 1, 0, 8] = 1  # first right, second wrong
    logits[0, 2, 1, 10] = 1  # first wrong, second right: nothing in a row
    logits[0, 3, 0, 10] = 1  # first right, the second's target is masked
    logits[0, 4, 0, 1] = 1  # masked target
    assert metrics.leading_correct(logits, labels).tolist() == [[2, 1, 0, 1, 0, 0, 0]]


def test_greedy_chain_counts_walks_the_positions_the_decode_visits():
    # one run, tokens 2..7 (prompt ends at 1): the prefill at 1 commits 2; at 1 the heads' first 2 drafts are right,
    # so the next call commits 3, 4 and the base's 5 (last accepted position 4); 4 -> 0 right -> 6; 5 -> 1 right ->
    # 7 (and the base's 8, past the end): 4 calls for 6 tokens.
    labels = torch.tensor([[M, M, 10, 11, 12, 13, 14, 15]])
    leading = torch.tensor([[0, 2, 9, 9, 0, 1, 9, 9]])
    assert metrics.greedy_chain_counts(leading, labels) == (6, 4)
    # nothing accepted: one call per token; a run at position 0 starts at 1; two runs in a row are two generations
    labels = torch.tensor([[10, 11, 12, M, M, 13, 14, 15, 16]])
    assert metrics.greedy_chain_counts(torch.zeros_like(labels), labels) == (2 + 4, 2 + 4)
    everything = torch.full_like(labels, 8)  # all right: the prefill, then the rest of a run in one call
    assert metrics.greedy_chain_counts(everything, labels) == (6, 2 + 2)
    assert metrics.greedy_chain_counts(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), M)) == (0, 0)


def _fit_heads(model: BPDForCausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
    """A few optimizer steps of the heads on the base's greedy text: drafts that are right part of the time."""
    seq = model.base.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    hidden, targets = greedy_features(model, seq, mask, None)
    optimizer = torch.optim.Adam(model.heads.parameters(), lr=3e-2)
    for _ in range(steps):
        logits = model(base_hidden_states=hidden, draft_input_ids=targets, draft_full_vocab=False).draft_logits
        loss, _ = draft_head_loss(logits, model.to_draft_ids(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _model(arch: str, head_type: str, ids: torch.Tensor, draft_vocab: bool) -> BPDForCausalLM:
    base = tiny_base(arch, seed=2)
    if not draft_vocab:
        return BPDForCausalLM.from_base(base, num_draft_heads=H, head_type=head_type)
    # a draft vocabulary without the second most frequent greedy token: its targets can never be drafted
    greedy = base.generate(ids, max_new_tokens=40, do_sample=False)[:, ids.shape[1] :]
    by_count = torch.bincount(greedy.flatten(), minlength=VOCAB).argsort(descending=True)
    model = BPDForCausalLM.from_base(base, num_draft_heads=H, head_type=head_type, draft_vocab_size=48)
    model.set_draft_vocab(torch.cat([by_count[:1], by_count[2:49]]))
    return model


def _replayed_and_decoded(model: BPDForCausalLM, ids: torch.Tensor, mask: torch.Tensor):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=40, do_sample=False, use_bpd=True, return_dict_in_generate=True
    )
    ref = model.base.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(out.sequences, ref)
    accepted = out.accepted_lengths[out.accepted_lengths >= 0]
    assert 0 < int(accepted.sum()) < H * accepted.numel()  # partly accepted: the walk is really exercised
    hidden, targets = greedy_features(model, out.sequences, mask, model.generation_config.eos_token_id)
    with torch.no_grad():
        acc = metrics.depth_accuracy(model, hidden, targets)
    calls = int(metrics.rows_from_accepted(out.accepted_lengths)[1].sum())
    return (acc["chain_tokens"], acc["chain_calls"]), (out.num_generated_tokens, calls), targets


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("head_type", ["resblock", "recurrent"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_replayed_chain_equals_the_decode(arch, head_type, batch, draft_vocab):
    """fp32: the replay's tokens and calls are the decode's, for both head kinds, batch 1 and > 1 (left padding),
    with and without a draft vocabulary that leaves out a frequent target."""
    ids, mask = batch_prompts(batch, seed=4)
    model = _model(arch, head_type, ids, draft_vocab)
    model.generation_config.eos_token_id = None
    _fit_heads(model, ids, mask, steps=12)
    replayed, decoded, targets = _replayed_and_decoded(model, ids, mask)
    assert replayed == decoded
    if draft_vocab:
        assert (model.to_draft_ids(targets) == -100).sum() > (targets == -100).sum()  # targets outside it exist


@pytest.mark.parametrize("batch", [1, 3])
def test_replay_counts_the_eos_a_row_stops_at_also_when_it_is_the_pad(batch):
    ids, mask = batch_prompts(batch, seed=4)
    model = _model("llama", "resblock", ids, draft_vocab=False)
    model.generation_config.eos_token_id = None
    _fit_heads(model, ids, mask, steps=12)
    free = model.base.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    eos = int(free[0, ids.shape[1] + 30])  # a token row 0 produces mid-way: rows stop at different steps
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    replayed, decoded, targets = _replayed_and_decoded(model, ids, mask)
    assert replayed == decoded
    assert (targets[0] == eos).sum() == 1 and decoded[0] < 40 * batch  # row 0 stopped at its EOS, counted once


def test_replay_script_equals_the_bench_decode_on_the_reference_stack(tmp_path):
    """`bench/replay_chain.py` (one greedy pass, then the replay) against `hf-bpd bench`'s decode of the heads' own
    chain (`bpd-heads`) on the same validation prompts, fp32, batch 1: the same block efficiency per domain."""
    import importlib.util
    import json
    from pathlib import Path

    from hf_bpd_bench.cli import main as cli
    from hf_bpd_bench.reference import find_reference

    heads = find_reference("heads")
    if heads is None:
        pytest.skip("the reference stack is not present")
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("replay_chain", repo / "bench" / "replay_chain.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    common = ["--max-prompts", "1", "--max-new-tokens", "24"]
    replay.main(
        [
            "--stack",
            "reference",
            "--heads",
            str(heads),
            "--batch-size",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            *common,
        ]
    )
    args = ["bench", "--stack", "reference", "--methods", "greedy", "bpd-heads", "--repeats", "1", "--no-progress"]
    assert cli([*args, *common, "--json", str(tmp_path / "b.json")]) == 0
    replayed = json.loads((tmp_path / "r.json").read_text())["heads"][str(heads)]
    decoded = json.loads((tmp_path / "b.json").read_text())
    for domain, figures in replayed["kinds"].items():
        bpd = decoded["domains"][domain]["methods"]["bpd-heads"]
        assert bpd["identical_to_greedy"]
        assert figures["replayed_chain_block_efficiency"] == pytest.approx(bpd["block_efficiency"], abs=1e-3)
    assert replayed["replayed_chain_block_efficiency"] > 1.0  # the shipped heads accept: a real walk


@pytest.mark.parametrize(
    "bad", [["--batch-size", "0"], ["--max-new-tokens", "0"], ["--max-prompts", "0"], ["--dtype", "float8"]]
)
def test_replay_script_refuses_nonsense_arguments(bad, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "replay_chain", Path(__file__).resolve().parents[1] / "bench" / "replay_chain.py"
    )
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    with pytest.raises(SystemExit):
        replay.main(["--heads", "unused", *bad])
    assert bad[0] in capsys.readouterr().err
