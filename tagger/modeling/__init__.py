"""Training and evaluation of the default (offline) image-text model: frozen backbones + small heads."""
