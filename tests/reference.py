"""Independent statements of each norm's formula, written plainly for the tests."""

import torch


def layer_norm(x, w=None, b=None, eps=1e-5, k=1):
    dims = tuple(range(-k, 0))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


def rms_norm(x, w=None, eps=1e-6, b=None):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


def _chan(p, x):
    return p.reshape((1, -1) + (1,) * (x.dim() - 2))


def layer_norm2d(x, w, b, eps=1e-5):
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * _chan(w, x) + _chan(b, x)


def rms_norm2d(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(1, keepdim=True) + eps) * _chan(w, x)


def group_norm(x, groups, w, b, eps=1e-5):
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * _chan(w, x) + _chan(b, x)


def instance_norm(x, w=None, b=None, eps=1e-5):
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if w is None else y * _chan(w, x) + _chan(b, x)


def batch_norm_train(x, w, b, eps=1e-5):
    dims = (0,) + tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * _chan(w, x) + _chan(b, x)


def batch_norm_eval(x, rm, rv, w, b, eps=1e-5):
    return (x - _chan(rm, x)) / torch.sqrt(_chan(rv, x) + eps) * _chan(w, x) + _chan(b, x)


def scale_norm(x, g, eps=1e-5):
    norm = torch.sqrt((x * x).sum(-1, keepdim=True))
    return g * x / torch.clamp(norm, min=eps)


def dyt(x, alpha, w, b):
    return w * torch.tanh(alpha * x) + b
