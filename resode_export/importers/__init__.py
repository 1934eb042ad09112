"""Importers: trained ResNets from other libraries → ODENets (see :mod:`.torchvision`)."""

from .torchvision import detect_layout, import_resnet, read_state_dict, reference_forward

__all__ = ["detect_layout", "import_resnet", "read_state_dict", "reference_forward"]
