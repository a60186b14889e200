"""msakit: multimodal sentiment analysis (text, audio, vision) that stays accurate when modalities are missing."""

__version__ = "0.1.0"
