"""CI only: run torchvision's Python model definitions against a torch build its wheel was not made for.

torchvision's wheels pin one torch build, and its import registers fake and autograd kernels for its C++
operators (nms, roi_align, ...), which fails when its compiled library does not match the installed torch.
The ResNet definitions need none of those operators, so CI stubs the two registration modules and
compares resode's importer with torchvision's own ResNets (tests/test_import.py -k torchvision).
"""

import sys
import types

for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules[name] = types.ModuleType(name)
