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
from .dropout import AlphaDropout, Dropout1d, Dropout2d, Dropout3d, FeatureAlphaDropout
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
from .recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
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
    "RNN",
    "RNNCell",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "FeatureAlphaDropout",
    "MultiheadAttention",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
]

# ---- containers, padding, pixel shuffle, 1-d and adaptive max pooling, instance norm ----
from .containers import ModuleDict, ParameterDict, ParameterList  # noqa: E402
from .layers import (  # noqa: E402
    AdaptiveAvgPool1d,
    AdaptiveMaxPool1d,
    AdaptiveMaxPool2d,
    AvgPool1d,
    ConstantPad1d,
    ConstantPad2d,
    MaxPool1d,
    PixelShuffle,
    PixelUnshuffle,
    ReflectionPad1d,
    ReflectionPad2d,
    ReplicationPad1d,
    ReplicationPad2d,
    Unflatten,
    ZeroPad1d,
    ZeroPad2d,
)
from .norm import InstanceNorm1d, InstanceNorm2d  # noqa: E402

__all__ += [
    "ModuleDict",
    "ParameterList",
    "ParameterDict",
    "Unflatten",
    "ZeroPad1d",
    "ZeroPad2d",
    "ConstantPad1d",
    "ConstantPad2d",
    "ReflectionPad1d",
    "ReflectionPad2d",
    "ReplicationPad1d",
    "ReplicationPad2d",
    "PixelShuffle",
    "PixelUnshuffle",
    "MaxPool1d",
    "AvgPool1d",
    "AdaptiveAvgPool1d",
    "AdaptiveMaxPool1d",
    "AdaptiveMaxPool2d",
    "InstanceNorm1d",
    "InstanceNorm2d",
]

# ---- activations: elu family, hardtanh family, shrinks, glu, softmin, prelu, softplus ----
from .activation import (  # noqa: E402
    CELU,
    ELU,
    GLU,
    SELU,
    Hardshrink,
    Hardsigmoid,
    Hardtanh,
    LogSigmoid,
    PReLU,
    ReLU6,
    Softmax2d,
    Softmin,
    Softplus,
    Softshrink,
    Softsign,
    Tanhshrink,
    Threshold,
)

__all__ += [
    "ELU",
    "SELU",
    "CELU",
    "Hardtanh",
    "ReLU6",
    "Hardsigmoid",
    "LogSigmoid",
    "Softsign",
    "Tanhshrink",
    "Threshold",
    "Hardshrink",
    "Softshrink",
    "GLU",
    "Softmin",
    "Softmax2d",
    "PReLU",
    "Softplus",
]

# ---- losses and distances: L1, smooth L1, Huber, BCE, KL, margins, NLLs, cosine, p-norm ----
from .distance import CosineSimilarity, PairwiseDistance  # noqa: E402
from .loss import (  # noqa: E402
    BCELoss,
    CosineEmbeddingLoss,
    GaussianNLLLoss,
    HingeEmbeddingLoss,
    HuberLoss,
    KLDivLoss,
    L1Loss,
    MarginRankingLoss,
    MultiLabelSoftMarginLoss,
    MultiMarginLoss,
    PoissonNLLLoss,
    SmoothL1Loss,
    SoftMarginLoss,
    TripletMarginLoss,
)

__all__ += [
    "L1Loss",
    "SmoothL1Loss",
    "HuberLoss",
    "BCELoss",
    "KLDivLoss",
    "MarginRankingLoss",
    "HingeEmbeddingLoss",
    "SoftMarginLoss",
    "CosineEmbeddingLoss",
    "TripletMarginLoss",
    "PoissonNLLLoss",
    "GaussianNLLLoss",
    "MultiLabelSoftMarginLoss",
    "MultiMarginLoss",
    "CosineSimilarity",
    "PairwiseDistance",
]
