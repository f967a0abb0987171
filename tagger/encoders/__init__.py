"""Image-text encoders: one interface (`Encoder`), several backends, loaded once per process."""

from tagger.encoders.base import Encoder, get_encoder

__all__ = ["Encoder", "get_encoder"]
