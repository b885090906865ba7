"""gradmesh.core.nn: modules, ``Parameter``, ``init`` and ``functional``, like ``torch.nn``.

>>> import gradmesh.core as gm
>>> layer = gm.nn.Linear(3, 2)
>>> [tuple(p.shape) for p in layer.parameters()]
[(2, 3), (2,)]
"""
from . import functional, init, utils  # noqa: F401
from .modules import (AvgPool2d, BCEWithLogitsLoss, Conv2d, CrossEntropyLoss, Dropout,
                      Embedding, Flatten, GELU, Identity, LayerNorm, LeakyReLU, Linear,
                      LogSoftmax, MaxPool2d, Module, ModuleList, MSELoss, NLLLoss, Parameter,
                      ReLU, Sequential, Sigmoid, Softmax, Tanh)
from .modules import (AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d, Conv1d, ConvTranspose2d,
                      GroupNorm, Hardswish, Mish, RMSNorm, SiLU, Upsample)
from .modules import (GRU, LSTM, GRUCell, LSTMCell, MultiheadAttention,
                      TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                      TransformerEncoderLayer)

__all__ = ["init", "functional", "utils", "Module", "Parameter", "Sequential", "ModuleList", "Identity",
           "Linear", "Conv2d", "Embedding", "LayerNorm", "Dropout", "Flatten", "MaxPool2d",
           "AvgPool2d", "ReLU", "Tanh", "Sigmoid", "GELU", "LeakyReLU", "Softmax",
           "LogSoftmax", "CrossEntropyLoss", "MSELoss", "NLLLoss", "BCEWithLogitsLoss",
           "SiLU", "Mish", "Hardswish", "BatchNorm1d", "BatchNorm2d", "GroupNorm", "RMSNorm",
           "AdaptiveAvgPool2d", "Conv1d", "ConvTranspose2d", "Upsample"]
__all__ += ["MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
            "TransformerEncoder", "TransformerDecoder", "LSTM", "GRU", "LSTMCell", "GRUCell"]
