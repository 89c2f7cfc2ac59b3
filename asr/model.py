"""Stacked latency-controlled bidirectional LSTM (or GRU) with a CTC output layer.

Each layer has a forward RNN that runs over the whole stream, carrying its state, and a backward
RNN that runs over each chunk of ``chunk_frames`` plus ``lookahead_frames`` of right context,
starting from a zero state. The model therefore gives the same output offline and when audio
arrives chunk by chunk, with ``lookahead_frames`` of latency. ``chunk_frames=0`` means the whole
utterance is one chunk (an ordinary BLSTM).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

RNNState = list  # per layer: (h, c) for LSTM or h for GRU, each (1, batch, hidden)


@dataclass(frozen=True)
class ModelConfig:
    n_mels: int = 80
    stack_frames: int = 3  # consecutive 10 ms frames concatenated: 30 ms model frames
    hidden_size: int = 256
    num_layers: int = 3
    cell: str = "lstm"  # "lstm" or "gru"
    dropout: float = 0.15
    vocab_size: int = 29
    chunk_frames: int = 13  # model frames per chunk (0 = whole utterance)
    lookahead_frames: int = 10  # model frames of right context for the backward direction
    phone_vocab_size: int = 0  # > 0: a second output layer, over phones (asr/phones.py), on the same encoder
    char_layers: int = 0  # > 0: BiRNN layers on top of the encoder that only the character output reads

    def __post_init__(self) -> None:
        if self.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {self.cell!r}")
        if min(self.n_mels, self.stack_frames, self.hidden_size, self.num_layers, self.vocab_size) < 1:
            raise ValueError("sizes must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.chunk_frames < 0 or self.lookahead_frames < 0:
            raise ValueError("chunk_frames and lookahead_frames must be >= 0")
        if self.phone_vocab_size < 0:
            raise ValueError("phone_vocab_size must be >= 0")
        if self.char_layers < 0:
            raise ValueError("char_layers must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_chunking(self, chunk_frames: int, lookahead_frames: int) -> ModelConfig:
        return replace(self, chunk_frames=chunk_frames, lookahead_frames=lookahead_frames)


def _reverse_valid(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first lengths[b] steps of each sequence in x (batch, time, dim); padding stays put.

    Most sequences (chunk windows) are full, and a flip is much cheaper than a gather; only the others are gathered.
    """
    steps = x.shape[1]
    reversed_ = x.flip(1)
    partial = (lengths < steps).nonzero().squeeze(1)
    if len(partial):
        time = torch.arange(steps, device=x.device).unsqueeze(0)
        length = lengths[partial].unsqueeze(1)
        index = torch.where(time < length, length - 1 - time, time)
        part = x[partial].gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))
        reversed_ = reversed_.index_put((partial,), part)
    return reversed_


def linear_scan(decay: Tensor, drive: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Inclusive scan of c[t] = decay[t] * c[t-1] + drive[t] along dim, from c[-1] = 0 (Hillis-Steele).

    Returns (the products of decay up to each t, c[t]); log2(steps) vectorised steps instead of a loop over time.
    """
    steps, offset = decay.shape[dim], 1
    while offset < steps:
        earlier_decay = decay.narrow(dim, 0, steps - offset)
        earlier_drive = drive.narrow(dim, 0, steps - offset)
        head_decay, head_drive = decay.narrow(dim, 0, offset), drive.narrow(dim, 0, offset)
        tail_decay, tail_drive = decay.narrow(dim, offset, steps - offset), drive.narrow(dim, offset, steps - offset)
        drive = torch.cat([head_drive, tail_drive + tail_decay * earlier_drive], dim=dim)
        decay = torch.cat([head_decay, tail_decay * earlier_decay], dim=dim)
        offset *= 2
    return decay, drive


class ChunkedBiRNNLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, cell: str) -> None:
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.forward_rnn = rnn(input_size, hidden_size, batch_first=True)
        self.backward_rnn = rnn(input_size, hidden_size, batch_first=True)
        # How the forward RNN runs over the chunks; None: in one call on a GPU (where a call per chunk is
        # launch-bound), one call per chunk on the CPU (where recomputing the LSTM cell states costs more).
        self.whole_sequence_forward: bool | None = None

    def _forward_chunk_by_chunk(self, main: Tensor, chunk: int, state) -> tuple[Tensor, object, object]:
        """One forward-RNN call per chunk.

        main (B, N*C, D) -> outputs (B, N*C, H), the state at every chunk end ((1, B*N, H), batch-major like the
        windows; a tuple (h, c) for an LSTM) and the state after the last chunk.
        """
        forward_parts, chunk_states = [], []
        # split, not slicing: a slice's backward writes a zero gradient of the whole input, summed over all chunks
        for piece in main.split(chunk, dim=1):
            out, state = self.forward_rnn(piece, state)
            forward_parts.append(out)
            chunk_states.append(state)

        def stack(states):  # per-chunk (1, B, H) -> (1, B*N, H)
            return torch.stack(states, dim=2).flatten(1, 2)

        if isinstance(state, tuple):
            ends = tuple(stack([s[i] for s in chunk_states]) for i in range(2))
        else:
            ends = stack(chunk_states)
        return torch.cat(forward_parts, dim=1), ends, state

    def _forward_whole_sequence(self, main: Tensor, chunk: int, state, need_ends: bool = True) -> tuple[Tensor, object, object]:
        """The same as _forward_chunk_by_chunk with one forward-RNN call over all chunks (one cuDNN kernel on a GPU);
        the chunk-end states only when ``need_ends`` (a right context to continue into).

        A GRU's state is its output. An LSTM's cell state at each chunk end is recomputed from the outputs:
        with the gates i, f, g of step t (from x[t] and h[t-1]), c[t] = f[t] * c[t-1] + i[t] * g[t] is a linear
        recurrence, scanned in parallel within each chunk and then across chunks. Exact up to rounding, and
        autograd differentiates the same function.
        """
        batch, frames, _ = main.shape
        n_chunks = frames // chunk
        out, final = self.forward_rnn(main, state)
        if not need_ends:
            return out, None, final
        ends = torch.arange(chunk - 1, frames, chunk, device=main.device)
        h_ends = out[:, ends].reshape(1, batch * n_chunks, -1)
        if not isinstance(final, tuple):
            return out, h_ends.to(final.dtype), final
        rnn, hidden = self.forward_rnn, self.forward_rnn.hidden_size
        h0, c0 = state if state is not None else (out.new_zeros(1, batch, hidden), out.new_zeros(1, batch, hidden))
        previous_h = torch.cat([h0.transpose(0, 1).to(out.dtype), out[:, :-1]], dim=1)
        # PyTorch's gate order is i, f, g, o; o is not needed for c
        gates = nn.functional.linear(main, rnn.weight_ih_l0[: 3 * hidden], rnn.bias_ih_l0[: 3 * hidden]) + nn.functional.linear(
            previous_h, rnn.weight_hh_l0[: 3 * hidden], rnn.bias_hh_l0[: 3 * hidden]
        )
        precise = torch.promote_types(gates.dtype, torch.float32)  # the scan in at least float32, also under autocast
        i, f, g = gates.to(precise).view(batch, n_chunks, chunk, 3, hidden).unbind(3)
        decay, drive = f.sigmoid(), i.sigmoid() * g.tanh()
        chunk_decay, chunk_drive = linear_scan(decay, drive, dim=2)  # within each chunk, from zero
        chunk_decay, chunk_drive = chunk_decay[:, :, -1], chunk_drive[:, :, -1]  # (B, N, H)
        total_decay, c_ends = linear_scan(chunk_decay, chunk_drive, dim=1)  # across chunks
        c_ends = c_ends + total_decay * c0.transpose(0, 1).to(precise)
        return out, (h_ends.to(final[0].dtype), c_ends.reshape(1, batch * n_chunks, -1).to(final[1].dtype)), final

    def forward(self, main: Tensor, context: Tensor, window_lengths: Tensor, chunk: int, state) -> tuple[Tensor, Tensor, object]:
        """main (B, N*C, D), context (B, N, R, D), window_lengths (B*N,) -> outputs of width 2H.

        Returns main_out (B, N*C, 2H), context_out (B, N, R, 2H) and the forward state after main.
        """
        batch, frames, dim = main.shape
        n_chunks, lookahead = context.shape[1], context.shape[2]
        whole = main.is_cuda if self.whole_sequence_forward is None else self.whole_sequence_forward
        if whole and n_chunks > 1:
            forward_main, chunk_ends, state = self._forward_whole_sequence(main, chunk, state, need_ends=lookahead > 0)
        else:
            forward_main, chunk_ends, state = self._forward_chunk_by_chunk(main, chunk, state)

        windows = torch.cat([main.view(batch, n_chunks, chunk, dim), context], dim=2)
        windows = windows.reshape(batch * n_chunks, chunk + lookahead, dim)
        backward = _reverse_valid(self.backward_rnn(_reverse_valid(windows, window_lengths))[0], window_lengths)
        backward = backward.view(batch, n_chunks, chunk + lookahead, -1)
        backward_main = backward[:, :, :chunk].reshape(batch, frames, -1)
        main_out = torch.cat([forward_main, backward_main], dim=2)

        if lookahead == 0:
            return main_out, context.new_zeros(batch, n_chunks, 0, main_out.shape[2]), state

        # The forward direction over the right context continues from each chunk's end state.
        forward_context = self.forward_rnn(context.reshape(batch * n_chunks, lookahead, dim), chunk_ends)[0]
        context_out = torch.cat([forward_context.view(batch, n_chunks, lookahead, -1), backward[:, :, chunk:]], dim=3)
        return main_out, context_out, state


HEADS = ("chars", "phones", "both")


class CTCModel(nn.Module):
    """features (B, T, n_mels) normalised log-mel -> log-probabilities (B, T // stack, vocab).

    With ``phone_vocab_size`` > 0 a second output layer gives phone log-probabilities from the same encoder.
    With ``char_layers`` > 0 the character logits are the encoder's through ``output`` plus those of a branch of
    further BiRNN layers through ``char_branch_output``, which starts at zero: a model given a branch starts out
    computing what it did without one, and the branch learns what the shared layers left to spelling.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.n_mels))
        self.register_buffer("feature_std", torch.ones(config.n_mels))
        input_size = config.n_mels * config.stack_frames
        self.layers = nn.ModuleList(
            ChunkedBiRNNLayer(input_size if i == 0 else 2 * config.hidden_size, config.hidden_size, config.cell)
            for i in range(config.num_layers)
        )
        width = 2 * config.hidden_size
        self.output = nn.Linear(width, config.vocab_size)
        self.phone_output = nn.Linear(width, config.phone_vocab_size) if config.phone_vocab_size else None
        self.char_branch = nn.ModuleList(ChunkedBiRNNLayer(width, config.hidden_size, config.cell) for _ in range(config.char_layers))
        self.char_branch_output = nn.Linear(width, config.vocab_size) if config.char_layers else None
        if self.char_branch_output is not None:
            nn.init.zeros_(self.char_branch_output.weight)
            nn.init.zeros_(self.char_branch_output.bias)

    @property
    def num_rnn_layers(self) -> int:
        """Entries in a forward state: the encoder's layers, then the character branch's."""
        return self.config.num_layers + self.config.char_layers

    def _dropout(self, x: Tensor) -> Tensor:
        """Inverted dropout in training, on 16 random bits per element.

        Four elements per 64-bit draw: a third of the time of ``torch.rand`` and a sixth of ``bernoulli_`` on the CPU.
        The rate is rounded to a multiple of 1/65536.
        """
        if not self.training or self.config.dropout == 0:
            return x
        threshold = round(self.config.dropout * 65536)
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = bits >= threshold - 32768
        return x * keep / (1 - threshold / 65536)

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-5))

    def subsample(self, features: Tensor) -> Tensor:
        """Normalise and stack: (B, T, n_mels) -> (B, T // stack, n_mels * stack)."""
        stack = self.config.stack_frames
        batch, frames, dim = features.shape
        usable = frames - frames % stack
        x = (features[:, :usable] - self.feature_mean) / self.feature_std
        return x.reshape(batch, usable // stack, dim * stack)

    def forward(
        self,
        features: Tensor,
        lengths: Tensor,
        state: RNNState | None = None,
        num_output: int | None = None,
        chunk_frames: int | None = None,
        head: str = "chars",
    ) -> tuple[Tensor, Tensor, RNNState]:
        """Run the encoder over features (B, T, n_mels) with valid lengths (B,) in 10 ms frames.

        Model frames beyond ``num_output`` (default: all) are used only as right context.
        Returns log_probs (B, num_output, vocab) of the ``head`` ("chars", "phones" or "both": the two
        concatenated, characters first), output lengths (B,) and the forward states after the last output
        frame, to pass as ``state`` for the next piece of the stream.
        """
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head != "chars" and self.phone_output is None:
            raise ValueError("this model has no phone output layer")
        x = self.subsample(features)
        lengths = torch.div(lengths, self.config.stack_frames, rounding_mode="floor").clamp(max=x.shape[1])
        total = x.shape[1]
        num_output = total if num_output is None else num_output
        chunk = self.config.chunk_frames if chunk_frames is None else chunk_frames
        chunk = chunk or max(num_output, 1)
        lookahead = self.config.lookahead_frames if chunk < num_output or total > num_output else 0
        n_chunks = max(1, math.ceil(num_output / chunk))
        padded = n_chunks * chunk + lookahead
        if padded > total:
            x = nn.functional.pad(x, (0, 0, 0, padded - total))
        context_index = torch.arange(1, n_chunks + 1, device=x.device).unsqueeze(1) * chunk + torch.arange(
            lookahead, device=x.device
        ).unsqueeze(0)
        chunk_starts = torch.arange(n_chunks, device=x.device) * chunk
        window_lengths = (lengths.unsqueeze(1) - chunk_starts.unsqueeze(0)).clamp(0, chunk + lookahead).flatten()

        main, context = x[:, : n_chunks * chunk], x[:, context_index]
        state = list(state) if state is not None else [None] * self.num_rnn_layers
        for i, layer in enumerate(self.layers):
            if i > 0:
                main, context = self._dropout(main), self._dropout(context)
            main, context, state[i] = layer(main, context, window_lengths, chunk, state[i])
        hidden = self._dropout(main[:, :num_output])
        outputs = []
        if head != "phones":
            char_logits = self.output(hidden)
            if self.config.char_layers:
                char_logits = char_logits + self.char_branch_output(
                    self._run_char_branch(main, context, window_lengths, chunk, state)[:, :num_output]
                )
            outputs.append(char_logits.log_softmax(dim=-1))
        if head != "chars":
            outputs.append(self.phone_output(hidden).log_softmax(dim=-1))
        log_probs = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        return log_probs, lengths.clamp(max=num_output), state

    def _run_char_branch(self, main: Tensor, context: Tensor, window_lengths: Tensor, chunk: int, state: list) -> Tensor:
        """The character branch over the encoder's (main, context); updates its entries of ``state`` in place."""
        for i, layer in enumerate(self.char_branch, start=self.config.num_layers):
            main, context = self._dropout(main), self._dropout(context)
            main, context, state[i] = layer(main, context, window_lengths, chunk, state[i])
        return self._dropout(main)

    def output_width(self, head: str = "chars") -> int:
        """Size of the last dimension of the log-probs that ``forward`` returns for ``head``."""
        widths = {"chars": self.config.vocab_size, "phones": self.config.phone_vocab_size}
        return widths[head] if head in widths else sum(widths.values())
