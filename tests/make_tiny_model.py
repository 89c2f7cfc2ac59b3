"""Train the tiny test model (tests/data/tiny-model.pt) and check that its transcripts hold on any CPU.

    python tests/make_tiny_model.py            # about two minutes on one core

The suite's streaming, server, CLI and decoding tests use this committed file instead of a model trained
during the test session, because such a model's transcripts depend on how the CPU rounds floats. It is
trained well past the point where it first gets the two clips right, on the clips as they appear in the
tests (alone, with pauses of many lengths around them, at other levels, two in a row), so that every
frame's best-path decision wins by a wide margin. The script refuses to write the file unless, on audio
shaped like the tests', every frame whose runner-up token would change the greedy transcript wins by at
least ``MIN_MARGIN`` nats: far beyond the differences between CPU kernels (below 1e-3, see the check).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from asr.checkpoint import load_model_file, save_model  # noqa: E402
from asr.endpoint import PAUSE_SECONDS  # noqa: E402
from tests.conftest import CLIPS, DATA, TINY_MODEL_FILE, quiet_noise, tiny_train_config, write_manifest  # noqa: E402

MIN_MARGIN = 0.5  # nats: see text_margin
SEED = 20261202


def training_audio(rng: np.random.Generator) -> list[tuple[np.ndarray, str]]:
    """The two clips with pauses of many lengths around them, at several levels, and two in a row."""
    clips = [(load_audio(DATA / name), text) for name, text in CLIPS.items()]
    items = [(audio, text) for audio, text in clips]
    for i in range(24):
        for audio, text in clips:
            lead, trail = rng.choice([0.0, 0.1, 0.3, 0.5, 1.0]), rng.choice([0.0, 0.2, 0.5, 0.8, 1.5, 2.5])
            gain = rng.choice([0.2, 0.4, 0.7, 1.0, 1.0, 1.5, 2.0])
            items.append((np.concatenate([quiet_noise(lead, 100 + i), gain * audio, quiet_noise(trail, 200 + i)]), text))
    for i in range(24):
        first, second = clips[i % 2], clips[(i // 2) % 2]
        gap = rng.choice([0.4, 0.6, 0.8, 1.2, 2.0, 2.5])
        audio = np.concatenate([quiet_noise(0.3, 300 + i), first[0], quiet_noise(gap, 400 + i), second[0], quiet_noise(0.3, 500 + i)])
        items.append((rng.choice([0.3, 1.0, 1.0, 2.0]) * audio, f"{first[1]} {second[1]}"))
    return items


def check_audio() -> dict[str, tuple[np.ndarray, float]]:
    """(audio, energy-pause seconds) shaped like the tests': each clip, with pauses, two in a row, at other levels."""
    first, second = (load_audio(DATA / name) for name in CLIPS)
    conversation = np.concatenate([quiet_noise(0.3, 3), first, quiet_noise(1.2, 3), second, quiet_noise(0.3, 3)])
    two_second_gaps = np.concatenate([quiet_noise(0.3, 3), first, quiet_noise(2.0, 3), second, quiet_noise(2.0, 3)])
    return {
        "clip 1": (first, PAUSE_SECONDS),
        "clip 2": (second, PAUSE_SECONDS),
        "conversation": (conversation, PAUSE_SECONDS),
        "conversation, quiet": (0.3 * conversation, PAUSE_SECONDS),
        "conversation, loud": (2 * conversation, PAUSE_SECONDS),
        "a minute, twice": (np.concatenate([conversation, quiet_noise(60 - len(conversation) / SAMPLE_RATE, 3)] * 2), PAUSE_SECONDS),
        "conversation, no pauses": (conversation, 5.0),
        "2 s gaps": (two_second_gaps, PAUSE_SECONDS),
        "2 s gaps, no pauses": (two_second_gaps, 3.0),
        "repeated clip": (np.concatenate([first, quiet_noise(2.0), first]), PAUSE_SECONDS),
    }


def text_margin(log_probs: torch.Tensor, decode) -> float:
    """Smallest best-vs-second log-probability gap among the frames whose runner-up would change the greedy text."""
    top = log_probs.topk(2, dim=-1)
    gaps = top.values[:, 0] - top.values[:, 1]
    text = decode(log_probs).text
    margin = math.inf
    for t in gaps.argsort().tolist():
        if gaps[t] >= margin:
            break
        flipped = log_probs.clone()
        flipped[t, top.indices[t, 1]] = flipped[t, top.indices[t, 0]] + 1
        if decode(flipped).text != text:
            margin = float(gaps[t])
    return margin


def frame_margins(path: Path) -> dict[str, tuple[float, str]]:
    """For each check audio: (text margin, see ``text_margin``; greedy text)."""
    from asr import DecodeOptions, load_model
    from asr.encoder import ChunkedEncoder
    from asr.features import compute_features

    recognizer = load_model(path, "cpu", DecodeOptions(decoder="greedy"))
    results = {}
    for name, (audio, pause_seconds) in check_audio().items():
        encoder = ChunkedEncoder(recognizer.model, recognizer.device, recognizer.frame_shift, pause_seconds=pause_seconds)
        log_probs = torch.cat([encoder.accept(compute_features(audio, recognizer.extractor)), encoder.flush()])
        results[name] = (text_margin(log_probs, recognizer.decode), recognizer.decode(log_probs).text)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default=str(TINY_MODEL_FILE))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--work-dir", help="keep the training audio and run here (default: a temporary folder)")
    args = parser.parse_args()

    from training.trainer import train

    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.work_dir or temporary).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        clips = {}
        for i, (audio, text) in enumerate(training_audio(rng)):
            sf.write(folder / f"{i:03d}.wav", audio, SAMPLE_RATE)
            clips[str(folder / f"{i:03d}.wav")] = text
        manifest = write_manifest(folder / "train.jsonl", clips)
        # float32 (amp=False) whatever the CPU, so that the script gives the same model wherever bfloat16 exists or not
        config = tiny_train_config(folder, manifest, epochs=args.epochs, batch_frames=1500, warmup_steps=20, seed=SEED, amp=False)
        model_path = train(config, log=lambda message: print(message, file=sys.stderr))
        bundle = load_model_file(model_path)
        margins = frame_margins(model_path)
        ok = True
        for name, (margin, text) in margins.items():
            print(f"{name:24s} margin {margin:6.2f}  {text!r}", file=sys.stderr)
            ok &= margin >= MIN_MARGIN
        if not ok:
            print(f"error: a frame that decides the text wins by less than {MIN_MARGIN} nats: train longer (--epochs)", file=sys.stderr)
            return 1
        bundle.metadata = {
            "purpose": "tests only: two clips, see tests/make_tiny_model.py",
            "epochs_completed": bundle.metadata.get("epochs_completed"),
            "steps": bundle.metadata.get("steps"),
            "min_frame_margin": round(min(m for m, _ in margins.values()), 3),
        }
        save_model(bundle, args.output)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
