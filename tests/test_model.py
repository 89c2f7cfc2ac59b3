import pytest
import torch

from asr.model import CTCModel, ModelConfig


def make_model(**kw) -> CTCModel:
    torch.manual_seed(0)
    return CTCModel(ModelConfig(hidden_size=32, num_layers=3, **kw)).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_output_shapes_and_lengths(cell):
    model = make_model(cell=cell, chunk_frames=5, lookahead_frames=3)
    feats = torch.randn(3, 100, 80)
    lengths = torch.tensor([100, 61, 8])
    log_probs, out_lengths, state = model(feats, lengths)
    assert log_probs.shape == (3, 33, 29)
    assert out_lengths.tolist() == [33, 20, 2]
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 33), atol=1e-5)
    assert len(state) == 3


def test_padding_does_not_change_outputs():
    model = make_model(chunk_frames=4, lookahead_frames=2)
    a, b = torch.randn(1, 90, 80), torch.randn(1, 50, 80)
    batch = torch.zeros(2, 90, 80)
    batch[0], batch[1, :50] = a[0], b[0]
    together, lengths, _ = model(batch, torch.tensor([90, 50]))
    alone_a = model(a, torch.tensor([90]))[0]
    alone_b = model(b, torch.tensor([50]))[0]
    torch.testing.assert_close(together[0], alone_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[1, : lengths[1]], alone_b[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("chunk,lookahead", [(4, 2), (5, 7), (3, 0)])
def test_chunk_by_chunk_with_carried_state_equals_one_pass(cell, chunk, lookahead):
    """Feeding one chunk plus its lookahead at a time, carrying the forward state, equals the batched pass."""
    model = make_model(cell=cell, chunk_frames=chunk, lookahead_frames=lookahead)
    stack = model.config.stack_frames
    feats = torch.randn(1, 3 * 47, 80)
    whole = model(feats, torch.tensor([feats.shape[1]]))[0][0]
    state, pieces, start = None, [], 0
    step, context = chunk * stack, lookahead * stack
    while feats.shape[1] - start >= step + context:
        piece = feats[:, start : start + step + context]
        out, _, state = model(piece, torch.tensor([piece.shape[1]]), state, num_output=chunk)
        pieces.append(out[0])
        start += step
    rest = feats[:, start:]
    out, _, state = model(rest, torch.tensor([rest.shape[1]]), state)
    pieces.append(out[0])
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-5, rtol=1e-4)


def test_lookahead_limits_what_the_output_depends_on():
    """An output frame changes when input within chunk + lookahead changes, never beyond it."""
    model = make_model(chunk_frames=4, lookahead_frames=2)
    feats = torch.randn(1, 3 * 40, 80)
    base = model(feats, torch.tensor([120]))[0][0]
    changed = feats.clone()
    changed[:, 3 * 20 :] += 1.0  # model frames 20+ (chunk 5 onwards) perturbed
    out = model(changed, torch.tensor([120]))[0][0]
    # chunk 3 (frames 12-15) sees frames up to 17: unchanged; chunk 4 (16-19) sees 20, 21: changed
    torch.testing.assert_close(out[:16], base[:16])
    assert not torch.allclose(out[16:20], base[16:20])


def test_full_context_mode_is_an_ordinary_blstm():
    """chunk_frames=0: the first output depends on input far beyond any lookahead."""
    feats = torch.randn(1, 90, 80)
    changed = feats.clone()
    changed[:, 30:33] += 3.0  # model frame 10
    for chunk, affected in ((0, True), (4, False)):
        model = make_model(chunk_frames=chunk, lookahead_frames=2)
        first = model(feats, torch.tensor([90]))[0][0, 0]
        first_changed = model(changed, torch.tensor([90]))[0][0, 0]
        assert (not torch.allclose(first, first_changed)) == affected


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="cell"):
        ModelConfig(cell="transformer")
    with pytest.raises(ValueError):
        ModelConfig(chunk_frames=-1)


def _naive_lc_blstm(model: CTCModel, features: torch.Tensor, length: int) -> torch.Tensor:
    """The latency-controlled BiLSTM written out frame range by frame range for one utterance: log-probs (T', vocab).

    Layer by layer: the forward LSTM runs over the whole utterance; for chunk k, the backward LSTM runs from zero over
    the chunk plus the next ``lookahead`` frames *as the layer below computed them for chunk k* (its own forward
    state continued past the chunk's end, and its own backward window), so every window is computed apart.
    """
    config = model.config
    chunk, lookahead = config.chunk_frames, config.lookahead_frames
    x = model.subsample(features[None, :length])[0]  # (T', D)
    frames = x.shape[0]
    starts = range(0, frames, chunk)
    windows = [x[s : s + chunk + lookahead] for s in starts]  # per chunk: its frames and its lookahead, as inputs
    for layer in model.layers:
        outputs, state = [], None
        for k, s in enumerate(starts):
            size = min(chunk, frames - s)
            main_forward, chunk_state = layer.forward_rnn(windows[k][None, :size], state)
            context_forward = layer.forward_rnn(windows[k][None, size:], chunk_state)[0] if len(windows[k]) > size else None
            state = chunk_state
            backward = layer.backward_rnn(windows[k].flip(0)[None])[0][0].flip(0)
            forward = main_forward[0] if context_forward is None else torch.cat([main_forward[0], context_forward[0]])
            outputs.append(torch.cat([forward, backward], 1))
        windows = outputs
    main = torch.cat([w[: min(chunk, frames - s)] for w, s in zip(windows, starts)])
    return model.output(main).log_softmax(-1)


@pytest.mark.parametrize("whole_sequence", [False, True], ids=["forward-chunk-by-chunk", "forward-whole-sequence"])
def test_batched_training_pass_equals_the_naive_formulation_with_gradients(whole_sequence):
    # What training computes (all chunks of a padded batch at once) must be the model written out window by window:
    # the same CTC loss and the same gradients, within float tolerance, with either formulation of the forward RNN.
    torch.manual_seed(1)
    model = CTCModel(ModelConfig(hidden_size=24, num_layers=3, dropout=0.0, chunk_frames=5, lookahead_frames=3)).train()
    for layer in model.layers:
        layer.whole_sequence_forward = whole_sequence
    feats = torch.randn(3, 75, 80)
    lengths = torch.tensor([75, 52, 31])
    targets = [torch.randint(1, 29, (n,)) for n in (6, 4, 3)]
    ctc = torch.nn.CTCLoss(zero_infinity=True, reduction="sum")

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    log_probs, out_lengths, _ = model(feats, lengths)
    batched = gradients(ctc(log_probs.transpose(0, 1), torch.cat(targets), out_lengths, torch.tensor([6, 4, 3])))
    loss = sum(
        ctc(_naive_lc_blstm(model, feats[b], int(lengths[b]))[:, None], targets[b], out_lengths[b : b + 1], torch.tensor([len(targets[b])]))
        for b in range(3)
    )
    naive = gradients(loss)
    torch.testing.assert_close(batched[0], naive[0], rtol=1e-5, atol=1e-4)
    for got, expected in zip(batched[1], naive[1]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell,lookahead", [("lstm", 3), ("gru", 3), ("lstm", 0)])
def test_whole_sequence_forward_equals_chunk_by_chunk_from_a_carried_state(cell, lookahead):
    """The GPU formulation (one forward-RNN call, LSTM cell states at chunk ends recomputed by a parallel scan) gives
    the chunk-by-chunk results, state and gradients to float64 rounding, also when a stream's state is carried in."""
    torch.manual_seed(2)
    model = CTCModel(ModelConfig(hidden_size=16, num_layers=2, cell=cell, dropout=0.0, chunk_frames=4, lookahead_frames=lookahead))
    model = model.double()
    feats = torch.randn(2, 3 * 41, 80, dtype=torch.float64)
    lengths = torch.tensor([123, 70])
    with torch.no_grad():
        _, _, carried = model(torch.randn(2, 30, 80, dtype=torch.float64), torch.tensor([30, 30]))
    weights = torch.rand(2, 41, 29, dtype=torch.float64)
    results = []
    for whole_sequence in (False, True):
        for layer in model.layers:
            layer.whole_sequence_forward = whole_sequence
        model.zero_grad()
        log_probs, _, state = model(feats, lengths, state=carried)
        (log_probs * weights).sum().backward()
        results.append((log_probs.detach(), state, [p.grad.clone() for p in model.parameters()]))
    (chunked, chunked_state, chunked_grads), (whole, whole_state, whole_grads) = results
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole_state, chunked_state, rtol=1e-12, atol=1e-12)
    for got, expected in zip(whole_grads, chunked_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rate", [0.15, 0.5])
def test_dropout_drops_at_its_rate_keeps_the_mean_and_is_seeded(rate):
    model = CTCModel(ModelConfig(hidden_size=8, num_layers=1, dropout=rate)).train()
    x = torch.ones(3, 1001, 37)  # an odd size: not a multiple of the four elements drawn per 64 bits
    torch.manual_seed(1)
    first = model._dropout(x)
    torch.manual_seed(1)
    assert torch.equal(model._dropout(x), first)
    dropped = (first == 0).double().mean().item()
    assert abs(dropped - rate) < 0.01
    assert first.unique().tolist() == [0.0, pytest.approx(1 / (1 - rate), rel=1e-4)]
    assert abs(first.double().mean().item() - 1) < 0.02
    # every 16-bit lane of the draw is used: the drop rate holds in each position modulo 4
    flat = (first == 0).flatten().double()
    assert all(abs(flat[k::4].mean().item() - rate) < 0.02 for k in range(4))
    assert torch.equal(model.eval()._dropout(x), x)


def _with_trained_branch(**kw) -> CTCModel:
    """A model with a character branch whose output layer is no longer zero, as after training."""
    model = make_model(phone_vocab_size=41, char_layers=1, **kw)
    torch.manual_seed(1)
    with torch.no_grad():
        model.char_branch_output.weight.normal_(0, 0.3)
    return model


def test_a_character_branch_starts_out_changing_nothing():
    """A branch added to a trained model (``asr train --init M --char-layers 1``) leaves its outputs as they were."""
    plain = make_model(phone_vocab_size=41, chunk_frames=4, lookahead_frames=2)
    branched = CTCModel(ModelConfig(hidden_size=32, num_layers=3, phone_vocab_size=41, chunk_frames=4, lookahead_frames=2, char_layers=2))
    missing, unexpected = branched.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("char_branch") for k in missing)
    branched.eval()
    feats, lengths = torch.randn(2, 90, 80), torch.tensor([90, 47])
    for head in ("chars", "phones", "both"):
        torch.testing.assert_close(branched(feats, lengths, head=head)[0], plain(feats, lengths, head=head)[0])
    assert len(branched(feats, lengths)[2]) == branched.num_rnn_layers == 5
    trained = _with_trained_branch(chunk_frames=4, lookahead_frames=2)
    chars, phones = trained(feats, lengths, head="chars")[0], trained(feats, lengths, head="phones")[0]
    torch.testing.assert_close(trained(feats, lengths, head="both")[0], torch.cat([chars, phones], dim=-1))
    with pytest.raises(ValueError, match="char_layers"):
        ModelConfig(char_layers=-1)


@pytest.mark.parametrize("head", ["chars", "both", "phones"])
def test_chunk_by_chunk_equals_one_pass_with_a_character_branch(head):
    model = _with_trained_branch(chunk_frames=4, lookahead_frames=3)
    stack = model.config.stack_frames
    feats = torch.randn(1, 3 * 41, 80)
    whole = model(feats, torch.tensor([feats.shape[1]]), head=head)[0][0]
    state, pieces, start = None, [], 0
    step, context = 4 * stack, 3 * stack
    while feats.shape[1] - start >= step + context:
        piece = feats[:, start : start + step + context]
        out, _, state = model(piece, torch.tensor([piece.shape[1]]), state, num_output=4, head=head)
        pieces.append(out[0])
        start += step
    rest = feats[:, start:]
    pieces.append(model(rest, torch.tensor([rest.shape[1]]), state, head=head)[0][0])
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-5, rtol=1e-4)


def test_streams_batched_together_equal_each_alone_with_a_character_branch():
    import numpy as np

    from asr.encoder import ChunkedEncoder, encode_ready_chunks

    model = _with_trained_branch(chunk_frames=4, lookahead_frames=3)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((n, 80)).astype(np.float32) for n in (130, 97, 151)]
    alone = [ChunkedEncoder(model, torch.device("cpu"), 0.03, head="both").accept(x) for x in inputs]
    encoders = [ChunkedEncoder(model, torch.device("cpu"), 0.03, head="both") for _ in inputs]
    for encoder, x in zip(encoders, inputs):
        encoder.push(x)
    together = encode_ready_chunks(encoders)
    for got, expected in zip(together, alone):
        assert len(got) == len(expected) > 20
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
