"""In-LLM reference: layer-by-layer prefill with merges, against transformers itself."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightkv_edge.reference import Schedule, lightkv_budget, lightkv_merge  # noqa: E402
from lightkv_edge.reference.llm import layer_finish, layer_qkv, prefill_with_merge, _rope_fn  # noqa: E402

torch.set_num_threads(1)

# sequence: 5 text | image 4x4 (16) | 3 text | image 2x3 (6) | 6 text  = 36 rows
SLICES = [(5, 16, (4, 4)), (24, 6, (2, 3))]
S = 36


def _model(kind, layers=3):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, attn_implementation="eager")
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _model(request.param)


def _ids():
    return torch.randint(0, 97, (S,), generator=torch.Generator().manual_seed(1))


def test_empty_schedule_reproduces_hf_forward(model):
    ids = _ids()
    with torch.no_grad():
        out = model(ids[None], use_cache=True)
    ref = out.logits[0, -1]
    res = prefill_with_merge(model, ids, SLICES, Schedule((), (), ()))
    # float32, 3 layers of hidden 64: eager vs our eager differ only in op order; 1e-4
    torch.testing.assert_close(res.logits, ref, atol=1e-4, rtol=0)
    cache = out.past_key_values
    for li in range(len(model.model.layers)):
        torch.testing.assert_close(res.keys[li], cache.layers[li].keys[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.values[li], cache.layers[li].values[0], atol=1e-5, rtol=0)
    assert res.kept.tolist() == list(range(S)) and res.next_position == S
    # the same run through inputs_embeds with vision rows spliced in
    emb = model.get_input_embeddings()(ids[None])[0]
    vis = [torch.randn(n, 64) for _, n, _ in SLICES]
    full = emb.clone()
    for (s, n, _), v in zip(SLICES, vis):
        full[s:s + n] = v
    with torch.no_grad():
        ref2 = model(inputs_embeds=full[None]).logits[0, -1]
    a = prefill_with_merge(model, full, SLICES, Schedule((), (), ()))
    b = prefill_with_merge(model, ids, SLICES, Schedule((), (), ()), vision_embeds=vis)
    torch.testing.assert_close(a.logits, ref2, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)


def test_layer_matches_hf_decoder_layer_at_arbitrary_positions(model):
    # non-contiguous positions (what "keep" produces after a merge) through HF's own layer
    torch.manual_seed(2)
    h = torch.randn(1, 10, 64)
    pos = torch.tensor([[0, 1, 3, 4, 7, 9, 10, 11, 15, 16]])
    layer = model.model.layers[1]
    cos, sin = model.model.rotary_emb(h, pos)
    mask = torch.full((10, 10), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        ref = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        ref = ref[0] if isinstance(ref, tuple) else ref
        q, k, v = layer_qkv(layer, h, cos, sin, _rope_fn(model))
        ours = layer_finish(layer, h, q, k, v)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # float32, one layer


def test_unguided_merge_matches_hf_layers_on_merged_sequence(model):
    # Independent path: HF decoder layers, with the merge done by lightkv_merge by hand.
    ids = _ids()
    base = model.model
    h = base.embed_tokens(ids[None])
    pos = torch.arange(S)[None]
    with torch.no_grad():
        cos, sin = base.rotary_emb(h, pos)
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
        h = base.layers[0](h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        h = h[0] if isinstance(h, tuple) else h
        rows, kept = [], []
        cur = 0
        for s, n, grid in SLICES:
            rows.append(h[0, cur:s])
            kept += list(range(cur, s))
            m = lightkv_merge(h[0, s:s + n], None, windows=2, ratio=0.5, grid=grid)
            rows.append(m.x)
            kept += (m.kept + s).tolist()
            cur = s + n
        rows.append(h[0, cur:])
        kept += list(range(cur, S))
        h = torch.cat(rows)[None]
        pos = torch.tensor(kept)[None]
        cos, sin = base.rotary_emb(h, pos)
        m = h.shape[1]
        mask = torch.full((m, m), float("-inf")).triu(1)[None, None]
        for layer in base.layers[1:]:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
            h = h[0] if isinstance(h, tuple) else h
        ref = model.lm_head(base.norm(h))[0, -1]
    res = prefill_with_merge(model, ids, SLICES, Schedule((0,), (2,), (0.5,)), guided=False)
    assert res.kept.tolist() == kept
    assert res.positions.tolist() == kept                     # positions kept
    torch.testing.assert_close(res.logits, ref, atol=1e-4, rtol=0)
    n_final = S - 22 + sum(lightkv_budget(n, windows=2, ratio=0.5, grid=g) for _, n, g in SLICES)
    assert [k.shape[1] for k in res.keys] == [S, n_final, n_final]


def test_ratio_zero_and_last_layer_merges_change_nothing(model):
    ids = _ids()
    plain = prefill_with_merge(model, ids, SLICES, Schedule((), (), ()))
    zero = prefill_with_merge(model, ids, SLICES, Schedule((0, 1), (2, 1), (0.0, 0.0)),
                              positions="renumber")
    torch.testing.assert_close(zero.logits, plain.logits, atol=0, rtol=0)
    # a merge after the last layer cannot reach the last token: logits unchanged
    last = prefill_with_merge(model, ids, SLICES, Schedule((2,), (1,), (0.5,)))
    torch.testing.assert_close(last.logits, plain.logits, atol=0, rtol=0)
    assert last.kept.numel() < S


def test_schedule_positions_and_kv_policies(model):
    ids = _ids()
    sched = Schedule.parse("0-1", "2-1", "0.5-0.5")
    keep = prefill_with_merge(model, ids, SLICES, sched, positions="keep", kv_policy="exact")
    ren = prefill_with_merge(model, ids, SLICES, sched, positions="renumber", kv_policy="exact")
    comp = prefill_with_merge(model, ids, SLICES, sched, positions="keep", kv_policy="compact")
    m0, m1, m2 = (k.shape[1] for k in keep.keys)
    assert m0 == S and m0 > m1 > m2 == keep.kept.numel()
    assert keep.positions.tolist() == keep.kept.tolist()
    assert ren.positions.tolist() == list(range(ren.kept.numel()))
    assert ren.next_position == ren.kept.numel() and keep.next_position == S
    # stage 1 (after layer 0) sees identical states; afterwards positions differ, so only
    # the counts (fixed by stage 1's survivor positions) must agree
    assert ren.kept.numel() == keep.kept.numel()
    assert [k.shape[1] for k in ren.keys] == [m0, m1, m2]
    assert not torch.allclose(ren.logits, keep.logits)
    torch.testing.assert_close(comp.logits, keep.logits, atol=0, rtol=0)  # compaction is post-hoc
    assert all(k.shape[1] == m2 for k in comp.keys)
    assert all(p.tolist() == keep.positions.tolist() for p in comp.kv_positions)
    # layer 2 already holds the final set: untouched
    assert torch.equal(comp.keys[2], keep.keys[2]) and torch.equal(comp.values[2], keep.values[2])
    # layer 0 compacted with the composed coefficients of both stages, per image
    seq_a = torch.zeros(m2, S, dtype=torch.float64)
    text = torch.ones(S, dtype=torch.bool)
    row = {int(o): j for j, o in enumerate(keep.kept)}
    for (s, n, _), st in zip(SLICES, keep.states):
        text[s:s + n] = False
        a = st.matrix()                               # [M_img, n]
        for r in range(a.shape[0]):
            seq_a[row[s + int(st.orig_index[r])], s:s + n] = a[r]
    for i in torch.nonzero(text).flatten().tolist():
        seq_a[row[i], i] = 1.0
    expect_k = torch.einsum("ms,hsd->hmd", seq_a, keep.keys[0].double()).float()
    torch.testing.assert_close(comp.keys[0], expect_k, atol=1e-6, rtol=1e-6)  # f64 sums cast
    # layer 1 (rows after stage 1) compacted with stage 2's coefficients only
    rows1 = prefill_with_merge(model, ids, SLICES, Schedule((0,), (2,), (0.5,))).kept
    assert rows1.numel() == m1
    for (s, n, _), st in zip(SLICES, keep.states):
        assert torch.equal(rows1[(rows1 >= s) & (rows1 < s + n)] - s, st.stage_orig[1])
    seq_b = torch.zeros(m2, m1, dtype=torch.float64)
    row1 = {int(o): j for j, o in enumerate(rows1)}
    for (s, n, _), st in zip(SLICES, keep.states):
        a = st.matrix(1)                              # [M_img final, M_img after stage 1]
        for r in range(a.shape[0]):
            for c in range(a.shape[1]):
                if a[r, c]:
                    seq_b[row[s + int(st.orig_index[r])], row1[s + int(st.stage_orig[1][c])]] = a[r, c]
    for i in torch.nonzero(text).flatten().tolist():
        seq_b[row[i], row1[i]] = 1.0
    expect_k1 = torch.einsum("ms,hsd->hmd", seq_b, keep.keys[1].double()).float()
    torch.testing.assert_close(comp.keys[1], expect_k1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comp.values[1], torch.einsum(
        "ms,hsd->hmd", seq_b, keep.values[1].double()).float(), atol=1e-6, rtol=1e-6)


def test_guided_uses_attention(model):
    ids = _ids()
    sched = Schedule((1,), (1,), (0.5,))
    g = prefill_with_merge(model, ids, SLICES, sched, guided=True)
    u = prefill_with_merge(model, ids, SLICES, sched, guided=False)
    assert torch.equal(g.kept, u.kept)               # guidance only changes the weights
    assert not torch.allclose(g.keys[2], u.keys[2])


@pytest.mark.parametrize("kwargs", [dict(positions="bogus"), dict(kv_policy="bogus")])
def test_bad_arguments(model, kwargs):
    with pytest.raises(ValueError):
        prefill_with_merge(model, _ids(), SLICES, Schedule((), (), ()), **kwargs)


def test_bad_schedule_and_slices(model):
    with pytest.raises(ValueError):
        prefill_with_merge(model, _ids(), SLICES, Schedule((3,), (1,), (0.5,)))
    with pytest.raises(ValueError):
        prefill_with_merge(model, _ids(), [(30, 10, None)], Schedule((), (), ()))
    with pytest.raises(ValueError):
        prefill_with_merge(model, _ids(), [(0, 16, (3, 5))], Schedule((), (), ()))
    with pytest.raises(ValueError):
        prefill_with_merge(model, _ids()[None].repeat(2, 1), SLICES, Schedule((), (), ()))
