"""The serving engines and adapter host in process (no Ray): what each deployment computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ray_med.errors import ConfigError, ModelError
from ray_med.serving.errors import HTTPError


def test_adapter_host_switches_shares_and_unloads(serve_models):
    from ray_med.adapters.host import AdapterHost
    from ray_med.models import load_causal_lm

    base = load_causal_lm(serve_models["lm"]).eval()
    x = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        plain = base(x).logits
    host = AdapterHost(base)
    host.load("a", [serve_models["lora_a"]])
    host.load("b", [serve_models["lora_b"]])
    host.load("ab", [serve_models["lora_a"], serve_models["lora_b"]])  # a stacked pair, both active
    out = {}
    with torch.no_grad():
        for name in (None, "a", "b", "ab"):
            with host.use(name) as m:
                out[name] = m(x).logits
    torch.testing.assert_close(out[None], plain)
    for a, b in (("a", "b"), ("a", "ab"), ("b", "ab")):
        assert (out[a] - out[b]).abs().max() > 1e-3
    assert (out["a"] - plain).abs().max() > 1e-3
    n_params = sum(p.numel() for p in base.parameters())
    host.unload("ab")
    host.unload("b")
    assert sum(p.numel() for p in base.parameters()) < n_params and host.loaded == ["a"]
    with torch.no_grad(), host.use("a") as m:
        torch.testing.assert_close(m(x).logits, out["a"])  # unaffected by the others leaving
    with pytest.raises(ModelError, match="not loaded"), host.use("b"):
        pass


def test_adapter_host_refuses_non_lora(serve_models, tmp_path):
    from ray_med.adapters.host import AdapterHost
    from ray_med.models import load_causal_lm

    fake = tmp_path / "prefix"
    fake.mkdir()
    (fake / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    host = AdapterHost(load_causal_lm(serve_models["lm"]))
    with pytest.raises(ModelError, match="PREFIX_TUNING adapter; one shared base serves LoRA adapters only"):
        host.load("p", [fake])
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        host.load("q", [tmp_path])


def test_classifier_engine_shares_one_base_and_matches_load_classifier(serve_models):
    from ray_med.adapters.classifier import load_classifier
    from ray_med.evaluation.classify import encode_texts, predict
    from ray_med.models import load_tokenizer
    from ray_med.serving.engines import ClassifierEngine

    texts = ["Fever and productive cough for three days.", "Routine follow-up, no complaints."]
    engine = ClassifierEngine({"triage": str(serve_models["triage"]), "urgency": str(serve_models["urgency"])})
    got = {name: engine.classify(name, texts) for name in ("triage", "urgency", "triage")}
    assert len(engine._bases) == 1  # two classifiers, one MiniLM in memory
    for name in ("triage", "urgency"):
        model, meta = load_classifier(serve_models[name])
        tok = load_tokenizer(meta["base_model"])
        probs = predict(model, encode_texts(tok, texts, None, 256), meta["task_type"])
        served = np.array([[r["probabilities"][lab] for lab in meta["labels"]] for r in got[name]])
        np.testing.assert_allclose(served, probs, atol=1e-5)
    engine.unload("urgency")
    assert engine._bases[next(iter(engine._bases))][0].loaded == ["triage"]
    with pytest.raises(ModelError, match="unknown classifier 'nope'"):
        engine.classify("nope", texts)


def test_classifier_engine_rejects_a_non_classifier_folder(serve_models):
    from ray_med.serving.engines import ClassifierEngine

    with pytest.raises(ModelError, match="not a ray_med classifier folder"):
        ClassifierEngine({"x": str(serve_models["lora_a"])})


def test_app_config_is_strict_and_checks_folders(serve_models, tmp_path):
    from ray_med.config import from_dict
    from ray_med.serving.config import ServeAppConfig

    ok = {"model": str(serve_models["lm"]), "adapters": {"a": str(serve_models["lora_a"])},
          "classifiers": {"t": str(serve_models["triage"])}}
    from_dict(ServeAppConfig, ok).check()
    with pytest.raises(ConfigError, match="classifers"):
        from_dict(ServeAppConfig, {**ok, "classifers": {}})
    bad = [
        ({"model": str(tmp_path)}, "no config.json"),
        ({**ok, "adapters": {"a": str(tmp_path)}}, "not a PEFT adapter folder"),
        ({**ok, "classifiers": {"t": str(serve_models["lora_a"])}}, "not a ray_med classifier folder"),
        ({**ok, "adapters": {"t": str(serve_models["lora_a"])}}, "both as adapter and classifier"),
        ({**ok, "adapters": {"a b": str(serve_models["lora_a"])}}, "letters, digits"),
        ({}, "nothing to serve"),
        ({**ok, "lm": {"max_batch_size": 64, "max_ongoing_requests": 8}}, "batches could never fill"),
        ({**ok, "qa": {"shots": 2}}, "shots_file"),
    ]
    for args, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(ServeAppConfig, args).check()


def test_build_app_applies_overrides_without_ray(serve_models):
    """build_app only binds deployments (no Ray needed); overrides use the key=value syntax."""
    from ray_med.serving.app import build_app

    app = build_app({"classifiers": {"t": str(serve_models["triage"])}, "overrides": ["classifier.max_batch_size=16"]})
    assert app is not None
    with pytest.raises(ConfigError, match="max_batch_sise"):
        build_app({"classifiers": {"t": str(serve_models["triage"])}, "overrides": ["classifier.max_batch_sise=16"]})


@pytest.fixture(scope="module")
def lm_engine(serve_models):
    from ray_med.serving.engines import LMEngine

    return LMEngine(str(serve_models["lm"]), {"a": str(serve_models["lora_a"])})


def test_sampling_is_random_unless_seeded(lm_engine):
    """Unseeded samples differ from call to call; a seed repeats them (generation and sc_cot)."""
    from ray_med.evaluation.config import QAConfig

    def draw(seed):
        return lm_engine.complete("Chest X-ray shows", max_new_tokens=12, temperature=1.0, seed=seed,
                                  adapter=None).text

    # Several draws: all equal by chance is vanishingly unlikely (20 of 20 differed when measured).
    assert len({draw(None) for _ in range(5)}) > 1
    assert draw(7) == draw(7)
    prompt = lm_engine.qa_prompts([_item()], QAConfig(mode="sc_cot"))[0]
    cfg = QAConfig(mode="sc_cot", n=2, temperature=1.0, max_new_tokens=12)

    def sc_cot(seed):
        return lm_engine.chain_of_thought(prompt, _item().choices, cfg, "a", seed=seed).samples

    assert len({tuple(sc_cot(None)) for _ in range(4)}) > 1
    assert sc_cot(3) == sc_cot(3)


def test_a_set_cancel_flag_stops_generation_between_tokens(lm_engine):
    import threading

    class SetAfter(threading.Event):
        """A flag that reads as set from its k-th check on: a cancel arriving mid-generation."""

        def __init__(self, k: int) -> None:
            super().__init__()
            self.k, self.checks = k, 0

        def is_set(self) -> bool:
            self.checks += 1
            return self.checks >= self.k

    def run(cancel):
        return lm_engine.complete("Chest X-ray shows", max_new_tokens=32, temperature=0.0, seed=0, adapter=None,
                                  cancel=cancel)

    full = run(threading.Event())  # never set: generation runs its course
    assert full.completion_tokens > 8
    flag = SetAfter(4)
    cut = run(flag)
    assert flag.checks == 4  # checked once per token, and stopped at the first "set"
    assert cut.completion_tokens < full.completion_tokens and full.text.startswith(cut.text)
    already = threading.Event()
    already.set()
    assert run(already).completion_tokens <= 1


def _item():
    from ray_med.tasks.prompts import QAItem

    return QAItem(id="q", question="Which enzyme is deficient in phenylketonuria?",
                  options={"A": "Tyrosinase", "B": "Phenylalanine hydroxylase"})


def test_mixed_adapters_decode_in_one_batch_as_they_do_alone(serve_models):
    """Base, adapter a and adapter b interleaved in one decode loop: each sequence equals its run alone;
    an adapter evicted while its sequences decode is dropped only once they end."""
    from ray_med.generation.decoder import GenRequest
    from ray_med.serving.engines import LMEngine

    engine = LMEngine(str(serve_models["lm"]), {"a": str(serve_models["lora_a"]), "b": str(serve_models["lora_b"])})
    prompt = engine.encode_prompt("Chest X-ray shows", 16)
    names = [None, "a", "b", "a", None, "b"]
    solo = [engine.decode([GenRequest(prompt, 16, adapter=n)])[0].tokens for n in names]
    assert solo[0] != solo[1] != solo[2]  # the adapters really differ
    seqs = [engine.submit(GenRequest(prompt, 16, adapter=n)) for n in names[:3]]
    engine.step()
    seqs += [engine.submit(GenRequest(prompt, 16, adapter=n)) for n in names[3:]]  # join a running batch
    engine.step()
    engine.unload_adapter("a")  # the LRU evicts it mid-decode: deferred
    assert "a" in engine.host.loaded
    while engine.decoder.busy():
        engine.step()
    assert [s.tokens for s in seqs] == solo
    assert "a" not in engine.host.loaded and "b" in engine.host.loaded
    with pytest.raises(HTTPError, match="unknown adapter 'z'") as info:
        engine.submit(GenRequest(prompt, 4, adapter="z"))
    assert info.value.status == 404
