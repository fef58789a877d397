"""train.compile and train.fused_loss: the fused LM loss against HF's, per-layer compile, and the job running both."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ray_med.adapters.config import AdapterConfig
from ray_med.adapters.registry import get_method
from ray_med.config import load_config
from ray_med.errors import ConfigError
from ray_med.models import build_model
from ray_med.training import speed
from ray_med.training.config import PretrainConfig
from ray_med.training.speed import compile_layers, fuse_lm_loss, linear_cross_entropy, resolve_fused_loss

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, **kw: object):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_chunked_loss_matches_hf_loss_and_gradients_on_tiny_llama(adapter: str | None, monkeypatch) -> None:
    # Chunks of 7 tokens: several per sequence, the last one partial, so chunk edges are exercised.
    monkeypatch.setattr(speed, "CHUNK_BYTES", 4 * VOCAB * 7)
    torch.manual_seed(0)
    plain = build_model("tiny-llama", vocab_size=VOCAB)
    if adapter:  # the domain stage: a frozen base (and lm_head), only LoRA trains
        plain = get_method(adapter).inject(plain, AdapterConfig(method=adapter, r=4, alpha=8, dropout=0.0))
    fused = copy.deepcopy(plain)
    fuse_lm_loss(fused, "chunked")
    ids = torch.randint(0, VOCAB, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored targets (a prompt's positions) count in neither the sum nor the mean
    for kw in ({}, {"num_items_in_batch": 41}):
        a, ga = _loss_and_grads(plain, ids, labels, **kw)
        b, gb = _loss_and_grads(fused, ids, labels, **kw)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert ga.keys() == gb.keys() and ga
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
    if adapter:
        assert all("lora" in n for n in ga)
    # Without labels, or without autograd (evaluation), it is HF's forward with its logits.
    with torch.no_grad():
        assert fused(input_ids=ids, labels=labels).logits.shape == (3, 20, VOCAB)
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_chunked_loss_never_holds_more_than_a_chunk_of_logits() -> None:
    # The function itself, against the loss of the full logits (bf16 inputs, fp32 loss, as on a GPU).
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(VOCAB, 16, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, VOCAB, (50,))
    ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), t)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, t, chunk_tokens=8)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h.grad.float(), gh.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), gw.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernel needs a CUDA GPU")
def test_liger_loss_matches_hf_loss_on_gpu() -> None:
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    plain = build_model("tiny-llama", vocab_size=VOCAB).cuda()
    fused = copy.deepcopy(plain)
    fuse_lm_loss(fused, resolve_fused_loss(True, on_gpu=True))
    ids = torch.randint(0, VOCAB, (3, 20), device="cuda")
    a, ga = _loss_and_grads(plain, ids, ids)
    b, gb = _loss_and_grads(fused, ids, ids)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-5, msg=name)


def test_fused_loss_settings() -> None:
    assert resolve_fused_loss(False, on_gpu=True) is None
    if not torch.cuda.is_available():  # on CPU auto is the chunked loss, and liger a one-line error
        assert resolve_fused_loss(True, on_gpu=False) == resolve_fused_loss("auto", on_gpu=False) == "chunked"
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            resolve_fused_loss("liger", on_gpu=False)
    assert resolve_fused_loss("chunked", on_gpu=True) == "chunked"
    cfg = REPO / "jobs/configs/pretrain/tiny.yaml"
    assert load_config(PretrainConfig, cfg, ["train.fused_loss=chunked"]).train.fused_loss == "chunked"
    assert load_config(PretrainConfig, cfg, ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.fused_loss must be true, false or one of auto, chunked, liger"):
        load_config(PretrainConfig, cfg, ["train.fused_loss=fast"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(PretrainConfig, cfg, ["train.compile=sometimes"])


def test_compile_layers_compiles_each_block_in_place() -> None:
    torch.manual_seed(0)
    model = build_model("tiny-llama", vocab_size=VOCAB)
    keys = list(model.state_dict())
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    # eager backend: dynamo's capture without a code generator (the job test below uses aot_eager).
    assert compile_layers(model, backend="eager") == model.config.num_hidden_layers
    assert list(model.state_dict()) == keys  # DeepSpeed, checkpoints and the export see the same names
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager)
    with pytest.raises(ConfigError, match="no transformer blocks"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_pretrain_job_with_compile_and_fused_loss_in_local_mode(ray_session, job_main, shared_data, tmp_path,
                                                                 monkeypatch, capsys) -> None:
    # Local mode runs the worker in this process, so the backend can be swapped: aot_eager traces each
    # layer's forward and backward as inductor would, without inductor's C++ build (~35 s on 2 CPUs).
    monkeypatch.setattr(speed, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    name = "compiled"
    code = job_main("pretrain")([
        "--config", str(REPO / "jobs/configs/pretrain/tiny.yaml"), f"corpus.root={shared_data}",
        f"run.storage={tmp_path}", f"run.name={name}", "tokenizer.vocab_size=300", "train.seq_len=32",
        # One small source: the tokenizer and the packing take seconds, not the test's time.
        "corpus.sources=[{name: replay, reader: text, path: 'pkg://sklearn/datasets/descr', options: {split: paragraph}}]",
        "train.micro_batch_size=2", "train.max_steps=2", "train.log_every=1", "eval.max_sequences=2",
        "eval.every_steps=100", "scaling.num_workers=0", "train.compile=true", "train.fused_loss=chunked",
    ])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "[pretrain] step 2/2" in out and "pretraining finished at step 2" in out
    assert "timings:     first step" in out
    history = json.loads((tmp_path / name / "metrics.json").read_text())
    rows = [r for r in history if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert history[-1]["time_to_first_step_s"] > 0 and history[-1]["checkpoint_save_s"] == 0.0  # local: no saves
    run = json.loads((tmp_path / name / "run.json").read_text())
    assert json.dumps(run).count("time_to_first_step_s") >= 1


def test_domain_stage_names_itself(monkeypatch, capsys, tmp_path) -> None:
    # The domain stage reuses pretraining's driver: its lines say [domain] and 'domain adaptation finished'.
    from ray_med.config import from_dict
    from ray_med.runtime import RunContext, Storage
    from ray_med.training import finetune
    from ray_med.training.config import FinetuneConfig

    seen = {}

    class Result:
        metrics = {"step": 3, "loss": 1.5}

    def fake_train_lm(pcfg, ctx, *, adapter=None, name="pretrain"):
        seen["name"] = name
        return Result(), [{"step": 3, "loss": 1.5, "time_to_first_step_s": 2.0, "checkpoint_save_s": 0.5}]

    monkeypatch.setattr(finetune, "train_lm", fake_train_lm)
    cfg = from_dict(FinetuneConfig, {"stage": "domain", "model": {"preset": "tiny-llama"}})
    ctx = RunContext(job="finetune", name="dom", storage=Storage.parse(str(tmp_path)))
    outputs = finetune.run_finetune(cfg, ctx)
    out = capsys.readouterr().out
    assert seen["name"] == "domain"
    assert "domain adaptation finished at step 3" in out and "pretraining" not in out
    assert "first step 2.0 s after the job started, 0.50 s saving checkpoints" in out
    assert outputs.metrics["time_to_first_step_s"] == 2.0


def test_gpu_configs_load_and_fit_their_cards() -> None:
    from ray_med.cluster.sizing import size
    from ray_med.training.config import FinetuneConfig

    pre = load_config(PretrainConfig, REPO / "jobs/configs/pretrain/llama1b_gpu.yaml", [])
    dom = load_config(FinetuneConfig, REPO / "jobs/configs/finetune/llama1b_domain_gpu.yaml", [])
    for t in (pre.train, dom.lm):
        assert t.compile and t.fused_loss == "auto" and t.seq_len == 2048 and not t.activation_checkpointing
    assert dom.stage == "domain" and pre.checkpoint.async_upload and dom.checkpoint.async_upload
    # Model state (weights, grads, Adam) leaves the activations most of an 80 GB card.
    s = size(REPO / "jobs/configs/pretrain/llama1b_gpu.yaml")
    assert s.params == pytest.approx(1.10e9, rel=0.01) and s.per_gpu["total"] == pytest.approx(17.6e9, rel=0.01)
    lora = size(REPO / "jobs/configs/finetune/llama1b_domain_gpu.yaml")
    assert lora.trainable < 5e6 and lora.per_gpu["total"] < 3e9
