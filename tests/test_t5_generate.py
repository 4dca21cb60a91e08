"""T5 generation equals transformers' `generate` on tiny random models (v1.0 and v1.1): greedy token for token, beam
search (num_beams 3, length penalties, every early-stopping mode, all returned hypotheses and their scores, one or
two EOS ids) over a padded batch; the KV cache changes nothing; sampling is reproducible and reduces to greedy.

The EOS ids are tokens the model emits often, so some hypotheses end early and others run to the length limit: each
test asserts that both happen before comparing, or the comparison would not exercise the finishing logic."""

import pytest
import torch
from t5_support import VARIANTS, frequent_tokens, padded_batch, random_t5_hf, trim

from leantune.checkpoint.t5_hf import load_t5_checkpoint
from leantune.decode.generate import Sampling
from leantune.decode.seq2seq import BeamSearch, pad_inputs, t5_beam_search, t5_generate

MAX_NEW = 12


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request, tmp_path_factory):
    """(transformers model, our model, input_ids, attention_mask, two frequent tokens to use as EOS ids)."""
    ref, folder = random_t5_hf(request.param, tmp_path_factory.mktemp(request.param) / "hf", noise=1.0,
                               num_decoder_layers=2)
    ids, mask = padded_batch(seed=3, B=4, S=10, lengths=(10, 7, 4, 9))
    return ref, load_t5_checkpoint(folder), ids, mask, frequent_tokens(ref, ids, mask, 2)


def _ends(seqs: torch.Tensor, eos: list[int]) -> tuple[int, int]:
    """(rows that end with an EOS, rows that run to the length limit)."""
    early = sum(any(t in eos for t in row[1:]) for row in seqs.tolist())
    return early, len(seqs) - early


def _varied(seqs: torch.Tensor, eos: list[int]) -> bool:
    """Some hypotheses end with an EOS, and not all at the same length (so the length penalty matters)."""
    return _ends(seqs, eos)[0] > 0 and len({len(trim(s, eos)) for s in seqs}) > 1


def test_greedy_equals_transformers(setup):
    ref, ours, ids, mask, eos = setup
    eos = eos[:1]
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, min_new_tokens=2,
                        do_sample=False, eos_token_id=eos, pad_token_id=0)
    early, late = _ends(want, eos)
    assert early and late, "the EOS choice must end some rows early and not others"
    got = t5_generate(ours, ids, mask, max_new_tokens=MAX_NEW, min_new_tokens=2, eos_ids=eos, pad_id=0)
    assert torch.equal(got, want)
    assert torch.equal(t5_generate(ours, ids, mask, max_new_tokens=MAX_NEW, min_new_tokens=2, eos_ids=eos,
                                   use_cache=False), got)


def test_min_new_tokens_holds_eos_back(setup):
    ref, ours, ids, mask, eos = setup
    free = t5_generate(ours, ids, mask, max_new_tokens=MAX_NEW, eos_ids=eos)
    first = min(row.index(t) for row in free.tolist() for t in eos if t in row[1:])
    held = t5_generate(ours, ids, mask, max_new_tokens=MAX_NEW, min_new_tokens=first + 2, eos_ids=eos)
    assert not any(t in eos for t in held[:, 1:first + 2].flatten().tolist())
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, min_new_tokens=first + 2,
                        do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(held, want)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_beam_search_equals_transformers(setup, length_penalty, early_stopping):
    """All num_beams hypotheses per input, best first, with their length-penalised scores."""
    ref, ours, ids, mask, eos = setup
    eos = eos[:1]
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, min_new_tokens=2,
                        do_sample=False, num_beams=3, num_return_sequences=3, length_penalty=length_penalty,
                        early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0, output_scores=True,
                        return_dict_in_generate=True)
    assert _varied(want.sequences, eos), "the EOS choice must end hypotheses at different lengths"
    beams = BeamSearch(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping,
                       num_return_sequences=3)
    got = t5_beam_search(ours, ids, mask, beams=beams, max_new_tokens=MAX_NEW, min_new_tokens=2, eos_ids=eos, pad_id=0)
    assert got.sequences.shape == want.sequences.shape
    assert [trim(s, eos) for s in got.sequences] == [trim(s, eos) for s in want.sequences]
    torch.testing.assert_close(got.scores, want.sequences_scores, atol=1e-5, rtol=1e-5)


def test_beam_search_with_two_eos_ids_and_the_best_hypothesis(setup):
    ref, ours, ids, mask, eos = setup
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, min_new_tokens=2,
                        do_sample=False, num_beams=4, num_return_sequences=4, length_penalty=0.6, eos_token_id=eos,
                        pad_token_id=0)
    ended_by = {trim(s, eos)[-1] for s in want}
    assert set(eos) <= ended_by, "both EOS ids must end some hypothesis"
    got = t5_beam_search(ours, ids, mask, beams=BeamSearch(num_beams=4, length_penalty=0.6, num_return_sequences=4),
                         max_new_tokens=MAX_NEW, min_new_tokens=2, eos_ids=eos, pad_id=0)
    assert [trim(s, eos) for s in got.sequences] == [trim(s, eos) for s in want]
    best = t5_beam_search(ours, ids, mask, beams=BeamSearch(num_beams=4, length_penalty=0.6), max_new_tokens=MAX_NEW,
                          min_new_tokens=2, eos_ids=eos, pad_id=0)
    assert [trim(s, eos) for s in best.sequences] == [trim(s, eos) for s in want[::4]]


def test_beam_search_cache_equals_recompute(setup):
    _, ours, ids, mask, eos = setup
    beams = BeamSearch(num_beams=3, num_return_sequences=2)
    cached = t5_beam_search(ours, ids, mask, beams=beams, max_new_tokens=8, eos_ids=eos)
    full = t5_beam_search(ours, ids, mask, beams=beams, max_new_tokens=8, eos_ids=eos, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-4, rtol=1e-4)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(setup):
    _, ours, ids, mask, eos = setup
    hot = Sampling(temperature=1.5)

    def run(seed, s=hot, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        return t5_generate(ours, ids, mask, max_new_tokens=MAX_NEW, sampling=s, eos_ids=eos, generator=g,
                           use_cache=use_cache)

    greedy = t5_generate(ours, ids, mask, max_new_tokens=MAX_NEW, eos_ids=eos)
    a = run(0)
    assert torch.equal(a, run(0))
    assert torch.equal(a, run(0, use_cache=False))  # same draws on the cached and the recomputed path
    assert not torch.equal(a, run(1))
    assert not torch.equal(a, greedy)
    assert torch.equal(run(2, Sampling(temperature=1.0, top_k=1)), greedy)
    for row in a.tolist():  # after an EOS, only padding
        ends = [i for i, t in enumerate(row[1:], 1) if t in eos]
        if ends:
            assert set(row[ends[0] + 1:]) <= {ours.config.pad_token_id}


def test_pad_inputs_matches_a_padded_batch(setup):
    _, ours, ids, mask, eos = setup
    rows = [ids[i, :int(mask[i].sum())].tolist() for i in range(len(ids))]
    pids, pmask = pad_inputs(rows, pad_id=0)
    assert torch.equal(pmask, mask) and torch.equal(pids[mask.bool()], ids[mask.bool()])
    assert torch.equal(t5_generate(ours, pids, pmask, max_new_tokens=6, eos_ids=eos),
                       t5_generate(ours, ids, mask, max_new_tokens=6, eos_ids=eos))


def test_beam_search_arguments_are_checked():
    with pytest.raises(ValueError, match="num_beams"):
        BeamSearch(num_beams=0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        BeamSearch(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearch(early_stopping="sometimes")
