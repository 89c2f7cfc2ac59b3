import math

import torch

from asr.decoding import greedy_decode
from asr.text import Vocabulary, normalize_text, number_to_words


def path_to_log_probs(path: str, vocab: Vocabulary, prob: float = 0.9) -> torch.Tensor:
    """Frames whose best token follows ``path`` ('_' = blank) with posterior ``prob``."""
    rest = (1 - prob) / (len(vocab) - 1)
    out = torch.full((len(path), len(vocab)), rest)
    for t, ch in enumerate(path):
        out[t, 0 if ch == "_" else vocab.tokens.index(ch)] = prob
    return out.log()


def test_greedy_collapses_repeats_and_blanks_with_word_times():
    vocab = Vocabulary()
    # frames:          0123456789012345
    log_probs = path_to_log_probs("_hh_i__ _tth_ee_", vocab)
    result = greedy_decode(log_probs, vocab, frame_shift=0.03)
    assert result.text == "hi the"
    hi, the = result.words
    assert (hi.start, hi.end) == (round(1 * 0.03, 3), round(5 * 0.03, 3))
    assert (the.start, the.end) == (round(9 * 0.03, 3), round(15 * 0.03, 3))
    assert math.isclose(hi.confidence, 0.9, rel_tol=1e-3)


def test_double_letters_need_a_blank_between():
    vocab = Vocabulary()
    assert greedy_decode(path_to_log_probs("_l_oo_o_k", vocab), vocab, 0.03).text == "look"
    assert greedy_decode(path_to_log_probs("_l_ooo_k", vocab), vocab, 0.03).text == "lok"


def test_confidence_reflects_posteriors():
    vocab = Vocabulary()
    sure = greedy_decode(path_to_log_probs("_a_ _b_", vocab, 0.95), vocab, 0.03)
    unsure = greedy_decode(path_to_log_probs("_a_ _b_", vocab, 0.3), vocab, 0.03)
    assert all(s.confidence > u.confidence for s, u in zip(sure.words, unsure.words))


def test_empty_output():
    vocab = Vocabulary()
    result = greedy_decode(path_to_log_probs("____", vocab), vocab, 0.03)
    assert result.text == "" and result.words == []


def test_normalizer():
    assert normalize_text("Hello, World! It's 42-ish.") == "hello world it's forty two ish"
    assert normalize_text("'Quoted' words") == "quoted words"
    assert number_to_words(1905) == "one thousand nine hundred five"
    vocab = Vocabulary()
    assert vocab.decode(vocab.encode("it's ok")) == "it's ok"
