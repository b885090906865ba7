"""Modules like ``torch.nn``'s: a ``Module`` holds Parameters, buffers and sub-modules.

A model written for torch.nn ports by changing the import. Names, argument order, default
initialisation, parameter order and ``state_dict`` keys all match torch's, so weights can
be copied between the two by key.

>>> import gradmesh.core as gm
>>> model = gm.nn.Sequential(gm.nn.Linear(4, 8), gm.nn.ReLU(), gm.nn.Linear(8, 2))
>>> [name for name, _ in model.named_parameters()]
['0.weight', '0.bias', '2.weight', '2.bias']
>>> model(gm.randn(3, 4)).shape
(3, 2)
"""

from .activation import (
    GELU,
    Hardswish,
    LeakyReLU,
    LogSoftmax,
    Mish,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
)
from .containers import ModuleList, Sequential
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Embedding,
    Flatten,
    Identity,
    LayerNorm,
    Linear,
    MaxPool2d,
    Upsample,
)
from .loss import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, NLLLoss
from .module import Module, Parameter
from .norm import BatchNorm1d, BatchNorm2d, GroupNorm, RMSNorm
from .recurrent import GRU, LSTM, GRUCell, LSTMCell
from .transformer import (
    MultiheadAttention,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "ReLU",
    "Tanh",
    "Sigmoid",
    "GELU",
    "LeakyReLU",
    "Softmax",
    "LogSoftmax",
    "SiLU",
    "Mish",
    "Hardswish",
    "Sequential",
    "ModuleList",
    "Identity",
    "Linear",
    "Conv2d",
    "Embedding",
    "LayerNorm",
    "Dropout",
    "Flatten",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "Conv1d",
    "ConvTranspose2d",
    "Upsample",
    "CrossEntropyLoss",
    "NLLLoss",
    "MSELoss",
    "BCEWithLogitsLoss",
    "Parameter",
    "Module",
    "BatchNorm1d",
    "BatchNorm2d",
    "GroupNorm",
    "RMSNorm",
    "LSTM",
    "GRU",
    "LSTMCell",
    "GRUCell",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
]
