"""Word-aligned features: frame features averaged over the time span of each transcript word.

CMU-MOSI's and CMU-MOSEI's aligned releases (MMSA's `aligned_50.pkl`) come from the
CMU-MultimodalSDK's alignment: each word's interval from forced alignment of the transcript, every
feature frame that overlaps the interval averaged into that word's row, zeros for a word no frame
overlaps. msakit puts the rows in the transcript's order from step 0 and pads with zero rows after
the last word, the layout MMSA's models assume when they read aligned input up to the text's token
count; so row i belongs to word i.

Here the words and their spans come from Whisper (`Transcript` in `msakit.features.extractors`):
its word timestamps when it transcribes, forced alignment when the transcript is given. The words
are the transcript's whitespace-separated words, so a word-aligned sample has
`len(transcript.split())` rows.
"""

from __future__ import annotations

import numpy as np

Word = tuple[str, float, float]  # the word, its start and end in seconds
WHISPER_WINDOW_SECONDS = 30.0  # the audio one Whisper encoder pass sees


def transcript_words(transcript: str) -> list[str]:
    """The words a word-aligned sample has one row for."""
    return transcript.split()


def word_average(frames: np.ndarray, frame_spans: np.ndarray, word_spans: np.ndarray) -> np.ndarray:
    """(words, D): row i is the mean of the `frames` (F, D) whose span (F, 2: start, end seconds)
    overlaps word i's span (words, 2); a word no frame overlaps gets zeros. A word of zero duration
    takes the frames whose span contains its instant."""
    frames = np.asarray(frames, dtype=np.float32)
    out = np.zeros((len(word_spans), frames.shape[1]), dtype=np.float32)
    if not len(frames) or not len(word_spans):
        return out
    frame_start, frame_end = frame_spans[None, :, 0], frame_spans[None, :, 1]
    word_start, word_end = word_spans[:, None, 0], word_spans[:, None, 1]
    overlaps = (frame_start < word_end) & (frame_end > word_start)
    instant = (word_start == word_end) & (frame_start <= word_start) & (word_start < frame_end)
    members = (overlaps | instant).astype(np.float64)
    counts = members.sum(axis=1, keepdims=True)
    averaged = members @ frames.astype(np.float64) / np.maximum(counts, 1)
    out[:] = averaged
    return out
