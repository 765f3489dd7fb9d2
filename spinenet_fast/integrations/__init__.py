"""Entry points into other libraries' model registries (``timm``)."""
