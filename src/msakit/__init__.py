"""msakit: multimodal sentiment analysis (text, audio, vision) that holds up when modalities are missing."""

__version__ = "0.1.0"
