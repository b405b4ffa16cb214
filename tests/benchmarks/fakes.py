"""A tiny stand-in editing method for runner tests: a rank-one change to block 0's W_out."""

from __future__ import annotations

import torch

from tracer.model import w_out


class FakeResult:
    def __init__(self, weight, original):
        self.weight, self.original = weight, original

    def restore(self):
        with torch.no_grad():
            self.weight.copy_(self.original)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


class RankOneMethod:
    """`edit_many` adds `scale * outer(u, v)` to block 0's W_out (u, v depend on the subjects)."""

    def __init__(self, scale: float = 0.5, fail_on: str | None = None):
        self.scale, self.fail_on, self.calls = scale, fail_on, []

    def edit_many(self, model, requests, hparams=None):
        self.calls.append([r.subject for r in requests])
        if self.fail_on and any(r.subject == self.fail_on for r in requests):
            raise ValueError(f"subject {self.fail_on!r} cannot be edited")
        w = w_out(model, 0)
        original = w.detach().clone()
        g = torch.Generator().manual_seed(sum(map(ord, "".join(r.subject for r in requests))))
        u = torch.randn(w.shape[0], generator=g)
        v = torch.randn(w.shape[1], generator=g)
        with torch.no_grad():
            w.add_(self.scale * torch.outer(u, v).to(w.dtype))
        return FakeResult(w, original)
