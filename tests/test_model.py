import pytest
import torch

from accel_gpt import generate
from accel_gpt.hf import to_hf_model
from accel_gpt.model import PRESETS, GPTConfig, GPTModel, KVCache, generate_ids, sample_next
from accel_gpt.tokenizer import get_tokenizer


def small(**overrides) -> GPTModel:
    torch.manual_seed(0)
    cfg = dict(vocabulary_size=1000, context_len=32, embedding_dim=48, num_heads=4, num_layers=2, dropout=0.0)
    return GPTModel(**(cfg | overrides))


def test_original_keyword_names_and_submodules():
    model = small()
    for name in ("tok_emb", "pos_emb", "drop_emb", "trf_blocks", "final_norm", "out_head"):
        assert hasattr(model, name)
    logits = model(torch.randint(0, 1000, (3, 17)))
    assert logits.shape == (3, 17, 1000)
    from_config = GPTModel(
        GPTConfig(vocabulary_size=1000, context_len=32, embedding_dim=48, num_heads=4, num_layers=2, dropout=0.0)
    )
    assert from_config.config == model.config
    assert from_config.num_parameters() == model.num_parameters()


def test_no_causal_mask_buffer_bloats_the_state_dict():
    model = small()
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize(
    "qkv_bias, bias, tie, expected",
    [
        (False, True, False, 163_009_536),
        (False, True, True, 124_412_160),
        (True, True, True, 124_439_808),
        # nanoGPT's bias=False model: it reports 123.59M = this + 47 padding rows x 768 - 1024 x 768 positions.
        (False, False, True, 124_337_664),
    ],
)
def test_gpt2_small_parameter_counts(qkv_bias, bias, tie, expected):
    with torch.device("meta"):  # counts only: no memory for 124M parameters
        model = GPTModel(GPTConfig(**PRESETS["gpt2-small"], qkv_bias=qkv_bias, bias=bias, tie_weights=tie))
    assert model.num_parameters() == expected


def test_without_bias_no_layer_has_one():
    model = small(bias=False, qkv_bias=True)
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert biases == ["trf_blocks.0.att.qkv.bias", "trf_blocks.1.att.qkv.bias"]  # qkv has its own switch
    idx = torch.randint(0, 1000, (2, 32))
    loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_presets_have_gpt2_sizes():
    sizes = {k: (v["embedding_dim"], v["num_layers"], v["num_heads"]) for k, v in PRESETS.items()}
    assert sizes["gpt2-medium"] == (1024, 24, 16)
    assert sizes["gpt2-large"] == (1280, 36, 20)
    assert sizes["gpt2-xl"] == (1600, 48, 25)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_weights_share_one_tensor_and_train_together(tie):
    model = small(tie_weights=tie)
    assert (model.out_head.weight is model.tok_emb.weight) is tie
    model(torch.tensor([[1, 2, 1, 2]])).logsumexp(-1).sum().backward()
    # Token 500 never appears in the input: its embedding row learns only through a tied output head.
    assert bool(model.tok_emb.weight.grad[500].abs().sum() > 0) is tie


# Each modern option alone, and all of them together (the `fast` recipe's network).
OPTIONS = [
    {}, {"position": "rotary"}, {"norm": "rmsnorm"}, {"qk_norm": True}, {"activation": "relu2"},
    {"zero_init_projections": True}, {"logit_softcap": 15.0},
    {"position": "rotary", "norm": "rmsnorm", "qk_norm": True, "activation": "relu2", "zero_init_projections": True,
     "logit_softcap": 15.0},
]  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o) or "gpt2")
def test_attention_is_causal(options):
    model = small(**options).eval()
    if options.get("zero_init_projections"):  # else every block is the identity and nothing could leak
        torch.nn.init.normal_(model.trf_blocks[0].att.out_proj.weight, std=0.02)
    x = torch.randint(0, 1000, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 1000  # change only the future
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7])
    assert not torch.allclose(model(x)[:, 7:], model(y)[:, 7:])


@pytest.mark.parametrize("options", OPTIONS[1:], ids=lambda o: "+".join(o))
def test_every_option_decodes_with_the_cache_as_without_and_its_chunked_loss_is_the_plain_one(options):
    model = small(num_layers=3, **options).eval()
    torch.nn.init.normal_(model.trf_blocks[1].ff.proj.weight, std=0.02)  # not all zero
    torch.manual_seed(3)
    idx = torch.randint(0, 1000, (2, 30))
    cached = generate_ids(model, idx[:, :6], 30)  # through the window's end, where the cache is rebuilt
    assert torch.equal(cached, generate_ids(model, idx[:, :6], 30, use_cache=False))
    targets = torch.randint(0, 1000, (2, 30))
    losses, grads = [], []
    for chunk in (0, 7):
        model.zero_grad()
        model.loss_chunk = chunk
        losses.append(model(idx, targets))
        losses[-1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for plain, chunked in zip(*grads):
        torch.testing.assert_close(plain, chunked, rtol=1e-4, atol=1e-6)


def test_the_options_change_the_network_as_named():
    assert small(position="rotary").pos_emb is None and small().pos_emb is not None
    assert isinstance(small(norm="rmsnorm").final_norm, torch.nn.RMSNorm)
    zero = small(zero_init_projections=True)
    assert all(not b.att.out_proj.weight.any() and not b.ff.proj.weight.any() for b in zero.trf_blocks)
    capped = small(logit_softcap=2.0).eval()
    assert capped(torch.randint(0, 1000, (1, 8))).abs().max() < 2.0
    with pytest.raises(ValueError, match="position must be one of learned, rotary, got 'alibi'"):
        small(position="alibi")


def test_greedy_generation_is_deterministic_and_crops_context():
    model = small().eval()
    idx = torch.randint(0, 1000, (1, 40))  # longer than context_len 32: must be cropped, not crash
    a = generate_ids(model, idx, max_new_tokens=5, context_size=32, top_k=1)
    b = generate_ids(model, idx, max_new_tokens=5, context_size=32, temperature=0.0)
    assert a.shape == (1, 45) and torch.equal(a, b)
    expected = model(idx[:, -32:])[:, -1].argmax(-1)
    assert a[0, 40] == expected


def test_sampled_generation_respects_top_k():
    model = small().eval()
    idx = torch.randint(0, 1000, (1, 4))
    logits = model(idx)[:, -1]
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        out = generate_ids(model, idx, 1, top_k=3, temperature=1.5, generator=gen)
        assert out[0, -1].item() in allowed


def test_cached_decoding_gives_the_full_recompute_logits():
    model = small(qkv_bias=True).eval()
    idx = torch.randint(0, 1000, (2, 20))
    cache = KVCache(model.config.num_layers, 32)
    with torch.no_grad():
        steps = [model(idx[:, :12], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(12, 20)]
        full = model(idx)
    assert cache.length == 20 and all(step.shape == (2, 1, 1000) for step in steps)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 11:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one position at a time"):  # a block after a prefix would be masked wrong
        model(idx[:, :2], cache=cache)


@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 40), (30, 10), (32, 4), (45, 6)])
def test_cached_greedy_generation_equals_full_recompute(prompt_len, new_tokens):
    """Short prompts, prompts that reach the 32-token window while generating, fill it, or are longer than it."""
    model = small(num_layers=3).eval()
    torch.manual_seed(prompt_len)
    idx = torch.randint(0, 1000, (2, prompt_len))
    cached = generate_ids(model, idx, new_tokens)
    assert cached.shape == (2, prompt_len + new_tokens)
    assert torch.equal(cached, generate_ids(model, idx, new_tokens, use_cache=False))
    shorter_window = generate_ids(model, idx, new_tokens, context_size=16)
    assert torch.equal(shorter_window, generate_ids(model, idx, new_tokens, context_size=16, use_cache=False))


def test_seeded_sampling_is_the_same_with_and_without_the_cache():
    model = small().eval()
    idx = torch.randint(0, 1000, (1, 6))
    runs = [
        generate_ids(
            model,
            idx,
            30,
            temperature=1.0,
            top_k=50,
            top_p=0.9,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(7),
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(*runs)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_p=0.75, generator=gen).item() for _ in range(300)}
    assert draws == {0, 2}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are cut
    draws = {sample_next(logits, 1.0, top_p=0.85, generator=gen).item() for _ in range(300)}
    assert draws == {0, 2, 3}
    assert {sample_next(logits, 1.0, top_p=0.1, generator=gen).item() for _ in range(50)} == {0}  # top token stays
    draws = {sample_next(logits, 1.0, top_k=3, top_p=0.95, generator=gen).item() for _ in range(300)}
    assert draws == {0, 2, 3}  # top_k first, then top_p over the renormalised rest


def test_generate_returns_prompt_plus_continuation():
    model = GPTModel(**PRESETS["tiny"])
    text = generate(model, "Every effort moves you", 5, tokenizer=get_tokenizer("gpt2"))
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you")
    assert model.training  # mode restored


@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (True, True)])
def test_logits_match_huggingface_gpt2(qkv_bias, tie):
    pytest.importorskip("transformers")
    model = small(qkv_bias=qkv_bias, tie_weights=tie).eval()
    with torch.no_grad():  # random, non-zero biases so the mapping of every tensor is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    cfg = model.config
    hf = to_hf_model(model).eval()
    idx = torch.randint(0, cfg.vocabulary_size, (2, cfg.context_len))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie, chunk", [(False, 7), (True, 64), (False, 1000)])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tie, chunk):
    import torch.nn.functional as F

    from accel_gpt.model import chunked_cross_entropy

    model = small(tie_weights=tie)
    idx, targets = torch.randint(0, 1000, (3, 30)), torch.randint(0, 1000, (3, 30))
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.final_norm(model.trf_blocks(model.tok_emb(idx) + model.pos_emb(torch.arange(30))))
    chunked = chunked_cross_entropy(hidden, model.out_head.weight, targets, chunk=chunk)
    (chunked * 2.0).backward()  # upstream scaling (e.g. gradient accumulation) must pass through
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, 2.0 * expected[name], atol=1e-6, rtol=1e-4, msg=name)
    model.zero_grad()
    torch.testing.assert_close(model(idx, targets), plain, atol=1e-5, rtol=0)  # forward(idx, targets) path
    model.loss_chunk = 0  # the plain path GPUs use by default
    torch.testing.assert_close(model(idx, targets), plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets), plain, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_chunked_loss_gradients_survive_fp16_parameters_and_a_loss_scale():
    """fp16 parameters (FSDP's mixed precision) and GradScaler's loss scale: the gradient of a mean over 8,192
    tokens, a small probability over 8,192, lies below fp16's smallest number; scaled first, it does not."""
    import torch.nn.functional as F

    from accel_gpt.model import chunked_cross_entropy

    torch.manual_seed(0)
    tokens, dim, vocab = 8192, 8, 8000
    hidden, weight, targets = (
        torch.randn(tokens, dim),
        torch.randn(vocab, dim) * 0.02,
        torch.randint(0, vocab, (tokens,)),
    )
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    F.cross_entropy(h32 @ w32.T, targets).backward()
    h16, w16 = hidden.half().requires_grad_(), weight.half().requires_grad_()
    (chunked_cross_entropy(h16, w16, targets, chunk=2048) * 2.0**16).backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.float16
    for got, want in ((h16.grad, h32.grad), (w16.grad, w32.grad)):
        assert ((got.float() / 2.0**16 - want).norm() / want.norm()).item() < 2e-3  # 2e-2 when formed unscaled


@pytest.mark.parametrize("chunk", [0, 64])
def test_both_loss_paths_on_bf16_parameters_without_autocast_give_an_fp32_loss(chunk):
    """FSDP2's bf16 mixed precision casts the parameters and runs no autocast: each loss path (chunked, and the
    plain one GPUs use) then gets bf16 weights and activations. The chunked loss once crashed on them (an fp32
    addmm_ of bf16 matrices); both must return an fp32 loss near the fp32 model's, with finite bf16 gradients.
    tests/test_launch.py trains under the real FSDP2 bf16 policy (chunked loss) and checks the losses it logs."""
    model = small(tie_weights=False)
    model.loss_chunk = chunk
    idx, targets = torch.randint(0, 1000, (2, 32)), torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        fp32 = model(idx, targets)
    model.to(torch.bfloat16)
    loss = model(idx, targets)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(fp32.item(), abs=0.02)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad.dtype == torch.bfloat16 and torch.isfinite(param.grad).all(), name
    assert model.out_head.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    model = small(dropout=0.0)
    idx, targets = torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))
    model(idx, targets).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx, targets).backward()
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [0, 7])
def test_padded_vocabulary_changes_no_result_and_is_never_predicted(tie, chunk):
    plain, padded = small(tie_weights=tie), small(tie_weights=tie, vocab_multiple=64)
    assert padded.tok_emb.weight.shape == (1024, 48) and padded.out_head.weight.shape == (1024, 48)
    assert padded.num_parameters() == plain.num_parameters()  # padding rows are not parameters of the network
    torch.testing.assert_close(padded.tok_emb.weight[:1000], plain.tok_emb.weight, rtol=0, atol=0)
    x, y = torch.randint(0, 1000, (2, 32)), torch.randint(0, 1000, (2, 32))
    assert padded(x).shape == (2, 32, 1000)  # the padding rows' logits never leave the model
    torch.testing.assert_close(padded(x), plain(x))
    plain.loss_chunk = padded.loss_chunk = chunk
    loss_plain, loss_padded = plain(x, y), padded(x, y)
    torch.testing.assert_close(loss_padded, loss_plain)
    loss_plain.backward()
    loss_padded.backward()
    torch.testing.assert_close(padded.out_head.weight.grad[:1000], plain.out_head.weight.grad)
    assert not padded.out_head.weight.grad[1000:].any()  # zero rows get zero gradients: they stay zero


def test_sampling_never_draws_a_padding_id():
    model = small(vocab_multiple=64).eval()
    with torch.no_grad():
        model.out_head.weight[1000:] = 100.0  # padding rows that would win every draw if they were not masked
    generator = torch.Generator().manual_seed(0)
    out = generate_ids(model, torch.tensor([[1, 2, 3]]), 20, temperature=1.0, generator=generator)
    assert int(out.max()) < 1000
