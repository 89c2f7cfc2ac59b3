"""Energy-based pause detection on log-mel frames.

A frame is quiet when its energy is close to the recent noise floor or far below the recent speech
peak. A pause is a run of quiet frames that follows speech. ``ChunkedEncoder`` ends a segment at every
pause (the segment's last chunk runs with the audio it has, the forward state restarts), so a final
result needs no wait for the lookahead of frames that are known to be silence. The rule reads only the
audio, so offline and streaming recognition cut the same audio at the same frames.
"""

from __future__ import annotations

from collections import deque

import numpy as np

PAUSE_SECONDS = 0.6  # a quiet run this long after speech ends a segment
MAX_SEGMENT_SECONDS = 20.0  # speech that never pauses is cut into segments at most this long ...
QUIET_SEARCH_SECONDS = 4.0  # ... at the quietest point of their last seconds
ABOVE_FLOOR_DB = 15.0  # frames less than this above the noise floor are quiet ...
BELOW_PEAK_DB = 35.0  # ... and so are frames this far below the speech peak
FLOOR_RISE_DB_PER_SECOND = 1.0  # the floor follows minima at once and rises slowly (noise that grows)
PEAK_FALL_DB_PER_SECOND = 3.0  # the peak follows maxima at once and falls slowly (a speaker who gets quieter)
LOUD_FRACTION = 0.15  # a pause may hold this fraction of louder frames (clicks, bumps of room noise) ...

_DB_PER_NEPER = 10.0 / np.log(10.0)


def frame_energy_db(log_mel: np.ndarray) -> np.ndarray:
    """log_mel (frames, n_mels) natural-log mel power -> energy (frames,) in dB."""
    if not len(log_mel):
        return np.zeros(0, dtype=np.float64)
    peak = log_mel.max(axis=1, keepdims=True).astype(np.float64)
    return _DB_PER_NEPER * (peak[:, 0] + np.log(np.exp(log_mel - peak).sum(axis=1)))


class PauseDetector:
    """Log-mel frames in, in pieces of any size -> the frame positions where a pause completes.

    A pause completes when the last ``pause_seconds`` of frames are quiet by the current thresholds (up to
    ``LOUD_FRACTION`` of them may be louder) and more loud frames than that came since the previous pause.
    The thresholds apply to the whole window at once, so a recording that starts mid-word (no noise floor
    known yet) is judged by the floor its first pause reveals.
    """

    def __init__(self, frame_seconds: float, pause_seconds: float = PAUSE_SECONDS) -> None:
        if pause_seconds <= 0 or frame_seconds <= 0:
            raise ValueError("pause_seconds and frame_seconds must be positive")
        self._window: deque[float] = deque(maxlen=max(1, round(pause_seconds / frame_seconds)))
        self._loud_allowed = int(LOUD_FRACTION * self._window.maxlen)
        self._floor_rise = FLOOR_RISE_DB_PER_SECOND * frame_seconds
        self._peak_fall = PEAK_FALL_DB_PER_SECOND * frame_seconds
        self._floor = np.inf
        self._peak = -np.inf
        self._loud_since_pause = 0  # frames that were loud when they left the window

    def __call__(self, log_mel: np.ndarray) -> list[int]:
        """log_mel (frames, n_mels) -> positions p (0 < p <= frames): a pause completes after frame p - 1."""
        return self.find(frame_energy_db(log_mel))

    def find(self, energies: np.ndarray) -> list[int]:
        """``__call__`` on the frames' energies (frames,) in dB (``frame_energy_db``)."""
        ends = []
        window = self._window
        for index, energy in enumerate(energies.tolist()):
            self._floor = min(energy, self._floor + self._floor_rise)
            self._peak = max(energy, self._peak - self._peak_fall)
            threshold = max(self._floor + ABOVE_FLOOR_DB, self._peak - BELOW_PEAK_DB)
            if len(window) == window.maxlen:
                self._loud_since_pause += window[0] >= threshold
            window.append(energy)
            if (
                len(window) == window.maxlen
                and energy < threshold  # ... but not at its end
                and self._loud_since_pause > self._loud_allowed  # more than a click: speech
                and sum(e >= threshold for e in window) <= self._loud_allowed
            ):
                ends.append(index + 1)
                self._loud_since_pause = 0
                window.clear()
        return ends


def quietest_frame(energies: np.ndarray, allowed: np.ndarray | None = None) -> int:
    """Index of the quietest frame of energies (frames,) in dB, among the ``allowed`` ones (bool mask) when any is.

    Ties go to the latest frame, so that a cut leaves as little as possible for the next segment.
    """
    if not len(energies):
        raise ValueError("no frames to choose from")
    scores = np.asarray(energies, dtype=np.float64)
    if allowed is not None and allowed.any():
        scores = np.where(allowed, scores, np.inf)
    return len(scores) - 1 - int(np.argmin(scores[::-1]))
