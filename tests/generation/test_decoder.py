"""The batched decode loop (no Ray): batched equals alone, seeds, stop rules, cancel, bad requests."""

from __future__ import annotations

import pytest
import torch

from ray_med.errors import DataError
from ray_med.generation.decoder import BatchDecoder, GenRequest, sample_seed
from ray_med.tasks.prompts import PromptTooLong

TEXTS = ["Chest X-ray shows a small opacity in the left lower lobe.", "The answer is A because the lobe is clear.",
         "Patient denies fever, cough or chest pain."]


@pytest.fixture(scope="module")
def tok():
    from ray_med.models import train_bpe_tokenizer

    return train_bpe_tokenizer(TEXTS * 40, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def model(tok):
    from ray_med.models import build_model

    torch.manual_seed(0)
    return build_model("tiny-llama", vocab_size=len(tok)).eval()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in ("Chest X-ray", "The answer is A because the left lower lobe", "a",
                                          "Patient denies fever, cough or chest pain. Chest X-ray shows a small")]


def alone(model, tok, req: GenRequest) -> list[int]:
    return BatchDecoder(model, tok, max_batch=1).run([req])[0].tokens


def test_alone_equals_hf_generate_greedy(model, tok, prompts):
    for p in prompts:
        ids = torch.tensor([p])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=0, eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        got = alone(model, tok, GenRequest(p, 16))
        assert got == ref[: len(got)] and len(got) == 16


def test_greedy_in_a_batch_equals_alone_whatever_joins_and_leaves(model, tok, prompts):
    """Requests join while others decode (staggered), with different lengths: every one equals its run alone."""
    reqs = [GenRequest(p, 20 - 4 * i) for i, p in enumerate(prompts)]
    solo = [alone(model, tok, r) for r in reqs]
    dec = BatchDecoder(model, tok, max_batch=3)  # the 4th waits for a free row
    seqs = []
    for r in reqs:
        seqs.append(dec.submit(r))
        dec.step()
        dec.step()
    while dec.busy():
        dec.step()
    assert [s.tokens for s in seqs] == solo
    assert [s.finish_reason for s in seqs] == ["length"] * 4
    assert dec.stats["max_batch_seen"] == 3 and dec.stats["finished"] == 4 and not dec.groups


def test_sampling_repeats_by_seed_in_any_batch(model, tok, prompts):
    req = lambda seed, p=prompts[0]: GenRequest(p, 12, temperature=1.0, top_p=0.9, seed=seed)  # noqa: E731
    a = alone(model, tok, req(sample_seed(7)))
    batch = BatchDecoder(model, tok).run([req(sample_seed(3)), req(sample_seed(7)), GenRequest(prompts[1], 5)])
    assert batch[1].tokens == a
    assert batch[0].tokens != a  # another seed, another sample
    assert sample_seed(1, 0) != sample_seed(0, 1) and sample_seed(5, 2) == sample_seed(5, 2) < 2**63


def test_stop_strings_cut_the_text_and_streaming_joins_to_it(model, tok, prompts):
    free = BatchDecoder(model, tok).run([GenRequest(prompts[0], 24)])[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    pieces: list[str] = []
    dec = BatchDecoder(model, tok)
    seq = dec.submit(GenRequest(prompts[0], 24, stop=[stop]), pieces.append)
    while dec.busy():
        dec.step()
    assert seq.finish_reason == "stop" and seq.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == seq.text and stop not in seq.text


def test_cancel_stops_one_sequence_and_leaves_the_others(model, tok, prompts):
    dec = BatchDecoder(model, tok)
    keep, drop = dec.submit(GenRequest(prompts[0], 16)), dec.submit(GenRequest(prompts[1], 16))
    waiting = dec.submit(GenRequest(prompts[2], 16))
    waiting.cancel()  # cancelled before it started: never prefilled
    dec.step()
    dec.step()
    drop.cancel()
    while dec.busy():
        dec.step()
    assert drop.finish_reason == "cancelled" and len(drop.tokens) == 2
    assert waiting.finish_reason == "cancelled" and waiting.tokens == []
    assert keep.tokens == alone(model, tok, GenRequest(prompts[0], 16))
    assert dec.stats["cancelled"] == 2 and dec.stats["finished"] == 1


@pytest.mark.parametrize("change,error,needle", [
    ({"max_new_tokens": 0}, DataError, "max_new_tokens"),
    ({"temperature": 2.5}, DataError, "temperature"),
    ({"top_p": 0.0}, DataError, "top_p"),
    ({"max_new_tokens": 10_000}, PromptTooLong, "context"),
    ({"prompt": []}, DataError, "empty"),
])
def test_a_bad_request_fails_alone_in_the_middle_of_a_batch(model, tok, prompts, change, error, needle):
    dec = BatchDecoder(model, tok)
    good = dec.submit(GenRequest(prompts[0], 10))
    dec.step()
    with pytest.raises(error, match=needle):
        dec.submit(GenRequest(**{"prompt": prompts[1], "max_new_tokens": 8, **change}))
    while dec.busy():
        dec.step()
    assert good.tokens == alone(model, tok, GenRequest(prompts[0], 10))


def test_the_cache_narrows_when_the_longest_sequence_leaves(model, tok, prompts):
    dec = BatchDecoder(model, tok)
    long_, short = dec.submit(GenRequest(prompts[3], 2)), dec.submit(GenRequest(prompts[2], 12))
    dec.step()
    group = dec.groups[None]
    assert group.width == len(prompts[3])  # the short prompt's row is left-padded
    while not long_.done:
        dec.step()
    assert group.width == group.lengths[0] == len(prompts[2]) + len(short.tokens) - 1  # no all-pad columns left


def test_a_failing_forward_fails_its_rows_only(model, tok, prompts):
    """An adapter whose forward raises (e.g. out of memory) ends its sequences with the error; the others go on."""
    from contextlib import contextmanager

    state = {"calls": 0}

    @contextmanager
    def use(adapter):
        if adapter == "broken":
            state["calls"] += 1
            if state["calls"] >= 2:  # its prefill works, its first decode step raises
                raise RuntimeError("CUDA out of memory (simulated)")
        yield model

    dec = BatchDecoder(model, tok, use=use)
    good = dec.submit(GenRequest(prompts[0], 10))
    bad = [dec.submit(GenRequest(p, 10, adapter="broken")) for p in prompts[1:3]]
    while dec.busy():
        dec.step()
    assert [s.finish_reason for s in bad] == ["error", "error"]
    assert all("out of memory" in str(s.error) for s in bad) and "broken" not in dec.groups
    assert good.tokens == alone(model, tok, GenRequest(prompts[0], 10)) and good.finish_reason == "length"
    assert dec.stats["failed"] == 2 and dec.stats["finished"] == 1
    with pytest.raises(RuntimeError, match="out of memory"):  # an offline batch raises it, once all have ended
        BatchDecoder(model, tok, use=use).run([GenRequest(prompts[0], 4, adapter="broken")])


def test_end_of_sequence_first_and_a_tiny_temperature(model, tok, prompts):
    """A sequence whose first token is EOS ends with no text; a temperature below 1e-5 decodes greedily (no NaN)."""
    greedy = alone(model, tok, GenRequest(prompts[0], 6))
    dec = BatchDecoder(model, tok)
    dec.eos = {greedy[0]}  # make the first greedy token the end of sequence
    first = dec.run([GenRequest(prompts[0], 6)])[0]
    assert first.tokens == [] and first.text == "" and first.finish_reason == "stop"
    assert alone(model, tok, GenRequest(prompts[0], 6, temperature=1e-40, seed=3)) == greedy
