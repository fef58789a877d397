"""M3OE: the gate's maths on hand-built embeddings, the layer's alpha/r scaling, top-k, load balancing, entropy,
exact folding to a PEFT LoRA and merging, saving and loading, gate statistics, per-sample gates (no Ray)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.m3oe import (
    M3OE,
    METHOD,
    GateOutput,
    GateStats,
    M3OEConfig,
    M3OELinear,
    Router,
    gate_entropy,
    gate_probs,
    load_balance_loss,
    select_top_k,
)
from ray_med.adapters.registry import METHODS, method_of_folder, peft_config
from ray_med.errors import ConfigError, ModelError
from ray_med.models import build_model

VOCAB = 300


def _softmax(*logits: float) -> list[float]:
    z = sum(math.exp(v) for v in logits)
    return [math.exp(v) / z for v in logits]


# ------------------------------------------------------------- the gate, by hand

# d = 2, W_q = W_k = W_v = identity (so Q, K, V are the embeddings), scores divided by sqrt(2).
LN3 = math.log(3.0)
M1 = [math.sqrt(2) * LN3, 0.0]  # modality token
M2 = [0.0, 0.0]  # a second modality token (sample 1 only)
T1, T2 = [0.0, 1.0], [1.0, 0.0]  # task tokens
PAD_M, PAD_T = [9.0, 9.0], [50.0, -50.0]  # padding: huge, so a leak would show
W_G = [[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]]  # gate_dim 2 -> E = 3: logits = [2 h0, 4 h1, 0]
EYE = torch.eye(2, dtype=torch.float64)


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample 0: modality [M1, pad]; sample 1: modality [M1, M2]; both: task [T1, T2, pad]."""
    modality = torch.tensor([[M1, PAD_M], [M1, M2]], dtype=torch.float64)
    modality_mask = torch.tensor([[1, 0], [1, 1]])
    task = torch.tensor([[T1, T2, PAD_T], [T1, T2, PAD_T]], dtype=torch.float64)
    task_mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return modality, modality_mask, task, task_mask


def test_gate_probs_by_hand_with_padding_masked() -> None:
    modality, modality_mask, task, task_mask = _hand_batch()
    probs = gate_probs(modality, modality_mask, task, task_mask, EYE, EYE, EYE, torch.tensor(W_G, dtype=torch.float64))
    # Sample 0, query M1: scores M1.T1/sqrt2 = 0 and M1.T2/sqrt2 = sqrt2 ln3 / sqrt2 = ln3 -> attention
    # [1/(1+3), 3/(1+3)] = [1/4, 3/4]; H = 1/4 T1 + 3/4 T2 = [3/4, 1/4]; h = H (its one real token);
    # logits = [2 * 3/4, 4 * 1/4, 0] = [1.5, 1, 0].
    expected0 = _softmax(1.5, 1.0, 0.0)
    # Sample 1: M1 as above gives [3/4, 1/4]; M2 = 0 scores 0 and 0 -> attention [1/2, 1/2] -> [1/2, 1/2].
    # h = mean = [(3/4 + 1/2)/2, (1/4 + 1/2)/2] = [0.625, 0.375]; logits = [1.25, 1.5, 0].
    expected1 = _softmax(1.25, 1.5, 0.0)
    assert torch.allclose(probs, torch.tensor([expected0, expected1], dtype=torch.float64), atol=1e-12)
    # The padding changes nothing: sample 0 without its padded tokens gives the same numbers.
    alone = gate_probs(modality[:1, :1], None, task[:1, :2], None, EYE, EYE, EYE,
                       torch.tensor(W_G, dtype=torch.float64))
    assert torch.allclose(alone, probs[:1], atol=1e-12)
    # ...and unmasking it does change them (the test would see a leak).
    leaked = gate_probs(modality[:1], None, task[:1], None, EYE, EYE, EYE, torch.tensor(W_G, dtype=torch.float64))
    assert not torch.allclose(leaked, probs[:1], atol=1e-3)


def _hand_router(gate_inputs: str) -> Router:
    router = Router(2, 3, gate_inputs=gate_inputs, dtype=torch.float64)
    with torch.no_grad():
        for lin in (router.w_q, router.w_k, router.w_v):
            lin.weight.copy_(EYE)
        router.w_g.weight.copy_(torch.tensor(W_G, dtype=torch.float64).T)  # nn.Linear holds W^T
    return router


@pytest.mark.parametrize(("gate_inputs", "logits"), [
    # both: as in the test above, sample 0.
    ("both", (1.5, 1.0, 0.0)),
    # task_only: Q = K = V = [T1, T2] (c = 1/sqrt2). Query T1 scores [T1.T1, T1.T2]/sqrt2 = [c, 0]:
    # H1 = s T1 + (1-s) T2 = [1-s, s] with s = e^c/(e^c+1); query T2 scores [0, c]: H2 = [s, 1-s].
    # h = mean = [1/2, 1/2] whatever c is; logits = [1, 2, 0].
    ("task_only", (1.0, 2.0, 0.0)),
    # modality_only: Q = K = V = [M1] (one real token): attention 1, h = M1 = [sqrt2 ln3, 0];
    # logits = [2 sqrt2 ln3, 0, 0].
    ("modality_only", (2 * math.sqrt(2) * LN3, 0.0, 0.0)),
])
def test_router_gate_inputs_by_hand(gate_inputs: str, logits: tuple[float, ...]) -> None:
    modality, modality_mask, task, task_mask = _hand_batch()
    out = _hand_router(gate_inputs)(modality[:1], modality_mask[:1], task[:1], task_mask[:1])
    assert isinstance(out, GateOutput)
    assert torch.allclose(out.probs, torch.tensor([_softmax(*logits)], dtype=torch.float64), atol=1e-12)
    assert torch.equal(out.weights, out.probs)  # no top-k: the weights are the dense softmax


def test_router_top_k_weights_and_dense_probs() -> None:
    router = _hand_router("both")
    router.top_k = 1
    modality, modality_mask, task, task_mask = _hand_batch()
    out = router(modality, modality_mask, task, task_mask)
    # Sample 0's largest logit is expert 0 (1.5), sample 1's expert 1 (1.5 > 1.25).
    assert out.weights.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert torch.allclose(out.probs.sum(-1), torch.ones(2, dtype=torch.float64))


def test_select_top_k_renormalises_by_hand() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # Keep 0.5 and 0.25; they sum to 0.75: [0, 0.5/0.75, 0, 0.25/0.75] = [0, 2/3, 0, 1/3].
    kept = select_top_k(probs, 2)
    assert torch.allclose(kept, torch.tensor([[0.0, 2 / 3, 0.0, 1 / 3]]))
    assert kept[0, 0].item() == 0.0 and kept[0, 2].item() == 0.0  # exactly zero
    assert torch.equal(select_top_k(probs, None), probs)
    assert torch.equal(select_top_k(probs, 4), probs)


def test_load_balance_loss_uniform_and_by_hand() -> None:
    assert load_balance_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(1.0)
    assert load_balance_loss(torch.full((5, 4), 0.25), 2).item() == pytest.approx(1.0)
    # k = 1, E = 2: both samples' top-1 is expert 0 -> f = [1, 0]; P = mean([.9,.1],[.6,.4]) = [.75, .25];
    # loss = 2 * (1 * .75 + 0 * .25) = 1.5.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]], requires_grad=True)
    loss = load_balance_loss(probs, 1)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0  # through P, not f
    # k = 2, E = 3: top-2 of [.5,.3,.2] is {0,1}, of [.1,.2,.7] is {2,1}; each slot counts 1/2:
    # f = mean([.5,.5,0], [0,.5,.5]) = [.25, .5, .25]; P = [.3, .25, .45];
    # loss = 3 * (.25*.3 + .5*.25 + .25*.45) = 3 * .3125 = .9375.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert load_balance_loss(probs, 2).item() == pytest.approx(0.9375)
    # Everything on one expert: the maximum, E.
    assert load_balance_loss(torch.tensor([[1.0, 0.0, 0.0]] * 3), 1).item() == pytest.approx(3.0)


def test_gate_entropy_uniform_and_one_hot() -> None:
    probs = torch.stack([torch.full((12,), 1 / 12), torch.eye(12)[3]])
    ent = gate_entropy(probs)
    assert ent[0].item() == pytest.approx(math.log(12))
    assert ent[1].item() == 0.0  # 0 log 0 = 0, no NaN


def test_gate_stats_summary_by_hand() -> None:
    stats = GateStats()
    stats.update("vqa", GateOutput(weights=torch.zeros(1, 2), probs=torch.tensor([[0.25, 0.75]])))
    stats.update("vqa", GateOutput(weights=torch.zeros(1, 2), probs=torch.tensor([[1.0, 0.0]])))
    stats.update("report", GateOutput(weights=torch.zeros(2, 2), probs=torch.tensor([[0.2, 0.8], [0.4, 0.6]])))
    out = stats.summary()
    # vqa: entropies -(.25 ln .25 + .75 ln .75) and 0; usage mean([.25,.75],[1,0]) = [.625,.375];
    # argmax experts 1 and 0 -> top1 [.5, .5].
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert out["vqa"]["n"] == 2
    assert out["vqa"]["entropy"] == pytest.approx(h / 2)
    assert out["vqa"]["usage"] == pytest.approx([0.625, 0.375])
    assert out["vqa"]["top1"] == pytest.approx([0.5, 0.5])
    assert out["report"]["n"] == 2
    assert out["report"]["usage"] == pytest.approx([0.3, 0.7])
    assert out["report"]["top1"] == pytest.approx([0.0, 1.0])


# ------------------------------------------------------------------- the layer


def _hand_layer() -> M3OELinear:
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    return M3OELinear(base, experts=2, r=1, alpha=4)  # scaling = alpha / r = 4


def test_zero_b_gives_exactly_the_base_output() -> None:
    layer = _hand_layer()
    x = torch.randn(3, 5, 2)
    layer.gate = torch.tensor([0.3, 0.7])
    assert torch.equal(layer(x), layer.base(x))
    assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.lora_A.abs().sum() > 0  # A is initialised (kaiming), B is zero


def test_layer_output_with_alpha_over_r_scaling_by_hand() -> None:
    layer = _hand_layer()
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # A_0 = [1 0], A_1 = [0 1]
        layer.lora_B.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]))  # B_0 = [1 0]^T, B_1 = [0 2]^T
    x = torch.tensor([[1.0, 2.0]])
    layer.gate = torch.tensor([0.25, 0.5])
    # W0 x + b = [1+4, 3+8] + [.5, -.5] = [5.5, 10.5].
    # Expert 0: A_0 x = 1, B_0 * 1 = [1, 0], times g_0 * alpha/r = .25 * 4 = 1 -> [1, 0].
    # Expert 1: A_1 x = 2, B_1 * 2 = [0, 4], times g_1 * alpha/r = .5 * 4 = 2 -> [0, 8].
    # y = [6.5, 18.5].
    assert layer(x).tolist() == [[6.5, 18.5]]
    # The same as a merged weight: delta = 1 * B_0 A_0 + 2 * B_1 A_1 = [[1, 0], [0, 4]].
    assert layer.delta_weight(torch.tensor([0.25, 0.5])).tolist() == [[1.0, 0.0], [0.0, 4.0]]
    # 3-D input and a per-sample gate: each sample with its own gate.
    layer.gate = torch.tensor([[0.25, 0.5], [1.0, 0.0]])
    y = layer(torch.tensor([[[1.0, 2.0]], [[1.0, 2.0]]]))
    # Sample 1: only expert 0, times 1 * 4 = 4 -> [4, 0]; y = [9.5, 10.5].
    assert y.tolist() == [[[6.5, 18.5]], [[9.5, 10.5]]]


def test_a_layer_without_a_gate_says_so() -> None:
    with pytest.raises(RuntimeError, match="no gate"):
        _hand_layer()(torch.ones(1, 2))


# ---------------------------------------------------------------- the config


def test_configs_validate_in_one_line_and_round_trip() -> None:
    for bad in ({"experts": 0}, {"r": 0}, {"top_k": 13}, {"top_k": 0}, {"gate_inputs": "image"}):
        with pytest.raises(ConfigError) as err:
            M3OEConfig(**bad)
        assert "\n" not in str(err.value)
    for bad in ({"experts": 0}, {"top_k": 13}, {"gate_inputs": "image"}, {"load_balance": -1.0}):
        with pytest.raises(ConfigError, match=r"^adapter\."):
            AdapterConfig(method="m3oe", **bad)
    cfg = M3OEConfig(experts=4, r=2, top_k=2, gate_inputs="task_only", gate_dim=16)
    data = cfg.to_dict()
    assert data["peft_type"] == "M3OE"
    assert M3OEConfig.from_dict(json.loads(json.dumps(data))) == cfg
    from_job = M3OEConfig.from_adapter_config(AdapterConfig(method="m3oe", experts=6, r=4, alpha=8, top_k=3,
                                                            gate_inputs="modality_only", load_balance=0.1))
    assert (from_job.experts, from_job.r, from_job.alpha, from_job.top_k, from_job.gate_inputs,
            from_job.load_balance) == (6, 4, 8, 3, "modality_only", 0.1)


def test_the_registry_knows_m3oe_but_it_has_no_peft_config() -> None:
    assert METHODS["m3oe"] is METHOD and METHOD.host == "own" and not METHOD.prompt_learning
    assert not METHOD.stackable
    with pytest.raises(ConfigError, match="no PEFT config.*jobs/inject.py"):
        peft_config(AdapterConfig(method="m3oe"))


# --------------------------------------------------- on a tiny Llama: end to end


E, R = 4, 2


def _tiny(cfg: M3OEConfig | None = None) -> tuple[nn.Module, M3OE]:
    """(an untouched copy of the base, an M3OE on another copy with random nonzero A and B)."""
    torch.manual_seed(0)
    base = build_model("tiny-llama", vocab_size=VOCAB)
    pristine = copy.deepcopy(base)
    model = M3OE.inject(base, cfg or M3OEConfig(experts=E, r=R, alpha=8))
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_A.normal_(0, 0.5)
            layer.lora_B.normal_(0, 0.5)  # a fresh B is zero: it would change nothing
    return pristine, model


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 9), generator=torch.Generator().manual_seed(1))


def test_inject_replaces_the_targets_in_place_and_trains_only_the_adapter() -> None:
    pristine, model = _tiny()
    llm = model.llm
    assert sorted(model.layers) == sorted(n for n, m in pristine.named_modules()
                                          if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj"))
    assert all(llm.get_submodule(p) is layer for p, layer in model.layers.items())
    # The layers are the LLM's, not registered twice: M3OE's own parameters are the router's.
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"router"}
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in llm.parameters() if p.requires_grad} | {id(p) for p in
                                                                                 model.router.parameters()}
    with pytest.raises(ConfigError, match=r"target_modules query, value match no linear layer.*q_proj"):
        M3OE.inject(copy.deepcopy(pristine), M3OEConfig(target_modules=["query", "value"]))


def test_per_sample_gates_equal_each_sample_alone() -> None:
    _, model = _tiny()
    ids = _ids(2)
    gates = torch.tensor([[0.7, 0.1, 0.2, 0.0], [0.0, 0.0, 0.5, 0.5]])
    with torch.no_grad():
        both = model(input_ids=ids, gate=gates).logits
        one = model(input_ids=ids[:1], gate=gates[0]).logits
        two = model(input_ids=ids[1:], gate=gates[1:]).logits
    assert torch.allclose(both[0], one[0], atol=1e-5)
    assert torch.allclose(both[1], two[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    assert all(layer.gate is None for layer in model.layers.values())  # cleared after the call


def test_compute_gate_trains_the_router_not_the_embeddings() -> None:
    _, model = _tiny(M3OEConfig(experts=E, r=R, alpha=8, top_k=2))
    emb = model.llm.get_input_embeddings()
    modality, task = torch.tensor([[5, 6, 0]]), torch.tensor([[7, 8, 9, 10]])
    modality_mask, task_mask = torch.tensor([[1, 1, 0]]), torch.ones(1, 4, dtype=torch.long)
    out = model.compute_gate(emb, modality, modality_mask, task, task_mask)
    expected = model.router(emb(modality), modality_mask, emb(task), task_mask)
    assert torch.allclose(out.probs, expected.probs) and torch.allclose(out.weights, expected.weights)
    assert int((out.weights > 0).sum()) == 2
    with model.gate_context(out):
        loss = model.llm(input_ids=_ids(1)).logits.sum() + load_balance_loss(out.probs, 2)
    loss.backward()
    assert all(p.grad is not None for p in model.router.parameters())
    assert emb.weight.grad is None
    assert all(layer.gate is None for layer in model.layers.values())


@pytest.mark.parametrize("top_k", [None, 2])
def test_fold_to_lora_and_merge_give_the_same_logits(top_k: int | None, tmp_path: Path) -> None:
    pristine, model = _tiny()
    gate = select_top_k(torch.softmax(torch.tensor([0.3, -1.0, 1.2, 0.4]), -1), top_k)
    ids = _ids(2)
    with torch.no_grad():
        expected = model(input_ids=ids, gate=gate).logits
        assert not torch.allclose(expected, pristine(input_ids=ids).logits, atol=1e-3)  # the experts matter

        folder = model.fold_to_lora(gate, tmp_path / "lora", base_model_name_or_path="tiny")
        meta = json.loads((folder / "adapter_config.json").read_text())
        chosen = E if top_k is None else top_k
        assert meta["peft_type"] == "LORA" and meta["r"] == chosen * R and meta["lora_alpha"] == chosen * R
        assert set(load_file(str(folder / "adapter_model.safetensors"))) == {
            f"base_model.model.{p}.lora_{ab}.weight" for p in model.layers for ab in "AB"}
        folded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval()
        assert torch.allclose(folded(input_ids=ids).logits, expected, atol=1e-5)

        merged = model.merge(gate)
        assert not any(isinstance(m, M3OELinear) for m in merged.modules())
        assert type(merged.get_submodule("model.layers.0.self_attn.q_proj")) is nn.Linear
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    pristine, model = _tiny(M3OEConfig(experts=E, r=R, alpha=8, top_k=3, gate_inputs="task_only"))
    with torch.no_grad():
        model.router.w_g.weight.normal_()
    folder = model.save(tmp_path / "m3oe")
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["peft_type"] == "M3OE" and meta["hidden_size"] == 64 and meta["top_k"] == 3
    assert method_of_folder(folder) is METHOD
    assert set(load_file(str(folder / "adapter_model.safetensors"))) == set(model.state_dict_adapter())

    loaded = METHOD.load(copy.deepcopy(pristine), folder)
    assert isinstance(loaded, M3OE) and loaded.cfg == model.cfg
    assert not any(p.requires_grad for p in loaded.trainable_parameters())
    emb = model.llm.get_input_embeddings()
    args = (torch.tensor([[3, 4]]), None, torch.tensor([[5, 6, 7]]), None)
    ids = _ids(1)
    with torch.no_grad():
        gate, gate2 = model.compute_gate(emb, *args), loaded.compute_gate(loaded.llm.get_input_embeddings(), *args)
        assert torch.equal(gate.weights, gate2.weights)
        assert torch.equal(model(input_ids=ids, gate=gate).logits, loaded(input_ids=ids, gate=gate2).logits)
    assert all(p.requires_grad for p in M3OE.load(copy.deepcopy(pristine), folder, trainable=True)
               .trainable_parameters())


def test_load_refuses_a_folder_that_does_not_fit(tmp_path: Path) -> None:
    pristine, model = _tiny()
    folder = model.save(tmp_path / "m3oe")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.lora_A"

    def broken(name: str, change) -> Path:
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        save_file(change(dict(weights)), str(out / "adapter_model.safetensors"))
        return out

    wrong_shape = broken("shape", lambda w: {**w, key: torch.zeros(E, R + 1, 64)})
    missing = broken("missing", lambda w: {k: v for k, v in w.items() if k != key})
    extra = broken("extra", lambda w: {**w, "router.w_x.weight": torch.zeros(1)})
    for bad, pattern in ((wrong_shape, rf"{key} has shape \(4, 3, 64\), this model needs \(4, 2, 64\)"),
                         (missing, rf"missing 1 key\(s\), e.g. {key}"),
                         (extra, r"unexpected 1 key\(s\), e.g. router.w_x.weight"),
                         (tmp_path, "not an adapter folder")):
        llm = copy.deepcopy(pristine)
        with pytest.raises(ModelError, match=pattern) as err:
            M3OE.load(llm, bad)
        assert "\n" not in str(err.value)
        assert not any(isinstance(m, M3OELinear) for m in llm.modules())  # left as it was


def test_the_method_injects_from_a_job_adapter_config() -> None:
    base = build_model("tiny-llama", vocab_size=VOCAB)
    model = METHOD.inject(base, AdapterConfig(method="m3oe", experts=3, r=2, target_modules=["v_proj"]))
    assert isinstance(model, M3OE) and model.llm is base
    assert len(model.layers) == 2 and all(p.endswith("v_proj") for p in model.layers)
    assert next(iter(model.layers.values())).lora_A.shape == (3, 2, 64)
