"""The in-LLM reference on Gemma 3 (reference/gemma3.py's layer maths), against transformers.

Two models: the tiny Gemma 3 of scripts/make_tiny_models.py (the one the GGUF parity
tests use: 2 sliding layers, window 512, one RoPE base, query_pre_attn_scalar = head_dim,
so it cannot tell a reference that ignores those apart) and `_rich()`, built here, where
every Gemma 3 feature changes the logits: sliding and full layers, a window of 6 rows
(shorter than the 16-row image), a local RoPE base != the global one,
query_pre_attn_scalar != head_dim, non-zero RMS weights. The final soft-capping, which
transformers' Gemma3ForConditionalGeneration ignores, is checked on a Gemma3ForCausalLM.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightkv_edge.reference import Schedule, guidance_scores  # noqa: E402
from lightkv_edge.reference.gemma3 import Gemma3Maths  # noqa: E402
from lightkv_edge.reference.llm import LlamaMaths, maths_for, prefill_with_merge  # noqa: E402

from helpers.tiny_vlms import tiny_model  # noqa: E402

torch.set_num_threads(1)

# sequence: 5 text | image 4x4 (16) | 3 text | image 2x3 (6) | 6 text  = 36 rows
SLICES = [(5, 16, (4, 4)), (24, 6, (2, 3))]
S = 36


def _text_config(**kw):
    return transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        sliding_window=6, rope_theta=10000.0, rope_local_base_freq=100.0,
        query_pre_attn_scalar=20, max_position_embeddings=128, pad_token_id=0, **kw)


def _random_norms(model):
    with torch.no_grad():   # transformers zeroes RMS weights (1 + w): make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def _rich():
    torch.manual_seed(0)
    text = _text_config()
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=16, patch_size=8)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, image_token_index=96)
    cfg._attn_implementation = "eager"
    model = transformers.Gemma3ForConditionalGeneration(cfg).to(torch.float64).eval()
    return _random_norms(model)


def _tiny():
    m = tiny_model("gemma3")
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        m.hf, torch_dtype=torch.float64, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module", params=["tiny", "rich"])
def model(request):
    return _tiny() if request.param == "tiny" else _rich()


def _inputs(model, seed=1):
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 8, (S,), generator=g)
    d = model.config.text_config.hidden_size
    vis = [torch.randn(n, d, generator=g, dtype=torch.float64) for _, n, _ in SLICES]
    full = model.get_input_embeddings()(ids[None])[0].clone()   # scaled by sqrt(D)
    types = torch.zeros(S, dtype=torch.int64)
    for (s, n, _), v in zip(SLICES, vis):
        full[s:s + n] = v
        types[s:s + n] = 1
    return ids, vis, full, types


def _hf(model, full, types=None):
    with torch.no_grad():
        out = model(inputs_embeds=full[None], use_cache=True,
                    token_type_ids=None if types is None else types[None])
    return out


def test_maths_for_picks_the_family():
    assert isinstance(maths_for(_rich()), Gemma3Maths)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    assert isinstance(maths_for(llama), LlamaMaths)


def test_ratio_zero_equals_transformers(model):
    """Every ratio 0 (and the empty schedule): the logits and every layer's K/V of
    transformers' Gemma 3 forward with token_type_ids (image rows bidirectional)."""
    ids, vis, full, types = _inputs(model)
    out = _hf(model, full, types)
    ref = out.logits[0, -1].float()
    empty = prefill_with_merge(model, ids, SLICES, Schedule((), (), ()), vision_embeds=vis)
    zero = prefill_with_merge(model, ids, SLICES, Schedule((0, 1), (2, 1), (0.0, 0.0)),
                              vision_embeds=vis, positions="renumber", kv_policy="compact")
    # float64 weights and activations; transformers and the reference both run the RMS
    # norms and the softmax in float32 (the same modules / the same cast); what is left is
    # the attention's op order (additive vs filled mask, one matmul order): measured 1.4e-8
    # on logits of size ~0.5 (both models); 1e-6 leaves room for another BLAS
    torch.testing.assert_close(empty.logits, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(zero.logits, empty.logits, atol=0, rtol=0)
    assert zero.kept.tolist() == list(range(S)) and zero.next_position == S
    cache = out.past_key_values
    for li in range(len(empty.keys)):
        # transformers' sliding layers keep only the last window - 1 rows: those are compared
        k, v = cache.layers[li].keys[0], cache.layers[li].values[0]
        assert k.shape[1] == (S if li == 2 or model.config.text_config.sliding_window > S
                              else model.config.text_config.sliding_window - 1)
        # K/V come out of the same modules in the same order: bit-identical (measured)
        torch.testing.assert_close(empty.keys[li][:, -k.shape[1]:], k, atol=1e-12, rtol=0)
        torch.testing.assert_close(empty.values[li][:, -k.shape[1]:], v, atol=1e-12, rtol=0)
    # the token path: embeddings scaled by sqrt(D) inside the reference as in transformers
    a = prefill_with_merge(model, full, SLICES, Schedule((), (), ()))
    torch.testing.assert_close(a.logits, empty.logits, atol=0, rtol=0)


def test_final_softcap_and_text_model_as_gemma3_for_causal_lm():
    """A Gemma3ForCausalLM (the text model alone, final logits soft-capped at 0.3 as
    llama.cpp does when the GGUF says so): the reference's logits, token ids only."""
    torch.manual_seed(3)
    cfg = _text_config(final_logit_softcapping=0.3, attn_implementation="eager")
    model = _random_norms(transformers.Gemma3ForCausalLM(cfg).to(torch.float64).eval())
    assert isinstance(maths_for(model), Gemma3Maths)
    ids = torch.randint(3, 90, (S,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids[None], use_cache=False).logits[0, -1].float()
        uncapped = model.lm_head(model.model(ids[None]).last_hidden_state)[0, -1].float()
    res = prefill_with_merge(model, ids, [], Schedule((), (), ()))
    torch.testing.assert_close(res.logits, ref, atol=1e-6, rtol=0)   # as above
    assert float(res.logits.abs().max()) < 0.3 < float(uncapped.abs().max())   # it bites


def test_images_are_bidirectional_and_text_causal():
    """The image rows' two-way attention is what makes the reference equal transformers
    with token_type_ids: causal images match transformers without them, and the two
    differ (the comparison above can fail)."""
    model = _rich()
    ids, vis, full, types = _inputs(model)
    causal = prefill_with_merge(model, ids, SLICES, Schedule((), (), ()), vision_embeds=vis,
                                non_causal_images=False)
    plain = _hf(model, full).logits[0, -1].float()
    torch.testing.assert_close(causal.logits, plain, atol=1e-6, rtol=0)   # as above
    two_way = _hf(model, full, types).logits[0, -1].float()
    assert float((two_way - plain).abs().max()) > 1e-3


def test_every_gemma3_feature_moves_the_logits():
    """Controls for the rich model: a reference that ignored the window, the local RoPE
    base or query_pre_attn_scalar would not equal transformers,
    because each of them changes transformers' own logits by far more than 1e-6."""
    ids, vis, full, types = _inputs(_rich())
    base = _hf(_rich(), full, types).logits[0, -1]
    for change in ({"sliding_window": 1000}, {"rope_local_base_freq": 10000.0},
                   {"query_pre_attn_scalar": 16}):
        model = _rich()
        for k, v in change.items():
            setattr(model.config.text_config, k, v)
        model = transformers.Gemma3ForConditionalGeneration(model.config).to(torch.float64)
        model.load_state_dict(_rich().state_dict())
        model.eval()
        moved = _hf(model, full, types).logits[0, -1]
        assert float((moved - base).abs().max()) > 1e-3, change


def _capture_qk(model, full, types):
    """transformers' own post-RoPE Q and K of every layer, through an attention function
    that records what transformers hands it (then runs its eager attention)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward
    seen = {}

    def capture(module, query, key, value, attention_mask, **kw):
        seen[module.layer_idx] = (query[0].clone(), key[0].clone(), kw["scaling"])
        return eager_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("lightkv_capture", capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register("lightkv_capture", eager_mask)  # eager's masks
    old = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "lightkv_capture"
    try:
        logits = _hf(model, full, types).logits
    finally:
        model.config.text_config._attn_implementation = old
    return seen, logits


@pytest.mark.parametrize("layer", [1, 2])   # a sliding layer (local base), a full one
def test_guidance_is_the_published_normalisation_on_the_layers_qk(layer):
    """The first stage's guidance equals the published normalisation (softmax over the
    queries of the unmasked Q K^T, summed over heads and text keys) computed on the Q/K
    transformers itself makes at that layer (q/k norms, the layer's RoPE base, scaled by
    query_pre_attn_scalar ** -0.5); a later stage's on the reference's own Q/K of its
    layer, on the rows present then."""
    model = _rich()
    ids, vis, full, types = _inputs(model)
    seen, logits = _capture_qk(model, full, types)
    # the capture ran transformers' eager forward: its logits are the plain eager ones
    torch.testing.assert_close(logits, _hf(model, full, types).logits, atol=0, rtol=0)
    q, k, scaling = seen[layer]
    assert scaling == pytest.approx(20 ** -0.5)
    rep = q.shape[0] // k.shape[0]
    logits = (q @ k.repeat_interleave(rep, dim=0).transpose(1, 2)) * scaling   # [H, S, S]
    text = torch.ones(S, dtype=torch.bool)
    for s, n, _ in SLICES:
        text[s:s + n] = False
    stages = Schedule((layer, 3), (2, 1), (0.5, 0.5))
    for policy in ("compact", "exact"):
        res = prefill_with_merge(model, ids, SLICES, stages, vision_embeds=vis,
                                 kv_policy=policy, protect=1.0)
        assert len(res.guidance) == 2 and all(len(g) == 2 for g in res.guidance)
        for (s, n, _), got in zip(SLICES, res.guidance[0]):
            want = guidance_scores(logits, torch.arange(s, s + n), torch.nonzero(text).flatten())
            # float64 Q/K from the same modules; only the products' order differs
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        # stage 2 (layer 3, after the first merge): the rows present when layer 3 ran
        if policy == "exact":
            q3, k3 = res.queries[3], res.keys[3]
            orig = res.kv_positions[3]   # positions "keep": the rows' original indices
            is_text = torch.ones(orig.numel(), dtype=torch.bool)
            img_rows = []
            for s, n, _ in SLICES:
                r = torch.nonzero((orig >= s) & (orig < s + n)).flatten()
                is_text[r] = False
                img_rows.append(r)
            rep = q3.shape[0] // k3.shape[0]
            lg = (q3 @ k3.repeat_interleave(rep, dim=0).transpose(1, 2)) * scaling
            for r, got in zip(img_rows, res.guidance[1]):
                want = guidance_scores(lg, r, torch.nonzero(is_text).flatten())
                torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_merging_runs_both_policies_and_positions(model):
    """Merges after layer 0 (and after layer 1 on the 4-layer model): each image keeps its
    published count, the cache shapes follow the policy, the positions the policy."""
    ids, vis, _, _ = _inputs(model)
    n_layer = len(maths_for(model).layers)
    stages = Schedule((0,), (2,), (0.5,)) if n_layer == 2 else Schedule((0, 1), (2, 1), (0.5, 0.5))
    for positions in ("keep", "renumber"):
        ex = prefill_with_merge(model, ids, SLICES, stages, vision_embeds=vis,
                                positions=positions, kv_policy="exact")
        co = prefill_with_merge(model, ids, SLICES, stages, vision_embeds=vis,
                                positions=positions, kv_policy="compact")
        torch.testing.assert_close(ex.logits, co.logits, atol=0, rtol=0)
        m = ex.kept.numel()
        assert m < S and ex.keys[0].shape[1] == S and ex.keys[-1].shape[1] == m
        assert all(k.shape[1] == m for k in co.keys)
        want = ex.kept if positions == "keep" else torch.arange(m)
        assert ex.positions.tolist() == want.tolist()
        assert bool(torch.isfinite(ex.logits).all())


def test_greedy_continuation_equals_transformers_decoding(model):
    """tests/helpers/layer_ref.greedy_after_prefill on Gemma 3 (the reference's view of the
    tokens decoded after a layer-mode prefill): with nothing merged, the logits of 8
    steps equal transformers' own cached decoding after the same prefill (its sliding
    layers' caches keep window - 1 rows, our window mask the same rows)."""
    from helpers.layer_ref import greedy_after_prefill
    ids, vis, full, types = _inputs(model)
    pre = prefill_with_merge(model, ids, SLICES, Schedule((), (), ()), vision_embeds=vis)
    toks, logits = greedy_after_prefill(model, pre, 8)
    out = _hf(model, full, types)
    cache, want = out.past_key_values, [out.logits[0, -1].float()]
    with torch.no_grad():
        for i, t in enumerate(toks):
            o = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([S + i]))
            cache = o.past_key_values
            want.append(o.logits[0, -1].float())
    assert toks == [int(torch.argmax(w)) for w in want[:-1]]
    for a, b in zip(logits, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)   # as in the prefill test
