"""A small MRA transformer layer and a fixed batch, shared by the distributed test and
its single-process baseline."""
import torch

HIDDEN, HEADS, N, BATCH, STEPS, LR = 32, 2, 90, 4, 3, 0.05


class TinyMRALayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN)
        self.mlp = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.ops.mra.attention(q, k, v, mask, 2 * ((T + 31) // 32), "full")
        x = x + self.out(a.transpose(1, 2).reshape(B, T, C))
        return x + torch.tanh(self.mlp(x))


def make_model():
    import mra_compile  # noqa: F401  (registers the op)

    torch.manual_seed(0)
    return TinyMRALayer()


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, N, HIDDEN, generator=g)
    y = torch.randn(BATCH, N, HIDDEN, generator=g)
    mask = torch.ones(BATCH, N)
    # Padded to different lengths, with the same number of real tokens in each half of
    # the batch (160), so that the mean of the two halves' losses is the whole batch's.
    for b, length in enumerate((90, 70, 85, 75)):
        mask[b, length:] = 0
    return x, y, mask


def sgd_step(model, x, y, mask, params=None):
    """Mean squared error over the real tokens, backward, SGD; returns the gradients.

    ``params``: the module whose parameter names to use (the unwrapped model under DDP).
    """
    pred = model(x, mask)
    loss = (((pred - y) ** 2).mean(-1) * mask).sum() / mask.sum()
    loss.backward()
    grads = {}
    with torch.no_grad():
        for name, p in (params or model).named_parameters():
            grads[name] = p.grad.detach().clone()
            p.sub_(LR * p.grad)
            p.grad = None
    return grads
