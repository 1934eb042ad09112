"""resode: deep ResNets as continuous-depth models (neural ODEs) and back.

References: Sander, Ablin, Peyré, *Do Residual Neural Networks discretize Neural ODEs?*
(NeurIPS 2022); Matsubara, Miyatake, Yaguchi, *Symplectic Adjoint Method* (NeurIPS 2021);
Marion, Wu, Sander, Biau, *Implicit regularization of deep residual networks towards neural
ODEs* (ICLR 2024).
"""

__version__ = "0.1.0"

from .convert import compare, load_model, parse_depths
from .curves import INTERPOLATIONS, Curve, roughness
from .data import Dataset, digits, fashion_mnist, load_data
from .errors import ResodeError
from .fields import ACTIVATIONS, FIELDS, ConvField, Field, LinearField, MLPField, ResBlockField
from .importers import detect_layout, import_resnet, read_state_dict, reference_forward
from .io import load_checkpoint, save_checkpoint
from .network import ODEBlock, ODENet, ODENetConfig
from .schemes import SCHEMES, ButcherTableau, get_scheme, rk_step, solve, stage_grid

__all__ = [
    "ACTIVATIONS", "FIELDS", "INTERPOLATIONS", "SCHEMES",
    "ButcherTableau", "ConvField", "Curve", "Dataset", "Field", "LinearField", "MLPField",
    "ODEBlock", "ODENet", "ODENetConfig", "ResBlockField", "ResodeError",
    "compare", "detect_layout", "digits", "fashion_mnist", "get_scheme", "import_resnet", "load_checkpoint",
    "load_data", "load_model", "parse_depths", "read_state_dict", "reference_forward", "rk_step", "roughness",
    "save_checkpoint", "solve", "stage_grid",
]
